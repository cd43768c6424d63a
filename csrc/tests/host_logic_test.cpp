// Host test of the torch-free __host__ __device__ logic the CUDA kernels run:
// the permutation as index arithmetic, the tiled block-diagonal x permutation
// (forward, input backward, block gradient), the Gauss-Jordan Cayley steps and
// the grouped convolution / its adjoint / the weight-gradient recurrence.
// Every check compares against an independent dense double computation.
// Cooperative functions run with several emulated threads in forward and in
// reverse order: a data race inside one phase would make the two differ.
// Build: cmake -B build -G Ninja && cmake --build build && ./build/gsops_host_test
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "../include/gsops/block_math.cuh"
#include "../include/gsops/gs_tiles.cuh"
#include "../include/gsops/index.cuh"

using namespace gsops;
using Mat = std::vector<double>;

static int g_failures = 0;
static int g_checks = 0;
static std::mt19937 g_rng(1234);

static void check(bool ok, const std::string& what) {
  ++g_checks;
  if (!ok) {
    ++g_failures;
    std::printf("FAIL: %s\n", what.c_str());
  }
}

static double max_abs_diff(const std::vector<double>& a, const std::vector<double>& b) {
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::fmax(m, std::fabs(a[i] - b[i]));
  return a.size() == b.size() ? m : INFINITY;
}

static std::vector<float> randn(size_t n, float scale = 1.f) {
  std::normal_distribution<float> dist(0.f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(g_rng);
  return v;
}

static std::vector<double> to_d(const std::vector<float>& v) { return std::vector<double>(v.begin(), v.end()); }

// Dense matrix of P_(k,n) straight from the SPEC: P[sigma(i), i] = 1, sigma(i) = (i % k) (n / k) + i / k.
static Mat dense_perm(int k, int n) {
  Mat P((size_t)n * n, 0.0);
  for (int i = 0; i < n; ++i) P[(size_t)((i % k) * (n / k) + i / k) * n + i] = 1.0;
  return P;
}

static Mat transpose(const Mat& A, int n) {
  Mat T(A.size());
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) T[(size_t)j * n + i] = A[(size_t)i * n + j];
  return T;
}

static Mat matmul(const Mat& A, const Mat& B, int n) {
  Mat C((size_t)n * n, 0.0);
  for (int i = 0; i < n; ++i)
    for (int k = 0; k < n; ++k)
      for (int j = 0; j < n; ++j) C[(size_t)i * n + j] += A[(size_t)i * n + k] * B[(size_t)k * n + j];
  return C;
}

static Mat identity(int n) {
  Mat I((size_t)n * n, 0.0);
  for (int i = 0; i < n; ++i) I[(size_t)i * n + i] = 1.0;
  return I;
}

// y[t] = A x[t] for rows of x (n_tokens, n).
static std::vector<double> apply_rows(const Mat& A, const std::vector<double>& x, int n) {
  std::vector<double> y(x.size(), 0.0);
  for (size_t t = 0; t < x.size() / n; ++t)
    for (int i = 0; i < n; ++i)
      for (int j = 0; j < n; ++j) y[t * n + i] += A[(size_t)i * n + j] * x[t * n + j];
  return y;
}

static Mat mode_matrix(int mode, int r, int b) {
  const int d = r * b;
  if (mode == PERM_P) return dense_perm(r, d);
  if (mode == PERM_PT) return transpose(dense_perm(r, d), d);
  return identity(d);
}

// ---------------------------------------------------------------------------
static void test_spec_example() {
  // SPEC: k = 3, n = 12: P x = [x0 x3 x6 x9 x1 x4 x7 x10 x2 x5 x8 x11] (r = 3 blocks of b = 4).
  const int expect[12] = {0, 3, 6, 9, 1, 4, 7, 10, 2, 5, 8, 11};
  bool ok = true;
  for (int p = 0; p < 12; ++p) ok &= gather_index(PERM_P, p, 3, 4) == expect[p];
  check(ok, "gather_index(P) reproduces the SPEC example k=3, n=12");
  ok = true;
  for (int i = 0; i < 12; ++i) ok &= perm_sigma(i, 3, 12) == (i % 3) * 4 + i / 3;
  check(ok, "perm_sigma is the SPEC formula");
}

