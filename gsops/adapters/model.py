"""Model-level verbs: ``apply_``, ``merge_``, ``unmerge_``, ``revert_``, ``trainable_parameters``."""
from __future__ import annotations

import dataclasses
import warnings

import torch
from torch import nn

from ..methods import registry
from ..nn.layers import supported_layer
from ..nn.mergeable import MergeableAdapter
from .. import logs
from . import saved_modules
from .config import AdapterConfig
from .targets import ALL_LINEAR, describe_no_match, output_layer_names, rule_matches

ADAPTER_TYPES = (MergeableAdapter,)  # every method's layer is a MergeableAdapter


@dataclasses.dataclass
class AdapterSummary:
    method: str
    layers: list            # qualified names of the wrapped layers
    skipped: list           # (name, reason) of matched layers left alone
    trainable: int          # trainable parameters after apply_
    base: int               # parameters of the model without the adapters

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.base if self.base else 0.0

    def __str__(self) -> str:
        s = (f"gsops.apply_: method={self.method!r}, {len(self.layers)} layer(s) wrapped, "
             f"{self.trainable:,} trainable parameters ({self.percent:.4f}% of {self.base:,} base parameters)")
        if self.skipped:
            s += f"; skipped {len(self.skipped)}: " + ", ".join(f"{n} ({why})" for n, why in self.skipped[:5])
        return s


def _check_model(model):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def adapter_layers(model: nn.Module) -> list:
    """``(qualified name, adapter)`` of every gsops adapter layer in ``model``."""
    _check_model(model)
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ADAPTER_TYPES)]


def _targets(model: nn.Module, config: AdapterConfig, report: dict | None = None):
    """``(targets, skipped)``: ``(name, parent, child name, layer, explicit)`` of the layers to wrap.

    ``explicit`` is False for layers matched only by ``"all-linear"``. ``report``
    (when given) receives ``"unsupported"``: matched modules of another type.
    """
    targets, skipped, unsupported = [], [], []
    rule, exclude = config.target_modules, config.exclude_modules
    explicit = rule != ALL_LINEAR
    outputs = output_layer_names(model) if not explicit else set()
    shared = _shared_weights(model)
    for parent_name, parent in model.named_modules():
        if isinstance(parent, ADAPTER_TYPES):
            continue
        # parent._modules, not named_children(): a module registered twice must be seen twice
        for child_name, child in [(k, v) for k, v in parent._modules.items() if v is not None]:
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if not rule_matches(rule, name, child) or rule_matches(exclude, name, child) or name in outputs:
                continue
            if isinstance(child, ADAPTER_TYPES):
                raise ValueError(f"{name} is already an adapter layer; call gsops.revert_(model) first")
            if not supported_layer(child):
                unsupported.append((name, child))  # a name rule also matches blocks, norms, dropouts
                continue
            if isinstance(parent, nn.MultiheadAttention):
                # MultiheadAttention reads out_proj.weight directly and never calls its forward
                skipped.append((name, "inside nn.MultiheadAttention, which bypasses the module's forward"))
                continue
            if id(child.weight) in shared:
                if explicit:
                    raise ValueError(
                        f"{name}: its weight is shared with another module (tied weights, e.g. tie_word_embeddings); "
                        "an adapter would change or half-merge the other module. Remove it from target_modules "
                        "(or add it to exclude_modules), or untie the weights"
                    )
                skipped.append((name, "its weight is shared with another module (tied weights)"))
                continue
            targets.append((name, parent, child_name, child, explicit))
    if report is not None:
        report["unsupported"] = unsupported
    return targets, skipped


def _shared_weights(model) -> set:
    """ids of parameters owned by more than one module (tied weights)."""
    owners = {}
    for _, m in model.named_modules(remove_duplicate=False):
        for p in m.parameters(recurse=False):
            owners.setdefault(id(p), set()).add(id(m))
    return {pid for pid, mods in owners.items() if len(mods) > 1}


def _layer_settings(name, layer, config, overrides):
    """Validate ``layer`` for ``config`` (naming it); the per-layer settings the adapter is built with.

    The method's registry entry decides (e.g. an orthogonal layer gets the config's
    ``block_size`` when it fits, else the nearest that does, with a warning, unless
    ``config.strict``); ``overrides`` (from a saved adapter) are used exactly.
    """
    return registry.get(config.method).layer_settings(name, layer, config, overrides)


