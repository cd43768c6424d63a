"""Checks shared by the Triton GS kernel tests."""
import torch

import gsops
from gsops import reference as ref
from gsops.tolerances import tol


def assert_triton_gs_apply_matches_reference(x, L, R, g):
    """``gsops.gs_apply`` on the triton backend, its output and the gradients of ``x``, ``L``, ``R`` (all of
    one dtype) against the reference computed in float32 from the same inputs, at that dtype's tolerance
    (gradients relative to their largest entry)."""
    dtype = x.dtype
    leaves = [t.clone().requires_grad_() for t in (x, L, R)]
    with gsops.use_backend("triton"):
        y = gsops.gs_apply(*leaves)
    y.backward(g)
    assert y.dtype == dtype and all(t.grad.dtype == dtype for t in leaves)
    ref_leaves = [t.float().requires_grad_() for t in (x, L, R)]
    y_ref = ref.gs_apply(*ref_leaves)
    y_ref.backward(g.float())
    torch.testing.assert_close(y.float(), y_ref.detach(), **tol(dtype))
    for mine, theirs in zip(leaves, ref_leaves):
        scale = theirs.grad.abs().max()
        torch.testing.assert_close(mine.grad.float() / scale, theirs.grad / scale, **tol(dtype))
