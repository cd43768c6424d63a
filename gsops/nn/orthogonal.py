"""``OrthogonalAdapter``: a base layer times a learned structured orthogonal ``Q`` (SPEC "GSOFT").

Every orthogonal method multiplies the frozen weight ``W`` of a layer by a
learned orthogonal ``Q`` built from Cayley blocks (:mod:`gsops.nn.cayley_param`)
arranged by a rotation (:mod:`gsops.nn.rotations`). Which rotation a method
uses, and which block sizes fit which layer, is the method's registry entry
(:mod:`gsops.methods`); ``double_gsoft`` adds an output rotation,
``y = Q_out (W (Q_in x)) + c``.

Data flow (SPEC): for ``nn.Linear`` (and transformers' ``Conv1D``, whose weight is
stored transposed as ``in x out``) the input is rotated, ``y = s * (W (Q x)) + c``,
and the dense ``W Q`` is never built while training. For ``nn.Conv2d`` ``Q`` acts
on the flattened ``in_channels/groups * kh * kw`` dimension of the weight (OFT's rule),
and the rotation is applied on the weight side: ``W' = diag(s) W Q`` is built for
each forward (``out x d`` times the structured ``Q``, cost ``out * d * b``) and
the base layer's own convolution (stride, padding, dilation, padding mode) runs
with it. Merging writes the same ``W'`` into the base layer, computed in float64.
All parameters start at zero, so ``Q = I`` and the adapted layer equals the base
layer at initialisation; the scale ``s`` starts at 1.

One forward computes the blocks of every rotation once (one batched Cayley call
for the exact ones), checks parameters and Neumann errors on the device without
a host sync (:meth:`MergeableAdapter.check_parameters_finite`) and applies the
rotations with ``gsops.ops``. On the torch backend in eager mode (float32/float64,
no autocast) a Linear-like layer of ``gsoft``, ``oft`` or ``double_gsoft`` runs its
input rotation, the frozen GEMM and (without an output rotation) scale and bias as
one autograd node, :func:`gsops.ops.rotated_linear`, which keeps the rotation in
a feature-major layout where the shuffle costs no copy; for ``gsoft`` and ``oft``
with packed parameters the same node also computes the Cayley blocks from the
skew parameters and returns the layer's checks (parameter probes, the series'
orthogonality error) beside the output, so a layer's step is one autograd node
(:func:`gsops.ops.rotated_linear.adapted_linear_unchecked`). Its numbers are
those of the separate ops up to rounding.

Determinism: on CPU every method's forward and backward is bitwise
reproducible for a fixed seed. GPU kernels that reduce block gradients with
atomics (the CUDA backend's two-pass block-gradient kernel, the fallback where
no one-pass backward fits, and the grouped conv-exponential weight gradient use
``atomicAdd``) are not bitwise deterministic; the torch reference backend
(``GSOPS_BACKEND=torch``) is as deterministic as torch itself.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_finite_enabled, check_int
from ..ops.rotated_linear import adapted_fits, adapted_linear_unchecked
from ..ops.rotated_linear import fits as rotated_linear_fits, rotated_linear_unchecked
from .cayley_param import blocks_batched
from .layers import adapter_param_dtype, is_linear_like, layer_dims
from .mergeable import MergeableAdapter, method_registry


def _orthogonal_method(method):
    """The registry entry of an orthogonal method (ValueError naming the orthogonal methods otherwise)."""
    registry = method_registry()
    orthogonal = registry.names("orthogonal")
    if not isinstance(method, str) or method not in orthogonal:
        raise ValueError(f"method={method!r} must be one of {orthogonal}")
    return registry.get(method)


class OrthogonalAdapter(MergeableAdapter):
    """``nn.Linear`` / ``nn.Conv2d`` / transformers ``Conv1D`` wrapped with a learned orthogonal rotation.

    See the module docstring. ``adapter_dtype``: dtype of the rotation and scale
    parameters; None gives float32 on a float16/bfloat16 base (the optimizer
    then updates float32 numbers) and the base dtype otherwise. The output has
    the dtype the base layer alone would give (the autocast dtype under autocast).
    """

    def __init__(self, base: nn.Module, method: str = "gsoft", block_size: int = 32, n_factors: int = 2,
                 scale: bool = True, packed: bool = True, cayley: str = "exact", neumann_terms: int = 5,
                 name: str = "layer", adapter_dtype: torch.dtype | None = None):
        super().__init__()
        spec = _orthogonal_method(method)
        block_size = check_int("block_size", block_size)
        n_factors = check_int("n_factors", n_factors)
        spec.check_layer(name, base, block_size, n_factors, cayley)
        self.base_layer = base
        self.method = method
        self.d_in, self.d_out = layer_dims(base)
        W = base.weight
        pdt = adapter_param_dtype(W.dtype, adapter_dtype)
        kw = dict(packed=packed, cayley=cayley, neumann_terms=neumann_terms, dtype=pdt, device=W.device)
        self.rotation = spec.rotation(self.d_in, block_size, n_factors, **kw)
        self.rotation_out = spec.output_rotation(self.d_out, block_size, n_factors, **kw)
        self.scale = nn.Parameter(torch.ones(self.d_out, dtype=pdt, device=W.device)) if scale else None
        self.merged = False
        self.name = name
        self._guard_key()
        self.rotation.factors.label = f"{name}.rotation"
        if self.rotation_out is not None:
            self.rotation_out.factors.label = f"{name}.rotation_out"

    # y = s * Q_out(W (Q_in x)) + c
    def _training_blocks(self):
        """The blocks of every rotation for one forward, with the device-side checks (no host sync)."""
        rotations = self._rotations()
        computed = blocks_batched([r.factors for r in rotations])
        series = [(r.factors, err) for r, (_, err) in zip(rotations, computed) if err is not None]
        if self.check_parameters_finite(series=series):
            computed = blocks_batched([r.factors for r in rotations])
        blocks = [Q for Q, _ in computed]
        return blocks[0], (blocks[1] if len(blocks) > 1 else None)

    def _one_node(self, x, W):
        """The layer's output by :func:`gsops.ops.adapted_linear_unchecked` (the Cayley blocks, the rotation,
        the frozen GEMM, scale and bias in one autograd node) when it takes this call, else None: a Linear-like
        base, one input rotation of packed exact or Cayley-Neumann blocks, and :func:`adapted_fits`."""
        rot = self.rotation
        f = rot.factors
        params, bias, scale = f.params, self.base_layer.bias, self.scale
        if (self.rotation_out is not None or not rot.fused_linear or not f.packed or f.cayley not in ("exact", "neumann")
                or not adapted_fits(x, W, params, bias, scale)):
            return None
        names, probe = [], []
        if check_finite_enabled():  # adapter_named_parameters() of this layer, in its order, without the walk
            for n, p in (("scale", scale), ("rotation.factors.params", params)):
                if p is not None and p.numel():
                    names.append(n)
                    probe.append(p)
        terms = f.neumann_terms if f.series else None
        y, values = adapted_linear_unchecked(x, params, f.skew_index, f.skew_sign, f.b, terms, W, bias, scale, probe)
        if values.numel() and self.read_checks(values, names, [f] if terms else []):
            # the series has just switched to the exact Cayley transform: this call uses it already (its checks
            # were read with the series')
            y, _ = adapted_linear_unchecked(x, params, f.skew_index, f.skew_sign, f.b, None, W, bias, scale, probe)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        if self.merged:
            return self.base_layer(x)
        base = self.base_layer
        if type(base) is nn.Linear or is_linear_like(base):
            y = self._one_node(x, base.weight if type(base) is nn.Linear else self._flat_weight())
            if y is not None:
                return y
        B_in, B_out = self._training_blocks()
        base = self.base_layer
        if is_linear_like(base):
            # blocks are built in the parameters' dtype (float32 on a half-precision model), used in x's dtype
            B_in = B_in.to(x.dtype)
            W = self._flat_weight()
            factors = self.rotation.linear_factors(B_in)
            if factors is not None and rotated_linear_fits(x, W, factors):
                # rotation, frozen GEMM (and, without an output rotation, scale and bias) in one node
                if self.rotation_out is not None:
                    y = rotated_linear_unchecked(x, factors, W)
                else:
                    s = None if self.scale is None else self.scale.to(x.dtype)
                    c = None if base.bias is None else base.bias.to(x.dtype)
                    return rotated_linear_unchecked(x, factors, W, c, s)
            else:
                y = F.linear(self.rotation.rotate(x, B_in), W)
            if self.rotation_out is not None:
                y = self.rotation_out.rotate(y, B_out.to(y.dtype))
            if self.scale is not None:
                s = self.scale.to(y.dtype)
                if base.bias is not None:  # s * y + c in one pass
                    return torch.addcmul(base.bias.to(y.dtype), y, s)
                return y * s
            return y if base.bias is None else y + base.bias.to(y.dtype)
        return self._base_forward(x, self.adapted_weight(blocks=(B_in, B_out)).to(base.weight.dtype))

    def adapted_weight(self, dtype=None, blocks=None) -> torch.Tensor:
        """``diag(s) Q_out W Q_in`` with W flattened to (out, d_in); in ``dtype`` when given (e.g. float64).

        Without ``dtype`` it is computed in the wider of the base weight's and the parameters' dtypes.
        ``blocks=(B_in, B_out)``: the rotations' blocks already computed for this forward.
        """
        if dtype is None:
            dtype = torch.promote_types(self.base_layer.weight.dtype, self._param_dtype())
        W = self._flat_weight(dtype)
        if blocks is None:
            B_in = self.rotation.blocks(dtype)
            B_out = self.rotation_out.blocks(dtype) if self.rotation_out is not None else None
        else:
            B_in, B_out = (None if B is None else B.to(dtype) for B in blocks)
        M = self.rotation.rotate(W, B_in, transpose=True)  # rows of W Q = (Q^T w_i)^T
        if self.rotation_out is not None:
            M = self.rotation_out.rotate(M.transpose(0, 1), B_out).transpose(0, 1)  # Q_out M
        if self.scale is not None:
            s = self.scale if dtype is None else self.scale.to(dtype)
            M = M * s[:, None]
        return M

    def _merged_weight(self):
        return self.adapted_weight(torch.float64)

    def _check_unmergeable(self):
        if self.scale is None:
            return
        snapshot = getattr(self, "_merged_params", None) if self.merged else None
        scale = snapshot["scale"].to(self.scale) if snapshot else self.scale  # the scale that was merged
        if bool((scale == 0).any()):
            idx = torch.nonzero(scale == 0).flatten()[:5].tolist()
            raise ValueError(
                f"{self.name}: cannot unmerge: scale has zero entries (indices {idx}); diag(s) is not invertible"
            )

    def _unmerged_weight(self):
        f64 = torch.float64
        M = self._flat_weight(f64)
        if self.scale is not None:
            M = M / self.scale.to(f64)[:, None]
        if self.rotation_out is not None:
            Bo = self.rotation_out.blocks(f64)
            M = self.rotation_out.rotate(M.transpose(0, 1), Bo, transpose=True).transpose(0, 1)  # Q_out^T M
        if self.rotation.factors.cayley == "peft_neumann":  # PEFT's series is not orthogonal: undo W Q with Q^{-1}
            return self.rotation.rotate(M, torch.linalg.inv(self.rotation.blocks(f64)), transpose=True)
        return self.rotation.rotate(M, self.rotation.blocks(f64))  # rows of M Q^T = (Q m_i)^T

    def orthogonal_matrices(self, dtype=torch.float64) -> dict:
        """The dense learned ``Q`` matrices by name (``in`` and, for double_gsoft, ``out``)."""
        out = {"in": self.rotation.dense(dtype)}
        if self.rotation_out is not None:
            out["out"] = self.rotation_out.dense(dtype)
        return out

    def extra_repr(self) -> str:
        return f"method={self.method!r}, d_in={self.d_in}, d_out={self.d_out}, scale={self.scale is not None}"


__all__ = ["OrthogonalAdapter"]
