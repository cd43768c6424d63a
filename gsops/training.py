"""Checkpoint / resume for adapter fine-tuning: ``save_checkpoint`` and ``load_checkpoint``.

A checkpoint is a folder holding

* the adapter, written by :func:`gsops.save_adapter` (safetensors + JSON config);
* ``trainable_extra.safetensors``: trainable parameters that are not adapter
  parameters (e.g. a classifier head left unfrozen), by qualified name;
* ``optimizer.pt``: ``optimizer.state_dict()`` (and the scheduler's, if given),
  written with ``torch.save`` and read back with ``torch.load(weights_only=True)``
  (tensors, numbers and strings only: no pickled code is executed on load);
* ``rng.pt``: the CPU (and CUDA, if initialised) random-number-generator states,
  so that data order and dropout continue exactly as in an uninterrupted run;
* ``checkpoint.json``: the step and any JSON-safe ``extra`` the caller passes.

The folder is written under a temporary name and renamed into place, so an
interruption while saving leaves the previous checkpoint intact.

Hugging Face ``Trainer``: ``gsops.training.AdapterCheckpointCallback`` (in
:mod:`gsops.hf_trainer`) keeps Trainer's own checkpoints but with only the
adapter and ``modules_to_save`` in them.

Distributed runs: under DDP, save ``model.module`` (the unwrapped model, so that
names carry no ``module.`` prefix) from rank 0 only, and load on every rank before
wrapping. FSDP2-sharded parameters (DTensors) are not handled here (untested); use
``torch.distributed.checkpoint`` for those.
"""
from __future__ import annotations

import json
import os
import shutil

import torch

from .adapters.io import load_adapter, save_adapter
from .adapters.model import adapter_parameters

FORMAT = "gsops-checkpoint"
FORMAT_VERSION = 1
META_FILE = "checkpoint.json"
EXTRA_FILE = "trainable_extra.safetensors"
OPTIM_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"


def _check_path(path):
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    return os.fspath(path)


def _extra_trainable(model) -> dict:
    adapter_ids = {id(p) for _, p in adapter_parameters(model)}
    return {n: p for n, p in model.named_parameters() if p.requires_grad and id(p) not in adapter_ids}


def save_checkpoint(model: torch.nn.Module, optimizer: torch.optim.Optimizer, path, *, step: int,
                    scheduler=None, extra: dict | None = None) -> str:
    """Write adapter, other trainable parameters, optimizer (and scheduler) state, RNG states and ``step`` to ``path``.

    ``path`` is replaced atomically (written as ``path + ".tmp"`` then renamed). Returns ``path``.
    """
    path = _check_path(path)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step={step!r} must be an int >= 0")
    if extra is not None and not isinstance(extra, dict):
        raise TypeError(f"extra must be a JSON-safe dict or None, got {type(extra).__name__}")
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "step": step, "extra": extra or {}}
    try:
        meta_text = json.dumps(meta, indent=1, sort_keys=True)
    except TypeError as e:
        raise TypeError(f"extra must be JSON-serialisable ({e})") from None

    from safetensors.torch import save_file

    tmp = path.rstrip("/\\") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_adapter(model, tmp)
    save_file({n: p.detach().to("cpu").contiguous() for n, p in _extra_trainable(model).items()},
              os.path.join(tmp, EXTRA_FILE), metadata={"format": FORMAT})
    state = {"optimizer": optimizer.state_dict()}
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    torch.save(state, os.path.join(tmp, OPTIM_FILE))
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, os.path.join(tmp, RNG_FILE))
    with open(os.path.join(tmp, META_FILE), "w") as f:
        f.write(meta_text)
    # swap in: the old checkpoint is removed only once the new one is complete
    old = path.rstrip("/\\") + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def load_checkpoint(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, path, *,
                    scheduler=None, restore_rng: bool = True) -> dict:
    """Restore what :func:`save_checkpoint` wrote into ``model`` (and ``optimizer``/``scheduler``).

    ``model`` may be bare (the adapter config in the checkpoint is applied, as
    :func:`gsops.load_adapter` does, and the saved non-adapter trainable
    parameters are made trainable again) or already adapted with the same config.
    ``optimizer`` / ``scheduler`` None: their saved state is not read.
    Build ``optimizer`` over ``gsops.trainable_parameters(model)`` in the same
    order as when saving. Returns ``{"step": int, "extra": dict}``.
    """
    path = _check_path(path)
    meta_path = os.path.join(path, META_FILE)
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{meta_path} does not exist (expected a folder written by gsops.save_checkpoint)")
    with open(meta_path) as f:
        try:
            meta = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{meta_path} is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{meta_path} is not a gsops checkpoint of format_version {FORMAT_VERSION}")
    from safetensors.torch import load_file

    extra_tensors = load_file(os.path.join(path, EXTRA_FILE), device="cpu")
    state = torch.load(os.path.join(path, OPTIM_FILE), weights_only=True)
    if scheduler is not None and "scheduler" not in state:
        raise ValueError(f"{path}: a scheduler was given but the checkpoint has no scheduler state")
    load_adapter(model, path)  # checks config, layers, shapes; applies the config to a bare model
    named = dict(model.named_parameters())
    missing = sorted(n for n in extra_tensors if n not in named)
    if missing:
        raise ValueError(f"{path}: trainable parameters {missing[:5]} of the checkpoint are not in the model")
    unsaved = sorted(set(_extra_trainable(model)) - set(extra_tensors))
    if unsaved:
        raise ValueError(
            f"{path}: the model trains non-adapter parameters {unsaved[:5]} that the checkpoint does not hold"
        )
    for n, t in extra_tensors.items():
        if tuple(named[n].shape) != tuple(t.shape):
            raise ValueError(f"{path}: {n} has shape {tuple(t.shape)} in the file, {tuple(named[n].shape)} in the model")
    with torch.no_grad():
        for n, t in extra_tensors.items():
            named[n].copy_(t.to(device=named[n].device, dtype=named[n].dtype))
            named[n].requires_grad_(True)  # trainable when saved (a bare model's apply_ froze it)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        rng = torch.load(os.path.join(path, RNG_FILE), weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    return {"step": int(meta["step"]), "extra": meta.get("extra", {})}


def __getattr__(name):
    # the Hugging Face Trainer callback needs transformers, imported only when asked for
    if name == "AdapterCheckpointCallback":
        from .hf_trainer import AdapterCheckpointCallback

        return AdapterCheckpointCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["save_checkpoint", "load_checkpoint", "AdapterCheckpointCallback"]
