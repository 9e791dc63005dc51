// The AVX-512 (fp32) tile kernels of the CPU attention: the register-tiled product, the forward's
// softmax pass, the backward's fused P / dS epilogue, the 16 x 16 transpose and the streaming output
// stores. Compiled with target attributes in a baseline build; attention_cpu_isa.cpp calls them only
// where the CPU has AVX-512F. attention_cpu_avx2.cpp has the same structure for 8-lane vectors.
#include "attention_cpu.h"

#include <algorithm>

#if TF_X86_KERNELS
#include <immintrin.h>

namespace transfusion_fast::attention_cpu::avx512 {

// Hand-written versions of the tile passes. The compiler's vectorization of the portable loops
// (attention_cpu_isa.cpp) peels, runs scalar tails and reduces through the stack on every row,
// which dominates on the narrow masked sub-blocks of short documents. Here every row is a sequence
// of 16-lane steps with lane masks: the visible columns come from the row's interval, the rest of
// the row is written as 0.
#define TF_AVX512 __attribute__((target("avx512f")))
// GCC 12's AVX-512 headers build reductions and unpacks from _mm512_undefined_*(), which
// -W(maybe-)uninitialized reports at every use once inlined here.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

// exp_approx on 16 lanes: same range reduction, polynomial (FMA) and underflow rule; scalef takes
// any n, so no clamp, and a NaN argument stays NaN.
TF_AVX512 TF_INLINE __m512 exp_approx16(__m512 x) {
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.327647152e-03f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.675541331e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550713275e-02f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402211972e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931469671e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.000000072e+00f));
  const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_NLT_UQ);
  return _mm512_maskz_scalef_ps(keep, p, n);
}

// Lanes [a, b) of the 16-lane step starting at column j.
TF_INLINE __mmask16 lanes(int64_t j, int64_t a, int64_t b) {
  const int64_t lo = clamp_to(a - j, 0, 16), hi = clamp_to(b - j, 0, 16);
  return static_cast<__mmask16>(((1u << hi) - 1u) & ~((1u << lo) - 1u));
}

// One 16-column step of the forward's exp pass at column j: exp(s - m) on the visible columns
// [lo, hi), 0 on the rest of the row's columns [0, cols); returns the values written.
TF_AVX512 TF_INLINE __m512 exp_step_masked(float* s, int64_t j, int64_t lo, int64_t hi, int64_t cols, __m512 m) {
  const __mmask16 visible = lanes(j, lo, hi);
  const __m512 p = _mm512_maskz_mov_ps(visible, exp_approx16(_mm512_sub_ps(_mm512_maskz_loadu_ps(visible, s + j), m)));
  _mm512_mask_storeu_ps(s + j, lanes(j, 0, cols), p);
  return p;
}

TF_AVX512 void softmax_tile_forward(float* S, int64_t ld, int64_t rows, int64_t cols,
                                           const int32_t* kv_start, const int32_t* kv_end, int64_t col0,
                                           float* row_max, float* row_sum, float* acc, int64_t head_dim) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < rows; ++i) {
    float* s = S + i * ld;
    int64_t lo, hi;
    visible_cols(kv_start, kv_end, i, col0, cols, lo, hi);
    const int64_t first = lo - (lo & 15);  // the vector holding column lo
    __m512 vmax = _mm512_set1_ps(kNegInf);
    for (int64_t j = first; j < hi; j += 16) {
      const __mmask16 m = lanes(j, lo, hi);
      vmax = _mm512_mask_max_ps(vmax, m, vmax, _mm512_maskz_loadu_ps(m, s + j));
    }
    const float m_old = row_max[i];
    const float m_new = max_of(m_old, _mm512_reduce_max_ps(vmax));
    if (m_new == kNegInf) {  // nothing visible in this row yet
      nan_reaches_row(s, lo, hi, row_sum + i);
      for (int64_t j = 0; j < cols; j += 16) _mm512_mask_storeu_ps(s + j, lanes(j, 0, cols), _mm512_setzero_ps());
      continue;
    }
    const __m512 vm = _mm512_set1_ps(m_new);
    __m512 vsum = _mm512_setzero_ps(), vsum2 = _mm512_setzero_ps();
    // Zeros left of the visible columns, the edge vectors masked, the interior two vectors at a
    // time without masks (two independent exp chains per step).
    const int64_t interior_lo = (lo + 15) & ~int64_t(15), interior_hi = hi & ~int64_t(15);
    for (int64_t j = 0; j < first; j += 16) _mm512_storeu_ps(s + j, _mm512_setzero_ps());
    int64_t j = first;
    if (interior_lo < interior_hi) {
      for (; j < interior_lo; j += 16) vsum = _mm512_add_ps(vsum, exp_step_masked(s, j, lo, hi, cols, vm));
      for (; j + 32 <= interior_hi; j += 32) {
        const __m512 p0 = exp_approx16(_mm512_sub_ps(_mm512_loadu_ps(s + j), vm));
        const __m512 p1 = exp_approx16(_mm512_sub_ps(_mm512_loadu_ps(s + j + 16), vm));
        _mm512_storeu_ps(s + j, p0);
        _mm512_storeu_ps(s + j + 16, p1);
        vsum = _mm512_add_ps(vsum, p0);
        vsum2 = _mm512_add_ps(vsum2, p1);
      }
    }
    for (; j < cols; j += 16) vsum = _mm512_add_ps(vsum, exp_step_masked(s, j, lo, hi, cols, vm));
    vsum = _mm512_add_ps(vsum, vsum2);
    if (m_old != m_new) {
      const float correction = exp_approx(m_old - m_new);
      row_sum[i] *= correction;
      const __m512 c = _mm512_set1_ps(correction);
      float* a = acc + i * head_dim;
      for (int64_t d = 0; d < head_dim; d += 16) {
        const __mmask16 m = lanes(d, 0, head_dim);
        _mm512_mask_storeu_ps(a + d, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, a + d), c));
      }
    }
    row_sum[i] += _mm512_reduce_add_ps(vsum);
    row_max[i] = m_new;
  }
}

