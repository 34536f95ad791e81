// Fibers, the block scheduler and the barriers of the CUDA emulator (see runtime.h).
#include "emu/runtime.h"

#include "emu/racecheck.h"
#include "emu/tma.h"

#include <ucontext.h>

#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <map>
#include <memory>
#include <new>
#include <mutex>
#include <stdexcept>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define KVK_EMU_ASAN 1
#endif

namespace kvk {
namespace emu {
namespace {

// Deep enough for the kernels' register arrays (the D = 256 accumulators, a few KB) at -O0 and
// under AddressSanitizer, whose redzones grow every frame.
constexpr size_t kStackBytes = 512 * 1024;
// Shared memory poison: 0xFF bytes are NaN in fp32, fp16, bf16 and fp8 e4m3, so a read of a byte
// nobody wrote (or of a cp.async destination before its wait) shows up as a wrong result.
constexpr unsigned char kPoison = 0xFF;

struct Fiber {
  ucontext_t ctx;
  std::unique_ptr<unsigned char[]> stack;
};

// The state of the launch running on this OS thread (a launch never nests).
struct State {
  const Launch* launch = nullptr;
  Block* block = nullptr;
  Thread* thread = nullptr;  // nullptr while the scheduler runs
  ucontext_t scheduler;
  const std::function<void()>* body = nullptr;
  std::string error;  // set by a fiber that failed; the scheduler throws it
#ifdef KVK_EMU_ASAN
  void* fake_stack = nullptr;
  const void* sched_stack_bottom = nullptr;
  size_t sched_stack_size = 0;
#endif
};

thread_local State g;

std::string format_dims(uint3 v) {
  char buf[64];
  snprintf(buf, sizeof(buf), "(%u, %u, %u)", v.x, v.y, v.z);
  return buf;
}

std::string where() {
  std::string s = "kvkernels emulator: kernel ";
  s += g.launch ? g.launch->kernel : "?";
  if (g.block) s += ", block " + format_dims(g.block->idx);
  if (g.thread) s += ", thread " + format_dims(g.thread->idx);
  return s + ": ";
}

// Back to the scheduler; returns when the scheduler resumes this fiber.
void yield() {
  Fiber* f = static_cast<Fiber*>(g.thread->context);
#ifdef KVK_EMU_ASAN
  __sanitizer_start_switch_fiber(&g.fake_stack, g.sched_stack_bottom, g.sched_stack_size);
#endif
  swapcontext(&f->ctx, &g.scheduler);
#ifdef KVK_EMU_ASAN
  __sanitizer_finish_switch_fiber(g.fake_stack, nullptr, nullptr);
#endif
}

void fiber_main() {
#ifdef KVK_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &g.sched_stack_bottom, &g.sched_stack_size);
#endif
  (*g.body)();
  g.thread->done = true;
  g.thread->async.clear();  // copies still in flight at exit land in a block that is gone
  Fiber* f = static_cast<Fiber*>(g.thread->context);
#ifdef KVK_EMU_ASAN
  __sanitizer_start_switch_fiber(nullptr, g.sched_stack_bottom, g.sched_stack_size);  // this fiber ends
#endif
  swapcontext(&f->ctx, &g.scheduler);
  abort();  // a finished fiber is never resumed
}

void resume(Thread& t) {
  g.thread = &t;
  race::set_thread(t.linear);
  Fiber* f = static_cast<Fiber*>(t.context);
#ifdef KVK_EMU_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, f->stack.get(), kStackBytes);
#endif
  swapcontext(&g.scheduler, &f->ctx);
#ifdef KVK_EMU_ASAN
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
  race::set_thread(-1);
  g.thread = nullptr;
}

// "0-31, 64" for a sorted list of thread indices.
std::string ranges(const std::vector<int>& ids) {
  std::string s;
  for (size_t i = 0; i < ids.size();) {
    size_t j = i;
    while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) ++j;
    if (!s.empty()) s += ", ";
    s += std::to_string(ids[i]);
    if (j > i) s += "-" + std::to_string(ids[j]);
    i = j + 1;
  }
  return s;
}

// The warps of a list of threads, "warps 4-7".
std::string warps_of(const std::vector<int>& threads) {
  std::vector<int> warps;
  for (int t : threads) {
    if (warps.empty() || warps.back() != t / kWarpSize) warps.push_back(t / kWarpSize);
  }
  return (warps.size() == 1 ? "warp " : "warps ") + ranges(warps);
}

// The state of every mbarrier, named barrier and setmaxnreg somebody waits at, for a hang report.
std::string describe_sm90_waits(const Block& b) {
  std::string s;
  char buf[256];
  for (const auto& [addr, m] : b.mbarriers) {
    if (m.waiters.empty()) continue;
    std::vector<int> w = m.waiters;
    std::sort(w.begin(), w.end());
    snprintf(buf, sizeof(buf),
             " mbarrier at shared address %u: phase %u (parity %u) incomplete, %u of %u arrivals and %lld "
             "transaction bytes pending, waited on by ",
             addr, m.phase, m.phase & 1u, m.pending, m.count, static_cast<long long>(m.tx));
    s += buf + warps_of(w) + " (threads " + ranges(w) + ");";
  }
  for (int id = 0; id < 16; ++id) {
    const NamedBarrier& n = b.named[id];
    if (n.waiters.empty()) continue;
    std::vector<int> w = n.waiters;
    std::sort(w.begin(), w.end());
    snprintf(buf, sizeof(buf), " named barrier %d: %d of %d threads arrived, waited on by ", id, n.arrived, n.count);
    s += buf + warps_of(w) + ";";
  }
  for (size_t g = 0; g < b.warpgroups.size(); ++g) {
    const Warpgroup& wg = b.warpgroups[g];
    if (wg.waiters.empty() && wg.room_waiter < 0) continue;
    snprintf(buf, sizeof(buf), " setmaxnreg.%s %d of warpgroup %zu (%d registers per thread now): ",
             wg.inc ? "inc" : "dec", wg.requested, g, wg.regs);
    s += buf + (wg.room_waiter < 0 ? std::to_string(wg.arrived) + " of its 128 threads arrived;"
                                   : std::string("the register file (64K) has no room for it;"));
  }
  return s;
}

[[noreturn]] void report_hang(Block& b) {
  std::map<std::string, std::vector<int>> by_state;  // what a thread waits at -> threads
  for (const Thread& t : b.threads) by_state[t.done ? "exited" : t.waiting].push_back(t.linear);
  std::string msg = where() + "hang (a barrier some threads never reach):";
  for (auto& [state, ids] : by_state) {
    msg += (state == "exited" ? " threads " + ranges(ids) + " exited;"
                              : " threads " + ranges(ids) + " wait at " + state + ";");
  }
  msg += describe_sm90_waits(b);
  throw std::runtime_error(msg);
}

void run_block(Block& b, std::vector<Fiber>& fibers) {
  for (size_t i = 0; i < b.threads.size(); ++i) {
    Fiber& f = fibers[i];
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.get();
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_main, 0);
    b.threads[i].context = &f;
  }
  for (;;) {
    bool ran = false, all_done = true;
    for (Thread& t : b.threads) {
      if (t.done) continue;
      all_done = false;
      if (t.waiting) continue;
      resume(t);
      ran = true;
      if (!g.error.empty()) throw std::runtime_error(g.error);
    }
    if (all_done) {
      land_async_copies();  // the block's last copies land in memory nobody reads any more
      return;
    }
    // A scheduling point: the TMA copies issued in this round land now (after their issuers
    // blocked), which may wake threads waiting on their mbarriers.
    const bool landed = land_async_copies();
    if (!g.error.empty()) throw std::runtime_error(g.error);
    if (!ran && !landed) report_hang(b);
  }
}

std::mutex g_attr_mutex;
std::map<const void*, int> g_max_smem;

}  // namespace

