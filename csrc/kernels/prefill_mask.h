// Causal / sliding-window visibility of the prefill kernels: which key tiles a block of query rows
// loads, which of them need a per-element mask, and the exact key interval of each row.
// Plain C++ usable on host and device: the kernels run it, and the torch glue exposes it on the CPU
// (torch.ops.kvkernels_C.prefill_block_keys) so tests check it against the reference mask.
//
// Query i of a sequence (0-based) sees key j iff 0 <= j < sk and
//   (left  < 0 or j >= i + sk - sq - left) and (right < 0 or j <= i + sk - sq + right)
// (bottom-right aligned; causal is right = 0). Tiles outside the block's range are wholly masked for
// every row of the block and are never loaded; tiles inside it that are wholly visible skip the
// per-element mask.
#pragma once

#if defined(__CUDACC__)
#define KVK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define KVK_HOST_DEVICE inline
#endif

namespace kvk {
namespace prefill {

struct Mask {
  int sk;
  int diag;  // sk - sq: the key on the diagonal of query 0
  int left, right;  // window, -1 = unbounded

  KVK_HOST_DEVICE static int imin(int a, int b) { return a < b ? a : b; }
  KVK_HOST_DEVICE static int imax(int a, int b) { return a > b ? a : b; }

  // The keys row i sees are exactly [*lo, *hi] (empty when *lo > *hi).
  KVK_HOST_DEVICE void row_bounds(int i, int* lo, int* hi) const {
    *lo = left < 0 ? 0 : imax(0, i + diag - left);
    *hi = right < 0 ? sk - 1 : imin(sk - 1, i + diag + right);
  }

  // The keys [*lo, *hi) that some row of [m_first, m_last] sees (empty when *lo >= *hi).
  KVK_HOST_DEVICE void key_range(int m_first, int m_last, int* lo, int* hi) const {
    *lo = left < 0 ? 0 : imax(0, m_first + diag - left);
    *hi = right < 0 ? sk : imin(sk, m_last + diag + right + 1);
  }

  // Key tiles [*tile_begin, *tile_begin + *n_tiles) of width block_n that hold every key some row
  // of [m_first, m_last] sees; *n_tiles may be 0 (every row of the block is fully masked).
  KVK_HOST_DEVICE void tile_range(int m_first, int m_last, int block_n, int* tile_begin, int* n_tiles) const {
    int lo, hi;
    key_range(m_first, m_last, &lo, &hi);
    *tile_begin = lo / block_n;
    *n_tiles = hi > lo ? (hi + block_n - 1) / block_n - lo / block_n : 0;
  }

  // True when some (row in [m_first, m_last], key in [n0, n0 + block_n)) pair is not visible.
  KVK_HOST_DEVICE bool needs_mask(int m_first, int m_last, int n0, int block_n) const {
    const int n_last = n0 + block_n - 1;
    return n_last >= sk || (right >= 0 && n_last > m_first + diag + right) ||
           (left >= 0 && n0 < m_last + diag - left);
  }
};

}  // namespace prefill
}  // namespace kvk
