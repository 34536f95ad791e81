// Emulated sm_80 instructions (declared in emu/ptx.h).
#include "emu/ptx.h"

#include "emu/racecheck.h"

#include <cmath>
#include <cstring>

namespace kvk {

using emu::Block;
using emu::current;
using emu::kWarpSize;
using emu::Warp;

namespace {

constexpr unsigned char kPoison = 0xFF;  // NaN in fp32, fp16, bf16 and fp8 e4m3 alike

float bits_to_float(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}

uint32_t float_to_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}

float half_bits_to_float(uint16_t h) {
  __half_raw raw;
  raw.x = h;
  return __half2float(__half(raw));
}

float bf16_bits_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

// A deterministic pseudo-random sign for the error of an approximation, from the input's bits.
bool hash_sign(float x) {
  uint32_t h = float_to_bits(x) * 0x9E3779B1u;
  h ^= h >> 15;
  return h & 1u;
}

float flush_subnormal(float x) { return std::fpclassify(x) == FP_SUBNORMAL ? std::copysign(0.0f, x) : x; }

}  // namespace

// ------------------------------------------------------------------------------ cp.async

void cp_async_16(uint32_t smem, const void* gmem, bool valid) {
  emu::Thread& t = current();
  unsigned char* dst = emu::shared_ptr(smem, 16, 16, "cp.async.cg.shared.global");
  emu::AsyncCopy copy;
  copy.dst = dst;
  copy.group = t.committed;
  // The source is read at issue (global memory the kernel does not write), so a bad address fails
  // here, in the issuing line of the kernel, under AddressSanitizer.
  if (valid) {
    if (reinterpret_cast<uintptr_t>(gmem) % 16) emu::fail("cp.async: global address %p is not 16-byte aligned", gmem);
    memcpy(copy.data, gmem, 16);
  } else {
    memset(copy.data, 0, 16);
  }
  memset(dst, kPoison, 16);
  t.async.push_back(copy);
}

void cp_async_commit() { ++current().committed; }

// cp.async.wait_group n: every copy of a group older than the n most recent committed groups has
// landed. Copies issued after the last commit belong to no group yet and stay in flight.
void cp_async_wait_group(int n) {
  emu::Thread& t = current();
  const int landed_below = t.committed - n;  // groups [0, landed_below) are complete
  size_t keep = 0;
  for (size_t i = 0; i < t.async.size(); ++i) {
    const emu::AsyncCopy& c = t.async[i];
    if (c.group < landed_below) {
      memcpy(c.dst, c.data, 16);
    } else {
      t.async[keep++] = c;
    }
  }
  t.async.resize(keep);
}

// ------------------------------------------------------------------------------ ldmatrix

namespace {

// in[l] = {row address, matrices, trans}; out[l][j] = lane l's word of matrix j.
void ldmatrix_fn(Warp& w, Block& b) {
  const int num = static_cast<int>(w.in[0][1]);
  const bool trans = w.in[0][2] != 0;
  for (int j = 0; j < num; ++j) {
    uint16_t m[8][8];  // matrix j, row-major
    for (int r = 0; r < 8; ++r) memcpy(m[r], b.smem + w.in[8 * j + r][0], 16);
    for (int l = 0; l < kWarpSize; ++l) {
      const int row = l / 4, col = 2 * (l % 4);
      const uint16_t lo = trans ? m[col][row] : m[row][col];
      const uint16_t hi = trans ? m[col + 1][row] : m[row][col + 1];
      w.out[l][j] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
    }
  }
}

}  // namespace

void ldmatrix(uint32_t* r, int num, bool trans, uint32_t smem) {
  const emu::Thread& t = current();
  const char* name = trans ? (num == 4 ? "ldmatrix.x4.trans" : num == 2 ? "ldmatrix.x2.trans" : "ldmatrix.x1.trans")
                           : (num == 4 ? "ldmatrix.x4" : num == 2 ? "ldmatrix.x2" : "ldmatrix.x1");
  // Only lanes 0 .. 8 num - 1 give addresses; the others' are ignored, as on the hardware.
  // Each of them reads its row: a read of that lane for the race checker.
  if (t.lane < 8 * num) emu::race::access(emu::shared_ptr(smem, 16, 16, name), 16, false);
  const uint32_t in[3] = {smem, static_cast<uint32_t>(num), trans ? 1u : 0u};
  const uint32_t* out = emu::warp_collective(name, ldmatrix_fn, 0xFFFFFFFFu, in, 3);
  for (int j = 0; j < num; ++j) r[j] = out[j];
}

// ------------------------------------------------------------------------------ mma.sync

