// The emulated Tensor Memory Accelerator (see emu/tma.h).
#include "emu/tma.h"

#include "emu/racecheck.h"
#include "emu/runtime.h"
#include "emu/sm90.h"

#include <cstring>
#include <vector>

namespace kvk {
namespace emu {
namespace {

// What the emulator keeps in the 128 opaque bytes of a CUtensorMap (copied by value into the
// kernel's parameters, so it must hold everything).
struct Map {
  uint32_t magic;
  uint8_t rank, elem, swizzle, fill;  // elem: bytes per element; swizzle: span in bytes (0: none)
  const unsigned char* base;
  uint64_t dims[5];
  uint64_t strides[5];  // bytes; strides[0] = elem
  uint16_t box[5];
  uint8_t elem_strides[5];
  uint8_t is_float;
};
static_assert(sizeof(Map) <= sizeof(CUtensorMap), "the emulated tensor map must fit the driver's");
constexpr uint32_t kMagic = 0x544D4150u;  // "TMAP"

thread_local std::string g_error;

CUresult reject(const std::string& why) {
  g_error = "cuTensorMapEncodeTiled: " + why;
  return CUDA_ERROR_INVALID_VALUE;
}

int elem_bytes(CUtensorMapDataType t, bool* is_float) {
  *is_float = false;
  switch (t) {
    case CU_TENSOR_MAP_DATA_TYPE_UINT8: return 1;
    case CU_TENSOR_MAP_DATA_TYPE_UINT16: return 2;
    case CU_TENSOR_MAP_DATA_TYPE_UINT32:
    case CU_TENSOR_MAP_DATA_TYPE_INT32: return 4;
    case CU_TENSOR_MAP_DATA_TYPE_UINT64:
    case CU_TENSOR_MAP_DATA_TYPE_INT64: return 8;
    case CU_TENSOR_MAP_DATA_TYPE_FLOAT16:
    case CU_TENSOR_MAP_DATA_TYPE_BFLOAT16: *is_float = true; return 2;
    case CU_TENSOR_MAP_DATA_TYPE_FLOAT32:
    case CU_TENSOR_MAP_DATA_TYPE_FLOAT32_FTZ:
    case CU_TENSOR_MAP_DATA_TYPE_TFLOAT32:
    case CU_TENSOR_MAP_DATA_TYPE_TFLOAT32_FTZ: *is_float = true; return 4;
    case CU_TENSOR_MAP_DATA_TYPE_FLOAT64: *is_float = true; return 8;
    default: return 0;
  }
}

// A copy in flight: the box's bytes (already swizzled: one shared address per 16-byte chunk run).
struct Copy {
  Block* block;
  uint32_t dst, bar;
  std::vector<unsigned char> bytes;  // in box order
  uint8_t swizzle;
  race::AsyncCopy race;  // the race checker's agent for it, and its issue's clock
};
thread_local std::vector<Copy> g_copies;

uint32_t swizzled(uint32_t a, int span) {
  switch (span) {
    case 128: return a ^ (((a >> 7) & 7u) << 4);
    case 64: return a ^ (((a >> 7) & 3u) << 4);
    case 32: return a ^ (((a >> 7) & 1u) << 4);
    default: return a;
  }
}

}  // namespace

const std::string& tensor_map_error() { return g_error; }

CUresult tensor_map_encode_tiled(CUtensorMap* map, CUtensorMapDataType dtype, cuuint32_t rank, void* base,
                                 const cuuint64_t* dims, const cuuint64_t* strides, const cuuint32_t* box,
                                 const cuuint32_t* elem_strides, CUtensorMapInterleave interleave,
                                 CUtensorMapSwizzle swizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill fill) {
  g_error.clear();
  if (!map || reinterpret_cast<uintptr_t>(map) % 64) return reject("the tensor map is not 64-byte aligned");
  bool is_float;
  const int elem = elem_bytes(dtype, &is_float);
  if (!elem) return reject("data type " + std::to_string(dtype) + " is not modelled by the emulator");
  if (rank < 1 || rank > 5) return reject("rank " + std::to_string(rank) + " outside 1 .. 5");
  if (reinterpret_cast<uintptr_t>(base) % 16) return reject("the global address is not 16-byte aligned");
  if (interleave != CU_TENSOR_MAP_INTERLEAVE_NONE) return reject("interleaved layouts are not modelled by the emulator");
  int span = 0;
  switch (swizzle) {
    case CU_TENSOR_MAP_SWIZZLE_NONE: span = 0; break;
    case CU_TENSOR_MAP_SWIZZLE_32B: span = 32; break;
    case CU_TENSOR_MAP_SWIZZLE_64B: span = 64; break;
    case CU_TENSOR_MAP_SWIZZLE_128B: span = 128; break;
    default: return reject("swizzle mode " + std::to_string(swizzle) + " is not modelled by the emulator");
  }
  if (fill == CU_TENSOR_MAP_FLOAT_OOB_FILL_NAN_REQUEST_ZERO_FMA && !is_float) {
    return reject("the NaN out-of-bounds fill needs a floating-point data type");
  }
  Map m{};
  m.magic = kMagic;
  m.rank = static_cast<uint8_t>(rank);
  m.elem = static_cast<uint8_t>(elem);
  m.swizzle = static_cast<uint8_t>(span);
  m.fill = fill == CU_TENSOR_MAP_FLOAT_OOB_FILL_NAN_REQUEST_ZERO_FMA;
  m.is_float = is_float;
  m.base = static_cast<const unsigned char*>(base);
  m.strides[0] = elem;
  for (cuuint32_t d = 0; d < rank; ++d) {
    const std::string dim = "dimension " + std::to_string(d);
    if (dims[d] < 1 || dims[d] > (1ull << 32)) return reject(dim + ": size " + std::to_string(dims[d]) + " outside 1 .. 2^32");
    if (box[d] < 1 || box[d] > 256) return reject(dim + ": box " + std::to_string(box[d]) + " outside 1 .. 256");
    if (elem_strides[d] < 1 || elem_strides[d] > 8) return reject(dim + ": element stride outside 1 .. 8");
    m.dims[d] = dims[d];
    m.box[d] = static_cast<uint16_t>(box[d]);
    m.elem_strides[d] = static_cast<uint8_t>(elem_strides[d]);
    if (d > 0) {
      const cuuint64_t s = strides[d - 1];
      if (s % 16) return reject(dim + ": stride " + std::to_string(s) + " bytes is not a multiple of 16");
      if (s >= (1ull << 40)) return reject(dim + ": stride " + std::to_string(s) + " bytes is not below 2^40");
      m.strides[d] = s;
    }
  }
  const uint64_t inner = static_cast<uint64_t>(box[0]) * elem;
  if (inner % 16) return reject("the inner box (" + std::to_string(inner) + " bytes) is not a multiple of 16 bytes");
  if (span && inner > static_cast<uint64_t>(span)) {
    return reject("the inner box (" + std::to_string(inner) + " bytes) is wider than the " + std::to_string(span) +
                  "-byte swizzle");
  }
  memset(map, 0, sizeof(*map));
  memcpy(map, &m, sizeof(m));
  return CUDA_SUCCESS;
}

void drop_async_copies() { g_copies.clear(); }

bool land_async_copies() {
  if (g_copies.empty()) return false;
  std::vector<Copy> copies;
  copies.swap(g_copies);
  for (const Copy& c : copies) {
    race::AsyncAgent agent(c.race);  // the copy writes and completes, not a thread
    for (size_t o = 0; o < c.bytes.size(); o += 16) {
      unsigned char* chunk = c.block->smem + swizzled(c.dst + static_cast<uint32_t>(o), c.swizzle);
      race::access(chunk, 16, true);
      memcpy(chunk, c.bytes.data() + o, 16);
    }
    mbarrier_complete_tx(c.bar, static_cast<uint32_t>(c.bytes.size()));
  }
  return true;
}

}  // namespace emu

void tma_load(uint32_t dst, const void* tensor_map, uint32_t bar, const int* coords, int rank) {
  const char* what = "cp.async.bulk.tensor";
  if (reinterpret_cast<uintptr_t>(tensor_map) % 64) emu::fail("%s: the tensor map is not 64-byte aligned", what);
  emu::Map m;
  memcpy(&m, tensor_map, sizeof(m));
  if (m.magic != emu::kMagic) emu::fail("%s: %p is not an encoded tensor map", what, tensor_map);
  if (m.rank != rank) emu::fail("%s: a %dd copy of a rank-%d tensor map", what, rank, m.rank);
  uint64_t count = 1;
  uint64_t n[5] = {1, 1, 1, 1, 1};  // elements per dimension in the box
  for (int d = 0; d < rank; ++d) {
    n[d] = (m.box[d] + m.elem_strides[d] - 1) / m.elem_strides[d];
    count *= n[d];
  }
  const size_t bytes = count * m.elem;
  // With a swizzle the chunks of a partial last 128-byte row may move anywhere inside that row.
  emu::shared_ptr(dst, m.swizzle ? (bytes + 127) / 128 * 128 : bytes, 128, what);
  unsigned char* dst_ptr = emu::shared_ptr(dst, bytes, 128, what);
  emu::Copy c;
  c.block = &emu::current_block();
  c.dst = dst;
  c.bar = bar;
  c.swizzle = m.swizzle;
  c.bytes.resize(bytes);
  // Reads the box now: a bad global address fails here, in the issuing thread.
  unsigned char nan_elem[8];
  if (m.elem == 2) {
    // fp16 and bf16 alike: 0xFFFF is a NaN in both
    memset(nan_elem, 0xFF, 2);
  } else {
    memset(nan_elem, 0xFF, sizeof(nan_elem));
  }
  size_t out = 0;
  for (uint64_t i4 = 0; i4 < n[4]; ++i4)
    for (uint64_t i3 = 0; i3 < n[3]; ++i3)
      for (uint64_t i2 = 0; i2 < n[2]; ++i2)
        for (uint64_t i1 = 0; i1 < n[1]; ++i1)
          for (uint64_t i0 = 0; i0 < n[0]; ++i0, out += m.elem) {
            const uint64_t idx[5] = {i0, i1, i2, i3, i4};
            bool inside = true;
            uint64_t offset = 0;
            for (int d = 0; d < rank; ++d) {
              const int64_t x = static_cast<int64_t>(coords[d]) + static_cast<int64_t>(idx[d] * m.elem_strides[d]);
              if (x < 0 || static_cast<uint64_t>(x) >= m.dims[d]) inside = false;
              else offset += static_cast<uint64_t>(x) * m.strides[d];
            }
            if (inside) memcpy(&c.bytes[out], m.base + offset, m.elem);
            else if (m.fill) memcpy(&c.bytes[out], nan_elem, m.elem);
            else memset(&c.bytes[out], 0, m.elem);
          }
  // The barrier must exist now (the copy completes on it later).
  if (!emu::current_block().mbarriers.count(bar)) emu::fail("%s: no mbarrier was initialised at shared address %u", what, bar);
  // The box counts as written from the issue (by the copy, after what its thread did so far).
  c.race = emu::race::async_issue();
  {
    emu::race::AsyncAgent agent(c.race);
    emu::race::access(dst_ptr, bytes, true);
  }
  {
    emu::race::Internal internal;
    memset(dst_ptr, 0xFF, bytes);  // poison until it lands
  }
  emu::g_copies.push_back(std::move(c));
}

}  // namespace kvk