def _make(name, layer, config, settings):
    return registry.get(config.method).build(name, layer, config, settings)


def layer_settings(adapter: nn.Module) -> dict:
    """The per-layer settings an adapter was built with (what save_adapter records for each layer)."""
    config = getattr(adapter, "gsops_config", None)
    return registry.get(config.method).saved_settings(adapter) if config is not None else {}


def apply_(model: nn.Module, config: AdapterConfig | None = None, *, verbose: bool = True) -> nn.Module:
    """Wrap every targeted ``nn.Linear`` / ``nn.Conv2d`` / ``Conv1D`` of ``model`` in place, freeze the rest.

    Targets follow PEFT's rules (see :class:`AdapterConfig` and
    :mod:`gsops.adapters.targets`); the default ``"all-linear"`` leaves the output
    layer alone. All targeted layers are validated before any is changed: an
    invalid layer raises a ValueError naming it and the numbers, and leaves
    ``model`` as it was. A layer whose weight is shared with another module (tied
    weights) is refused when targeted by name, regex or type, and skipped with a
    warning when matched only by ``"all-linear"``. Inside ``nn.TransformerEncoder``
    with adapters, nested-tensor inference is switched off (``use_nested_tensor``;
    :func:`revert_` restores it). ``config.modules_to_save`` modules are left
    unwrapped and made trainable. Logs a one-line summary (``logging`` logger
    ``"gsops"``, INFO, rank 0 only) when ``verbose``; :func:`adapter_summary`
    returns it. Returns ``model``.
    """
    return _apply(model, config, verbose=verbose)


def _apply(model, config=None, *, verbose=True, overrides=None):
    _check_model(model)
    config = AdapterConfig() if config is None else config
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"config must be a gsops.AdapterConfig, got {type(config).__name__}")
    if adapter_layers(model):
        raise ValueError("model already has gsops adapters; call gsops.revert_(model) before applying again")
    report = {}
    targets, skipped = _targets(model, config, report)
    to_save = saved_modules.select(model, config.modules_to_save)  # trained in full: never wrapped
    targets = [t for t in targets if not saved_modules.covers(t[0], to_save)]
    if not targets:
        raise ValueError(describe_no_match(model, config, report["unsupported"], skipped))
    overrides = overrides or {}
    settings = {}
    with warnings.catch_warnings(record=True) as fitted:
        warnings.simplefilter("always")
        for name, _, _, layer, _ in targets:
            settings[name] = _layer_settings(name, layer, config, overrides.get(name))
    for w in fitted:  # before any change: a warning turned into an error leaves the model as it was
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    model._gsops_requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    saved_modules.snapshot(model, to_save)
    modules = dict(model.named_modules())
    for n in to_save:
        modules[n].requires_grad_(True)
    made = {}  # a module registered under several names gets one adapter, shared the same way
    for name, parent, child_name, layer, _ in targets:
        if id(layer) not in made:
            adapter = _make(name, layer, config, settings[name])
            adapter.gsops_config = config
            made[id(layer)] = adapter
        setattr(parent, child_name, made[id(layer)])
    for _, m in adapter_layers(model):
        for _, p in m.adapter_named_parameters():
            p.requires_grad_(True)
    nested = []
    for enc in model.modules():
        if isinstance(enc, nn.TransformerEncoder) and getattr(enc, "use_nested_tensor", False) and any(
                isinstance(m, ADAPTER_TYPES) for m in enc.modules()):
            nested.append(enc)
            enc.use_nested_tensor = False  # its nested fast path would hand adapters nested tensors
    model._gsops_nested_off = nested
    if skipped:
        warnings.warn("gsops.apply_ left matched layers alone: " + "; ".join(f"{n}: {w}" for n, w in skipped))
    model._gsops_skipped = skipped
    if verbose:
        logs.info("%s", adapter_summary(model))
    return model


def adapter_parameters(model: nn.Module) -> list:
    """``(qualified name, parameter)`` of every adapter parameter (not the base layers')."""
    return [(f"{lname}.{pname}", p) for lname, m in adapter_layers(model) for pname, p in m.adapter_named_parameters()]