namespace {

// m16n8k16 .row.col with fp32 accumulators; fragments as the PTX ISA lays them out, with
// g = lane / 4 (groupID) and t = lane % 4 (threadID_in_group):
//   A (16 x 16): a[i], halves h = 0, 1:  row g + 8 (i % 2),  col 2 t + h + 8 (i / 2)
//   B (16 x 8):  b[i], halves h = 0, 1:  row (k) 2 t + h + 8 i,  col (n) g
//   C, D (16 x 8): c[i]:                 row g + 8 (i / 2),  col 2 t + i % 2
// in[l] = {a0..a3, b0, b1, c0..c3}. The products are exact in fp32 (11- or 8-bit significands);
// they are summed in k order in fp32, starting from C.
template <bool kBf16>
void mma_fn(Warp& w, Block&) {
  float A[16][16], B[16][8], C[16][8];
  auto elem = [](uint32_t word, int h) {
    const uint16_t bits = static_cast<uint16_t>(word >> (16 * h));
    return kBf16 ? bf16_bits_to_float(bits) : half_bits_to_float(bits);
  };
  for (int l = 0; l < kWarpSize; ++l) {
    const int g = l / 4, t = l % 4;
    for (int i = 0; i < 4; ++i) {
      for (int h = 0; h < 2; ++h) A[g + 8 * (i % 2)][2 * t + h + 8 * (i / 2)] = elem(w.in[l][i], h);
    }
    for (int i = 0; i < 2; ++i) {
      for (int h = 0; h < 2; ++h) B[2 * t + h + 8 * i][g] = elem(w.in[l][4 + i], h);
    }
    for (int i = 0; i < 4; ++i) C[g + 8 * (i / 2)][2 * t + i % 2] = bits_to_float(w.in[l][6 + i]);
  }
  for (int l = 0; l < kWarpSize; ++l) {
    const int g = l / 4, t = l % 4;
    for (int i = 0; i < 4; ++i) {
      const int row = g + 8 * (i / 2), col = 2 * t + i % 2;
      float acc = C[row][col];
      for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
      w.out[l][i] = float_to_bits(acc);
    }
  }
}

void mma(const char* name, emu::CollectiveFn fn, float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  const uint32_t in[10] = {a[0], a[1], a[2], a[3], b0, b1, float_to_bits(d[0]), float_to_bits(d[1]),
                           float_to_bits(d[2]), float_to_bits(d[3])};
  const uint32_t* out = emu::warp_collective(name, fn, 0xFFFFFFFFu, in, 10);
  for (int i = 0; i < 4; ++i) d[i] = bits_to_float(out[i]);
}

}  // namespace

void mma_m16n8k16_f16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  mma("mma.sync.m16n8k16.f32.f16.f16.f32", mma_fn<false>, d, a, b0, b1);
}

void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  mma("mma.sync.m16n8k16.f32.bf16.bf16.f32", mma_fn<true>, d, a, b0, b1);
}

// ------------------------------------------------------------------------------ MUFU

// ex2.approx.ftz.f32: 2^x with a relative error of 2^-22 (the PTX ISA's bound is 2^-22.5 plus
// rounding: this is no smaller). 2^-inf = +0, 2^+inf = +inf, NaN stays NaN.
float exp2_approx(float x) {
  x = flush_subnormal(x);
  if (std::isnan(x) || std::isinf(x)) return std::exp2(x);
  const double exact = std::exp2(static_cast<double>(x));
  const double rel = std::ldexp(1.0, -22) * (hash_sign(x) ? 1.0 : -1.0);
  return flush_subnormal(static_cast<float>(exact * (1.0 + rel)));
}

// rcp.approx.ftz.f32: 1 / x off by one ulp (the PTX ISA's bound). 1 / +-0 = +-inf, 1 / +-inf = +-0.
float rcp_approx(float x) {
  x = flush_subnormal(x);
  if (x == 0.0f || std::isinf(x) || std::isnan(x)) return 1.0f / x;
  const float exact = flush_subnormal(1.0f / x);
  if (exact == 0.0f || std::isinf(exact)) return exact;
  return flush_subnormal(std::nextafter(exact, hash_sign(x) ? INFINITY : -INFINITY));
}

// lg2.approx.ftz.f32: log2(x) off by 2^-22 absolute (the PTX ISA's bound is 2^-22.6 near 1,
// relative elsewhere; an absolute error is the larger of the two where it matters, around x = 1).
// log2(+-0) = -inf, log2(x < 0) = NaN, log2(+inf) = +inf.
float log2_approx(float x) {
  x = flush_subnormal(x);
  if (!(x > 0.0f) || std::isinf(x)) return std::log2(x);
  const double exact = std::log2(static_cast<double>(x));
  return static_cast<float>(exact + std::ldexp(1.0, -22) * (hash_sign(x) ? 1.0 : -1.0));
}

}  // namespace kvk
