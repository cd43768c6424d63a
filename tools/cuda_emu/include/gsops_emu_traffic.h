// gsops CUDA emulator: global-memory traffic of the emulated kernels, per warp-wide access.
//
// Only in the traffic build (tools/cuda_emu/traffic.cpp): the kernels are compiled with
// GCC's ThreadSanitizer instrumentation (-fsanitize=thread), which calls __tsan_readN /
// __tsan_writeN before every load and store, and traffic.cpp defines those entry points to
// call record() instead of linking the ThreadSanitizer runtime.  Device memory is torch's CPU
// memory there: an access inside a kernel is counted when it lies in a live torch allocation
// (traffic.cpp's allocator keeps them), so shared memory, stacks, the built-in variables and the
// emulator's own data are not.  The emulator's own functions are not instrumented at all
// (GSOPS_EMU_UNTRACKED: fewer hook calls).
//
// One *access* is the set of lanes of a warp (32 consecutive threads) that execute the same
// load or store site of the kernel for the same time: the k-th execution of a site by a
// thread joins the k-th execution of that site by the other lanes of its warp.  That is the
// hardware's warp-wide instruction when the lanes follow the same path (a lane that skips an
// access, e.g. a masked tail, just does not join it).  An access touches the set of 32-byte
// sectors its lanes' bytes lie in and moves the sum of their sizes; there is no reuse between
// accesses (no cache model), as in perf/traffic.py for the Triton kernels.
//
// Roles, by access size, valid for measurements with fp16/bf16 activations: 2-byte accesses and
// 16-byte (vector) accesses are activations, 4-byte accesses are float32 data (blocks, block
// gradients and their partial sums: float32 in every CUDA kernel of gsops), other sizes are
// counted apart.
#pragma once

#include <algorithm>
#include <cstdint>
#include <map>
#include <string>
#include <tuple>
#include <vector>

#define GSOPS_EMU_UNTRACKED __attribute__((no_sanitize_thread))

namespace gsops_emu {

constexpr int kTrafficRoles = 3;  // 0: activations (2 and 16 bytes), 1: float32 (4 bytes), 2: other sizes
constexpr int kSector = 32;

struct TrafficTotals {
  long long sectors[kTrafficRoles][2] = {};  // [role][0 load, 1 store]
  long long bytes[kTrafficRoles][2] = {};
  long long accesses[kTrafficRoles][2] = {};
};

struct TrafficGroup {
  int role = 0, kind = 0;
  long long bytes = 0;
  std::vector<uint64_t> sectors;
};

struct TrafficState {
  bool on = false;
  TrafficTotals totals;
  std::vector<std::string> launches;
  // per block: (thread, site, kind) -> executions so far; (warp, site, kind, execution) -> the access
  std::map<std::tuple<unsigned, uintptr_t, int>, unsigned> executions;
  std::map<std::tuple<unsigned, uintptr_t, int, unsigned>, TrafficGroup> groups;
};

GSOPS_EMU_UNTRACKED inline TrafficState& traffic() {
  static TrafficState s;
  return s;
}

inline int traffic_role(unsigned size) { return size == 2 || size == 16 ? 0 : size == 4 ? 1 : 2; }

// Folds the accesses of the block that just ran into the totals.
GSOPS_EMU_UNTRACKED inline void traffic_end_block() {
  TrafficState& s = traffic();
  if (!s.on) return;
  for (auto& kv : s.groups) {
    TrafficGroup& g = kv.second;
    std::sort(g.sectors.begin(), g.sectors.end());
    const long long n = std::unique(g.sectors.begin(), g.sectors.end()) - g.sectors.begin();
    s.totals.sectors[g.role][g.kind] += n;
    s.totals.bytes[g.role][g.kind] += g.bytes;
    s.totals.accesses[g.role][g.kind] += 1;
  }
  s.groups.clear();
  s.executions.clear();
}

GSOPS_EMU_UNTRACKED inline void traffic_start() {
  TrafficState& s = traffic();
  s = TrafficState();
  s.on = true;
}

GSOPS_EMU_UNTRACKED inline void traffic_stop() { traffic().on = false; }

}  // namespace gsops_emu
