// The execution model of the CUDA emulator: a launch runs its grid block after block; inside a
// block every CUDA thread is a fiber of its own, scheduled deterministically (round robin in
// thread order, each fiber runs until it blocks at a barrier or exits). Plain C++17, no CUDA.
//
//   kvk::emu::run_grid(kernel, grid, block, smem, body)   body() is the kernel call of one thread
//   kvk::emu::current()                                    the running thread (ids, lane, block)
//   kvk::emu::sync_block(name)                             __syncthreads: every thread of the block
//   kvk::emu::warp_collective(...)                         shuffles, votes, __syncwarp, ldmatrix,
//                                                          mma.sync: a barrier among the mask's lanes
//   kvk::emu::shared_ptr(addr, bytes, what)                32-bit shared address -> host pointer,
//                                                          bounds- and alignment-checked
//   kvk::emu::fail(fmt, ...)                               stops the launch with a message naming
//                                                          the kernel, block and thread
//
// Where hardware would deadlock (a barrier some threads never reach, lanes of a warp at different
// collectives) the launch stops with the waiting threads named: the scheduler finds no runnable
// fiber. Errors surface as a C++ exception (std::runtime_error) from the launch, which the torch
// glue turns into a Python RuntimeError.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include <vector_types.h>  // uint3, dim3 (host-compilable CUDA toolkit header)

#include "emu/racecheck.h"

