// Tile shapes of the prefill kernels, one row per (path, head dim). Plain constexpr C++ (no CUDA)
// so the host planner, the kernels and the torch glue read the same table.
//
// Two paths, chosen by the device's compute capability:
//   sm80: mma.sync m16n8k16 + ldmatrix + cp.async double buffering. Runs on every sm_80+ device
//         (sm_80/86/87/89 from the sm_80 cubin, sm_90 from the sm_90a cubin).
//   sm90: wgmma + TMA + warp specialisation (one producer warpgroup, two consumer warpgroups of
//         64 query rows each). Only in the sm_90a cubin; only chosen on compute capability 9.0.
#pragma once

namespace kvk {
namespace prefill {

constexpr int kPathSm80 = 80;
constexpr int kPathSm90 = 90;

// Largest dynamic shared memory a block may opt into on the smallest sm_8x part (sm_86 / sm_89:
// 99 KB). Every sm80-path tile fits it, so one table serves A100, A10, L4, L40 and H100 alike.
constexpr int kSm86SmemOptin = 99 * 1024;
// sm_90 (H100/H200): 227 KB per block.
constexpr int kSm90SmemOptin = 227 * 1024;

// ---------------------------------------------------------------------------------- sm80 path
//
// Each warp owns 16 query rows (one m16 MMA row block), so kBlockM = 16 * kWarps. Per thread the
// accumulators cost kHeadDim / 2 (O) + kBlockN / 2 (S) fp32 registers, and Q held in registers
// another kHeadDim / 4; the choices below keep every configuration under 255 registers with no
// spills. K/V tiles are double buffered.
template <int D>
struct Sm80Tile;

// D=64: wide key tiles (S 64 regs, O 32 regs) amortise the two block barriers per tile.
template <>
struct Sm80Tile<64> {
  static constexpr int kBlockM = 128, kBlockN = 128, kWarps = 8;
  static constexpr bool kQInRegs = true;
};
// D=128: O 64 + S 32 + Q 32 registers; 96 KB of shared memory (fits sm_86's 99 KB).
template <>
struct Sm80Tile<128> {
  static constexpr int kBlockM = 128, kBlockN = 64, kWarps = 8;
  static constexpr bool kQInRegs = true;
};
// D=256: O alone is 128 registers, so Q stays in shared memory (re-read with ldmatrix per tile)
// and key tiles are 32 wide; 96 KB of shared memory.
template <>
struct Sm80Tile<256> {
  static constexpr int kBlockM = 64, kBlockN = 32, kWarps = 4;
  static constexpr bool kQInRegs = false;
};

template <int D>
struct Sm80Shape : Sm80Tile<D> {
  using Tile = Sm80Tile<D>;
  static constexpr int kHeadDim = D;
  static constexpr int kThreads = Tile::kWarps * 32;
  static constexpr int kStages = 2;  // K/V double buffering
  // 16-bit elements: Q tile + kStages x (K tile + V tile).
  static constexpr int kSmemBytes = 2 * (Tile::kBlockM * D + kStages * 2 * Tile::kBlockN * D);
  static_assert(Tile::kBlockM == 16 * Tile::kWarps, "one m16 row block per warp");
  static_assert(Tile::kBlockN % 16 == 0 && D % 16 == 0, "k16 MMA steps");
  static_assert(kSmemBytes <= kSm86SmemOptin, "sm80 tiles must fit sm_86's shared memory");
};

// ---------------------------------------------------------------------------------- sm90 path
//
// Block = 3 warpgroups: warpgroup 0 produces (one thread issues TMA loads), warpgroups 1 and 2
// each own 64 query rows (one wgmma m64 row block), so kBlockM = 128. S = Q K^T is a
// wgmma m64 n(kBlockN) k16 with both operands in shared memory; O += P V takes P from registers
// and is a wgmma m64 n(D) k16. Shared memory holds Q plus kStages K and V tiles, each stored as
// 64-column (128-byte) panels with the 128-byte swizzle that TMA writes and wgmma reads.
template <int D>
struct Sm90Tile;

template <>
struct Sm90Tile<64> {
  static constexpr int kBlockM = 128, kBlockN = 128, kStages = 2;
};
template <>
struct Sm90Tile<128> {
  static constexpr int kBlockM = 128, kBlockN = 128, kStages = 2;
};
// D=256: O is 128 registers per consumer thread; 64-wide key tiles keep S at 32.
template <>
struct Sm90Tile<256> {
  static constexpr int kBlockM = 128, kBlockN = 64, kStages = 2;
};

template <int D>
struct Sm90Shape : Sm90Tile<D> {
  using Tile = Sm90Tile<D>;
  static constexpr int kHeadDim = D;
  static constexpr int kConsumerWarpgroups = 2;
  static constexpr int kThreads = (kConsumerWarpgroups + 1) * 128;
  static constexpr int kPanels = D / 64;  // 64-element (128-byte) column panels per row
  static constexpr int kQBytes = Tile::kBlockM * D * 2;
  static constexpr int kKVBytes = Tile::kBlockN * D * 2;  // one K (or V) tile
  // Q, kStages x (K, V), then the mbarriers; +1024 so the tiles can be aligned to the 1024-byte
  // swizzle atom whatever the base alignment of dynamic shared memory.
  static constexpr int kBarrierBytes = 128;
  static constexpr int kSmemBytes = 1024 + kQBytes + Tile::kStages * 2 * kKVBytes + kBarrierBytes;
  static_assert(Tile::kBlockM == 64 * kConsumerWarpgroups, "one m64 row block per consumer warpgroup");
  static_assert(D % 64 == 0, "head dim in whole 128-byte panels");
  static_assert(Tile::kBlockN % 16 == 0 && Tile::kBlockN <= 256, "wgmma n");
  static_assert(kSmemBytes <= kSm90SmemOptin, "sm90 tiles must fit 227 KB");
};

}  // namespace prefill
}  // namespace kvk