static void test_permutations() {
  const int shapes[][2] = {{1, 1}, {1, 5}, {5, 1}, {3, 4}, {4, 3}, {2, 8}, {6, 5}, {16, 2}, {7, 9}};
  for (auto& s : shapes) {
    const int r = s[0], b = s[1], d = r * b;
    for (int mode = PERM_NONE; mode <= PERM_PT; ++mode) {
      const Mat P = mode_matrix(mode, r, b);
      std::vector<double> x(d);
      for (int i = 0; i < d; ++i) x[i] = i + 1;
      const std::vector<double> Px = apply_rows(P, x, d);
      std::vector<double> gathered(d), scattered(d, -1);
      for (int p = 0; p < d; ++p) gathered[p] = x[gather_index(mode, p, r, b)];
      for (int p = 0; p < d; ++p) scattered[scatter_index(mode, p, r, b)] = x[p];
      const std::string tag = "r=" + std::to_string(r) + " b=" + std::to_string(b) + " mode=" + std::to_string(mode);
      check(max_abs_diff(gathered, Px) == 0, "gather_index == dense P^mode x, " + tag);
      check(max_abs_diff(scattered, Px) == 0, "scatter_index == dense P^mode x, " + tag);
      check(mode_matrix(perm_inverse_mode(mode), r, b) == transpose(P, d), "perm_inverse_mode is the transpose, " + tag);
    }
  }
}

// Emulates block_diag_perm_kernel: every (tile, k) CUDA block, `nth` threads in forward or reverse order.
static std::vector<float> emulate_bdp(const std::vector<float>& x, const std::vector<float>& B, int64_t n_tokens, int r,
                                      int b, int tile, int in_mode, int out_mode, bool transpose_blocks, int nth,
                                      bool reverse) {
  std::vector<float> y(x.size(), NAN);
  std::vector<float> Bt((size_t)b * b), xs((size_t)tile * b);
  for (int64_t t0 = 0; t0 < n_tokens; t0 += tile)
    for (int k = 0; k < r; ++k) {
      std::fill(Bt.begin(), Bt.end(), NAN);
      std::fill(xs.begin(), xs.end(), NAN);
      for (int q = 0; q < nth; ++q) {
        const int tid = reverse ? nth - 1 - q : q;
        bdp_load_tile(x.data(), B.data(), Bt.data(), xs.data(), n_tokens, r, b, tile, k, t0, in_mode, transpose_blocks,
                      tid, nth);
      }
      for (int q = 0; q < nth; ++q) {
        const int tid = reverse ? nth - 1 - q : q;
        bdp_store_tile(Bt.data(), xs.data(), y.data(), n_tokens, r, b, tile, k, t0, out_mode, tid, nth);
      }
    }
  return y;
}

static std::vector<float> emulate_bgrad(const std::vector<float>& dy, const std::vector<float>& x, int64_t n_tokens,
                                        int r, int b, int tile, int in_mode, int out_mode) {
  std::vector<float> dB((size_t)r * b * b, 0.f), gs((size_t)tile * b), xs((size_t)tile * b);
  for (int k = 0; k < r; ++k)
    for (int64_t t0 = 0; t0 < n_tokens; t0 += tile) {
      bgrad_load_tile(dy.data(), x.data(), gs.data(), xs.data(), n_tokens, r, b, tile, k, t0, in_mode, out_mode, 0, 1);
      const int nt = (int)std::min<int64_t>(tile, n_tokens - t0);
      for (int e = 0; e < b * b; ++e) dB[(size_t)k * b * b + e] += bgrad_tile_entry(gs.data(), xs.data(), b, nt, e);
    }
  return dB;
}

