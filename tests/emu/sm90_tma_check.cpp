// Unit checks of the emulated TMA (csrc/emu/tma.cpp): the tensor-map encoder's argument rules, the
// box a cp.async.bulk.tensor writes (128-byte swizzle, zero fill outside the tensor), and its
// asynchronous completion on an mbarrier (host C++, no GPU).
//
//   sm90_tma_check    exit 0 when every case behaves as the CUDA driver and PTX ISA say, 1 otherwise
#include <cstdio>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include "check.h"
#include "emu/runtime.h"
#include "emu/sm90.h"
#include "emu/tma.h"

using namespace kvk;
using kvk::emu::current;
using kvk::emu::current_block;

namespace {

using emu_check::check;
using emu_check::run;

struct Tensor2d {  // rows x cols of 16-bit values v(r, c) = r * cols + c + 1 (never 0, never 0xFFFF)
  int rows, cols;
  alignas(16) std::vector<uint16_t> data;
  Tensor2d(int r, int c) : rows(r), cols(c), data(static_cast<size_t>(r) * c) {
    for (int i = 0; i < r * c; ++i) data[i] = static_cast<uint16_t>(i + 1);
  }
};

CUresult encode(CUtensorMap* map, void* base, std::vector<cuuint64_t> dims, std::vector<cuuint64_t> strides,
                std::vector<cuuint32_t> box, CUtensorMapSwizzle swizzle = CU_TENSOR_MAP_SWIZZLE_128B,
                CUtensorMapDataType type = CU_TENSOR_MAP_DATA_TYPE_FLOAT16) {
  const std::vector<cuuint32_t> es(dims.size(), 1);
  return emu::tensor_map_encode_tiled(map, type, static_cast<cuuint32_t>(dims.size()), base, dims.data(),
                                      strides.data(), box.data(), es.data(), CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle,
                                      CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
}

void expect_rejected(const char* name, CUresult r, const char* why) {
  check(r == CUDA_ERROR_INVALID_VALUE, std::string(name) + ": accepted");
  check(emu::tensor_map_error().find(why) != std::string::npos,
        std::string(name) + ": no '" + why + "' in '" + emu::tensor_map_error() + "'");
}

void encoder_rules() {
  CUtensorMap map;
  alignas(16) static uint16_t mem[64 * 64 * 2];
  // The prefill launcher's kind of map: (head_dim 64, rows, heads, batches), box 64 x 64 x 1 x 1.
  check(encode(&map, mem, {64, 32, 2, 1}, {128, 4096, 8192}, {64, 64, 1, 1}) == CUDA_SUCCESS,
        "the launcher's map: " + emu::tensor_map_error());
  expect_rejected("stride", encode(&map, mem, {64, 32}, {120}, {64, 16}), "stride 120 bytes is not a multiple of 16");
  expect_rejected("box", encode(&map, mem, {64, 300}, {128}, {64, 257}), "box 257 outside 1 .. 256");
  expect_rejected("swizzle span", encode(&map, mem, {128, 32}, {256}, {128, 16}),
                  "the inner box (256 bytes) is wider than the 128-byte swizzle");
  expect_rejected("inner box", encode(&map, mem, {64, 32}, {128}, {4, 16}, CU_TENSOR_MAP_SWIZZLE_NONE),
                  "the inner box (8 bytes) is not a multiple of 16 bytes");
  expect_rejected("base", encode(&map, reinterpret_cast<char*>(mem) + 8, {64, 32}, {128}, {64, 16}),
                  "not 16-byte aligned");
  expect_rejected("map", encode(reinterpret_cast<CUtensorMap*>(reinterpret_cast<char*>(&map) + 16), mem, {64, 32},
                                {128}, {64, 16}),
                  "tensor map is not 64-byte aligned");
  expect_rejected("dim", encode(&map, mem, {64, 0}, {128}, {64, 16}), "size 0");
  expect_rejected("rank", encode(&map, mem, {}, {}, {}), "rank 0");
}

// A box of 16 rows of `cols` columns starting at row `row0` of a 10 x 64 tensor into shared byte
// 1024; checks the shared memory right after the issue (poison) and after the wait.
void box_load(int row0, CUtensorMapSwizzle swizzle, int span, int cols = 64) {
  Tensor2d t(10, 64);
  CUtensorMap map;
  check(encode(&map, t.data.data(), {64, 10}, {128}, {static_cast<cuuint32_t>(cols), 16}, swizzle) == CUDA_SUCCESS,
        emu::tensor_map_error());
  const int row_bytes = cols * 2;
  const uint32_t kDst = 1024, kBytes = 16 * row_bytes;
  std::vector<unsigned char> at_issue, landed;
  bool complete_at_issue = true;
  const std::string err = run("tma", 32, kDst + kBytes, [&] {
    if (current().linear != 0) return;
    mbarrier_init(0, 1);
    mbarrier_arrive_expect_tx(0, kBytes);
    const int coords[2] = {0, row0};
    tma_load(kDst, &map, 0, coords, 2);
    unsigned char* s = current_block().smem;
    at_issue.assign(s + kDst, s + kDst + kBytes);
    complete_at_issue = mbarrier_test_wait_parity(0, 0);
    mbarrier_try_wait_parity(0, 0);
    landed.assign(s + kDst, s + kDst + kBytes);
  });
  const std::string name = "box of " + std::to_string(cols) + " columns at row " + std::to_string(row0) +
                           ", swizzle " + std::to_string(span);
  check(err.empty(), name + ": " + err);
  if (!err.empty()) return;
  check(!complete_at_issue, name + ": the barrier completed at the issue");
  bool poisoned = true;
  for (unsigned char b : at_issue) poisoned &= b == 0xFF;
  check(poisoned, name + ": the destination held data before the copy landed");
  // Element (r, c) of the box, CUDA's swizzle patterns for a box whose rows are the span wide (the
  // box starts on a 1024-byte boundary): 16-byte chunk c / 8 of row r lands at chunk
  //   128B: (c / 8) ^ (r % 8)       64B: (c / 8) ^ (r / 2 % 4)       32B: (c / 8) ^ (r / 4 % 2)
  // (the pattern repeats every 1024, 512 and 256 bytes); without a swizzle at chunk c / 8.
  int wrong = 0;
  for (int r = 0; r < 16; ++r) {
    for (int c = 0; c < cols; ++c) {
      int chunk = c / 8;
      if (span == 128) chunk ^= r % 8;
      if (span == 64) chunk ^= r / 2 % 4;
      if (span == 32) chunk ^= r / 4 % 2;
      uint16_t got;
      memcpy(&got, landed.data() + r * row_bytes + chunk * 16 + (c % 8) * 2, 2);
      const int row = row0 + r;
      const uint16_t want = row >= 0 && row < 10 ? t.data[row * 64 + c] : 0;
      wrong += got != want;
    }
  }
  check(wrong == 0, name + ": " + std::to_string(wrong) + " elements wrong");
}

void byte_count_mismatch_hangs() {
  Tensor2d t(10, 64);
  CUtensorMap map;
  encode(&map, t.data.data(), {64, 10}, {128}, {64, 16});
  for (int delta : {-16, 16}) {
    const std::string err = run("kvk_tma_hang", 32, 4096, [&] {
      if (current().linear != 0) return;
      mbarrier_init(0, 1);
      mbarrier_arrive_expect_tx(0, 2048 + delta);
      const int coords[2] = {0, 0};
      tma_load(1024, &map, 0, coords, 2);
      mbarrier_try_wait_parity(0, 0);
    });
    const std::string pending = std::to_string(delta) + " transaction bytes pending";
    check(err.find("hang") != std::string::npos && err.find(pending) != std::string::npos,
          "expect_tx off by " + std::to_string(delta) + ": no hang with '" + pending + "': " + err);
  }
}

void misuse_fails() {
  Tensor2d t(10, 64);
  CUtensorMap map;
  encode(&map, t.data.data(), {64, 10}, {128}, {64, 16});
  CUtensorMap junk;
  memset(&junk, 0, sizeof(junk));
  struct Case {
    const char* name;
    std::function<void()> body;
    const char* message;
  };
  const int coords[2] = {0, 0};
  const std::vector<Case> cases = {
      {"not a map", [&] { mbarrier_init(0, 1); tma_load(1024, &junk, 0, coords, 2); }, "is not an encoded tensor map"},
      {"rank", [&] { mbarrier_init(0, 1); tma_load(1024, &map, 0, coords, 3); }, "a 3d copy of a rank-2 tensor map"},
      {"dst alignment", [&] { mbarrier_init(0, 1); tma_load(1040, &map, 0, coords, 2); }, "not 128-byte aligned"},
      {"dst bounds", [&] { mbarrier_init(0, 1); tma_load(3072, &map, 0, coords, 2); }, "outside the launch's"},
      {"no barrier", [&] { tma_load(1024, &map, 8, coords, 2); }, "no mbarrier was initialised"},
  };
  for (const Case& c : cases) {
    const std::string err = run("k", 32, 4096, [&] {
      if (current().linear == 0) c.body();
    });
    check(err.find(c.message) != std::string::npos, std::string(c.name) + ": no '" + c.message + "' in: " + err);
  }
}

}  // namespace

int main() {
  encoder_rules();
  box_load(0, CU_TENSOR_MAP_SWIZZLE_128B, 128);
  box_load(-3, CU_TENSOR_MAP_SWIZZLE_128B, 128);
  box_load(0, CU_TENSOR_MAP_SWIZZLE_NONE, 0);
  box_load(0, CU_TENSOR_MAP_SWIZZLE_64B, 64, 32);
  box_load(-5, CU_TENSOR_MAP_SWIZZLE_64B, 64, 32);
  box_load(0, CU_TENSOR_MAP_SWIZZLE_32B, 32, 16);
  byte_count_mismatch_hangs();
  misuse_fails();
  return emu_check::finish("all TMA checks pass");
}
