// The device of the emulator build of csrc/bindings.cpp: CPU tensors, the kernels run by the
// CUDA emulator on the CPU (python tools/cuda_emu/run.py --extension puts this directory ahead
// of csrc/include). The names and their meaning: csrc/include/gsops/device.h.
#pragma once

#define GSOPS_ON_DEVICE(t) (t).is_cpu()
#define GSOPS_DEVICE_WORD "a CPU tensor (gsops CUDA emulator)"
#define GSOPS_DEVICE_TYPE "cpu"
#define GSOPS_GUARD(t)
#define GSOPS_STREAM nullptr
#define GSOPS_DEVICE_INDEX(t) 0
#define GSOPS_DISPATCH_KEY CPU
