// The device csrc/bindings.cpp takes tensors on: CUDA. The binding reads only these names:
//   GSOPS_ON_DEVICE(t)      whether tensor t is on the device
//   GSOPS_DEVICE_WORD       how an argument check names the device ("x must be a CUDA tensor")
//   GSOPS_DEVICE_TYPE       torch's device type string, exported as gsops._C.device_type
//   GSOPS_GUARD(t)          a guard that makes t's device current for the launch
//   GSOPS_STREAM            the stream the kernels are launched on
//   GSOPS_DEVICE_INDEX(t)   the index of t's device (for per-device launch limits)
//   GSOPS_DISPATCH_KEY      the torch dispatch key the ops are registered under
// A build for another device puts a directory with its own gsops/device.h ahead of csrc/include.
#pragma once

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#define GSOPS_ON_DEVICE(t) (t).is_cuda()
#define GSOPS_DEVICE_WORD "a CUDA tensor"
#define GSOPS_DEVICE_TYPE "cuda"
#define GSOPS_GUARD(t) const c10::cuda::CUDAGuard guard((t).device())
#define GSOPS_STREAM c10::cuda::getCurrentCUDAStream()
#define GSOPS_DEVICE_INDEX(t) (t).get_device()
#define GSOPS_DISPATCH_KEY CUDA