Thread& current() {
  if (!g.thread) throw std::logic_error("kvkernels emulator: device function called outside a kernel");
  return *g.thread;
}

Block& current_block() { return *g.block; }
const Launch& current_launch() { return *g.launch; }

void fail(const char* fmt, ...) {
  char buf[1024];
  va_list args;
  va_start(args, fmt);
  vsnprintf(buf, sizeof(buf), fmt, args);
  va_end(args);
  g.error = where() + buf;
  if (!g.thread) throw std::runtime_error(g.error);
  // Inside a fiber: never resumed; the scheduler throws (exceptions must not cross fibers).
  Fiber* f = static_cast<Fiber*>(g.thread->context);
#ifdef KVK_EMU_ASAN
  __sanitizer_start_switch_fiber(nullptr, g.sched_stack_bottom, g.sched_stack_size);
#endif
  swapcontext(&f->ctx, &g.scheduler);
  abort();
}

namespace {
[[maybe_unused]] void report_race(const char* message) { fail("%s", message); }
}  // namespace

namespace {
thread_local int g_arch = 80;
}  // namespace

int emulated_arch() { return g_arch; }
int emulated_smem_optin() { return g_arch == 90 ? kMaxDynamicSmemSm90 : kMaxDynamicSmemSm80; }
EmulatedArch::EmulatedArch(int arch) : saved(g_arch) {
  if (arch != 80 && arch != 90) throw std::logic_error("kvkernels emulator: the emulated arch is 80 or 90");
  g_arch = arch;
}
EmulatedArch::~EmulatedArch() { g_arch = saved; }

