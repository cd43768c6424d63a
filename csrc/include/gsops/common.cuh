// gsops CUDA kernels: shared macros and element-type conversions (torch-free).
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define GSOPS_HD __host__ __device__ __forceinline__
#else
#define GSOPS_HD inline
#endif

namespace gsops {

// Element types a kernel reads and writes; arithmetic is always float32.
enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

GSOPS_HD const char* dtype_name(DType dt) {
  return dt == DType::F32 ? "float32" : dt == DType::F16 ? "float16" : dt == DType::BF16 ? "bfloat16" : "unknown";
}

// Number of elements `a` split into tiles of `t` (ceil(a / t)).
GSOPS_HD int64_t ceil_div(int64_t a, int64_t t) { return (a + t - 1) / t; }

// float32 loads/stores (dtype.cuh adds the fp16/bf16 overloads on the device).
GSOPS_HD float to_float(float v) { return v; }
template <typename T> GSOPS_HD T from_float(float v);
template <> GSOPS_HD float from_float<float>(float v) { return v; }

}  // namespace gsops
