// gsops CUDA emulator: stands in for <cuda_fp16.h>. IEEE binary16 with round-to-nearest-even
// conversions (GCC's _Float16), the same values the device intrinsics give.
#pragma once
#include <cstring>
#include <vector>

#include "gsops_emu.h"

struct __half {
  unsigned short __x;
};

GSOPS_EMU_UNTRACKED inline __half __float2half_rn(float v) {
  const _Float16 h = (_Float16)v;
  __half r;
  std::memcpy(&r.__x, &h, sizeof(h));
  return r;
}
inline __half __float2half(float v) { return __float2half_rn(v); }
GSOPS_EMU_UNTRACKED inline float __half2float(__half v) {
  static const std::vector<float> table = [] {  // all 65536 values: the software conversion is slow
    std::vector<float> t(65536);
    for (unsigned u = 0; u < 65536; ++u) {
      const unsigned short bits = (unsigned short)u;
      _Float16 h;
      std::memcpy(&h, &bits, sizeof(h));
      t[u] = (float)h;
    }
    return t;
  }();
  return table[v.__x];
}
