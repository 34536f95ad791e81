// Independent check of the emulated wgmma.mma_async (csrc/emu/wgmma.cpp) against CuTe's GMMA traits
// (the nvidia-cutlass headers, compiled host-only) and against hand-computed cases of the PTX ISA's
// matrix-descriptor rules:
//
//   descriptors   for every canonical GMMA shared-memory layout CuTe builds (K- and MN-major;
//                 interleaved, 32-, 64- and 128-byte swizzle), CuTe's own descriptors
//                 (make_fragment_A/B, one per k-block) decoded by the emulator address the same
//                 byte as CuTe's swizzled tensor does, element by element;
//   products      a 64 x N x 64 GEMM on those layouts (N = 8, 64, 256; A from shared memory or from
//                 registers in CuTe's RS A layout) run by the emulated wgmma in a 128-thread kernel,
//                 accumulators placed by CuTe's C layout, equals the host product exactly;
//   PTX ISA       a few descriptor addresses worked out by hand from the ISA's core-matrix and
//                 swizzle rules (the numbers are written below, not computed).
//
//   sm90_wgmma_check    exit 0 when every case agrees, 1 with the mismatches printed otherwise
//
// CuTe's host build turns a shared pointer into a shared address through __cvta_generic_to_shared:
// here that is the emulator's cvta.to.shared, so CuTe's descriptors carry emulated shared addresses.
#define CUTE_CVTA_GENERIC_TO_SHARED_ACTIVATED 1
#include <cstddef>
#include <cstdint>

namespace kvk::emu {
uint32_t shared_addr(const void* ptr, const char* what);  // emu/runtime.h (included after CuTe: its macros)
}
inline size_t __cvta_generic_to_shared(const void* ptr) { return kvk::emu::shared_addr(ptr, "cvta.to.shared"); }

#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "check.h"
#include "emu/device.h"
#include "emu/ptx.h"
#include "emu/runtime.h"
#include "emu/wgmma.h"

using namespace cute;
namespace GMMA = cute::SM90::GMMA;

