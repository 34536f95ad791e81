// The shared-memory race checker of the CUDA emulator (built into the "racecheck" variant only).
//
// Two threads of a block touching the same shared-memory byte, at least one of them writing, with
// no barrier between the two accesses that both took part in, is a race: the hardware gives no
// order between them. The checker sees every shared-memory access of the kernel code: the variant
// compiles the emulated translation units with the compiler's ThreadSanitizer instrumentation
// (-fsanitize=thread, KVK_EMU_RACECHECK), whose load/store hooks (__tsan_read4, ...) are defined
// by racecheck/shadow.cpp, compiled without it, instead of by the ThreadSanitizer runtime. The
// emulator itself reports the ordering events (block start, the running thread, __syncthreads,
// __syncwarp) and the accesses its instructions make for a lane (ldmatrix rows); inside its warp
// collectives the hooks are off, because that code acts for every lane at once.
//
// A barrier orders everything before it against everything after it for the threads that reached
// it: __syncthreads the whole block, a full-mask __syncwarp the lanes of one warp. A cp.async
// destination counts as written by its thread at the issue (the bytes are undefined from then) and
// again when its wait lands the data.
#pragma once

#include <cstddef>
#include <cstdint>

namespace kvk {
namespace emu {
namespace race {

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
#else
inline void block_begin(unsigned char*, size_t, int, void (*)(const char*)) {}
inline void block_end() {}
inline void set_thread(int) {}
inline void block_barrier() {}
inline void warp_barrier(int) {}
inline void set_internal(bool) {}
inline void access(const void*, size_t, bool) {}
#endif

// Scope of emulator code acting for several lanes.
struct Internal {
  Internal() { set_internal(true); }
  ~Internal() { set_internal(false); }
  Internal(const Internal&) = delete;
  Internal& operator=(const Internal&) = delete;
};

}  // namespace race
}  // namespace emu
}  // namespace kvk
