// Unit checks of the emulated sm_90a synchronisation (csrc/emu/sm90.cpp): mbarrier phases and
// transaction counts, hang reports, named barriers, elect.sync and setmaxnreg, each in a small
// kernel run by the emulator's scheduler (host C++, no GPU).
//
//   sm90_sync_check    exit 0 when every case behaves as the PTX ISA says, 1 with the failures printed
#include <cstdio>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include "check.h"
#include "emu/runtime.h"
#include "emu/sm90.h"

using namespace kvk;
using kvk::emu::current;
using kvk::emu::current_block;

namespace {

using emu_check::check;
using emu_check::run;

void expect_ok(const char* name, const std::string& err) { check(err.empty(), std::string(name) + ": " + err); }

void expect_error(const char* name, const std::string& err, std::vector<std::string> parts) {
  if (err.empty()) return check(false, std::string(name) + ": ran without an error");
  for (const std::string& p : parts) check(err.find(p) != std::string::npos, std::string(name) + ": no '" + p + "' in: " + err);
}

int tid() { return current().linear; }
unsigned char* smem() { return current_block().smem; }

// --------------------------------------------------------------------------------- mbarrier

void phase_and_tx_rules() {
  std::vector<std::string> log;
  expect_ok("phase rules", run("phases", 32, 64, [&] {
    if (tid() != 0) return;
    mbarrier_init(0, 1);
    fence_mbarrier_init();
    // A fresh barrier is in phase 0: the (previous) phase of parity 1 counts as complete.
    check(mbarrier_test_wait_parity(0, 1) && !mbarrier_test_wait_parity(0, 0), "fresh barrier parities");
    check(mbarrier_try_wait_parity(0, 1), "try_wait on parity 1 of a fresh barrier");
    // The arrival alone does not complete a phase that still expects bytes.
    mbarrier_arrive_expect_tx(0, 32);
    check(!mbarrier_test_wait_parity(0, 0), "phase complete with 32 bytes pending");
    mbarrier_complete_tx(0, 16);
    check(!mbarrier_test_wait_parity(0, 0), "phase complete with 16 bytes pending");
    mbarrier_complete_tx(0, 16);
    check(mbarrier_test_wait_parity(0, 0) && !mbarrier_test_wait_parity(0, 1), "phase 0 complete, phase 1 not");
    // Bytes landing before their expect_tx: the count goes negative and the phase still waits for the arrival.
    mbarrier_complete_tx(0, 48);
    check(!mbarrier_test_wait_parity(0, 1), "phase 1 complete before its arrival");
    mbarrier_arrive_expect_tx(0, 48);
    check(mbarrier_test_wait_parity(0, 1) && !mbarrier_test_wait_parity(0, 0), "phase 1 complete after the arrival");
    // A count of 3: three arrivals.
    mbarrier_init(8, 3);
    mbarrier_arrive(8);
    mbarrier_arrive(8);
    check(!mbarrier_test_wait_parity(8, 0), "count 3 complete after 2 arrivals");
    mbarrier_arrive(8);
    check(mbarrier_test_wait_parity(8, 0), "count 3 incomplete after 3 arrivals");
  }));
}

// A producer thread (warp 0) and a consumer warp (warp 1) over a 3-stage ring of full/empty
// barriers, the pattern of the sm_90a prefill: 8 rounds, so every stage's parity flips.
void producer_consumer_ring() {
  constexpr int kStages = 3, kRounds = 8;
  // smem: full[3] at 0, empty[3] at 24, data[3] (16 bytes each) at 64
  std::vector<int> seen;
  expect_ok("ring", run("ring", 64, 128, [&] {
    const int t = tid();
    if (t == 0) {
      for (int s = 0; s < kStages; ++s) {
        mbarrier_init(8 * s, 1);
        mbarrier_init(24 + 8 * s, 32);
      }
    }
    named_barrier_sync(0, 64);
    if (t == 0) {
      for (int r = 0; r < kRounds; ++r) {
        const int s = r % kStages;
        const uint32_t phase = (r / kStages) & 1;
        mbarrier_try_wait_parity(24 + 8 * s, phase ^ 1);  // the stage is empty
        mbarrier_arrive_expect_tx(8 * s, 16);
        memcpy(smem() + 64 + 16 * s, &r, 4);  // "the copy lands", then its bytes complete
        mbarrier_complete_tx(8 * s, 16);
      }
    } else if (t >= 32) {
      for (int r = 0; r < kRounds; ++r) {
        const int s = r % kStages;
        mbarrier_try_wait_parity(8 * s, (r / kStages) & 1);
        int v;
        memcpy(&v, smem() + 64 + 16 * s, 4);
        if (t == 32) seen.push_back(v);
        mbarrier_arrive(24 + 8 * s);
      }
    }
  }));
  bool ok = seen.size() == kRounds;
  for (int r = 0; ok && r < kRounds; ++r) ok = seen[r] == r;
  check(ok, "ring: the consumer did not see rounds 0..7 in order");
}

void hang_is_reported() {
  // 16 of the 32 expected bytes land: the consumer warp waits forever.
  const std::string err = run("kvk_hang_kernel", 64, 64, [&] {
    if (tid() == 0) {
      mbarrier_init(16, 1);
      mbarrier_arrive_expect_tx(16, 32);
      mbarrier_complete_tx(16, 16);
    }
    named_barrier_sync(1, 64);
    if (tid() >= 32) mbarrier_try_wait_parity(16, 0);
  });
  expect_error("hang", err, {"hang", "kvk_hang_kernel", "threads 32-63 wait at mbarrier.try_wait.parity",
                             "mbarrier at shared address 16: phase 0 (parity 0) incomplete",
                             "0 of 1 arrivals and 16 transaction bytes pending", "waited on by warp 1"});
}

void misuse_fails() {
  expect_error("count 0", run("k", 32, 64, [] { mbarrier_init(0, 0); }), {"mbarrier.init: count 0"});
  expect_error("misaligned", run("k", 32, 64, [] { mbarrier_init(4, 1); }), {"not 8-byte aligned"});
  expect_error("uninitialised", run("k", 32, 64, [] { mbarrier_arrive(8); }), {"no mbarrier was initialised"});
  expect_error("overwritten", run("k", 32, 64, [] {
                 if (tid()) return;
                 mbarrier_init(0, 1);
                 memset(smem(), 0, 8);
                 mbarrier_arrive(0);
               }), {"overwritten by a plain store"});
  expect_error("tx range", run("k", 32, 64, [] {
                 if (tid()) return;
                 mbarrier_init(0, 2);
                 mbarrier_arrive_expect_tx(0, (1 << 20) - 1);
                 mbarrier_arrive_expect_tx(0, 1);
               }), {"leaves +-(2^20 - 1)"});
}

// ----------------------------------------------------------------------------- named barriers

void named_barriers() {
  int got = -1;
  expect_ok("bar.arrive/bar.sync", run("named", 96, 64, [&] {
    const int t = tid();
    if (t < 32) {  // warp 0 produces and does not wait
      if (t == 0) memset(smem(), 7, 4);
      named_barrier_arrive(3, 64);
    } else if (t < 64) {  // warp 1 consumes
      named_barrier_sync(3, 64);
      if (t == 32) got = smem()[0];
    }  // warp 2 takes no part
  }));
  check(got == 7, "bar.sync returned before bar.arrive's data");
  expect_error("named hang", run("named_hang", 64, 64, [] {
                 if (tid() < 32) named_barrier_sync(1, 64);
               }), {"hang", "named barrier 1: 32 of 64 threads arrived, waited on by warp 0"});
  expect_error("count mismatch", run("k", 64, 64, [] { named_barrier_sync(2, tid() < 32 ? 64 : 32); }),
               {"called with count 32 while 32 threads arrived with count 64"});
  expect_error("count not a multiple of 32", run("k", 64, 64, [] { named_barrier_sync(2, 48); }), {"thread count 48"});
  expect_error("id", run("k", 64, 64, [] { named_barrier_sync(16, 64); }), {"barrier id 16"});
}

// ------------------------------------------------------------------------------- elect.sync

void elect() {
  std::vector<int> elected;
  expect_ok("elect", run("elect", 64, 0, [&] {
    const int lane = tid() % 32;
    if (tid() < 32) {
      if (elect_sync(0xFFFFFFFFu)) elected.push_back(tid());
    } else if (lane >= 4 && lane < 8) {
      if (elect_sync(0xF0u)) elected.push_back(tid());
    }
  }));
  check(elected == std::vector<int>({0, 36}), "elect.sync: not the lowest lane of each mask");
}

// ------------------------------------------------------------------------------- setmaxnreg

void register_reallocation() {
  // 384 threads start at 168 registers (64K / 384, rounded down to 8). Warpgroup 1's .inc comes
  // first and has no room until warpgroup 0's .dec gives 144 x 128 registers back.
  std::vector<int> order;
  expect_ok("setmaxnreg", run("regs", 384, 64, [&] {
    const int t = tid(), g = t / 128;
    if (t == 0) mbarrier_init(0, 1);
    named_barrier_sync(0, 384);
    if (g == 0) {
      mbarrier_try_wait_parity(0, 0);  // until warpgroup 1 is at its .inc
      setmaxnreg(false, 24);
      if (t == 0) order.push_back(0);
    } else {
      if (t == 128) mbarrier_arrive(0);
      setmaxnreg(true, 240);
      if (t % 128 == 0) order.push_back(g);
    }
  }));
  check(order.size() == 3 && order[0] == 0, "setmaxnreg.inc went ahead without room in the register file");
  expect_error("no room", run("regs_hang", 384, 0, [] {
                 if (tid() >= 128) setmaxnreg(true, 240);
               }), {"hang", "setmaxnreg.inc 240 of warpgroup 1 (168 registers per thread now): the register file"});
  expect_error("dec raising", run("k", 384, 0, [] {
                 if (tid() < 128) setmaxnreg(false, 176);
               }), {".dec cannot raise it"});
  expect_error("diverged", run("k", 128, 0, [] { setmaxnreg(tid() < 64, 64); }), {"diverged"});
  expect_error("bad count", run("k", 128, 0, [] { setmaxnreg(true, 250); }), {"not a multiple of 8"});
  expect_error("partial warpgroup", run("k", 96, 0, [] { setmaxnreg(true, 64); }), {"not whole warpgroups"});
}

}  // namespace

int main() {
  phase_and_tx_rules();
  producer_consumer_ring();
  hang_is_reported();
  misuse_fails();
  named_barriers();
  elect();
  register_reallocation();
  return emu_check::finish("all sm90 synchronisation checks pass");
}