static Mat dense_block_diag(const std::vector<float>& B, int r, int b, bool transpose_blocks) {
  const int d = r * b;
  Mat D((size_t)d * d, 0.0);
  for (int k = 0; k < r; ++k)
    for (int i = 0; i < b; ++i)
      for (int j = 0; j < b; ++j)
        D[(size_t)(k * b + i) * d + k * b + j] = B[block_entry(k, i, j, b, transpose_blocks)];
  return D;
}

static void test_block_diag_perm() {
  const int shapes[][3] = {{3, 4, 5}, {4, 3, 7}, {1, 1, 3}, {5, 1, 4}, {1, 6, 2}, {2, 8, 9}, {6, 5, 1}, {4, 16, 3}};
  for (auto& s : shapes) {
    const int r = s[0], b = s[1], d = r * b;
    const int64_t n_tokens = s[2];
    const std::vector<float> x = randn((size_t)n_tokens * d), B = randn((size_t)r * b * b), dy = randn((size_t)n_tokens * d);
    for (int in_mode = PERM_NONE; in_mode <= PERM_PT; ++in_mode)
      for (int out_mode = PERM_NONE; out_mode <= PERM_PT; ++out_mode)
        for (int tr = 0; tr < 2; ++tr) {
          const std::string tag = "r=" + std::to_string(r) + " b=" + std::to_string(b) + " tokens=" +
                                  std::to_string(n_tokens) + " in=" + std::to_string(in_mode) +
                                  " out=" + std::to_string(out_mode) + " transpose=" + std::to_string(tr);
          // dense operator A = P^out D P^in
          const Mat A = matmul(matmul(mode_matrix(out_mode, r, b), dense_block_diag(B, r, b, tr), d),
                               mode_matrix(in_mode, r, b), d);
          const std::vector<double> want = apply_rows(A, to_d(x), d);
          const int tile = 2;  // several tiles, the last one partial
          const std::vector<float> y1 = emulate_bdp(x, B, n_tokens, r, b, tile, in_mode, out_mode, tr, 3, false);
          const std::vector<float> y2 = emulate_bdp(x, B, n_tokens, r, b, tile, in_mode, out_mode, tr, 3, true);
          check(max_abs_diff(to_d(y1), want) < 1e-4 * std::sqrt((double)b) + 1e-5, "block_diag_perm forward, " + tag);
          check(std::memcmp(y1.data(), y2.data(), y1.size() * sizeof(float)) == 0,
                "block_diag_perm is race-free (thread order), " + tag);
          // input backward: same kernel, inverse permutations, transposed blocks
          const std::vector<float> dx = emulate_bdp(dy, B, n_tokens, r, b, tile, perm_inverse_mode(out_mode),
                                                    perm_inverse_mode(in_mode), !tr, 4, false);
          check(max_abs_diff(to_d(dx), apply_rows(transpose(A, d), to_d(dy), d)) < 1e-4 * std::sqrt((double)b) + 1e-5,
                "block_diag_perm input backward = A^T dy, " + tag);
          if (tr) continue;
          // block gradient: dB_k[i][j] = sum_t (P^out^T dy)[t, k b + i] (P^in x)[t, k b + j]
          const std::vector<double> g = apply_rows(transpose(mode_matrix(out_mode, r, b), d), to_d(dy), d);
          const std::vector<double> xi = apply_rows(mode_matrix(in_mode, r, b), to_d(x), d);
          std::vector<double> dB_want((size_t)r * b * b, 0.0);
          for (int64_t t = 0; t < n_tokens; ++t)
            for (int k = 0; k < r; ++k)
              for (int i = 0; i < b; ++i)
                for (int j = 0; j < b; ++j)
                  dB_want[(size_t)k * b * b + i * b + j] += g[t * d + k * b + i] * xi[t * d + k * b + j];
          const std::vector<float> dB = emulate_bgrad(dy, x, n_tokens, r, b, 3, in_mode, out_mode);
          check(max_abs_diff(to_d(dB), dB_want) < 1e-4 * n_tokens + 1e-5, "block gradient, " + tag);
        }
  }
}

