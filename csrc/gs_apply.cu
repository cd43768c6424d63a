// Fused block-diagonal x permutation: y = P^out diag(B_1..B_r) P^in x, row by row.
//
// Forward, input backward (same kernel: transposed blocks, inverse permutations,
// STYLE habit 6) and block gradient (per-block reduction over tokens). The
// permutation is index arithmetic on the loads/stores (index.cuh), never a copy.
// Torch-free: compiles with `nvcc -arch=sm_90 -c csrc/gs_apply.cu` (no include flags needed).
#include <algorithm>

#include "include/gsops/block_math.cuh"
#include "include/gsops/dtype.cuh"
#include "include/gsops/gs_tiles.cuh"
#include "include/gsops/kernels.h"

namespace gsops {
namespace {

constexpr int kThreads = 256;

// Tokens per CUDA block: at least 1024 outputs (4 per thread) and at least 64 tokens, so that
// the b*b block loaded into shared memory is reused by 64+ tokens (b = 128: 96 KiB of shared memory).
inline int tokens_per_tile(int b) { return std::max(64, 1024 / b); }

// One CUDA block = one diagonal block k x one tile of `tile` tokens.
// Shared memory: Bt (b*b, block k transposed, fp32) then xs (tile*b, gathered inputs, fp32).
template <typename T>
__global__ void block_diag_perm_kernel(const T* __restrict__ x, const float* __restrict__ blocks, T* __restrict__ y,
                                       int64_t n_tokens, int r, int b, int tile, int in_mode, int out_mode,
                                       bool transpose_blocks) {
  extern __shared__ float smem[];
  float* Bt = smem;
  float* xs = smem + b * b;
  const int k = blockIdx.x % r;  // consecutive CUDA blocks share a token tile: their gathers hit the same lines
  const int64_t t0 = (int64_t)(blockIdx.x / r) * tile;
  bdp_load_tile(x, blocks, Bt, xs, n_tokens, r, b, tile, k, t0, in_mode, transpose_blocks, threadIdx.x, blockDim.x);
  __syncthreads();
  bdp_store_tile(Bt, xs, y, n_tokens, r, b, tile, k, t0, out_mode, threadIdx.x, blockDim.x);
}

constexpr int kGradTile = 32;             // tokens staged per step
constexpr int kGradTokensPerBlock = 512;  // tokens one CUDA block reduces

// One CUDA block = one diagonal block k x one chunk of tokens; its partial dB_k goes to dB_acc by atomicAdd.
// Shared memory: gs (kGradTile*b, output grads) and xs (kGradTile*b, inputs), both gathered, then acc (b*b);
// thread tid owns acc entries tid, tid + blockDim, ... (no two threads touch one entry).
template <typename T>
__global__ void block_grad_kernel(const T* __restrict__ dy, const T* __restrict__ x, float* __restrict__ dB,
                                  int64_t n_tokens, int r, int b, int in_mode, int out_mode) {
  extern __shared__ float smem[];
  float* gs = smem;
  float* xs = smem + kGradTile * b;
  float* acc = smem + 2 * kGradTile * b;
  const int k = blockIdx.x % r;
  const int64_t chunk0 = (int64_t)(blockIdx.x / r) * kGradTokensPerBlock;
  const int64_t chunk1 = min(chunk0 + kGradTokensPerBlock, n_tokens);
  const int bb = b * b;
  for (int e = threadIdx.x; e < bb; e += blockDim.x) acc[e] = 0.f;
  for (int64_t t0 = chunk0; t0 < chunk1; t0 += kGradTile) {
    __syncthreads();
    bgrad_load_tile(dy, x, gs, xs, chunk1, r, b, kGradTile, k, t0, in_mode, out_mode, threadIdx.x, blockDim.x);
    __syncthreads();
    const int nt = (int)min((int64_t)kGradTile, chunk1 - t0);
    for (int e = threadIdx.x; e < bb; e += blockDim.x) acc[e] += bgrad_tile_entry(gs, xs, b, nt, e);
  }
  for (int e = threadIdx.x; e < bb; e += blockDim.x) atomicAdd(&dB[(int64_t)k * bb + e], acc[e]);
}

bool valid_modes(int in_mode, int out_mode) {
  return in_mode >= PERM_NONE && in_mode <= PERM_PT && out_mode >= PERM_NONE && out_mode <= PERM_PT;
}

}  // namespace

cudaError_t block_diag_perm(DType dt, const void* x, const float* blocks, void* y, int64_t n_tokens, int r, int b,
                            int in_mode, int out_mode, bool transpose_blocks, cudaStream_t stream) {
  if (r < 1 || b < 1 || b > kMaxBlock || n_tokens < 0 || !valid_modes(in_mode, out_mode)) return cudaErrorInvalidValue;
  if (n_tokens == 0) return cudaSuccess;
  const int tile = tokens_per_tile(b);
  const int64_t grid = ceil_div(n_tokens, tile) * r;
  if (grid > 0x7fffffffLL) return cudaErrorInvalidValue;
  const size_t smem = sizeof(float) * ((size_t)b * b + (size_t)tile * b);
  return dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    auto kernel = block_diag_perm_kernel<T>;
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (err != cudaSuccess) return err;
    kernel<<<(unsigned)grid, kThreads, smem, stream>>>(static_cast<const T*>(x), blocks, static_cast<T*>(y), n_tokens,
                                                       r, b, tile, in_mode, out_mode, transpose_blocks);
    return cudaGetLastError();
  });
}

cudaError_t block_diag_perm_grad_blocks(DType dt, const void* dy, const void* x, float* dB_acc, int64_t n_tokens,
                                        int r, int b, int in_mode, int out_mode, cudaStream_t stream) {
  if (r < 1 || b < 1 || b > kMaxBlock || n_tokens < 0 || !valid_modes(in_mode, out_mode)) return cudaErrorInvalidValue;
  if (n_tokens == 0) return cudaSuccess;
  const int64_t grid = ceil_div(n_tokens, kGradTokensPerBlock) * r;
  if (grid > 0x7fffffffLL) return cudaErrorInvalidValue;
  const size_t smem = sizeof(float) * (2 * (size_t)kGradTile * b + (size_t)b * b);
  return dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    auto kernel = block_grad_kernel<T>;
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (err != cudaSuccess) return err;
    kernel<<<(unsigned)grid, kThreads, smem, stream>>>(static_cast<const T*>(dy), static_cast<const T*>(x), dB_acc,
                                                       n_tokens, r, b, in_mode, out_mode);
    return cudaGetLastError();
  });
}

}  // namespace gsops
