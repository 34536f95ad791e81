// Unit checks of the race checker's sm_90a orderings (csrc/emu/racecheck/shadow.cpp with the
// emulated mbarriers, named barriers, TMA and wgmma): each small kernel either orders its
// shared-memory accesses and must run clean, or leaves one pair unordered and must be reported.
// Built like the racecheck variant: this file and the emulator with -fsanitize=thread
// -DKVK_EMU_RACECHECK, the shadow without, linked without libtsan.
//
//   sm90_race_check    exit 0 when every case is judged right, 1 with the failures printed
#include <cstdio>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>

#include "emu/device.h"
#include "check.h"
#include "emu/runtime.h"
#include "emu/sm90.h"
#include "emu/tma.h"
#include "emu/wgmma.h"

using namespace kvk;
using kvk::emu::current;
using kvk::emu::current_block;

namespace {

using emu_check::check;
using emu_check::run;

// A case that orders its accesses (clean) or must be reported as a race, `who` in the report.
void expect(const char* name, bool clean, const std::string& err, const char* who = "") {
  if (clean) return check(err.empty(), std::string(name) + ": reported: " + err);
  check(err.find("shared-memory race") != std::string::npos && err.find(who) != std::string::npos,
        std::string(name) + ": no race naming '" + who + "' reported: " + (err.empty() ? "(clean)" : err));
}

int tid() { return current().linear; }
volatile uint32_t* word(uint32_t offset) { return reinterpret_cast<volatile uint32_t*>(current_block().smem + offset); }

constexpr uint32_t kBar = 0, kBar2 = 8, kData = 1024;

// Thread 0 initialises the barrier at kBar (and at kBar2 with count2 > 0) before the block goes on.
void init_barriers(uint32_t count, uint32_t count2 = 0) {
  if (tid() == 0) {
    mbarrier_init(kBar, count);
    if (count2) mbarrier_init(kBar2, count2);
    fence_mbarrier_init();
  }
  __syncthreads();
}

// ---------------------------------------------------------------------- mbarrier release / acquire

// Thread 0 (warp 0) writes a word and arrives; thread 32 (warp 1) reads it, after the wait or not.
void mbarrier_handoff(const char* name, bool arrive_first, bool wait, bool clean) {
  expect(name, clean, run(name, 64, 2048, [&] {
    init_barriers(1);
    if (tid() == 0) {
      if (arrive_first) mbarrier_arrive(kBar);
      *word(kData) = 7;
      if (!arrive_first) mbarrier_arrive(kBar);
    } else if (tid() == 32) {
      if (wait) mbarrier_try_wait_parity(kBar, 0);
      (void)*word(kData);
    }
  }), "thread 0 (warp 0)");
}

// A consumer warp reads the stage and releases it; the producer waits for that (or not) and writes it.
void stage_reuse(const char* name, bool wait, bool clean) {
  expect(name, clean, run(name, 64, 2048, [&] {
    init_barriers(32);
    if (tid() >= 32) {
      (void)*word(kData + 4 * (tid() - 32));
      mbarrier_arrive(kBar);
    } else if (tid() == 0) {
      if (wait) mbarrier_try_wait_parity(kBar, 0);
      for (int i = 0; i < 32; ++i) *word(kData + 4 * i) = i;
    }
  }), "warp 1");
}

// ---------------------------------------------------------------------------- named barriers

// Warp 0 writes, warp 1 reads, with bar.sync on both sides, bar.arrive (producer) + bar.sync
// (consumer), or the roles of a bar.arrive reversed (the arriving warp does not acquire).
void named_handoff(const char* name, int form, bool clean) {
  expect(name, clean, run(name, 64, 2048, [&] {
    const bool producer = tid() < 32;
    const bool writer = form == 2 ? !producer : producer;
    if (writer) *word(kData + 4 * (tid() % 32)) = 1;
    if (form == 0 || !producer) named_barrier_sync(1, 64);
    else named_barrier_arrive(1, 64);
    if (!writer) (void)*word(kData + 4 * (tid() % 32));
  }), "");
}

// --------------------------------------------------------------------------------------- TMA

struct Tensor {
  alignas(64) uint16_t data[16 * 64];
};

CUtensorMap tensor_map(Tensor& t) {
  CUtensorMap map;
  const cuuint64_t dims[2] = {64, 16}, strides[1] = {128};
  const cuuint32_t box[2] = {64, 16}, es[2] = {1, 1};
  emu::tensor_map_encode_tiled(&map, CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 2, t.data, dims, strides, box, es,
                               CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                               CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return map;
}

// Thread 0 loads a 16 x 64 box; warp 1 reads it after waiting on the copy's barrier, or not.
void tma_then_read(const char* name, bool wait, bool clean) {
  static Tensor t;
  const CUtensorMap map = tensor_map(t);
  expect(name, clean, run(name, 64, kData + 2048, [&] {
    init_barriers(1);
    if (tid() == 0) {
      mbarrier_arrive_expect_tx(kBar, 2048);
      const int coords[2] = {0, 0};
      tma_load(kData, &map, kBar, coords, 2);
    } else if (tid() >= 32) {
      if (wait) mbarrier_try_wait_parity(kBar, 0);
      (void)*word(kData + 64 * (tid() - 32));
    }
  }), "TMA copy");
}

// Warp 1 reads the old contents and releases the stage; thread 0 refills it by TMA after waiting
// for the release, or without waiting.
void tma_refill(const char* name, bool wait, bool clean) {
  static Tensor t;
  const CUtensorMap map = tensor_map(t);
  expect(name, clean, run(name, 64, kData + 2048, [&] {
    init_barriers(32, 1);
    if (tid() >= 32) {
      (void)*word(kData + 64 * (tid() - 32));
      mbarrier_arrive(kBar);
    } else if (tid() == 0) {
      if (wait) mbarrier_try_wait_parity(kBar, 0);
      mbarrier_arrive_expect_tx(kBar2, 2048);
      const int coords[2] = {0, 0};
      tma_load(kData, &map, kBar2, coords, 2);
      mbarrier_try_wait_parity(kBar2, 0);
    }
  }), "TMA copy");
}

// -------------------------------------------------------------------------------------- wgmma

// Warpgroup 1 writes the operands (plain stores); warpgroup 0 runs a wgmma on them, after a named
// barrier of both or not.
void wgmma_after_stores(const char* name, bool barrier, bool clean) {
  expect(name, clean, run(name, 256, kData + 4096, [&] {
    // A: 64 x 16 at kData, B: 8 x 16 at kData + 2048, K-major without swizzle (core matrices of
    // 8 rows x 16 bytes; LBO 128 between the two k halves, SBO 256 between 8-row groups).
    if (tid() >= 128) {
      for (uint32_t o = 4 * (tid() - 128); o < 2048 + 256; o += 4 * 128) *word(kData + o) = 0x3C003C00u;  // 1.0
    }
    if (barrier) named_barrier_sync(1, 256);
    if (tid() < 128) {
      float d[4] = {0, 0, 0, 0};
      const auto desc = [](uint32_t addr, uint32_t lbo, uint32_t sbo) {
        return (uint64_t{addr} >> 4) | (uint64_t{lbo >> 4} << 16) | (uint64_t{sbo >> 4} << 32);
      };
      wgmma_fence();
      wgmma_mma_async_ss(d, 8, false, desc(kData, 128, 256), desc(kData + 2048, 128, 256), false, 1, 1, false, false);
      wgmma_commit_group();
      wgmma_wait_group(0);
    }
  }), "warp");
}

}  // namespace

int main() {
  mbarrier_handoff("write, arrive / wait, read", false, true, true);
  mbarrier_handoff("read without waiting", false, false, false);
  mbarrier_handoff("arrive before the write", true, true, false);
  stage_reuse("stage refilled after its release", true, true);
  stage_reuse("stage refilled without waiting for its release", false, false);
  named_handoff("bar.sync on both sides", 0, true);
  named_handoff("bar.arrive by the writer, bar.sync by the reader", 1, true);
  named_handoff("bar.arrive by the reader (it acquires nothing)", 2, false);
  tma_then_read("TMA box read after its barrier", true, true);
  tma_then_read("TMA box read without waiting", false, false);
  tma_refill("TMA refill after the stage's release", true, true);
  tma_refill("TMA refill without waiting for the release", false, false);
  wgmma_after_stores("wgmma operands stored before a named barrier", true, true);
  wgmma_after_stores("wgmma operands stored without a barrier", false, false);
  return emu_check::finish("all race-checker orderings judged right");
}
