// The shared-memory race checker of the CUDA emulator (built into the "racecheck" variant only).
//
// Two threads of a block touching the same shared-memory byte, at least one of them writing, with
// nothing ordering the two accesses, is a race: the hardware gives no order between them. The
// checker sees every shared-memory access of the kernel code: the variant compiles the emulated
// translation units with the compiler's ThreadSanitizer instrumentation (-fsanitize=thread,
// KVK_EMU_RACECHECK), whose load/store hooks (__tsan_read4, ...) are defined by
// racecheck/shadow.cpp, compiled without it, instead of by the ThreadSanitizer runtime. The
// emulator itself reports the ordering events and the accesses its instructions make for a lane
// (ldmatrix rows, wgmma operands, TMA boxes); inside its warp collectives the hooks are off,
// because that code acts for every lane at once.
//
// What orders two accesses:
//   __syncthreads          everything before it against everything after it, for the whole block;
//   __syncwarp (full mask) the same for the lanes of one warp (and wgmma.wait_group, .aligned);
//   release -> acquire     the sm_90 synchronisation: an mbarrier arrival (release) before a wait
//                          that sees its phase complete (acquire); a named barrier's arrivals
//                          (bar.arrive: release; bar.sync: release, then acquire of the whole
//                          generation). Each thread carries a vector clock; an access is ordered
//                          before another thread's when that thread's clock has seen it.
//   the async proxy        a TMA copy is an agent of its own: its box counts as written at the
//                          issue and again when it lands, ordered after what the issuing thread
//                          did before the issue, and its completion releases the mbarrier it
//                          completes on (the consumers' wait acquires it). fence.proxy.async is
//                          not modelled: the proxies count as one.
//   wgmma operands         read when the wait_group covering the op returns, by lane 0 of the
//                          warp that waits (the release that follows in the kernels).
// A cp.async destination counts as written by its thread at the issue (the bytes are undefined
// from then) and again when its wait lands the data.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace kvk {
namespace emu {
namespace race {

// What the threads that released a synchronisation object had done: per thread, the latest own
// clock released into it (an mbarrier phase, a named barrier generation). Empty: nothing; always
// empty outside the racecheck variant.
struct Clock {
  std::vector<uint32_t> seen;
};

// A TMA copy in flight: the agent that writes its box and the clock of its issue.
struct AsyncCopy {
  Clock issued;
  int agent = -1;
};

#ifdef KVK_EMU_RACECHECK
// Called with the message of a race; does not return (the emulator's fail()).
using Reporter = void (*)(const char* message);
void block_begin(unsigned char* smem, size_t bytes, int threads, Reporter report);
void block_end();
void set_thread(int linear);  // the fiber now running, -1 for the scheduler
void block_barrier();         // a __syncthreads every thread reached
void warp_barrier(int warp);  // a full-mask __syncwarp of that warp
void set_internal(bool on);   // emulator code acting for several lanes: its accesses are not the thread's
void access(const void* ptr, size_t bytes, bool write);  // an access the emulator makes for the running thread
void access_as(int thread, const void* ptr, size_t bytes, bool write);  // ... for another thread of the block
void release(Clock& c);                        // c takes in the running thread's clock, which then advances
void acquire(const Clock& c);                  // the running thread's clock takes in c
void acquire_for(int thread, const Clock& c);  // the same for another thread (woken by the running one)
AsyncCopy async_issue();                       // a copy issued by the running thread (a release)
void async_begin(const AsyncCopy& copy);       // the running thread is the copy's agent until async_end
void async_end();
#else
inline void block_begin(unsigned char*, size_t, int, void (*)(const char*)) {}
inline void block_end() {}
inline void set_thread(int) {}
inline void block_barrier() {}
inline void warp_barrier(int) {}
inline void set_internal(bool) {}
inline void access(const void*, size_t, bool) {}
inline void access_as(int, const void*, size_t, bool) {}
inline void release(Clock&) {}
inline void acquire(const Clock&) {}
inline void acquire_for(int, const Clock&) {}
inline AsyncCopy async_issue() { return {}; }
inline void async_begin(const AsyncCopy&) {}
inline void async_end() {}
#endif

// Scope of emulator code acting for several lanes.
struct Internal {
  Internal() { set_internal(true); }
  ~Internal() { set_internal(false); }
  Internal(const Internal&) = delete;
  Internal& operator=(const Internal&) = delete;
};

// Scope of a TMA copy's agent: its accesses and releases are the copy's.
struct AsyncAgent {
  explicit AsyncAgent(const AsyncCopy& copy) { async_begin(copy); }
  ~AsyncAgent() { async_end(); }
  AsyncAgent(const AsyncAgent&) = delete;
  AsyncAgent& operator=(const AsyncAgent&) = delete;
};

}  // namespace race
}  // namespace emu
}  // namespace kvk
