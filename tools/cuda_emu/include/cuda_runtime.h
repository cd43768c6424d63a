// gsops CUDA emulator: stands in for <cuda_runtime.h> (see gsops_emu.h).
#pragma once
#include "gsops_emu.h"
