"""Everyday verbs around an adapted model: ``merge_and_unload``, ``disable_adapters``, ``print_trainable_parameters``.

* :func:`merge_and_unload` writes every adapter into its base layer and puts the
  original module types back: the model's ``state_dict()`` keys are exactly the
  base model's, so Hugging Face ``save_pretrained`` / ``from_pretrained`` (or any
  plain ``torch`` code) sees an ordinary model. The ``modules_to_save`` modules
  keep their trained values.
* ``with disable_adapters(model):`` runs the base model: every adapter layer is
  replaced by its (unmodified) base layer and the ``modules_to_save`` modules
  hold their values from before :func:`gsops.apply_`; the outputs are exactly
  the base model's. Leaving the block, normally or by an exception, puts the
  adapters and the trained values back. Merged layers are refused (their base
  weight holds ``W Q``; getting ``W`` back is a float64 round trip, not exact):
  call :func:`gsops.unmerge_` first. PEFT instead unmerges silently and leaves
  the layer unmerged after the block. SORSA / LoLDU layers are refused too: their
  base weight holds a residual, not the base model's weight. Meant for
  evaluation (e.g. a reference model in DPO-style training, an A/B check).
* :func:`print_trainable_parameters` prints PEFT's line
  ``trainable params: T || all params: A || trainable%: P`` (rank 0 only) and
  returns ``(T, A)``. ``A`` counts the model's parameters once; PEFT's total
  also counts the extra copy it keeps of each ``modules_to_save`` module.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .. import logs
from . import saved_modules
from .model import ADAPTER_TYPES, _check_model, adapter_layers


def _adapter_slots(model):
    """``(parent, child_name, adapter)`` for every place an adapter is registered (a shared one appears each time)."""
    slots = []
    for _, parent in model.named_modules():
        for child_name, child in list(parent._modules.items()):
            if isinstance(child, ADAPTER_TYPES):
                slots.append((parent, child_name, child))
    return slots


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every adapter into its base layer and put the original modules back; returns ``model``.

    Every layer is checked first (tied weights, non-finite adapter parameters);
    if a merge still fails (e.g. the merged weight overflows float16), the base
    weights merged so far are restored from a copy and the model is unchanged.
    Already merged layers are unloaded as they are. Parameters get back the
    ``requires_grad`` they had before :func:`gsops.apply_`.
    """
    _check_model(model)
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("model has no gsops adapters to merge and unload")
    todo = {id(m): (n, m) for n, m in layers if not m.merged}
    for n, m in todo.values():
        try:
            m._check_mergeable()
        except ValueError as e:
            raise ValueError(f"{n}: {e}") from None
        m.check_parameters_finite(force=True)
    copies = [(m, m.base_layer.weight.detach().clone()) for _, m in todo.values()]
    merged = []
    try:
        for _, m in todo.values():
            m.merge()
            merged.append(m)
    except Exception:
        with torch.no_grad():
            for m, w in copies:
                if m in merged:
                    m.base_layer.weight.copy_(w)
                    m.merged, m._merged_params = False, None
        raise
    for parent, child_name, adapter in _adapter_slots(model):
        setattr(parent, child_name, adapter.base_layer)
    for p, flag in getattr(model, "_gsops_requires_grad", []):
        p.requires_grad_(flag)
    saved_modules.forget(model)  # the trained values stay
    for attr in ("_gsops_skipped", "_gsops_requires_grad"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """``with disable_adapters(model): ...`` runs the base model exactly (see the module docstring)."""
    _check_model(model)
    if getattr(model, "_gsops_adapters_disabled", False):
        raise ValueError("the adapters of this model are already disabled (nested gsops.disable_adapters)")
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("model has no gsops adapters to disable")
    merged = [n for n, m in layers if m.merged]
    if merged:
        raise ValueError(
            f"disable_adapters: layers {merged[:3]} are merged; their base weight holds the adapted weight and "
            "the base model's exact outputs are not available. Call gsops.unmerge_(model) first"
        )
    residual = [(n, m) for n, m in layers if m.stores_residual]
    if residual:
        raise ValueError(
            f"disable_adapters: layers {[n for n, _ in residual[:3]]} are {type(residual[0][1]).__name__} layers, "
            "whose base weight holds a residual (W minus the initial low-rank term), not the base model's weight; only the "
            "orthogonal methods can be disabled exactly"
        )
    slots = _adapter_slots(model)
    snap = getattr(model, saved_modules.SNAPSHOT_ATTR, None) or {}
    current = saved_modules.state(model, saved_modules.selected_names(model))
    trained = {k: current[k].detach().clone() for k in snap}
    with torch.no_grad():
        for k, t in snap.items():
            current[k].copy_(t)
    for parent, child_name, adapter in slots:
        setattr(parent, child_name, adapter.base_layer)
    model._gsops_adapters_disabled = True
    try:
        yield model
    finally:
        for parent, child_name, adapter in slots:
            setattr(parent, child_name, adapter)
        with torch.no_grad():
            for k, t in trained.items():
                current[k].copy_(t)
        del model._gsops_adapters_disabled


def trainable_counts(model: nn.Module) -> tuple[int, int]:
    """``(trainable parameters, all parameters)`` of ``model`` (each shared parameter counted once)."""
    _check_model(model)
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def print_trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """Print ``trainable params: T || all params: A || trainable%: P`` (PEFT's wording; rank 0 only); returns ``(T, A)``."""
    trainable, total = trainable_counts(model)
    if logs.is_rank0():
        pct = 100 * trainable / total if total else 0.0
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct:.4f}")
    return trainable, total


__all__ = ["merge_and_unload", "disable_adapters", "print_trainable_parameters", "trainable_counts"]
