// Grouped convolution exponential: y = exp(L) x = sum_{n=0..terms} L^n x / n! (SOC / GS-SOC, SPEC).
//
// L is a grouped 2-D convolution (stride 1, zero "same" padding, odd kernel).
// Fused path: one CUDA block per (sample, group) keeps the current Taylor term,
// the next one and the running sum in shared memory, so no intermediate term is
// written to global memory. When a group's feature maps do not fit, the stepped
// path runs one launch per term through a float32 workspace.
// Backward: the input gradient is the same launcher with adjoint = !adjoint
// (exp(L)^T = exp(L^T)); the weight gradient uses the recurrence in kernels.h.
// Torch-free: compiles with `nvcc -arch=sm_90 -c csrc/conv_exp.cu` (no include flags needed).
#include <algorithm>
#include <utility>

#include "include/gsops/block_math.cuh"
#include "include/gsops/dtype.cuh"
#include "include/gsops/kernels.h"
#include "include/gsops/launch.cuh"

namespace gsops {
namespace {

constexpr int kThreads = 256;

inline int64_t numel(const ConvShape& s) { return s.N * s.C * s.H * s.W; }
inline int cg_of(const ConvShape& s) { return s.C / s.groups; }
inline size_t fused_smem(const ConvShape& s) { return sizeof(float) * 3 * (size_t)cg_of(s) * s.H * s.W; }

bool valid(const ConvShape& s) {
  return s.N >= 0 && s.C >= 1 && s.H >= 1 && s.W >= 1 && s.groups >= 1 && s.C % s.groups == 0 && s.kh >= 1 &&
         s.kw >= 1 && s.kh % 2 == 1 && s.kw % 2 == 1;
}

unsigned grid_for(int64_t n) { return (unsigned)std::min<int64_t>(ceil_div(n, kThreads), 1 << 20); }

// One CUDA block per (sample, group). Shared memory: cur, nxt, acc (each cg*H*W).
template <typename T>
__global__ void conv_exp_fused_kernel(const T* __restrict__ x, const float* __restrict__ w, T* __restrict__ y, int C,
                                      int H, int W, int groups, int kh, int kw, int terms, bool adjoint) {
  extern __shared__ float smem[];
  const int cg = C / groups;
  const int m = cg * H * W;
  float* cur = smem;
  float* nxt = smem + m;
  float* acc = smem + 2 * m;
  const int64_t n = blockIdx.x / groups;
  const int g = blockIdx.x % groups;
  const int64_t off = (n * C + (int64_t)g * cg) * H * W;
  for (int e = threadIdx.x; e < m; e += blockDim.x) acc[e] = cur[e] = to_float(x[off + e]);
  __syncthreads();
  for (int t = 1; t <= terms; ++t) {
    conv_exp_term(cur, nxt, acc, w, cg, H, W, kh, kw, g, t, adjoint, threadIdx.x, blockDim.x);
    __syncthreads();
    float* tmp = cur;
    cur = nxt;
    nxt = tmp;
  }
  for (int e = threadIdx.x; e < m; e += blockDim.x) y[off + e] = from_float<T>(acc[e]);
}

// out = alpha * L(in) + beta * add (terms skipped when the pointer is null); acc += out when acc is set.
__global__ void conv_step_kernel(const float* __restrict__ in, const float* __restrict__ w,
                                 const float* __restrict__ add, float* __restrict__ out, float* __restrict__ acc,
                                 float alpha, float beta, int64_t total, int C, int H, int W, int groups, int kh,
                                 int kw, bool adjoint) {
  const int cg = C / groups;
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t n = e / ((int64_t)C * H * W);
    const int c = (int)((e / ((int64_t)H * W)) % C);
    const int h = (int)((e / W) % H), xx = (int)(e % W);
    const int g = c / cg;
    float v = 0.f;
    if (in) v = alpha * conv_entry(in + (n * C + (int64_t)g * cg) * H * W, w, cg, H, W, kh, kw, g, c % cg, h, xx, adjoint);
    if (add) v += beta * add[e];
    out[e] = v;
    if (acc) acc[e] += v;
  }
}

template <typename T>
__global__ void load_kernel(const T* __restrict__ x, float* __restrict__ a, float* __restrict__ b, int64_t total) {
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
    a[e] = b[e] = to_float(x[e]);
  }
}

template <typename T>
__global__ void store_kernel(const float* __restrict__ a, T* __restrict__ y, int64_t total) {
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
    y[e] = from_float<T>(a[e]);
  }
}

// One CUDA block per (sample n, output channel c); each thread owns weight entries (i, a, c') of row c.
__global__ void conv_weight_grad_kernel(const float* __restrict__ gout, const float* __restrict__ in,
                                        float* __restrict__ dw, int C, int H, int W, int groups, int kh, int kw) {
  const int cg = C / groups;
  const int64_t n = blockIdx.x / C;
  const int c = blockIdx.x % C;
  const int g = c / cg;
  const int per_row = cg * kh * kw;
  const float* gslice = gout + (n * C + (int64_t)g * cg) * H * W;
  const float* islice = in + (n * C + (int64_t)g * cg) * H * W;
  for (int e = threadIdx.x; e < per_row; e += blockDim.x) {
    const int i = e / (kh * kw), a = (e / kw) % kh, cc = e % kw;
    atomicAdd(&dw[(int64_t)c * per_row + e], conv_weight_grad_entry(gslice, islice, H, W, kh, kw, c % cg, i, a, cc));
  }
}

