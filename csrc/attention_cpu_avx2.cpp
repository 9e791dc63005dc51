// The AVX2 + FMA (fp32) tile kernels of the CPU attention: the register-tiled product, the
// forward's softmax pass, the backward's fused P / dS epilogue, the 8 x 8 transpose and the
// streaming output stores. The same structure as attention_cpu_avx512.cpp, for 8-lane vectors and
// 16 vector registers. Compiled with target attributes in a baseline build; attention_cpu_isa.cpp
// calls them only where the CPU has AVX2 and FMA.
//
// AVX2 has no mask registers: lane masks are vectors (from a table), edges of a row are blended,
// and a partial last vector of a product is loaded / stored with vmaskmov only where the operand
// really ends there (the full-vector case is a separate instantiation without masks).
#include "attention_cpu.h"

#include <algorithm>

#if TF_X86_KERNELS
#include <immintrin.h>

namespace transfusion_fast::attention_cpu::avx2 {

#define TF_AVX2 __attribute__((target("avx2,fma")))

// Lanes [0, k) for k in [0, 8]: 8 - k entries into a table of eight -1 then eight 0.
alignas(64) constexpr int32_t kPrefixMasks[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
TF_AVX2 TF_INLINE __m256i prefix(int64_t k) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kPrefixMasks + 8 - clamp_to(k, 0, 8)));
}
// Lanes [a, b) of the 8-lane step starting at column j.
TF_AVX2 TF_INLINE __m256i lanes(int64_t j, int64_t a, int64_t b) {
  return _mm256_andnot_si256(prefix(a - j), prefix(b - j));
}
TF_AVX2 TF_INLINE __m256 keep(__m256i mask, __m256 x) { return _mm256_and_ps(_mm256_castsi256_ps(mask), x); }

// exp_approx on 8 lanes: same range reduction, polynomial (FMA) and underflow rule. 2^n is built in
// the exponent field; x >= -87 keeps n >= -126 (a normal number), and below that the result is 0.
// A NaN argument stays NaN (the unordered compare keeps it).
TF_AVX2 TF_INLINE __m256 exp8(__m256 x) {
  const __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(kLog2e));
  const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(t, n);
  __m256 p = _mm256_set1_ps(kExpC5);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExpC4));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExpC3));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExpC2));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExpC1));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExpC0));
  const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 in_range = _mm256_cmp_ps(x, _mm256_set1_ps(kExpUnderflow), _CMP_NLT_UQ);
  return _mm256_and_ps(in_range, _mm256_mul_ps(p, _mm256_castsi256_ps(two_n)));
}

TF_AVX2 TF_INLINE float reduce_max(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}
TF_AVX2 TF_INLINE float reduce_add(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// One 8-column step of the forward's exp pass at column j: exp(s - m) on the visible columns
// [lo, hi), 0 on the rest of the vector (whole vectors: the row has room up to cols rounded up to
// 8, see softmax_fwd); returns the values written.
TF_AVX2 TF_INLINE __m256 exp_step_masked(float* s, int64_t j, int64_t lo, int64_t hi, __m256 m) {
  const __m256 p = keep(lanes(j, lo, hi), exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), m)));
  _mm256_storeu_ps(s + j, p);
  return p;
}

