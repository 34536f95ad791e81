// Shadow state of the shared-memory race checker (see emu/racecheck.h) and the instrumentation hooks
// the compiler's -fsanitize=thread pass calls. Compiled WITHOUT that flag (a hook must not call
// itself) and linked into the racecheck variant of the emulator only.
//
// Per byte of the block's shared memory the shadow keeps the last write and the reads since it
// (up to kReadSlots readers exactly, a summary beyond): which thread, and its clocks at the access
// (the block's barrier count, the thread's warp's __syncwarp count, the thread's own clock). An
// access by thread t is ordered after an earlier one by u != t when a barrier both reached lies
// between them (a later block barrier, or a later __syncwarp of their common warp) or when t has
// acquired u's clock of that access through releases and acquires (FastTrack-style vector
// clocks). Conflicting read/write or write/write pairs that are not ordered are reported at the
// second access. TMA copies are agents with thread ids past the block's warps.
#define KVK_EMU_RACECHECK 1
#include "emu/racecheck.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

namespace kvk {
namespace emu {
namespace race {
namespace {

constexpr int16_t kNone = -1;
constexpr int16_t kMany = -2;  // readers of several warps
constexpr int kReadSlots = 8;  // readers of a byte tracked one by one (8: every consumer warp of a wgmma operand)
constexpr int kAgents = 32;    // TMA copies in flight with agents of their own (reused round robin)

struct Access {
  int16_t thread = kNone;
  uint32_t epoch = 0;   // block epoch (0: none)
  uint32_t wclock = 0;  // the thread's warp clock
  uint32_t clock = 0;   // the thread's own clock
};

struct Read {
  int16_t thread;
  uint32_t wclock, clock;
};

struct Cell {
  Access write;             // the last write
  uint32_t r_epoch = 0;     // block epoch of the reads below (0: none)
  uint8_t n_reads = 0;      // readers in `reads`
  bool overflow = false;    // more readers than slots: the summary below orders the rest
  int16_t r_warp = kNone;   // the readers' common warp, kMany when they span warps
  uint32_t r_wclock = 0;    // latest warp clock among the reads
  Read reads[kReadSlots];
};

struct State {
  unsigned char* smem = nullptr;
  size_t bytes = 0;
  int thread = -1;  // running fiber or copy agent, -1: none (scheduler, torch glue, outside any launch)
  bool internal = false;
  bool reporting = false;
  uint32_t epoch = 0;  // block barriers seen in this process (+1 at each block start)
  int threads = 0;     // the block's threads; agents are agent0 .. agent0 + kAgents - 1
  int agent0 = 0;
  int next_agent = 0;
  bool clocks_on = false;  // a release happened in this block: __syncwarp joins the lanes' clocks too
  std::vector<uint32_t> warp_clock;         // per warp, then the agents' pseudo-warp (never synced)
  std::vector<uint32_t> own;                // per thread and agent: its own clock, from 1
  std::vector<std::vector<uint32_t>> seen;  // per thread and agent: the clocks it has acquired (lazily sized)
  std::vector<uint32_t> scratch;
  int saved_thread = -1;  // around a copy agent's scope
  bool saved_internal = false;
  std::vector<Cell> shadow;
  Reporter report = nullptr;
};

thread_local State s;

int warp_of(int thread) { return thread / 32; }
size_t ids() { return s.own.size(); }

// Whether an access by `prior` at (epoch, wclock, clock) is ordered before the running thread's now.
bool ordered(int prior, uint32_t epoch, uint32_t wclock, uint32_t clock) {
  if (prior == s.thread || epoch != s.epoch) return true;
  const int w = warp_of(s.thread);
  if (warp_of(prior) == w && wclock < s.warp_clock[w]) return true;
  const std::vector<uint32_t>& seen = s.seen[s.thread];
  return static_cast<size_t>(prior) < seen.size() && seen[prior] >= clock;
}

void describe(char* out, size_t n, int thread, int warp) {
  if (thread >= s.agent0) {
    snprintf(out, n, "a TMA copy (async proxy)");
  } else if (thread != kMany) {
    snprintf(out, n, "thread %d (warp %d)", thread, warp_of(thread));
  } else if (warp != kMany) {
    snprintf(out, n, "several threads of warp %d", warp);
  } else {
    snprintf(out, n, "threads of several warps");
  }
}

// other: the earlier thread, or kMany with other_warp the readers' common warp (kMany: several).
[[noreturn]] void race(size_t offset, size_t n, bool write, const char* earlier, int other, int other_warp) {
  s.reporting = true;  // hooks stay off until the next block: the reporter runs instrumented code
  char msg[512], who[64], me[64];
  describe(who, sizeof(who), other, other_warp);
  describe(me, sizeof(me), s.thread, kNone);
  snprintf(msg, sizeof(msg),
           "shared-memory race at byte offset %zu (a %zu-byte %s of %s): it %s bytes %s by %s with nothing "
           "ordering the two (no barrier both took part in, no release it acquired)",
           offset, n, write ? "write" : "read", me, write ? "overwrites" : "reads", earlier, who);
  s.report(msg);
  std::abort();  // the reporter never returns
}

void record_read(Cell& c, int w, uint32_t wclock, uint32_t clock) {
  if (c.r_epoch != s.epoch) {
    c.r_epoch = s.epoch;
    c.n_reads = 0;
    c.overflow = false;
    c.r_warp = static_cast<int16_t>(w);
    c.r_wclock = wclock;
  } else {
    if (c.r_warp != w) c.r_warp = kMany;
    if (wclock > c.r_wclock) c.r_wclock = wclock;
  }
  for (int j = 0; j < c.n_reads; ++j) {
    if (c.reads[j].thread == s.thread) {  // its latest read orders its earlier ones
      c.reads[j].wclock = wclock;
      c.reads[j].clock = clock;
      return;
    }
  }
  if (c.n_reads < kReadSlots) {
    c.reads[c.n_reads++] = Read{static_cast<int16_t>(s.thread), wclock, clock};
  } else {
    c.overflow = true;
  }
}

void check(const void* ptr, size_t n, bool write) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(ptr);
  const uintptr_t base = reinterpret_cast<uintptr_t>(s.smem);
  if (s.thread < 0 || s.internal || s.reporting || a - base >= s.bytes) return;
  const size_t offset = a - base;
  const size_t end = offset + n < s.bytes ? offset + n : s.bytes;  // past the end: AddressSanitizer's part
  const int w = warp_of(s.thread);
  const uint32_t wclock = s.warp_clock[w];
  const uint32_t clock = s.own[s.thread];
  for (size_t i = offset; i < end; ++i) {
    Cell& c = s.shadow[i];
    const Access& last = c.write;
    if (last.epoch && !ordered(last.thread, last.epoch, last.wclock, last.clock)) {
      race(offset, n, write, "written", last.thread, kNone);
    }
    if (!write) {
      record_read(c, w, wclock, clock);
      continue;
    }
    if (c.r_epoch == s.epoch) {
      for (int j = 0; j < c.n_reads; ++j) {
        const Read& r = c.reads[j];
        if (!ordered(r.thread, c.r_epoch, r.wclock, r.clock)) race(offset, n, write, "read", r.thread, kNone);
      }
      // Readers past the slots: only a __syncwarp of the writer's own warp after all of them orders them.
      if (c.overflow && !(c.r_warp == w && c.r_wclock < wclock)) race(offset, n, write, "read", kMany, c.r_warp);
    }
    c.write = Access{static_cast<int16_t>(s.thread), s.epoch, wclock, clock};
    c.r_epoch = 0;
  }
}

void join(std::vector<uint32_t>& into, const std::vector<uint32_t>& from) {
  if (from.empty()) return;
  if (into.size() < from.size()) into.resize(from.size(), 0);
  for (size_t i = 0; i < from.size(); ++i) into[i] = std::max(into[i], from[i]);
}

void release_by(int thread, Clock& c) {
  s.clocks_on = true;
  join(c.seen, s.seen[thread]);
  if (c.seen.size() < ids()) c.seen.resize(ids(), 0);
  c.seen[thread] = std::max(c.seen[thread], s.own[thread]);
  ++s.own[thread];  // its later accesses are not covered by this release
}

}  // namespace

void block_begin(unsigned char* smem, size_t bytes, int threads, Reporter report) {
  s.smem = smem;
  s.bytes = bytes;
  s.thread = -1;
  s.internal = s.reporting = false;
  s.report = report;
  ++s.epoch;  // nothing of an earlier block conflicts with this one
  const int warps = (threads + 31) / 32;
  s.threads = threads;
  s.agent0 = 32 * warps;
  s.next_agent = 0;
  s.clocks_on = false;
  s.warp_clock.assign(static_cast<size_t>(warps) + 1, 0);
  s.own.assign(static_cast<size_t>(s.agent0 + kAgents), 1);
  if (s.seen.size() < s.own.size()) s.seen.resize(s.own.size());
  for (std::vector<uint32_t>& v : s.seen) v.clear();
  if (s.shadow.size() < bytes) s.shadow.resize(bytes);
}

void block_end() {
  s.smem = nullptr;
  s.bytes = 0;
  s.thread = -1;
}

void set_thread(int linear) { s.thread = linear; }
void block_barrier() { ++s.epoch; }

void warp_barrier(int warp) {
  ++s.warp_clock[static_cast<size_t>(warp)];
  if (!s.clocks_on) return;  // no release yet: the warp clock alone orders the lanes
  // The lanes leave with the union of their clocks, so a release by one lane carries what the
  // others did before the barrier.
  const int first = 32 * warp, last = std::min(first + 32, s.threads);
  s.scratch.assign(ids(), 0);
  for (int t = first; t < last; ++t) {
    join(s.scratch, s.seen[t]);
    s.scratch[t] = std::max(s.scratch[t], s.own[t]);
  }
  for (int t = first; t < last; ++t) {
    s.seen[t] = s.scratch;
    ++s.own[t];
  }
}

void set_internal(bool on) { s.internal = on; }
void access(const void* ptr, size_t bytes, bool write) { check(ptr, bytes, write); }

void access_as(int thread, const void* ptr, size_t bytes, bool write) {
  const int saved = s.thread;
  const bool saved_internal = s.internal;
  s.thread = thread;
  s.internal = false;
  check(ptr, bytes, write);
  s.thread = saved;
  s.internal = saved_internal;
}

void release(Clock& c) {
  if (s.thread >= 0 && s.smem) release_by(s.thread, c);
}

void acquire_for(int thread, const Clock& c) {
  if (thread < 0 || !s.smem || c.seen.empty()) return;
  s.clocks_on = true;
  join(s.seen[thread], c.seen);
}

void acquire(const Clock& c) { acquire_for(s.thread, c); }

AsyncCopy async_issue() {
  AsyncCopy copy;
  if (s.thread < 0 || !s.smem) return copy;
  copy.agent = s.agent0 + s.next_agent++ % kAgents;
  release_by(s.thread, copy.issued);
  return copy;
}

void async_begin(const AsyncCopy& copy) {
  s.saved_thread = s.thread;
  s.saved_internal = s.internal;
  if (copy.agent < 0 || !s.smem) return;
  s.thread = copy.agent;
  s.internal = false;
  s.seen[copy.agent] = copy.issued.seen;  // it has seen what its issuer had
  ++s.own[copy.agent];                    // a new copy: what was seen of the agent's last one does not cover it
}

void async_end() {
  s.thread = s.saved_thread;
  s.internal = s.saved_internal;
}

}  // namespace race
}  // namespace emu
}  // namespace kvk