namespace {

using kvk::emu_check::check;

constexpr int kM = 64, kK = 64;  // one warpgroup's rows; four k-blocks of 16

// The canonical GMMA layout atoms of 16-bit elements, by name.
template <GMMA::Major Major, int Swizzle>
auto atom() {
  if constexpr (Major == GMMA::Major::K) {
    if constexpr (Swizzle == 0) return GMMA::Layout_K_INTER_Atom<half_t>{};
    else if constexpr (Swizzle == 32) return GMMA::Layout_K_SW32_Atom<half_t>{};
    else if constexpr (Swizzle == 64) return GMMA::Layout_K_SW64_Atom<half_t>{};
    else return GMMA::Layout_K_SW128_Atom<half_t>{};
  } else {
    if constexpr (Swizzle == 0) return GMMA::Layout_MN_INTER_Atom<half_t>{};
    else if constexpr (Swizzle == 32) return GMMA::Layout_MN_SW32_Atom<half_t>{};
    else if constexpr (Swizzle == 64) return GMMA::Layout_MN_SW64_Atom<half_t>{};
    else return GMMA::Layout_MN_SW128_Atom<half_t>{};
  }
}

std::string layout_name(GMMA::Major major, int swizzle) {
  return std::string(major == GMMA::Major::K ? "K" : "MN") + "-major " +
         (swizzle ? std::to_string(swizzle) + "B swizzle" : std::string("interleave"));
}

// The CuTe op: D (64 x N, fp32) = A (64 x 16, fp16) B (16 x N, fp16), A from shared memory or registers.
template <int N, GMMA::Major MA, GMMA::Major MB, bool kRegsA>
auto gmma_op() {
  if constexpr (kRegsA) {
    if constexpr (N == 64) return SM90_64x64x16_F32F16F16_RS<MA, MB>{};
    else return SM90_64x256x16_F32F16F16_RS<MA, MB>{};
  } else {
    if constexpr (N == 8) return SM90_64x8x16_F32F16F16_SS<MA, MB>{};
    else if constexpr (N == 64) return SM90_64x64x16_F32F16F16_SS<MA, MB>{};
    else return SM90_64x256x16_F32F16F16_SS<MA, MB>{};
  }
}

uint16_t bits(half_t h) {
  uint16_t u;
  memcpy(&u, &h, 2);
  return u;
}

// One GEMM D = C + A B on A (64 x 64) and B (N x 64) in the given CuTe layouts, one wgmma per
// k-block with CuTe's descriptors, and the descriptor decode checked element by element.
template <int N, GMMA::Major MA, int SwA, GMMA::Major MB, int SwB, bool kRegsA = false>
void gemm_case() {
  const std::string name = "m64n" + std::to_string(N) + "k16 " + (kRegsA ? "rs" : "ss") + ", A " +
                           layout_name(MA, SwA) + ", B " + layout_name(MB, SwB);
  const auto layout_a = tile_to_shape(atom<MA, SwA>(), Shape<Int<kM>, Int<kK>>{});
  const auto layout_b = tile_to_shape(atom<MB, SwB>(), Shape<Int<N>, Int<kK>>{});
  constexpr size_t kBytesA = kM * kK * 2, kBytesB = size_t{N} * kK * 2;
  using Op = decltype(gmma_op<N, MA, MB, kRegsA>());
  using Traits = MMA_Traits<Op>;
  const auto tiled = make_tiled_mma(Op{});

  std::mt19937 rng(N * 131 + SwA * 7 + SwB + 3 * int(MA) + int(MB));
  std::uniform_int_distribution<int> small(-8, 8);  // every product and partial sum exact in fp32
  std::vector<half_t> a(kM * kK), b(size_t{N} * kK);  // a[m][k], b[n][k]
  std::vector<float> c(size_t{kM} * N), d(size_t{kM} * N, NAN);
  for (auto& x : a) x = half_t(small(rng) / 4.0f);
  for (auto& x : b) x = half_t(small(rng) / 4.0f);
  for (auto& x : c) x = static_cast<float>(small(rng));

  int address_mismatches = 0;
  const std::string err = kvk::emu_check::run("wgmma_check", 128, 1024 + kBytesA + kBytesB, [&] {
    const int tid = threadIdx.x;
    unsigned char* smem = kvk::emu::current_block().smem + 1024;  // on a 1024-byte swizzle-atom boundary
    Tensor sA = make_tensor(make_smem_ptr(reinterpret_cast<half_t*>(smem)), layout_a);
    Tensor sB = make_tensor(make_smem_ptr(reinterpret_cast<half_t*>(smem + kBytesA)), layout_b);
    for (int i = tid; i < kM * kK; i += 128) sA(i % kM, i / kM) = a[(i % kM) * kK + i / kM];
    for (int i = tid; i < N * kK; i += 128) sB(i % N, i / N) = b[(i % N) * kK + i / N];
    __syncthreads();

    auto thr = tiled.get_slice(tid);
    Tensor desc_b = thr.partition_fragment_B(sB);  // (1, 1, k-blocks) descriptors
    const bool mn_a = MA == GMMA::Major::MN, mn_b = MB == GMMA::Major::MN;
    auto check_addresses = [&](const auto& s, uint64_t desc, int rows, bool mn_major, int kb) {
      for (int mn = 0; mn < rows; ++mn) {
        for (int k = 0; k < 16; ++k) {
          const uint32_t cute_addr = kvk::smem_u32(&s(mn, 16 * kb + k));
          const uint32_t emu_addr = kvk::emu::wgmma_operand_address(desc, mn_major, mn, k);
          if (cute_addr != emu_addr && address_mismatches++ < 4) {
            printf("FAIL %s: k-block %d element (%d, %d): the descriptor 0x%016llx addresses %u, CuTe %u\n",
                   name.c_str(), kb, mn, k, static_cast<unsigned long long>(desc), emu_addr, cute_addr);
          }
        }
      }
    };

    float acc[N / 2];
    for (int v = 0; v < N / 2; ++v) {
      const int mn = typename Traits::CLayout{}(tid, v);  // (M64, N) column-major
      acc[v] = c[(mn % kM) * N + mn / kM];
    }
    for (int kb = 0; kb < kK / 16; ++kb) {
      const uint64_t b_desc = desc_b(0, 0, kb).desc_;
      if (tid == 0) check_addresses(sB, b_desc, N, mn_b, kb);
      kvk::wgmma_fence();
      if constexpr (kRegsA) {
        uint32_t regs[4] = {0, 0, 0, 0};
        for (int v = 0; v < 8; ++v) {
          const int mk = typename Traits::ALayout{}(tid, v);  // (M64, K16) column-major
          const int m = mk % kM, k = 16 * kb + mk / kM;
          regs[v / 2] |= static_cast<uint32_t>(bits(a[m * kK + k])) << (16 * (v % 2));
        }
        kvk::wgmma_mma_async_rs(acc, N, false, regs, b_desc, true, 1, 1, mn_b);
        kvk::wgmma_commit_group();
        kvk::wgmma_wait_group(0);  // before regs goes out of scope
      } else {
        Tensor desc_a = thr.partition_fragment_A(sA);
        const uint64_t a_desc = desc_a(0, 0, kb).desc_;
        if (tid == 0) check_addresses(sA, a_desc, kM, mn_a, kb);
        kvk::wgmma_mma_async_ss(acc, N, false, a_desc, b_desc, true, 1, 1, mn_a, mn_b);
        kvk::wgmma_commit_group();
      }
    }
    kvk::wgmma_wait_group(0);
    for (int v = 0; v < N / 2; ++v) {
      const int mn = typename Traits::CLayout{}(tid, v);
      d[(mn % kM) * N + mn / kM] = acc[v];
    }
  });
  if (!err.empty()) return check(false, name + ": " + err);
  check(address_mismatches == 0, name + ": " + std::to_string(address_mismatches) + " descriptor addresses differ");
  int wrong = 0;
  for (int m = 0; m < kM; ++m) {
    for (int n = 0; n < N; ++n) {
      double want = c[m * N + n];
      for (int k = 0; k < kK; ++k) want += double(float(a[m * kK + k])) * float(b[n * kK + k]);
      if (!(d[m * N + n] == want) && wrong++ < 3) {
        printf("  %s: D[%d][%d] = %g, expected %g\n", name.c_str(), m, n, d[m * N + n], want);
      }
    }
  }
  check(wrong == 0, name + ": " + std::to_string(wrong) + " of D wrong");
}

// Descriptor fields as the PTX ISA lays them out (start, LBO, SBO in 16-byte units; layout in bits 62-63).
uint64_t descriptor(uint32_t start, uint32_t lbo, uint32_t sbo, uint64_t layout) {
  return (start >> 4) | (uint64_t{lbo >> 4} << 16) | (uint64_t{sbo >> 4} << 32) | (layout << 62);
}

// Hand-computed from the PTX ISA ("Matrix Descriptor", "Shared Memory Matrix Layout"): a core
// matrix is 8 rows of 16 bytes; without a swizzle LBO steps between core matrices along K (K-major)
// and SBO along M/N; a W-byte swizzle XORs the 16-byte chunk index of a W-byte row with the row
// index within the repeating pattern (byte-address bits 7 ..).
void ptx_isa_cases() {
  struct Case {
    const char* what;
    uint64_t desc;
    bool mn_major;
    int mn, k;
    uint32_t address;
  };
  const Case cases[] = {
      // 1024 + (9 % 8) 16 + (9 / 8) SBO 128 + (10 % 8) 2 + (10 / 8) LBO 256
      {"K-major interleave", descriptor(1024, 256, 128, 0), false, 9, 10, 1428},
      // row 11: pattern row 3 of the second 1024-byte group; k 21 = byte 42 = chunk 2, 2 ^ 3 = 1:
      // 1024 + 1024 + 3 128 + 1 16 + 10
      {"K-major 128B swizzle", descriptor(1024, 16, 1024, 1), false, 11, 21, 2458},
      // 32-byte rows, row 5 = pattern row 1 (bit 7 of 160), k 12 = byte 24 = chunk 1, 1 ^ 1 = 0: 5 32 + 8
      {"K-major 32B swizzle", descriptor(0, 16, 256, 3), false, 5, 12, 168},
      // 64-byte rows, row 6 = pattern row 3 (bits 7-8 of 384), k 17 = byte 34 = chunk 2, 2 ^ 3 = 1: 6 64 + 16 + 2
      {"K-major 64B swizzle", descriptor(0, 16, 512, 2), false, 6, 17, 402},
      // mn 70: second 64-element group (LBO 2048), byte 12 = chunk 0; k 9: 128-byte row 1 of the
      // second 8-k group (SBO 1024); 0 ^ 1 = 1: 1024 + 2048 + 1024 + 128 + 16 + 12
      {"MN-major 128B swizzle", descriptor(1024, 2048, 1024, 1), true, 70, 9, 4252},
      // MN-major interleave: mn 11 = core matrix 1 along MN (SBO 128) + 3 2; k 13 = core matrix 1
      // along K (LBO 512) + row 5 16: 128 + 6 + 512 + 80
      {"MN-major interleave", descriptor(0, 512, 128, 0), true, 11, 13, 726},
  };
  for (const Case& c : cases) {
    std::string err;
    uint32_t got = 0;
    try {
      got = kvk::emu::wgmma_operand_address(c.desc, c.mn_major, c.mn, c.k);
    } catch (const std::runtime_error& e) {
      err = e.what();
    }
    if (!err.empty() || got != c.address) {
      check(false, std::string("PTX ISA ") + c.what + ": element (" + std::to_string(c.mn) + ", " +
                std::to_string(c.k) + ") at " + std::to_string(got) + ", expected " + std::to_string(c.address) +
                (err.empty() ? "" : " (" + err + ")"));
    }
  }
  // Fields the emulator does not model must be refused, not decoded.
  for (const uint64_t bad : {descriptor(1024, 16, 1024, 1) | (uint64_t{1} << 49), descriptor(0, 16, 1024, 1) | (uint64_t{1} << 14)}) {
    bool refused = false;
    try {
      kvk::emu::wgmma_operand_address(bad, false, 0, 0);
    } catch (const std::runtime_error&) {
      refused = true;
    }
    check(refused, "a descriptor with a base offset or a reserved bit set was decoded");
  }
}

}  // namespace

