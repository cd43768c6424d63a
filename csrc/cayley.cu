// Batched Cayley transform of skew blocks: Q = (I + K)(I - K)^{-1} = 2M - I, M = (I - K)^{-1}.
//
// One CUDA block per b x b matrix. Forward: A = I - K in shared memory, inverted
// in place by Gauss-Jordan without pivoting (stable for skew K, SPEC), M saved in
// float32 for the backward. Backward: dK = 2 M^T G M^T (SPEC), reusing M.
// Torch-free: compiles with `nvcc -arch=sm_90 -c csrc/cayley.cu` (no include flags needed).
#include <algorithm>

#include "include/gsops/block_math.cuh"
#include "include/gsops/dtype.cuh"
#include "include/gsops/kernels.h"
#include "include/gsops/launch.cuh"

namespace gsops {
namespace {

inline int threads_for(int b) { return std::min(256, std::max(32, ((b * b + 31) / 32) * 32)); }

// Shared memory: A (b*b) then col (b).
template <typename T>
__global__ void cayley_forward_kernel(const T* __restrict__ K, float* __restrict__ M, T* __restrict__ Q, int b) {
  extern __shared__ float smem[];
  float* A = smem;
  float* col = smem + b * b;
  const int64_t off = (int64_t)blockIdx.x * b * b;
  const int bb = b * b;
  for (int e = threadIdx.x; e < bb; e += blockDim.x) A[e] = eye_minus(to_float(K[off + e]), e, b);
  __syncthreads();
  for (int p = 0; p < b; ++p) {
    gj_save_column(A, col, b, p, threadIdx.x, blockDim.x);
    __syncthreads();
    gj_scale_row(A, col, b, p, threadIdx.x, blockDim.x);
    __syncthreads();
    gj_eliminate(A, col, b, p, threadIdx.x, blockDim.x);
    __syncthreads();
  }
  for (int e = threadIdx.x; e < bb; e += blockDim.x) {
    M[off + e] = A[e];
    Q[off + e] = from_float<T>(cayley_from_inverse(A[e], e, b));
  }
}

// Shared memory: Ms (b*b, M) then Ts (b*b, G M^T).
template <typename T>
__global__ void cayley_backward_kernel(const float* __restrict__ M, const T* __restrict__ G, T* __restrict__ dK, int b) {
  extern __shared__ float smem[];
  float* Ms = smem;
  float* Ts = smem + b * b;
  const int64_t off = (int64_t)blockIdx.x * b * b;
  const int bb = b * b;
  for (int e = threadIdx.x; e < bb; e += blockDim.x) Ms[e] = M[off + e];
  __syncthreads();
  // Ts = G M^T, G read from global memory (each row of G is reused by b threads through the cache).
  for (int e = threadIdx.x; e < bb; e += blockDim.x) {
    const int i = e / b, j = e % b;
    float acc = 0.f;
    for (int k = 0; k < b; ++k) acc += to_float(G[off + (int64_t)i * b + k]) * Ms[j * b + k];
    Ts[e] = acc;
  }
  __syncthreads();
  // dK = 2 M^T Ts
  for (int e = threadIdx.x; e < bb; e += blockDim.x) {
    dK[off + e] = from_float<T>(2.f * matmul_entry(Ms, Ts, b, e / b, e % b, true, false));
  }
}

}  // namespace

cudaError_t cayley_forward(DType dt, const void* K, float* M, void* Q, int64_t n_mats, int b, cudaStream_t stream) {
  if (b < 1 || b > kMaxBlock || n_mats < 0 || n_mats > 0x7fffffffLL) return cudaErrorInvalidValue;
  if (n_mats == 0) return cudaSuccess;
  const size_t smem = sizeof(float) * ((size_t)b * b + b);
  return dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    auto kernel = cayley_forward_kernel<T>;
    cudaError_t err = ensure_dynamic_smem(kernel, smem);
    if (err != cudaSuccess) return err;
    kernel<<<(unsigned)n_mats, threads_for(b), smem, stream>>>(static_cast<const T*>(K), M, static_cast<T*>(Q), b);
    return cudaGetLastError();
  });
}

cudaError_t cayley_backward(DType dt, const float* M, const void* G, void* dK, int64_t n_mats, int b,
                            cudaStream_t stream) {
  if (b < 1 || b > kMaxBlock || n_mats < 0 || n_mats > 0x7fffffffLL) return cudaErrorInvalidValue;
  if (n_mats == 0) return cudaSuccess;
  const size_t smem = sizeof(float) * 2 * (size_t)b * b;
  return dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    auto kernel = cayley_backward_kernel<T>;
    cudaError_t err = ensure_dynamic_smem(kernel, smem);
    if (err != cudaSuccess) return err;
    kernel<<<(unsigned)n_mats, threads_for(b), smem, stream>>>(M, static_cast<const T*>(G), static_cast<T*>(dK), b);
    return cudaGetLastError();
  });
}

}  // namespace gsops
