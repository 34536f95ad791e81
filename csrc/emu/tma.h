// The emulated Tensor Memory Accelerator (emu/tma.cpp).
//
//   tensor_map_encode_tiled   the emulator's cuTensorMapEncodeTiled (what
//                  cudaGetDriverEntryPointByVersion hands out), with the driver's argument rules:
//                  map 64-byte aligned, rank 1..5, global address 16-byte aligned, dims 1 .. 2^32,
//                  strides multiples of 16 below 2^40, box 1 .. 256 per dim with an inner box of
//                  a multiple of 16 bytes, element strides 1 .. 8, and with a swizzle the inner box
//                  no wider than its span (32, 64, 128 bytes). A violation returns
//                  CUDA_ERROR_INVALID_VALUE like the driver; tensor_map_error() says which rule.
//                  Only the plain tiled modes the kernels use are modelled (no interleave, no
//                  128B_ATOM swizzles): the others are rejected as unsupported.
//   tma_load       cp.async.bulk.tensor.Nd.shared::cluster.global.mbarrier::complete_tx::bytes:
//                  the box at `coords` (innermost first, signed) into shared memory at `dst`
//                  (128-byte aligned), element (i0, i1, ..) at byte offset
//                  ((.. i2) * box1 + i1) * box0 + i0) * elem of the box, then the swizzle applied to
//                  the shared address itself (128B: bits 4-6 ^= bits 7-9; 64B: 4-5 ^= 7-8; 32B:
//                  4 ^= 7), so the pattern is the hardware's wherever the box lands. Elements
//                  outside the tensor are zeros (NaN with the NAN_REQUEST_ZERO_FMA fill). The
//                  source is read at issue; the destination holds poison until the copy lands at
//                  a later scheduling point (after the issuing thread next blocks), which then
//                  completes the box's bytes on the mbarrier `bar`.
#pragma once

#include <cuda.h>

#include <cstdint>
#include <string>

namespace kvk {
namespace emu {

CUresult tensor_map_encode_tiled(CUtensorMap* map, CUtensorMapDataType dtype, cuuint32_t rank, void* base,
                                 const cuuint64_t* dims, const cuuint64_t* strides, const cuuint32_t* box,
                                 const cuuint32_t* elem_strides, CUtensorMapInterleave interleave,
                                 CUtensorMapSwizzle swizzle, CUtensorMapL2promotion l2, CUtensorMapFloatOOBfill fill);
// Why the last encode on this OS thread failed ("" after a success).
const std::string& tensor_map_error();

// Lands every TMA copy issued so far (the scheduler calls it between rounds); true if any landed.
bool land_async_copies();
// Forgets the copies in flight (a launch that stopped with an error).
void drop_async_copies();

}  // namespace emu

void tma_load(uint32_t dst, const void* tensor_map, uint32_t bar, const int* coords, int rank);

}  // namespace kvk