int main() {
  using GMMA::Major;
  ptx_isa_cases();
  // ss, both operands in every canonical layout (A and B in the same one), N = 64.
  gemm_case<64, Major::K, 0, Major::K, 0>();
  gemm_case<64, Major::K, 32, Major::K, 32>();
  gemm_case<64, Major::K, 64, Major::K, 64>();
  gemm_case<64, Major::K, 128, Major::K, 128>();
  gemm_case<64, Major::MN, 0, Major::MN, 0>();
  gemm_case<64, Major::MN, 32, Major::MN, 32>();
  gemm_case<64, Major::MN, 64, Major::MN, 64>();
  gemm_case<64, Major::MN, 128, Major::MN, 128>();
  // Mixed majors, the narrowest and widest N.
  gemm_case<64, Major::K, 128, Major::MN, 64>();
  gemm_case<8, Major::K, 128, Major::K, 0>();
  gemm_case<256, Major::K, 128, Major::K, 128>();   // the prefill's S = Q K^T form
  // rs: A from registers; B N-major as the prefill's O += P V, and K-major.
  gemm_case<64, Major::K, 128, Major::MN, 128, true>();
  gemm_case<256, Major::K, 128, Major::MN, 128, true>();
  gemm_case<64, Major::K, 128, Major::K, 32, true>();
  return kvk::emu_check::finish("all wgmma checks pass");
}