def adapter_summary(model: nn.Module) -> AdapterSummary:
    """Layers wrapped, trainable parameters and their percentage of the base model's parameters."""
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("model has no gsops adapters")
    adapter_ids = {id(p) for _, p in adapter_parameters(model)}
    base = sum(p.numel() for p in model.parameters() if id(p) not in adapter_ids)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return AdapterSummary(
        method=layers[0][1].gsops_config.method, layers=[n for n, _ in layers],
        skipped=list(getattr(model, "_gsops_skipped", [])), trainable=trainable, base=base,
    )


def trainable_parameters(model: nn.Module) -> list:
    """The parameters of ``model`` that require gradients (after :func:`apply_`: the adapters'), for an optimizer.

    Count them with ``sum(p.numel() for p in gsops.trainable_parameters(model))``.
    """
    _check_model(model)
    return [p for p in model.parameters() if p.requires_grad]


def merge_(model: nn.Module) -> nn.Module:
    """Write every adapter into its base layer's weight (``W' = diag(s) Q_out W Q_in``, float64).

    All or nothing: every layer is checked first (tied weights, finite
    parameters, a merged weight finite in the base dtype); a problem raises
    ValueError naming the layer and changes nothing. Already-merged layers are
    left alone with a warning (never merged twice).
    """
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("model has no gsops adapters to merge")
    todo = _unique([(n, m) for n, m in layers if not m.merged])
    already = [n for n, m in layers if m.merged]
    for n, m in todo:
        try:
            m.check_merge()
        except ValueError as e:
            raise ValueError(f"gsops.merge_: {n}: {e} (no layer was merged)") from None
    if already:
        warnings.warn(f"gsops.merge_: {len(already)} layer(s) already merged, left as they are: {already[:3]}")
    done = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for n, m in todo:
                m.merge()
                done.append(m)
    except BaseException:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for m in reversed(done):
                m.unmerge()
        raise
    return model


def _unique(layers):
    seen, out = set(), []
    for n, m in layers:
        if id(m) not in seen:
            seen.add(id(m))
            out.append((n, m))
    return out


def unmerge_(model: nn.Module) -> nn.Module:
    """Restore every merged layer's frozen weight (``Q^{-1} = Q^T``, float64). Unmerged layers: warning, no-op.

    Every merged layer is checked first (e.g. a zero scale, which has no
    inverse); a problem raises ValueError naming the layer and changes nothing.
    """
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("model has no gsops adapters to unmerge")
    todo = _unique([(n, m) for n, m in layers if m.merged])
    for n, m in todo:  # refuse before changing anything
        try:
            m._check_unmergeable()
        except ValueError as e:
            raise ValueError(f"gsops.unmerge_: {n}: {e} (no layer was unmerged)") from None
    not_merged = [n for n, m in layers if not m.merged]
    if not_merged:
        warnings.warn(f"gsops.unmerge_: {len(not_merged)} layer(s) were not merged, left as they are: {not_merged[:3]}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _, m in todo:
            m.unmerge()
    return model


def revert_(model: nn.Module) -> nn.Module:
    """Remove every adapter, putting the original modules (with their original weights) back.

    Restores each parameter's ``requires_grad`` as it was before :func:`apply_` froze it, and
    the ``modules_to_save`` modules to their values before :func:`apply_` (training on
    them is discarded, like the adapters'; :func:`gsops.merge_and_unload` keeps both).
    """
    _check_model(model)
    if not adapter_layers(model):
        raise ValueError("model has no gsops adapters to revert")
    reverted = {}  # an adapter shared under several names is reverted once
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in [(k, v) for k, v in parent._modules.items() if v is not None]:
            if isinstance(child, ADAPTER_TYPES):
                if id(child) not in reverted:
                    reverted[id(child)] = child.revert()
                setattr(parent, child_name, reverted[id(child)])
    saved_modules.restore(model)  # modules_to_save: their values before apply_
    saved_modules.forget(model)
    for p, flag in getattr(model, "_gsops_requires_grad", [(p, True) for p in model.parameters()]):
        p.requires_grad_(flag)
    for enc in getattr(model, "_gsops_nested_off", []):
        enc.use_nested_tensor = True
    for attr in ("_gsops_skipped", "_gsops_requires_grad", "_gsops_nested_off"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


__all__ = [
    "apply_", "merge_", "unmerge_", "revert_", "trainable_parameters", "adapter_layers", "adapter_parameters",
    "adapter_summary", "AdapterSummary", "MergeableAdapter", "layer_settings",
]
