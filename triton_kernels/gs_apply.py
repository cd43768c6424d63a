"""Fused block-diagonal x permutation kernels for GS matrices (SPEC "GS matrices").

The block steps below are the building block of the fallback paths.  One *step* computes ``y = P_out · diag(B_1..B_r) · P_in · x`` on the last
dimension of ``x`` (``d = r*b``), where each of ``P_in`` / ``P_out`` is the
identity or the GS permutation ``P = perm(r, d)``.  The permutations are never
materialised: they are index arithmetic in the loads and stores.  With block
``p`` and in-block index ``q`` (0 <= p < r, 0 <= q < b) the feature touched is

* ``LINEAR``:  ``p*b + q``  (no permutation), and
* ``STRIDED``: ``q*r + p``  -- loading block p from ``x[q*r + p]`` reads
  block p of ``P x`` (``(P x)[p*b+q] = x[q*r+p]``); storing block p of ``z`` to
  ``y[q*r + p]`` writes ``y = P^T z``.

So ``gs_chain`` is one LINEAR->LINEAR step followed by STRIDED->LINEAR steps,
and GSOFT's ``Q x = P^T L P R x`` is LINEAR->LINEAR (R) then STRIDED->STRIDED
(L).  The transpose of a step (its input gradient) is the same index
arithmetic with the load and store layouts swapped and the blocks transposed;
block gradients ``dB_p = sum_n dy'_{n,p} x'_{n,p}^T`` are per-block reductions
over tokens.  The backward kernel does both from one load of ``dy`` and ``x``
per token tile (programs = block groups x token splits; partial sums per split
are added by torch, deterministically).  The backward recomputes the
intermediate ``R x`` instead of saving it (activation memory).

Which kernel runs a shape is decided before launch, from the shape alone
(:func:`pair_path`, :func:`pair_backward_path`, :func:`chain_path`):

* ``gs_apply`` / a two-factor ``gs_chain``: :func:`gs_onepass` (one super group of the
  b R-blocks that feed b L-blocks, or a whole row, on chip; b <= 32 and rows up to
  1024 features), else :func:`gs_chunked` (a band super group of b = 64, 4096
  features: the L-blocks produced UC at a time from an on-chip x), else :func:`gs_row`
  (whole rows, each factor's blocks streamed in pieces: b = 64 with r < b, b = 128).
  Forward: x read once, y written once.  Backward: :func:`gs_onepass_backward` (x and dy
  read once, dx written once; tiles above ``ONEPASS_FUSED_BWD_TILE`` read dy twice) or
  :func:`gs_row_backward` (once per group of factors whose block-gradient accumulators
  fit on chip).
* ``gs_chain`` with m = 3..``MAX_CHAIN`` factors: :func:`gs_row` over whole rows (the
  support of three factors is the whole row as soon as r > b) where a row fits
  (<= 1024 padded features for half data); else the first two factors as above and one
  block step per further factor.
* The two-launch path (:func:`_forward` / :func:`_backward`: two block steps, the
  intermediate ``R x`` makes one round trip through memory; forward 2x the minimal
  activation bytes, backward 8/3x) is the slower fallback, used only where no one-pass
  plan fits: forward for b > 128 or rows above the limits, backward for band super
  groups of b = 64 (their block gradients, 2 b^3 floats per super group, do not fit on
  chip).

Tiling: a program owns ``G`` consecutive blocks (a tile of ``TILE = G*BB``
features, ``BB = next_pow2(b)``) and a run of token tiles of ``BLOCK_N``
tokens.  ``tl.dot`` needs tiles >= 16 on a GPU, so for ``b < 16`` several blocks
are packed into one 16-wide tile: the program loads a ``TILE x TILE`` weight
whose off-diagonal blocks are masked to zero, i.e. the block-diagonal of its
``G`` blocks, and does one dense ``[BLOCK_N, TILE] x [TILE, TILE]`` dot.  Any
``b`` (not only powers of two) is handled by masking ``q >= b``; any number of
tokens by masking ``n >= N``.  Where a block's run of ``b`` elements is not whole
32-byte sectors and both sides are unpermuted (``block_diag_mm``, the first step of a
chain), the blocks are packed instead (``BB = b``, :func:`_tiling`): ``G`` consecutive
blocks whose ``G b`` elements are whole sectors share a power-of-two tile (b = 24 in
half precision: two blocks, 96 bytes, in a 64-wide tile), so each token's run of the
tile is whole sectors.  Accumulation is float32; half inputs are fed to
``tl.dot`` in their own dtype on a GPU and as float32 under the interpreter
(whose bf16 dot is not exact).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from gsops.flags import env_flag

LINEAR = 0
STRIDED = 1

_HALF = (torch.float16, torch.bfloat16)
_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32, torch.float64: tl.float64}


def _interpreting() -> bool:
    return env_flag("TRITON_INTERPRET", False)


@triton.jit
def _feature_index(p, q, r, b, LAYOUT: tl.constexpr):
    if LAYOUT == 0:
        return p * b + q
    else:
        return q * r + p


@triton.jit
def _group_features(pid_g, r, b, BB: tl.constexpr, G: tl.constexpr, TILE: tl.constexpr):
    """Tile position ``c`` of block group ``pid_g``, its block ``p``, in-block index ``q`` and the valid mask
    (block ``p`` of the group sits at tile positions ``[k BB, k BB + b)``, ``k = p - G pid_g``)."""
    c = tl.arange(0, TILE)
    p = pid_g * G + c // BB
    q = c % BB
    valid = (q < b) & (p < r) & (c < G * BB)
    return c, p, q, valid


@triton.jit
def _block_diag_index(pid_g, c, valid, BB: tl.constexpr, G: tl.constexpr):
    """Row/column tile positions of the group's ``TILE x TILE`` block-diagonal, its mask and each row's block."""
    ci = c[:, None]
    co = c[None, :]
    same = (ci // BB == co // BB) & valid[:, None] & valid[None, :]
    pb = (pid_g * G + ci // BB).to(tl.int64)
    return ci, co, same, pb


@triton.jit
def _load_block_diag(w_ptr, pid_g, c, valid, b, BB: tl.constexpr, G: tl.constexpr, TRANS: tl.constexpr):
    """The group's blocks as one block-diagonal ``W`` (off-diagonal blocks 0) with ``y = x @ W``.

    ``W[c_in, c_out] = B[p, c_in, c_out]`` (``B^T x`` per block) when ``TRANS``, else ``B[p, c_out, c_in]`` (``B x``).
    """
    ci, co, same, pb = _block_diag_index(pid_g, c, valid, BB, G)
    if TRANS:
        w_off = pb * b * b + (ci % BB) * b + (co % BB)
    else:
        w_off = pb * b * b + (co % BB) * b + (ci % BB)
    return tl.load(w_ptr + w_off, mask=same, other=0.0)


@triton.jit
def _token_tile(tile, rows, N, valid):
    """Token rows ``n`` (int64) of token tile ``tile`` (``rows = arange(BLOCK_N)``) and the in-range mask."""
    n = tile * rows.shape[0] + rows
    mask = (n < N)[:, None] & valid[None, :]
    return n.to(tl.int64), mask


@triton.jit
def _dot(a, b, IEEE: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """``a @ b``: full-precision ('ieee') with ``OUT_DTYPE`` accumulation when ``IEEE``, else Triton's default."""
    if IEEE:
        out = tl.dot(a, b, input_precision="ieee", out_dtype=OUT_DTYPE)
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def _block_step_kernel(
    x_ptr, w_ptr, y_ptr,
    N, r, b,
    stride_xn, stride_xd, stride_yn, stride_yd,
    n_groups,
    TILES_PER_PROG: tl.constexpr, LOAD: tl.constexpr, STORE: tl.constexpr, TRANS: tl.constexpr,
    BB: tl.constexpr, G: tl.constexpr, TILE: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_g = pid % n_groups  # block groups vary fastest: neighbouring programs share cache lines
    pid_n = pid // n_groups

    c, p, q, valid = _group_features(pid_g, r, b, BB, G, TILE)
    feat = _feature_index(p, q, r, b, LOAD).to(tl.int64)
    feat_out = _feature_index(p, q, r, b, STORE).to(tl.int64)

    # Block-diagonal weight of this group: W[c_in, c_out] so that y = x @ W.
    w = _load_block_diag(w_ptr, pid_g, c, valid, b, BB, G, TRANS).to(DOT_DTYPE)

    rows = tl.arange(0, BLOCK_N)
    for t in range(0, TILES_PER_PROG):
        n64, mask = _token_tile(pid_n * TILES_PER_PROG + t, rows, N, valid)
        xt = tl.load(x_ptr + n64[:, None] * stride_xn + feat[None, :] * stride_xd, mask=mask, other=0.0)
        acc = _dot(xt.to(DOT_DTYPE), w, IEEE, ACC_DTYPE)
        tl.store(y_ptr + n64[:, None] * stride_yn + feat_out[None, :] * stride_yd,
                 acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _block_grad_kernel(
    g_ptr, x_ptr, out_ptr, w_ptr, dx_ptr,
    N, r, b,
    stride_gn, stride_gd, stride_xn, stride_xd, stride_dxn, stride_dxd,
    n_groups,
    TILES_PER_SPLIT: tl.constexpr, G_LAYOUT: tl.constexpr, X_LAYOUT: tl.constexpr,
    BB: tl.constexpr, G: tl.constexpr, TILE: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr, WITH_DX: tl.constexpr,
):
    """out[split, p, i, q] = sum over this split's tokens of g'[n, p, i] * x'[n, p, q].

    With ``WITH_DX`` it also writes the step's input gradient ``dx' = B_p^T g'``
    (stored in ``X_LAYOUT``) from the same loads of ``g``: one pass over the
    activations gives both gradients.
    """
    pid = tl.program_id(0)
    pid_g = pid % n_groups
    split = pid // n_groups

    c, p, q, valid = _group_features(pid_g, r, b, BB, G, TILE)
    feat_g = _feature_index(p, q, r, b, G_LAYOUT).to(tl.int64)
    feat_x = _feature_index(p, q, r, b, X_LAYOUT).to(tl.int64)

    acc = tl.zeros((TILE, TILE), dtype=out_ptr.dtype.element_ty)  # float32 (float64 for float64 data)
    if WITH_DX:  # W[e, c] = B[p, e, c]: dx' = g' @ W is B^T g' per block
        w = _load_block_diag(w_ptr, pid_g, c, valid, b, BB, G, True).to(DOT_DTYPE)
    rows = tl.arange(0, BLOCK_N)
    for t in range(0, TILES_PER_SPLIT):
        n64, mask = _token_tile(split * TILES_PER_SPLIT + t, rows, N, valid)
        gt = tl.load(g_ptr + n64[:, None] * stride_gn + feat_g[None, :] * stride_gd, mask=mask, other=0.0)
        xt = tl.load(x_ptr + n64[:, None] * stride_xn + feat_x[None, :] * stride_xd, mask=mask, other=0.0)
        acc += _dot(tl.trans(gt.to(DOT_DTYPE)), xt.to(DOT_DTYPE), IEEE, out_ptr.dtype.element_ty)
        if WITH_DX:
            dxt = _dot(gt.to(DOT_DTYPE), w, IEEE, out_ptr.dtype.element_ty)
            tl.store(dx_ptr + n64[:, None] * stride_dxn + feat_x[None, :] * stride_dxd,
                     dxt.to(dx_ptr.dtype.element_ty), mask=mask)

    ci, cq, same, pb = _block_diag_index(pid_g, c, valid, BB, G)  # ci: i (output index of the block), cq: q (input)
    off = split.to(tl.int64) * r * b * b + pb * b * b + (ci % BB) * b + (cq % BB)
    tl.store(out_ptr + off, acc.to(out_ptr.dtype.element_ty), mask=same)


# ----------------------------------------------------------------------------- launchers

SECTOR_BYTES = 32   # a GPU's DRAM sector: the unit of a global load or store
PACKED_MAX_TILE = 128  # features of a packed tile (below: the tile is a TILE x TILE block-diagonal weight)


def _tiling(b: int, esize: int = 2, linear: bool = False) -> tuple[int, int, int]:
    """(BB, G, TILE): blocks per program ``G``, the pitch ``BB`` of a block in the program's tile, and the
    tile's width ``TILE`` (a power of two >= 16, >= G*BB).

    Padded: ``BB = next_pow2(b)`` (block k at tile positions ``k BB .. k BB + b``). Packed (only where both
    sides are LINEAR, i.e. a group of blocks is one run of ``G b`` consecutive features, and a padded block's
    run of ``b`` elements would straddle 32-byte sectors): ``BB = b`` and ``G`` blocks whose ``G b`` elements
    of ``esize`` bytes are whole sectors, so every row of a tile is whole sectors (b = 24 in half precision:
    two blocks, 96 bytes, in a 64-wide tile).
    """
    bb = triton.next_power_of_2(b)
    if linear and b != bb and (b * esize) % SECTOR_BYTES:
        g = SECTOR_BYTES // math.gcd(b * esize, SECTOR_BYTES)
        while g * b < 16:
            g *= 2
        tile = triton.next_power_of_2(g * b)
        if tile <= max(PACKED_MAX_TILE, bb):
            return b, g, tile
    g = max(1, 16 // bb)
    return bb, g, g * bb


def _block_n(tile: int, n_tokens: int) -> int:
    if _interpreting():  # few, fat programs: the interpreter pays per program
        return max(16, min(128, triton.next_power_of_2(max(n_tokens, 1))))
    return 64 if tile <= 64 else 32


def _n_sm(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def _loop_count(n_tiles: int, n_groups: int, want_programs: int) -> int:
    """Token tiles per program, a power of two (a constexpr: the loop bound is compile-time, which also
    avoids the Triton 3.6 interpreter's failure on runtime loop bounds under numpy >= 2.4).

    Enough programs to fill the GPU; the remaining tiles are looped in-program so each
    program loads its weights once. Under the interpreter: one program per block group.
    """
    if _interpreting():
        return triton.next_power_of_2(n_tiles)
    per = max(1, (n_groups * n_tiles) // max(want_programs, 1))
    return min(triton.next_power_of_2(n_tiles), 1 << (per.bit_length() - 1), 64)


class _GroupGrid(NamedTuple):
    bb: int                 # pitch BB of a block in the tile (see _tiling)
    g: int                  # blocks per program G
    tile: int               # TILE >= G * BB features per program
    n_groups: int           # block groups (programs along the features)
    block_n: int            # tokens per token tile
    tiles_per_program: int  # token tiles looped inside one program
    token_programs: int     # programs along the tokens (token splits of the backward)


def _group_grid(r: int, b: int, n_tok: int, want_programs: int, esize: int = 2, linear: bool = False) -> _GroupGrid:
    """Launch plan of a (block groups x token tiles) kernel over ``r`` blocks of size ``b`` and ``n_tok`` tokens
    (``esize``, ``linear``: see :func:`_tiling`)."""
    bb, g, tile = _tiling(b, esize, linear)
    n_groups = triton.cdiv(r, g)
    block_n = _block_n(tile, n_tok)
    n_tiles = triton.cdiv(n_tok, block_n)
    per = _loop_count(n_tiles, n_groups, want_programs)
    return _GroupGrid(bb, g, tile, n_groups, block_n, per, triton.cdiv(n_tiles, per))


def _dot_config(dtype: torch.dtype, w_dtype: torch.dtype):
    """(DOT_DTYPE, IEEE): float32 'ieee' dots for float32/64 data and under the interpreter."""
    if dtype == torch.float64 or w_dtype == torch.float64:
        return tl.float64, True
    if dtype in _HALF and not _interpreting():
        return _TL_DTYPE[dtype], False
    return tl.float32, True


def _as_2d(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _tokens_and_output(x: torch.Tensor, d: int):
    """``x``'s leading shape, ``x`` as (tokens, features) and an empty (tokens, d) output of its dtype and device."""
    x2 = _as_2d(x)
    return x.shape[:-1], x2, torch.empty((x2.shape[0], d), dtype=x.dtype, device=x.device)


def _per_token(x: torch.Tensor, d: int, launch) -> torch.Tensor:
    """A (tokens..., d) output of ``x``'s dtype, filled by ``launch(x2, y2, n_tok)`` on ``x`` as (tokens, features)
    (not called when there are no tokens)."""
    lead, x2, y2 = _tokens_and_output(x, d)
    if x2.shape[0]:
        launch(x2, y2, x2.shape[0])
    return y2.reshape(*lead, d)


def _num_warps(tile: int) -> int:
    # sm_90 compile (ptxas): with 4 warps a 64-wide tile needs 230-255 registers per thread and the
    # backward spills; 8 warps halve that
    return 8 if tile >= 64 else 4


def block_step(x: torch.Tensor, B: torch.Tensor, load: int, store: int, transpose: bool = False) -> torch.Tensor:
    """``P_store^T · diag(B or B^T) · P_load x`` on the last dim (see the module docstring).

    ``x`` may be non-contiguous (strides are passed to the kernel); the result
    has ``x``'s shape and dtype.
    """
    r, b, _ = B.shape
    d = r * b
    lead, x2, y2 = _tokens_and_output(x, d)
    n_tok = x2.shape[0]
    if n_tok == 0:
        return y2.reshape(*lead, d)
    Bc = B.contiguous()
    grid = _group_grid(r, b, n_tok, 8 * _n_sm(x.device), x.element_size(), load == store == LINEAR)
    dot_dtype, ieee = _dot_config(x.dtype, B.dtype)
    _block_step_kernel[(grid.n_groups * grid.token_programs,)](
        x2, Bc, y2, n_tok, r, b,
        x2.stride(0), x2.stride(1), y2.stride(0), y2.stride(1),
        grid.n_groups,
        TILES_PER_PROG=grid.tiles_per_program, LOAD=load, STORE=store, TRANS=bool(transpose),
        BB=grid.bb, G=grid.g, TILE=grid.tile, BLOCK_N=grid.block_n, DOT_DTYPE=dot_dtype, IEEE=ieee,
        ACC_DTYPE=tl.float64 if dot_dtype == tl.float64 else tl.float32, num_warps=_num_warps(grid.tile),
    )
    return y2.reshape(*lead, d)


def block_grad(grad: torch.Tensor, x: torch.Tensor, r: int, b: int, grad_layout: int, x_layout: int,
               out_dtype: torch.dtype, B: torch.Tensor | None = None):
    """``dB[p] = sum_n g'[n, p] x'[n, p]^T`` (r, b, b), g' and x' read in the given layouts.

    Given the step's blocks ``B``, returns ``(dx, dB)`` with the step's input
    gradient ``dx`` (``B^T g'`` stored in ``x_layout``) computed in the same pass.
    """
    g2 = _as_2d(grad)
    x2 = _as_2d(x)
    n_tok = x2.shape[0]
    dx2 = None if B is None else torch.empty(x2.shape, dtype=grad.dtype, device=x.device)
    if n_tok == 0:
        dB = torch.zeros((r, b, b), dtype=out_dtype, device=x.device)
        return dB if B is None else (dx2.reshape(x.shape), dB)
    grid = _group_grid(r, b, n_tok, 4 * _n_sm(x.device), min(x.element_size(), grad.element_size()),
                       grad_layout == x_layout == LINEAR)
    splits = grid.token_programs
    acc_dtype = torch.float64 if torch.float64 in (x.dtype, grad.dtype) else torch.float32
    partial = torch.empty((splits, r, b, b), dtype=acc_dtype, device=x.device)
    dot_dtype, ieee = _dot_config(x.dtype, grad.dtype)
    with_dx = B is not None
    Bc = B.contiguous() if with_dx else partial
    dx_arg = dx2 if with_dx else partial
    _block_grad_kernel[(grid.n_groups * splits,)](
        g2, x2, partial, Bc, dx_arg, n_tok, r, b,
        g2.stride(0), g2.stride(1), x2.stride(0), x2.stride(1),
        dx_arg.stride(0), dx_arg.stride(1),
        grid.n_groups,
        TILES_PER_SPLIT=grid.tiles_per_program, G_LAYOUT=grad_layout, X_LAYOUT=x_layout,
        BB=grid.bb, G=grid.g, TILE=grid.tile, BLOCK_N=grid.block_n, DOT_DTYPE=dot_dtype, IEEE=ieee, WITH_DX=with_dx,
        num_warps=_num_warps(grid.tile),
    )
    dB = partial.sum(0).to(out_dtype)
    return (dx2.reshape(x.shape), dB) if with_dx else dB


# ----------------------------------------------------------------------------- GS ops

def _layouts(n_steps: int, apply: bool):
    """(load, store) layout of every step: gs_chain gathers P before steps 2..m; gs_apply also stores P^T."""
    lay = [(LINEAR, LINEAR)] + [(STRIDED, LINEAR)] * (n_steps - 1)
    if apply:
        lay[-1] = (STRIDED, STRIDED)
    return lay


def _forward(x, blocks, apply, keep=False):
    """The chain's output, or with ``keep`` the input of every step followed by the output."""
    lay = _layouts(len(blocks), apply)
    acts = [x]
    for B, (ld, st) in zip(blocks, lay):
        y = _step(acts[-1], B, ld, st)
        acts = acts + [y] if keep else [y]
    return acts if keep else acts[-1]


def _backward(grad, x, blocks, apply):
    """Gradients of the chain: input gradient by transposed steps, block gradients by token reductions."""
    r, b, _ = blocks[0].shape
    lay = _layouts(len(blocks), apply)
    acts = _forward(x, blocks[:-1], False, keep=True)  # recompute the step inputs
    grads = [None] * len(blocks)
    g = grad
    for j in range(len(blocks) - 1, -1, -1):
        ld, st = lay[j]
        g, grads[j] = _step_grad(g, acts[j], blocks[j], ld, st)
    return g, grads


def _step(x, B, ld, st):
    """One step; a permuted load goes through the coalesced :func:`strided_step`."""
    if ld == STRIDED:
        return strided_step(x, B, st == STRIDED)
    return block_step(x, B, ld, st)


def _step_grad(g, x, B, ld, st):
    """``(dx, dB)`` of :func:`_step`."""
    if ld == STRIDED:
        return strided_step_grad(g, x, B, st == STRIDED)
    r, b, _ = B.shape
    return block_grad(g, x, r, b, st, ld, B.dtype, B=B)


def block_diag_mm(x: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``diag(B_1..B_r) x``."""
    return block_step(x, B, LINEAR, LINEAR)


def block_diag_mm_backward(grad: torch.Tensor, x: torch.Tensor, B: torch.Tensor):
    r, b, _ = B.shape
    return block_grad(grad, x, r, b, LINEAR, LINEAR, B.dtype, B=B)


def pair_path(r: int, b: int, esize: int = 2) -> str:
    """Which kernel runs two factors (GSOFT's ``P^T L P R x``, a chain's ``L P R x``) forward: ``"onepass"``
    (:func:`gs_onepass`), ``"chunked"`` (:func:`gs_chunked`, band super groups of b = 64), ``"row"``
    (:func:`gs_row`, whole rows) or ``"two-launch"``, the slower fallback (two block steps, the intermediate
    ``R x`` through memory) where none of the one-pass plans fits."""
    if onepass_plan(r, b, esize) is not None:
        return "onepass"
    if chunk_plan(r, b, esize) is not None:
        return "chunked"
    if row_plan(r, b, esize) is not None:
        return "row"
    return "two-launch"


def pair_backward_path(r: int, b: int, esize: int = 2) -> str:
    """Which kernels run the backward of two factors: ``"onepass"`` (:func:`gs_onepass_backward`), ``"row"``
    (:func:`gs_row_backward`) or ``"two-launch"`` (the fallback's transposed block steps; where the block-gradient
    accumulators of a super group do not fit on chip, e.g. the 4096-feature band super groups of b = 64)."""
    if onepass_plan(r, b, esize) is not None:
        return "onepass"
    if row_backward_groups(r, b, 2, esize) is not None:
        return "row"
    return "two-launch"


def _pair(x, R, L, linear_out):
    """``P^T L P R x`` (``L P R x`` with ``linear_out``) by :func:`pair_path`."""
    r, b, _ = R.shape
    path = pair_path(r, b, dot_bytes(x.dtype, L.dtype))
    if path == "onepass":
        return gs_onepass(x, L, R, linear_out=linear_out)
    if path == "chunked":
        return gs_chunked(x, L, R, linear_out=linear_out)
    if path == "row":
        return gs_row(x, [R, L], linear_out=linear_out)
    return _forward(x, [R, L], not linear_out)


def _pair_backward(grad, x, R, L, linear_out):
    """``(dx, dL, dR)`` of :func:`_pair` by :func:`pair_backward_path`."""
    r, b, _ = R.shape
    path = pair_backward_path(r, b, dot_bytes(x.dtype, L.dtype))
    if path == "onepass":
        return gs_onepass_backward(grad, x, L, R, linear_out=linear_out)
    if path == "row":
        dx, (dR, dL) = gs_row_backward(grad, x, [R, L], linear_out=linear_out)
        return dx, dL, dR
    dx, (dR, dL) = _backward(grad, x, [R, L], not linear_out)
    return dx, dL, dR


def chain_path(r: int, b: int, m: int, esize: int = 2) -> str:
    """Which kernels run an m-factor chain forward: ``"row"`` (m >= 3, the whole row of a token tile on chip,
    :func:`gs_row`) where a row fits, else the first two factors by :func:`pair_path` and one block step per
    further factor (``"pair+steps"``: one more round trip each)."""
    if 3 <= m <= MAX_CHAIN and row_plan(r, b, esize) is not None:
        return "row"
    return "pair+steps" if m >= 2 else "step"


def gs_chain(x: torch.Tensor, blocks) -> torch.Tensor:
    """``B_m P ... P B_1 x`` with ``P = perm(r, d)``: one pass over whole rows (:func:`chain_path`) where a row
    fits on chip, else the first two factors in one pass and one block step per further factor."""
    blocks = list(blocks)
    r, b, _ = blocks[0].shape
    path = chain_path(r, b, len(blocks), dot_bytes(x.dtype, blocks[0].dtype))
    if path == "row":
        return gs_row(x, blocks, linear_out=True)
    if path == "step":
        return _forward(x, blocks, False)
    y = _pair(x, blocks[0], blocks[1], True)
    for B in blocks[2:]:
        y = _step(y, B, STRIDED, LINEAR)
    return y


def gs_chain_backward(grad: torch.Tensor, x: torch.Tensor, blocks):
    """``(dx, [dB_1..dB_m])`` of :func:`gs_chain`: one pass (:func:`gs_row_backward`) where its accumulators fit
    (:func:`row_backward_groups`), else transposed block steps for factors m..3 and the pair's backward."""
    blocks = list(blocks)
    r, b, _ = blocks[0].shape
    m = len(blocks)
    esize = dot_bytes(x.dtype, blocks[0].dtype)
    if m < 2:
        return _backward(grad, x, blocks, False)
    if chain_path(r, b, m, esize) == "row" and row_backward_groups(r, b, m, esize) is not None:
        return gs_row_backward(grad, x, blocks, linear_out=True)
    acts = [_pair(x, blocks[0], blocks[1], True)] if m > 2 else []
    for B in blocks[2:-1]:  # recompute the inputs of factors 3..m
        acts.append(_step(acts[-1], B, STRIDED, LINEAR))
    grads = [None] * m
    g = grad
    for j in range(m - 1, 1, -1):
        g, grads[j] = _step_grad(g, acts[j - 2], blocks[j], STRIDED, LINEAR)
    g, grads[1], grads[0] = _pair_backward(g, x, blocks[0], blocks[1], True)
    return g, grads


def gs_apply(x: torch.Tensor, L: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """GSOFT's ``P^T L P R x`` in one pass where a plan fits (:func:`pair_path`), else by the two-launch fallback."""
    return _pair(x, R, L, False)


def gs_apply_backward(grad: torch.Tensor, x: torch.Tensor, L: torch.Tensor, R: torch.Tensor):
    """``(dx, dL, dR)`` of :func:`gs_apply` (:func:`pair_backward_path`)."""
    return _pair_backward(grad, x, R, L, False)


# ----------------------------------------------------------------------------- one-pass GS apply
#
# Structure of GSOFT's Q x = P^T L P R x with P = perm(r, d) (SPEC "Permutations"): write the
# intermediate t = R x as a b x r matrix M[q, p] = t[q*r + p]; L-block p reads column p of M and
# R-block j writes the run t[j*b : j*b + b], a run of b consecutive entries of M in row-major order.
# * r % b == 0 ("band"): R-block j lies in row j // k, columns (j % k)*b ..+b (k = r/b), so the b
#   R-blocks j = q*k + s (q < b) and the b L-blocks p = s*b + u (u < b) form a closed super group
#   s whose input and output features are the same b runs of b: q*r + s*b + v.  On chip the
#   permutation is a transpose of the (row, column) axes of the tile.
# * otherwise the runs straddle rows and every R-block is connected to every L-block: a program
#   owns all d features of its tokens and the permutation is a gather on chip.
# A program loads a tile (rows, tokens, columns) of its super group (contiguous runs of b, or whole
# token rows), applies the R-blocks (one batched dot over the rows), permutes on chip, applies the
# L-blocks (one batched dot over the columns) and stores contiguous runs: x is read once and y
# written once.  The backward recomputes R x the same way from one read of x and dy, writes dx
# once, and accumulates the block gradients of L and R per program (token split); torch sums the
# splits (deterministic, no atomics).

# What a program holds on chip, bounded so that the kernels fit an sm_90 SM's 227 KiB of shared
# memory (checked by compiling, tests/test_triton_compile.py), per byte size of the dot inputs
# (2: fp16/bf16 data, 4: float32, 8: float64): padded features of a super group, block elements of
# one factor's blocks in it, and the tile up to which the backward is one kernel (above it, dx and
# the block gradients are two kernels: 4 activation passes instead of 3).
ONEPASS_MAX_TILE = {2: 1024, 4: 256, 8: 128}
ONEPASS_MAX_BLOCK_ELEMS = 32768
ONEPASS_FUSED_BWD_TILE = {2: 256, 4: 256, 8: 128}


class _OnePassPlan(NamedTuple):
    band: bool       # closed b x b super groups (r % b == 0), else whole rows
    n_rows: int      # R-blocks (= L-blocks) per super group
    k: int           # r // b (band), 1 (whole rows)
    row_stride: int  # feature distance of consecutive R-blocks of a super group: r (band), b (whole rows)
    n_super: int     # super groups
    nr: int          # padded n_rows
    bb: int          # padded b
    esize: int = 2   # bytes of a dot input on a GPU

    @property
    def fused_backward(self) -> bool:
        return self.nr * self.bb <= ONEPASS_FUSED_BWD_TILE[self.esize]


def dot_bytes(x_dtype: torch.dtype, w_dtype: torch.dtype) -> int:
    """Bytes of a ``tl.dot`` input on a GPU for these activations and blocks (see :func:`_dot_config`)."""
    if torch.float64 in (x_dtype, w_dtype):
        return 8
    return 2 if x_dtype in _HALF else 4


def onepass_plan(r: int, b: int, esize: int = 2) -> _OnePassPlan | None:
    """The one-pass tiling of ``perm(r, r*b)``-GS matrices for dot inputs of ``esize`` bytes, or None when a
    super group is too large to hold on chip (then :func:`pair_path` tries the chunked and row kernels)."""
    bb = max(2, triton.next_power_of_2(b))
    if r % b == 0:
        plan = _OnePassPlan(True, b, r // b, r, r // b, bb, bb, esize)
    else:
        plan = _OnePassPlan(False, r, 1, b, 1, max(2, triton.next_power_of_2(r)), bb, esize)
    fits = plan.nr * plan.bb <= ONEPASS_MAX_TILE[esize] and plan.nr * plan.bb * plan.bb <= ONEPASS_MAX_BLOCK_ELEMS
    return plan if fits else None


@triton.jit
def _bmm(a, w, USE_DOT: tl.constexpr, IEEE: tl.constexpr, ACC: tl.constexpr):
    """Batched ``a @ w`` ([P, M, K] x [P, K, N] -> [P, M, N], ACC): tl.dot when all dims are >= 16, else FMAs."""
    if USE_DOT:
        out = _dot(a, w, IEEE, ACC)
    else:
        out = tl.sum(a[:, :, :, None].to(ACC) * w[:, None, :, :].to(ACC), axis=2)
    return out


@triton.jit
def _program_split(n_groups):
    """``(group, split)`` of this program in a grid of ``n_groups`` groups x token splits."""
    pid = tl.program_id(0)
    return pid % n_groups, pid // n_groups


@triton.jit
def _split_token_tile(split, t, N, m2, TILES: tl.constexpr, BN: tl.constexpr):
    """Tokens ``n`` (int64) of tile ``t`` of token split ``split`` and the [rows, BN, cols] mask under ``m2``."""
    n = (split * TILES + t) * BN + tl.arange(0, BN)
    return n.to(tl.int64), m2[:, None, :] & (n < N)[None, :, None]


@triton.jit
def _load_tile(ptr, n64, f, stride_n, stride_d, m3):
    """``ptr[n, f[row, col]]`` as [rows, BN, cols] (zero under ``~m3``)."""
    return tl.load(ptr + n64[None, :, None] * stride_n + f[:, None, :] * stride_d, mask=m3, other=0.0)


@triton.jit
def _store_tile(ptr, n64, f, stride_n, stride_d, val, m3):
    """``ptr[n, f[row, col]] = val`` ([rows, BN, cols]) under ``m3``, in ``ptr``'s dtype."""
    tl.store(ptr + n64[None, :, None] * stride_n + f[:, None, :] * stride_d, val.to(ptr.dtype.element_ty), mask=m3)


@triton.jit
def _store_partial(ptr, acc, split, blk, r, b, m2, BB: tl.constexpr):
    """``ptr[split, blk[row]] = acc[row]`` ([splits, r, b, b] partial block gradients; rows under ``m2``)."""
    c = tl.arange(0, BB)
    wm = m2[:, :, None] & (c < b)[None, None, :]
    off = split.to(tl.int64) * r * b * b + blk[:, None, None] * b * b + c[None, :, None] * b + c[None, None, :]
    tl.store(ptr + off, acc.to(ptr.dtype.element_ty), mask=wm)


@triton.jit
def _onepass_index(s, r, b, k, row_stride, n_rows, BAND: tl.constexpr, LINEAR_OUT: tl.constexpr,
                   NR: tl.constexpr, BB: tl.constexpr):
    """Per super group ``s``: rows ``j`` / in-block ``v`` aranges, input features ``fx[j, v]``, output features
    ``fo[p, i]`` (of ``L P R x`` with ``LINEAR_OUT``), their masks, R-block ``rb[j]`` and L-block ``lb[p]``
    indices, and the on-chip gathers (whole rows only): ``to_cols[p*BB+q]`` = flat (j, u) position of
    ``(P t)_p[q]`` and ``to_rows[j*BB+u]`` = flat (p, q) position of ``t_j[u]``."""
    j = tl.arange(0, NR)
    v = tl.arange(0, BB)
    rows_ok = j < n_rows
    cols_ok = v < b
    m2 = rows_ok[:, None] & cols_ok[None, :]
    fx = (j[:, None] * row_stride + s * b + v[None, :]).to(tl.int64)          # x feature of (row j, entry v)
    fo = (v[None, :] * r + s * b + j[:, None]).to(tl.int64)                   # y feature of (L-block p=j, entry i=v)
    rb = (j * k + s).to(tl.int64)
    lb = (s * b + j).to(tl.int64)
    if LINEAR_OUT:
        fo = (lb[:, None] * b + v[None, :]).to(tl.int64)
    if BAND:
        to_cols = j[:, None] * BB + v[None, :]
        to_rows = to_cols
    else:
        f = v[None, :] * r + j[:, None]            # t position of (P t)_p[q] with p = j, q = v
        to_cols = tl.where(m2, (f // b) * BB + f % b, 0)
        f2 = j[:, None] * b + v[None, :]           # t position of t_j[u] with u = v
        to_rows = tl.where(m2, (f2 % r) * BB + f2 // r, 0)
    return j, v, m2, fx, fo, rb, lb, tl.reshape(to_cols, (NR * BB,)), tl.reshape(to_rows, (NR * BB,))


@triton.jit
def _onepass_blocks(w_ptr, blk, b, m2, TRANS: tl.constexpr, NR: tl.constexpr, BB: tl.constexpr):
    """``W[j, c, e] = B_{blk[j]}[e, c]`` ([NR, BB, BB], zero outside the blocks): ``a @ W`` applies ``B`` per row;
    with ``TRANS`` ``W[j, c, e] = B_{blk[j]}[c, e]`` (applies ``B^T``)."""
    c = tl.arange(0, BB)
    if TRANS:
        off = blk[:, None, None] * b * b + c[None, :, None] * b + c[None, None, :]
    else:
        off = blk[:, None, None] * b * b + c[None, None, :] * b + c[None, :, None]
    msk = m2[:, :, None] & (c < b)[None, None, :]
    return tl.load(w_ptr + off, mask=msk, other=0.0)


@triton.jit
def _onepass_move(t, idx, m2, BAND: tl.constexpr, NR: tl.constexpr, BB: tl.constexpr, BN: tl.constexpr):
    """``t`` [NR, BN, BB] with (row, column) swapped: a transpose (band) or the gather ``idx`` (whole rows)."""
    if BAND:
        out = tl.permute(t, (2, 1, 0))
    else:
        flat = tl.reshape(tl.permute(t, (1, 0, 2)), (BN, NR * BB))
        g = tl.gather(flat, tl.broadcast_to(idx[None, :], (BN, NR * BB)), axis=1)
        out = tl.permute(tl.reshape(g, (BN, NR, BB)), (1, 0, 2))
        out = tl.where(m2[:, None, :], out, 0.0)
    return out


@triton.jit
def _onepass_fwd_kernel(
    x_ptr, l_ptr, r_ptr, y_ptr,
    N, r, b, k, row_stride, n_rows, n_super,
    stride_xn, stride_xd, stride_yn, stride_yd,
    TILES: tl.constexpr, BAND: tl.constexpr, LINEAR_OUT: tl.constexpr,
    NR: tl.constexpr, BB: tl.constexpr, BN: tl.constexpr,
    DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr, ACC: tl.constexpr, USE_DOT: tl.constexpr,
):
    """``y = P^T L P R x`` (or ``L P R x`` with ``LINEAR_OUT``) for one super group x ``TILES`` token tiles."""
    s, pid_n = _program_split(n_super)
    j, v, m2, fx, fo, rb, lb, to_cols, to_rows = _onepass_index(s, r, b, k, row_stride, n_rows, BAND, LINEAR_OUT,
                                                                NR, BB)
    w1 = _onepass_blocks(r_ptr, rb, b, m2, False, NR, BB).to(DOT_DTYPE)   # [j, v, u] = R_j[u, v]
    w2 = _onepass_blocks(l_ptr, lb, b, m2, False, NR, BB).to(DOT_DTYPE)   # [p, q, i] = L_p[i, q]
    for t in range(0, TILES):
        n64, m3 = _split_token_tile(pid_n, t, N, m2, TILES, BN)
        xt = _load_tile(x_ptr, n64, fx, stride_xn, stride_xd, m3)
        tt = _bmm(xt.to(DOT_DTYPE), w1, USE_DOT, IEEE, ACC)                      # [j, n, u]: R x
        a = _onepass_move(tt.to(DOT_DTYPE), to_cols, m2, BAND, NR, BB, BN)        # [p, n, q]: P R x
        z = _bmm(a, w2, USE_DOT, IEEE, ACC)                                       # [p, n, i]
        _store_tile(y_ptr, n64, fo, stride_yn, stride_yd, z, m3)


@triton.jit
def _onepass_bwd_kernel(
    g_ptr, x_ptr, l_ptr, r_ptr, dx_ptr, dl_ptr, dr_ptr,
    N, r, b, k, row_stride, n_rows, n_super,
    stride_gn, stride_gd, stride_xn, stride_xd, stride_dxn, stride_dxd,
    TILES: tl.constexpr, BAND: tl.constexpr, LINEAR_OUT: tl.constexpr,
    NR: tl.constexpr, BB: tl.constexpr, BN: tl.constexpr,
    DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr, ACC: tl.constexpr, USE_DOT: tl.constexpr,
    WITH_DX: tl.constexpr = True, WITH_GRADS: tl.constexpr = True,
):
    """dx (``WITH_DX``) and this token split's partial dL, dR ([split, r, b, b], ``WITH_GRADS``) for one super
    group.  Without ``WITH_GRADS`` it is the transposed one-pass apply ``dx = Q^T dy`` (x is not read)."""
    s, split = _program_split(n_super)
    j, v, m2, fx, fo, rb, lb, to_cols, to_rows = _onepass_index(s, r, b, k, row_stride, n_rows, BAND, LINEAR_OUT,
                                                                NR, BB)
    w1 = _onepass_blocks(r_ptr, rb, b, m2, False, NR, BB).to(DOT_DTYPE)   # [j, v, u] = R_j[u, v]
    w1t = _onepass_blocks(r_ptr, rb, b, m2, True, NR, BB).to(DOT_DTYPE)   # [j, u, v] = R_j[u, v]
    w2t = _onepass_blocks(l_ptr, lb, b, m2, True, NR, BB).to(DOT_DTYPE)   # [p, i, q] = L_p[i, q]
    dl_acc = tl.zeros((NR, BB, BB), dtype=ACC)
    dr_acc = tl.zeros((NR, BB, BB), dtype=ACC)
    for t in range(0, TILES):
        n64, m3 = _split_token_tile(split, t, N, m2, TILES, BN)
        gz = _load_tile(g_ptr, n64, fo, stride_gn, stride_gd, m3)
        gz = gz.to(DOT_DTYPE)                                                     # [p, n, i]: dz = P dy
        if WITH_GRADS:
            xt = _load_tile(x_ptr, n64, fx, stride_xn, stride_xd, m3)
            xt = xt.to(DOT_DTYPE)
            tt = _bmm(xt, w1, USE_DOT, IEEE, ACC)
            a = _onepass_move(tt.to(DOT_DTYPE), to_cols, m2, BAND, NR, BB, BN)    # [p, n, q]: u = P R x
            dl_acc += _bmm(tl.permute(gz, (0, 2, 1)), a, USE_DOT, IEEE, ACC)      # [p, i, q]
        du = _bmm(gz, w2t, USE_DOT, IEEE, ACC)                                    # [p, n, q]: L^T dz
        dt = _onepass_move(du.to(DOT_DTYPE), to_rows, m2, BAND, NR, BB, BN)       # [j, n, u]: P^T du
        if WITH_GRADS:
            dr_acc += _bmm(tl.permute(dt, (0, 2, 1)), xt, USE_DOT, IEEE, ACC)     # [j, u, v]
        if WITH_DX:
            dxt = _bmm(dt, w1t, USE_DOT, IEEE, ACC)                               # [j, n, v]: R^T dt
            _store_tile(dx_ptr, n64, fx, stride_dxn, stride_dxd, dxt, m3)
    if WITH_GRADS:
        _store_partial(dl_ptr, dl_acc, split, lb, r, b, m2, BB)
        _store_partial(dr_ptr, dr_acc, split, rb, r, b, m2, BB)


def _onepass_block_n(plan: _OnePassPlan, n_tok: int) -> int:
    if _interpreting():
        return max(16, min(64, triton.next_power_of_2(max(n_tok, 1))))
    feats = plan.nr * plan.bb
    if plan.esize > 2:
        return 16
    return 64 if feats <= 256 else (32 if feats <= 512 else 16)


def _onepass_warps(plan: _OnePassPlan, block_n: int) -> int:
    elems = plan.nr * plan.bb * block_n
    return 4 if elems <= 8192 else (8 if elems <= 16384 else 16)


def _min_tiles_for_partials(b: int, block_n: int, n_tiles: int, n_groups: int, n_sm: int) -> int:
    """Token tiles per program of a block-gradient kernel: up to ``16 b`` tokens, so that the per-program
    partial sums (one factor's blocks of the super group) stay small against the activations read, but
    never so many that fewer programs than SMs remain."""
    want = triton.next_power_of_2(triton.cdiv(16 * b, block_n))
    fill = max(1, (n_groups * n_tiles) // max(n_sm, 1))
    return min(triton.next_power_of_2(n_tiles), want, 1 << (fill.bit_length() - 1))


def _onepass_launch_plan(plan: _OnePassPlan, n_tok: int, want_programs: int, n_sm: int = 1, grads: bool = False):
    block_n = _onepass_block_n(plan, n_tok)
    n_tiles = triton.cdiv(n_tok, block_n)
    per = _loop_count(n_tiles, plan.n_super, want_programs)
    if grads and not _interpreting():
        per = max(per, _min_tiles_for_partials(plan.bb, block_n, n_tiles, plan.n_super, n_sm))
    return block_n, per, triton.cdiv(n_tiles, per)


def _onepass_consts(plan, x, w, linear_out, block_n, tiles):
    dot_dtype, ieee = _dot_config(x.dtype, w.dtype)
    return dict(TILES=tiles, BAND=plan.band, LINEAR_OUT=linear_out, NR=plan.nr, BB=plan.bb, BN=block_n,
                DOT_DTYPE=dot_dtype, IEEE=ieee, ACC=tl.float64 if dot_dtype == tl.float64 else tl.float32,
                USE_DOT=plan.bb >= 16, num_warps=_onepass_warps(plan, block_n))


def gs_onepass(x: torch.Tensor, L: torch.Tensor, R: torch.Tensor, linear_out: bool = False) -> torch.Tensor:
    """``P^T L P R x`` (``L P R x`` with ``linear_out``) in one pass: x read once, y written once.

    Raises ValueError when the shape has no one-pass plan (:func:`onepass_plan`); :func:`gs_apply`
    picks another kernel for those before launching (:func:`pair_path`).
    """
    r, b, _ = R.shape
    plan_bytes = dot_bytes(x.dtype, L.dtype)
    plan = onepass_plan(r, b, plan_bytes)
    if plan is None:
        raise ValueError(f"r={r}, b={b}: a super group of {r * b if r % b else b * b} features does not fit on "
                         f"chip (ONEPASS_MAX_TILE={ONEPASS_MAX_TILE[plan_bytes]}, "
                         f"ONEPASS_MAX_BLOCK_ELEMS={ONEPASS_MAX_BLOCK_ELEMS} for {plan_bytes}-byte dot inputs); "
                         f"see pair_path")

    def launch(x2, y2, n_tok):
        block_n, tiles, progs = _onepass_launch_plan(plan, n_tok, 8 * _n_sm(x.device))
        _onepass_fwd_kernel[(plan.n_super * progs,)](
            x2, L.contiguous(), R.contiguous(), y2, n_tok, r, b, plan.k, plan.row_stride, plan.n_rows, plan.n_super,
            x2.stride(0), x2.stride(1), y2.stride(0), y2.stride(1),
            **_onepass_consts(plan, x, L, linear_out, block_n, tiles),
        )
    return _per_token(x, r * b, launch)


def gs_onepass_backward(grad: torch.Tensor, x: torch.Tensor, L: torch.Tensor, R: torch.Tensor,
                        linear_out: bool = False):
    """``(dx, dL, dR)`` of :func:`gs_onepass`: one read of ``x`` and ``grad`` and one write of ``dx`` (one
    kernel) for tiles up to ``ONEPASS_FUSED_BWD_TILE`` features, else two kernels (dx from ``grad``; the
    block gradients from ``x`` and ``grad``)."""
    r, b, _ = R.shape
    plan = onepass_plan(r, b, dot_bytes(x.dtype, L.dtype))
    if plan is None:
        raise ValueError(f"r={r}, b={b}: no one-pass plan for {dot_bytes(x.dtype, L.dtype)}-byte dot inputs "
                         f"(ONEPASS_MAX_TILE, ONEPASS_MAX_BLOCK_ELEMS)")
    g2, x2 = _as_2d(grad), _as_2d(x)
    n_tok = x2.shape[0]
    dx2 = torch.empty(x2.shape, dtype=grad.dtype, device=x.device)
    if n_tok == 0:
        z = torch.zeros((r, b, b), dtype=L.dtype, device=x.device)
        return dx2.reshape(x.shape), z, z.clone().to(R.dtype)
    block_n, tiles, splits = _onepass_launch_plan(plan, n_tok, 4 * _n_sm(x.device), _n_sm(x.device), grads=True)
    acc_dtype = torch.float64 if torch.float64 in (x.dtype, grad.dtype) else torch.float32
    dl = torch.empty((splits, r, b, b), dtype=acc_dtype, device=x.device)
    dr = torch.empty((splits, r, b, b), dtype=acc_dtype, device=x.device)
    args = (g2, x2, L.contiguous(), R.contiguous(), dx2, dl, dr,
            n_tok, r, b, plan.k, plan.row_stride, plan.n_rows, plan.n_super,
            g2.stride(0), g2.stride(1), x2.stride(0), x2.stride(1), dx2.stride(0), dx2.stride(1))
    consts = _onepass_consts(plan, x, L, linear_out, block_n, tiles)
    grid = (plan.n_super * splits,)
    if plan.fused_backward:
        _onepass_bwd_kernel[grid](*args, **consts)
    else:  # two kernels: dx = Q^T dy (reads dy), then the block gradients (read x and dy)
        _onepass_bwd_kernel[grid](*args, WITH_DX=True, WITH_GRADS=False, **consts)
        _onepass_bwd_kernel[grid](*args, WITH_DX=False, WITH_GRADS=True, **consts)
    return dx2.reshape(x.shape), dl.sum(0).to(L.dtype), dr.sum(0).to(R.dtype)


# ----------------------------------------------------------------------------- coalesced permuted step
#
# The fallback's permuted step (used where a super group does not fit on chip): block p of P t is
# t[q*r + p] (q < b), so a program that owns G consecutive blocks p0..p0+G-1 reads, for each q, the
# contiguous run t[q*r + p0 : q*r + p0 + G].  With G*element size >= 32 bytes every sector it
# touches is fully used, where one block per program would touch one sector per element.

# block elements of the G blocks a program holds (sm_90 shared memory, checked by compiling)
STRIDED_MAX_BLOCK_ELEMS = {2: 65536, 4: 16384, 8: 8192}


@triton.jit
def _strided_index(pg, r, b, G: tl.constexpr, BB: tl.constexpr, OUT_STRIDED: tl.constexpr):
    g = tl.arange(0, G)
    c = tl.arange(0, BB)
    p = pg * G + g
    m2 = (p < r)[:, None] & (c < b)[None, :]
    fin = (c[None, :] * r + p[:, None]).to(tl.int64)          # feature of (block p, entry q) of P t
    if OUT_STRIDED:
        fout = fin                                            # y = P^T z
    else:
        fout = (p[:, None] * b + c[None, :]).to(tl.int64)     # y = z
    return p.to(tl.int64), m2, fin, fout


@triton.jit
def _strided_step_kernel(
    x_ptr, w_ptr, y_ptr,
    N, r, b, n_pg,
    stride_xn, stride_xd, stride_yn, stride_yd,
    TILES: tl.constexpr, OUT_STRIDED: tl.constexpr, G: tl.constexpr, BB: tl.constexpr, BN: tl.constexpr,
    DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr, ACC: tl.constexpr, USE_DOT: tl.constexpr,
):
    """``y = P_out^T diag(B) P x`` for G consecutive blocks x ``TILES`` token tiles (``P_out`` = P or I)."""
    pg, pid_n = _program_split(n_pg)
    p, m2, fin, fout = _strided_index(pg, r, b, G, BB, OUT_STRIDED)
    w = _onepass_blocks(w_ptr, p, b, m2, False, G, BB).to(DOT_DTYPE)   # [g, q, i] = B_p[i, q]
    for t in range(0, TILES):
        n64, m3 = _split_token_tile(pid_n, t, N, m2, TILES, BN)
        xt = _load_tile(x_ptr, n64, fin, stride_xn, stride_xd, m3)
        z = _bmm(xt.to(DOT_DTYPE), w, USE_DOT, IEEE, ACC)                # [g, n, i]
        _store_tile(y_ptr, n64, fout, stride_yn, stride_yd, z, m3)


@triton.jit
def _strided_grad_kernel(
    g_ptr, x_ptr, w_ptr, dx_ptr, db_ptr,
    N, r, b, n_pg,
    stride_gn, stride_gd, stride_xn, stride_xd, stride_dxn, stride_dxd,
    TILES: tl.constexpr, OUT_STRIDED: tl.constexpr, G: tl.constexpr, BB: tl.constexpr, BN: tl.constexpr,
    DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr, ACC: tl.constexpr, USE_DOT: tl.constexpr,
):
    """Input gradient (stored under P, like the step's input) and this split's partial block gradients."""
    pg, split = _program_split(n_pg)
    p, m2, fin, fout = _strided_index(pg, r, b, G, BB, OUT_STRIDED)
    wt = _onepass_blocks(w_ptr, p, b, m2, True, G, BB).to(DOT_DTYPE)   # [g, i, q] = B_p[i, q]
    acc = tl.zeros((G, BB, BB), dtype=ACC)
    for t in range(0, TILES):
        n64, m3 = _split_token_tile(split, t, N, m2, TILES, BN)
        gz = _load_tile(g_ptr, n64, fout, stride_gn, stride_gd, m3)
        xt = _load_tile(x_ptr, n64, fin, stride_xn, stride_xd, m3)
        gz = gz.to(DOT_DTYPE)
        acc += _bmm(tl.permute(gz, (0, 2, 1)), xt.to(DOT_DTYPE), USE_DOT, IEEE, ACC)   # [g, i, q]
        dxt = _bmm(gz, wt, USE_DOT, IEEE, ACC)                                           # [g, n, q]
        _store_tile(dx_ptr, n64, fin, stride_dxn, stride_dxd, dxt, m3)
    _store_partial(db_ptr, acc, split, p, r, b, m2, BB)


def _strided_plan(r: int, b: int, esize: int, n_tok: int):
    """(G, BB, BN): blocks per program (runs of >= 32 bytes where the blocks' elements allow), padded b, tokens."""
    bb = max(2, triton.next_power_of_2(b))
    budget = STRIDED_MAX_BLOCK_ELEMS[esize]
    g = max(1, min(max(1, 32 // esize), budget // (bb * bb), triton.next_power_of_2(r)))
    g = 1 << (g.bit_length() - 1)
    if _interpreting():
        bn = max(16, min(64, triton.next_power_of_2(max(n_tok, 1))))
    else:
        bn = 16 if g * bb >= 512 or esize > 2 else (32 if g * bb >= 256 else 64)
    return g, bb, bn


def _strided_launch(x: torch.Tensor, B: torch.Tensor, out_strided: bool, n_tok: int, want_programs: int,
                    grads: bool = False):
    """``(n_pg, splits, consts)``: block groups, token splits and the constexpr/launch keywords of the strided
    kernels (``grads``: a block-gradient kernel, whose token splits also bound the partial sums)."""
    r, b, _ = B.shape
    g, bb, bn = _strided_plan(r, b, dot_bytes(x.dtype, B.dtype), n_tok)
    n_pg = triton.cdiv(r, g)
    n_tiles = triton.cdiv(n_tok, bn)
    tiles = _loop_count(n_tiles, n_pg, want_programs)
    if grads and not _interpreting():
        tiles = max(tiles, _min_tiles_for_partials(bb, bn, n_tiles, n_pg, _n_sm(x.device)))
    dot_dtype, ieee = _dot_config(x.dtype, B.dtype)
    consts = dict(TILES=tiles, OUT_STRIDED=bool(out_strided), G=g, BB=bb, BN=bn, DOT_DTYPE=dot_dtype, IEEE=ieee,
                  ACC=tl.float64 if dot_dtype == tl.float64 else tl.float32, USE_DOT=bb >= 16,
                  num_warps=4 if g * bb * bn <= 8192 else 8)
    return n_pg, triton.cdiv(n_tiles, tiles), consts


def strided_step(x: torch.Tensor, B: torch.Tensor, out_strided: bool) -> torch.Tensor:
    """``P_out^T diag(B) P x`` (``P_out = P`` when ``out_strided``, else I) with coalesced runs on the permuted side."""
    r, b, _ = B.shape

    def launch(x2, y2, n_tok):
        n_pg, splits, consts = _strided_launch(x, B, out_strided, n_tok, 8 * _n_sm(x.device))
        _strided_step_kernel[(n_pg * splits,)](
            x2, B.contiguous(), y2, n_tok, r, b, n_pg,
            x2.stride(0), x2.stride(1), y2.stride(0), y2.stride(1), **consts,
        )
    return _per_token(x, r * b, launch)


def strided_step_grad(grad: torch.Tensor, x: torch.Tensor, B: torch.Tensor, out_strided: bool):
    """``(dx, dB)`` of :func:`strided_step` from one read of ``grad`` and ``x`` and one write of ``dx``."""
    r, b, _ = B.shape
    g2, x2 = _as_2d(grad), _as_2d(x)
    n_tok = x2.shape[0]
    dx2 = torch.empty(x2.shape, dtype=grad.dtype, device=x.device)
    if n_tok == 0:
        return dx2.reshape(x.shape), torch.zeros((r, b, b), dtype=B.dtype, device=x.device)
    n_pg, splits, consts = _strided_launch(x, B, out_strided, n_tok, 4 * _n_sm(x.device), grads=True)
    acc_dtype = torch.float64 if torch.float64 in (x.dtype, grad.dtype) else torch.float32
    part = torch.empty((splits, r, b, b), dtype=acc_dtype, device=x.device)
    _strided_grad_kernel[(n_pg * splits,)](
        g2, x2, B.contiguous(), dx2, part, n_tok, r, b, n_pg,
        g2.stride(0), g2.stride(1), x2.stride(0), x2.stride(1), dx2.stride(0), dx2.stride(1), **consts,
    )
    return dx2.reshape(x.shape), part.sum(0).to(B.dtype)


# ----------------------------------------------------------------------------- weights streamed in pieces
#
# Where one factor's blocks of a super group are too large to hold on chip at once (b = 64), a
# batched product ``a @ W`` ([P, BN, K] x [P, K, N]) is split along K into KS pieces: ``a`` is cut on
# chip (reshape + split) and each piece of W, [P, K/KS, N], is loaded just before its dot, so at most
# one piece is live.  The pieces are read from L2 for every token tile (weights, not activations).


@triton.jit
def _halves(a):
    """``a[..., :K/2], a[..., K/2:]`` of a 3-D ``a`` (cut on chip)."""
    P: tl.constexpr = a.shape[0]
    N: tl.constexpr = a.shape[1]
    K: tl.constexpr = a.shape[2]
    return tl.split(tl.permute(tl.reshape(a, (P, N, 2, K // 2)), (0, 1, 3, 2)))


@triton.jit
def _block_piece(w_ptr, blk, rows_ok, b, c0, e0, TRANS: tl.constexpr, KW: tl.constexpr, NW: tl.constexpr):
    """``W[j, c, e] = B_{blk[j]}[e0 + e, c0 + c]`` ([P, KW, NW], zero outside the blocks); with ``TRANS``
    ``B_{blk[j]}[c0 + c, e0 + e]``: ``a @ W`` applies ``B`` (``B^T``) to entries ``c0..c0+KW`` of each row of ``a``,
    giving its outputs ``e0..e0+NW``."""
    c = c0 + tl.arange(0, KW)
    e = e0 + tl.arange(0, NW)
    if TRANS:
        off = blk[:, None, None] * b * b + c[None, :, None] * b + e[None, None, :]
    else:
        off = blk[:, None, None] * b * b + e[None, None, :] * b + c[None, :, None]
    msk = rows_ok[:, None, None] & (c < b)[None, :, None] & (e < b)[None, None, :]
    return tl.load(w_ptr + off, mask=msk, other=0.0)


@triton.jit
def _bmm_pieces(a, w_ptr, blk, rows_ok, b, e0, TRANS: tl.constexpr, KS: tl.constexpr, NW: tl.constexpr,
                DOT_DTYPE: tl.constexpr, USE_DOT: tl.constexpr, IEEE: tl.constexpr, ACC: tl.constexpr):
    """``a @ W`` (``W`` of :func:`_block_piece` over all of ``a``'s K entries) with W loaded in ``KS`` in {1, 2, 4}
    pieces along K."""
    K: tl.constexpr = a.shape[2]
    if KS == 1:
        out = _bmm(a, _block_piece(w_ptr, blk, rows_ok, b, 0, e0, TRANS, K, NW).to(DOT_DTYPE), USE_DOT, IEEE, ACC)
    elif KS == 2:
        a0, a1 = _halves(a)
        out = _bmm(a0, _block_piece(w_ptr, blk, rows_ok, b, 0, e0, TRANS, K // 2, NW).to(DOT_DTYPE),
                   USE_DOT, IEEE, ACC)
        out += _bmm(a1, _block_piece(w_ptr, blk, rows_ok, b, K // 2, e0, TRANS, K // 2, NW).to(DOT_DTYPE),
                    USE_DOT, IEEE, ACC)
    else:
        a0, a1 = _halves(a)
        a00, a01 = _halves(a0)
        a10, a11 = _halves(a1)
        Q: tl.constexpr = K // 4
        out = _bmm(a00, _block_piece(w_ptr, blk, rows_ok, b, 0, e0, TRANS, Q, NW).to(DOT_DTYPE), USE_DOT, IEEE, ACC)
        out += _bmm(a01, _block_piece(w_ptr, blk, rows_ok, b, Q, e0, TRANS, Q, NW).to(DOT_DTYPE), USE_DOT, IEEE, ACC)
        out += _bmm(a10, _block_piece(w_ptr, blk, rows_ok, b, 2 * Q, e0, TRANS, Q, NW).to(DOT_DTYPE),
                    USE_DOT, IEEE, ACC)
        out += _bmm(a11, _block_piece(w_ptr, blk, rows_ok, b, 3 * Q, e0, TRANS, Q, NW).to(DOT_DTYPE),
                    USE_DOT, IEEE, ACC)
    return out


# ----------------------------------------------------------------------------- one-pass chain of m factors
#
# ``B_m P ... P B_1 x`` (and GSOFT's ``P^T L P R x``): a factor after the first reads its input through
# P, so the support of a token's output grows with every factor; from the third factor on it is the
# whole row as soon as r > b (block p' of factor 3 reads factor-2 blocks q*(r/b) + p'//b for all q < b,
# which lie in every super group).  The row kernels below hold the whole row of BN tokens on chip,
# [rows = blocks, tokens, in-block entries] as in the whole-row one-pass tiling, apply the m factors
# with the permutation as an on-chip gather between them, and store the row once: x read once, y
# written once.  The m factors' blocks are one stacked [m, r, b, b] tensor, each factor's blocks loaded
# in KS pieces (:func:`_bmm_pieces`).  The backward recomputes the inputs of every factor on chip from
# one read of x, reads dy once, writes dx once, and accumulates the block gradients of the factors in
# ``GRADS`` (all of them, or one: then one launch per factor, each reading x and dy again).

MAX_CHAIN = 4  # factors of a one-pass chain (one accumulator each in the backward)
ROW_MAX_GRAD_ELEMS = 65536  # float32 block-gradient accumulators one row program holds


@triton.jit
def _row_index(r, b, n_rows, LINEAR_OUT: tl.constexpr, NR: tl.constexpr, BB: tl.constexpr):
    j, v, m2, fx, fo, rb, lb, to_cols, to_rows = _onepass_index(0, r, b, 1, b, n_rows, False, LINEAR_OUT, NR, BB)
    return j < n_rows, m2, fx, fo, j.to(tl.int64), to_cols, to_rows


@triton.jit
def _row_chain(a, w_ptr, blk, rows_ok, m2, to_cols, r, b, F: tl.constexpr, KS: tl.constexpr,
               NR: tl.constexpr, BB: tl.constexpr, BN: tl.constexpr,
               DOT_DTYPE: tl.constexpr, USE_DOT: tl.constexpr, IEEE: tl.constexpr, ACC: tl.constexpr):
    """The input of factor ``F`` (``P B_F ... P B_1 a``, ``a`` itself for ``F == 0``) in ``DOT_DTYPE``."""
    for h in tl.static_range(F):
        if h > 0:
            a = _onepass_move(a, to_cols, m2, False, NR, BB, BN)
        a = _bmm_pieces(a, w_ptr + h * r * b * b, blk, rows_ok, b, 0, False, KS, BB, DOT_DTYPE, USE_DOT, IEEE,
                        ACC).to(DOT_DTYPE)
    if F > 0:
        a = _onepass_move(a, to_cols, m2, False, NR, BB, BN)
    return a


@triton.jit
def _row_fwd_kernel(
    x_ptr, w_ptr, y_ptr,
    N, r, b,
    stride_xn, stride_xd, stride_yn, stride_yd,
    TILES: tl.constexpr, M: tl.constexpr, LINEAR_OUT: tl.constexpr, KS: tl.constexpr,
    NR: tl.constexpr, BB: tl.constexpr, BN: tl.constexpr,
    DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr, ACC: tl.constexpr, USE_DOT: tl.constexpr,
):
    """``y = B_M P ... P B_1 x`` (``P^T`` of it without ``LINEAR_OUT``) for whole rows x ``TILES`` token tiles."""
    pid_n = tl.program_id(0)
    rows_ok, m2, fx, fo, blk, to_cols, to_rows = _row_index(r, b, r, LINEAR_OUT, NR, BB)
    for t in range(0, TILES):
        n64, m3 = _split_token_tile(pid_n, t, N, m2, TILES, BN)
        a = _load_tile(x_ptr, n64, fx, stride_xn, stride_xd, m3).to(DOT_DTYPE)
        a = _row_chain(a, w_ptr, blk, rows_ok, m2, to_cols, r, b, M - 1, KS, NR, BB, BN, DOT_DTYPE, USE_DOT, IEEE,
                       ACC)
        z = _bmm_pieces(a, w_ptr + (M - 1) * r * b * b, blk, rows_ok, b, 0, False, KS, BB, DOT_DTYPE, USE_DOT,
                        IEEE, ACC)
        _store_tile(y_ptr, n64, fo, stride_yn, stride_yd, z, m3)


@triton.jit
def _row_bwd_kernel(
    g_ptr, x_ptr, w_ptr, dx_ptr, dw_ptr,
    N, r, b, n_splits,
    stride_gn, stride_gd, stride_xn, stride_xd, stride_dxn, stride_dxd,
    TILES: tl.constexpr, M: tl.constexpr, LINEAR_OUT: tl.constexpr, KS: tl.constexpr, GRADS: tl.constexpr,
    LOW: tl.constexpr, WITH_DX: tl.constexpr, NR: tl.constexpr, BB: tl.constexpr, BN: tl.constexpr,
    DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr, ACC: tl.constexpr, USE_DOT: tl.constexpr,
):
    """dx (``WITH_DX``) and this token split's partial block gradients ``dw[f, split]`` ([m, splits, r, b, b]) of the
    factors ``f`` in the bit mask ``GRADS`` (bit f set) of :func:`_row_fwd_kernel`; ``LOW`` is the lowest of them."""
    split = tl.program_id(0)
    rows_ok, m2, fx, fo, blk, to_cols, to_rows = _row_index(r, b, r, LINEAR_OUT, NR, BB)
    acc0 = tl.zeros((NR, BB, BB), dtype=ACC)
    acc1 = tl.zeros((NR, BB, BB), dtype=ACC)
    acc2 = tl.zeros((NR, BB, BB), dtype=ACC)
    acc3 = tl.zeros((NR, BB, BB), dtype=ACC)
    for t in range(0, TILES):
        n64, m3 = _split_token_tile(split, t, N, m2, TILES, BN)
        g = _load_tile(g_ptr, n64, fo, stride_gn, stride_gd, m3).to(DOT_DTYPE)     # [p, n, i]: dy of factor M
        xt = _load_tile(x_ptr, n64, fx, stride_xn, stride_xd, m3).to(DOT_DTYPE)
        for f in tl.static_range(M - 1, -1, -1):
            if (GRADS >> f) & 1:
                a = _row_chain(xt, w_ptr, blk, rows_ok, m2, to_cols, r, b, f, KS, NR, BB, BN, DOT_DTYPE, USE_DOT,
                               IEEE, ACC)                                          # [p, n, q]: input of factor f
                contrib = _bmm(tl.permute(g, (0, 2, 1)), a, USE_DOT, IEEE, ACC)     # [p, i, q]
                if f == 0:
                    acc0 += contrib
                elif f == 1:
                    acc1 += contrib
                elif f == 2:
                    acc2 += contrib
                else:
                    acc3 += contrib
            if WITH_DX or f > LOW:
                du = _bmm_pieces(g, w_ptr + f * r * b * b, blk, rows_ok, b, 0, True, KS, BB, DOT_DTYPE, USE_DOT,
                                 IEEE, ACC)                                         # [p, n, q]: B_f^T g
                if f > 0:
                    g = _onepass_move(du.to(DOT_DTYPE), to_rows, m2, False, NR, BB, BN)  # output grad of f - 1
                else:
                    _store_tile(dx_ptr, n64, fx, stride_dxn, stride_dxd, du, m3)
    for f in tl.static_range(M):
        if (GRADS >> f) & 1:
            if f == 0:
                acc = acc0
            elif f == 1:
                acc = acc1
            elif f == 2:
                acc = acc2
            else:
                acc = acc3
            _store_partial(dw_ptr + f * n_splits * r * b * b, acc, split, blk, r, b, m2, BB)


class _RowPlan(NamedTuple):
    nr: int      # padded r
    bb: int      # padded b
    ks: int      # pieces a factor's blocks are loaded in
    esize: int   # bytes of a dot input on a GPU

    @property
    def grad_elems(self) -> int:
        return self.nr * self.bb * self.bb


def _pieces(rows: int, bb: int) -> int | None:
    """Fewest pieces in {1, 2, 4} along K (each >= 16 wide for tl.dot) that keep one piece of ``rows`` blocks within
    ``ONEPASS_MAX_BLOCK_ELEMS``; None when no split does."""
    for ks in (1, 2, 4):
        if ks > 1 and bb // ks < 16:
            break
        if rows * (bb // ks) * bb <= ONEPASS_MAX_BLOCK_ELEMS:
            return ks
    return None


def row_plan(r: int, b: int, esize: int = 2) -> _RowPlan | None:
    """The whole-row tiling (all ``d = r*b`` features of a token tile on chip) for dot inputs of ``esize`` bytes, or
    None when a row does not fit (padded features above ``ONEPASS_MAX_TILE``, or a factor's blocks not within
    ``ONEPASS_MAX_BLOCK_ELEMS`` even in 4 pieces)."""
    nr, bb = max(2, triton.next_power_of_2(r)), max(2, triton.next_power_of_2(b))
    ks = _pieces(nr, bb)
    if nr * bb > ONEPASS_MAX_TILE[esize] or ks is None:
        return None
    return _RowPlan(nr, bb, ks, esize)


def _row_block_n(feats: int, esize: int, n_tok: int) -> int:
    if _interpreting():
        return max(16, min(64, triton.next_power_of_2(max(n_tok, 1))))
    if esize > 2:
        return 16
    return 64 if feats <= 256 else (32 if feats <= 512 else 16)


def _row_consts(plan: _RowPlan, x, w, linear_out, m, block_n, tiles):
    dot_dtype, ieee = _dot_config(x.dtype, w.dtype)
    elems = plan.nr * plan.bb * block_n
    return dict(TILES=tiles, M=m, LINEAR_OUT=bool(linear_out), KS=plan.ks, NR=plan.nr, BB=plan.bb, BN=block_n,
                DOT_DTYPE=dot_dtype, IEEE=ieee, ACC=tl.float64 if dot_dtype == tl.float64 else tl.float32,
                USE_DOT=plan.bb >= 16, num_warps=4 if elems <= 8192 else (8 if elems <= 16384 else 16),
                num_stages=1)  # the blocks are loaded inside the token loop: no multi-buffered copies


def _stack(blocks) -> torch.Tensor:
    return torch.stack([B.contiguous() for B in blocks]).contiguous()


def gs_row(x: torch.Tensor, blocks, linear_out: bool = True) -> torch.Tensor:
    """``B_m P ... P B_1 x`` (``P^T`` of it without ``linear_out``: GSOFT's ``P^T L P R x`` for ``[R, L]``) in one
    pass over whole rows; ValueError when the shape has no :func:`row_plan` or m > ``MAX_CHAIN``."""
    blocks = list(blocks)
    r, b, _ = blocks[0].shape
    plan = row_plan(r, b, dot_bytes(x.dtype, blocks[0].dtype))
    if plan is None or not 1 <= len(blocks) <= MAX_CHAIN:
        raise ValueError(f"r={r}, b={b}, m={len(blocks)}: no whole-row one-pass plan (ONEPASS_MAX_TILE, "
                         f"ONEPASS_MAX_BLOCK_ELEMS, MAX_CHAIN={MAX_CHAIN})")
    W = _stack(blocks)

    def launch(x2, y2, n_tok):
        block_n = _row_block_n(plan.nr * plan.bb, plan.esize, n_tok)
        n_tiles = triton.cdiv(n_tok, block_n)
        tiles = _loop_count(n_tiles, 1, 8 * _n_sm(x.device))
        _row_fwd_kernel[(triton.cdiv(n_tiles, tiles),)](
            x2, W, y2, n_tok, r, b, x2.stride(0), x2.stride(1), y2.stride(0), y2.stride(1),
            **_row_consts(plan, x, blocks[0], linear_out, len(blocks), block_n, tiles),
        )
    return _per_token(x, r * b, launch)


def row_backward_groups(r: int, b: int, m: int, esize: int = 2) -> list | None:
    """The factors whose block gradients each kernel of :func:`gs_row_backward` accumulates: as many consecutive
    factors per kernel as ``ROW_MAX_GRAD_ELEMS`` holds (one kernel, x and dy read once, when all m fit; each
    further kernel reads x and dy again); None when one factor's do not fit (no one-pass backward)."""
    plan = row_plan(r, b, esize)
    if plan is None or not 1 <= m <= MAX_CHAIN:
        return None
    per = ROW_MAX_GRAD_ELEMS // plan.grad_elems
    if per < 1:
        return None
    return [list(range(f, min(f + per, m))) for f in range(0, m, per)]


def gs_row_backward(grad: torch.Tensor, x: torch.Tensor, blocks, linear_out: bool = True):
    """``(dx, [dB_1..dB_m])`` of :func:`gs_row`: x and dy read once and dx written once when the m factors'
    block-gradient accumulators fit on chip, else one kernel per group of factors (:func:`row_backward_groups`)."""
    blocks = list(blocks)
    r, b, _ = blocks[0].shape
    m = len(blocks)
    esize = dot_bytes(x.dtype, blocks[0].dtype)
    groups = row_backward_groups(r, b, m, esize)
    if groups is None:
        raise ValueError(f"r={r}, b={b}, m={m}: no whole-row one-pass backward (ONEPASS_MAX_TILE, "
                         f"ONEPASS_MAX_BLOCK_ELEMS, ROW_MAX_GRAD_ELEMS={ROW_MAX_GRAD_ELEMS}, MAX_CHAIN)")
    plan = row_plan(r, b, esize)
    g2, x2 = _as_2d(grad), _as_2d(x)
    n_tok = x2.shape[0]
    dx2 = torch.empty(x2.shape, dtype=grad.dtype, device=x.device)
    if n_tok == 0:
        return dx2.reshape(x.shape), [torch.zeros((r, b, b), dtype=B.dtype, device=x.device) for B in blocks]
    W = _stack(blocks)
    block_n = _row_block_n(plan.nr * plan.bb, plan.esize, n_tok)
    n_tiles = triton.cdiv(n_tok, block_n)
    tiles = _loop_count(n_tiles, 1, 4 * _n_sm(x.device))
    if not _interpreting():
        tiles = max(tiles, _min_tiles_for_partials(plan.bb, block_n, n_tiles, 1, _n_sm(x.device)))
    splits = triton.cdiv(n_tiles, tiles)
    acc_dtype = torch.float64 if torch.float64 in (x.dtype, grad.dtype) else torch.float32
    dw = torch.empty((m, splits, r, b, b), dtype=acc_dtype, device=x.device)
    args = (g2, x2, W, dx2, dw, n_tok, r, b, splits,
            g2.stride(0), g2.stride(1), x2.stride(0), x2.stride(1), dx2.stride(0), dx2.stride(1))
    consts = _row_consts(plan, x, blocks[0], linear_out, m, block_n, tiles)
    for fs in groups:
        _row_bwd_kernel[(splits,)](*args, GRADS=sum(1 << f for f in fs), LOW=fs[0], WITH_DX=fs[0] == 0, **consts)
    return dx2.reshape(x.shape), [dw[f].sum(0).to(B.dtype) for f, B in enumerate(blocks)]


# ----------------------------------------------------------------------------- one-pass band apply in chunks
#
# A band super group of b = 64 (the b R-blocks j = q*k + s and the b L-blocks p = s*b + u, 4096
# features) is too large to hold R x, L P R x and both factors' blocks on chip together.  The chunk
# kernel holds the loaded side, x as [q, tokens, v] (b x BN x b), and produces the output UC L-blocks
# at a time: entries u = c*UC..c*UC+UC of every R-block, t[q, n, u] = (R_q x_q)[u] (a [b, BN, UC] piece
# of R x: the rows of the R-blocks that feed those L-blocks, so R x is computed once in total), the
# permutation as a transpose of that piece to [u, n, q], the UC L-blocks on it, and a store of their
# outputs (runs of UC contiguous features of y).  Both products stream their blocks in KS pieces along
# K.  x is read once and y written once.  The transposed kernel (``TRANSPOSED``: dy loaded as
# [u, tokens, i], L^T, P^T, R^T in chunks of UC R-blocks, dx stored) is the input gradient
# ``dx = Q^T dy`` in one pass over dy and dx.
#
# Tiles for b = 64, fp16/bf16: BN = 16 tokens, UC = 16 L-blocks per chunk, KS = 4 pieces, 16 warps, one
# pipeline stage.  On chip per program (sm_90: 227 KB of shared memory and 256 KB of registers per SM):
# the loaded tile 64 x 16 x 64 x 2 B = 128 KB; a piece of R x (64 x 16 x 16, float32) 64 KB; the chunk's
# L outputs (16 x 16 x 64, float32) 64 KB; a weight piece 64 x 16 x 16 x 2 B = 32 KB.  Compiled for sm_90
# (tests/test_triton_compile.py) it uses 224 KB of shared memory (229376 B) and ptxas reports a
# 3.7 KB stack frame per thread (6.5 KB of spill stores): a GPU run should time it against the
# two-launch path before relying on it.
#
# The row kernels for b = 64 (r = 16, KS = 2, BN = 16, 16 warps) compile to 128 KB of shared memory
# (forward); a three-factor chain backward at r = 48, b = 16 to 160 KB with a 19 KB stack frame per
# thread (its three block-gradient accumulators of 16K floats each spill).

CHUNK_MAX_TILE = {2: 4096, 4: 2048, 8: 1024}  # padded features of a chunked band super group (b x b)
CHUNK_UC = 16


@triton.jit
def _chunk_kernel(
    x_ptr, w1_ptr, w2_ptr, y_ptr,
    N, r, b, k, n_super,
    stride_xn, stride_xd, stride_yn, stride_yd,
    TILES: tl.constexpr, TRANSPOSED: tl.constexpr, LINEAR_OUT: tl.constexpr, UC: tl.constexpr, KS: tl.constexpr,
    BB: tl.constexpr, BN: tl.constexpr,
    DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr, ACC: tl.constexpr, USE_DOT: tl.constexpr,
):
    """``y = P^T L P R x`` (``L P R x`` with ``LINEAR_OUT``; with ``TRANSPOSED`` the transposed map, ``x`` being dy,
    ``w1`` L and ``w2`` R) for band super group ``s`` x ``TILES`` token tiles."""
    s, pid_n = _program_split(n_super)
    j = tl.arange(0, BB)
    v = tl.arange(0, BB)
    rows_ok = j < b
    m2 = rows_ok[:, None] & (v < b)[None, :]
    uu = tl.arange(0, UC)
    if TRANSPOSED:  # load dy as L-block u rows, store dx as R-block rows
        if LINEAR_OUT:
            fin = ((s * b + j)[:, None] * b + v[None, :]).to(tl.int64)
        else:
            fin = (v[None, :] * r + s * b + j[:, None]).to(tl.int64)
        blk1 = (s * b + j).to(tl.int64)
    else:
        fin = (j[:, None] * r + s * b + v[None, :]).to(tl.int64)
        blk1 = (j * k + s).to(tl.int64)
    for t in range(0, TILES):
        n64, m3 = _split_token_tile(pid_n, t, N, m2, TILES, BN)
        a = _load_tile(x_ptr, n64, fin, stride_xn, stride_xd, m3).to(DOT_DTYPE)            # [rows, n, entries]
        for c in range(0, BB // UC):
            tc = _bmm_pieces(a, w1_ptr, blk1, rows_ok, b, c * UC, TRANSPOSED, KS, UC, DOT_DTYPE, USE_DOT, IEEE,
                             ACC)                                                            # [rows, n, UC]
            ac = tl.permute(tc.to(DOT_DTYPE), (2, 1, 0))                                     # [UC, n, rows]
            row2 = c * UC + uu
            ok2 = row2 < b
            if TRANSPOSED:
                blk2 = (row2 * k + s).to(tl.int64)
                fout = (row2[:, None] * r + s * b + v[None, :]).to(tl.int64)
            else:
                blk2 = (s * b + row2).to(tl.int64)
                if LINEAR_OUT:
                    fout = ((s * b + row2)[:, None] * b + v[None, :]).to(tl.int64)
                else:
                    fout = (v[None, :] * r + s * b + row2[:, None]).to(tl.int64)
            z = _bmm_pieces(ac, w2_ptr, blk2, ok2, b, 0, TRANSPOSED, KS, BB, DOT_DTYPE, USE_DOT, IEEE, ACC)
            m3c = (ok2[:, None] & (v < b)[None, :])[:, None, :] & (n64 < N)[None, :, None]
            _store_tile(y_ptr, n64, fout, stride_yn, stride_yd, z, m3c)


class _ChunkPlan(NamedTuple):
    k: int        # r // b: super groups
    bb: int       # padded b
    uc: int       # output blocks per chunk
    ks: int       # pieces the blocks are loaded in
    esize: int


def chunk_plan(r: int, b: int, esize: int = 2) -> _ChunkPlan | None:
    """The chunked band tiling (``r % b == 0``, b >= 16) for dot inputs of ``esize`` bytes, or None."""
    bb = triton.next_power_of_2(b)
    if r % b or b < 16 or bb * bb > CHUNK_MAX_TILE[esize]:
        return None
    uc = min(CHUNK_UC, bb)
    ks = next((ks for ks in (1, 2, 4) if bb // ks >= 16 and bb * (bb // ks) * uc <= 16384), 4 if bb >= 64 else 1)
    return _ChunkPlan(r // b, bb, uc, ks, esize)


def gs_chunked(x: torch.Tensor, L: torch.Tensor, R: torch.Tensor, linear_out: bool = False,
               transposed: bool = False) -> torch.Tensor:
    """``P^T L P R x`` (``L P R x`` with ``linear_out``; with ``transposed`` its transpose applied to ``x``) in one
    pass by chunks of L-blocks (:func:`chunk_plan`); ValueError where there is no chunk plan."""
    r, b, _ = R.shape
    plan = chunk_plan(r, b, dot_bytes(x.dtype, L.dtype))
    if plan is None:
        raise ValueError(f"r={r}, b={b}: no chunked one-pass plan (r % b == 0, b >= 16, CHUNK_MAX_TILE)")
    w1, w2 = (L, R) if transposed else (R, L)

    def launch(x2, y2, n_tok):
        block_n = 16 if not _interpreting() else max(16, min(64, triton.next_power_of_2(n_tok)))
        n_tiles = triton.cdiv(n_tok, block_n)
        tiles = _loop_count(n_tiles, plan.k, 8 * _n_sm(x.device))
        dot_dtype, ieee = _dot_config(x.dtype, L.dtype)
        _chunk_kernel[(plan.k * triton.cdiv(n_tiles, tiles),)](
            x2, w1.contiguous(), w2.contiguous(), y2, n_tok, r, b, plan.k, plan.k,
            x2.stride(0), x2.stride(1), y2.stride(0), y2.stride(1),
            TILES=tiles, TRANSPOSED=bool(transposed), LINEAR_OUT=bool(linear_out), UC=plan.uc, KS=plan.ks,
            BB=plan.bb, BN=block_n, DOT_DTYPE=dot_dtype, IEEE=ieee,
            ACC=tl.float64 if dot_dtype == tl.float64 else tl.float32, USE_DOT=True, num_warps=16, num_stages=1,
        )
    return _per_token(x, r * b, launch)