TF_AVX2 void softmax_tile_forward(float* S, int64_t ld, int64_t rows, int64_t cols, const int32_t* kv_start,
                                  const int32_t* kv_end, int64_t col0, float* row_max, float* row_sum, float* acc,
                                  int64_t head_dim) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const __m256 neg_inf = _mm256_set1_ps(kNegInf);
  for (int64_t i = 0; i < rows; ++i) {
    float* s = S + i * ld;
    int64_t lo, hi;
    visible_cols(kv_start, kv_end, i, col0, cols, lo, hi);
    const int64_t first = lo & ~int64_t(7);  // the vector holding column lo
    const int64_t interior_lo = (lo + 7) & ~int64_t(7), interior_hi = hi & ~int64_t(7);
    __m256 vmax = neg_inf, vmax2 = neg_inf;
    {
      int64_t j = first;
      if (interior_lo < interior_hi) {
        for (; j < interior_lo; j += 8) {
          vmax = _mm256_max_ps(vmax, _mm256_blendv_ps(neg_inf, _mm256_loadu_ps(s + j),
                                                       _mm256_castsi256_ps(lanes(j, lo, hi))));
        }
        for (; j + 16 <= interior_hi; j += 16) {
          vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(s + j));
          vmax2 = _mm256_max_ps(vmax2, _mm256_loadu_ps(s + j + 8));
        }
      }
      for (; j < hi; j += 8) {
        vmax = _mm256_max_ps(vmax, _mm256_blendv_ps(neg_inf, _mm256_loadu_ps(s + j),
                                                     _mm256_castsi256_ps(lanes(j, lo, hi))));
      }
    }
    const float m_old = row_max[i];
    const float m_new = max_of(m_old, reduce_max(_mm256_max_ps(vmax, vmax2)));
    if (m_new == kNegInf) {  // nothing visible in this row yet
      nan_reaches_row(s, lo, hi, row_sum + i);
      for (int64_t j = 0; j < cols; j += 8) _mm256_storeu_ps(s + j, _mm256_setzero_ps());
      continue;
    }
    const __m256 vm = _mm256_set1_ps(m_new);
    __m256 vsum = _mm256_setzero_ps(), vsum2 = _mm256_setzero_ps();
    // Zeros left of the visible columns, the edge vectors masked, the interior two vectors at a
    // time without masks (two independent exp chains per step).
    for (int64_t j = 0; j < first; j += 8) _mm256_storeu_ps(s + j, _mm256_setzero_ps());
    int64_t j = first;
    if (interior_lo < interior_hi) {
      for (; j < interior_lo; j += 8) vsum = _mm256_add_ps(vsum, exp_step_masked(s, j, lo, hi, vm));
      for (; j + 16 <= interior_hi; j += 16) {
        const __m256 p0 = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), vm));
        const __m256 p1 = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j + 8), vm));
        _mm256_storeu_ps(s + j, p0);
        _mm256_storeu_ps(s + j + 8, p1);
        vsum = _mm256_add_ps(vsum, p0);
        vsum2 = _mm256_add_ps(vsum2, p1);
      }
    }
    for (; j < cols; j += 8) vsum = _mm256_add_ps(vsum, exp_step_masked(s, j, lo, hi, vm));
    vsum = _mm256_add_ps(vsum, vsum2);
    if (m_old != m_new) {
      const float correction = exp_approx(m_old - m_new);
      row_sum[i] *= correction;
      const __m256 c = _mm256_set1_ps(correction);
      float* a = acc + i * head_dim;
      int64_t d = 0;
      for (; d + 8 <= head_dim; d += 8) _mm256_storeu_ps(a + d, _mm256_mul_ps(_mm256_loadu_ps(a + d), c));
      if (d < head_dim) {
        const __m256i m = prefix(head_dim - d);
        _mm256_maskstore_ps(a + d, m, _mm256_mul_ps(_mm256_maskload_ps(a + d, m), c));
      }
    }
    row_sum[i] += reduce_add(vsum);
    row_max[i] = m_new;
  }
}

// dst[j * ld + i] = src[i * ld_src + j] for an 8 x 8 block, in registers.
TF_AVX2 void transpose8x8(const float* src, int64_t ld_src, float* dst, int64_t ld_dst) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * ld_src);
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  // r[0..3]: columns 0-3 | 4-7 of rows 0-3; r[4..7]: the same of rows 4-7.
  for (int h = 0; h < 2; ++h) {
    r[4 * h] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * h + 1] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[4 * h + 2] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * h + 3] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int c = 0; c < 4; ++c) {
    _mm256_storeu_ps(dst + c * ld_dst, _mm256_permute2f128_ps(r[c], r[c + 4], 0x20));
    _mm256_storeu_ps(dst + (c + 4) * ld_dst, _mm256_permute2f128_ps(r[c], r[c + 4], 0x31));
  }
}

// Column-major C (m x n) = alpha * A op(B) + beta * C on AVX2, for the tile products of the
// attention (m: keys for the scores, head_dim for the accumulations). As on AVX-512, A's columns
// are read in place and B is broadcast element by element, so nothing is packed; the register tile
// is 2 x 6 vectors of 8 lanes (16 rows of m x 6 columns of n): 12 accumulators, 2 columns of A and
// one broadcast fill 15 of the 16 ymm registers.
constexpr int kTileVectors = 2;       // 8-lane vectors of m per register tile
constexpr int kTileCols = 6;          // columns of n per register tile
constexpr int64_t kDepthBlock = 256;  // k per pass of a plain product: A's 16 x 256 panel stays in L1

