"""``y = s * (W (Q x)) + c`` as one autograd node: the torch backend's path for an adapted ``nn.Linear``.

``Q`` is OFT's ``diag(B)`` (one factor) or GSOFT's ``P^T L P R`` (factors ``(R, L)``,
``P = perm(r, d)``, SPEC "GSOFT"); ``W`` is the frozen ``d_out x d`` weight, ``c`` the
bias and ``s`` the per-output scale (both optional).

Reading order: the reference (the composition of the op references with ``F.linear``),
the fused node, then the checked public function and the unchecked one the layers call.

Why one node. The block products are cheap in flops (``2 N d b`` each against the
GEMM's ``2 N d d_out``) but each is a pass over the activations, and the shuffle
``P`` is a layout change: between two BLAS calls in token-major layout (``x`` as
``N x d``) it costs a copy per permutation. The fused node keeps the rotation
*feature-major* (``Q x`` held as ``d x c`` for a chunk of ``c`` tokens): there every
factor is one ``bmm`` over the blocks whose operands are strided views (``P`` and
``P^T`` become strides, ``stride(p) = r c``, with unit stride along the tokens), and
the GEMM with ``W`` takes the transposed ``Q x`` as it is. In the backward the
gradient of ``Q x`` is computed feature-major by the same GEMM (``W^T dy^T``), so the
frozen layer's own backward is not run separately and no token-major transpose is
ever copied.

Chunks of tokens. Forward and backward run chunk by chunk of ``c`` tokens
(:func:`chunk_tokens`: about ``CHUNK_BYTES`` = 2 MiB of a ``d``-wide intermediate, at
least 128 tokens; at least 1024 when ``W`` is over 8 MiB, since every chunk's GEMM
reads all of ``W``): a chunk's rotation is still in the CPU's caches when its GEMM
reads it, and the backward's intermediates of a chunk (the gradient of ``Q x``,
``R x`` recomputed, ``L^T`` of it) never reach main memory. The block gradients are
summed over the chunks in float32/float64 as the products produce them. Per chunk,
forward: the block products (1 for OFT, 2 for GSOFT) and one row-block copy for
``P^T`` (GSOFT), then the GEMM; backward: the GEMM for the gradient of ``Q x``,
``R x`` recomputed (GSOFT), one ``bmm`` per factor for its block gradient, one
``bmm`` for ``dx`` (written token-major straight into ``dx`` when the layer is one
chunk, else through one copy of runs of ``b``), one row-block copy for ``P`` (GSOFT). Passes over main memory: those of the frozen layer, plus ``x``
read again by the block products and, with the scale, ``W (Q x)`` written and
read. Saved for the backward: ``x`` (a view, no copy) and, with the scale,
``W (Q x)`` (the gradient of ``s`` needs it; recomputing it would be a GEMM).

Rotating the weight. Where there are at least twice as many tokens as rows of ``W`` (``N >= 2 d_out``,
:func:`_merges`), the forward computes ``(W Q) x`` instead: ``Q^T`` is applied to the
``d_out`` rows of ``W`` (``W^T`` copied feature-major once, then the same strided block
products), which costs ``d_out / N`` of rotating the tokens, and the GEMM reads ``x`` as
the frozen layer's does (no second pass over ``x``). The backward is the same either way:
its block gradients need the gradient of ``Q x``, which only the GEMM with ``W`` gives.

Scratch memory. The two chunk-sized intermediates (``d c`` elements each, about 2 MiB)
and, when the weight is rotated, ``W^T`` and ``(W Q)^T`` (``d d_out`` each) live in two
buffers kept per thread and dtype between calls (up to 16 MiB each, larger ones are
allocated per call): a fresh buffer per
call would be paid for in page faults on the CPU, where glibc hands large freed
blocks back to the system. :func:`release_scratch` frees them. What the node returns
or saves is always a tensor of its own.
"""
from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from ..checks import check_blocks, check_features, check_same_device, check_tensor
from . import dispatch
from .cayley import cayley_exact_reference, cayley_neumann_reference, packed_blocks, packed_blocks_grad, skew_gathered
from .block_diag_mm import block_diag_mm_reference
from .gs_apply import gs_apply_reference

