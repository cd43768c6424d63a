"""What every adapter layer shares: merge bookkeeping, the input and non-finite checks, base-layer forwarding.

A subclass of :class:`MergeableAdapter` says what its adapted weight is
(``_merged_weight`` and ``_unmerged_weight``, ``d_out x d_in`` in float64) and
computes its forward; merging, unmerging, reverting and the checks live here.

* Non-finite values. Every adapter layer scans its own parameters (not the
  frozen base weight) in each forward and raises ``ValueError`` naming the
  layer and the parameter when one holds NaN or inf, e.g. ``encoder.q: adapter
  parameter(s) ['rotation.factors.params'] contain NaN or inf``: a run whose
  optimizer produced a non-finite step stops instead of training on garbage.
  The scan never stalls the device (:mod:`gsops.nn.guard`): on CPU it refuses in
  the same call, before the output is returned; on CUDA the numbers travel to
  the host without a sync and the refusal comes at the latest at the layer's
  next call. The global opt-out is ``GSOPS_CHECK_FINITE=0`` (or
  ``gsops.set_check_finite(False)``).
  Inputs are not scanned (that costs a pass over every activation); the opt-in
  is ``GSOPS_CHECK_INPUTS=1`` (or ``gsops.set_check_inputs(True)``).
  ``merge()`` always scans, whatever the switches say, and also refuses to write
  a merged weight that is not finite in the base weight's dtype (e.g. fp16
  overflow): a merge never corrupts the base layer.
* Inputs are checked before computing: a tensor of a floating dtype equal to the
  weight's (any floating dtype under ``torch.autocast``), with ``in_features``
  last (Linear) or ``in_channels`` at dim -3 (Conv2d); else TypeError/ValueError
  naming the layer.
* Merging stores a copy of the adapter parameters (small); ``unmerge()`` undoes
  exactly what was merged, even if the parameters changed while merged (it
  warns). Merging a merged layer or unmerging an unmerged one warns and does
  nothing: never a double apply.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import guard
from ..checks import FLOAT_DTYPES, check_finite_enabled, check_inputs_enabled, has_values
from .layers import is_conv1d, is_linear_like, layer_dims

_registry = None  # the method registry (rules, rotations by name); installed by gsops.methods, the layer above


def use_method_registry(registry) -> None:
    """Install the method registry: where an adapter built from a method name finds that method's rules.

    ``registry`` has ``get(name) -> entry`` and ``names(family) -> tuple``;
    :mod:`gsops.methods.registry` installs itself when it is imported (``import gsops`` does).
    """
    global _registry
    _registry = registry


def method_registry():
    """The method registry :func:`use_method_registry` installed (:mod:`gsops.methods.registry`)."""
    if _registry is None:
        raise RuntimeError("gsops.methods is not imported; adapter layers read their method's rules there "
                           "(import gsops first)")
    return _registry


def _fused_paths_off(module, args):
    """A no-op forward pre-hook: its presence keeps torch's fused encoder fast path off (see MergeableAdapter)."""
    return None


