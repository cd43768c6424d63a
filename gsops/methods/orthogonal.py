"""The rules and construction every orthogonal method shares (GSOFT, Double GSOFT, OFT, BOFT).

An orthogonal method wraps a layer in :class:`gsops.nn.orthogonal.OrthogonalAdapter`
with the method's rotation (:mod:`gsops.nn.rotations`) of Cayley blocks of size
``block_size``. Its rules come in two kinds, each written once here or in the
method's own module:

* :meth:`OrthogonalMethod.fixed_problem`: what no block size changes (the factor
  count, the Cayley transform, the layer's kind);
* :meth:`OrthogonalMethod.block_problem`: whether a block size fits (``b >= 2``,
  ``b`` divides the dimension ``Q`` acts on, and the method's own conditions).

Both take ``base=None`` for the checks a config allows without a layer; they
return the message (``None`` when fine), and the callers raise it, prefixed with
the layer's name when there is one. A layer the config's ``block_size`` does
not fit gets the nearest size that does (ties: the smaller; PEFT OFT's rule),
with a warning, unless ``strict``.
"""
from __future__ import annotations

import warnings

from torch import nn

from ..nn.cayley_param import cayley_problem
from ..nn.layers import check_base_layer, in_dim_name, layer_dims
from ..nn.orthogonal import OrthogonalAdapter
from .spec import MethodSpec

ORTHOGONAL_PARAMS = ("block_size", "n_factors", "scale", "packed", "cayley", "neumann_terms")


class OrthogonalMethod(MethodSpec):
    """A method of :class:`~gsops.nn.orthogonal.OrthogonalAdapter`; a subclass names its rotation."""

    family = "orthogonal"
    params = ORTHOGONAL_PARAMS
    adapter_type = OrthogonalAdapter
    #: the Cayley transforms (``AdapterConfig.cayley``) this method takes
    cayley_methods: tuple = ("exact", "neumann")

    # ---- what the rotations are
    def rotation(self, d: int, block_size: int, n_factors: int, **cayley_kw):
        """The input rotation ``Q_in`` (``d x d``) of an adapter."""
        raise NotImplementedError

    def output_rotation(self, d_out: int, block_size: int, n_factors: int, **cayley_kw):
        """The output rotation ``Q_out`` (``d_out x d_out``), or None (the default: inputs only)."""
        return None

    def factor_count(self, n_factors: int) -> int:
        """How many factors of Cayley blocks each rotation has for ``AdapterConfig.n_factors``."""
        return n_factors

    # ---- rules
    def fixed_problem(self, base: nn.Module | None, n_factors: int, cayley: str) -> str | None:
        """What no block size changes, as a message (None: fine). ``base=None``: the config's part only."""
        why = cayley_problem(cayley)
        if why:
            return why
        if cayley not in self.cayley_methods:
            from .registry import METHODS

            takers = [n for n, s in METHODS.items() if cayley in getattr(s, "cayley_methods", ())]
            return f"cayley={cayley!r} needs method={' or '.join(map(repr, takers))}, got method={self.name!r}"
        return None

    def block_problem(self, base: nn.Module | None, block_size: int, n_factors: int) -> str | None:
        """Why ``block_size`` does not fit (None when it does). ``base=None``: the config's part only."""
        if block_size < 2:
            return (f"block_size={block_size} gives 1x1 Cayley blocks, which are always 1: "
                    "Q = I has no trainable parameter (use block_size >= 2)")
        if base is not None:
            d_in = layer_dims(base)[0]
            if d_in % block_size:
                return f"block_size={block_size} must divide {in_dim_name(base)}={d_in}"
        return None

    def problem(self, base, block_size: int, n_factors: int, cayley: str = "exact") -> str | None:
        return self.fixed_problem(base, n_factors, cayley) or self.block_problem(base, block_size, n_factors)

    def check_config(self, config) -> None:
        why = self.problem(None, config.block_size, config.n_factors, config.cayley)
        if why:
            raise ValueError(why)

    def check_layer(self, name: str, base: nn.Module, block_size: int, n_factors: int, cayley: str = "exact") -> None:
        """Raise, naming the layer and the numbers, when this method cannot wrap ``base`` with these settings."""
        check_base_layer(base, name)
        why = self.problem(base, block_size, n_factors, cayley)
        if why:
            raise ValueError(f"{name}: {why}")

    def fit_block_size(self, name: str, base: nn.Module, block_size: int, n_factors: int,
                       cayley: str = "exact") -> int:
        """The block size nearest to ``block_size`` that fits ``base`` (ties: the smaller).

        Returns ``block_size`` itself when it fits; raises ValueError naming the layer
        when the layer is refused whatever the size, or when no size >= 2 fits.
        """
        check_base_layer(base, name)
        fixed = self.fixed_problem(base, n_factors, cayley)
        if fixed:
            raise ValueError(f"{name}: {fixed}")
        why = self.block_problem(base, block_size, n_factors)
        if why is None:
            return block_size
        d_in = layer_dims(base)[0]
        fits = [b for b in range(2, d_in + 1) if self.block_problem(base, b, n_factors) is None]
        if not fits:
            raise ValueError(
                f"{name}: no block size fits this layer for method={self.name!r} (n_factors={n_factors}): "
                f"{why}, and no size in [2, {d_in}] divides it"
            )
        return min(fits, key=lambda b: (abs(b - block_size), b))

    def layer_settings(self, name, layer, config, overrides=None) -> dict:
        """``{"block_size": b}``: the config's when it fits, else the nearest that does (a warning), unless
        ``config.strict`` (then ValueError); a saved layer's own size (``overrides``) is used exactly."""
        settings = dict(overrides or {})
        if "block_size" in settings or config.strict:
            b = settings.get("block_size", config.block_size)
            self.check_layer(name, layer, b, config.n_factors, config.cayley)
        else:
            b = self.fit_block_size(name, layer, config.block_size, config.n_factors, config.cayley)
            if b != config.block_size:
                warnings.warn(
                    f"{name}: block_size={config.block_size} does not fit this layer; using block_size={b} "
                    "(the nearest that does). Pass strict=True to refuse instead"
                )
        settings["block_size"] = b
        return settings

    # ---- construction
    def build(self, name, layer, config, settings) -> OrthogonalAdapter:
        return OrthogonalAdapter(
            layer, method=self.name, block_size=settings["block_size"], n_factors=config.n_factors,
            scale=config.scale, packed=config.packed, cayley=config.cayley, neumann_terms=config.neumann_terms,
            name=name, adapter_dtype=config.adapter_torch_dtype,
        )

    def saved_settings(self, adapter) -> dict:
        return {"block_size": adapter.rotation.b}

    def file_overrides(self, name, layer_meta, config, tensors) -> dict:
        return {"block_size": layer_meta.get("block_size", config.block_size)}


__all__ = ["OrthogonalMethod", "ORTHOGONAL_PARAMS"]
