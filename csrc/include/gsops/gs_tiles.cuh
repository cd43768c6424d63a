// The cooperative pieces of the fused block-diagonal x permutation kernels (host and device).
//
// A CUDA block calls them with (threadIdx.x, blockDim.x) and __syncthreads() between
// a load and the matching compute; the host test calls the same functions with (0, 1).
// Layout of one tile: diagonal block k, tokens t0 .. t0 + tile - 1 of x (n_tokens, r*b).
#pragma once

#include "block_math.cuh"
#include "common.cuh"
#include "index.cuh"
#ifdef __CUDACC__
#include "dtype.cuh"  // fp16/bf16 to_float/from_float, visible before the templates below
#endif

namespace gsops {

// Bt[j b + i] = B_eff[i][j] (B_k, or B_k^T when transpose_blocks);
// xs[tt b + j] = (P^in_mode x)[t0 + tt, k b + j] (0 past the last token).
template <typename T>
GSOPS_HD void bdp_load_tile(const T* x, const float* blocks, float* Bt, float* xs, int64_t n_tokens, int r, int b,
                            int tile, int k, int64_t t0, int in_mode, bool transpose_blocks, int tid, int nthreads) {
  const int64_t d = (int64_t)r * b;
  for (int e = tid; e < b * b; e += nthreads) Bt[e] = blocks[block_entry(k, e % b, e / b, b, transpose_blocks)];
  for (int e = tid; e < tile * b; e += nthreads) {
    const int64_t t = t0 + e / b;
    xs[e] = t < n_tokens ? to_float(x[t * d + gather_index(in_mode, (int64_t)k * b + e % b, r, b)]) : 0.f;
  }
}

// y[t, scatter(out_mode, k b + i)] = sum_j B_eff[i][j] xs[tt b + j]: y = P^out_mode (B P^in_mode x) on this tile.
template <typename T>
GSOPS_HD void bdp_store_tile(const float* Bt, const float* xs, T* y, int64_t n_tokens, int r, int b, int tile, int k,
                             int64_t t0, int out_mode, int tid, int nthreads) {
  const int64_t d = (int64_t)r * b;
  for (int e = tid; e < tile * b; e += nthreads) {
    const int64_t t = t0 + e / b;
    if (t >= n_tokens) continue;
    const int i = e % b;
    y[t * d + scatter_index(out_mode, (int64_t)k * b + i, r, b)] = from_float<T>(block_row_dot(Bt, xs + (e / b) * b, b, i));
  }
}

// Block gradient staging: gs[tt b + i] = dy[t, scatter(out_mode, k b + i)] (the gradient of the block's output),
// xs[tt b + j] = x[t, gather(in_mode, k b + j)] (the block's input), zero for t >= t_end.
template <typename T>
GSOPS_HD void bgrad_load_tile(const T* dy, const T* x, float* gs, float* xs, int64_t t_end, int r, int b, int tile,
                              int k, int64_t t0, int in_mode, int out_mode, int tid, int nthreads) {
  const int64_t d = (int64_t)r * b;
  for (int e = tid; e < tile * b; e += nthreads) {
    const int64_t t = t0 + e / b;
    const int64_t p = (int64_t)k * b + e % b;
    const bool ok = t < t_end;
    gs[e] = ok ? to_float(dy[t * d + scatter_index(out_mode, p, r, b)]) : 0.f;
    xs[e] = ok ? to_float(x[t * d + gather_index(in_mode, p, r, b)]) : 0.f;
  }
}

// Contribution of the staged tokens (nt of them) to dB_k[i][j], e = i b + j.
GSOPS_HD float bgrad_tile_entry(const float* gs, const float* xs, int b, int nt, int e) {
  const int i = e / b, j = e % b;
  float s = 0.f;
  for (int tt = 0; tt < nt; ++tt) s += gs[tt * b + i] * xs[tt * b + j];
  return s;
}

}  // namespace gsops
