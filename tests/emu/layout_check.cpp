// Independent check of the emulated mma.sync m16n8k16 and ldmatrix fragment layouts (csrc/emu/ptx.cpp)
// against CuTe's MMA and copy traits (the nvidia-cutlass headers, compiled host-only) and against
// the PTX ISA's fragment tables, written out here a second time. Each lane fills its fragments by
// the layout under test, runs the emulated instruction in a one-warp kernel, and the result must
// equal the host's product (mma) or the addressed elements (ldmatrix).
//
//   layout_check    exit 0 when every layout agrees, 1 with the mismatches printed otherwise
#include <cute/atom/copy_traits_sm75.hpp>
#include <cute/atom/mma_traits_sm80.hpp>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>

#include "common/launch.cuh"
#include "common/ptx.cuh"

namespace {

enum class Source { kCute, kPtxIsa };

// (lane, value) -> coordinates, per source. A: (m, k) of value v = half v % 2 of register v / 2.
void a_coord(Source s, int l, int v, int& m, int& k) {
  if (s == Source::kCute) {
    const int idx = cute::MMA_Traits<cute::SM80_16x8x16_F32F16F16F32_TN>::ALayout{}(l, v);  // (M16, K16)
    m = idx % 16, k = idx / 16;
  } else {  // PTX ISA, "Matrix Fragments for mma.m16n8k16": a_i, i = v
    const int g = l / 4, t = l % 4;
    m = (v < 2 || (v >= 4 && v < 6)) ? g : g + 8;
    k = t * 2 + (v & 1) + (v >= 4 ? 8 : 0);
  }
}

void b_coord(Source s, int l, int v, int& k, int& n) {
  if (s == Source::kCute) {
    const int idx = cute::MMA_Traits<cute::SM80_16x8x16_F32F16F16F32_TN>::BLayout{}(l, v);  // (N8, K16)
    n = idx % 8, k = idx / 8;
  } else {
    k = (l % 4) * 2 + (v & 1) + (v >= 2 ? 8 : 0);
    n = l / 4;
  }
}

void c_coord(Source s, int l, int v, int& m, int& n) {
  if (s == Source::kCute) {
    const int idx = cute::MMA_Traits<cute::SM80_16x8x16_F32F16F16F32_TN>::CLayout{}(l, v);  // (M16, N8)
    m = idx % 16, n = idx / 16;
  } else {
    m = l / 4 + (v >= 2 ? 8 : 0);
    n = (l % 4) * 2 + (v & 1);
  }
}

struct MmaArgs {
  Source source;
  const __half* a;  // [16][16]
  const __half* b;  // [16 k][8 n]
  const float* c;   // [16][8]
  float* d;         // [16][8]
};

uint16_t bits(__half h) {
  uint16_t u;
  memcpy(&u, &h, 2);
  return u;
}

__global__ void mma_kernel(const MmaArgs p) {
  const int l = threadIdx.x;
  uint32_t a[4] = {0, 0, 0, 0}, b[2] = {0, 0};
  float d[4];
  for (int v = 0; v < 8; ++v) {
    int m, k;
    a_coord(p.source, l, v, m, k);
    a[v / 2] |= static_cast<uint32_t>(bits(p.a[m * 16 + k])) << (16 * (v % 2));
  }
  for (int v = 0; v < 4; ++v) {
    int k, n;
    b_coord(p.source, l, v, k, n);
    b[v / 2] |= static_cast<uint32_t>(bits(p.b[k * 8 + n])) << (16 * (v % 2));
    int m;
    c_coord(p.source, l, v, m, n);
    d[v] = p.c[m * 8 + n];
  }
  kvk::mma_m16n8k16<__half>(d, a, b[0], b[1]);
  for (int v = 0; v < 4; ++v) {
    int m, n;
    c_coord(p.source, l, v, m, n);
    p.d[m * 8 + n] = d[v];
  }
}

int check_mma(Source source, const char* name) {
  std::mt19937 rng(7);
  std::uniform_int_distribution<int> small(-8, 8);  // products and sums exact in fp32
  __half a[256], b[128];
  float c[128], d[128];
  for (auto& x : a) x = __float2half_rn(small(rng) / 4.0f);
  for (auto& x : b) x = __float2half_rn(small(rng) / 4.0f);
  for (auto& x : c) x = static_cast<float>(small(rng));
  for (auto& x : d) x = NAN;
  KVK_LAUNCH(1, 32, 0, nullptr, mma_kernel)(MmaArgs{source, a, b, c, d});
  int bad = 0;
  for (int m = 0; m < 16; ++m) {
    for (int n = 0; n < 8; ++n) {
      double want = c[m * 8 + n];
      for (int k = 0; k < 16; ++k) want += double(__half2float(a[m * 16 + k])) * __half2float(b[k * 8 + n]);
      if (!(d[m * 8 + n] == want)) {
        if (bad++ < 4) printf("mma (%s): D[%d][%d] = %g, expected %g\n", name, m, n, d[m * 8 + n], want);
      }
    }
  }
  return bad;
}

// ldmatrix: the tile holds 32 rows of 8 16-bit elements, element e = row * 8 + col has value e.
struct LdArgs {
  Source source;
  int num;     // matrices
  bool trans;
  int cute_kind;  // index into the CuTe traits below
  uint32_t* out;  // [32 lanes][4]
};

template <class Traits>
int src_row(int l) { return typename Traits::SrcLayout{}(l, 0) / 128; }
template <class Traits>
int dst_elem(int l, int j, int h) { return typename Traits::DstLayout{}(l, 32 * j + 16 * h) / 16; }

// CuTe's ldmatrix atoms: x1, x2, x4 and their .trans forms.
using namespace cute;
int cute_src_row(int kind, int l) {
  switch (kind) {
    case 0: return src_row<Copy_Traits<SM75_U32x1_LDSM_N>>(l);
    case 1: return src_row<Copy_Traits<SM75_U32x2_LDSM_N>>(l);
    case 2: return src_row<Copy_Traits<SM75_U32x4_LDSM_N>>(l);
    case 3: return src_row<Copy_Traits<SM75_U16x2_LDSM_T>>(l);
    case 4: return src_row<Copy_Traits<SM75_U16x4_LDSM_T>>(l);
    default: return src_row<Copy_Traits<SM75_U16x8_LDSM_T>>(l);
  }
}
int cute_dst_elem(int kind, int l, int j, int h) {
  switch (kind) {
    case 0: return dst_elem<Copy_Traits<SM75_U32x1_LDSM_N>>(l, j, h);
    case 1: return dst_elem<Copy_Traits<SM75_U32x2_LDSM_N>>(l, j, h);
    case 2: return dst_elem<Copy_Traits<SM75_U32x4_LDSM_N>>(l, j, h);
    case 3: return dst_elem<Copy_Traits<SM75_U16x2_LDSM_T>>(l, j, h);
    case 4: return dst_elem<Copy_Traits<SM75_U16x4_LDSM_T>>(l, j, h);
    default: return dst_elem<Copy_Traits<SM75_U16x8_LDSM_T>>(l, j, h);
  }
}

__global__ void ldmatrix_kernel(const LdArgs p) {
  const int l = threadIdx.x;
  uint16_t* tile = reinterpret_cast<uint16_t*>(kvk::dynamic_smem());
  for (int e = l; e < 256; e += 32) tile[e] = static_cast<uint16_t>(e);
  __syncthreads();
  // The row lane l points at: CuTe's source layout, or the PTX ISA's "lane l: row l % 8 of matrix l / 8".
  const int row = p.source == Source::kCute ? cute_src_row(p.cute_kind, l) : (l < 8 * p.num ? l : l % 8);
  const uint32_t addr = kvk::smem_u32(tile + row * 8);
  uint32_t r[4] = {0, 0, 0, 0};
  if (p.num == 1) {
    uint32_t x[1];
    p.trans ? kvk::ldmatrix_x1_trans(x, addr) : kvk::ldmatrix_x1(x, addr);
    r[0] = x[0];
  } else if (p.num == 2) {
    uint32_t x[2];
    p.trans ? kvk::ldmatrix_x2_trans(x, addr) : kvk::ldmatrix_x2(x, addr);
    r[0] = x[0], r[1] = x[1];
  } else {
    p.trans ? kvk::ldmatrix_x4_trans(r, addr) : kvk::ldmatrix_x4(r, addr);
  }
  for (int j = 0; j < 4; ++j) p.out[l * 4 + j] = r[j];
}

int check_ldmatrix(Source source, int num, bool trans, const char* name) {
  const int kind = (trans ? 3 : 0) + (num == 1 ? 0 : num == 2 ? 1 : 2);
  uint32_t out[128];
  KVK_LAUNCH(1, 32, 512, nullptr, ldmatrix_kernel)(LdArgs{source, num, trans, kind, out});
  int bad = 0;
  for (int l = 0; l < 32; ++l) {
    for (int j = 0; j < num; ++j) {
      for (int h = 0; h < 2; ++h) {
        int want;
        if (source == Source::kCute) {
          want = cute_dst_elem(kind, l, j, h);
        } else {  // matrix j, row l / 4, column 2 (l % 4) + h; transposed: row and column swapped
          const int r = l / 4, c = 2 * (l % 4) + h;
          want = j * 64 + (trans ? c * 8 + r : r * 8 + c);
        }
        const int got = static_cast<int>((out[l * 4 + j] >> (16 * h)) & 0xFFFFu);
        if (got != want && bad++ < 4) {
          printf("ldmatrix.x%d%s (%s): lane %d reg %d half %d = element %d, expected %d\n", num, trans ? ".trans" : "",
                 name, l, j, h, got, want);
        }
      }
    }
  }
  return bad;
}

}  // namespace

int main() {
  int bad = 0;
  for (Source s : {Source::kCute, Source::kPtxIsa}) {
    const char* name = s == Source::kCute ? "CuTe" : "PTX ISA";
    bad += check_mma(s, name);
    for (int num : {1, 2, 4}) {
      for (bool trans : {false, true}) bad += check_ldmatrix(s, num, trans, name);
    }
  }
  printf(bad ? "layout check: %d mismatches\n" : "layout check: all layouts agree\n", bad);
  return bad ? 1 : 0;
}