void set_max_dynamic_smem(const void* kernel, int bytes) {
  std::lock_guard<std::mutex> lock(g_attr_mutex);
  g_max_smem[kernel] = bytes;
}

int max_dynamic_smem(const void* kernel) {
  std::lock_guard<std::mutex> lock(g_attr_mutex);
  auto it = g_max_smem.find(kernel);
  return it == g_max_smem.end() ? 48 * 1024 : it->second;
}

namespace {
constexpr std::align_val_t kSharedAlign{1024};
struct AlignedDelete {
  void operator()(unsigned char* p) const { ::operator delete[](p, kSharedAlign); }
};
}  // namespace

void run_grid(const char* kernel, dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& body) {
  if (g.launch) throw std::logic_error("kvkernels emulator: a kernel launched from inside a kernel");
  const Launch launch{kernel, grid, block, smem_bytes};
  const int nthreads = static_cast<int>(block.x * block.y * block.z);
  struct Reset {  // leave no dangling state behind, whatever happens
    ~Reset() {
      g.launch = nullptr;
      g.block = nullptr;
      g.thread = nullptr;
      g.body = nullptr;
      g.error.clear();
      drop_async_copies();
      race::block_end();
    }
  } reset;
  g.launch = &launch;
  g.body = &body;
  g.error.clear();
  if (nthreads <= 0 || nthreads > 1024) fail("invalid block size %d", nthreads);
  std::vector<Fiber> fibers(nthreads);
  for (Fiber& f : fibers) f.stack.reset(new unsigned char[kStackBytes]);
  // Exactly the launch's bytes (a read one past the end is outside the allocation under ASan), on a
  // 1024-byte boundary (a 128-byte swizzle atom): host code that swizzles shared pointers by their
  // address bits (CuTe's swizzle_ptr) then agrees with the emulator's swizzles on shared addresses.
  std::unique_ptr<unsigned char[], AlignedDelete> smem(new (kSharedAlign) unsigned char[smem_bytes ? smem_bytes : 1]);
  for (unsigned bz = 0; bz < grid.z; ++bz) {
    for (unsigned by = 0; by < grid.y; ++by) {
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        Block b;
        b.idx = uint3{bx, by, bz};
        b.smem = smem.get();
        b.smem_bytes = smem_bytes;
        memset(b.smem, kPoison, smem_bytes);
        b.threads.resize(nthreads);
        b.warps.resize((nthreads + kWarpSize - 1) / kWarpSize);
        // Registers per thread at launch: the most the register file (64K) gives this block size,
        // as __launch_bounds__(threads, 1) lets the compiler use; setmaxnreg moves from there.
        b.warpgroups.resize(nthreads / 128);
        for (Warpgroup& wg : b.warpgroups) wg.regs = std::min(255, 65536 / nthreads) / 8 * 8;
        for (int i = 0; i < nthreads; ++i) {
          Thread& t = b.threads[i];
          t.linear = i;
          t.idx = uint3{static_cast<unsigned>(i) % block.x, (static_cast<unsigned>(i) / block.x) % block.y,
                        static_cast<unsigned>(i) / (block.x * block.y)};
          t.warp = i / kWarpSize;
          t.lane = i % kWarpSize;
        }
        g.block = &b;
        race::block_begin(b.smem, smem_bytes, nthreads, report_race);
        run_block(b, fibers);
        race::block_end();
        g.block = nullptr;
      }
    }
  }
}