cudaError_t step(const float* in, const float* w, const float* add, float* out, float* acc, float alpha, float beta,
                 const ConvShape& s, bool adjoint, cudaStream_t stream) {
  const int64_t total = numel(s);
  conv_step_kernel<<<grid_for(total), kThreads, 0, stream>>>(in, w, add, out, acc, alpha, beta, total, s.C, s.H, s.W,
                                                             s.groups, s.kh, s.kw, adjoint);
  return cudaGetLastError();
}

}  // namespace

bool conv_exp_fused_fits(const ConvShape& s, int device) {
  return valid(s) && fused_smem(s) <= (size_t)max_dynamic_smem(device);
}

size_t conv_exp_forward_workspace(const ConvShape& s, int device) {
  return conv_exp_fused_fits(s, device) ? 0 : 3 * (size_t)numel(s);
}

cudaError_t conv_exp_forward(DType dt, const void* x, const float* w, void* y, float* workspace, const ConvShape& s,
                             int terms, bool adjoint, int device, cudaStream_t stream) {
  if (!valid(s) || terms < 0) return cudaErrorInvalidValue;
  const int64_t total = numel(s);
  if (total == 0) return cudaSuccess;
  const bool fused = conv_exp_fused_fits(s, device);
  if (!fused && workspace == nullptr) return cudaErrorInvalidValue;
  if (fused && s.N * s.groups > 0x7fffffffLL) return cudaErrorInvalidValue;
  return dispatch_dtype(dt, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    if (fused) {
      const size_t smem = fused_smem(s);
      auto kernel = conv_exp_fused_kernel<T>;
      cudaError_t err = ensure_dynamic_smem(kernel, smem);
      if (err != cudaSuccess) return err;
      kernel<<<(unsigned)(s.N * s.groups), kThreads, smem, stream>>>(
          static_cast<const T*>(x), w, static_cast<T*>(y), s.C, s.H, s.W, s.groups, s.kh, s.kw, terms, adjoint);
      return cudaGetLastError();
    }
    float* cur = workspace;
    float* nxt = workspace + total;
    float* acc = workspace + 2 * total;
    load_kernel<T><<<grid_for(total), kThreads, 0, stream>>>(static_cast<const T*>(x), cur, acc, total);
    cudaError_t err = cudaGetLastError();
    for (int t = 1; t <= terms && err == cudaSuccess; ++t) {
      err = step(cur, w, nullptr, nxt, acc, 1.f / (float)t, 0.f, s, adjoint, stream);
      std::swap(cur, nxt);
    }
    if (err != cudaSuccess) return err;
    store_kernel<T><<<grid_for(total), kThreads, 0, stream>>>(acc, static_cast<T*>(y), total);
    return cudaGetLastError();
  });
}

size_t conv_exp_weight_grad_workspace(const ConvShape& s, int terms) {
  return (size_t)(std::max(terms, 1) + 2) * (size_t)numel(s);
}

cudaError_t conv_exp_weight_grad(const float* x, const float* dy, const float* w, float* dw_acc, float* workspace,
                                 const ConvShape& s, int terms, cudaStream_t stream) {
  if (!valid(s) || terms < 0 || (int64_t)s.N * s.C > 0x7fffffffLL) return cudaErrorInvalidValue;
  const int64_t total = numel(s);
  if (total == 0 || terms == 0) return cudaSuccess;
  // a_m = L^m x at workspace + m * total (m >= 1; a_0 = x); c buffers after them.
  auto a = [&](int m) -> const float* { return m == 0 ? x : workspace + (int64_t)m * total; };
  float* c_cur = workspace + (int64_t)terms * total;
  float* c_nxt = c_cur + total;
  cudaError_t err = cudaSuccess;
  for (int m = 1; m < terms && err == cudaSuccess; ++m) {
    err = step(a(m - 1), w, nullptr, workspace + (int64_t)m * total, nullptr, 1.f, 0.f, s, false, stream);
  }
  // inv_fact[m] = 1 / m!
  double inv_fact = 1.0;
  for (int k = 2; k <= terms; ++k) inv_fact /= k;
  const unsigned wgrid = (unsigned)(s.N * s.C);
  const int wthreads = std::min(kThreads, std::max(32, ((cg_of(s) * s.kh * s.kw + 31) / 32) * 32));
  // c_{terms-1} = dy / terms!
  if (err == cudaSuccess) err = step(nullptr, w, dy, c_cur, nullptr, 0.f, (float)inv_fact, s, true, stream);
  for (int m = terms - 1; m >= 0 && err == cudaSuccess; --m) {
    if (m < terms - 1) {
      inv_fact *= (m + 2);  // now 1 / (m + 1)!
      err = step(c_cur, w, dy, c_nxt, nullptr, 1.f, (float)inv_fact, s, true, stream);  // c_m = L^T c_{m+1} + dy/(m+1)!
      std::swap(c_cur, c_nxt);
      if (err != cudaSuccess) break;
    }
    conv_weight_grad_kernel<<<wgrid, wthreads, 0, stream>>>(c_cur, a(m), dw_acc, s.C, s.H, s.W, s.groups, s.kh, s.kw);
    err = cudaGetLastError();
  }
  return err;
}

}  // namespace gsops
