// Kernel timings without Python: achieved bandwidth of the fused block-diagonal x
// permutation against a plain device copy of the same bytes, the block gradient,
// batched Cayley forward + backward and the grouped conv exponential.
// Prints a table (CUDA events, median of 20 runs); without a GPU it says so and exits 0.
// Build and run: cmake -B build -G Ninja && cmake --build build && ./build/gsops_gpu_bench
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <functional>
#include <vector>

#include "../include/gsops/kernels.h"

using namespace gsops;

static float median_ms(const std::function<void()>& fn, int reps = 20) {
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  fn();  // warm-up
  std::vector<float> ms(reps);
  for (int i = 0; i < reps; ++i) {
    cudaEventRecord(a);
    fn();
    cudaEventRecord(b);
    cudaEventSynchronize(b);
    cudaEventElapsedTime(&ms[i], a, b);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  std::sort(ms.begin(), ms.end());
  return ms[reps / 2];
}

int main() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess || count == 0) {
    std::printf("gsops GPU bench: no CUDA device (%s); nothing to time\n",
                err != cudaSuccess ? cudaGetErrorString(err) : "0 devices");
    return 0;
  }
  cudaDeviceProp prop;
  cudaGetDeviceProperties(&prop, 0);
  std::printf("gsops GPU bench on %s\n", prop.name);

  const int d = 4096;
  const int64_t tokens = 16384;
  const size_t n = (size_t)d * tokens, bytes = n * sizeof(__nv_bfloat16);
  void *x = nullptr, *y = nullptr;
  float *blocks = nullptr, *grad = nullptr;
  cudaMalloc(&x, bytes);
  cudaMalloc(&y, bytes);
  cudaMemset(x, 0, bytes);
  const float copy_ms = median_ms([&] { cudaMemcpyAsync(y, x, bytes, cudaMemcpyDeviceToDevice); });
  const double copy_gbs = 2.0 * bytes / copy_ms / 1e6;
  std::printf("plain copy bf16 %d x %lld: %.3f ms, %.0f GB/s (read + write)\n", d, (long long)tokens, copy_ms, copy_gbs);
  std::printf("%-34s %6s %10s %10s %12s\n", "op (bf16, d=4096, 16k tokens)", "b", "ms", "GB/s", "% of copy");
  for (int b : {16, 32, 64}) {
    const int r = d / b;
    cudaMalloc(&blocks, sizeof(float) * r * b * b);
    cudaMalloc(&grad, sizeof(float) * r * b * b);
    cudaMemset(blocks, 0, sizeof(float) * r * b * b);
    struct Case { const char* name; int in, out; };
    for (Case c : {Case{"block_diag (no permutation)", PERM_NONE, PERM_NONE}, Case{"P^T diag(L) P (gs_apply pass 2)", PERM_P, PERM_PT}}) {
      const float ms = median_ms([&] { block_diag_perm(DType::BF16, x, blocks, y, tokens, r, b, c.in, c.out, false, 0); });
      const double gbs = 2.0 * bytes / ms / 1e6;
      std::printf("%-34s %6d %10.3f %10.0f %11.0f%%\n", c.name, b, ms, gbs, 100.0 * gbs / copy_gbs);
    }
    const float gms = median_ms([&] {
      cudaMemsetAsync(grad, 0, sizeof(float) * r * b * b);
      block_diag_perm_grad_blocks(DType::BF16, y, x, grad, tokens, r, b, PERM_P, PERM_PT, 0);
    });
    std::printf("%-34s %6d %10.3f %10.0f %11.0f%%\n", "block gradient (P, P^T)", b, gms, 2.0 * bytes / gms / 1e6,
                100.0 * 2.0 * bytes / gms / 1e6 / copy_gbs);
    cudaFree(blocks);
    cudaFree(grad);
  }
  {  // batched Cayley, r = 128 blocks of b = 32, forward + backward
    const int b = 32, mats = 128;
    float *K, *M, *Q, *G, *dK;
    const size_t sz = sizeof(float) * mats * b * b;
    cudaMalloc(&K, sz); cudaMalloc(&M, sz); cudaMalloc(&Q, sz); cudaMalloc(&G, sz); cudaMalloc(&dK, sz);
    cudaMemset(K, 0, sz);
    cudaMemset(G, 0, sz);
    const float ms = median_ms([&] {
      cayley_forward(DType::F32, K, M, Q, mats, b, 0);
      cayley_backward(DType::F32, M, G, dK, mats, b, 0);
    });
    std::printf("cayley fwd+bwd fp32, r=%d b=%d: %.4f ms\n", mats, b, ms);
    cudaFree(K); cudaFree(M); cudaFree(Q); cudaFree(G); cudaFree(dK);
  }
  {  // conv exponential, LipConvnet-like layer: N=128, C=64, 16x16, groups 4, 3x3, 6 terms
    ConvShape s{128, 64, 16, 16, 4, 3, 3};
    const size_t total = (size_t)s.N * s.C * s.H * s.W;
    float *xc, *yc, *w, *ws;
    cudaMalloc(&xc, total * 4); cudaMalloc(&yc, total * 4); cudaMalloc(&w, 64 * 16 * 9 * 4);
    const size_t wsz = std::max<size_t>(conv_exp_forward_workspace(s, 0), 1);
    cudaMalloc(&ws, wsz * 4);
    cudaMemset(xc, 0, total * 4);
    cudaMemset(w, 0, 64 * 16 * 9 * 4);
    const float ms = median_ms([&] { conv_exp_forward(DType::F32, xc, w, yc, ws, s, 6, false, 0, 0); });
    std::printf("conv_exp fwd fp32 N=128 C=64 16x16 groups=4 k=3 terms=6 (%s): %.3f ms\n",
                conv_exp_fused_fits(s, 0) ? "fused" : "stepped", ms);
    cudaFree(xc); cudaFree(yc); cudaFree(w); cudaFree(ws);
  }
  cudaFree(x);
  cudaFree(y);
  const cudaError_t last = cudaDeviceSynchronize();
  if (last != cudaSuccess) {
    std::printf("CUDA error: %s\n", cudaGetErrorString(last));
    return 1;
  }
  return 0;
}
