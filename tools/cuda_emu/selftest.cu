// Self-test of the gsops CUDA emulator (tools/cuda_emu): small kernels, one per rule the emulator
// enforces. `selftest ok` must print "selftest ok" and exit 0; every other case must stop with
// "gsops emulator error: ..." (checked by tests/test_csrc_emulated.py). Emulator only: a real
// GPU would hang or give undefined results on most of these.
#include <cuda_runtime.h>
#include <mma.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

namespace {

// Tree reduction in shared memory (barriers in a loop) plus an atomicAdd across blocks.
__global__ void reduce_kernel(const float* x, float* partial, float* total, int n) {
  extern __shared__ float s[];
  const int t = threadIdx.x;
  const int i = blockIdx.x * blockDim.x + t;
  s[t] = i < n ? x[i] : 0.f;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (t < stride) s[t] += s[t + stride];
    __syncthreads();
  }
  if (t == 0) {
    partial[blockIdx.x] = s[0];
    atomicAdd(total, s[0]);
  }
}

// Each thread reads its right neighbour's value: correct only with the barrier.
__global__ void neighbour_kernel(float* y, bool barrier) {
  extern __shared__ float s[];
  const int t = threadIdx.x;
  s[t] = (float)t;
  if (barrier) __syncthreads();
  y[t] = s[(t + 1) % blockDim.x];
}

__global__ void divergent_kernel() {
  if (threadIdx.x < 32) __syncthreads();
}

__global__ void two_sites_kernel() {
  if (threadIdx.x % 2) {
    __syncthreads();
  } else {
    __syncthreads();
  }
}

__global__ void late_barrier_kernel() {
  if (blockIdx.x == 1) __syncthreads();
}

__global__ void big_smem_kernel(float* y) {
  extern __shared__ float s[];
  s[threadIdx.x] = 1.f;
  y[threadIdx.x] = s[threadIdx.x];
}

// One 16x16x16 product per warp; `skew` makes lane 0 of warp 0 load another tile (divergent warp),
// `offset` shifts the A pointer by that many elements (misaligned when not a multiple of 16).
__global__ void wmma_kernel(const __half* a, const __half* b, float* c, int skew, int offset) {
  namespace wmma = nvcuda::wmma;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 0.f);
  wmma::load_matrix_sync(fa, a + offset + (threadIdx.x == 0 ? skew : 0), 16);
  wmma::load_matrix_sync(fb, b, 16);
  wmma::mma_sync(acc, fa, fb, acc);
  wmma::store_matrix_sync(c, acc, 16, wmma::mem_row_major);
}

int fail(const char* what) {
  std::printf("selftest FAILED: %s\n", what);
  return 1;
}

