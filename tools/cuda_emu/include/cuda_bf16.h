// gsops CUDA emulator: stands in for <cuda_bf16.h>. bfloat16 = the top 16 bits of a float32,
// rounded to nearest even (NaN kept quiet), as __float2bfloat16_rn does on the device.
#pragma once
#include <cstdint>
#include <cstring>

#include "gsops_emu.h"

struct __nv_bfloat16 {
  unsigned short __x;
};

GSOPS_EMU_UNTRACKED inline __nv_bfloat16 __float2bfloat16_rn(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  __nv_bfloat16 r;
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    r.__x = (unsigned short)((u >> 16) | 0x40u);
  } else {
    u += 0x7fffu + ((u >> 16) & 1u);
    r.__x = (unsigned short)(u >> 16);
  }
  return r;
}
inline __nv_bfloat16 __float2bfloat16(float v) { return __float2bfloat16_rn(v); }
GSOPS_EMU_UNTRACKED inline float __bfloat162float(__nv_bfloat16 v) {
  const uint32_t u = (uint32_t)v.__x << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
