// Fused block-diagonal x permutation: y = P^out diag(B_1..B_r) P^in x, row by row.
//
// Two paths for the forward/input-backward product: fp32 FMAs from shared memory
// (every dtype, every b), and tensor cores (WMMA 16x16x16, fp32 accumulation)
// for fp16/bf16 with b % 16 == 0 on sm_80+, the blocks rounded to the input
// dtype. GSOPS_CUDA_NO_MMA=1 forces the FMA path.
//
// Forward, input backward (same kernel: transposed blocks, inverse permutations,
// STYLE habit 6) and block gradient (per-block reduction over tokens). The
// permutation is index arithmetic on the loads/stores (index.cuh), never a copy.
// Torch-free: compiles with `nvcc -arch=sm_90 -c csrc/gs_apply.cu` (no include flags needed).
#include <mma.h>

#include <algorithm>
#include <cstdlib>

#include "include/gsops/block_math.cuh"
#include "include/gsops/dtype.cuh"
#include "include/gsops/gs_tiles.cuh"
#include "include/gsops/kernels.h"
#include "include/gsops/launch.cuh"

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

// ---- tensor-core path (fp16 / bf16, b % 16 == 0) -------------------------------
constexpr int kMmaTile = 64;    // tokens per CUDA block
constexpr int kMmaWarps = 4;

// One CUDA block = diagonal block k x kMmaTile tokens. Y (tile x b) = X (tile x b) B_eff^T.
// Shared memory: Bs (b*b, T, row-major B_eff), xs (tile*b, T, gathered inputs), ys (tile*b, fp32 results).
template <typename T>
__global__ void block_diag_perm_mma_kernel(const T* __restrict__ x, const float* __restrict__ blocks,
                                           T* __restrict__ y, int64_t n_tokens, int r, int b, int in_mode,
                                           int out_mode, bool transpose_blocks) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  namespace wmma = nvcuda::wmma;
  extern __shared__ __align__(128) unsigned char smem_mma[];  // WMMA pointers need 32-byte alignment
  float* ys = reinterpret_cast<float*>(smem_mma);
  T* Bs = reinterpret_cast<T*>(ys + kMmaTile * b);
  T* xs = Bs + b * b;
  const int k = blockIdx.x % r;
  const int64_t t0 = (int64_t)(blockIdx.x / r) * kMmaTile;
  const int64_t d = (int64_t)r * b;
  for (int e = threadIdx.x; e < b * b; e += blockDim.x) {
    Bs[e] = from_float<T>(blocks[block_entry(k, e / b, e % b, b, transpose_blocks)]);
  }
  for (int e = threadIdx.x; e < kMmaTile * b; e += blockDim.x) {
    const int64_t t = t0 + e / b;
    xs[e] = t < n_tokens ? x[t * d + gather_index(in_mode, (int64_t)k * b + e % b, r, b)] : from_float<T>(0.f);
  }
  __syncthreads();
  const int warp = threadIdx.x / 32;
  const int tiles_n = b / 16;
  for (int tile = warp; tile < (kMmaTile / 16) * tiles_n; tile += kMmaWarps) {
    const int m0 = (tile / tiles_n) * 16, n0 = (tile % tiles_n) * 16;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 0.f);
    for (int k0 = 0; k0 < b; k0 += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;  // X[m0.., k0..], ld b
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;  // B_eff^T[k0.., n0..] = Bs[n*b + k]
      wmma::load_matrix_sync(fa, xs + m0 * b + k0, b);
      wmma::load_matrix_sync(fb, Bs + n0 * b + k0, b);
      wmma::mma_sync(acc, fa, fb, acc);
    }
    wmma::store_matrix_sync(ys + m0 * b + n0, acc, b, wmma::mem_row_major);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < kMmaTile * b; e += blockDim.x) {
    const int64_t t = t0 + e / b;
    if (t < n_tokens) y[t * d + scatter_index(out_mode, (int64_t)k * b + e % b, r, b)] = from_float<T>(ys[e]);
  }
#else
  __trap();  // the launcher only picks this kernel on sm_80+
#endif
}

template <typename T> constexpr bool has_mma() { return false; }
template <> constexpr bool has_mma<__half>() { return true; }
template <> constexpr bool has_mma<__nv_bfloat16>() { return true; }

bool mma_enabled(int b) {
  static const bool disabled = [] {
    const char* v = std::getenv("GSOPS_CUDA_NO_MMA");
    return v != nullptr && v[0] != '\0' && v[0] != '0';
  }();
  if (disabled || b % 16 != 0) return false;
  int major = 0;
  return current_cc_major(&major) == cudaSuccess && major >= 8;
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
    if constexpr (has_mma<T>()) {
      if (mma_enabled(b)) {
        auto kernel = block_diag_perm_mma_kernel<T>;
        const size_t smem_mma = sizeof(float) * kMmaTile * b + sizeof(T) * ((size_t)b * b + (size_t)kMmaTile * b);
        cudaError_t err = ensure_dynamic_smem(kernel, smem_mma);
        if (err != cudaSuccess) return err;
        const int64_t grid_mma = ceil_div(n_tokens, kMmaTile) * r;
        kernel<<<(unsigned)grid_mma, kMmaWarps * 32, smem_mma, stream>>>(
            static_cast<const T*>(x), blocks, static_cast<T*>(y), n_tokens, r, b, in_mode, out_mode, transpose_blocks);
        return cudaGetLastError();
      }
    }
    auto kernel = block_diag_perm_kernel<T>;
    cudaError_t err = ensure_dynamic_smem(kernel, smem);
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
    cudaError_t err = ensure_dynamic_smem(kernel, smem);
    if (err != cudaSuccess) return err;
    kernel<<<(unsigned)grid, kThreads, smem, stream>>>(static_cast<const T*>(dy), static_cast<const T*>(x), dB_acc,
                                                       n_tokens, r, b, in_mode, out_mode);
    return cudaGetLastError();
  });
}

}  // namespace gsops
