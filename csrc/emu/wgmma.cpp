// Emulated sm_90a warpgroup MMA (declared, with its rules, in emu/wgmma.h).
#include "emu/wgmma.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstring>
#include <vector>

#include "emu/racecheck.h"
#include "emu/runtime.h"

namespace kvk {

using emu::Block;
using emu::current;
using emu::current_block;
using emu::fail;
using emu::Thread;
using emu::WgmmaOp;

namespace {

constexpr uint32_t kPoisonBits = 0x7FC0FFEEu;  // a quiet NaN with a payload no arithmetic produces

uint32_t bits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}

float poison() {
  float f;
  memcpy(&f, &kPoisonBits, 4);
  return f;
}

float element(uint16_t raw, bool bf16) {
  if (bf16) {
    const uint32_t u = static_cast<uint32_t>(raw) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
  }
  __half_raw h;
  h.x = raw;
  return __half2float(__half(h));
}

// An operand element, read (for the race checker) by `reader`: lane 0 of the warp whose wait runs the op.
uint16_t load16(uint32_t addr, const char* what, int reader) {
  const unsigned char* p = emu::shared_ptr(addr, 2, 2, what);
  emu::race::access_as(reader, p, 2, false);
  uint16_t v;
  memcpy(&v, p, 2);
  return v;
}

// ------------------------------------------------------------------------------ issue

bool same_instruction(const WgmmaOp& a, const WgmmaOp& b) {
  return a.n == b.n && a.bf16 == b.bf16 && a.a_in_regs == b.a_in_regs && a.desc_a == b.desc_a &&
         a.desc_b == b.desc_b && a.scale_d == b.scale_d && a.scale_a == b.scale_a && a.scale_b == b.scale_b &&
         a.trans_a == b.trans_a && a.trans_b == b.trans_b && a.group == b.group;
}

void issue(WgmmaOp op, const char* what) {
  Thread& t = current();
  Block& b = current_block();
  if (b.threads.size() % 128) fail("%s: the block's %zu threads are not whole warpgroups", what, b.threads.size());
  if (op.n < 8 || op.n > 256 || op.n % 8) fail("%s: N = %d is not a multiple of 8 in 8 .. 256", what, op.n);
  if (op.scale_a * op.scale_a != 1 || op.scale_b * op.scale_b != 1) fail("%s: imm-scale-a/b must be 1 or -1", what);
  if (!t.wgmma_fenced) {
    fail("%s: no wgmma.fence since the thread's last wgmma.wait_group (or its start): its registers may be in use",
         what);
  }
  (void)emu::wgmma_operand_address(op.desc_b, op.trans_b, 0, 0);  // a malformed descriptor fails at issue
  if (!op.a_in_regs) (void)emu::wgmma_operand_address(op.desc_a, op.trans_a, 0, 0);
  const int regs = op.n / 2;
  for (const WgmmaOp& prior : t.wgmma) {
    if (prior.d == op.d) {
      if (prior.n != op.n) fail("%s: chained on accumulators of an m64n%d in flight with N = %d", what, prior.n, op.n);
      op.chained = true;
    }
  }
  if (op.chained) {
    for (int i = 0; i < regs; ++i) {
      if (bits(op.d[i]) != kPoisonBits) {
        fail("%s: accumulator register %d was written while a wgmma.mma_async on it is in flight", what, i);
      }
    }
  } else {
    if (op.scale_d) op.c.assign(op.d, op.d + regs);
    for (int i = 0; i < regs; ++i) op.d[i] = poison();
  }
  op.group = t.wgmma_committed;
  t.wgmma.push_back(std::move(op));
  ++t.wgmma_issued;
  for (int waiter : b.wgmma_waiters) emu::wake(waiter);  // they check again whether their ops are issued
  b.wgmma_waiters.clear();
}

// ------------------------------------------------------------------------------ completion

const char* const kWaitName = "wgmma.wait_group";

// Runs op j of every lane of warp `warp` (lanes' ops checked identical), storing each lane's result
// into the next op in flight on the same registers, or into the registers themselves.
void run_op(Block& b, int warp, size_t j) {
  Thread* lanes[emu::kWarpSize];
  for (int l = 0; l < emu::kWarpSize; ++l) lanes[l] = &b.threads[warp * emu::kWarpSize + l];
  const WgmmaOp& op = lanes[0]->wgmma[j];
  const int n = op.n, regs = n / 2;
  const int row0 = 16 * (warp % 4);  // the warp's rows of the warpgroup's 64
  // B [16 x n] and this warp's 16 rows of A, as floats.
  std::vector<float> B(16 * static_cast<size_t>(n));
  for (int k = 0; k < 16; ++k) {
    for (int c = 0; c < n; ++c) {
      const uint32_t addr = emu::wgmma_operand_address(op.desc_b, op.trans_b, c, k);
      B[k * n + c] = op.scale_b * element(load16(addr, "wgmma.mma_async operand B", lanes[0]->linear), op.bf16);
    }
  }
  float A[16][16];
  for (int l = 0; l < emu::kWarpSize; ++l) {
    const WgmmaOp& own = lanes[l]->wgmma[j];
    if (own.a_in_regs) {
      for (int i = 0; i < 4; ++i) {
        if (own.a_regs[i] != own.a[i]) {
          fail("%s: lane %d of warp %d changed A register %d of a wgmma.mma_async before the wait covering it",
               kWaitName, l, warp, i);
        }
      }
    }
  }
  if (op.a_in_regs) {
    for (int l = 0; l < emu::kWarpSize; ++l) {
      const int g = l / 4, tq = l % 4;
      for (int i = 0; i < 4; ++i) {
        for (int h = 0; h < 2; ++h) {
          A[g + 8 * (i % 2)][2 * tq + h + 8 * (i / 2)] =
              op.scale_a * element(static_cast<uint16_t>(lanes[l]->wgmma[j].a[i] >> (16 * h)), op.bf16);
        }
      }
    }
  } else {
    for (int m = 0; m < 16; ++m) {
      for (int k = 0; k < 16; ++k) {
        const uint32_t addr = emu::wgmma_operand_address(op.desc_a, op.trans_a, row0 + m, k);
        A[m][k] = op.scale_a * element(load16(addr, "wgmma.mma_async operand A", lanes[0]->linear), op.bf16);
      }
    }
  }
  for (int l = 0; l < emu::kWarpSize; ++l) {
    Thread& t = *lanes[l];
    WgmmaOp& own = t.wgmma[j];
    if (own.chained) fail("%s: internal: the op chained before op %zu did not run", kWaitName, j);
    std::vector<float> out(regs);
    for (int i = 0; i < regs; ++i) {
      const int row = l / 4 + 8 * ((i / 2) % 2), col = 8 * (i / 4) + 2 * (l % 4) + i % 2;
      float acc = own.scale_d ? own.c[i] : 0.0f;
      for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k * n + col];
      out[i] = acc;
    }
    WgmmaOp* next = nullptr;
    for (size_t q = j + 1; q < t.wgmma.size() && !next; ++q) {
      if (t.wgmma[q].d == own.d) next = &t.wgmma[q];
    }
    if (next) {  // still in flight on these registers: its C
      next->c = std::move(out);
      next->chained = false;
      continue;
    }
    for (int i = 0; i < regs; ++i) {
      if (bits(own.d[i]) != kPoisonBits) {
        fail("%s: thread %d wrote accumulator register %d of a wgmma.mma_async before the wait covering it",
             kWaitName, t.linear, i);
      }
      own.d[i] = out[i];
    }
  }
}