// dst[j * ld_dst + i] = src[i * ld_src + j] for a 16 x 16 block, in registers.
TF_AVX512 void transpose16x16(const float* src, int64_t ld_src, float* dst, int64_t ld_dst) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * ld_src);
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 2; ++i) {
    for (int j = 0; j < 4; ++j) {
      t[8 * i + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + j + 4], 0x88);
      t[8 * i + j + 4] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + j + 4], 0xdd);
    }
  }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88);
    r[j + 8] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0xdd);
  }
  for (int i = 0; i < 16; ++i) _mm512_storeu_ps(dst + i * ld_dst, r[i]);
}

// Column-major C (m x n) = alpha * A op(B) + beta * C on AVX-512, for the tile products of this
// file: m is the vector dimension (keys for the scores, head_dim for the accumulations), k is
// head_dim or a few hundred keys / rows. MKL packs both operands on every call, which costs as
// much as the product at these sizes; here A's columns are read in place (contiguous, any column
// stride), B is broadcast element by element, and a 4 x 6 tile of 16-lane accumulators (64 rows of
// m x 6 columns of n) stays in registers across a block of k. What a finished tile does is up to the
// caller's tile type (PlainProduct stores alpha * acc + beta * C; ProbsAndDScores turns the
// backward's scores into P and dP into dS while they are in registers).
constexpr int kTileVectors = 4;       // 16-lane vectors of m per register tile
constexpr int kTileCols = 6;          // columns of n per register tile: 24 accumulators + 4 A + 1 B
constexpr int64_t kDepthBlock = 256;  // k per pass of a plain product: A's 64 x 256 panel stays in L2

// acc (N columns x V vectors) = A (16V rows, k columns) op(B) (k x N); lanes of the last vector
// outside `last` are not read.
template <int V, int N, bool kTransB>
TF_AVX512 TF_INLINE void tile_product(int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
                                      __mmask16 last, __m512 (&acc)[N][V]) {
  #pragma GCC unroll 16
  for (int j = 0; j < N; ++j) {
    #pragma GCC unroll 16
    for (int v = 0; v < V; ++v) acc[j][v] = _mm512_setzero_ps();
  }
#pragma GCC unroll 4
  for (int64_t p = 0; p < k; ++p) {
    __m512 col[V];
    #pragma GCC unroll 16
    for (int v = 0; v < V; ++v) {
      col[v] = v == V - 1 ? _mm512_maskz_loadu_ps(last, a + p * lda + 16 * v) : _mm512_loadu_ps(a + p * lda + 16 * v);
    }
    #pragma GCC unroll 16
    for (int j = 0; j < N; ++j) {
      const __m512 bj = _mm512_set1_ps(kTransB ? b[p * ldb + j] : b[j * ldb + p]);
      #pragma GCC unroll 16
      for (int v = 0; v < V; ++v) acc[j][v] = _mm512_fmadd_ps(col[v], bj, acc[j][v]);
    }
  }
}