class MergeableAdapter(nn.Module):
    """Shared merge/unmerge state and input/parameter checks of every adapter layer.

    Drop-in: attributes the adapter does not have are read from the base layer
    (``weight``, ``bias``, ``in_features``, ``out_features``, ``kernel_size``,
    ...), as PEFT's tuner layers do; ``weight`` is the frozen base weight, not
    the adapted one. Code that reads ``weight`` to compute instead of calling
    the layer is kept off: torch's ``nn.TransformerEncoderLayer`` fused
    inference path (eval + no_grad) multiplies by ``linear1.weight`` itself, and
    it is not taken while a module inside the layer has a forward hook, so every
    adapter registers a no-op forward pre-hook.
    """

    base_layer: nn.Module
    merged: bool
    name: str = "layer"
    #: True when the adapter stores a residual in the base weight (it is not the original weight while
    #: wrapped): saving/loading keeps an exact copy, and ``disable_adapters`` cannot give the base outputs.
    stores_residual: bool = False
    #: Names of buffers saved with the adapter besides its parameters (e.g. LoLDU's LU row order).
    saved_buffers: tuple = ()

    def __init__(self):
        super().__init__()
        self.register_forward_pre_hook(_fused_paths_off)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules")
            base = modules.get("base_layer") if modules is not None else None
            if base is None or name == "base_layer":
                raise
            return getattr(base, name)

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype the base layer alone would compute in: the autocast dtype when autocast is on, else x's."""
        dev = x.device.type
        if x.dtype != torch.float64 and torch.is_autocast_enabled(dev):
            return torch.get_autocast_dtype(dev)
        return x.dtype

    def _param_dtype(self) -> torch.dtype:
        named = self.adapter_named_parameters()
        return named[0][1].dtype if named else self.base_layer.weight.dtype

    # ---- checks shared by every adapter's forward
    def adapter_named_parameters(self) -> list:
        """``(name, parameter)`` of the adapter's own parameters (not the base layer's), in
        ``named_parameters`` order (walks the adapter's own modules only: this runs in every forward)."""
        out = [(n, p) for n, p in self._parameters.items() if p is not None]
        for cname, child in self._modules.items():
            if cname != "base_layer" and child is not None:
                out += [(f"{cname}.{n}", p) for n, p in child.named_parameters()]
        return out

    def nonfinite_parameters(self) -> list:
        """Names of adapter parameters holding NaN or inf (one device sync for all of them)."""
        named = [(n, p) for n, p in self.adapter_named_parameters() if p.numel()]
        if not named or not has_values(named[0][1]):
            return []
        with torch.no_grad():
            ok = torch.stack([torch.isfinite(p).all() for _, p in named]).tolist()
        return [n for (n, _), good in zip(named, ok) if not good]

    def check_parameters_finite(self, force: bool = False, series=()) -> bool:
        """Raise ValueError naming the layer when an adapter parameter is NaN/inf (see module docstring).

        ``force=True`` (merging) checks at once, whatever the switches say. Otherwise the values
        are read through the layer's :class:`~gsops.nn.guard.DeferredReadout` (no device sync),
        together with the orthogonality errors of ``series``, a list of ``(CayleyBlocks, err)``
        for factors computed by the Neumann series. Returns True when one of those factors has
        just switched to the exact Cayley transform (the caller recomputes its blocks).
        """
        if force:
            bad = self.nonfinite_parameters()
            if bad:
                self._raise_nonfinite(bad)
            return False
        named = [(n, p) for n, p in self.adapter_named_parameters() if p.numel()] if check_finite_enabled() else []
        series = list(series)
        probe = named[0][1] if named else (series[0][1] if series else None)
        if probe is None or probe.device.type == "meta":
            return False
        parts = ([guard.finite_probe([p for _, p in named])] if named else []) + [err for _, err in series]
        values = torch.cat([v.to(probe.device, torch.float64) for v in parts]) if len(parts) > 1 else parts[0]
        if torch.compiler.is_compiling():  # checked at run time inside the compiled graph, by the same judge
            mask = sum(1 << i for i, r in enumerate(self._rotations()) if any(f is r.factors for f, _ in series))
            guard.compiled_readout(values, self._guard_key(), len(named), mask)
            return False
        return self.read_checks(values, [n for n, _ in named], [f for f, _ in series])

    def read_checks(self, values: torch.Tensor, names: list, factors: list) -> bool:
        """Hand ``values`` (float64: one finite probe per parameter of ``names``, then the orthogonality error
        of each Cayley-Neumann factor of ``factors``) to the layer's deferred readout and judge what is ready
        (on CPU these values at once; on CUDA the previous call's): ValueError naming the non-finite
        parameters; True when a factor has just switched to the exact Cayley transform."""
        switched = False
        for vals, (names_, factors_) in self._guard_readout().submit(values, (names, factors)):
            switched = self._judge(vals, names_, factors_) or switched
        return switched

    def _judge(self, vals, names, factors) -> bool:
        bad = [n for n, v in zip(names, vals[: len(names)]) if not np.isfinite(v)]
        if bad:
            self._guard_readout().discard()
            self._raise_nonfinite(bad)
        switched = False
        for factor, err in zip(factors, vals[len(names):]):
            switched = factor.judge_series(float(err)) or switched
        return switched

    def _rotations(self) -> list:
        return [r for r in (getattr(self, "rotation", None), getattr(self, "rotation_out", None)) if r is not None]

    def _judge_compiled(self, values: torch.Tensor, n_params: int, series_mask: int) -> None:
        """Run time of a compiled forward: the same checks as eager (:meth:`check_parameters_finite`)."""
        names = [n for n, p in self.adapter_named_parameters() if p.numel()][:n_params]
        factors = [r.factors for i, r in enumerate(self._rotations()) if series_mask >> i & 1]
        for vals, (names_, factors_) in self._guard_readout().submit(values, (names, factors)):
            self._judge(vals, names_, factors_)

    def _guard_key(self) -> int:
        key = self.__dict__.get("_readout_key")
        if key is None:
            key = self.__dict__["_readout_key"] = guard.register(self)
        return key

    def _raise_nonfinite(self, bad):
        raise ValueError(
            f"{self.name}: adapter parameter(s) {bad} contain NaN or inf (a diverged optimizer step?); "
            "refusing to run on them. Lower the learning rate / clip gradients and reload a checkpoint. "
            "Set GSOPS_CHECK_FINITE=0 to skip this check"
        )

    def _guard_readout(self) -> guard.DeferredReadout:
        readout = self.__dict__.get("_readout")
        if readout is None:
            readout = self.__dict__["_readout"] = guard.DeferredReadout()
        return readout

    def __getstate__(self):
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state.pop("_readout", None)  # pending device readouts do not travel with copies or pickles
        state.pop("_readout_key", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._guard_key()  # a copy gets its own key

    def check_input(self, x) -> None:
        """x: a floating tensor of the weight's dtype (any float under autocast) and the layer's feature size."""
        base = self.base_layer
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{self.name}: input x must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"{self.name}: input x must have a floating dtype (float16, bfloat16, float32, float64), got {x.dtype}"
            )
        W = base.weight
        if x.dtype != W.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"{self.name}: input x has dtype {x.dtype} but the layer's weights are {W.dtype}; "
                "cast the input or run under torch.autocast"
            )
        if x.device != W.device:
            raise ValueError(f"{self.name}: input x is on {x.device} but the layer's weights are on {W.device}")
        if x.is_nested:
            raise ValueError(f"{self.name}: nested tensors are not supported as input; pass a padded tensor")
        if is_linear_like(base):
            d_in = layer_dims(base)[0]
            if x.dim() < 1 or x.shape[-1] != d_in:
                raise ValueError(
                    f"{self.name}: input x.shape[-1] must equal in_features={d_in}, got shape {tuple(x.shape)}"
                )
        else:
            if x.dim() not in (3, 4) or x.shape[-3] != base.in_channels:
                raise ValueError(
                    f"{self.name}: input x must be (N, C, H, W) or (C, H, W) with C = in_channels={base.in_channels}, "
                    f"got shape {tuple(x.shape)}"
                )
        if check_inputs_enabled() and x.numel() and has_values(x):
            if not bool(torch.isfinite(x).all()):
                raise ValueError(f"{self.name}: input x contains NaN or inf (GSOPS_CHECK_INPUTS=1 is on)")

    # ---- merging
    def _param_snapshot(self) -> dict:
        return {n: p.detach().clone() for n, p in self.adapter_named_parameters()}

    def merge(self) -> bool:
        """Write the adapted weight into the base layer. Warns and does nothing when already merged.

        Refuses (ValueError, layer unchanged) when an adapter parameter or the
        merged weight in the base weight's dtype is not finite.
        """
        if self.merged:
            warnings.warn(f"{self.name} ({type(self).__name__}): already merged; merge() did nothing (no double apply)")
            return False
        new = self.check_merge()
        with torch.no_grad():
            snapshot = self._param_snapshot()
            self.base_layer.weight.copy_(new)
        self._merged_params = snapshot
        self.merged = True
        return True

    def unmerge(self) -> bool:
        """Restore the frozen base weight. Warns and does nothing when not merged.

        Undoes exactly what :meth:`merge` wrote: if the adapter parameters
        changed while merged (e.g. an optimizer step), it warns and unmerges with
        the parameters that were merged, keeping the new values afterwards.
        """
        if not self.merged:
            warnings.warn(f"{self.name} ({type(self).__name__}): not merged; unmerge() did nothing")
            return False
        snapshot = getattr(self, "_merged_params", None)
        named = dict(self.adapter_named_parameters())
        changed = snapshot is not None and any(not torch.equal(named[n], t.to(named[n])) for n, t in snapshot.items())
        with torch.no_grad():
            current = self._param_snapshot() if changed else None
            if changed:
                warnings.warn(
                    f"{self.name}: adapter parameters changed while merged; unmerging with the parameters that "
                    "were merged (the new values are kept afterwards)"
                )
                for n, t in snapshot.items():
                    named[n].copy_(t)
            try:
                self._check_unmergeable()
                W = self.base_layer.weight
                new = self._to_base_layout(self._unmerged_weight()).to(W.dtype)
                if not bool(torch.isfinite(new).all()):
                    raise ValueError(f"{self.name}: the unmerged weight is not finite; unmerge refused, layer unchanged")
            finally:
                if changed:
                    for n, t in current.items():
                        named[n].copy_(t)
            W.copy_(new)
        self._merged_params = None
        self.merged = False
        return True

    def check_merge(self) -> torch.Tensor:
        """Every check :meth:`merge` makes, without changing anything; returns the weight merge would write.

        Raises ValueError naming the layer when the weight is shared (tied), an
        adapter parameter is not finite, or the merged weight is not finite in
        the base weight's dtype.
        """
        self._check_mergeable()
        self.check_parameters_finite(force=True)
        with torch.no_grad():
            W = self.base_layer.weight
            new = self._to_base_layout(self._merged_weight()).to(W.dtype)
            if not bool(torch.isfinite(new).all()):
                raise ValueError(f"{self.name}: the merged weight is not finite in {W.dtype}; merge refused, layer unchanged")
        return new

    def _check_mergeable(self):
        if self.__dict__.get("weight_is_shared", False):
            raise ValueError(
                f"{self.name}: the base weight is shared with another module (tied weights); "
                "merging would change that module too. Exclude this layer via target_modules, or untie the weights"
            )

    def _check_unmergeable(self):
        pass

    def _flat_weight(self, dtype=None) -> torch.Tensor:
        """The base weight as ``d_out x d_in`` (Conv2d flattened, Conv1D transposed), in ``dtype`` when given."""
        W = self.base_layer.weight
        W = W.transpose(0, 1) if is_conv1d(self.base_layer) else W.reshape(W.shape[0], -1)
        return W if dtype is None else W.to(dtype)

    def _to_base_layout(self, M: torch.Tensor) -> torch.Tensor:
        """A ``d_out x d_in`` matrix in the base weight's own layout (inverse of :meth:`_flat_weight`)."""
        W = self.base_layer.weight
        return M.transpose(0, 1) if is_conv1d(self.base_layer) else M.reshape(W.shape)

    def _base_forward(self, x, weight_flat, with_bias=True):
        base = self.base_layer
        bias = base.bias if with_bias else None
        if is_linear_like(base):
            return F.linear(x, weight_flat, bias)
        return base._conv_forward(x, weight_flat.reshape(base.weight.shape), bias)

    def revert(self) -> nn.Module:
        """The original base module, with its original weight (unmerging first when merged)."""
        if self.merged:
            self.unmerge()
        return self.base_layer


__all__ = ["MergeableAdapter", "method_registry", "use_method_registry"]