namespace kvk {
namespace emu {

constexpr int kWarpSize = 32;
// Inputs and outputs of one lane in a warp collective (mma.sync m16n8k16: 4 A + 2 B + 4 C words).
constexpr int kCollectiveWords = 12;
constexpr int kCollectiveOutWords = 4;

struct Warp;
struct Block;
// Computes the outputs of every lane of `mask` from their inputs once all have arrived.
using CollectiveFn = void (*)(Warp& warp, Block& block);

struct AsyncCopy {  // one cp.async in flight: lands at the wait that covers its group
  unsigned char* dst;
  unsigned char data[16];  // source bytes (zeros when src-size is 0), read at issue
  int group;               // index of the commit group it belongs to
};

// One wgmma.mma_async of a thread in flight (emu/wgmma.cpp): its part of the warpgroup's operation.
struct WgmmaOp {
  // The instruction, the same for every lane of the warp (checked).
  int n = 0;                  // N of m64nNk16
  bool bf16 = false;
  bool a_in_regs = false;     // A from registers (rs) or through desc_a (ss)
  uint64_t desc_a = 0, desc_b = 0;
  bool scale_d = false;       // D = A B + D (true) or D = A B
  int scale_a = 1, scale_b = 1;
  bool trans_a = false, trans_b = false;
  // This lane's part.
  int group = 0;              // the commit group: the thread's committed count at issue
  float* d = nullptr;         // its n / 2 accumulator registers (poison until the wait covering it)
  bool chained = false;       // d was already the target of an op in flight: C is that op's result
  std::vector<float> c;       // C at issue (unchained ops with scale_d)
  uint32_t a[4] = {0, 0, 0, 0};       // A registers at issue (rs)
  const uint32_t* a_regs = nullptr;   // where they live: they must not change before the wait
};

struct Thread {
  uint3 idx;
  int linear = 0, warp = 0, lane = 0;
  bool done = false;
  const char* waiting = nullptr;  // the barrier it waits at, nullptr when runnable
  void* context = nullptr;        // fiber state (runtime.cpp)
  uint32_t out[kCollectiveOutWords];
  std::vector<AsyncCopy> async;   // cp.async issued, not yet waited for
  int committed = 0;              // cp.async groups committed
  std::vector<WgmmaOp> wgmma;     // wgmma.mma_async issued, not yet completed by a wait_group
  int wgmma_committed = 0;        // wgmma groups committed
  int wgmma_issued = 0;           // wgmma.mma_async issued in all
  bool wgmma_fenced = false;      // a wgmma.fence since the last wait_group (registers may be touched)
};

struct Warp {
  CollectiveFn fn = nullptr;  // the collective lanes are gathering at; nullptr: none
  const char* name = nullptr;
  uint32_t mask = 0, arrived = 0;
  uint32_t in[kWarpSize][kCollectiveWords];
  uint32_t out[kWarpSize][kCollectiveOutWords];
};

// An mbarrier (sm_90 "mbarrier" objects in shared memory; emu/sm90.cpp). The 8 bytes the kernel
// reserves hold a tag the emulator checks at every operation; the state lives here.
struct MBarrier {
  uint32_t count = 0;    // arrivals per phase (the init count)
  uint32_t pending = 0;  // arrivals still missing in the current phase
  int64_t tx = 0;        // transaction bytes still expected in the current phase (may go negative)
  uint32_t phase = 0;    // phases completed so far; the current phase's parity is phase & 1
  std::vector<int> waiters;  // threads blocked in try_wait on this barrier
  race::Clock arrivals;      // the race checker: what the current phase's arrivals release
  race::Clock completed;     // ... and the last completed phase's, which a wait that sees it acquires
};

// A named barrier (bar.sync / bar.arrive with an id and a thread count).
struct NamedBarrier {
  int count = 0, arrived = 0;  // count 0: no generation under way
  std::vector<int> waiters;
  race::Clock arrivals;  // the race checker: what this generation's arrivals release
};

// setmaxnreg of one warpgroup (four consecutive warps).
struct Warpgroup {
  int regs = 0;                       // registers per thread now
  int arrived = 0, requested = 0;     // a setmaxnreg gathering its 128 threads
  bool inc = false;
  unsigned generation = 0;            // setmaxnreg calls completed
  int room_waiter = -1;               // the thread whose .inc waits for register-file room
  std::vector<int> waiters;           // the other threads, waiting for that one
};

struct Block {
  uint3 idx;
  std::vector<Thread> threads;
  std::vector<Warp> warps;
  unsigned char* smem = nullptr;  // the launch's dynamic shared memory, exactly smem_bytes
  size_t smem_bytes = 0;
  int barrier_arrived = 0;
  std::map<uint32_t, MBarrier> mbarriers;  // by shared address
  NamedBarrier named[16];
  std::vector<Warpgroup> warpgroups;
  std::vector<int> wgmma_waiters;  // threads whose wait_group waits for the rest of their warpgroup to issue
};

struct Launch {
  const char* kernel;
  dim3 grid, block;
  size_t smem_bytes;
};

Thread& current();
Block& current_block();
const Launch& current_launch();

// Runs body() as every thread of every block of the grid; throws std::runtime_error on a fault or hang.
void run_grid(const char* kernel, dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& body);

void sync_block(const char* name);

// Blocks the running thread (its `waiting` set to name) until another thread clears it: the
// primitive behind mbarrier waits, named barriers and setmaxnreg (emu/sm90.cpp).
void block_current(const char* name);
// Makes a blocked thread runnable again.
void wake(int linear);

// Deposits this lane's inputs and blocks until every lane of `mask` has arrived at the same
// collective; returns this lane's outputs (valid until its next collective).
const uint32_t* warp_collective(const char* name, CollectiveFn fn, uint32_t mask, const uint32_t* in, int n_in);

[[noreturn]] void fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

// A 32-bit shared-memory address (an offset into the block's dynamic shared memory) as a host
// pointer to `bytes` bytes; fails, naming `what`, if they are not inside the launch's shared memory
// or not `align`-aligned.
unsigned char* shared_ptr(uint32_t addr, size_t bytes, size_t align, const char* what);
uint32_t shared_addr(const void* ptr, const char* what);

// The device the emulator plays for the running OS thread: compute capability 8.0 (an A100, 163 KB
// of dynamic shared memory per block), or 9.0 with sm_90a's instructions (an H100, 227 KB) inside
// an EmulatedArch(90) scope, which the prefill's torch glue opens for its path 90. An H100 runs the
// sm_80 kernels too, so every kernel may launch inside the scope; outside it an sm_90a instruction
// still works (the emulator has no per-arch instruction sets) but the sm_90a limits do not apply.
constexpr int kMaxDynamicSmemSm80 = 166912;  // bytes, the opt-in limit of one block on sm_80
constexpr int kMaxDynamicSmemSm90 = 232448;  // on sm_90 (227 KB)
int emulated_arch();      // 80 or 90
int emulated_smem_optin();  // bytes of dynamic shared memory one block may opt in to
struct EmulatedArch {
  explicit EmulatedArch(int arch);
  ~EmulatedArch();
  EmulatedArch(const EmulatedArch&) = delete;
  EmulatedArch& operator=(const EmulatedArch&) = delete;
  int saved;
};

// cudaFuncSetAttribute(MaxDynamicSharedMemorySize) per kernel, checked at launch like the hardware.
void set_max_dynamic_smem(const void* kernel, int bytes);
int max_dynamic_smem(const void* kernel);

}  // namespace emu
}  // namespace kvk
