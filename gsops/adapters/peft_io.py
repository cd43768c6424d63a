"""PEFT OFT / BOFT adapter folders: :func:`load_peft_adapter` runs them on gsops, :func:`save_peft_adapter` writes them.

A folder written by PEFT's ``save_pretrained`` holds ``adapter_config.json``
(the ``OFTConfig`` / ``BOFTConfig``) and ``adapter_model.safetensors`` with keys
``base_model.model.<layer>.oft_R.weight`` (OFT) or ``...<layer>.boft_R`` and
``...<layer>.boft_s`` (BOFT), plus ``base_model.model.<module>.<tensor>`` for the
``modules_to_save``. The correspondence, for ``nn.Linear`` layers and BOFT's
``nn.Conv2d`` layers (facts of
PEFT 0.21, each checked by a test against PEFT's own layers to 1e-5 in float32):

* OFT, ``use_cayley_neumann=False``: PEFT's ``oft_R.weight`` (``r`` rows of
  ``b(b-1)/2`` upper-triangle numbers, row major) are gsops ``oft`` parameters
  as they are, ``packed=True``, ``scale=False``, ``cayley="exact"``.
* OFT, ``use_cayley_neumann=True``: PEFT evaluates its own truncated series
  ``R`` and applies ``R^T`` to the input; gsops runs it with
  ``cayley="peft_neumann"`` (the same series, :mod:`gsops.reference.peft_cayley`) on
  the negated parameters (``R(K)^T = R(-K)`` for skew ``K``), with
  ``neumann_terms = num_cayley_neumann_terms``. PEFT changed this series in
  0.18; a folder whose ``peft_version`` is older (or missing) gets the warning
  PEFT gives, and the current series, as in PEFT.
* BOFT: PEFT builds ``K = 0.5 (A - A^T)`` from each full block ``A`` of
  ``boft_R`` (shape ``(m, r, b, b)``, one row per butterfly factor) and scales
  the outputs by ``boft_s`` (shape ``(out, 1)``, ``(1, out)`` for Conv2d); gsops ``boft`` with
  ``packed=False`` builds ``K = A' - A'^T``, so ``A' = 0.5 A`` (exact in binary
  floating point), ``n_factors = m``, ``scale=True`` with ``s = boft_s`` flattened.
  PEFT's BOFT Conv2d layer rotates the flattened ``in_channels * k * k`` side of
  the weight as gsops does, but reads only ``kernel_size[0]``, ``stride[0]`` and
  ``padding[0]`` and ignores dilation and padding mode: layers where that
  differs from the layer's own convolution are refused.

Refused, naming the option (gsops has no equivalent, or the function would
differ): other PEFT methods, ``bias`` other than ``"none"``, ``fan_in_fan_out``
(Conv1D layers), ``coft``, ``block_share``, ``module_dropout`` / ``boft_dropout``
> 0 (PEFT's multiplicative dropout; gsops has none, so training would differ),
``layer_replication``, ``trainable_token_indices``, OFT's Conv2d layers, Embedding layers,
layers of different block sizes, and unknown configuration fields.
``target_modules``, ``exclude_modules``, ``layers_to_transform`` and
``layers_pattern`` are not re-run: the tensor file names the layers, and gsops
wraps exactly those. PEFT BOFT on a machine without its ``fbd_cuda`` extension
trains one butterfly factor whatever ``boft_n_butterfly_factor`` says; such a
folder (``boft_R`` with one factor) is loaded as the one factor it holds, with
a warning.

Everything (config fields, layer names and types, tensor names, shapes, dtypes,
finiteness, the ``modules_to_save`` state) is checked before the model is
touched; any problem raises ValueError (FileNotFoundError for a missing folder)
and leaves the model bit-for-bit as it was. Files are never unpickled: the
safetensors header is checked as in :mod:`gsops.adapters.io`.
"""
from __future__ import annotations

import dataclasses
import math
import os
import warnings

import torch
from torch import nn

from .. import logs, ops
from . import saved_modules
from .config import AdapterConfig
from .io import CONFIG_FILE, TENSOR_FILE, _adapter_files, _exact_names, _load_json, _read_tensors, _write_files
from .model import _check_model, adapter_layers, apply_