// ---------------------------------------------------------------------------
static std::vector<float> rand_skew(int b, float scale) {
  std::vector<float> K((size_t)b * b, 0.f);
  const std::vector<float> a = randn((size_t)b * b, scale);
  for (int i = 0; i < b; ++i)
    for (int j = i + 1; j < b; ++j) {
      K[(size_t)i * b + j] = a[(size_t)i * b + j];
      K[(size_t)j * b + i] = -a[(size_t)i * b + j];
    }
  return K;
}

// Cayley forward as the kernel runs it, `nth` emulated threads per phase.
static void emulate_cayley(const std::vector<float>& K, int b, int nth, bool reverse, std::vector<float>& M,
                           std::vector<float>& Q) {
  const int bb = b * b;
  std::vector<float> A(bb), col(b);
  for (int e = 0; e < bb; ++e) A[e] = eye_minus(K[e], e, b);
  auto order = [&](int q) { return reverse ? nth - 1 - q : q; };
  for (int p = 0; p < b; ++p) {
    for (int q = 0; q < nth; ++q) gj_save_column(A.data(), col.data(), b, p, order(q), nth);
    for (int q = 0; q < nth; ++q) gj_scale_row(A.data(), col.data(), b, p, order(q), nth);
    for (int q = 0; q < nth; ++q) gj_eliminate(A.data(), col.data(), b, p, order(q), nth);
  }
  M = A;
  Q.resize(bb);
  for (int e = 0; e < bb; ++e) Q[e] = cayley_from_inverse(A[e], e, b);
}

static double frob_dot(const std::vector<float>& a, const std::vector<float>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += (double)a[i] * b[i];
  return s;
}

static void test_cayley() {
  for (int b : {1, 2, 3, 8, 16, 33, 64}) {
    for (float scale : {0.1f, 1.0f, 4.0f}) {
      const std::string tag = "b=" + std::to_string(b) + " scale=" + std::to_string(scale);
      const std::vector<float> K = rand_skew(b, scale);
      std::vector<float> M, Q, M2, Q2;
      emulate_cayley(K, b, 5, false, M, Q);
      emulate_cayley(K, b, 5, true, M2, Q2);
      check(M == M2, "Gauss-Jordan phases are race-free (thread order), " + tag);
      // (I - K) M = I in double
      Mat IK((size_t)b * b), Md(M.begin(), M.end()), Kd(K.begin(), K.end());
      for (int e = 0; e < b * b; ++e) IK[e] = (e / b == e % b) - (double)K[e];
      check(max_abs_diff(matmul(IK, Md, b), identity(b)) < 1e-5 * b, "(I - K) M = I, " + tag);
      // Q = (I + K) M and Q^T Q = I
      Mat IpK((size_t)b * b);
      for (int e = 0; e < b * b; ++e) IpK[e] = (e / b == e % b) + (double)K[e];
      const Mat Qd(Q.begin(), Q.end());
      check(max_abs_diff(Qd, matmul(IpK, Md, b)) < 1e-5 * b, "Q = 2M - I = (I + K)(I - K)^{-1}, " + tag);
      check(max_abs_diff(matmul(transpose(Qd, b), Qd, b), identity(b)) < 1e-5 * b, "Q^T Q = I, " + tag);
      // serial inverse agrees
      std::vector<float> A(b * b), col(b);
      for (int e = 0; e < b * b; ++e) A[e] = eye_minus(K[e], e, b);
      gj_inverse_serial(A.data(), col.data(), b);
      check(max_abs_diff(to_d(A), Md) < 1e-6, "gj_inverse_serial = cooperative steps, " + tag);
      // backward as the kernel computes it: T = G M^T, dK = 2 M^T T; against central differences of <G, Q(K)>
      const std::vector<float> G = randn((size_t)b * b);
      std::vector<float> T(b * b), dK(b * b);
      for (int e = 0; e < b * b; ++e) T[e] = matmul_entry(G.data(), M.data(), b, e / b, e % b, false, true);
      for (int e = 0; e < b * b; ++e) dK[e] = 2.f * matmul_entry(M.data(), T.data(), b, e / b, e % b, true, false);
      const std::vector<float> V = rand_skew(b, 1.f / std::sqrt((float)b));  // ||V||_2 ~ 2
      const float h = 1e-2f;
      std::vector<float> Kp(K), Km(K), Mp, Qp, Mm, Qm;
      for (int e = 0; e < b * b; ++e) {
        Kp[e] += h * V[e];
        Km[e] -= h * V[e];
      }
      emulate_cayley(Kp, b, 1, false, Mp, Qp);
      emulate_cayley(Km, b, 1, false, Mm, Qm);
      const double fd = (frob_dot(G, Qp) - frob_dot(G, Qm)) / (2 * h);
      const double an = frob_dot(dK, V);
      if (std::getenv("GSOPS_VERBOSE")) std::printf("cayley fd %g analytic %g (%s)\n", fd, an, tag.c_str());
      check(std::fabs(fd - an) < 2e-2 * (1 + std::fabs(an)), "dK = 2 M^T G M^T matches central differences, " + tag);
    }
  }
}

