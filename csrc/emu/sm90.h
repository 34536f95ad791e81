// Emulated sm_90a synchronisation instructions (emu/sm90.cpp), with the PTX ISA's rules:
//
//   mbarrier       init (count 1 .. 2^20 - 1, 8-byte aligned shared address), arrive,
//                  arrive.expect_tx, expect_tx, complete_tx (what a TMA copy does when its bytes
//                  land), try_wait.parity and test_wait.parity. A phase completes when its pending
//                  arrivals and its transaction count both reach zero; then the phase number
//                  advances (parity flips), the arrivals reset to the init count and the next
//                  phase starts with a transaction count of zero. The transaction count may go
//                  negative inside a phase (bytes landing before their expect_tx) but stays within
//                  +-(2^20 - 1). try_wait.parity p returns once the phase of parity p is complete,
//                  i.e. the current phase's parity is not p (a fresh barrier, phase 0, passes a wait
//                  on parity 1 at once); while it is not, the thread blocks (the hardware's
//                  time-limited suspend, made unlimited: a kernel's retry loop sees one call). The
//                  8 barrier bytes carry a tag: a plain store over a live barrier, or an operation
//                  on bytes that were never initialised, fails naming the instruction.
//   bar.sync / bar.arrive  id 0 .. 15, a thread count that is a multiple of 32 and at most the
//                  block; every arrival of one generation must give the same count; bar.arrive does
//                  not wait. Barrier 0 with the whole block is __syncthreads. (The race checker
//                  takes named barriers as ordering nothing: strict, as for a partial __syncwarp.)
//   elect.sync     one lane of the mask (the lowest) is elected; a collective of the mask's lanes.
//   fence.proxy.async, fence.mbarrier_init  accepted (every emulated access is in one proxy).
//   setmaxnreg     .inc / .dec by all 128 threads of a warpgroup with one count in 24 .. 256, a
//                  multiple of 8; .dec must not raise and .inc must not lower the warpgroup's count;
//                  an .inc waits until the register file (64K per SM) has room for it, as the
//                  hardware does, so a kernel whose warpgroups ask for more than there is hangs.
#pragma once

#include <cstdint>

namespace kvk {

void mbarrier_init(uint32_t bar, uint32_t count);
void mbarrier_arrive(uint32_t bar);
void mbarrier_arrive_expect_tx(uint32_t bar, uint32_t bytes);
void mbarrier_expect_tx(uint32_t bar, uint32_t bytes);
// What an asynchronous copy does when `bytes` of its destination have landed (no arrival).
void mbarrier_complete_tx(uint32_t bar, uint32_t bytes);
bool mbarrier_try_wait_parity(uint32_t bar, uint32_t parity);
bool mbarrier_test_wait_parity(uint32_t bar, uint32_t parity);
void fence_mbarrier_init();
void fence_proxy_async();

void named_barrier_sync(int id, int count);
void named_barrier_arrive(int id, int count);

bool elect_sync(uint32_t mask);

void setmaxnreg(bool inc, int regs);

}  // namespace kvk