// acc (N columns x V vectors) = A (8V rows, k columns) op(B) (k x N). kMasked: the last vector
// holds fewer than 8 rows (`last`), whose other lanes are not read.
template <int V, int N, bool kMasked, bool kTransB>
TF_AVX2 TF_INLINE void tile_product(int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
                                    __m256i last, __m256 (&acc)[N][V]) {
  #pragma GCC unroll 16
  for (int j = 0; j < N; ++j) {
    #pragma GCC unroll 16
    for (int v = 0; v < V; ++v) acc[j][v] = _mm256_setzero_ps();
  }
#pragma GCC unroll 4
  for (int64_t p = 0; p < k; ++p) {
    __m256 col[V];
    #pragma GCC unroll 16
    for (int v = 0; v < V; ++v) {
      col[v] = kMasked && v == V - 1 ? _mm256_maskload_ps(a + p * lda + 8 * v, last)
                                     : _mm256_loadu_ps(a + p * lda + 8 * v);
    }
    #pragma GCC unroll 16
    for (int j = 0; j < N; ++j) {
      const __m256 bj = _mm256_broadcast_ss(kTransB ? b + p * ldb + j : b + j * ldb + p);
      #pragma GCC unroll 16
      for (int v = 0; v < V; ++v) acc[j][v] = _mm256_fmadd_ps(col[v], bj, acc[j][v]);
    }
  }
}

// A whole vector, or the lanes of `mask` where `edge` (constant once the tile loops are unrolled).
TF_AVX2 TF_INLINE __m256 load_vector(const float* p, bool edge, __m256i mask) {
  return edge ? _mm256_maskload_ps(p, mask) : _mm256_loadu_ps(p);
}
TF_AVX2 TF_INLINE void store_vector(float* p, bool edge, __m256i mask, __m256 x) {
  if (edge) _mm256_maskstore_ps(p, mask, x);
  else _mm256_storeu_ps(p, x);
}

// Walks the register tiles of an m x n result: tile.template run<V, N, kMasked>(i0, j0, last) for
// the tile of rows [i0, i0 + 8V) (lanes of the last vector: `last`) and columns [j0, j0 + N).
template <int V, bool kMasked, typename Tile>
TF_AVX2 TF_INLINE void tile_columns(int64_t n, int64_t i0, __m256i last, const Tile& tile) {
  int64_t j = 0;
  for (; j + kTileCols <= n; j += kTileCols) tile.template run<V, kTileCols, kMasked>(i0, j, last);
  switch (n - j) {
    case 5: return tile.template run<V, 5, kMasked>(i0, j, last);
    case 4: return tile.template run<V, 4, kMasked>(i0, j, last);
    case 3: return tile.template run<V, 3, kMasked>(i0, j, last);
    case 2: return tile.template run<V, 2, kMasked>(i0, j, last);
    case 1: return tile.template run<V, 1, kMasked>(i0, j, last);
    default: return;
  }
}
template <typename Tile>
TF_AVX2 TF_INLINE void for_each_register_tile(int64_t m, int64_t n, const Tile& tile) {
  for (int64_t i0 = 0; i0 < m; i0 += 8 * kTileVectors) {
    const int64_t rows = std::min<int64_t>(8 * kTileVectors, m - i0);
    const __m256i last = prefix(rows - 8 * ((rows - 1) / 8));
    const bool masked = rows % 8 != 0;
    if (rows > 8) {
      if (masked) tile_columns<2, true>(n, i0, last, tile);
      else tile_columns<2, false>(n, i0, last, tile);
    } else {
      if (masked) tile_columns<1, true>(n, i0, last, tile);
      else tile_columns<1, false>(n, i0, last, tile);
    }
  }
}

// C = alpha * A op(B) + beta * C (C is not read when beta == 0, as in BLAS).
template <bool kTransB>
struct PlainProduct {
  int64_t k;
  float alpha, beta;
  const float *a, *b;
  int64_t lda, ldb;
  float* c;
  int64_t ldc;
  template <int V, int N, bool kMasked>
  TF_AVX2 TF_INLINE void run(int64_t i0, int64_t j0, __m256i last) const {
    __m256 acc[N][V];
    tile_product<V, N, kMasked, kTransB>(k, a + i0, lda, kTransB ? b + j0 : b + j0 * ldb, ldb, last, acc);
    const __m256 va = _mm256_set1_ps(alpha), vb = _mm256_set1_ps(beta);
    #pragma GCC unroll 16
    for (int j = 0; j < N; ++j) {
      #pragma GCC unroll 16
      for (int v = 0; v < V; ++v) {
        float* cj = c + (j0 + j) * ldc + i0 + 8 * v;
        const bool edge = kMasked && v == V - 1;
        __m256 r = _mm256_mul_ps(acc[j][v], va);
        if (beta != 0.0f) r = _mm256_fmadd_ps(load_vector(cj, edge, last), vb, r);
        store_vector(cj, edge, last, r);
      }
    }
  }
};

