// gsops CUDA emulator: runs the kernels of csrc/ on a CPU, as written, so that their
// logic is executed (not only compiled) on machines without a GPU.
//
// Model (enough for the kernels in csrc/, checked where a GPU would fail or misbehave):
// * a launch runs its CUDA blocks one after another; the threads of a block are
//   fibers (ucontext) on one OS thread. A fiber runs until its next __syncthreads()
//   or the end of the kernel, then the next fiber runs (order: GSOPS_EMU_ORDER =
//   forward | reverse), so a missing barrier shows up as a read of data another
//   thread has not written yet;
// * __syncthreads() must be reached by every thread of the block at the same call
//   site: a thread that exits while others wait, or two sites at once, is an error;
// * dynamic shared memory is allocated per launch with exactly the requested size and
//   filled with 0xff (NaN) before each block; global memory from cudaMalloc likewise:
//   reads of never-written memory give NaN, out-of-bounds accesses are caught by
//   AddressSanitizer (the runner builds with it);
// * launch limits of an sm_90 part: <= 1024 threads, dynamic shared memory above
//   48 KiB only after cudaFuncSetAttribute(MaxDynamicSharedMemorySize), at most 227 KiB (GSOPS_EMU_SMEM_OPTIN_KB
//   sets another opt-in maximum, e.g. 163 for an sm_80 part);
// * WMMA (nvcuda::wmma, 16x16x16) by its documented semantics, checking the 256-bit
//   pointer alignment and the ldm rule; float32 accumulation.
// Not modelled: timing, warp-level scheduling, memory-model races between blocks,
// atomics' non-determinism (atomicAdd is an ordinary add here).
//
// Any emulator error prints "gsops emulator error: ..." and aborts.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <chrono>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "gsops_emu_traffic.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// The built-in variables: set by the scheduler before a fiber runs.
inline dim3 threadIdx, blockIdx, blockDim, gridDim;

enum cudaError {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
  cudaErrorNoDevice = 100,
  cudaErrorLaunchFailure = 719,
};
typedef enum cudaError cudaError_t;
struct CUstream_st;
typedef CUstream_st* cudaStream_t;
struct CUevent_st {
  std::chrono::steady_clock::time_point t;
};
typedef CUevent_st* cudaEvent_t;
enum cudaMemcpyKind { cudaMemcpyHostToHost, cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice, cudaMemcpyDefault };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
struct cudaDeviceProp {
  char name[256];
  int major, minor, multiProcessorCount;
  size_t sharedMemPerBlock, sharedMemPerBlockOptin, totalGlobalMem;
};

