// The traffic build of the CUDA emulator extension: global-memory sectors and bytes of every
// warp-wide access of the emulated kernels (model: include/gsops_emu_traffic.h).
//
// The kernels of csrc/ are compiled with -fsanitize=thread (run.py build_extension(traffic=True)):
// GCC then calls __tsan_readN / __tsan_writeN before each load and store. This file defines those
// entry points (the ThreadSanitizer runtime is not linked) and three ops:
//   torch.ops.gsops_emu.traffic_start()   start counting (clears the totals)
//   torch.ops.gsops_emu.traffic_stop()    stop; returns int64 [3 roles, 2 kinds (load, store), 3]
//                                         = (sectors, bytes, accesses)
//   torch.ops.gsops_emu.traffic_launches() the kernels launched since traffic_start, "+"-joined
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cuda_runtime.h>  // the emulator (gsops_emu.h)

#include <c10/core/CPUAllocator.h>
#include <dlfcn.h>

#include <cstring>
#include <mutex>

#include <string>

namespace gsops_emu {
namespace {

// GSOPS_EMU_TRAFFIC_SITES=1: traffic_stop() prints each access site (return address, size, count) on stderr
GSOPS_EMU_UNTRACKED std::map<std::pair<uintptr_t, unsigned>, long long>* debug_sites() {
  static std::map<std::pair<uintptr_t, unsigned>, long long>* m =
      env_int("GSOPS_EMU_TRAFFIC_SITES", 0) ? new std::map<std::pair<uintptr_t, unsigned>, long long>() : nullptr;
  return m;
}

// The device memory of the emulator extension is torch's CPU memory: every CPU allocation goes through
// this allocator (installed when the module loads), which keeps the live ranges. An access is counted
// when it lies in one; the emulator's own data, shared memory, stacks and the built-in variables do not.
std::map<uintptr_t, uintptr_t>& live_ranges() {  // start -> end
  static std::map<uintptr_t, uintptr_t> m;
  return m;
}
std::mutex& live_mutex() {
  static std::mutex m;
  return m;
}

struct TrackingAllocator final : c10::Allocator {
  c10::Allocator* base = nullptr;
  struct Held {
    c10::DataPtr inner;
    uintptr_t start;
  };
  static void release(void* ctx) {
    Held* h = static_cast<Held*>(ctx);
    {
      std::lock_guard<std::mutex> g(live_mutex());
      live_ranges().erase(h->start);
    }
    delete h;
  }
  c10::DataPtr allocate(size_t n) override {
    c10::DataPtr dp = base->allocate(n);
    void* data = dp.get();
    if (data == nullptr) return dp;
    const uintptr_t start = reinterpret_cast<uintptr_t>(data);
    {
      std::lock_guard<std::mutex> g(live_mutex());
      live_ranges()[start] = start + n;
    }
    const c10::Device device = dp.device();
    return c10::DataPtr(data, new Held{std::move(dp), start}, &release, device);
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override { std::memcpy(dest, src, count); }
};

const bool allocator_installed = [] {
  static TrackingAllocator a;
  a.base = c10::GetCPUAllocator();
  c10::SetCPUAllocator(&a, /*priority=*/100);
  return true;
}();

GSOPS_EMU_UNTRACKED bool in_device_memory(uintptr_t a) {
  std::lock_guard<std::mutex> g(live_mutex());
  auto it = live_ranges().upper_bound(a);
  if (it == live_ranges().begin()) return false;
  --it;
  return a < it->second;
}

GSOPS_EMU_UNTRACKED void record(const void* p, unsigned size, int kind, const void* site) {
  TrafficState& s = traffic();
  if (!s.on || rt().current < 0) return;
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (!in_device_memory(a)) return;
  if (debug_sites()) ++(*debug_sites())[std::make_pair(reinterpret_cast<uintptr_t>(site), size)];
  const unsigned t = threadIdx.x;
  const uintptr_t pc = reinterpret_cast<uintptr_t>(site);
  const unsigned k = s.executions[std::make_tuple(t, pc, kind)]++;
  TrafficGroup& g = s.groups[std::make_tuple(t / 32, pc, kind, k)];
  g.role = traffic_role(size);
  g.kind = kind;
  g.bytes += size;
  for (uintptr_t sec = a / kSector; sec <= (a + size - 1) / kSector; ++sec) g.sectors.push_back(sec);
}

at::Tensor stop() {
  traffic_stop();
  if (auto* m = debug_sites()) {
    for (const auto& kv : *m) {
      Dl_info info{};
      const void* pc = reinterpret_cast<const void*>(kv.first.first);
      const bool named = dladdr(pc, &info) && info.dli_sname;
      std::fprintf(stderr, "site %s+%#lx size %u count %lld\n", named ? info.dli_sname : "?",
                   named ? (unsigned long)((const char*)pc - (const char*)info.dli_saddr) : 0ul, kv.first.second,
                   kv.second);
    }
    m->clear();
  }
  const TrafficTotals& t = traffic().totals;
  at::Tensor out = at::zeros({kTrafficRoles, 2, 3}, at::kLong);
  auto a = out.accessor<int64_t, 3>();
  for (int role = 0; role < kTrafficRoles; ++role)
    for (int kind = 0; kind < 2; ++kind) {
      a[role][kind][0] = t.sectors[role][kind];
      a[role][kind][1] = t.bytes[role][kind];
      a[role][kind][2] = t.accesses[role][kind];
    }
  return out;
}

std::string launches() {
  std::string out;
  for (const auto& name : traffic().launches) {
    if (!out.empty()) out += "+";
    // "<callee> launched at <file>:<line>": the callee, and where it was launched when it is a variable
    const std::string callee = name.substr(0, name.find(' '));
    const size_t at = name.rfind('/');
    out += callee == "kernel" ? callee + "@" + name.substr(at == std::string::npos ? name.rfind(' ') + 1 : at + 1)
                              : callee;
  }
  return out;
}

}  // namespace
}  // namespace gsops_emu

#define GSOPS_TSAN_ACCESS(n)                                                                       \
  extern "C" GSOPS_EMU_UNTRACKED void __tsan_read##n(void* p) {                                    \
    gsops_emu::record(p, n, 0, __builtin_return_address(0));                                      \
  }                                                                                                \
  extern "C" GSOPS_EMU_UNTRACKED void __tsan_write##n(void* p) {                                   \
    gsops_emu::record(p, n, 1, __builtin_return_address(0));                                      \
  }                                                                                                \
  extern "C" GSOPS_EMU_UNTRACKED void __tsan_unaligned_read##n(void* p) {                          \
    gsops_emu::record(p, n, 0, __builtin_return_address(0));                                      \
  }                                                                                                \
  extern "C" GSOPS_EMU_UNTRACKED void __tsan_unaligned_write##n(void* p) {                         \
    gsops_emu::record(p, n, 1, __builtin_return_address(0));                                      \
  }
