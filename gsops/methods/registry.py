"""``METHODS``: every adapter method gsops knows, by the name ``AdapterConfig(method=...)`` takes.

Each entry is a :class:`~gsops.methods.spec.MethodSpec` from its own module in
this package; adding a method is one module and one line here (or a call to
:func:`register` from outside gsops). The adapter layers (:mod:`gsops.nn`, the
layer below) read an entry through this module, which installs itself there
(:func:`gsops.nn.mergeable.use_method_registry`).
"""
from __future__ import annotations

import sys

from ..nn.mergeable import use_method_registry
from . import boft, double_gsoft, gsoft, loldu, oft, sorsa
from .spec import MethodSpec

METHODS: dict[str, MethodSpec] = {
    spec.name: spec for spec in (gsoft.SPEC, double_gsoft.SPEC, oft.SPEC, boft.SPEC, sorsa.SPEC, loldu.SPEC)
}


def names(family: str | None = None) -> tuple:
    """The registered method names (of one ``family``, e.g. ``"orthogonal"`` or ``"low_rank"``, when given)."""
    return tuple(n for n, s in METHODS.items() if family is None or s.family == family)


def get(method) -> MethodSpec:
    """The entry of ``method``; ValueError naming the choices when there is none."""
    spec = METHODS.get(method) if isinstance(method, str) else None
    if spec is None:
        raise ValueError(f"method={method!r} must be one of {names()}")
    return spec


def register(spec: MethodSpec) -> MethodSpec:
    """Add ``spec`` under ``spec.name`` (ValueError if the name is taken or not an identifier)."""
    if not isinstance(spec, MethodSpec):
        raise TypeError(f"spec must be a gsops.methods.MethodSpec, got {type(spec).__name__}")
    if not isinstance(spec.name, str) or not spec.name.isidentifier():
        raise ValueError(f"spec.name={spec.name!r} must be a Python identifier")
    if spec.name in METHODS:
        raise ValueError(f"method {spec.name!r} is already registered")
    METHODS[spec.name] = spec
    return spec


def unregister(name: str) -> MethodSpec:
    """Remove and return the entry ``name`` (ValueError when it is not registered)."""
    spec = get(name)
    del METHODS[name]
    return spec


use_method_registry(sys.modules[__name__])  # adapter layers built from a method name find its rules here

__all__ = ["METHODS", "names", "get", "register", "unregister"]