PREFIX = "base_model.model."
PEFT_VERSION_WRITTEN = "0.21.2"  # the PEFT version whose layers the conversions were checked against

# field -> the value gsops needs (None: any value, the field is informational or re-derived from the tensors)
_COMMON = {
    "task_type": None, "peft_type": None, "auto_mapping": None, "peft_version": None,
    "base_model_name_or_path": None, "revision": None, "inference_mode": None, "target_modules": None,
    "exclude_modules": None, "fan_in_fan_out": False, "bias": "none", "init_weights": None,
    "layers_to_transform": None, "layers_pattern": None, "modules_to_save": None,
    "layer_replication": "null", "trainable_token_indices": "null", "megatron_config": "null",
    "megatron_core": None,
}
_FIELDS = {
    "OFT": dict(_COMMON, r=None, oft_block_size=None, module_dropout=0.0, coft=False, eps=None, block_share=False,
                use_cayley_neumann=None, num_cayley_neumann_terms=None),
    "BOFT": dict(_COMMON, boft_block_size=None, boft_block_num=None, boft_n_butterfly_factor=None,
                 boft_dropout=0.0),
}
_WHY = {
    "fan_in_fan_out": "Conv1D-style (fan_in, fan_out) weights are not supported",
    "bias": "PEFT then trains the layers' biases, which a gsops adapter keeps frozen",
    "module_dropout": "PEFT's multiplicative block dropout has no gsops equivalent (training would differ)",
    "boft_dropout": "PEFT's multiplicative block dropout has no gsops equivalent (training would differ)",
    "coft": "constrained OFT projects the parameters in every forward; gsops has no such projection",
    "block_share": "one block shared by all blocks of a layer has no gsops equivalent",
    "layer_replication": "replicated layers are not supported",
    "trainable_token_indices": "trainable tokens are not supported",
    "megatron_config": "Megatron layers are not supported",
}


# --------------------------------------------------------------------------- reading
def _read_json(cfg_path):
    meta = _load_json(cfg_path)
    if not isinstance(meta, dict):
        raise ValueError(f"{cfg_path} must hold a JSON object")
    return meta


def _check_config(cfg: dict, cfg_path) -> str:
    if cfg.get("format") == "gsops-adapter":
        raise ValueError(f"{cfg_path} is a gsops adapter (format='gsops-adapter'); load it with gsops.load_adapter")
    peft_type = cfg.get("peft_type")
    if peft_type not in _FIELDS:
        raise ValueError(
            f"{cfg_path}: peft_type={peft_type!r} is not supported; gsops.load_peft_adapter reads PEFT's OFT and BOFT"
        )
    fields = _FIELDS[peft_type]
    unknown = sorted(k for k in cfg if k not in fields)
    if unknown:
        raise ValueError(f"{cfg_path}: unknown {peft_type} config field(s) {unknown}; refusing to guess what they do")
    for k, need in fields.items():
        if need is None or k not in cfg:
            continue
        v = cfg[k]
        if need == "null":
            ok = v is None or v == [] or v == {}
        else:
            ok = v == need and isinstance(v, bool) == isinstance(need, bool)
        if not ok:
            raise ValueError(f"{cfg_path}: {k}={v!r} is not supported ({_WHY[k]})")
    return peft_type


