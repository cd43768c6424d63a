"""Saving and loading adapters: safetensors for the tensors, JSON for the config (never pickle).

``save_adapter(model, path)`` writes the folder ``path`` with
``adapter_model.safetensors`` (every adapter parameter, by qualified name) and
``adapter_config.json`` (format tag, gsops version, the :class:`AdapterConfig`,
each wrapped layer's base type and weight shape, each tensor's shape).
``load_adapter(model, path)`` checks everything (config, layer names and
shapes, tensor names, shapes, finiteness) before copying a single number, and
raises ValueError without touching the model on any mismatch.
"""
from __future__ import annotations

import json
import math
import os

import torch

from .. import __version__
from .config import AdapterConfig
from .model import adapter_layers, adapter_parameters, apply_, revert_

FORMAT = "gsops-adapter"
FORMAT_VERSION = 1
CONFIG_FILE = "adapter_config.json"
TENSOR_FILE = "adapter_model.safetensors"


def _layer_info(model) -> dict:
    return {
        name: {"base": type(m.base_layer).__name__, "weight_shape": list(m.base_layer.weight.shape),
               "adapter": type(m).__name__}
        for name, m in adapter_layers(model)
    }


def _model_config(model) -> AdapterConfig:
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("model has no gsops adapters (call gsops.apply_ first)")
    return layers[0][1].gsops_config


def save_adapter(model: torch.nn.Module, path) -> str:
    """Write the adapter of ``model`` to the folder ``path`` (created if needed); returns the folder.

    The saved numbers are those of the adapter parameters; a merged model is
    saved the same way (the adapter parameters do not change when merging).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    config = _model_config(model)
    from safetensors.torch import save_file

    tensors = {name: p.detach().to("cpu").contiguous() for name, p in adapter_parameters(model)}
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "gsops_version": __version__,
        "config": config.to_dict(), "layers": _layer_info(model),
        "tensors": {k: {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")} for k, t in tensors.items()},
    }
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, TENSOR_FILE), metadata={"format": FORMAT})
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
    return os.fspath(path)


def _read(path):
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    cfg_path, ten_path = os.path.join(path, CONFIG_FILE), os.path.join(path, TENSOR_FILE)
    for p in (cfg_path, ten_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p} does not exist (expected a folder written by gsops.save_adapter)")
    with open(cfg_path) as f:
        try:
            meta = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path} is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{cfg_path} is not a gsops adapter config (format={meta.get('format') if isinstance(meta, dict) else None!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{cfg_path}: format_version={meta.get('format_version')!r}, this gsops reads {FORMAT_VERSION}")
    from safetensors.torch import load_file

    tensors = load_file(ten_path, device="cpu")
    return meta, AdapterConfig.from_dict(meta["config"]), tensors


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
        if info != meta["layers"][name]:
            raise ValueError(f"{path}: layer {name} is {meta['layers'][name]} in the file but {info} in the model")
    params = dict(adapter_parameters(model))
    if set(params) != set(tensors):
        missing = sorted(set(params) - set(tensors))[:5]
        extra = sorted(set(tensors) - set(params))[:5]
        raise ValueError(f"{path}: tensors differ; missing from the file: {missing}, unexpected in the file: {extra}")
    for name, p in params.items():
        t = tensors[name]
        if tuple(t.shape) != tuple(p.shape):
            raise ValueError(f"{path}: tensor {name} has shape {tuple(t.shape)} in the file, {tuple(p.shape)} in the model")
        if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
            raise ValueError(f"{path}: tensor {name} is not a finite floating-point tensor")
    merged = [n for n, m in adapter_layers(model) if m.merged]
    if merged:
        raise ValueError(f"{path}: cannot load into merged layers {merged[:3]}; call gsops.unmerge_(model) first")


def _precheck_bare(model, meta, config, tensors, path) -> None:
    """Checks that need no adapter in the model, so a bad file is refused before apply_ runs."""
    from .model import _targets

    targets, _ = _targets(model, config)
    names = {t[0] for t in targets}
    if names != set(meta["layers"]):
        missing = sorted(set(meta["layers"]) - names)[:5]
        extra = sorted(names - set(meta["layers"]))[:5]
        raise ValueError(f"{path}: wrapped layers differ; in the file only: {missing}, matched in the model only: {extra}")
    for name, _, _, layer in targets:
        want = meta["layers"][name]
        if type(layer).__name__ != want["base"] or list(layer.weight.shape) != want["weight_shape"]:
            raise ValueError(
                f"{path}: layer {name} is {want['base']} {want['weight_shape']} in the file but "
                f"{type(layer).__name__} {list(layer.weight.shape)} in the model"
            )
    for name, t in tensors.items():
        want = meta["tensors"].get(name)
        if want is None or list(t.shape) != want["shape"]:
            raise ValueError(f"{path}: tensor {name} does not match the file's own config ({want})")


def load_adapter(model: torch.nn.Module, path) -> torch.nn.Module:
    """Load an adapter saved by :func:`save_adapter` into ``model``; returns ``model``.

    If ``model`` has no adapters yet, the file's config is applied first
    (``gsops.apply_``) and removed again if the file then does not fit. If it
    has adapters, their config must equal the file's. Any mismatch raises
    ValueError and leaves the model as it was.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    meta, config, tensors = _read(path)
    applied_here = False
    if not adapter_layers(model):
        _precheck_bare(model, meta, config, tensors, path)
        apply_(model, config, verbose=False)  # validates every layer before changing any
        applied_here = True
    try:
        _check_against(model, meta, config, tensors, path)
    except ValueError:
        if applied_here:
            revert_(model)
        raise
    with torch.no_grad():
        for name, p in adapter_parameters(model):
            p.copy_(tensors[name].to(device=p.device, dtype=p.dtype))
    return model


__all__ = ["save_adapter", "load_adapter"]