// Walks the register tiles of an m x n result: tile.template run<V, N>(i0, j0, last) for the tile
// of rows [i0, i0 + 16V) (lanes of the last vector: `last`) and columns [j0, j0 + N).
template <int V, typename Tile>
TF_AVX512 TF_INLINE void tile_columns(int64_t n, int64_t i0, __mmask16 last, const Tile& tile) {
  int64_t j = 0;
  for (; j + kTileCols <= n; j += kTileCols) tile.template run<V, kTileCols>(i0, j, last);
  switch (n - j) {
    case 5: return tile.template run<V, 5>(i0, j, last);
    case 4: return tile.template run<V, 4>(i0, j, last);
    case 3: return tile.template run<V, 3>(i0, j, last);
    case 2: return tile.template run<V, 2>(i0, j, last);
    case 1: return tile.template run<V, 1>(i0, j, last);
    default: return;
  }
}
template <typename Tile>
TF_AVX512 TF_INLINE void for_each_register_tile(int64_t m, int64_t n, const Tile& tile) {
  for (int64_t i0 = 0; i0 < m; i0 += 16 * kTileVectors) {
    const int64_t rows = std::min<int64_t>(16 * kTileVectors, m - i0);
    const int vectors = static_cast<int>((rows + 15) / 16);
    const __mmask16 last = lanes(16 * (vectors - 1), 0, rows);
    switch (vectors) {
      case 4: tile_columns<4>(n, i0, last, tile); break;
      case 3: tile_columns<3>(n, i0, last, tile); break;
      case 2: tile_columns<2>(n, i0, last, tile); break;
      default: tile_columns<1>(n, i0, last, tile); break;
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
  template <int V, int N>
  TF_AVX512 TF_INLINE void run(int64_t i0, int64_t j0, __mmask16 last) const {
    __m512 acc[N][V];
    tile_product<V, N, kTransB>(k, a + i0, lda, kTransB ? b + j0 : b + j0 * ldb, ldb, last, acc);
    const __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
    #pragma GCC unroll 16
    for (int j = 0; j < N; ++j) {
      #pragma GCC unroll 16
      for (int v = 0; v < V; ++v) {
        float* cj = c + (j0 + j) * ldc + i0 + 16 * v;
        const __mmask16 m = v == V - 1 ? last : __mmask16(0xffff);
        __m512 r = _mm512_mul_ps(acc[j][v], va);
        if (beta != 0.0f) r = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, cj), vb, r);
        _mm512_mask_storeu_ps(cj, m, r);
      }
    }
  }
};

template <bool kTransB>
TF_AVX512 void sgemm_kernel(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
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

// The backward's two score products of one block, fused with the elementwise pass: for the keys
// [col0, col0 + m) (as m) and query rows (as n), P = exp(scale * K Q^T - lse) on each row's visible
// keys (0 elsewhere) and dS = P * (V dO^T - delta), both column-major with leading dimension ld.
// Each register tile of P is computed, stored, and read back for dS while it is still in L1.
struct ProbsAndDScores : ScoresBlock {
  template <int V, int N>
  TF_AVX512 TF_INLINE void run(int64_t i0, int64_t j0, __mmask16 last) const {
    __m512 acc[N][V];
    tile_product<V, N, false>(d, k_t + i0, ld_t, q + j0 * ldq, ldq, last, acc);
    #pragma GCC unroll 16
    for (int j = 0; j < N; ++j) {
      int64_t lo, hi;
      visible_cols(kv_start, kv_end, j0 + j, col0 + i0, 16 * V, lo, hi);
      const __m512 l = _mm512_set1_ps(lse[j0 + j]), s = _mm512_set1_ps(scale);
      #pragma GCC unroll 16
      for (int v = 0; v < V; ++v) {
        const __mmask16 store = v == V - 1 ? last : __mmask16(0xffff);
        const __mmask16 visible = store & lanes(16 * v, lo, hi);
        const __m512 p = _mm512_maskz_mov_ps(visible, exp_approx16(_mm512_fmsub_ps(acc[j][v], s, l)));
        _mm512_mask_storeu_ps(P + (j0 + j) * ld + i0 + 16 * v, store, p);
      }
    }
    tile_product<V, N, false>(d, v_t + i0, ld_t, grad_out + j0 * ldo, ldo, last, acc);
    #pragma GCC unroll 16
    for (int j = 0; j < N; ++j) {
      const __m512 dl = _mm512_set1_ps(delta[j0 + j]);
      #pragma GCC unroll 16
      for (int v = 0; v < V; ++v) {
        const __mmask16 store = v == V - 1 ? last : __mmask16(0xffff);
        const int64_t at = (j0 + j) * ld + i0 + 16 * v;
        const __m512 ds = _mm512_mul_ps(_mm512_maskz_loadu_ps(store, P + at), _mm512_sub_ps(acc[j][v], dl));
        _mm512_mask_storeu_ps(dS + at, store, ds);
      }
    }
  }
};

TF_AVX512 void probs_dscores_fused(const ScoresBlock& block, int64_t keys, int64_t rows) {
  for_each_register_tile(keys, rows, ProbsAndDScores{block});
}

// dst[i] = src[i] * scale with streaming stores (dst 64-byte aligned, n a multiple of 16).
TF_AVX512 void stream_scaled_row(float* dst, const float* src, int64_t n, float scale) {
  if (src == nullptr) {
    for (int64_t i = 0; i < n; i += 16) _mm512_stream_ps(dst + i, _mm512_setzero_ps());
    return;
  }
  const __m512 s = _mm512_set1_ps(scale);
  for (int64_t i = 0; i < n; i += 16) _mm512_stream_ps(dst + i, _mm512_mul_ps(_mm512_loadu_ps(src + i), s));
}

void sgemm(bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda, const float* b,
           int64_t ldb, float beta, float* c, int64_t ldc) {
  if (trans_b) sgemm_kernel<true>(m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  else sgemm_kernel<false>(m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

}  // namespace transfusion_fast::attention_cpu::avx512
#pragma GCC diagnostic pop
#endif  // TF_X86_KERNELS