namespace gsops_emu {

constexpr int kMaxThreads = 1024;
constexpr size_t kDefaultSmem = 48 * 1024;
constexpr size_t kMaxSmemOptin = 227 * 1024;  // H100 (sm_90)
constexpr size_t kFiberStack = 64 * 1024;  // ASan clears the shadow of the whole stack on each switch: keep it small

// One line on stderr: prefix, then the printf-style message.
inline void report(const char* prefix, const char* fmt, va_list ap) {
  std::fflush(stdout);
  std::fprintf(stderr, "%s", prefix);
  std::vfprintf(stderr, fmt, ap);
  std::fprintf(stderr, "\n");
}

[[noreturn]] inline void fail(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  report("gsops emulator error: ", fmt, ap);
  va_end(ap);
  std::abort();
}

inline int env_int(const char* name, int dflt) {
  const char* v = std::getenv(name);
  return v && *v ? std::atoi(v) : dflt;
}

enum class FiberState { Ready, Barrier, Done };

struct Fiber {
  ucontext_t ctx;
  char* stack = nullptr;
  FiberState state = FiberState::Ready;
  const char* file = nullptr;
  int line = 0;
};

struct Runtime {
  ucontext_t main_ctx;
  std::vector<Fiber> fibers;
  int current = -1;
  const std::function<void()>* body = nullptr;
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;
  const char* kernel_name = "";  // "<callee> launched at <file>:<line>", for messages
  std::string kernel_label;
  std::map<const void*, int> smem_optin;  // cudaFuncSetAttribute(MaxDynamicSharedMemorySize)
  cudaError_t last_error = cudaSuccess;
  bool reverse = false;
  bool direct = false;                   // this launch runs threads as plain calls (see Launch)
  unsigned long long block_serial = 0;   // increases with every block run (per-block state of mma.h)
  std::vector<void (*)()> block_end_hooks;
  long long launches = 0, blocks = 0, barrier_rounds = 0, mma_computed = 0, mma_reused = 0;
  Runtime() {
    const char* order = std::getenv("GSOPS_EMU_ORDER");
    reverse = order && std::strcmp(order, "reverse") == 0;
    if (order && *order && !reverse && std::strcmp(order, "forward") != 0)
      fail("GSOPS_EMU_ORDER=%s: expected forward or reverse", order);
  }
  ~Runtime() {
    for (auto& f : fibers) std::free(f.stack);
    if (env_int("GSOPS_EMU_STATS", 0))
      std::printf("gsops emulator stats: launches=%lld blocks=%lld barrier_rounds=%lld mma_sync=%lld (+%lld lanes reusing)\n",
                  launches, blocks, barrier_rounds, mma_computed, mma_reused);
  }
};

GSOPS_EMU_UNTRACKED inline Runtime& rt() {
  static Runtime r;
  return r;
}

GSOPS_EMU_UNTRACKED inline bool in_kernel() { return rt().current >= 0; }

GSOPS_EMU_UNTRACKED inline void fiber_entry() {
  Runtime& r = rt();
  (*r.body)();
  Fiber& f = r.fibers[r.current];
  f.state = FiberState::Done;
  swapcontext(&f.ctx, &r.main_ctx);
  fail("a finished fiber was resumed");
}

GSOPS_EMU_UNTRACKED inline void syncthreads_at(const char* file, int line) {
  Runtime& r = rt();
  if (!in_kernel()) fail("__syncthreads() called outside a kernel (%s:%d)", file, line);
  if (r.direct)
    fail("kernel %s: __syncthreads() (%s:%d) in block %u but not in block 0 of the launch; the emulator runs "
         "barrier-free launches without fibers and cannot model a barrier that only some blocks take",
         r.kernel_name, file, line, blockIdx.x);
  Fiber& f = r.fibers[r.current];
  f.state = FiberState::Barrier;
  f.file = file;
  f.line = line;
  swapcontext(&f.ctx, &r.main_ctx);
}

GSOPS_EMU_UNTRACKED inline void end_block() {
  for (auto hook : rt().block_end_hooks) hook();
  traffic_end_block();
  rt().current = -1;
}

// Runs one CUDA block of a launch whose block 0 took no barrier: each thread is a plain call.
GSOPS_EMU_UNTRACKED inline void run_block_direct(unsigned nthreads) {
  Runtime& r = rt();
  ++r.block_serial;
  for (unsigned i = 0; i < nthreads; ++i) {
    const unsigned t = r.reverse ? nthreads - 1 - i : i;
    r.current = (int)t;
    threadIdx = dim3(t, 0, 0);
    (*r.body)();
  }
  end_block();
}

// Runs one CUDA block: every thread as a fiber, round by round between barriers.
// Returns whether any thread waited at a barrier.
GSOPS_EMU_UNTRACKED inline bool run_block(unsigned nthreads) {
  Runtime& r = rt();
  ++r.block_serial;
  bool barrier = false;
  if (r.fibers.size() < nthreads) r.fibers.resize(nthreads);
  for (unsigned t = 0; t < nthreads; ++t) {
    Fiber& f = r.fibers[t];
    if (!f.stack && !(f.stack = static_cast<char*>(std::malloc(kFiberStack)))) fail("out of memory for fiber stacks");
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kFiberStack;
    f.ctx.uc_link = &r.main_ctx;
    makecontext(&f.ctx, fiber_entry, 0);
    f.state = FiberState::Ready;
  }
  for (;;) {
    for (unsigned i = 0; i < nthreads; ++i) {
      const unsigned t = r.reverse ? nthreads - 1 - i : i;
      Fiber& f = r.fibers[t];
      if (f.state != FiberState::Ready) continue;
      r.current = (int)t;
      threadIdx = dim3(t, 0, 0);
      swapcontext(&r.main_ctx, &f.ctx);
    }
    r.current = -1;
    unsigned waiting = 0, done = 0;
    const Fiber* first = nullptr;
    for (unsigned t = 0; t < nthreads; ++t) {
      const Fiber& f = r.fibers[t];
      if (f.state == FiberState::Done) {
        ++done;
        continue;
      }
      ++waiting;
      if (!first) {
        first = &f;
      } else if (f.line != first->line || std::strcmp(f.file, first->file) != 0) {
        fail("kernel %s, block %u: threads wait at two different __syncthreads() (%s:%d and %s:%d)", r.kernel_name,
             blockIdx.x, first->file, first->line, f.file, f.line);
      }
    }
    if (waiting == 0) {
      end_block();
      return barrier;
    }
    barrier = true;
    ++r.barrier_rounds;
    if (done > 0)
      fail("kernel %s, block %u: %u of %u threads wait at __syncthreads() (%s:%d) while %u exited the kernel",
           r.kernel_name, blockIdx.x, waiting, nthreads, first->file, first->line, done);
    for (unsigned t = 0; t < nthreads; ++t) r.fibers[t].state = FiberState::Ready;
  }
}

inline cudaError_t launch_error(cudaError_t e, const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  report("gsops emulator: launch refused: ", fmt, ap);
  va_end(ap);
  rt().last_error = e;
  return e;
}

template <typename F>
struct Launch {
  F* kernel;
  const char* name;
  const char* file;
  int line;
  dim3 grid, block;
  size_t smem;