// ---------------------------------------------------------------------------------------------
// The hooks of GCC's and Clang's -fsanitize=thread instrumentation. Plain loads and stores become
// checks; atomics (the launchers' once-per-process attribute flags, never shared memory) are
// performed as asked.

using kvk::emu::race::check;

extern "C" {

void __tsan_init() {}
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}
void __tsan_ignore_thread_begin() {}
void __tsan_ignore_thread_end() {}
void __tsan_vptr_update(void**, void*) {}
void __tsan_vptr_read(void**) {}

#define KVK_TSAN_SIZE(n)                                                          \
  void __tsan_read##n(void* p) { check(p, n, false); }                            \
  void __tsan_write##n(void* p) { check(p, n, true); }                            \
  void __tsan_unaligned_read##n(const void* p) { check(p, n, false); }            \
  void __tsan_unaligned_write##n(void* p) { check(p, n, true); }                  \
  void __tsan_volatile_read##n(void* p) { check(p, n, false); }                   \
  void __tsan_volatile_write##n(void* p) { check(p, n, true); }                   \
  void __tsan_read##n##_pc(void* p, void*) { check(p, n, false); }                \
  void __tsan_write##n##_pc(void* p, void*) { check(p, n, true); }
KVK_TSAN_SIZE(1)
KVK_TSAN_SIZE(2)
KVK_TSAN_SIZE(4)
KVK_TSAN_SIZE(8)
KVK_TSAN_SIZE(16)
#undef KVK_TSAN_SIZE

