// GPU test driver: runs every launcher of kernels.h against naive CPU loops (float32
// and one fp16/bf16 pass for the GS kernel). With no CUDA device it says so and exits 0.
// Build and run: cmake -B build -G Ninja && cmake --build build && ./build/gsops_gpu_test [gs] [cayley] [conv]
// Without a GPU the same driver runs on the CPU under the emulator: python tools/cuda_emu/run.py
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "../include/gsops/block_math.cuh"
#include "../include/gsops/index.cuh"
#include "../include/gsops/kernels.h"

using namespace gsops;

static int g_fail = 0, g_checks = 0;
static std::mt19937 g_rng(7);

#define CUDA_OK(expr)                                                                     \
  do {                                                                                    \
    cudaError_t e_ = (expr);                                                              \
    if (e_ != cudaSuccess) {                                                              \
      std::printf("FAIL: %s -> %s (line %d)\n", #expr, cudaGetErrorString(e_), __LINE__); \
      ++g_fail;                                                                           \
      return;                                                                             \
    }                                                                                     \
  } while (0)

static void expect_close(const std::vector<float>& got, const std::vector<double>& want, double tol,
                         const std::string& what) {
  ++g_checks;
  double err = 0, scale = 1;
  for (size_t i = 0; i < want.size(); ++i) {
    err = std::fmax(err, std::fabs(got[i] - want[i]));
    scale = std::fmax(scale, std::fabs(want[i]));
    if (std::isnan(got[i])) err = INFINITY;
  }
  if (!(err <= tol * scale)) {
    ++g_fail;
    std::printf("FAIL: %s: max error %.3g (tolerance %.3g)\n", what.c_str(), err, tol * scale);
  }
}

static std::vector<float> randn(size_t n, float s = 1.f) {
  std::normal_distribution<float> d(0.f, s);
  std::vector<float> v(n);
  for (auto& x : v) x = d(g_rng);
  return v;
}

template <typename T> struct Dev {
  T* p = nullptr;
  size_t n = 0;
  explicit Dev(size_t n_) : n(n_) { cudaMalloc(&p, std::max<size_t>(n, 1) * sizeof(T)); cudaMemset(p, 0xff, std::max<size_t>(n, 1) * sizeof(T)); }
  ~Dev() { cudaFree(p); }
};

template <typename T> static T cvt(float v);
template <> float cvt<float>(float v) { return v; }
template <> __half cvt<__half>(float v) { return __float2half(v); }
template <> __nv_bfloat16 cvt<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
static float tof(float v) { return v; }
static float tof(__half v) { return __half2float(v); }
static float tof(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> static Dev<T> upload(const std::vector<float>& h) {
  Dev<T> d(h.size());
  std::vector<T> t(h.size());
  for (size_t i = 0; i < h.size(); ++i) t[i] = cvt<T>(h[i]);
  cudaMemcpy(d.p, t.data(), t.size() * sizeof(T), cudaMemcpyHostToDevice);
  return d;
}

template <typename T> static std::vector<float> download(const Dev<T>& d) {
  std::vector<T> t(d.n);
  cudaMemcpy(t.data(), d.p, t.size() * sizeof(T), cudaMemcpyDeviceToHost);
  std::vector<float> h(d.n);
  for (size_t i = 0; i < h.size(); ++i) h[i] = tof(t[i]);
  return h;
}

template <typename T> static std::vector<float> rounded(std::vector<float> v) {
  for (auto& x : v) x = tof(cvt<T>(x));
  return v;
}

// ---- fused block-diagonal x permutation ------------------------------------
template <typename T>
static void test_gs(DType dt, int r, int b, int64_t n, double tol) {
  const int64_t d = (int64_t)r * b;
  const std::vector<float> x = rounded<T>(randn(n * d)), dy = rounded<T>(randn(n * d)), B = randn((size_t)r * b * b, 1.f / std::sqrt((float)b));
  Dev<T> dx_ = upload<T>(x), ddy = upload<T>(dy), dout(n * d);
  Dev<float> dB = upload<float>(B), dgrad((size_t)r * b * b);
  for (int in_mode = 0; in_mode < 3; ++in_mode)
    for (int out_mode = 0; out_mode < 3; ++out_mode)
      for (int tr = 0; tr < 2; ++tr) {
        const std::string tag = std::string(dtype_name(dt)) + " r=" + std::to_string(r) + " b=" + std::to_string(b) +
                                " n=" + std::to_string(n) + " in=" + std::to_string(in_mode) +
                                " out=" + std::to_string(out_mode) + " tr=" + std::to_string(tr);
        CUDA_OK(block_diag_perm(dt, dx_.p, dB.p, dout.p, n, r, b, in_mode, out_mode, tr, 0));
        CUDA_OK(cudaDeviceSynchronize());
        std::vector<double> want(n * d);
        for (int64_t t = 0; t < n; ++t)
          for (int k = 0; k < r; ++k)
            for (int i = 0; i < b; ++i) {
              double s = 0;
              for (int j = 0; j < b; ++j)
                s += (double)B[block_entry(k, i, j, b, tr)] * x[t * d + gather_index(in_mode, (int64_t)k * b + j, r, b)];
              want[t * d + scatter_index(out_mode, (int64_t)k * b + i, r, b)] = s;
            }
        expect_close(download(dout), want, tol, "block_diag_perm " + tag);
        if (tr) continue;
        CUDA_OK(cudaMemset(dgrad.p, 0, dgrad.n * sizeof(float)));
        CUDA_OK(block_diag_perm_grad_blocks(dt, ddy.p, dx_.p, dgrad.p, n, r, b, in_mode, out_mode, 0));
        CUDA_OK(cudaDeviceSynchronize());
        std::vector<double> gw((size_t)r * b * b, 0.0);
        for (int64_t t = 0; t < n; ++t)
          for (int k = 0; k < r; ++k)
            for (int i = 0; i < b; ++i)
              for (int j = 0; j < b; ++j)
                gw[(size_t)k * b * b + i * b + j] += (double)dy[t * d + scatter_index(out_mode, (int64_t)k * b + i, r, b)] *
                                                     x[t * d + gather_index(in_mode, (int64_t)k * b + j, r, b)];
        expect_close(download(dgrad), gw, 1e-4 * std::sqrt((double)n), "block gradient " + tag);
      }
}

// ---- batched Cayley ----------------------------------------------------------
static void test_cayley(int b, int64_t mats) {
  std::vector<float> K((size_t)mats * b * b, 0.f);
  const std::vector<float> a = randn(K.size(), 1.f / std::sqrt((float)b));
  for (int64_t m = 0; m < mats; ++m)
    for (int i = 0; i < b; ++i)
      for (int j = i + 1; j < b; ++j) {
        K[(m * b + i) * b + j] = a[(m * b + i) * b + j];
        K[(m * b + j) * b + i] = -a[(m * b + i) * b + j];
      }
  const std::vector<float> G = randn(K.size());
  Dev<float> dK = upload<float>(K), dM(K.size()), dQ(K.size()), dG = upload<float>(G), dgK(K.size());
  CUDA_OK(cayley_forward(DType::F32, dK.p, dM.p, dQ.p, mats, b, 0));
  CUDA_OK(cayley_backward(DType::F32, dM.p, dG.p, dgK.p, mats, b, 0));
  CUDA_OK(cudaDeviceSynchronize());
  std::vector<double> wantQ(K.size()), wantM(K.size()), wantdK(K.size());
  std::vector<float> A((size_t)b * b), col(b), T((size_t)b * b);
  for (int64_t m = 0; m < mats; ++m) {
    const size_t off = (size_t)m * b * b;
    for (int e = 0; e < b * b; ++e) A[e] = eye_minus(K[off + e], e, b);
    gj_inverse_serial(A.data(), col.data(), b);
    for (int e = 0; e < b * b; ++e) {
      wantM[off + e] = A[e];
      wantQ[off + e] = cayley_from_inverse(A[e], e, b);
    }
    for (int e = 0; e < b * b; ++e) T[e] = matmul_entry(G.data() + off, A.data(), b, e / b, e % b, false, true);
    for (int e = 0; e < b * b; ++e) wantdK[off + e] = 2.0 * matmul_entry(A.data(), T.data(), b, e / b, e % b, true, false);
  }
  const std::string tag = "b=" + std::to_string(b) + " mats=" + std::to_string(mats);
  expect_close(download(dM), wantM, 1e-4, "cayley M " + tag);
  expect_close(download(dQ), wantQ, 1e-4, "cayley Q " + tag);
  expect_close(download(dgK), wantdK, 1e-4, "cayley dK " + tag);
}

// ---- grouped convolution exponential -------------------------------------------
static std::vector<double> host_conv(const ConvShape& s, const std::vector<double>& x, const std::vector<float>& w, bool adjoint) {
  const int cg = s.C / s.groups;
  std::vector<float> xf(x.begin(), x.end());
  std::vector<double> y(x.size());
  for (size_t e = 0; e < y.size(); ++e) {
    const int64_t n = e / ((size_t)s.C * s.H * s.W);
    const int c = (int)((e / ((size_t)s.H * s.W)) % s.C), g = c / cg;
    y[e] = conv_entry(xf.data() + (n * s.C + (int64_t)g * cg) * s.H * s.W, w.data(), cg, s.H, s.W, s.kh, s.kw, g,
                      c % cg, (int)((e / s.W) % s.H), (int)(e % s.W), adjoint);
  }
  return y;
}

static void test_conv(ConvShape s, int terms) {
  const size_t total = (size_t)s.N * s.C * s.H * s.W;
  const int cg = s.C / s.groups;
  const std::vector<float> x = randn(total), w = randn((size_t)s.C * cg * s.kh * s.kw, 0.1f), dy = randn(total);
  Dev<float> dx = upload<float>(x), dw = upload<float>(w), dy_ = upload<float>(dy), dout(total), dgw(w.size());
  Dev<float> ws(std::max(conv_exp_forward_workspace(s, 0), conv_exp_weight_grad_workspace(s, terms)));
  const std::string tag = "N=" + std::to_string(s.N) + " C=" + std::to_string(s.C) + " H=" + std::to_string(s.H) +
                          " W=" + std::to_string(s.W) + " groups=" + std::to_string(s.groups) + " k=" +
                          std::to_string(s.kh) + (conv_exp_fused_fits(s, 0) ? " (fused)" : " (stepped)");
  for (int adj = 0; adj < 2; ++adj) {
    CUDA_OK(conv_exp_forward(DType::F32, dx.p, dw.p, dout.p, ws.p, s, terms, adj, 0, 0));
    CUDA_OK(cudaDeviceSynchronize());
    std::vector<double> acc(x.begin(), x.end()), cur(acc);
    for (int t = 1; t <= terms; ++t) {
      cur = host_conv(s, cur, w, adj);
      for (size_t e = 0; e < total; ++e) acc[e] += (cur[e] /= t);
    }
    expect_close(download(dout), acc, 1e-4, "conv_exp adjoint=" + std::to_string(adj) + " " + tag);
  }
  // weight gradient: dw = sum_m corr(c_m, a_m), checked as the O(terms^2) double sum
  CUDA_OK(cudaMemset(dgw.p, 0, dgw.n * sizeof(float)));
  CUDA_OK(conv_exp_weight_grad(dx.p, dy_.p, dw.p, dgw.p, ws.p, s, terms, 0));
  CUDA_OK(cudaDeviceSynchronize());
  std::vector<std::vector<double>> a(terms + 1), bq(terms + 1);
  a[0].assign(x.begin(), x.end());
  bq[0].assign(dy.begin(), dy.end());
  for (int m = 1; m <= terms; ++m) {
    a[m] = host_conv(s, a[m - 1], w, false);
    bq[m] = host_conv(s, bq[m - 1], w, true);
  }
  std::vector<double> want(w.size(), 0.0);
  double fact = 1;
  for (int n = 1; n <= terms; ++n) {
    fact *= n;
    for (int m = 0; m < n; ++m) {
      const std::vector<double>& gq = bq[n - 1 - m];
      const std::vector<double>& am = a[m];
      for (int64_t nn = 0; nn < s.N; ++nn)
        for (int co = 0; co < s.C; ++co)
          for (int i = 0; i < cg; ++i)
            for (int p = 0; p < s.kh; ++p)
              for (int q = 0; q < s.kw; ++q) {
                double acc = 0;
                for (int h = 0; h < s.H; ++h)
                  for (int xx = 0; xx < s.W; ++xx) {
                    const int hh = h + p - s.kh / 2, x2 = xx + q - s.kw / 2;
                    if (hh < 0 || hh >= s.H || x2 < 0 || x2 >= s.W) continue;
                    acc += gq[((nn * s.C + co) * s.H + h) * s.W + xx] *
                           am[((nn * s.C + (co / cg) * cg + i) * s.H + hh) * s.W + x2];
                  }
                want[((size_t)co * cg + i) * s.kh * s.kw + p * s.kw + q] += acc / fact;
              }
    }
  }
  expect_close(download(dgw), want, 1e-3, "conv_exp weight gradient " + tag);
}

int main(int argc, char** argv) {
  // Optional arguments: the groups to run (gs, cayley, conv); all of them by default.
  const char* groups[] = {"gs", "cayley", "conv"};
  for (int i = 1; i < argc; ++i) {
    bool known = false;
    for (const char* g : groups) known = known || std::string(argv[i]) == g;
    if (!known) {
      std::printf("usage: %s [gs] [cayley] [conv]  (unknown group '%s')\n", argv[0], argv[i]);
      return 2;
    }
  }
  auto want = [&](const char* g) {
    if (argc < 2) return true;
    for (int i = 1; i < argc; ++i)
      if (std::string(argv[i]) == g) return true;
    return false;
  };
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess || count == 0) {
    std::printf("gsops GPU test driver: no CUDA device (%s); skipping the GPU checks\n",
                err != cudaSuccess ? cudaGetErrorString(err) : "0 devices");
    return 0;
  }
  cudaDeviceProp prop;
  cudaGetDeviceProperties(&prop, 0);
  std::printf("gsops GPU test driver on %s (sm_%d%d)\n", prop.name, prop.major, prop.minor);
  if (want("gs")) {
    const int shapes[][3] = {{3, 1, 37}, {4, 2, 19}, {5, 3, 33}, {2, 8, 65}, {4, 16, 70}, {3, 32, 40}, {2, 64, 17}, {2, 128, 9}};
    for (auto& sh : shapes) test_gs<float>(DType::F32, sh[0], sh[1], sh[2], 1e-5);
    // fp16/bf16 with b % 16 == 0 take the tensor-core path (unless GSOPS_CUDA_NO_MMA=1), the others the FMA path
    test_gs<__half>(DType::F16, 4, 16, 70, 5e-3);
    test_gs<__half>(DType::F16, 3, 64, 130, 5e-3);
    test_gs<__half>(DType::F16, 5, 3, 33, 5e-3);
    test_gs<__nv_bfloat16>(DType::BF16, 3, 32, 40, 3e-2);
    test_gs<__nv_bfloat16>(DType::BF16, 2, 128, 100, 3e-2);
    test_gs<__nv_bfloat16>(DType::BF16, 4, 8, 65, 3e-2);
    test_gs<float>(DType::F32, 2, 8, 1200, 1e-5);  // several grad chunks per block
  }
  if (want("cayley"))
    for (int b : {1, 2, 3, 8, 16, 32, 64, 128}) test_cayley(b, 5);
  if (want("conv")) {
    test_conv({2, 8, 6, 7, 2, 3, 3}, 5);
    test_conv({1, 4, 5, 5, 1, 1, 1}, 4);
    test_conv({1, 64, 40, 40, 1, 3, 3}, 2);  // 3*64*40*40 floats > shared memory: stepped path
  }
  std::printf("gsops GPU test driver: %d checks, %d failures\n", g_checks, g_fail);
  return g_fail ? 1 : 0;
}