  template <typename... A>
  GSOPS_EMU_UNTRACKED void operator()(A&&... args) const {
    Runtime& r = rt();
    if (in_kernel()) fail("kernel %s launched from inside kernel %s", name, r.kernel_name);
    r.kernel_label = std::string(name) + " launched at " + file + ":" + std::to_string(line);
    if (traffic().on) traffic().launches.push_back(r.kernel_label);
    const char* name = r.kernel_label.c_str();
    const unsigned long long threads = (unsigned long long)block.x * block.y * block.z;
    if (block.y != 1 || block.z != 1 || grid.y != 1 || grid.z != 1)
      fail("kernel %s: only 1-D grids and blocks are modelled", name);
    if (grid.x == 0 || threads == 0 || threads > (unsigned long long)kMaxThreads) {
      launch_error(cudaErrorInvalidConfiguration, "kernel %s: grid %u, %llu threads per block", name, grid.x, threads);
      return;
    }
    auto it = r.smem_optin.find(reinterpret_cast<const void*>(kernel));
    const size_t limit = it == r.smem_optin.end() ? kDefaultSmem : std::max(kDefaultSmem, (size_t)it->second);
    if (smem > limit) {
      launch_error(cudaErrorInvalidValue,
                   "kernel %s: %zu bytes of dynamic shared memory, limit %zu (raise it with cudaFuncSetAttribute)",
                   name, smem, limit);
      return;
    }
    auto packed = std::make_tuple(std::decay_t<A>(args)...);  // kernel arguments are passed by value
    const std::function<void()> body = [this, &packed] { std::apply(kernel, packed); };
    unsigned char* buffer = nullptr;
    if (posix_memalign(reinterpret_cast<void**>(&buffer), 1024, smem ? smem : 1) != 0)
      fail("out of memory for %zu bytes of shared memory", smem);
    r.body = &body;
    r.smem = buffer;
    r.smem_bytes = smem;
    r.kernel_name = name;
    gridDim = grid;
    blockDim = block;
    // Block 0 runs as fibers; when none of its threads waited at a barrier, the other blocks run
    // each thread as a plain call (no context switches), and a barrier there is an error.
    bool fibers = true;
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      blockIdx = dim3(bx, 0, 0);
      std::memset(buffer, 0xff, smem);  // shared memory starts as garbage (NaN)
      if (fibers) {
        fibers = run_block((unsigned)threads);
      } else {
        r.direct = true;
        run_block_direct((unsigned)threads);
        r.direct = false;
      }
      ++r.blocks;
    }
    ++r.launches;
    std::free(buffer);
    r.smem = nullptr;
    r.body = nullptr;
  }
};

template <typename F>
Launch<F> launch(F* kernel, const char* name, const char* file, int line, dim3 grid, dim3 block, size_t smem = 0,
                 cudaStream_t = nullptr) {
  return Launch<F>{kernel, name, file, line, grid, block, smem};
}

template <typename T>
GSOPS_EMU_UNTRACKED T* dynamic_smem() {
  if (!in_kernel()) fail("extern __shared__ memory used outside a kernel");
  return reinterpret_cast<T*>(rt().smem);
}

}  // namespace gsops_emu

#define __syncthreads() ::gsops_emu::syncthreads_at(__FILE__, __LINE__)