void __tsan_read_range(void* p, unsigned long n) { check(p, n, false); }
void __tsan_write_range(void* p, unsigned long n) { check(p, n, true); }

// Atomics: __tsan_atomicN_op(address, [value,] memory order). The order argument follows the C++
// enumeration (0 relaxed ... 5 seq_cst); sequential consistency is always correct to give.
#define KVK_TSAN_ATOMIC(n, T)                                                                           \
  T __tsan_atomic##n##_load(const volatile T* a, int) { return __atomic_load_n(a, __ATOMIC_SEQ_CST); }  \
  void __tsan_atomic##n##_store(volatile T* a, T v, int) { __atomic_store_n(a, v, __ATOMIC_SEQ_CST); }  \
  T __tsan_atomic##n##_exchange(volatile T* a, T v, int) { return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST); } \
  T __tsan_atomic##n##_fetch_add(volatile T* a, T v, int) { return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST); } \
  T __tsan_atomic##n##_fetch_sub(volatile T* a, T v, int) { return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST); } \
  T __tsan_atomic##n##_fetch_and(volatile T* a, T v, int) { return __atomic_fetch_and(a, v, __ATOMIC_SEQ_CST); } \
  T __tsan_atomic##n##_fetch_or(volatile T* a, T v, int) { return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST); }   \
  T __tsan_atomic##n##_fetch_xor(volatile T* a, T v, int) { return __atomic_fetch_xor(a, v, __ATOMIC_SEQ_CST); } \
  int __tsan_atomic##n##_compare_exchange_strong(volatile T* a, T* c, T v, int, int) {                   \
    return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);              \
  }                                                                                                     \
  int __tsan_atomic##n##_compare_exchange_weak(volatile T* a, T* c, T v, int, int) {                     \
    return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);              \
  }                                                                                                     \
  T __tsan_atomic##n##_compare_exchange_val(volatile T* a, T c, T v, int, int) {                         \
    __atomic_compare_exchange_n(a, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                    \
    return c;                                                                                           \
  }
KVK_TSAN_ATOMIC(8, unsigned char)
KVK_TSAN_ATOMIC(16, unsigned short)
KVK_TSAN_ATOMIC(32, unsigned int)
KVK_TSAN_ATOMIC(64, unsigned long long)
#undef KVK_TSAN_ATOMIC

void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
void __tsan_atomic_signal_fence(int) { __atomic_signal_fence(__ATOMIC_SEQ_CST); }

}  // extern "C"
