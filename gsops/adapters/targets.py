"""Which layers of a model an :class:`AdapterConfig` wraps: PEFT's target rules.

``target_modules`` (and ``exclude_modules``) follow PEFT's ``check_target_module_exists``:

* a single string is a regular expression matched with ``re.fullmatch`` against
  the module's full qualified name (``r".*\\.(q|v)"``);
* a list (tuple, set) of strings matches a module whose name equals an entry or
  ends with ``"." + entry`` (``["q", "v"]`` wraps ``...SelfAttention.q`` but not
  ``...k``). Entries are module names, not patterns: an entry with characters a
  module name cannot have (``^ $ * + ? ( ) [ ] { } | \\``) is refused, pointing to the
  single-string form;
* gsops also accepts module types in a list (``nn.Linear``, ``nn.Conv2d``,
  transformers' ``Conv1D``);
* ``"all-linear"`` (the default) is every ``nn.Linear`` and ``Conv1D`` except the
  output layer, decided as PEFT does: the model's output embeddings
  (``model.get_output_embeddings()``, e.g. ``lm_head``) and a classification head
  found as the model's ``score`` or ``classifier`` attribute (here every linear
  layer inside such a head, e.g. RoBERTa's ``classifier.dense`` and
  ``classifier.out_proj``). ``nn.Conv2d`` layers are targeted by name or type only.

``exclude_modules`` takes the same forms (no ``"all-linear"``) and wins over
``target_modules``. Only ``nn.Linear``, ``nn.Conv2d`` and ``Conv1D`` layers are
wrapped; a name that matches another module (a block, a norm) is reported when
nothing at all is wrapped.
"""
from __future__ import annotations

import re

from torch import nn

from ..nn.layers import SUPPORTED_LAYERS, conv1d_type, is_linear_like, supported_layer

ALL_LINEAR = "all-linear"
CLASSIFIER_HEADS = ("score", "classifier")  # PEFT's names for sequence-classification heads
_NOT_IN_NAMES = re.compile(r"[\^$*+?()\[\]{}|\\]")


def _is_supported_type(t) -> bool:
    c1d = conv1d_type()
    return issubclass(t, (nn.Linear, nn.Conv2d)) or (c1d is not None and issubclass(t, c1d))


def normalise_targets(targets, what: str = "target_modules"):
    """Validate ``target_modules`` / ``exclude_modules``; returns a str or a list (types kept as types)."""
    if targets is None:
        return ALL_LINEAR if what == "target_modules" else None
    if isinstance(targets, str):
        if targets.lower() == ALL_LINEAR:
            if what != "target_modules":
                raise ValueError(f"{what}={targets!r}: 'all-linear' is only a target_modules value")
            return ALL_LINEAR
        try:
            re.compile(targets)
        except re.error as e:
            raise ValueError(f"{what}: {targets!r} is not a valid regular expression ({e})") from None
        return targets
    if isinstance(targets, type):
        targets = [targets]
    if not isinstance(targets, (list, tuple, set, frozenset)):
        raise TypeError(
            f"{what} must be a regex string, 'all-linear', or a list of module names and/or nn.Module types, "
            f"got {targets!r:.200}"
        )
    targets = sorted(targets, key=repr) if isinstance(targets, (set, frozenset)) else list(targets)
    if not targets:
        raise ValueError(f"{what} must not be empty (the default is target_modules='all-linear')")
    for t in targets:
        if isinstance(t, str):
            if not t:
                raise ValueError(f"{what}: list entries must be non-empty module names")
            if _NOT_IN_NAMES.search(t):
                try:
                    re.compile(t)
                    how = ""
                except re.error as e:
                    how = f" ({t!r} is not a valid regular expression either: {e})"
                raise ValueError(
                    f"{what}: list entry {t!r} is not a module name: a list entry matches a module whose name "
                    "equals it or ends with '.' + it (PEFT's rule); pass a single string to match a regular "
                    f"expression against the full name{how}"
                )
        elif isinstance(t, type) and issubclass(t, nn.Module):
            if not _is_supported_type(t):
                raise ValueError(f"{what}: type {t.__name__} is not supported; adapters wrap {SUPPORTED_LAYERS}")
        else:
            raise TypeError(f"{what} entries must be module names (str) or nn.Module types, got {t!r}")
    return targets


def rule_matches(rule, name: str, module: nn.Module) -> bool:
    """Whether one normalised ``target_modules``/``exclude_modules`` value matches ``(name, module)``.

    ``"all-linear"`` here only checks the type; the output layer is removed by :func:`output_layer_names`.
    """
    if rule is None:
        return False
    if rule == ALL_LINEAR:
        return is_linear_like(module)
    if isinstance(rule, str):
        return re.fullmatch(rule, name) is not None
    for t in rule:
        if isinstance(t, str):
            if name == t or name.endswith("." + t):
                return True
        elif isinstance(module, t):
            return True
    return False


def output_layer_names(model: nn.Module) -> set:
    """Qualified names of the modules ``"all-linear"`` leaves alone: output embeddings and classifier heads."""
    heads = []
    get_out = getattr(type(model), "get_output_embeddings", None)
    if callable(get_out):
        try:
            out = model.get_output_embeddings()
        except (AttributeError, NotImplementedError, TypeError):
            out = None
        if isinstance(out, nn.Module):
            heads.append(out)
    for attr in CLASSIFIER_HEADS:
        head = model._modules.get(attr)
        if isinstance(head, nn.Module):
            heads.append(head)
    ids = {id(h) for h in heads}
    names = set()
    for name, m in model.named_modules(remove_duplicate=False):
        if id(m) in ids:
            names.update(f"{name}.{sub}" if sub else name for sub, _ in m.named_modules(remove_duplicate=False))
    return names


def describe_no_match(model: nn.Module, config, unsupported: list, skipped: list) -> str:
    """The message of a target rule that wrapped nothing: what matched with an unsupported type, what exists."""
    layers = [(n, m) for n, m in model.named_modules() if n and supported_layer(m)]
    short = sorted({n.rsplit(".", 1)[-1] for n, _ in layers})
    msg = (f"no {SUPPORTED_LAYERS} layer of the model matched target_modules={config.target_modules!r}"
           + (f" (exclude_modules={config.exclude_modules!r})" if config.exclude_modules is not None else ""))
    if unsupported:
        msg += "; matched but of an unsupported type: " + ", ".join(
            f"{n} ({type(m).__name__})" for n, m in unsupported[:8]) + (" ..." if len(unsupported) > 8 else "")
    if skipped:
        msg += "; matched but skipped: " + "; ".join(f"{n}: {why}" for n, why in skipped[:5])
    if layers:
        msg += (f"; the model's {len(layers)} adaptable layer(s) are named {short[:20]}"
                + (" ..." if len(short) > 20 else "") + f" (e.g. {layers[0][0]!r})")
    else:
        msg += "; the model has no adaptable layer"
    return msg


__all__ = ["ALL_LINEAR", "normalise_targets", "rule_matches", "output_layer_names", "describe_no_match"]
