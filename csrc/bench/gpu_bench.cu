// Kernel timings without Python: achieved bandwidth of the fused block-diagonal x
// permutation against a plain device copy of the same bytes, the block gradient,
// batched Cayley forward + backward and the grouped conv exponential.
// Inputs are random (a kernel timed on zeros can take shortcuts that real data does not),
// every launcher's return code is checked, and each output is checked to be finite and
// nonzero after timing: a failed or skipped launch stops the bench (exit 1), never reads as a fast one.
// Prints a table (CUDA events, median of --reps runs) and one "csv," line per row; without a GPU
// it says so and exits 0.
// Build and run: cmake -B build -G Ninja && cmake --build build && ./build/gsops_gpu_bench
//   ./build/gsops_gpu_bench [--tokens 16384] [--d 4096] [--blocks 16,32,64] [--reps 20] [--conv-batch 128]
//                           [--cayley-mats 128]
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "../include/gsops/kernels.h"

using namespace gsops;

static void fail(const char* what, cudaError_t e) {
  std::printf("FAIL: %s -> %s\n", what, cudaGetErrorString(e));
  std::fflush(stdout);
  std::exit(1);
}

#define CHECK(expr)                           \
  do {                                        \
    const cudaError_t e_ = (expr);            \
    if (e_ != cudaSuccess) fail(#expr, e_);   \
  } while (0)

// Median of `reps` timed calls of `fn` (after one warm-up); every call's status and the
// launch error state are checked.
static float median_ms(const char* what, const std::function<cudaError_t()>& fn, int reps) {
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  cudaError_t e = fn();  // warm-up
  if (e == cudaSuccess) e = cudaGetLastError();
  if (e != cudaSuccess) fail(what, e);
  CHECK(cudaDeviceSynchronize());
  std::vector<float> ms(reps);
  for (int i = 0; i < reps; ++i) {
    CHECK(cudaEventRecord(a));
    e = fn();
    if (e == cudaSuccess) e = cudaGetLastError();
    if (e != cudaSuccess) fail(what, e);
    CHECK(cudaEventRecord(b));
    CHECK(cudaEventSynchronize(b));
    CHECK(cudaEventElapsedTime(&ms[i], a, b));
  }
  CHECK(cudaEventDestroy(a));
  CHECK(cudaEventDestroy(b));
  std::sort(ms.begin(), ms.end());
  return ms[reps / 2];
}

static uint64_t g_state = 0x9E3779B97F4A7C15ull;
static float uniform_pm1() {  // xorshift64*: reproducible, fast for 64M values
  g_state ^= g_state >> 12;
  g_state ^= g_state << 25;
  g_state ^= g_state >> 27;
  return (float)((g_state * 2685821657736338717ull) >> 40) / (float)(1u << 23) - 1.f;
}

static uint16_t to_bf16_bits(float f) {  // round to nearest even
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
static float from_bf16_bits(uint16_t h) {
  const uint32_t u = (uint32_t)h << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

static void fill_bf16(void* dev, size_t n) {
  std::vector<uint16_t> h(n);
  for (auto& v : h) v = to_bf16_bits(uniform_pm1());
  CHECK(cudaMemcpy(dev, h.data(), n * 2, cudaMemcpyHostToDevice));
}
static void fill_f32(float* dev, size_t n, float scale) {
  std::vector<float> h(n);
  for (auto& v : h) v = scale * uniform_pm1();
  CHECK(cudaMemcpy(dev, h.data(), n * 4, cudaMemcpyHostToDevice));
}
static void fill_skew_f32(float* dev, int mats, int b, float scale) {
  std::vector<float> h((size_t)mats * b * b, 0.f);
  for (int m = 0; m < mats; ++m)
    for (int i = 0; i < b; ++i)
      for (int j = i + 1; j < b; ++j) {
        const float v = scale * uniform_pm1();
        h[((size_t)m * b + i) * b + j] = v;
        h[((size_t)m * b + j) * b + i] = -v;
      }
  CHECK(cudaMemcpy(dev, h.data(), h.size() * 4, cudaMemcpyHostToDevice));
}

// The output of a timed op must be finite and not all zero (its input is random).
static void expect_output(const char* what, const void* dev, size_t n, bool bf16) {
  std::vector<float> h(n);
  if (bf16) {
    std::vector<uint16_t> raw(n);
    CHECK(cudaMemcpy(raw.data(), dev, n * 2, cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < n; ++i) h[i] = from_bf16_bits(raw[i]);
  } else {
    CHECK(cudaMemcpy(h.data(), dev, n * 4, cudaMemcpyDeviceToHost));
  }
  double sum = 0;
  for (float v : h) {
    if (!std::isfinite(v)) {
      std::printf("FAIL: %s: non-finite output\n", what);
      std::exit(1);
    }
    sum += std::fabs(v);
  }
  if (!(sum > 0)) {
    std::printf("FAIL: %s: output is all zero\n", what);
    std::exit(1);
  }
}

static std::vector<int> parse_list(const char* s) {
  std::vector<int> out;
  std::string str(s);
  size_t pos = 0;
  while (pos <= str.size()) {
    const size_t comma = str.find(',', pos);
    out.push_back(std::atoi(str.substr(pos, comma - pos).c_str()));
    if (comma == std::string::npos) break;
    pos = comma + 1;
  }
  return out;
}

int main(int argc, char** argv) {
  int64_t tokens = 16384;
  int d = 4096, reps = 20, conv_batch = 128, cayley_mats = 128;
  std::vector<int> blocks_list = {16, 32, 64};
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const bool has_value = i + 1 < argc;
    if (a == "--tokens" && has_value) tokens = std::atoll(argv[++i]);
    else if (a == "--d" && has_value) d = std::atoi(argv[++i]);
    else if (a == "--blocks" && has_value) blocks_list = parse_list(argv[++i]);
    else if (a == "--reps" && has_value) reps = std::max(1, std::atoi(argv[++i]));
    else if (a == "--conv-batch" && has_value) conv_batch = std::max(1, std::atoi(argv[++i]));
    else if (a == "--cayley-mats" && has_value) cayley_mats = std::max(1, std::atoi(argv[++i]));
    else {
      std::printf("usage: %s [--tokens N] [--d D] [--blocks 16,32,64] [--reps R] [--conv-batch N] [--cayley-mats M]\n", argv[0]);
      return 2;
    }
  }
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess || count == 0) {
    std::printf("gsops GPU bench: no CUDA device (%s); nothing to time\n",
                err != cudaSuccess ? cudaGetErrorString(err) : "0 devices");
    return 0;
  }
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("gsops GPU bench on %s (bf16, d=%d, %lld tokens, random inputs, median of %d)\n", prop.name, d,
              (long long)tokens, reps);

  const size_t n = (size_t)d * tokens, bytes = n * sizeof(__nv_bfloat16);
  void *x = nullptr, *y = nullptr;
  CHECK(cudaMalloc(&x, bytes));
  CHECK(cudaMalloc(&y, bytes));
  fill_bf16(x, n);
  const float copy_ms =
      median_ms("cudaMemcpyAsync", [&] { return cudaMemcpyAsync(y, x, bytes, cudaMemcpyDeviceToDevice); }, reps);
  expect_output("copy", y, n, true);
  const double copy_gbs = 2.0 * bytes / copy_ms / 1e6;
  std::printf("plain copy bf16 %d x %lld: %.3f ms, %.0f GB/s (read + write)\n", d, (long long)tokens, copy_ms, copy_gbs);
  std::printf("csv,copy,0,%.5f,%.1f,100\n", copy_ms, copy_gbs);
  std::printf("%-34s %6s %10s %10s %12s\n", "op", "b", "ms", "GB/s", "% of copy");
  for (int b : blocks_list) {
    if (b <= 0 || d % b) {
      std::printf("FAIL: block size b=%d must divide d=%d\n", b, d);
      return 1;
    }
    const int r = d / b;
    float *blocks = nullptr, *grad = nullptr;
    CHECK(cudaMalloc(&blocks, sizeof(float) * r * b * b));
    CHECK(cudaMalloc(&grad, sizeof(float) * r * b * b));
    fill_f32(blocks, (size_t)r * b * b, 1.f / std::sqrt((float)b));
    struct Case { const char* name; int in, out; };
    for (Case c : {Case{"block_diag (no permutation)", PERM_NONE, PERM_NONE},
                   Case{"P^T diag(L) P (gs_apply pass 2)", PERM_P, PERM_PT}}) {
      CHECK(cudaMemset(y, 0, bytes));
      const float ms = median_ms("block_diag_perm", [&] {
        return block_diag_perm(DType::BF16, x, blocks, y, tokens, r, b, c.in, c.out, false, 0);
      }, reps);
      expect_output(c.name, y, n, true);
      const double gbs = 2.0 * bytes / ms / 1e6;
      std::printf("%-34s %6d %10.3f %10.0f %11.0f%%\n", c.name, b, ms, gbs, 100.0 * gbs / copy_gbs);
      std::printf("csv,%s,%d,%.5f,%.1f,%.1f\n", c.name, b, ms, gbs, 100.0 * gbs / copy_gbs);
    }
    const float gms = median_ms("block_diag_perm_grad_blocks", [&] {
      const cudaError_t e = cudaMemsetAsync(grad, 0, sizeof(float) * r * b * b);
      if (e != cudaSuccess) return e;
      return block_diag_perm_grad_blocks(DType::BF16, y, x, grad, tokens, r, b, PERM_P, PERM_PT, 0);
    }, reps);
    expect_output("block gradient", grad, (size_t)r * b * b, false);
    const double ggbs = 2.0 * bytes / gms / 1e6;
    std::printf("%-34s %6d %10.3f %10.0f %11.0f%%\n", "block gradient (P, P^T)", b, gms, ggbs, 100.0 * ggbs / copy_gbs);
    std::printf("csv,block gradient (P P^T),%d,%.5f,%.1f,%.1f\n", b, gms, ggbs, 100.0 * ggbs / copy_gbs);
    CHECK(cudaFree(blocks));
    CHECK(cudaFree(grad));
  }
  {  // batched Cayley, r = 128 blocks of b = 32 (--cayley-mats), forward + backward
    const int b = 32, mats = cayley_mats;
    float *K, *M, *Q, *G, *dK;
    const size_t cnt = (size_t)mats * b * b, sz = sizeof(float) * cnt;
    CHECK(cudaMalloc(&K, sz)); CHECK(cudaMalloc(&M, sz)); CHECK(cudaMalloc(&Q, sz));
    CHECK(cudaMalloc(&G, sz)); CHECK(cudaMalloc(&dK, sz));
    fill_skew_f32(K, mats, b, 0.1f);
    fill_f32(G, cnt, 1.f);
    const float ms = median_ms("cayley_forward + cayley_backward", [&] {
      const cudaError_t e = cayley_forward(DType::F32, K, M, Q, mats, b, 0);
      if (e != cudaSuccess) return e;
      return cayley_backward(DType::F32, M, G, dK, mats, b, 0);
    }, reps);
    expect_output("cayley Q", Q, cnt, false);
    expect_output("cayley dK", dK, cnt, false);
    std::printf("cayley fwd+bwd fp32, r=%d b=%d: %.4f ms\n", mats, b, ms);
    std::printf("csv,cayley fwd+bwd fp32 r=%d,%d,%.5f,,\n", mats, b, ms);
    CHECK(cudaFree(K)); CHECK(cudaFree(M)); CHECK(cudaFree(Q)); CHECK(cudaFree(G)); CHECK(cudaFree(dK));
  }
  {  // conv exponential, LipConvnet-like layer: C=64, 16x16, groups 4, 3x3, 6 terms
    ConvShape s{conv_batch, 64, 16, 16, 4, 3, 3};
    const size_t total = (size_t)s.N * s.C * s.H * s.W, wn = 64 * 16 * 9;
    float *xc, *yc, *w, *ws;
    CHECK(cudaMalloc(&xc, total * 4)); CHECK(cudaMalloc(&yc, total * 4)); CHECK(cudaMalloc(&w, wn * 4));
    const size_t wsz = std::max<size_t>(conv_exp_forward_workspace(s, 0), 1);
    CHECK(cudaMalloc(&ws, wsz * 4));
    fill_f32(xc, total, 1.f);
    fill_f32(w, wn, 0.05f);
    const float ms = median_ms("conv_exp_forward", [&] {
      return conv_exp_forward(DType::F32, xc, w, yc, ws, s, 6, false, 0, 0);
    }, reps);
    expect_output("conv_exp", yc, total, false);
    const char* path = conv_exp_fused_fits(s, 0) ? "fused" : "stepped";
    std::printf("conv_exp fwd fp32 N=%lld C=64 16x16 groups=4 k=3 terms=6 (%s): %.3f ms\n", (long long)s.N, path, ms);
    std::printf("csv,conv_exp fwd fp32 N=%lld (%s),0,%.5f,,\n", (long long)s.N, path, ms);
    CHECK(cudaFree(xc)); CHECK(cudaFree(yc)); CHECK(cudaFree(w)); CHECK(cudaFree(ws));
  }
  CHECK(cudaFree(x));
  CHECK(cudaFree(y));
  CHECK(cudaDeviceSynchronize());
  std::printf("gsops GPU bench: done\n");
  return 0;
}