DTYPES = (torch.float32, torch.float64)

# ----------------------------------------------------------------------------- reference


def rotated_linear_reference(x: Tensor, factors, W: Tensor, bias: Tensor | None = None,
                             scale: Tensor | None = None) -> Tensor:
    """``s * (W (Q x)) + c``: ``Q = diag(B)`` for ``factors = (B,)``, ``P^T L P R`` for ``(R, L)``."""
    u = block_diag_mm_reference(x, factors[0]) if len(factors) == 1 else gs_apply_reference(x, factors[1], factors[0])
    y = F.linear(u, W)
    if scale is not None:
        y = y * scale
    return y if bias is None else y + bias


# ----------------------------------------------------------------------------- chunks and scratch

CHUNK_BYTES = 1 << 21  # one chunk's d-wide intermediate: small enough to stay in the CPU's caches
MIN_CHUNK = 128        # tokens: below this the GEMM on a chunk loses efficiency
W_CACHE_BYTES = 8 << 20  # a larger W is read from memory by every chunk's GEMM: then chunks are longer
LARGE_W_CHUNK = 1024     # tokens per chunk for such a W
SCRATCH_MAX_BYTES = 16 << 20  # larger intermediates are allocated per call rather than kept
SMALL_BYTES = 1 << 18  # activations below this in one chunk: no scratch (nothing to save in page faults)
MERGE_TOKENS_PER_ROW = 2  # the forward rotates W (d_out rows) instead of x when N >= this x d_out