void sync_block(const char* name) {
  Thread& t = current();
  Block& b = *g.block;
  if (++b.barrier_arrived == static_cast<int>(b.threads.size())) {
    b.barrier_arrived = 0;
    race::block_barrier();
    for (Thread& o : b.threads) o.waiting = nullptr;
    return;
  }
  t.waiting = name;
  yield();
}

void block_current(const char* name) {
  Thread& t = current();
  t.waiting = name;
  yield();
}

void wake(int linear) { g.block->threads[linear].waiting = nullptr; }

const uint32_t* warp_collective(const char* name, CollectiveFn fn, uint32_t mask, const uint32_t* in, int n_in) {
  Thread& t = current();
  Block& b = *g.block;
  Warp& w = b.warps[t.warp];
  const uint32_t bit = 1u << t.lane;
  const int first = t.warp * kWarpSize;
  const int lanes = std::min<int>(kWarpSize, static_cast<int>(b.threads.size()) - first);
  const uint32_t existing = lanes == kWarpSize ? 0xFFFFFFFFu : ((1u << lanes) - 1u);
  if (!(mask & bit)) fail("%s: lane %d calls it with mask 0x%08x that does not include it", name, t.lane, mask);
  if (mask & ~existing) fail("%s: mask 0x%08x names lanes the block does not have", name, mask);
  if (w.arrived == 0) {
    w.fn = fn;
    w.name = name;
    w.mask = mask;
  } else if (w.fn != fn || w.mask != mask) {
    fail("warp %d diverged: lane %d is at %s (mask 0x%08x) while lanes of mask 0x%08x wait at %s", t.warp, t.lane,
         name, mask, w.mask, w.name);
  }
  if (n_in) memcpy(w.in[t.lane], in, sizeof(uint32_t) * n_in);  // __syncwarp, elect.sync: no inputs
  w.arrived |= bit;
  if (w.arrived == mask) {
    {
      race::Internal internal;  // the collective acts for every lane: its accesses are not this thread's
      fn(w, b);
    }
    for (int l = 0; l < kWarpSize; ++l) {
      if (!(mask >> l & 1u)) continue;
      Thread& o = b.threads[first + l];
      memcpy(o.out, w.out[l], sizeof(o.out));
      o.waiting = nullptr;
    }
    w.arrived = 0;
    w.fn = nullptr;
    return t.out;
  }
  t.waiting = name;
  yield();
  return t.out;
}

unsigned char* shared_ptr(uint32_t addr, size_t bytes, size_t align, const char* what) {
  const size_t size = g.block->smem_bytes;
  if (static_cast<size_t>(addr) + bytes > size) {
    fail("%s: shared-memory bytes [%u, %zu) outside the launch's %zu bytes", what, addr,
         static_cast<size_t>(addr) + bytes, size);
  }
  if (addr % align) fail("%s: shared address %u is not %zu-byte aligned", what, addr, align);
  return g.block->smem + addr;
}

uint32_t shared_addr(const void* ptr, const char* what) {
  const unsigned char* p = static_cast<const unsigned char*>(ptr);
  const unsigned char* base = g.block->smem;
  if (p < base || p > base + g.block->smem_bytes) fail("%s: %p is not a shared-memory address", what, ptr);
  return static_cast<uint32_t>(p - base);
}

}  // namespace emu
}  // namespace kvk
