"""Saving and loading adapters: safetensors for the tensors, JSON for the config (never pickle).

``save_adapter(model, path)`` writes the folder ``path`` with
``adapter_model.safetensors`` (every adapter parameter, by qualified name, and
the floating-point state of the ``modules_to_save`` modules under the model's
``state_dict`` keys) and
``adapter_config.json`` (format tag, gsops version, the :class:`AdapterConfig`,
each wrapped layer's base type and weight shape, each tensor's shape).
``load_adapter(model, path)`` checks everything (config, layer names and
shapes, tensor names, shapes, finiteness) before copying a single number, and
raises ValueError without touching the model on any mismatch.

Untrusted files. Nothing here unpickles: no ``torch.load``, no
``pickle``. ``path`` must be a folder holding two regular files (a symlink to a
regular file is followed, as in the Hugging Face cache; a folder, device, FIFO
or dangling link in their place is refused). The config is read only up to
``MAX_CONFIG_BYTES`` and must be UTF-8 JSON of the expected structure. The
safetensors header is parsed here before the library sees the file: a length
over ``MAX_HEADER_BYTES`` or past the end of the file (a pickle renamed to
``.safetensors``, a truncated file) is refused, every tensor must be
F16/BF16/F32/F64 with in-bounds offsets, and the tensors must be exactly those
the config lists, with its shapes and dtypes. ``target_modules`` types in a file
are resolved only among already imported modules (a file never imports code),
and a file's regular expressions are never run on the model: a bare model gets
adapters on exactly the layers the file lists. Any refusal leaves the model
bit-for-bit as it was (base weights rewritten by sorsa/loldu are restored from a
copy).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re

import torch

from .._version import __version__
from ..methods import registry
from .config import AdapterConfig
from . import saved_modules
from .model import _apply, adapter_layers, adapter_parameters, layer_settings, revert_

FORMAT = "gsops-adapter"
FORMAT_VERSION = 1
CONFIG_FILE = "adapter_config.json"
TENSOR_FILE = "adapter_model.safetensors"


def _layer_info(model) -> dict:
    return {
        name: {"base": type(m.base_layer).__name__, "weight_shape": list(m.base_layer.weight.shape),
               "adapter": type(m).__name__, **layer_settings(m)}
        for name, m in adapter_layers(model)
    }


def _adapter_state(model) -> list:
    """``(qualified name, tensor)`` saved for the adapter: its parameters, then buffers its output depends on
    (``saved_buffers`` of the adapter class, e.g. LoLDU's LU row order ``perm``)."""
    state = adapter_parameters(model)
    for lname, m in adapter_layers(model):
        state += [(f"{lname}.{b}", getattr(m, b)) for b in getattr(type(m), "saved_buffers", ())]
    return state


def _saved_tensors(model) -> dict:
    """What the tensor file holds, by qualified name: the adapter state and the ``modules_to_save`` state."""
    out = dict(_adapter_state(model))
    out.update(saved_modules.state(model, saved_modules.selected_names(model)))
    return out


def _model_config(model) -> AdapterConfig:
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("model has no gsops adapters (call gsops.apply_ first)")
    return layers[0][1].gsops_config


def save_adapter(model: torch.nn.Module, path) -> str:
    """Write the adapter of ``model`` to the folder ``path`` (created if needed); returns the folder.

    The saved numbers are those of the adapter parameters; a merged model is
    saved the same way (the adapter parameters do not change when merging).
    Refuses (ValueError, nothing written) when a parameter is NaN/inf; each file
    is written to a temporary name and renamed into place.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    config = _model_config(model)
    tensors = {name: p.detach().to("cpu").contiguous() for name, p in _saved_tensors(model).items()}
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "gsops_version": __version__,
        "config": config.to_dict(), "layers": _layer_info(model),
        "tensors": {k: {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")} for k, t in tensors.items()},
    }
    bad = [k for k, t in tensors.items() if not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(f"adapter parameter(s) {bad[:5]} contain NaN or inf; refusing to save an adapter load_adapter would refuse")
    return _write_files(path, tensors, FORMAT, meta, indent=1)


def _write_files(path, tensors: dict, tensor_format: str, cfg: dict, indent: int) -> str:
    """Writes ``tensors`` (safetensors, metadata ``format``) and ``cfg`` (JSON) into the folder ``path``.

    Each file is written beside its final name and renamed into place, so a crash never leaves a
    half-written file."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    ten_path, cfg_path = os.path.join(path, TENSOR_FILE), os.path.join(path, CONFIG_FILE)
    tmp = f".tmp-{os.getpid()}"
    try:
        save_file(tensors, ten_path + tmp, metadata={"format": tensor_format})
        with open(cfg_path + tmp, "w") as f:
            json.dump(cfg, f, indent=indent, sort_keys=True)
        os.replace(ten_path + tmp, ten_path)
        os.replace(cfg_path + tmp, cfg_path)
    finally:
        for p in (ten_path + tmp, cfg_path + tmp):
            if os.path.exists(p):
                os.remove(p)
    return os.fspath(path)


MAX_CONFIG_BYTES = 16 * 2 ** 20   # adapter_config.json larger than this is refused
MAX_HEADER_BYTES = 16 * 2 ** 20   # safetensors JSON header larger than this is refused
SAFETENSORS_DTYPES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I64": 8}  # I64: index buffers (LoLDU's perm)
TORCH_DTYPE_NAMES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64", "I64": "int64"}


def _adapter_files(path, reader: str, writer: str):
    """``(config path, tensor path)`` of the adapter folder ``path``, checked to exist as regular files;
    the errors name ``reader`` (the loading function) and ``writer`` (what writes such folders)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist (expected a folder written by {writer})")
    if not os.path.isdir(path):
        raise ValueError(f"{path} is not a folder; {reader} expects the folder written by {writer}")
    cfg_path, ten_path = os.path.join(path, CONFIG_FILE), os.path.join(path, TENSOR_FILE)
    for p in (cfg_path, ten_path):
        _regular_file(p)
    return cfg_path, ten_path


def _regular_file(p: str) -> None:
    if not os.path.lexists(p):
        raise FileNotFoundError(f"{p} does not exist (expected a folder written by gsops.save_adapter)")
    if os.path.islink(p) and not os.path.exists(p):
        raise FileNotFoundError(f"{p} is a dangling symlink: its target {os.readlink(p)!r} does not exist")
    if not os.path.isfile(p):  # follows symlinks: a link to a regular file is fine
        raise ValueError(f"{p} is not a regular file (a folder, device, FIFO or dangling link?); refusing to read it")


def _is_int_list(v) -> bool:
    return isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v)


def _check_meta(meta, cfg_path) -> None:
    """The structure save_adapter writes; anything else is refused with the field named."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        fmt = meta.get("format") if isinstance(meta, dict) else None
        raise ValueError(f"{cfg_path} is not a gsops adapter config (format={fmt!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{cfg_path}: format_version={meta.get('format_version')!r}, this gsops reads {FORMAT_VERSION}")
    if not isinstance(meta.get("config"), dict):
        raise ValueError(f"{cfg_path}: field 'config' must be an object")
    layers, tensors = meta.get("layers"), meta.get("tensors")
    if not isinstance(layers, dict) or not layers:
        raise ValueError(f"{cfg_path}: field 'layers' must be a non-empty object")
    for name, info in layers.items():
        if not (isinstance(info, dict) and isinstance(info.get("base"), str) and isinstance(info.get("adapter"), str)
                and _is_int_list(info.get("weight_shape"))
                and ("block_size" not in info or _is_int_list([info["block_size"]]))):
            raise ValueError(
                f"{cfg_path}: layers[{name!r}] must be {{base: str, adapter: str, weight_shape: [int], block_size: int}}"
            )
    if not isinstance(tensors, dict):
        raise ValueError(f"{cfg_path}: field 'tensors' must be an object")
    for name, info in tensors.items():
        if not (isinstance(info, dict) and _is_int_list(info.get("shape")) and isinstance(info.get("dtype"), str)):
            raise ValueError(f"{cfg_path}: tensors[{name!r}] must be {{shape: [int], dtype: str}}")


def _load_json(cfg_path):
    """The JSON value in ``cfg_path``, refused (ValueError) over ``MAX_CONFIG_BYTES`` or when it is not JSON."""
    size = os.path.getsize(cfg_path)
    if size > MAX_CONFIG_BYTES:
        raise ValueError(f"{cfg_path} is {size} bytes, over MAX_CONFIG_BYTES={MAX_CONFIG_BYTES}; refusing to parse it")
    with open(cfg_path, "rb") as f:
        raw = f.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise ValueError(f"{cfg_path} is over MAX_CONFIG_BYTES={MAX_CONFIG_BYTES}; refusing to parse it")
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{cfg_path} is not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None


def _read_config(cfg_path):
    meta = _load_json(cfg_path)
    _check_meta(meta, cfg_path)
    try:
        config = AdapterConfig.from_dict(meta["config"])
    except (TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{cfg_path}: invalid adapter config: {e}") from None
    return meta, config


def _read_tensors(ten_path):
    """Parse and check the safetensors header ourselves, then decode with the safetensors library (no pickle)."""
    with open(ten_path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{ten_path}: {size} bytes, too short for a safetensors file (truncated?)")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER_BYTES or n > size - 8:
            raise ValueError(
                f"{ten_path}: safetensors header length {n} exceeds "
                f"{'MAX_HEADER_BYTES=' + str(MAX_HEADER_BYTES) if n > MAX_HEADER_BYTES else 'the file size ' + str(size)} "
                "(not a safetensors file, e.g. a pickle renamed, or truncated); refusing to read it"
            )
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise ValueError(f"{ten_path}: safetensors header is not valid JSON ({type(e).__name__})") from None
        if not isinstance(header, dict):
            raise ValueError(f"{ten_path}: safetensors header must be a JSON object")
        data_len = size - 8 - n
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if not isinstance(info, dict) or info.get("dtype") not in SAFETENSORS_DTYPES:
                dt = info.get("dtype") if isinstance(info, dict) else info
                raise ValueError(
                    f"{ten_path}: tensor {name!r} has dtype {dt!r}; adapters hold only {sorted(SAFETENSORS_DTYPES)}"
                )
            shape, off = info.get("shape"), info.get("data_offsets")
            if not _is_int_list(shape) or not _is_int_list(off) or len(off) != 2 or off[0] > off[1]:
                raise ValueError(f"{ten_path}: tensor {name!r} has a malformed shape/data_offsets entry")
            numel = 1
            for dim in shape:
                numel *= dim
            if off[1] - off[0] != numel * SAFETENSORS_DTYPES[info["dtype"]] or off[1] > data_len:
                raise ValueError(
                    f"{ten_path}: tensor {name!r} data_offsets {off} do not fit its shape {shape} and the file's "
                    f"{data_len} data bytes (truncated or tampered)"
                )
        f.seek(0)
        data = f.read()
    if len(data) != size:
        raise ValueError(f"{ten_path} changed while being read")
    from safetensors.torch import load as load_bytes

    try:
        tensors = load_bytes(data)
    except Exception as e:  # the library's own SafetensorError and friends: a malformed file
        raise ValueError(f"{ten_path} is not a valid safetensors file ({type(e).__name__}: {str(e)[:200]})") from None
    return header, tensors


def _read(path):
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    cfg_path, ten_path = _adapter_files(path, "load_adapter", "gsops.save_adapter")
    meta, config = _read_config(cfg_path)
    header, tensors = _read_tensors(ten_path)
    listed = meta["tensors"]
    if set(listed) != set(tensors):
        missing = sorted(set(listed) - set(tensors))[:5]
        extra = sorted(set(tensors) - set(listed))[:5]
        raise ValueError(
            f"{path}: the tensor file does not match its config; listed but missing: {missing}, unlisted: {extra}"
        )
    for name, t in tensors.items():
        want = listed[name]
        if list(t.shape) != want["shape"] or TORCH_DTYPE_NAMES[header[name]["dtype"]] != want["dtype"]:
            raise ValueError(
                f"{path}: tensor {name} is {header[name]['dtype']} {list(t.shape)} in the tensor file but "
                f"{want['dtype']} {want['shape']} in its config"
            )
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{path}: tensor {name} contains NaN or inf; refusing to load it")
    return meta, config, tensors


def _check_against(model, meta, config, tensors, path) -> None:
    mine = _model_config(model)
    if mine.to_dict() != config.to_dict():
        diff = {k: (v, mine.to_dict().get(k)) for k, v in config.to_dict().items() if mine.to_dict().get(k) != v}
        raise ValueError(f"{path}: adapter config differs from the model's (field: (file, model)): {diff}")
    layers = _layer_info(model)
    if set(layers) != set(meta["layers"]):
        missing = sorted(set(meta["layers"]) - set(layers))[:5]
        extra = sorted(set(layers) - set(meta["layers"]))[:5]
        raise ValueError(f"{path}: wrapped layers differ; in the file only: {missing}, in the model only: {extra}")
    for name, info in layers.items():
        want = dict(meta["layers"][name])
        if "block_size" in info:
            want.setdefault("block_size", config.block_size)  # a file without per-layer sizes: the config's
        if info != want:
            raise ValueError(f"{path}: layer {name} is {want} in the file but {info} in the model")
    params = _saved_tensors(model)
    if set(params) != set(tensors):
        missing = sorted(set(params) - set(tensors))[:5]
        extra = sorted(set(tensors) - set(params))[:5]
        raise ValueError(f"{path}: tensors differ; missing from the file: {missing}, unexpected in the file: {extra}")
    for name, p in params.items():
        t = tensors[name]
        if tuple(t.shape) != tuple(p.shape):
            raise ValueError(f"{path}: tensor {name} has shape {tuple(t.shape)} in the file, {tuple(p.shape)} in the model")
        if t.is_floating_point() != p.is_floating_point() or (not p.is_floating_point() and t.dtype != p.dtype):
            raise ValueError(f"{path}: tensor {name} is {t.dtype} in the file, {p.dtype} in the model")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{path}: tensor {name} is not finite")
    merged = [n for n, m in adapter_layers(model) if m.merged]
    if merged:
        raise ValueError(f"{path}: cannot load into merged layers {merged[:3]}; call gsops.unmerge_(model) first")
    spec = registry.get(config.method)
    for name, m in adapter_layers(model):
        try:
            spec.check_file_tensors(name, m, tensors)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


def _exact_names(names) -> str:
    """One regular expression (``re.fullmatch``) matching exactly these qualified names."""
    return "|".join(re.escape(n) for n in sorted(names))


def _precheck_bare(model, meta, config, tensors, path):
    """Checks that need no adapter in the model, so a bad file is refused before apply_ runs.

    Returns the config to apply: the file's, targeting exactly the layers the
    file lists (the file's own regular expressions are never run).
    """
    from .model import _targets

    load_config = dataclasses.replace(config, target_modules=_exact_names(meta["layers"]), exclude_modules=None)
    targets, skipped = _targets(model, load_config)
    names = {t[0] for t in targets}
    if names != set(meta["layers"]):
        missing = sorted(set(meta["layers"]) - names)[:5]
        why = f" (skipped: {skipped[:3]})" if skipped else ""
        raise ValueError(f"{path}: wrapped layers differ; in the file but not an adaptable layer of the model: {missing}{why}")
    overrides = {}
    for name, _, _, layer, _ in targets:
        want = meta["layers"][name]
        if type(layer).__name__ != want["base"] or list(layer.weight.shape) != want["weight_shape"]:
            raise ValueError(
                f"{path}: layer {name} is {want['base']} {want['weight_shape']} in the file but "
                f"{type(layer).__name__} {list(layer.weight.shape)} in the model"
            )
        overrides[name] = registry.get(config.method).file_overrides(name, want, config, tensors)
    return load_config, targets, overrides


def load_adapter(model: torch.nn.Module, path) -> torch.nn.Module:
    """Load an adapter saved by :func:`save_adapter` into ``model``; returns ``model``.

    If ``model`` has no adapters yet, the file's config is applied first
    (``gsops.apply_``, on exactly the layers the file lists) and removed again
    if the file then does not fit. If it has adapters, their config must equal
    the file's. Any problem with the file or a mismatch raises ValueError
    (FileNotFoundError for a missing path) and leaves the model bit-for-bit as
    it was. Files are never unpickled (see the module docstring).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    meta, config, tensors = _read(path)
    applied_here = False
    saved_weights = []
    if not adapter_layers(model):
        load_config, targets, overrides = _precheck_bare(model, meta, config, tensors, path)
        if registry.get(config.method).stores_residual:  # e.g. sorsa / loldu rewrite the base weight: keep a copy
            saved_weights = [(layer.weight, layer.weight.detach().clone()) for _, _, _, layer, _ in targets]
        try:
            # validates every layer before changing any; each layer gets the file's own settings
            _apply(model, load_config, verbose=False, overrides=overrides)
        except ValueError as e:
            raise ValueError(f"{path}: the file's adapter config does not fit the model: {e}") from None
        for _, m in adapter_layers(model):
            m.gsops_config = config
        applied_here = True
    try:
        _check_against(model, meta, config, tensors, path)
    except ValueError:
        if applied_here:
            revert_(model)
            with torch.no_grad():
                for w, copy in saved_weights:
                    w.copy_(copy)
        raise
    for name, m in adapter_layers(model):
        if hasattr(m, "set_row_order") and f"{name}.perm" in tensors:
            m.set_row_order(tensors[f"{name}.perm"])  # LoLDU adapters already in the model: the file's row order
    with torch.no_grad():
        for name, p in _saved_tensors(model).items():
            p.copy_(tensors[name].to(device=p.device, dtype=p.dtype))
    return model


__all__ = ["save_adapter", "load_adapter"]
