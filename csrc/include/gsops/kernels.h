// gsops CUDA launchers: plain pointers and sizes, no torch (bound in csrc/bindings.cpp).
//
// All tensors are contiguous. Element type `dt` applies to the activations
// (x, y, K, Q, G, dK); block matrices, M and conv weights are float32 (the
// binding converts them), and every kernel accumulates in float32.
// Each launcher validates its sizes, launches on `stream` and returns the
// launch status (cudaSuccess, cudaErrorInvalidValue for bad sizes).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "common.cuh"
#include "index.cuh"

namespace gsops {

constexpr int kMaxBlock = 128;  // largest block size b the GS and Cayley kernels take

// ---- fused block-diagonal x permutation (gs_apply.cu) ---------------------
// y = P^out_mode diag(B_1..B_r) P^in_mode x for every row of x (n_tokens, r*b);
// with transpose_blocks the blocks are B_k^T. The permutations are index
// arithmetic on the loads and stores (index.cuh), never a copy.
// Input backward of this op is the same launcher with
// (in, out, transpose) -> (inverse(out), inverse(in), !transpose).
cudaError_t block_diag_perm(DType dt, const void* x, const float* blocks, void* y, int64_t n_tokens, int r, int b,
                            int in_mode, int out_mode, bool transpose_blocks, cudaStream_t stream);

// Block gradient of y = P^out diag(B) P^in x: dB_acc[k][i][j] += sum_t dy[t, dst(k b + i)] x[t, src(k b + j)],
// src = gather_index(in_mode), dst = scatter_index(out_mode). dB_acc is float32 (r, b, b), zeroed by the caller.
cudaError_t block_diag_perm_grad_blocks(DType dt, const void* dy, const void* x, float* dB_acc, int64_t n_tokens,
                                        int r, int b, int in_mode, int out_mode, cudaStream_t stream);

// ---- two factors in one pass (gs_pair.cu) ------------------------------------
// The groups of perm(r, r*b): r % b == 0 ("band"): r / b closed groups of b R-blocks and b L-blocks
// (b*b features); otherwise one group, the whole row (r*b features).
struct PairGroups {
  bool band;
  int nrows;     // R-blocks (= L-blocks) per group: b (band) or r
  int k;         // r / b (band) or 1
  int n_groups;  // r / b (band) or 1
  int features;  // nrows * b
};
GSOPS_HD PairGroups pair_groups(int r, int b) {
  PairGroups g;
  g.band = r % b == 0;
  g.nrows = g.band ? b : r;
  g.k = g.band ? r / b : 1;
  g.n_groups = g.band ? r / b : 1;
  g.features = g.nrows * b;
  return g;
}
// Whether a group of (r, b) fits a CUDA block's shared memory (else the caller uses block_diag_perm).
bool gs_pair_fits(int r, int b);
// How many of the two block gradients one gs_pair_grad launch can accumulate on chip: 2, 1 or 0.
int gs_pair_grad_factors_per_pass(int r, int b);
// Token splits of gs_pair_grad (the first dimension of its partial sums).
int64_t gs_pair_grad_splits(int64_t n_tokens, int r, int b);
// y = P^T L P R x (linear_out: L P R x) for every row of x (n_tokens, r*b), one pass; transposed: the
// transposed map applied to x (x is dy, y is dx = R^T P^T L^T P dy). R, L float32 (r, b, b).
cudaError_t gs_pair(DType dt, const void* x, const float* R, const float* L, void* y, int64_t n_tokens, int r, int b,
                    bool linear_out, bool transposed, cudaStream_t stream);
// Backward of gs_pair from one read of x and dy: dx (when not null) and the partial block gradients
// dl_part / dr_part (each when not null; float32 (splits, r, b, b), every entry written; their sum over
// the splits is dL / dR). At most gs_pair_grad_factors_per_pass(r, b) of the two per launch.
cudaError_t gs_pair_grad(DType dt, const void* dy, const void* x, const float* R, const float* L, void* dx,
                         float* dl_part, float* dr_part, int64_t n_tokens, int r, int b, int64_t splits,
                         bool linear_out, cudaStream_t stream);

// gs_chain forward y = B_m P ... P B_1 x over whole rows in one pass (gs_pair.cu); W float32 (m, r, b, b).
bool gs_chain_rows_fits(int r, int b);
cudaError_t gs_chain_rows(DType dt, const void* x, const float* W, void* y, int64_t n_tokens, int r, int b, int m,
                          cudaStream_t stream);
// Backward of gs_chain_rows from one read of x and dy per launch: dx (when not null) and the partial block
// gradients of the factors in the bit mask `grads` (bit f: factor f), dw_part float32 (n, splits, r, b, b) for
// the n factors in increasing order (every entry written; the sum over the splits is dB_f). At most
// gs_chain_rows_grad_factors_per_pass(r, b, m) factors per launch (0: no whole-row backward fits).
int gs_chain_rows_grad_factors_per_pass(int r, int b, int m);
int64_t gs_chain_rows_grad_splits(int64_t n_tokens, int r, int b);
cudaError_t gs_chain_rows_grad(DType dt, const void* dy, const void* x, const float* W, void* dx, float* dw_part,
                               int64_t n_tokens, int r, int b, int m, int64_t splits, unsigned grads,
                               cudaStream_t stream);

// ---- batched Cayley (cayley.cu) ---------------------------------------------
// For each of n_mats skew b x b blocks K: M = (I - K)^{-1} (float32, saved for
// backward) by Gauss-Jordan without pivoting in shared memory, Q = 2 M - I.
cudaError_t cayley_forward(DType dt, const void* K, float* M, void* Q, int64_t n_mats, int b, cudaStream_t stream);
// dK = 2 M^T G M^T for G = dL/dQ (SPEC "Orthogonal blocks").
cudaError_t cayley_backward(DType dt, const float* M, const void* G, void* dK, int64_t n_mats, int b,
                            cudaStream_t stream);

// ---- grouped convolution exponential (conv_exp.cu) -------------------------
// y = sum_{n=0..terms} L^n x / n!, L the grouped conv with weight w (C, C/groups, kh, kw),
// stride 1, zero "same" padding, odd kh and kw; x, y (N, C, H, W). adjoint: L^T instead.
struct ConvShape {
  int64_t N;
  int C, H, W, groups, kh, kw;
};

// Float32 workspace (elements) conv_exp_forward needs: 0 when the fused kernel
// keeps every Taylor term in shared memory, else 3 N C H W.
size_t conv_exp_forward_workspace(const ConvShape& s, int device);
// Whether the fused (on-chip) kernel takes this shape on `device`.
bool conv_exp_fused_fits(const ConvShape& s, int device);
cudaError_t conv_exp_forward(DType dt, const void* x, const float* w, void* y, float* workspace, const ConvShape& s,
                             int terms, bool adjoint, int device, cudaStream_t stream);

// Weight gradient of y = exp(L) x for dy = dL/dy (x, dy float32): with a_m = L^m x and
// c_{terms-1} = dy / terms!, c_m = dy / (m+1)! + L^T c_{m+1},
// dw = sum_{m=0..terms-1} corr(c_m, a_m). dw_acc float32, zeroed by the caller.
size_t conv_exp_weight_grad_workspace(const ConvShape& s, int terms);
cudaError_t conv_exp_weight_grad(const float* x, const float* dy, const float* w, float* dw_acc, float* workspace,
                                 const ConvShape& s, int terms, cudaStream_t stream);

}  // namespace gsops