// ---------------------------------------------------------------------------
struct Conv {
  int N, C, H, W, groups, kh, kw;
  size_t numel() const { return (size_t)N * C * H * W; }
};

// Naive grouped conv2d (cross-correlation, stride 1, zero same padding) in double.
static std::vector<double> naive_conv(const Conv& s, const std::vector<double>& x, const std::vector<float>& w) {
  const int cg = s.C / s.groups;
  std::vector<double> y(s.numel(), 0.0);
  for (int n = 0; n < s.N; ++n)
    for (int co = 0; co < s.C; ++co)
      for (int h = 0; h < s.H; ++h)
        for (int q = 0; q < s.W; ++q)
          for (int i = 0; i < cg; ++i)
            for (int a = 0; a < s.kh; ++a)
              for (int c = 0; c < s.kw; ++c) {
                const int ci = (co / cg) * cg + i, hh = h + a - s.kh / 2, qq = q + c - s.kw / 2;
                if (hh < 0 || hh >= s.H || qq < 0 || qq >= s.W) continue;
                y[(((size_t)n * s.C + co) * s.H + h) * s.W + q] +=
                    w[(((size_t)co * cg + i) * s.kh + a) * s.kw + c] * x[(((size_t)n * s.C + ci) * s.H + hh) * s.W + qq];
              }
  return y;
}

// L (or L^T) applied with the kernel's conv_entry over every output element.
static std::vector<float> kernel_conv(const Conv& s, const std::vector<float>& x, const std::vector<float>& w,
                                      bool adjoint) {
  const int cg = s.C / s.groups;
  std::vector<float> y(s.numel());
  for (size_t e = 0; e < y.size(); ++e) {
    const int n = (int)(e / ((size_t)s.C * s.H * s.W)), c = (int)((e / ((size_t)s.H * s.W)) % s.C);
    const int h = (int)((e / s.W) % s.H), q = (int)(e % s.W), g = c / cg;
    y[e] = conv_entry(x.data() + ((size_t)n * s.C + (size_t)g * cg) * s.H * s.W, w.data(), cg, s.H, s.W, s.kh, s.kw,
                      g, c % cg, h, q, adjoint);
  }
  return y;
}