def _int_field(cfg, k, cfg_path, minimum=0, default=None):
    v = cfg.get(k, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{cfg_path}: {k}={v!r} must be an int >= {minimum}")
    return v


def _split_keys(tensors, suffixes, path):
    """``{layer: {suffix: tensor}}`` for adapter keys and ``{state key: tensor}`` for the rest."""
    layers, rest = {}, {}
    for key, t in tensors.items():
        if not key.startswith(PREFIX):
            raise ValueError(f"{path}: tensor {key!r} does not start with {PREFIX!r} (not a PEFT adapter file?)")
        name = key[len(PREFIX):]
        for suf in suffixes:
            if name.endswith("." + suf):
                layers.setdefault(name[: -len(suf) - 1], {})[suf] = t
                break
        else:
            rest[name] = t
    return layers, rest


def _boft_conv_problem(conv: nn.Conv2d):
    """Why PEFT's BOFT Conv2d layer computes another function than gsops's for ``conv`` (None when they agree).

    PEFT's layer reads ``kernel_size[0]`` (square kernels), ``stride[0]`` and
    ``padding[0]``, and calls ``F.conv2d`` without dilation, groups or padding mode.
    """
    kh, kw = conv.kernel_size
    checks = [(kh == kw, f"kernel_size={conv.kernel_size} is not square"),
              (conv.stride[0] == conv.stride[1], f"stride={conv.stride} differs per side"),
              (not isinstance(conv.padding, str) and conv.padding[0] == conv.padding[1],
               f"padding={conv.padding!r} is not one int per side"),
              (tuple(conv.dilation) == (1, 1), f"dilation={conv.dilation}"),
              (conv.groups == 1, f"groups={conv.groups}"),
              (conv.padding_mode == "zeros", f"padding_mode={conv.padding_mode!r}")]
    bad = [why for ok, why in checks if not ok]
    return "; ".join(bad) if bad else None


def _dims(layer):
    """(d_in, d_out, expected boft_s shape) of a Linear or Conv2d layer, as PEFT's BOFT sees it."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features, (layer.out_features, 1)
    kh, kw = layer.kernel_size
    return layer.in_channels * kh * kw, layer.out_channels, (1, layer.out_channels)


def _version_before(version, minimum) -> bool:
    """True when ``version`` ("0.17.1", "0.18.0@<commit>", missing) is older than ``minimum`` (as PEFT reads it)."""
    if not isinstance(version, str):
        return True
    parts = []
    for piece in version.partition("@")[0].split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit()) if piece[:1].isdigit() else ""
        parts.append(int(digits) if digits else 0)
    return tuple(parts) < tuple(minimum)


def _block_size_from_packed(n: int):
    b = int((1 + math.isqrt(1 + 8 * n)) // 2)
    return b if b * (b - 1) // 2 == n else None


def _plan(model, cfg, peft_type, tensors, path):
    """Check the file against the model; return the gsops config and ``{gsops tensor name: value}`` to copy."""
    cfg_path = os.path.join(path, CONFIG_FILE)
    for key, t in tensors.items():
        if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
            raise ValueError(f"{path}: tensor {key} is not a finite floating-point tensor; refusing to load it")
    if any(k.endswith(".oft_embedding_R.weight") or ".oft_embedding_R." in k for k in tensors):
        raise ValueError(f"{path}: OFT on nn.Embedding layers (oft_embedding_R) is not supported")
    suffixes = ("oft_R.weight",) if peft_type == "OFT" else ("boft_R", "boft_s")
    layer_tensors, rest = _split_keys(tensors, suffixes, path)
    if not layer_tensors:
        raise ValueError(f"{path}: the tensor file holds no {peft_type} layer ({', '.join(suffixes)} keys)")
    modules = dict(model.named_modules())
    for name, parts in layer_tensors.items():
        missing = [s for s in suffixes if s not in parts]
        if missing:
            raise ValueError(f"{path}: layer {name} has no {missing} tensor")
        layer = modules.get(name)
        if layer is None:
            raise ValueError(f"{path}: layer {name} of the adapter is not a module of the model (another base model?)")
        if peft_type == "BOFT" and isinstance(layer, nn.Conv2d):
            why = _boft_conv_problem(layer)
            if why:
                raise ValueError(f"{path}: layer {name}: PEFT's BOFT Conv2d layer computes a different convolution "
                                 f"than the layer's own ({why}); refusing it")
        elif not isinstance(layer, nn.Linear):
            raise ValueError(f"{path}: layer {name} is {type(layer).__name__}; only nn.Linear layers (and BOFT's "
                             "Conv2d layers) are converted (PEFT's OFT Conv2d layer computes a different function)")
    # block sizes and factor counts, read from the tensors (PEFT may have adjusted the configured ones per layer)
    shapes = {}
    for name, parts in layer_tensors.items():
        layer = modules[name]
        if peft_type == "OFT":
            w = parts["oft_R.weight"]
            b = _block_size_from_packed(w.shape[-1]) if w.dim() == 2 else None
            if b is None or w.shape[0] * b != layer.in_features:
                raise ValueError(f"{path}: {name}.oft_R.weight has shape {tuple(w.shape)}; expected (r, b(b-1)/2) with "
                                 f"r*b = in_features={layer.in_features}")
            shapes[name] = (b, 1)
        else:
            R, s = parts["boft_R"], parts["boft_s"]
            d_in, _, s_shape = _dims(layer)
            if R.dim() != 4 or R.shape[-1] != R.shape[-2] or R.shape[1] * R.shape[-1] != d_in:
                raise ValueError(f"{path}: {name}.boft_R has shape {tuple(R.shape)}; expected (m, r, b, b) with "
                                 f"r*b = the layer's input size {d_in}")
            if tuple(s.shape) != s_shape:
                raise ValueError(f"{path}: {name}.boft_s has shape {tuple(s.shape)}; expected {s_shape}")
            shapes[name] = (R.shape[-1], R.shape[0])
    if len(set(shapes.values())) != 1:
        raise ValueError(f"{path}: layers have different (block size, factors) {sorted(set(shapes.values()))}; "
                         "a gsops adapter has one block_size and n_factors for every layer")
    b, m = next(iter(shapes.values()))
    if peft_type == "OFT":
        r_cfg, b_cfg = _int_field(cfg, "r", cfg_path), _int_field(cfg, "oft_block_size", cfg_path)
        if (r_cfg == 0) == (b_cfg == 0):
            raise ValueError(f"{cfg_path}: exactly one of r={r_cfg} and oft_block_size={b_cfg} must be non-zero")
        neumann = cfg.get("use_cayley_neumann", True)
        if not isinstance(neumann, bool):
            raise ValueError(f"{cfg_path}: use_cayley_neumann={neumann!r} must be a bool")
        terms = _int_field(cfg, "num_cayley_neumann_terms", cfg_path, minimum=1, default=5)
        if neumann and _version_before(cfg.get("peft_version"), (0, 18)):
            warnings.warn(f"{cfg_path}: peft_version={cfg.get('peft_version')!r} is older than 0.18, whose "
                          "Cayley-Neumann series changed; like PEFT >= 0.18, gsops evaluates the new series, which "
                          "is not the function these numbers were trained with")
        config = dict(method="oft", block_size=b, scale=False, packed=True,
                      cayley="peft_neumann" if neumann else "exact", neumann_terms=terms if neumann else 5)
    else:
        bs, bn = _int_field(cfg, "boft_block_size", cfg_path), _int_field(cfg, "boft_block_num", cfg_path)
        if (bs == 0) == (bn == 0):
            raise ValueError(f"{cfg_path}: exactly one of boft_block_size={bs} and boft_block_num={bn} must be non-zero")
        factors = _int_field(cfg, "boft_n_butterfly_factor", cfg_path, minimum=1)
        if m != factors:
            if m != 1:
                raise ValueError(f"{path}: boft_R holds {m} butterfly factors but boft_n_butterfly_factor={factors}")
            warnings.warn(f"{path}: boft_n_butterfly_factor={factors} but boft_R holds one factor (PEFT without its "
                          "fbd_cuda extension trains one factor); loading the one factor the file holds")
        config = dict(method="boft", block_size=b, n_factors=m, scale=True, packed=False, cayley="exact")
    # modules_to_save: the keys left over must be exactly their floating-point state
    entries = cfg.get("modules_to_save")
    if entries is not None and (not isinstance(entries, list) or not all(isinstance(e, str) for e in entries)):
        raise ValueError(f"{cfg_path}: modules_to_save={entries!r} must be null or a list of module names")
    names = [n for n, _ in model.named_modules() if n]
    # PEFT ignores entries that select nothing (task_type="SEQ_CLS" adds both "classifier" and "score")
    entries = [e for e in (entries or []) if any(saved_modules.matches(n, [e]) for n in names)] or None
    if rest and not entries:
        raise ValueError(f"{path}: tensors {sorted(rest)[:5]} are neither {peft_type} layers nor modules_to_save state")
    selected = []
    if entries:
        overlap = [n for n in layer_tensors if saved_modules.matches(n, entries)]
        if overlap:
            raise ValueError(f"{path}: layers {overlap[:3]} are both adapted and in modules_to_save")
        try:
            selected = saved_modules.select(model, entries)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        state = saved_modules.state(model, selected)
        if set(state) != set(rest):
            raise ValueError(f"{path}: modules_to_save state differs; missing from the file: "
                             f"{sorted(set(state) - set(rest))[:5]}, unexpected in the file: {sorted(set(rest) - set(state))[:5]}")
        for k, t in rest.items():
            if tuple(t.shape) != tuple(state[k].shape):
                raise ValueError(f"{path}: {k} has shape {tuple(t.shape)} in the file, {tuple(state[k].shape)} in the model")
    gs_config = AdapterConfig(**config, target_modules=_exact_names(layer_tensors), modules_to_save=entries)
    values = {}
    for name, parts in layer_tensors.items():
        if peft_type == "OFT":
            w = parts["oft_R.weight"][None]
            values[f"{name}.rotation.factors.params"] = -w if config["cayley"] == "peft_neumann" else w
        else:
            values[f"{name}.rotation.factors.params"] = 0.5 * parts["boft_R"]
            values[f"{name}.scale"] = parts["boft_s"].flatten()
    values.update(rest)
    return gs_config, values


def load_peft_adapter(model: nn.Module, path) -> nn.Module:
    """Wrap the layers of ``model`` named in PEFT's OFT/BOFT folder ``path`` with gsops adapters computing PEFT's function.

    ``model`` is the base model the PEFT adapter was trained on (not a
    ``PeftModel``), without gsops adapters. See the module docstring for the
    conversion and what is refused. Returns ``model``, adapted as by
    :func:`gsops.apply_` (the adapter parameters and ``modules_to_save`` are trainable).
    """
    _check_model(model)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    if hasattr(model, "peft_config") and hasattr(model, "base_model"):
        raise ValueError("model is a PEFT model; pass the base model (the one PEFT's adapter was trained on)")
    if adapter_layers(model):
        raise ValueError("model already has gsops adapters; call gsops.revert_(model) first")
    cfg_path, ten_path = _adapter_files(path, "load_peft_adapter", "PEFT's save_pretrained")
    cfg = _read_json(cfg_path)
    peft_type = _check_config(cfg, cfg_path)
    _, tensors = _read_tensors(ten_path)
    gs_config, values = _plan(model, cfg, peft_type, tensors, path)
    try:
        apply_(model, gs_config, verbose=False)  # validates every layer before changing any
    except ValueError as e:
        raise ValueError(f"{path}: the PEFT adapter does not fit the model: {e}") from None
    from .io import _saved_tensors

    params = _saved_tensors(model)
    if set(params) != set(values) or any(tuple(params[k].shape) != tuple(values[k].shape) for k in params):
        from .model import revert_

        revert_(model)  # orthogonal adapters, unmerged: the base layers are back exactly as they were
        raise ValueError(f"{path}: the converted tensors do not fit the adapters gsops built "
                         f"({sorted(set(params) ^ set(values))[:5]})")
    narrowed = sorted({(str(values[k].dtype), str(p.dtype)) for k, p in params.items()
                       if torch.finfo(values[k].dtype).bits > torch.finfo(p.dtype).bits})
    if narrowed:
        warnings.warn(f"{path}: the file's {narrowed[0][0]} adapter numbers are rounded to the layers' {narrowed[0][1]} "
                      "(a gsops adapter takes its base weight's dtype); outputs differ from PEFT's by that rounding")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(values[name].to(device=p.device, dtype=p.dtype))
    logs.info("gsops.load_peft_adapter: PEFT %s adapter from %s on %d layer(s)", peft_type, os.fspath(path),
              len(adapter_layers(model)))
    return model


# --------------------------------------------------------------------------- writing
def _export_tensors(model, config) -> tuple[dict, dict]:
    layers = adapter_layers(model)
    method = config.method
    if method not in ("oft", "boft"):
        raise ValueError(
            f"save_peft_adapter: method={method!r} has no PEFT equivalent (PEFT has OFT and BOFT, no GSOFT, "
            "Double GSOFT, SORSA or LoLDU); save it with gsops.save_adapter"
        )
    for n, m in layers:
        base = m.base_layer
        if isinstance(base, nn.Linear):
            continue
        if method == "oft":
            raise ValueError(f"save_peft_adapter: layer {n} is not nn.Linear; PEFT's OFT Conv2d layer computes a "
                             "different function, only nn.Linear layers are converted for OFT")
        why = _boft_conv_problem(base)
        if why:
            raise ValueError(f"save_peft_adapter: layer {n}: PEFT's BOFT Conv2d layer would compute a different "
                             f"convolution ({why})")
    if method == "oft" and config.scale:
        raise ValueError("save_peft_adapter: method='oft' with scale=True; PEFT's OFT has no per-output scale "
                         "(use scale=False, or method='boft', whose boft_s is that scale)")
    if method == "oft" and config.cayley == "neumann":
        raise ValueError("save_peft_adapter: cayley='neumann' (OFTv2's series) differs from PEFT's Cayley-Neumann "
                         "series; use cayley='exact' (PEFT use_cayley_neumann=False) or 'peft_neumann'")
    if method == "boft" and config.cayley != "exact":
        raise ValueError(f"save_peft_adapter: cayley={config.cayley!r}; PEFT's BOFT only has the exact Cayley transform")
    out = {}
    seen = set()
    for name, m in layers:
        if id(m) in seen:
            raise ValueError(f"save_peft_adapter: {name} shares its adapter with another name; PEFT cannot express that")
        seen.add(id(m))
        f = m.rotation.factors
        with torch.no_grad():
            P = f.params.detach()
            if method == "oft":
                w = P[0] if f.packed else ops.unskew(P[0] - P[0].transpose(-1, -2))
                out[f"{PREFIX}{name}.oft_R.weight"] = -w if config.cayley == "peft_neumann" else w
            else:
                A = ops.skew(P, f.b) if f.packed else 2 * P  # PEFT: K = 0.5 (A - A^T)
                s = m.scale.detach() if m.scale is not None else torch.ones(m.d_out, dtype=P.dtype, device=P.device)
                out[f"{PREFIX}{name}.boft_R"] = A
                out[f"{PREFIX}{name}.boft_s"] = s.reshape(_dims(m.base_layer)[2])
    for k, t in saved_modules.state(model, saved_modules.selected_names(model)).items():
        out[PREFIX + k] = t.detach()
    out = {k: v.to("cpu").contiguous().clone() for k, v in out.items()}
    bad = [k for k, t in out.items() if not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(f"save_peft_adapter: tensors {bad[:5]} contain NaN or inf; refusing to write them")
    common = {
        "task_type": None, "peft_type": method.upper(), "auto_mapping": None, "peft_version": PEFT_VERSION_WRITTEN,
        "base_model_name_or_path": None, "revision": None, "inference_mode": True,
        "target_modules": sorted(n for n, _ in layers), "exclude_modules": None, "fan_in_fan_out": False,
        "bias": "none", "init_weights": True, "layers_to_transform": None, "layers_pattern": None,
        "modules_to_save": list(config.modules_to_save) if config.modules_to_save else None,
    }
    if method == "oft":
        cfg = dict(common, r=0, oft_block_size=config.block_size, module_dropout=0.0, coft=False, eps=6e-05,
                   block_share=False, use_cayley_neumann=config.cayley == "peft_neumann",
                   num_cayley_neumann_terms=config.neumann_terms if config.cayley == "peft_neumann" else 5)
    else:
        cfg = dict(common, boft_block_size=config.block_size, boft_block_num=0,
                   boft_n_butterfly_factor=config.n_factors, boft_dropout=0.0)
    return out, cfg


def save_peft_adapter(model: nn.Module, path) -> str:
    """Write the gsops ``oft``/``boft`` adapter of ``model`` as a PEFT folder that ``PeftModel.from_pretrained`` loads.

    The folder computes the same function in PEFT (see the module docstring for
    the correspondence). Refused, with the reason and nothing written: other
    methods, OFT on Conv2d layers, BOFT on Conv2d layers whose convolution PEFT
    would not reproduce (see the module docstring), ``oft`` with ``scale=True`` or ``cayley="neumann"``,
    ``boft`` with a Cayley–Neumann series. A BOFT adapter with ``n_factors > 1``
    needs PEFT's ``fbd_cuda`` extension (or the benchmark stand-in ``perf.peft_boft.enable_cpu_fbd``)
    to load in PEFT. Returns the folder.
    """
    _check_model(model)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("model has no gsops adapters (call gsops.apply_ or gsops.load_peft_adapter first)")
    config = layers[0][1].gsops_config
    tensors, cfg = _export_tensors(model, config)
    return _write_files(path, tensors, "pt", cfg, indent=2)


__all__ = ["load_peft_adapter", "save_peft_adapter"]
