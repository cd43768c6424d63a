"""``MethodSpec``: everything gsops knows about one adapter method, in one object.

A method's entry (one module per method in this package, listed in
:mod:`gsops.methods.registry`) holds

* its facts: ``name`` (the ``AdapterConfig(method=...)`` key), ``title`` (for
  tables), ``family`` and ``params`` (the :class:`~gsops.AdapterConfig` fields it
  reads, e.g. ``block_size`` or ``rank``);
* its rules, each written once with its message: :meth:`check_config` (what can be
  refused from the config alone, when an ``AdapterConfig`` is created) and
  :meth:`layer_settings` (what a given layer needs; the per-layer settings, e.g.
  the block size that fits);
* its construction: :meth:`build` (the adapter layer from a base layer, the config
  and those settings), :meth:`saved_settings` (what the adapter file records per
  layer) and :meth:`file_overrides` / :meth:`check_file_tensors` (how a saved
  layer is rebuilt and checked on load).

The model verbs (:mod:`gsops.adapters`) only ever talk to a method through this
interface, so a method registered with :func:`gsops.methods.registry.register`
works with ``apply_``, ``merge_``, ``save_adapter`` and ``load_adapter`` as is.
"""
from __future__ import annotations

from torch import nn


class MethodSpec:
    """One adapter method's facts, rules and construction (see the module docstring). Subclass per method."""

    name: str = ""
    title: str = ""
    family: str = ""
    params: tuple = ()
    #: the nn.Module class :meth:`build` returns (a :class:`gsops.nn.mergeable.MergeableAdapter`)
    adapter_type: type = nn.Module

    @property
    def stores_residual(self) -> bool:
        """True when the adapter rewrites the base weight while wrapped (loading keeps an exact copy)."""
        return bool(getattr(self.adapter_type, "stores_residual", False))

    # ---- rules
    def check_config(self, config) -> None:
        """Raise ValueError for settings of ``config`` this method refuses whatever the layer."""

    def layer_settings(self, name: str, layer: nn.Module, config, overrides: dict | None = None) -> dict:
        """Validate ``layer`` for ``config`` (errors name the layer); the settings :meth:`build` takes.

        ``overrides`` come from a saved adapter and are used exactly. May warn (e.g. an adjusted size).
        """
        return dict(overrides or {})

    # ---- construction
    def build(self, name: str, layer: nn.Module, config, settings: dict) -> nn.Module:
        raise NotImplementedError(f"method {self.name!r}: build is not defined")

    def saved_settings(self, adapter: nn.Module) -> dict:
        """The per-layer settings recorded in an adapter file (JSON-safe)."""
        return {}

    def file_overrides(self, name: str, layer_meta: dict, config, tensors: dict) -> dict:
        """The ``overrides`` of :meth:`layer_settings` that rebuild a saved layer from its file entry."""
        return {}

    def check_file_tensors(self, name: str, adapter: nn.Module, tensors: dict) -> None:
        """Raise ValueError when a file's tensors for ``adapter`` break a rule the shapes do not show."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, family={self.family!r}, params={self.params})"


__all__ = ["MethodSpec"]