// ---- device functions --------------------------------------------------------
template <typename A, typename B>
inline std::common_type_t<A, B> min(A a, B b) {
  return b < a ? b : a;
}
template <typename A, typename B>
inline std::common_type_t<A, B> max(A a, B b) {
  return a < b ? b : a;
}
inline float atomicAdd(float* p, float v) {
  const float old = *p;
  *p = old + v;
  return old;
}
inline double atomicAdd(double* p, double v) {
  const double old = *p;
  *p = old + v;
  return old;
}
inline int atomicAdd(int* p, int v) {
  const int old = *p;
  *p = old + v;
  return old;
}
// read-only cache load: an ordinary load here (inlined, so an access is counted at its call site)
template <typename T>
__attribute__((always_inline)) inline T __ldg(const T* p) {
  return *p;
}
[[noreturn]] inline void __trap() { gsops_emu::fail("__trap() in kernel %s", gsops_emu::rt().kernel_name); }

// ---- runtime API -------------------------------------------------------------
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
  }
  return "unknown error";
}
inline cudaError_t cudaGetLastError() {
  const cudaError_t e = gsops_emu::rt().last_error;
  gsops_emu::rt().last_error = cudaSuccess;
  return e;
}
inline cudaError_t cudaPeekAtLastError() { return gsops_emu::rt().last_error; }
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaGetDeviceCount(int* n) {
  *n = 1;
  return cudaSuccess;
}
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int d) { return d == 0 ? cudaSuccess : cudaErrorInvalidDevice; }
// The emulated part: sm_90 (H100) unless GSOPS_EMU_SM says otherwise (e.g. 75: no tensor-core path).
inline int emu_sm() { return gsops_emu::env_int("GSOPS_EMU_SM", 90); }
// The opt-in shared memory per block: 227 KiB (sm_90) unless GSOPS_EMU_SMEM_OPTIN_KB says otherwise (163: A100).
inline size_t emu_smem_optin() { return (size_t)gsops_emu::env_int("GSOPS_EMU_SMEM_OPTIN_KB", (int)(gsops_emu::kMaxSmemOptin / 1024)) * 1024; }
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr attr, int device) {
  if (device != 0) return cudaErrorInvalidDevice;
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *v = gsops_emu::kMaxThreads; return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *v = 132; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *v = emu_sm() / 10; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *v = emu_sm() % 10; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = (int)emu_smem_optin(); return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}
inline cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int device) {
  if (device != 0) return cudaErrorInvalidDevice;
  std::memset(p, 0, sizeof(*p));
  std::snprintf(p->name, sizeof(p->name), "gsops CPU emulator (sm_%d model)", emu_sm());
  p->major = emu_sm() / 10;
  p->minor = emu_sm() % 10;
  p->multiProcessorCount = 132;
  p->sharedMemPerBlock = gsops_emu::kDefaultSmem;
  p->sharedMemPerBlockOptin = emu_smem_optin();
  p->totalGlobalMem = (size_t)1 << 34;
  return cudaSuccess;
}
template <typename F>
cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  if (value < 0 || (size_t)value > emu_smem_optin()) {
    std::fprintf(stderr, "gsops emulator: cudaFuncSetAttribute(MaxDynamicSharedMemorySize, %d) above %zu\n", value,
                 emu_smem_optin());
    return cudaErrorInvalidValue;
  }
  gsops_emu::rt().smem_optin[reinterpret_cast<const void*>(kernel)] = value;
  return cudaSuccess;
}
template <typename T>
cudaError_t cudaMalloc(T** p, size_t bytes) {
  void* q = nullptr;
  if (posix_memalign(&q, 256, bytes ? bytes : 1) != 0) return cudaErrorMemoryAllocation;
  std::memset(q, 0xff, bytes);  // device memory starts as garbage (NaN)
  *p = static_cast<T*>(q);
  return cudaSuccess;
}
inline cudaError_t cudaFree(void* p) {
  std::free(p);
  return cudaSuccess;
}
inline cudaError_t cudaMemset(void* p, int v, size_t bytes) {
  std::memset(p, v, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t bytes, cudaStream_t = nullptr) { return cudaMemset(p, v, bytes); }
inline cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind) {
  std::memmove(dst, src, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind k, cudaStream_t = nullptr) {
  return cudaMemcpy(dst, src, bytes, k);
}
inline cudaError_t cudaEventCreate(cudaEvent_t* e) {
  *e = new CUevent_st;
  return cudaSuccess;
}
inline cudaError_t cudaEventDestroy(cudaEvent_t e) {
  delete e;
  return cudaSuccess;
}
inline cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t = nullptr) {
  e->t = std::chrono::steady_clock::now();
  return cudaSuccess;
}
inline cudaError_t cudaEventSynchronize(cudaEvent_t) { return cudaSuccess; }
inline cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t a, cudaEvent_t b) {
  *ms = std::chrono::duration<float, std::milli>(b->t - a->t).count();
  return cudaSuccess;
}