void wait_fn(emu::Warp& w, Block& b) {
  const int warp = static_cast<int>(&w - b.warps.data());
  const Thread& first = b.threads[warp * emu::kWarpSize];
  const int pending = static_cast<int>(w.in[0][0]);
  for (int l = 1; l < emu::kWarpSize; ++l) {
    const Thread& t = b.threads[warp * emu::kWarpSize + l];
    bool same = w.in[l][0] == w.in[0][0] && t.wgmma.size() == first.wgmma.size() &&
                t.wgmma_committed == first.wgmma_committed;
    for (size_t j = 0; same && j < t.wgmma.size(); ++j) same = same_instruction(t.wgmma[j], first.wgmma[j]);
    if (!same) fail("%s: the lanes of warp %d issued different wgmma sequences", kWaitName, warp);
  }
  const int limit = first.wgmma_committed - pending;  // groups below it complete
  size_t done = 0;
  while (done < first.wgmma.size() && first.wgmma[done].group < limit) run_op(b, warp, done++);
  for (int l = 0; l < emu::kWarpSize; ++l) {
    Thread& t = b.threads[warp * emu::kWarpSize + l];
    t.wgmma.erase(t.wgmma.begin(), t.wgmma.begin() + static_cast<std::ptrdiff_t>(done));
    t.wgmma_fenced = false;
  }
  // The wait is .sync.aligned: the lanes leave it together, after the operand reads.
  emu::race::warp_barrier(warp);
}

}  // namespace

// ------------------------------------------------------------------------------ instructions

void wgmma_fence() { current().wgmma_fenced = true; }

void wgmma_commit_group() { ++current().wgmma_committed; }

