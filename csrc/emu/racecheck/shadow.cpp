// Shadow state of the shared-memory race checker (see emu/racecheck.h) and the instrumentation hooks
// the compiler's -fsanitize=thread pass calls. Compiled WITHOUT that flag (a hook must not call
// itself) and linked into the racecheck variant of the emulator only.
//
// Per byte of the block's shared memory the shadow keeps the last write and the reads since it:
// which thread, and the ordering clocks at the access (the block's barrier count, the accessing
// warp's __syncwarp count). An access by thread t conflicts with an earlier one by u != t unless a
// barrier both reached lies between them: a later block barrier, or a later __syncwarp of their
// common warp. Conflicting read/write or write/write pairs are reported at the second access.
#define KVK_EMU_RACECHECK 1
#include "emu/racecheck.h"

#include <cstdio>
#include <cstdlib>
#include <vector>

namespace kvk {
namespace emu {
namespace race {
namespace {

constexpr int16_t kNone = -1;
constexpr int16_t kMany = -2;  // several threads read the byte in the current block epoch

struct Cell {
  uint32_t w_epoch = 0, r_epoch = 0;    // block epochs of the last write / of the reads (0: none)
  uint32_t w_wclock = 0, r_wclock = 0;  // warp clock at the write / latest warp clock among the reads
  int16_t writer = kNone, reader = kNone;
  int16_t r_warp = kNone;               // the readers' common warp, kMany when they span warps
};

struct State {
  unsigned char* smem = nullptr;
  size_t bytes = 0;
  int thread = -1;  // running fiber, -1: none (scheduler, torch glue, outside any launch)
  bool internal = false;
  bool reporting = false;
  uint32_t epoch = 0;  // block barriers seen in this process (+1 at each block start)
  std::vector<uint32_t> warp_clock;
  std::vector<Cell> shadow;
  Reporter report = nullptr;
};

thread_local State s;

int warp_of(int thread) { return thread / 32; }

// Whether an access by `prior` at (epoch, wclock) is ordered before the running thread's access now.
bool ordered(int prior, uint32_t epoch, uint32_t wclock) {
  if (prior == s.thread || epoch != s.epoch) return true;
  const int w = warp_of(s.thread);
  return warp_of(prior) == w && wclock < s.warp_clock[w];
}

// other: the earlier thread, or kMany with other_warp the readers' common warp (kMany: several).
[[noreturn]] void race(size_t offset, size_t n, bool write, const char* earlier, int other, int other_warp) {
  s.reporting = true;  // hooks stay off until the next block: the reporter runs instrumented code
  char msg[512];
  char who[48];
  if (other != kMany) {
    snprintf(who, sizeof(who), "thread %d (warp %d)", other, warp_of(other));
  } else if (other_warp != kMany) {
    snprintf(who, sizeof(who), "several threads of warp %d", other_warp);
  } else {
    snprintf(who, sizeof(who), "threads of several warps");
  }
  snprintf(msg, sizeof(msg),
           "shared-memory race at byte offset %zu (a %zu-byte %s of thread %d, warp %d): it %s bytes %s by %s "
           "with no barrier both took part in between",
           offset, n, write ? "write" : "read", s.thread, warp_of(s.thread), write ? "overwrites" : "reads",
           earlier, who);
  s.report(msg);
  std::abort();  // the reporter never returns
}

void check(const void* ptr, size_t n, bool write) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(ptr);
  const uintptr_t base = reinterpret_cast<uintptr_t>(s.smem);
  if (s.thread < 0 || s.internal || s.reporting || a - base >= s.bytes) return;
  const size_t offset = a - base;
  const size_t end = offset + n < s.bytes ? offset + n : s.bytes;  // past the end: AddressSanitizer's part
  const int w = warp_of(s.thread);
  const uint32_t wclock = s.warp_clock[w];
  for (size_t i = offset; i < end; ++i) {
    Cell& c = s.shadow[i];
    if (c.w_epoch && !ordered(c.writer, c.w_epoch, c.w_wclock)) race(offset, n, write, "written", c.writer, kNone);
    const bool reads_now = c.r_epoch == s.epoch;
    if (write) {
      if (reads_now && c.reader != s.thread) {
        const bool same_warp_before_sync = c.r_warp == w && c.r_wclock < wclock;
        if (c.reader == kMany ? !same_warp_before_sync : !ordered(c.reader, c.r_epoch, c.r_wclock)) {
          race(offset, n, write, "read", c.reader, c.r_warp);
        }
      }
      c.writer = static_cast<int16_t>(s.thread);
      c.w_epoch = s.epoch;
      c.w_wclock = wclock;
      c.r_epoch = 0;
      c.reader = c.r_warp = kNone;
    } else if (!reads_now || c.reader == kNone) {
      c.reader = static_cast<int16_t>(s.thread);
      c.r_warp = static_cast<int16_t>(w);
      c.r_epoch = s.epoch;
      c.r_wclock = wclock;
    } else {
      if (c.reader != s.thread) c.reader = kMany;
      if (c.r_warp != w) c.r_warp = kMany;
      if (wclock > c.r_wclock) c.r_wclock = wclock;
    }
  }
}

}  // namespace

void block_begin(unsigned char* smem, size_t bytes, int threads, Reporter report) {
  s.smem = smem;
  s.bytes = bytes;
  s.thread = -1;
  s.internal = s.reporting = false;
  s.report = report;
  ++s.epoch;  // nothing of an earlier block conflicts with this one
  s.warp_clock.assign(static_cast<size_t>((threads + 31) / 32), 0);
  if (s.shadow.size() < bytes) s.shadow.resize(bytes);
}

void block_end() {
  s.smem = nullptr;
  s.bytes = 0;
  s.thread = -1;
}

void set_thread(int linear) { s.thread = linear; }
void block_barrier() { ++s.epoch; }
void warp_barrier(int warp) { ++s.warp_clock[static_cast<size_t>(warp)]; }
void set_internal(bool on) { s.internal = on; }
void access(const void* ptr, size_t bytes, bool write) { check(ptr, bytes, write); }

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
