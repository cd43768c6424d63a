// gsops CUDA kernels: launch-time setup done once per process, not per launch (host code).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <map>
#include <mutex>
#include <utility>

namespace gsops {

// Dynamic shared memory a kernel may use without raising its attribute.
constexpr size_t kDefaultDynamicSmem = 48 * 1024;

// Lets `kernel` use `smem` bytes of dynamic shared memory on the current device. The driver call
// (cudaFuncSetAttribute) is made once per (kernel, device) and again only when a launch needs more
// than was set before; every other launch is a lookup. cudaGetDevice is a read of the runtime's
// per-thread current device (no driver call).
template <typename F>
cudaError_t ensure_dynamic_smem(F* kernel, size_t smem) {
  if (smem <= kDefaultDynamicSmem) return cudaSuccess;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, size_t> granted;
  std::lock_guard<std::mutex> lock(mu);
  size_t& have = granted[{reinterpret_cast<const void*>(kernel), device}];
  if (smem <= have) return cudaSuccess;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (err == cudaSuccess) have = smem;
  return err;
}

// Compute-capability major version of the current device, asked of the driver once per device.
inline cudaError_t current_cc_major(int* major) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  static std::mutex mu;
  static std::map<int, int> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(device);
  if (it == cache.end()) {
    int v = 0;
    err = cudaDeviceGetAttribute(&v, cudaDevAttrComputeCapabilityMajor, device);
    if (err != cudaSuccess) return err;
    it = cache.emplace(device, v).first;
  }
  *major = it->second;
  return cudaSuccess;
}

}  // namespace gsops