// The fused kernel on every (sample, group) slice: conv_exp_term phases with `nth` emulated threads
// (forward or reverse order), cur/nxt swapped after each barrier as in conv_exp_fused_kernel.
static std::vector<float> emulate_fused_conv_exp(const Conv& s, const std::vector<float>& x,
                                                 const std::vector<float>& w, int terms, bool adjoint, int nth,
                                                 bool reverse) {
  const int cg = s.C / s.groups, m = cg * s.H * s.W;
  std::vector<float> y(x.size());
  std::vector<float> buf(3 * (size_t)m);
  for (int n = 0; n < s.N; ++n)
    for (int g = 0; g < s.groups; ++g) {
      const size_t off = ((size_t)n * s.C + (size_t)g * cg) * s.H * s.W;
      float* cur = buf.data();
      float* nxt = cur + m;
      float* acc = cur + 2 * m;
      for (int e = 0; e < m; ++e) acc[e] = cur[e] = x[off + e];
      for (int t = 1; t <= terms; ++t) {
        for (int q = 0; q < nth; ++q)
          conv_exp_term(cur, nxt, acc, w.data(), cg, s.H, s.W, s.kh, s.kw, g, t, adjoint, reverse ? nth - 1 - q : q, nth);
        std::swap(cur, nxt);
      }
      for (int e = 0; e < m; ++e) y[off + e] = acc[e];
    }
  return y;
}

// exp(L) x by the Taylor recurrence the kernels use.
static std::vector<float> conv_exp_host(const Conv& s, const std::vector<float>& x, const std::vector<float>& w,
                                        int terms, bool adjoint) {
  std::vector<float> acc(x), cur(x);
  for (int t = 1; t <= terms; ++t) {
    cur = kernel_conv(s, cur, w, adjoint);
    for (size_t e = 0; e < cur.size(); ++e) {
      cur[e] /= (float)t;
      acc[e] += cur[e];
    }
  }
  return acc;
}

// The weight-gradient recurrence of conv_exp_weight_grad, with conv_weight_grad_entry.
static std::vector<float> conv_exp_weight_grad_host(const Conv& s, const std::vector<float>& x,
                                                    const std::vector<float>& dy, const std::vector<float>& w,
                                                    int terms) {
  const int cg = s.C / s.groups, per_row = cg * s.kh * s.kw;
  std::vector<float> dw((size_t)s.C * per_row, 0.f);
  std::vector<std::vector<float>> a(terms);
  a[0] = x;
  for (int m = 1; m < terms; ++m) a[m] = kernel_conv(s, a[m - 1], w, false);
  double inv_fact = 1;
  for (int k = 2; k <= terms; ++k) inv_fact /= k;
  std::vector<float> c(dy.size());
  for (size_t e = 0; e < c.size(); ++e) c[e] = (float)inv_fact * dy[e];
  for (int m = terms - 1; m >= 0; --m) {
    if (m < terms - 1) {
      inv_fact *= (m + 2);
      c = kernel_conv(s, c, w, true);
      for (size_t e = 0; e < c.size(); ++e) c[e] += (float)inv_fact * dy[e];
    }
    for (int n = 0; n < s.N; ++n)
      for (int co = 0; co < s.C; ++co) {
        const size_t off = ((size_t)n * s.C + (size_t)(co / cg) * cg) * s.H * s.W;
        for (int e = 0; e < per_row; ++e)
          dw[(size_t)co * per_row + e] += conv_weight_grad_entry(c.data() + off, a[m].data() + off, s.H, s.W, s.kh,
                                                                 s.kw, co % cg, e / (s.kh * s.kw), (e / s.kw) % s.kh,
                                                                 e % s.kw);
      }
  }
  return dw;
}