def chunk_tokens(N: int, d: int, itemsize: int, w_bytes: int = 0) -> int:
    """Tokens per chunk of the fused node: ``CHUNK_BYTES`` of a ``d``-wide intermediate, at least
    ``MIN_CHUNK`` (``LARGE_W_CHUNK`` when the frozen weight has more than ``W_CACHE_BYTES``), at most
    ``N``; the chunks split ``N`` evenly (multiples of 8 where possible)."""
    c = max(MIN_CHUNK, CHUNK_BYTES // max(1, d * itemsize))
    if w_bytes > W_CACHE_BYTES:
        c = max(c, LARGE_W_CHUNK)
    if c >= N:
        return N
    n = -(-N // c)
    c = -(-N // n)
    return min(N, -(-c // 8) * 8)


class _Scratch(threading.local):
    """Per thread: flat buffers by (slot, dtype), grown to the largest request (see the module docstring)."""

    def __init__(self):
        self.buffers = {}

    def get(self, slot: int, numel: int, like: Tensor) -> Tensor:
        """A flat buffer of ``numel`` elements of ``like``'s dtype; slots never overlap. Its contents are
        overwritten by the next call that asks for the same slot."""
        if like.device.type != "cpu" or numel * like.element_size() > SCRATCH_MAX_BYTES:
            return like.new_empty(numel)
        key = (slot, like.dtype)
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < numel:
            self.buffers.pop(key, None)  # free the smaller one first
            with torch.inference_mode(False):  # usable in and out of inference mode
                buf = self.buffers[key] = torch.empty(numel, dtype=like.dtype)
        return buf if buf.numel() == numel else buf[:numel]


_scratch = _Scratch()


def release_scratch() -> None:
    """Free the calling thread's scratch buffers of the fused CPU node (they are made again when needed)."""
    _scratch.buffers.clear()


# ----------------------------------------------------------------------------- the fused node


def _as(buf: Tensor | None, *shape) -> Tensor | None:
    """``buf`` viewed as ``shape``, or None (the op allocates its output) when there is no buffer."""
    return None if buf is None else buf.view(*shape)


def _first_factor(xc: Tensor, B: Tensor, out: Tensor | None) -> Tensor:
    """Block i of ``B`` on block i of every token of ``xc`` (c, d), feature-major (into ``out``): (r, b, c)."""
    c = xc.shape[0]
    r, b, _ = B.shape
    return torch.bmm(B, xc.view(c, r, b).permute(1, 2, 0), out=_as(out, r, b, c))


def _rotate_chunk(xc: Tensor, factors, out: Tensor | None, spare: Tensor | None) -> Tensor:
    """``(Q x)^T`` of the chunk ``xc`` (c, d) as a contiguous ``d x c`` tensor (a view of ``out``); GSOFT's
    ``L`` output goes through ``spare`` (both ``d c`` elements, or None: allocated here)."""
    c, d = xc.shape
    B = factors[0]
    r, b, _ = B.shape
    zT = _first_factor(xc, B, out)
    if len(factors) == 1:
        return zT.view(d, c)
    # L's block q reads features p*r + q of R x (P), and its output entry p goes to feature p*r + q (P^T)
    wT = torch.bmm(factors[1], zT.view(b, r, c).transpose(0, 1), out=_as(spare, r, b, c))
    return zT.view(b, r, c).copy_(wT.transpose(0, 1)).view(d, c)  # in R x's buffer, read by then


def _chunks(N: int, d: int, W: Tensor, like: Tensor, buffers: bool = True):
    """``(start, stop)`` of each chunk, and two scratch buffers of one chunk's ``d c`` elements (None and
    None without ``buffers``, or for a small layer in one chunk: its ops allocate their outputs, as few ops
    and lookups as can be)."""
    c = chunk_tokens(N, d, like.element_size(), W.numel() * W.element_size())
    if not buffers or (c == N and N * d * like.element_size() < SMALL_BYTES):
        return [(s, min(N, s + c)) for s in range(0, N, c)], None, None
    return [(s, min(N, s + c)) for s in range(0, N, c)], _scratch.get(0, d * c, like), _scratch.get(1, d * c, like)


def _merges(N: int, W: Tensor) -> bool:
    """Whether the forward rotates the weight instead of the tokens: ``W Q`` costs ``d_out / N`` of ``Q x``."""
    return MERGE_TOKENS_PER_ROW * W.shape[0] <= N


def _merged_weight_t(W: Tensor, factors) -> Tensor:
    """``(W Q)^T = Q^T W^T`` (d, d_out), in a scratch buffer: ``Q^T`` applied to the rows of ``W``, held
    feature-major (``W^T`` copied once), so that ``P`` and ``P^T`` are strides of the block products as in
    :func:`_rotate_chunk`. ``Q^T = diag(B)^T``, or ``R^T P^T L^T P`` for GSOFT's ``(R, L)``."""
    d_out, d = W.shape
    B = factors[0]
    r, b, _ = B.shape
    wt = _scratch.get(0, d * d_out, W).view(d, d_out)
    wt.copy_(W.t())
    out = _scratch.get(1, d * d_out, W)
    if len(factors) == 2:  # L^T on P w (block q of P w is entries q of the runs of r), then P^T, in wt's buffer
        zq = torch.bmm(factors[1].transpose(1, 2), wt.view(b, r, d_out).transpose(0, 1), out=out.view(r, b, d_out))
        wt.view(b, r, d_out).copy_(zq.transpose(0, 1))
    return torch.bmm(B.transpose(1, 2), wt.view(r, b, d_out), out=out.view(r, b, d_out)).view(d, d_out)


def _rows(t: Tensor | None, s0: int, s1: int) -> Tensor | None:
    """Rows ``s0:s1`` of ``t`` (``t`` itself when they are all of it or None: one op fewer on small layers)."""
    return t if t is None or (s0 == 0 and s1 == t.shape[0]) else t[s0:s1]


class _RotatedLinear(torch.autograd.Function):
    """The fused node. A large intermediate takes over the buffer of one already read: a fresh
    activation-sized buffer costs page faults on the CPU (about 3 ms per 16 MiB here), and memory.
    The output is a tensor of its own (not a view), so in-place ops on it work as on ``F.linear``'s."""

    @staticmethod
    def forward(ctx, x, W, bias, scale, *factors):
        result, h = _fused_forward(x, W, bias, scale, factors, ctx.needs_input_grad[3])
        # the inputs themselves are saved (x2 is a view of x or a copy), so that a differentiable
        # backward can reach them
        ctx.save_for_backward(x, W, scale, h, *factors)
        ctx.lead = x.shape[:-1]
        return result

    @staticmethod
    def backward(ctx, grad):
        x, W, scale, h, *factors = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: a backward that is itself differentiable
            return _differentiable_backward(ctx, grad, x, W, scale, factors)
        x2 = x.reshape(-1, x.shape[-1])
        return _backward(ctx.needs_input_grad, ctx.lead, grad.reshape(x2.shape[0], W.shape[0]), x2, W, scale, h,
                         factors)


def _fused_forward(x, W, bias, scale, factors, keep_h):
    """``(s * (W (Q x)) + c, W (Q x) when keep_h and there is a scale, else None)`` of the fused node,
    chunk by chunk of tokens (each chunk's rotation stays in the caches until its GEMM reads it)."""
    d, d_out = x.shape[-1], W.shape[0]
    x2 = x.reshape(-1, d)
    N = x2.shape[0]
    result = x2.new_empty(*x.shape[:-1], d_out)
    out = result.view(N, d_out)
    h = None if scale is None else x2.new_empty(N, d_out)
    merged = _merges(N, W)
    if merged:  # y = (W Q) x: one GEMM on x as it is, as the frozen layer's
        WQt = _merged_weight_t(W, factors)
        if scale is None:
            torch.mm(x2, WQt, out=out) if bias is None else torch.addmm(bias, x2, WQt, out=out)
            return result, None
    chunks, buf, spare = _chunks(N, d, W, x2, buffers=not merged)
    Wt = WQt if merged else W.t()
    for s0, s1 in chunks:
        if merged:
            u = _rows(x2, s0, s1)
        else:  # Q x of the chunk, token-major (a transposed view of its feature-major rotation)
            n = (s1 - s0) * d
            u = _rotate_chunk(_rows(x2, s0, s1), factors, _rows(buf, 0, n), _rows(spare, 0, n)).t()
        oc = _rows(out, s0, s1)
        if scale is None:
            torch.mm(u, Wt, out=oc) if bias is None else torch.addmm(bias, u, Wt, out=oc)
        else:
            hc = torch.mm(u, Wt, out=_rows(h, s0, s1))
            torch.mul(hc, scale, out=oc) if bias is None else torch.addcmul(bias, hc, scale, out=oc)
    return result, (h if keep_h else None)


def _grads_through(ctx, grad, args, forward):
    """The gradients of ``args`` (x, W, bias slot, scale, then the rotation's tensors) wanted by ``ctx``, by
    autograd through ``forward(*args)`` (``s * (W (Q x))`` without the bias) with a graph (double backward)."""
    wanted = [i for i, t in enumerate(args) if t is not None and ctx.needs_input_grad[i]]
    grads = [None] * len(args)
    got = []
    if wanted:  # (the bias alone needs no graph)
        with torch.enable_grad():
            got = torch.autograd.grad(forward(*args), [args[i] for i in wanted], grad, create_graph=True,
                                      allow_unused=True)
    for i, dt in zip(wanted, got):
        grads[i] = torch.zeros_like(args[i]) if dt is None else dt
    if ctx.needs_input_grad[2]:
        grads[2] = grad.reshape(-1, grad.shape[-1]).sum(0)
    return grads


def _differentiable_backward(ctx, grad, x, W, scale, factors):
    """The gradients by autograd through the reference, from the saved inputs (double backward)."""
    return tuple(_grads_through(ctx, grad, [x, W, None, scale, *factors],
                                lambda x, W, _, scale, *fs: rotated_linear_reference(x, fs, W, None, scale)))


def _accumulate(acc: Tensor | None, a: Tensor, b: Tensor) -> Tensor:
    """``acc + a @ b`` (batched), in ``acc``'s buffer; ``a @ b`` when ``acc`` is None."""
    return torch.bmm(a, b) if acc is None else acc.baddbmm_(a, b)


def _backward(needs, lead, g, x2, W, scale, h, factors):
    """The fused backward (no graph), chunk by chunk of tokens; nothing it returns is differentiable.
    ``needs``: whether x, W, bias, scale and each factor want a gradient; ``lead``: x's leading shape."""
    need_x, need_W, need_bias, need_scale, *need_f = needs
    N, d = x2.shape
    dbias = g.sum(0) if need_bias else None
    dscale = None
    # the gradient of Q x is W^T (s g)^T per chunk: s folded into the weight when it is the smaller operand
    fold = scale is not None and W.shape[1] <= N
    Wst = (W * scale[:, None]).t() if fold else W.t()
    B = factors[0]
    r, b, _ = B.shape
    L = factors[1] if len(factors) == 2 else None
    grads = [None] * len(factors)
    dx = torch.empty_like(x2) if need_x else None
    dW = None
    chunks, buf, spare = _chunks(N, d, W, x2)
    for s0, s1 in chunks:
        c = s1 - s0
        xc, gc, bufc, sparec = _rows(x2, s0, s1), _rows(g, s0, s1), _rows(buf, 0, c * d), _rows(spare, 0, c * d)
        if need_scale:
            part = torch.linalg.vecdot(gc, _rows(h, s0, s1), dim=0)
            dscale = part if dscale is None else dscale.add_(part)
        gsc = gc if scale is None or (fold and not need_W) else gc * scale  # s g of the chunk, where needed
        if need_W:  # W's gradient: (s g)^T (Q x), with Q x of the chunk recomputed
            uc = _rotate_chunk(xc, factors, bufc, sparec)
            dW = torch.mm(gsc.t(), uc.t()) if dW is None else dW.addmm_(gsc.t(), uc.t())
        dyT = torch.mm(Wst, (gc if fold else gsc).t(), out=_as(bufc, d, c))  # the gradient of Q x, (d, c)
        if L is None:
            dzT = dyT.view(r, b, c)
        else:
            dwq = dyT.view(b, r, c).transpose(0, 1)  # (q, p, c): the gradient of L's output
            if need_f[1]:
                zT = _first_factor(xc, B, sparec)  # R x, recomputed
                grads[1] = _accumulate(grads[1], dwq, zT.view(b, r, c).transpose(0, 1).transpose(1, 2))
                sparec = zT.view(-1)  # read: L^T's output goes into it
            dzq = torch.bmm(L.transpose(1, 2), dwq, out=_as(sparec, r, b, c))  # (q, p, c): L^T
            dzT = dyT.view(b, r, c).copy_(dzq.transpose(0, 1)).view(r, b, c)  # P^T, in dyT's buffer
        if need_f[0]:
            grads[0] = _accumulate(grads[0], dzT, xc.view(c, r, b).transpose(0, 1))
        if need_x and len(chunks) == 1:  # token-major: bmm writes block i's (c, b) rows straight into dx
            torch.bmm(dzT.transpose(1, 2), B, out=dx.view(c, r, b).transpose(0, 1))
        elif need_x:  # block i's (c, b) rows, then one copy into the token-major dx (faster on large layers)
            dxr = torch.bmm(dzT.transpose(1, 2), B, out=_as(sparec, r, c, b))
            _rows(dx, s0, s1).view(c, r, b).copy_(dxr.transpose(0, 1))
    if need_x:
        dx = dx.view(*lead, d)
    return (dx, dW, dbias, dscale, *grads)


# ----------------------------------------------------------------------------- with the Cayley blocks


class _AdaptedLinear(torch.autograd.Function):
    """The fused node with the rotation's Cayley blocks computed in it from the packed skew parameters
    ``p`` (n, r, b(b-1)/2) (n = 1: OFT's ``B``; n = 2: GSOFT's ``R``, ``L``): one node for a whole
    adapted layer's step, as the separate Cayley node and :class:`_RotatedLinear` compute it. Its
    second output, not differentiable, is the float64 vector of the layer's checks: the float64 sum
    of each tensor of ``probe`` (finite exactly when the tensor is), then, for the Cayley-Neumann
    series (``terms`` not None), ``max |Q^T Q - I|``."""

    @staticmethod
    def forward(ctx, x, W, bias, scale, p, index, sign, b, terms, probe):
        Q, kept, err = packed_blocks(p, index, sign, b, terms)
        factors = tuple(Q.view(*p.shape[:-1], b, b).unbind(0))
        result, h = _fused_forward(x, W, bias, scale, factors, ctx.needs_input_grad[3])
        parts = [t.sum(dtype=torch.float64) for t in probe] + ([err] if err is not None else [])  # no graph here
        values = torch.stack(parts).double() if parts else x.new_zeros(0, dtype=torch.float64)  # promotes err
        ctx.save_for_backward(x, W, scale, h, p, index, sign, Q, *kept)
        ctx.lead, ctx.b, ctx.terms = x.shape[:-1], b, terms
        ctx.mark_non_differentiable(values)
        return result, values

    @staticmethod
    def backward(ctx, grad, _):
        x, W, scale, h, p, index, sign, Q, *kept = ctx.saved_tensors
        b, n = ctx.b, p.shape[0]
        need_x, need_W, need_bias, need_scale, need_p = ctx.needs_input_grad[:5]
        rest = (None,) * 5
        if torch.is_grad_enabled():  # create_graph: a backward that is itself differentiable
            return (*_adapted_differentiable_backward(ctx, grad, x, W, scale, p, index, sign), *rest)
        x2 = x.reshape(-1, x.shape[-1])
        factors = tuple(Q.view(n, -1, b, b).unbind(0))
        dx, dW, dbias, dscale, *dfs = _backward((need_x, need_W, need_bias, need_scale) + (need_p,) * n, ctx.lead,
                                                grad.reshape(x2.shape[0], W.shape[0]), x2, W, scale, h, factors)
        dp = None
        if need_p:
            dQ = torch.stack(dfs) if n > 1 else dfs[0]
            dp = packed_blocks_grad(kept, dQ, b, ctx.terms is not None).view(p.shape)
        return (dx, dW, dbias, dscale, dp, *rest)


def _adapted_differentiable_backward(ctx, grad, x, W, scale, p, index, sign):
    """The gradients of x, W, bias, scale and p by autograd through the reference (double backward)."""
    b, terms = ctx.b, ctx.terms

    def forward(x, W, _, scale, p):
        K = skew_gathered(p, b, index, sign)
        Q = cayley_exact_reference(K) if terms is None else cayley_neumann_reference(K, terms)
        return rotated_linear_reference(x, tuple(Q.unbind(0)), W, None, scale)

    return _grads_through(ctx, grad, [x, W, None, scale, p], forward)


def adapted_fits(x: Tensor, W: Tensor, p: Tensor, bias: Tensor | None = None, scale: Tensor | None = None) -> bool:
    """Whether :func:`adapted_linear_unchecked` takes this call: eager, the torch backend, float32/float64
    throughout (x, W, the packed parameters ``p``, bias and scale), no autocast."""
    if torch.compiler.is_compiling() or x.dtype not in DTYPES or W.dtype != x.dtype or p.dtype != x.dtype or (
            bias is not None and bias.dtype != x.dtype) or (scale is not None and scale.dtype != x.dtype):
        return False
    dev = x.device.type
    if not x.numel() or x.dim() < 1 or dev == "meta" or (type(x) is not torch.Tensor and is_fake(x)) or (
            torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev)):
        return False
    backend = dispatch.requested()
    return backend == "torch" or (backend == "auto" and dev != "cuda")


def adapted_linear_unchecked(x: Tensor, p: Tensor, index: Tensor, sign: Tensor, b: int, terms: int | None,
                             W: Tensor, bias: Tensor | None = None, scale: Tensor | None = None, probe=()):
    """``(s * (W (Q x)) + c, checks)`` with ``Q`` from the packed skew parameters ``p`` (n, r, b(b-1)/2)
    in the gather layout ``index``/``sign`` (n = 1: ``diag(B)``; n = 2: ``P^T L P R``), exact Cayley
    (``terms`` None) or the Cayley-Neumann series; ``checks`` as :class:`_AdaptedLinear` says. No argument
    checks (inputs valid by construction, :func:`adapted_fits` true)."""
    return _AdaptedLinear.apply(x, W, bias, scale, p, index, sign, b, terms, list(probe))


# ----------------------------------------------------------------------------- public


def fits(x: Tensor, W: Tensor, factors) -> bool:
    """Whether the fused node runs this call: eager, torch backend, float32/float64 throughout, no autocast."""
    if torch.compiler.is_compiling() or x.dtype not in DTYPES or W.dtype != x.dtype or is_fake(x):
        return False
    dev = x.device.type
    if not x.numel() or x.dim() < 1 or dev == "meta" or (
            torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev)):
        return False
    if any(B.dtype != x.dtype for B in factors):
        return False
    op = "block_diag_mm" if len(factors) == 1 else "gs_apply"
    return dispatch.for_call(op, x, *factors) == "torch"


def rotated_linear_unchecked(x: Tensor, factors, W: Tensor, bias: Tensor | None = None,
                             scale: Tensor | None = None) -> Tensor:
    """:func:`rotated_linear` without argument checks (inputs valid by construction, :func:`fits` true)."""
    return _RotatedLinear.apply(x, W, bias, scale, *factors)


def rotated_linear(x: Tensor, factors, W: Tensor, bias: Tensor | None = None, scale: Tensor | None = None) -> Tensor:
    """``s * (W (Q x)) + c`` with ``Q = diag(B)`` (``factors = (B,)``) or ``P^T L P R`` (``factors = (R, L)``).

    ``x`` (..., d) with ``d = r*b``; each factor (r, b, b); ``W`` (d_out, d); ``bias`` and
    ``scale`` (d_out,) or None. Float32 or float64, one dtype and device for all; gradients
    flow to every argument that requires them.
    """
    check_tensor("x", x)
    factors = tuple(factors)
    if len(factors) not in (1, 2):
        raise ValueError(f"factors must be (B,) or (R, L), got {len(factors)} tensors")
    names = ["B"] if len(factors) == 1 else ["R", "L"]
    check_blocks(names[0], factors[0])
    r, b = factors[0].shape[0], factors[0].shape[1]
    for name, B in zip(names[1:], factors[1:]):
        check_blocks(name, B, r=r, b=b)
    check_tensor("W", W)
    if W.dim() != 2:
        raise ValueError(f"W must be 2-D (d_out, d), got shape {tuple(W.shape)}")
    check_features("x", x, r * b, "r*b of the blocks")
    check_features("W", W, r * b, "r*b of the blocks")
    for name, v in (("bias", bias), ("scale", scale)):
        if v is not None and tuple(v.shape) != (W.shape[0],):
            raise ValueError(f"{name} must have shape ({W.shape[0]},) (d_out of W), got {tuple(v.shape)}")
    tensors = dict(x=x, W=W, **dict(zip(names, factors)))
    tensors.update({k: v for k, v in (("bias", bias), ("scale", scale)) if v is not None})
    check_same_device(**tensors)
    bad = {k: v.dtype for k, v in tensors.items() if v.dtype != x.dtype}
    if x.dtype not in DTYPES or bad:
        raise TypeError(f"rotated_linear takes float32 or float64 tensors of one dtype; x is {x.dtype}"
                        + (f", {bad}" if bad else ""))
    if not fits(x, W, factors):  # compiling, autocast, meta, or a kernel backend: the composed ops
        return rotated_linear_reference(x, factors, W, bias, scale)
    return _RotatedLinear.apply(x, W, bias, scale, *factors)
