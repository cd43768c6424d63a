"""``modules_to_save``: modules trained in full beside the adapters (PEFT's rule for selecting them).

A module ``name`` is selected by an entry ``e`` when ``name == e`` or
``name.endswith("." + e)``; a selected module inside another selected module is
part of the outer one. Every entry must select at least one module. The
modules' parameters must not be shared with modules outside them (tied
weights): training them would change those modules too.

State: :func:`select` returns the selected names; :func:`snapshot` keeps a copy
of their floating-point ``state_dict`` entries (parameters and buffers) so that
:func:`gsops.revert_` can put the original values back; :func:`state` is what
:func:`gsops.save_adapter` writes (the same keys as the model's ``state_dict``).
"""
from __future__ import annotations

import torch
from torch import nn

SNAPSHOT_ATTR = "_gsops_modules_to_save"
NAMES_ATTR = "_gsops_modules_to_save_names"


def matches(name: str, entries) -> bool:
    return any(name == e or name.endswith("." + e) for e in entries)


def select(model: nn.Module, entries) -> list:
    """Qualified names of the outermost modules of ``model`` selected by ``entries`` (ValueError when one selects none)."""
    if not entries:
        return []
    names = [n for n, _ in model.named_modules() if n and matches(n, entries)]
    unused = [e for e in entries if not any(n == e or n.endswith("." + e) for n in names)]
    if unused:
        raise ValueError(f"modules_to_save: {unused} select no module of the model (rule: the module's name equals "
                         "the entry or ends with '.' + entry)")
    outer = [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]
    modules = dict(model.named_modules())
    inside = {id(p) for n in outer for p in modules[n].parameters()}
    for other_name, m in model.named_modules(remove_duplicate=False):
        if any(other_name == o or other_name.startswith(o + ".") for o in outer):
            continue
        shared = [pn for pn, p in m.named_parameters(recurse=False) if id(p) in inside]
        if shared:
            raise ValueError(
                f"modules_to_save: a parameter of the selected modules is shared with {other_name}.{shared[0]} "
                "(tied weights); training it would change that module too. Untie the weights or select another module"
            )
    return outer


def covers(name: str, selected) -> bool:
    """True when module ``name`` is one of ``selected`` or inside one."""
    return any(name == s or name.startswith(s + ".") for s in selected)


def state(model: nn.Module, selected) -> dict:
    """``{state_dict key: tensor}`` of the floating-point parameters and buffers of the selected modules."""
    modules = dict(model.named_modules())
    out = {}
    for n in selected:
        for k, t in modules[n].state_dict(keep_vars=True).items():
            if t is not None and t.is_floating_point():
                out[f"{n}.{k}"] = t
    return out


def snapshot(model: nn.Module, selected) -> None:
    """Keep the selected names and a copy of their state on ``model`` (for :func:`restore`)."""
    setattr(model, NAMES_ATTR, list(selected))
    setattr(model, SNAPSHOT_ATTR, {k: t.detach().clone() for k, t in state(model, selected).items()})


def selected_names(model: nn.Module) -> list:
    """The modules_to_save names :func:`gsops.apply_` selected in ``model`` (empty when none)."""
    return list(getattr(model, NAMES_ATTR, None) or [])


def restore(model: nn.Module) -> None:
    """Copy the values kept by :func:`snapshot` back (no-op when nothing was selected)."""
    snap = getattr(model, SNAPSHOT_ATTR, None)
    if not snap:
        return
    current = dict(model.state_dict(keep_vars=True))
    with torch.no_grad():
        for k, t in snap.items():
            current[k].copy_(t)


def forget(model: nn.Module) -> None:
    for attr in (SNAPSHOT_ATTR, NAMES_ATTR):
        if hasattr(model, attr):
            delattr(model, attr)