void wgmma_wait_group(int n) {
  if (n < 0 || n > 7) fail("%s: N = %d outside 0 .. 7", kWaitName, n);
  Thread& t = current();
  Block& b = current_block();
  // The ops this wait completes must have been issued by the whole warpgroup: count them here.
  const int limit = t.wgmma_committed - n;
  int in_flight_after = 0;
  for (const WgmmaOp& op : t.wgmma) in_flight_after += op.group >= limit;
  const int needed = t.wgmma_issued - in_flight_after;
  const int base = t.linear / 128 * 128 + t.lane;
  for (;;) {
    bool issued = true;
    for (int w = 0; w < 4; ++w) issued = issued && b.threads[base + 32 * w].wgmma_issued >= needed;
    if (issued) break;
    b.wgmma_waiters.push_back(t.linear);
    emu::block_current("wgmma.wait_group (for the other warps of the warpgroup to issue its wgmma.mma_async)");
  }
  const uint32_t in[1] = {static_cast<uint32_t>(n)};
  emu::warp_collective(kWaitName, wait_fn, 0xFFFFFFFFu, in, 1);
}

namespace {

// The fields both forms share; the caller adds A.
WgmmaOp make_op(float* d, int n, bool bf16, uint64_t desc_b, bool scale_d, int scale_a, int scale_b, bool trans_b) {
  WgmmaOp op;
  op.n = n;
  op.bf16 = bf16;
  op.desc_b = desc_b;
  op.scale_d = scale_d;
  op.scale_a = scale_a;
  op.scale_b = scale_b;
  op.trans_b = trans_b;
  op.d = d;
  return op;
}

}  // namespace

void wgmma_mma_async_ss(float* d, int n, bool bf16, uint64_t desc_a, uint64_t desc_b, bool scale_d, int scale_a,
                        int scale_b, bool trans_a, bool trans_b) {
  WgmmaOp op = make_op(d, n, bf16, desc_b, scale_d, scale_a, scale_b, trans_b);
  op.desc_a = desc_a;
  op.trans_a = trans_a;
  issue(std::move(op), "wgmma.mma_async (A and B in shared memory)");
}

void wgmma_mma_async_rs(float* d, int n, bool bf16, const uint32_t* a, uint64_t desc_b, bool scale_d, int scale_a,
                        int scale_b, bool trans_b) {
  WgmmaOp op = make_op(d, n, bf16, desc_b, scale_d, scale_a, scale_b, trans_b);
  op.a_in_regs = true;
  memcpy(op.a, a, sizeof(op.a));
  op.a_regs = a;
  issue(std::move(op), "wgmma.mma_async (A in registers)");
}

namespace emu {

uint32_t wgmma_operand_address(uint64_t desc, bool mn_major, int mn, int k) {
  constexpr uint64_t kFields = 0x3FFFull | (0x3FFFull << 16) | (0x3FFFull << 32) | (0x7ull << 49) | (0x3ull << 62);
  if (desc & ~kFields) fail("wgmma descriptor 0x%016llx: reserved bits set", static_cast<unsigned long long>(desc));
  if ((desc >> 49) & 7) {
    fail("wgmma descriptor 0x%016llx: a non-zero base offset (a tile off its swizzle atom) is not modelled",
         static_cast<unsigned long long>(desc));
  }
  const uint32_t start = static_cast<uint32_t>(desc & 0x3FFF) << 4;
  const uint32_t lbo = static_cast<uint32_t>((desc >> 16) & 0x3FFF) << 4;
  const uint32_t sbo = static_cast<uint32_t>((desc >> 32) & 0x3FFF) << 4;
  const int layout = static_cast<int>(desc >> 62);
  const uint32_t span = layout == 1 ? 128 : layout == 2 ? 64 : layout == 3 ? 32 : 0;  // swizzle bytes
  const uint32_t umn = static_cast<uint32_t>(mn), uk = static_cast<uint32_t>(k);
  uint32_t addr;
  if (!mn_major) {
    addr = span ? start + (umn % 8) * span + (umn / 8) * sbo + 2 * uk
                : start + (umn % 8) * 16 + (umn / 8) * sbo + (uk % 8) * 2 + (uk / 8) * lbo;
  } else {
    addr = span ? start + (umn % (span / 2)) * 2 + (umn / (span / 2)) * lbo + (uk % 8) * span + (uk / 8) * sbo
                : start + (umn % 8) * 2 + (umn / 8) * sbo + (uk % 8) * 16 + (uk / 8) * lbo;
  }
  // The swizzle: the 16-byte chunk index (bits 4 ..) XOR the row index within the atom (bits 7 ..).
  const uint32_t mask = span == 128 ? 7u : span == 64 ? 3u : span == 32 ? 1u : 0u;
  return addr ^ (((addr >> 7) & mask) << 4);
}

}  // namespace emu
}  // namespace kvk
