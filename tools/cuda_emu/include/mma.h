// gsops CUDA emulator: stands in for <mma.h> (nvcuda::wmma) with the documented semantics of the
// 16x16x16 fragments: a fragment here holds its whole tile (every thread of the warp computes the
// same tile, which is what the collective operation produces), float32 accumulation. Checks the
// rules a GPU enforces: pointers 256-bit aligned, ldm a multiple of 16 bytes.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "gsops_emu.h"

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K> struct shape_of;
template <int M, int N, int K> struct shape_of<matrix_a, M, N, K> { static constexpr int rows = M, cols = K; };
template <int M, int N, int K> struct shape_of<matrix_b, M, N, K> { static constexpr int rows = K, cols = N; };
template <int M, int N, int K> struct shape_of<accumulator, M, N, K> { static constexpr int rows = M, cols = N; };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulator models the 16x16x16 shape only");
  static constexpr int rows = shape_of<Use, M, N, K>::rows, cols = shape_of<Use, M, N, K>::cols;
  static constexpr int num_elements = rows * cols;
  float x[rows * cols];  // logical tile, row-major
};

inline float elem_to_float(float v) { return v; }
inline float elem_to_float(__half v) { return __half2float(v); }
inline float elem_to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
GSOPS_EMU_UNTRACKED inline void check_pointer(const char* what, const T* p, unsigned ldm) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0)
    gsops_emu::fail("kernel %s: wmma::%s pointer %p is not 256-bit aligned", gsops_emu::rt().kernel_name, what,
                    static_cast<const void*>(p));
  if ((ldm * sizeof(T)) % 16 != 0)
    gsops_emu::fail("kernel %s: wmma::%s ldm=%u is not a multiple of 16 bytes", gsops_emu::rt().kernel_name, what, ldm);
}

template <typename Use, int M, int N, int K, typename T, typename Layout>
GSOPS_EMU_UNTRACKED inline void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, float v) {
  for (float& e : f.x) e = v;
}

template <typename Use, int M, int N, int K, typename T, typename Layout>
GSOPS_EMU_UNTRACKED inline void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const T* p, unsigned ldm) {
  static_assert(std::is_same<Layout, row_major>::value || std::is_same<Layout, col_major>::value,
                "matrix_a / matrix_b fragments need a layout");
  check_pointer("load_matrix_sync", p, ldm);
  using F = fragment<Use, M, N, K, T, Layout>;
  constexpr bool row = std::is_same<Layout, row_major>::value;
  for (int i = 0; i < F::rows; ++i)
    for (int j = 0; j < F::cols; ++j) f.x[i * F::cols + j] = elem_to_float(row ? p[i * ldm + j] : p[j * ldm + i]);
}

template <int M, int N, int K, typename T>
GSOPS_EMU_UNTRACKED inline void load_matrix_sync(fragment<accumulator, M, N, K, T>& f, const T* p, unsigned ldm, layout_t layout) {
  check_pointer("load_matrix_sync", p, ldm);
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) f.x[i * N + j] = elem_to_float(layout == mem_row_major ? p[i * ldm + j] : p[j * ldm + i]);
}

template <int M, int N, int K, typename T>
GSOPS_EMU_UNTRACKED inline void store_matrix_sync(T* p, const fragment<accumulator, M, N, K, T>& f, unsigned ldm, layout_t layout) {
  static_assert(std::is_same<T, float>::value, "the emulator models float accumulators only");
  check_pointer("store_matrix_sync", p, ldm);
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) (layout == mem_row_major ? p[i * ldm + j] : p[j * ldm + i]) = f.x[i * N + j];
}

// mma_sync is a warp-collective operation: every lane of a warp must issue the same sequence
// with the same fragments. The first lane of a warp to reach its n-th call computes it; the other
// lanes check that their n-th call has the same inputs (else: a divergent warp, an error) and reuse
// the result. At the end of each block every lane of a warp must have made the same number of calls.
struct MmaCall {
  std::vector<float> in, out;
};
struct MmaMemo {
  unsigned long long block = ~0ull;
  std::vector<std::vector<MmaCall>> warps;  // calls per warp, in order
  std::vector<size_t> count;                // calls per thread
};
inline void mma_check_block();
GSOPS_EMU_UNTRACKED inline MmaMemo& mma_memo() {
  static MmaMemo m;
  static const bool hooked = [] {
    gsops_emu::rt().block_end_hooks.push_back(&mma_check_block);
    return true;
  }();
  (void)hooked;
  if (m.block != gsops_emu::rt().block_serial) {
    m.block = gsops_emu::rt().block_serial;
    m.warps.assign((blockDim.x + 31) / 32, {});
    m.count.assign(blockDim.x, 0);
  }
  return m;
}
GSOPS_EMU_UNTRACKED inline void mma_check_block() {
  MmaMemo& m = mma_memo();
  for (size_t t = 0; t < m.count.size(); ++t) {
    const size_t lane0 = t - t % 32;
    if (m.count[t] != m.count[lane0])
      gsops_emu::fail("kernel %s, block %u: lane %zu of warp %zu issued %zu wmma::mma_sync calls, lane 0 issued %zu",
                      gsops_emu::rt().kernel_name, blockIdx.x, t % 32, t / 32, m.count[t], m.count[lane0]);
  }
}

template <int M, int N, int K, typename Ta, typename La, typename Tb, typename Lb, typename Tc>
GSOPS_EMU_UNTRACKED inline void mma_sync(fragment<accumulator, M, N, K, Tc>& d, const fragment<matrix_a, M, N, K, Ta, La>& a,
                     const fragment<matrix_b, M, N, K, Tb, Lb>& b, const fragment<accumulator, M, N, K, Tc>& c) {
  static_assert(std::is_same<Ta, Tb>::value, "wmma::mma_sync: matrix_a and matrix_b element types differ");
  if (!gsops_emu::in_kernel()) gsops_emu::fail("wmma::mma_sync called outside a kernel");
  MmaMemo& m = mma_memo();
  const unsigned t = threadIdx.x;
  std::vector<MmaCall>& calls = m.warps[t / 32];
  const size_t n = m.count[t]++;
  std::vector<float> in(a.x, a.x + M * K);
  in.insert(in.end(), b.x, b.x + K * N);
  in.insert(in.end(), c.x, c.x + M * N);
  if (n < calls.size()) {
    if (std::memcmp(in.data(), calls[n].in.data(), in.size() * sizeof(float)) != 0)
      gsops_emu::fail("kernel %s, block %u: lanes of warp %u issue wmma::mma_sync call %zu with different fragments",
                      gsops_emu::rt().kernel_name, blockIdx.x, t / 32, n);
    std::copy(calls[n].out.begin(), calls[n].out.end(), d.x);
    ++gsops_emu::rt().mma_reused;
    return;
  }
  std::vector<float> out(M * N);
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float s = c.x[i * N + j];
      for (int k = 0; k < K; ++k) s += a.x[i * K + k] * b.x[k * N + j];
      out[i * N + j] = s;
    }
  std::copy(out.begin(), out.end(), d.x);
  calls.push_back({std::move(in), std::move(out)});
  ++gsops_emu::rt().mma_computed;
}

}  // namespace wmma
}  // namespace nvcuda
