"""Adapter methods as registry entries: one module per method with its rules, parameters and construction.

``METHODS`` (:mod:`gsops.methods.registry`) maps each ``AdapterConfig(method=...)``
name to its :class:`MethodSpec`; :mod:`gsops.adapters` validates configs and
builds layers only through these entries.
"""
from .spec import MethodSpec
from .orthogonal import OrthogonalMethod
from .low_rank import LowRankMethod
from .registry import METHODS, get, names, register, unregister

__all__ = ["MethodSpec", "OrthogonalMethod", "LowRankMethod", "METHODS", "get", "names", "register", "unregister"]