static void test_conv() {
  const Conv shapes[] = {{2, 4, 5, 6, 1, 3, 3}, {1, 6, 4, 4, 3, 3, 3}, {2, 8, 3, 5, 4, 1, 1}, {1, 4, 6, 3, 2, 3, 1}};
  for (const Conv& s : shapes) {
    const int cg = s.C / s.groups;
    const std::string tag = "N=" + std::to_string(s.N) + " C=" + std::to_string(s.C) + " H=" + std::to_string(s.H) +
                            " W=" + std::to_string(s.W) + " groups=" + std::to_string(s.groups) +
                            " k=" + std::to_string(s.kh) + "x" + std::to_string(s.kw);
    const std::vector<float> x = randn(s.numel()), y = randn(s.numel());
    const std::vector<float> w = randn((size_t)s.C * cg * s.kh * s.kw, 0.2f);
    check(max_abs_diff(to_d(kernel_conv(s, x, w, false)), naive_conv(s, to_d(x), w)) < 1e-4, "conv_entry = naive conv, " + tag);
    // adjoint: <L x, y> = <x, L^T y>
    const double lhs = frob_dot(kernel_conv(s, x, w, false), y), rhs = frob_dot(x, kernel_conv(s, y, w, true));
    check(std::fabs(lhs - rhs) < 1e-4 * (1 + std::fabs(lhs)), "conv_entry adjoint is the transpose, " + tag);
    // exp(L)^T = exp(L^T): <exp(L) x, y> = <x, exp(L^T) y>
    const int terms = 6;
    const double e1 = frob_dot(conv_exp_host(s, x, w, terms, false), y);
    const double e2 = frob_dot(x, conv_exp_host(s, y, w, terms, true));
    check(std::fabs(e1 - e2) < 1e-4 * (1 + std::fabs(e1)), "conv_exp input backward = exp(L^T), " + tag);
    // the fused kernel's phases: exp(L) x against the naive double series, and race-free
    for (int adj = 0; adj < 2; ++adj) {
      std::vector<double> want(x.begin(), x.end()), cur(want);
      std::vector<float> wt(w);
      if (adj) {  // L^T as an explicit weight: transpose within the group, flip in space
        for (int co = 0; co < s.C; ++co)
          for (int i = 0; i < cg; ++i)
            for (int a = 0; a < s.kh; ++a)
              for (int c = 0; c < s.kw; ++c)
                wt[(((size_t)co * cg + i) * s.kh + a) * s.kw + c] =
                    w[(((size_t)((co / cg) * cg + i) * cg + co % cg) * s.kh + (s.kh - 1 - a)) * s.kw + (s.kw - 1 - c)];
      }
      for (int t = 1; t <= terms; ++t) {
        cur = naive_conv(s, cur, wt);
        for (size_t e = 0; e < cur.size(); ++e) want[e] += (cur[e] /= t);
      }
      const std::vector<float> f1 = emulate_fused_conv_exp(s, x, w, terms, adj, 7, false);
      const std::vector<float> f2 = emulate_fused_conv_exp(s, x, w, terms, adj, 7, true);
      check(max_abs_diff(to_d(f1), want) < 1e-4, "fused conv_exp = naive series (adjoint=" + std::to_string(adj) + "), " + tag);
      check(f1 == f2, "fused conv_exp phases are race-free (thread order), " + tag);
    }
    // weight gradient recurrence vs central differences of f(w) = <y, exp(L_w) x>
    const std::vector<float> dw = conv_exp_weight_grad_host(s, x, y, w, terms);
    const std::vector<float> V = randn(w.size());
    const float h = 1e-2f;
    std::vector<float> wp(w), wm(w);
    for (size_t e = 0; e < w.size(); ++e) {
      wp[e] += h * V[e];
      wm[e] -= h * V[e];
    }
    const double fd = (frob_dot(y, conv_exp_host(s, x, wp, terms, false)) - frob_dot(y, conv_exp_host(s, x, wm, terms, false))) / (2 * h);
    const double an = frob_dot(dw, V);
    check(std::fabs(fd - an) < 2e-2 * (1 + std::fabs(an)), "conv_exp weight-gradient recurrence matches central differences, " + tag);
  }
}

int main() {
  test_spec_example();
  test_permutations();
  test_block_diag_perm();
  test_cayley();
  test_conv();
  std::printf("gsops host logic test: %d checks, %d failures\n", g_checks, g_failures);
  return g_failures ? 1 : 0;
}
