// Per-block math shared by the kernels and the host test (torch-free, host and device).
//
// The cooperative functions take (tid, nthreads): a CUDA block calls them with
// (threadIdx.x, blockDim.x) and a __syncthreads() between calls; the host test
// calls the same functions with (0, 1), so it checks the code the GPU runs.
#pragma once

#include "common.cuh"

namespace gsops {

// ---------------------------------------------------------------------------
// Block-diagonal product: one output entry.
// z[i] = sum_j Bt[j * b + i] * x[j], with Bt the block stored transposed
// (Bt[j * b + i] = B[i][j]) so consecutive threads (consecutive i) read
// consecutive shared-memory words.
GSOPS_HD float block_row_dot(const float* Bt, const float* x, int b, int i) {
  float acc = 0.f;
  for (int j = 0; j < b; ++j) acc += Bt[j * b + i] * x[j];
  return acc;
}

// ---------------------------------------------------------------------------
// Small dense matmuls on row-major n x n fp32 matrices: one entry (i, j) of
// op(A) op(B), op = transpose when the flag is set.
GSOPS_HD float matmul_entry(const float* A, const float* B, int n, int i, int j, bool ta, bool tb) {
  float acc = 0.f;
  for (int k = 0; k < n; ++k) {
    const float a = ta ? A[k * n + i] : A[i * n + k];
    const float bb = tb ? B[j * n + k] : B[k * n + j];
    acc += a * bb;
  }
  return acc;
}

// ---------------------------------------------------------------------------
// In-place Gauss-Jordan inverse without pivoting of an n x n row-major matrix A.
// Valid for A = I - K with K skew (SPEC: its symmetric part is I, so every
// leading principal minor is >= 1 and no pivot is zero). One pivot step p is
//   (1) gj_save_column   col[i] = A[i][p]                           -- sync --
//   (2) gj_scale_row     A[p][j] = (j == p ? 1 : A[p][j]) / col[p]  -- sync --
//   (3) gj_eliminate     A[i][j] = (j == p ? 0 : A[i][j]) - col[i] A[p][j], i != p  -- sync --
// After steps p = 0..n-1, A holds A^{-1}.
GSOPS_HD void gj_save_column(const float* A, float* col, int n, int p, int tid, int nthreads) {
  for (int i = tid; i < n; i += nthreads) col[i] = A[i * n + p];
}

GSOPS_HD void gj_scale_row(float* A, const float* col, int n, int p, int tid, int nthreads) {
  const float pinv = 1.f / col[p];
  for (int j = tid; j < n; j += nthreads) A[p * n + j] = (j == p ? 1.f : A[p * n + j]) * pinv;
}

GSOPS_HD void gj_eliminate(float* A, const float* col, int n, int p, int tid, int nthreads) {
  for (int e = tid; e < n * n; e += nthreads) {
    const int i = e / n, j = e % n;
    if (i == p) continue;
    A[e] = (j == p ? 0.f : A[e]) - col[i] * A[p * n + j];
  }
}

// Sequential inverse (host test, and documentation of the step order).
GSOPS_HD void gj_inverse_serial(float* A, float* col, int n) {
  for (int p = 0; p < n; ++p) {
    gj_save_column(A, col, n, p, 0, 1);
    gj_scale_row(A, col, n, p, 0, 1);
    gj_eliminate(A, col, n, p, 0, 1);
  }
}

// A = I - K for entry e of an n x n block.
GSOPS_HD float eye_minus(float k, int e, int n) { return (e / n == e % n ? 1.f : 0.f) - k; }

// Q = 2 M - I for entry e of an n x n block.
GSOPS_HD float cayley_from_inverse(float m, int e, int n) { return 2.f * m - (e / n == e % n ? 1.f : 0.f); }

// ---------------------------------------------------------------------------
// Grouped 2-D convolution (cross-correlation, as torch.nn.functional.conv2d),
// stride 1, zero "same" padding (kh / 2, kw / 2) for odd kernels.
// `in` is one sample's group slice (cg, H, W); `w` the weight of the whole layer
// (C, cg, kh, kw); `g` the group. Returns output channel o (local to the group) at (h, x).
// adjoint: apply L^T instead of L, i.e. the weight transposed within the group and
// flipped in space, w^T[o][i][a][c] = w[g cg + i][o][kh-1-a][kw-1-c].
GSOPS_HD float conv_entry(const float* in, const float* w, int cg, int H, int W, int kh, int kw, int g, int o,
                          int h, int x, bool adjoint) {
  const int ph = kh / 2, pw = kw / 2;
  float acc = 0.f;
  for (int i = 0; i < cg; ++i) {
    for (int a = 0; a < kh; ++a) {
      const int hh = h + a - ph;
      if (hh < 0 || hh >= H) continue;
      for (int c = 0; c < kw; ++c) {
        const int xx = x + c - pw;
        if (xx < 0 || xx >= W) continue;
        const int64_t widx = adjoint
            ? ((int64_t)(g * cg + i) * cg + o) * kh * kw + (int64_t)(kh - 1 - a) * kw + (kw - 1 - c)
            : ((int64_t)(g * cg + o) * cg + i) * kh * kw + (int64_t)a * kw + c;
        acc += w[widx] * in[((int64_t)i * H + hh) * W + xx];
      }
    }
  }
  return acc;
}

// One entry of the weight gradient of the convolution above for one sample:
// dw[g cg + o][i][a][c] += sum_{h,x} gout[o][h][x] * in[i][h + a - ph][x + c - pw]
// (`gout`, `in`: that sample's group slices).
GSOPS_HD float conv_weight_grad_entry(const float* gout, const float* in, int H, int W, int kh, int kw, int o,
                                      int i, int a, int c) {
  const int ph = kh / 2, pw = kw / 2;
  float acc = 0.f;
  for (int h = 0; h < H; ++h) {
    const int hh = h + a - ph;
    if (hh < 0 || hh >= H) continue;
    for (int x = 0; x < W; ++x) {
      const int xx = x + c - pw;
      if (xx < 0 || xx >= W) continue;
      acc += gout[((int64_t)o * H + h) * W + x] * in[((int64_t)i * H + hh) * W + xx];
    }
  }
  return acc;
}

// One Taylor step of the fused conv exponential on one (sample, group) slice of m = cg*H*W
// entries held on chip: nxt = L(cur) / t, acc += nxt (cooperative; a barrier follows, then
// the caller swaps cur and nxt).
GSOPS_HD void conv_exp_term(const float* cur, float* nxt, float* acc, const float* w, int cg, int H, int W, int kh,
                            int kw, int g, int t, bool adjoint, int tid, int nthreads) {
  const float inv = 1.f / (float)t;
  for (int e = tid; e < cg * H * W; e += nthreads) {
    const int o = e / (H * W), h = (e / W) % H, x = e % W;
    const float v = conv_entry(cur, w, cg, H, W, kh, kw, g, o, h, x, adjoint) * inv;
    nxt[e] = v;
    acc[e] += v;
  }
}

}  // namespace gsops