template <bool kTransB>
TF_AVX2 void sgemm_kernel(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                          const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (k == 0) {  // C = beta * C, as BLAS
    for (int64_t j = 0; j < n; ++j) {
      for (int64_t i = 0; i < m; ++i) c[j * ldc + i] = beta == 0.0f ? 0.0f : beta * c[j * ldc + i];
    }
    return;
  }
  for (int64_t p0 = 0; p0 < k; p0 += kDepthBlock) {
    const PlainProduct<kTransB> part{std::min(kDepthBlock, k - p0), alpha, p0 == 0 ? beta : 1.0f,
                                     a + p0 * lda, kTransB ? b + p0 * ldb : b + p0, lda, ldb, c, ldc};
    for_each_register_tile(m, n, part);
  }
}

void sgemm(bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda, const float* b,
           int64_t ldb, float beta, float* c, int64_t ldc) {
  if (trans_b) sgemm_kernel<true>(m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  else sgemm_kernel<false>(m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// The backward's two score products of one block, fused with the elementwise pass (see
// ScoresBlock): each register tile of P is computed, stored, and read back for dS while it is still
// in L1.
struct ProbsAndDScores : ScoresBlock {
  template <int V, int N, bool kMasked>
  TF_AVX2 TF_INLINE void run(int64_t i0, int64_t j0, __m256i last) const {
    __m256 acc[N][V];
    tile_product<V, N, kMasked, false>(d, k_t + i0, ld_t, q + j0 * ldq, ldq, last, acc);
    #pragma GCC unroll 16
    for (int j = 0; j < N; ++j) {
      int64_t lo, hi;
      visible_cols(kv_start, kv_end, j0 + j, col0 + i0, 8 * V, lo, hi);
      const __m256 l = _mm256_set1_ps(lse[j0 + j]), s = _mm256_set1_ps(scale);
      #pragma GCC unroll 16
      for (int v = 0; v < V; ++v) {
        const bool edge = kMasked && v == V - 1;
        const __m256 p = keep(lanes(8 * v, lo, hi), exp8(_mm256_fmsub_ps(acc[j][v], s, l)));
        store_vector(P + (j0 + j) * ld + i0 + 8 * v, edge, last, p);
      }
    }
    tile_product<V, N, kMasked, false>(d, v_t + i0, ld_t, grad_out + j0 * ldo, ldo, last, acc);
    #pragma GCC unroll 16
    for (int j = 0; j < N; ++j) {
      const __m256 dl = _mm256_set1_ps(delta[j0 + j]);
      #pragma GCC unroll 16
      for (int v = 0; v < V; ++v) {
        const bool edge = kMasked && v == V - 1;
        const int64_t at = (j0 + j) * ld + i0 + 8 * v;
        const __m256 ds = _mm256_mul_ps(load_vector(P + at, edge, last), _mm256_sub_ps(acc[j][v], dl));
        store_vector(dS + at, edge, last, ds);
      }
    }
  }
};

TF_AVX2 void probs_dscores_fused(const ScoresBlock& block, int64_t keys, int64_t rows) {
  for_each_register_tile(keys, rows, ProbsAndDScores{block});
}

// dst[i] = src[i] * scale with streaming stores (dst 32-byte aligned, n a multiple of 8).
TF_AVX2 void stream_scaled_row(float* dst, const float* src, int64_t n, float scale) {
  if (src == nullptr) {
    for (int64_t i = 0; i < n; i += 8) _mm256_stream_ps(dst + i, _mm256_setzero_ps());
    return;
  }
  const __m256 s = _mm256_set1_ps(scale);
  for (int64_t i = 0; i < n; i += 8) _mm256_stream_ps(dst + i, _mm256_mul_ps(_mm256_loadu_ps(src + i), s));
}

}  // namespace transfusion_fast::attention_cpu::avx2
#endif  // TF_X86_KERNELS