GSOPS_TSAN_ACCESS(1)
GSOPS_TSAN_ACCESS(2)
GSOPS_TSAN_ACCESS(4)
GSOPS_TSAN_ACCESS(8)
GSOPS_TSAN_ACCESS(16)
#undef GSOPS_TSAN_ACCESS

// memcpy/memset-like ranges: not element accesses of the kernels (counted apart, as one access)
extern "C" GSOPS_EMU_UNTRACKED void __tsan_read_range(void* p, unsigned long n) {
  gsops_emu::record(p, (unsigned)n, 0, __builtin_return_address(0));
}
extern "C" GSOPS_EMU_UNTRACKED void __tsan_write_range(void* p, unsigned long n) {
  gsops_emu::record(p, (unsigned)n, 1, __builtin_return_address(0));
}
extern "C" void __tsan_init() {}
extern "C" void __tsan_func_entry(void*) {}
extern "C" void __tsan_func_exit() {}
extern "C" void __tsan_vptr_update(void**, void*) {}
extern "C" void __tsan_vptr_read(void**) {}
extern "C" unsigned char __tsan_atomic8_load(const volatile unsigned char* a, int) {
  return __atomic_load_n(a, __ATOMIC_SEQ_CST);
}
extern "C" void __tsan_atomic8_store(volatile unsigned char* a, unsigned char v, int) {
  __atomic_store_n(a, v, __ATOMIC_SEQ_CST);
}
extern "C" int __tsan_atomic32_load(const volatile int* a, int) { return __atomic_load_n(a, __ATOMIC_SEQ_CST); }
extern "C" void __tsan_atomic32_store(volatile int* a, int v, int) { __atomic_store_n(a, v, __ATOMIC_SEQ_CST); }
extern "C" long __tsan_atomic64_load(const volatile long* a, int) { return __atomic_load_n(a, __ATOMIC_SEQ_CST); }
extern "C" void __tsan_atomic64_store(volatile long* a, long v, int) { __atomic_store_n(a, v, __ATOMIC_SEQ_CST); }

TORCH_LIBRARY(gsops_emu, m) {
  m.def("traffic_start() -> ()", [] { gsops_emu::traffic_start(); });
  m.def("traffic_stop() -> Tensor", &gsops_emu::stop);
  m.def("traffic_launches() -> str", &gsops_emu::launches);
}