int case_ok() {
  const int n = 1000, threads = 128, blocks = (n + threads - 1) / threads;
  std::vector<float> x(n);
  double want = 0;
  for (int i = 0; i < n; ++i) want += (x[i] = (float)(i % 17) - 8.f);
  float *dx, *dpartial, *dtotal;
  cudaMalloc(&dx, n * sizeof(float));
  cudaMalloc(&dpartial, blocks * sizeof(float));
  cudaMalloc(&dtotal, sizeof(float));
  cudaMemcpy(dx, x.data(), n * sizeof(float), cudaMemcpyHostToDevice);
  cudaMemset(dtotal, 0, sizeof(float));
  reduce_kernel<<<blocks, threads, threads * sizeof(float)>>>(dx, dpartial, dtotal, n);
  if (cudaGetLastError() != cudaSuccess) return fail("reduce launch");
  float total = 0;
  std::vector<float> partial(blocks);
  cudaMemcpy(&total, dtotal, sizeof(float), cudaMemcpyDeviceToHost);
  cudaMemcpy(partial.data(), dpartial, blocks * sizeof(float), cudaMemcpyDeviceToHost);
  double sum = 0;
  for (float p : partial) sum += p;
  if (total != (float)want || sum != want) return fail("reduction");

  // the same neighbour read with and without the barrier: only the first is right
  float* dy;
  cudaMalloc(&dy, 64 * sizeof(float));
  std::vector<float> y(64);
  for (int barrier = 1; barrier >= 0; --barrier) {
    neighbour_kernel<<<1, 64, 64 * sizeof(float)>>>(dy, barrier);
    cudaMemcpy(y.data(), dy, 64 * sizeof(float), cudaMemcpyDeviceToHost);
    bool right = true;
    for (int t = 0; t < 64; ++t) right = right && y[t] == (float)((t + 1) % 64);
    if (right != (bool)barrier) return fail(barrier ? "neighbour read with a barrier" : "missing barrier not visible");
  }

  // > 48 KiB of dynamic shared memory: refused until the kernel opts in, then runs
  const size_t big = 64 * 1024;
  big_smem_kernel<<<1, 32, big>>>(dy);
  if (cudaGetLastError() != cudaErrorInvalidValue) return fail("64 KiB launch without opting in was not refused");
  if (cudaFuncSetAttribute(big_smem_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)big) != cudaSuccess)
    return fail("opt-in to 64 KiB");
  big_smem_kernel<<<1, 32, big>>>(dy);
  if (cudaGetLastError() != cudaSuccess) return fail("64 KiB launch after opting in");
  if (cudaFuncSetAttribute(big_smem_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 300 * 1024) == cudaSuccess)
    return fail("300 KiB opt-in accepted");
  divergent_kernel<<<1, 2048>>>();
  if (cudaGetLastError() != cudaErrorInvalidConfiguration) return fail("2048 threads per block accepted");

  // WMMA: C = A B for fp16 tiles, every lane of two warps
  std::vector<__half> a(256), b(256);
  std::vector<double> want_c(256, 0.0);
  for (int e = 0; e < 256; ++e) {
    a[e] = __float2half((float)((e * 7) % 11) - 5.f);
    b[e] = __float2half((float)((e * 3) % 13) - 6.f);
  }
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j)
      for (int k = 0; k < 16; ++k) want_c[i * 16 + j] += __half2float(a[i * 16 + k]) * __half2float(b[j * 16 + k]);
  __half *da, *db;
  float* dc;
  cudaMalloc(&da, 512 * sizeof(__half));
  cudaMalloc(&db, 256 * sizeof(__half));
  cudaMalloc(&dc, 256 * sizeof(float));
  cudaMemcpy(da, a.data(), 256 * sizeof(__half), cudaMemcpyHostToDevice);
  cudaMemcpy(db, b.data(), 256 * sizeof(__half), cudaMemcpyHostToDevice);
  wmma_kernel<<<2, 64>>>(da, db, dc, 0, 0);
  std::vector<float> c(256);
  cudaMemcpy(c.data(), dc, 256 * sizeof(float), cudaMemcpyDeviceToHost);
  for (int e = 0; e < 256; ++e)
    if (c[e] != (float)want_c[e]) return fail("wmma product");
  std::printf("selftest ok\n");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const char* which = argc > 1 ? argv[1] : "ok";
  if (!std::strcmp(which, "ok")) return case_ok();
  __half* buf;
  float* out;
  cudaMalloc(&buf, 512 * sizeof(__half));
  cudaMalloc(&out, 256 * sizeof(float));
  std::vector<__half> h(512);
  for (int e = 0; e < 512; ++e) h[e] = __float2half((float)(e % 64));
  cudaMemcpy(buf, h.data(), 512 * sizeof(__half), cudaMemcpyHostToDevice);
  if (!std::strcmp(which, "divergent")) divergent_kernel<<<1, 64>>>();
  else if (!std::strcmp(which, "two_sites")) two_sites_kernel<<<1, 64>>>();
  else if (!std::strcmp(which, "late_barrier")) late_barrier_kernel<<<2, 32>>>();
  else if (!std::strcmp(which, "wmma_divergent")) wmma_kernel<<<1, 32>>>(buf, buf, out, 16, 0);
  else if (!std::strcmp(which, "wmma_misaligned")) wmma_kernel<<<1, 32>>>(buf, buf, out, 0, 1);
  else return fail("unknown case");
  std::printf("selftest: case %s was not detected\n", which);
  return 1;
}
