// Emulated sm_90a warpgroup MMA (emu/wgmma.cpp), with the PTX ISA's rules:
//
//   wgmma.mma_async.sync.aligned.m64nNk16.f32.{f16,bf16}   N = 8 .. 256 in steps of 8:
//                  D (64 x N, fp32) = A (64 x 16) B (16 x N) (+ D with scale-d). B comes through a
//                  shared-memory descriptor; A through one too (ss) or from registers (rs: warp w of
//                  the warpgroup holds rows 16 w .. 16 w + 15 in the m16n8k16 A-fragment layout).
//                  Register i of lane l of warp w holds D row 16 w + l / 4 + 8 ((i / 2) % 2), column
//                  8 (i / 4) + 2 (l % 4) + i % 2. imm-trans-a / -b: the operand is MN-major instead of
//                  K-major; imm-scale-a / -b = -1 negates it. Products are exact in fp32 and summed
//                  in k order in fp32, starting from C (as the emulated mma.sync).
//   descriptors    decoded as the hardware does: bits 0-13 start address >> 4, 16-29 leading
//                  byte offset (LBO) >> 4, 32-45 stride byte offset (SBO) >> 4, 49-51 base offset,
//                  62-63 layout (0 interleave, 1 128-byte, 2 64-byte, 3 32-byte swizzle); the
//                  reserved bits and the base offset must be zero (tiles on swizzle-atom
//                  boundaries; nothing else is modelled). Element (mn, k) of a 16-bit operand sits
//                  at byte (CuTe's canonical GMMA layouts, mma_traits_sm90_gmma.hpp):
//                    K-major,  interleave     start + (mn % 8) 16 + (mn / 8) SBO + (k % 8) 2 + (k / 8) LBO
//                    K-major,  W-byte swizzle start + (mn % 8) W + (mn / 8) SBO + 2 k
//                    MN-major, interleave     start + (mn % 8) 2 + (mn / 8) SBO + (k % 8) 16 + (k / 8) LBO
//                    MN-major, W-byte swizzle start + (mn % (W/2)) 2 + (mn / (W/2)) LBO + (k % 8) W + (k / 8) SBO
//                  and then the address bits are swizzled as TMA writes them (128B: bits 4-6 ^= 7-9,
//                  64B: 4-5 ^= 7-8, 32B: 4 ^= 7).
//   asynchrony     an op runs when the wgmma.wait_group covering it returns, not at issue: it reads
//                  its shared-memory operands then (a stage released or refilled too early is read
//                  as it is by then) and its A registers (which must still hold what they held at
//                  issue). From the issue to that wait its accumulator registers hold poison (a
//                  NaN), so an early read computes NaN, and a register written in between fails
//                  the wait. Ops on the same accumulators chain in issue order.
//   wgmma.fence    must come between a thread's last wait_group (or its start) and its next
//                  mma_async: the registers may have been touched in between.
//   commit_group   closes the thread's open group (possibly empty).
//   wait_group N   a collective of the warp: completes all but the newest N committed groups. The
//                  instruction is warpgroup-wide, so the wait first waits (a hang if never) until the
//                  other three warps of the warpgroup have issued the ops it completes.
#pragma once

#include <cstdint>

namespace kvk {

void wgmma_fence();
void wgmma_commit_group();
void wgmma_wait_group(int n);

// d: the thread's n / 2 accumulator registers; scale_a / scale_b: +1 or -1.
void wgmma_mma_async_ss(float* d, int n, bool bf16, uint64_t desc_a, uint64_t desc_b, bool scale_d, int scale_a,
                        int scale_b, bool trans_a, bool trans_b);
void wgmma_mma_async_rs(float* d, int n, bool bf16, const uint32_t* a, uint64_t desc_b, bool scale_d, int scale_a,
                        int scale_b, bool trans_b);

namespace emu {

// The shared address of element (mn, k) of a 16-bit wgmma operand described by `desc`, MN-major
// (transposed) or K-major: the decode above. Fails on a descriptor the emulator does not model.
uint32_t wgmma_operand_address(uint64_t desc, bool mn_major, int mn, int k);

}  // namespace emu
}  // namespace kvk
