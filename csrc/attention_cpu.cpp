// Block-sparse exact attention on CPU, forward and backward, driven by the Layout's tile tables.
//
// The mask of a packed batch is an interval of keys per query row, [kv_start[i], kv_end[i]); the
// Layout turns it into per-tile walk tables (transfusion_fast/layout.py, TileTable): row tile m
// visits key tiles [kv_lo[m], kv_hi[m]) of which [kv_full_lo[m], kv_full_hi[m]) need no mask, and
// key tile n visits query tiles [q_lo[n], q_hi[n]) with full sub-range [q_full_lo[n], q_full_hi[n]).
// Skipped tiles are never read; full tiles never look at the mask; memory is O(T*H*D): each worker
// holds a few BLOCK_M x BLOCK_N tiles, never a T x T matrix.
//
// Forward (FlashAttention-2): one task per (query head, row tile), online softmax, saves the
// log-sum-exp. Backward: one task per (kv head, chunk of key tiles); it owns dK/dV of its key tiles
// (summed over the GQA group inside the task) and accumulates dQ of the group's query heads in a
// buffer of its own, written out into the slice of dq private to its chunk: no two tasks write the
// same memory, so results do not depend on the thread count or on scheduling (deterministic). P is
// recomputed from the LSE and dS = P * (dP - delta) with delta = rowsum(dO * O) (minus the gradient
// of the LSE, when the LSE itself is differentiated).
//
// Inside the table's range, the walk follows the documents (for_each_segment): the rows of a row
// tile that belong to one document only compute that document's keys (and, in the backward, the
// keys of a key tile only meet their own document's rows); the keys every row of such a segment
// sees run as wide mask-free GEMMs (contiguous keys / rows merged up to kForwardGemmCols /
// kBackwardGemmRows), and only the rest (causal diagonal, span edges) is masked, in narrow
// sub-blocks that stop at their own last row's interval end. On packed short documents this keeps
// the computed elements within ~5% of the visible ones (tiles alone: ~50% more).
//
// Inner products: in fp32 on AVX-512 machines, a register-tiled kernel of this file that reads the
// tiles in place (sgemm_avx512; the backward's two score products also turn into P and dS in its
// epilogue); otherwise ATen's CPU BLAS (MKL / OpenBLAS on tile views, no copies for any token/head
// stride). The forward's softmax pass has a hand-written AVX-512 version (fp32, picked at load
// time); the elementwise passes also have compiler-vectorized fallbacks (AVX2 / baseline).
// fp16 / bf16 inputs are converted to fp32 once (O(T*H*D)); fp64 runs in fp64.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/TransposeType.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <numeric>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace transfusion_fast {
namespace {

using at::native::TransposeType;
constexpr TransposeType kN = TransposeType::NoTranspose;
constexpr TransposeType kT = TransposeType::Transpose;

}  // namespace
}  // namespace transfusion_fast

// The Fortran BLAS that torch links (MKL on x86 builds) is not part of ATen's exported C++ API, but
// its sgemm_/dgemm_ symbols are exported by libtorch_cpu: one call per tile, no Tensor overhead.
// Declared weak so that a torch build without them still loads the extension; gemm() below then
// computes the same product with at::addmm_ on views of the tiles (slower for small tiles).
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc) __attribute__((weak));
}

namespace transfusion_fast {
namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// One binary for every x86 machine: the hot elementwise loops get an AVX-512 and an AVX2 clone,
// picked at load time (the extension itself is built for the baseline ISA).
#define TF_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define TF_MULTIVERSION
#endif
#define TF_INLINE inline __attribute__((always_inline))

// std::max / std::clamp are not inlined into the target clones (different target options), which
// would keep the loops scalar: the hot code uses these instead.
template <typename T>
TF_INLINE T max_of(T a, T b) { return a > b ? a : b; }
TF_INLINE int64_t clamp_to(int64_t x, int64_t lo, int64_t hi) { return x < lo ? lo : (x > hi ? hi : x); }

// exp(x) for x <= ~0 (softmax arguments): 2^n * 2^f with n = round(x*log2(e)), |f| <= 1/2 and a
// degree-5 polynomial of 2^f fitted for minimal relative error (< 2.4e-7 evaluated in fp32, about 2
// ulp; torch's own CPU flash attention takes an exp of up to 20 ulp). Degree 7 (< 1e-7) cost ~0.5
// ms more of ~20 per forward+backward on packed documents (T = 2,048, 8 heads, D 64, 2 threads).
// Written without branches so that the loops calling it vectorize; exp(-inf) and underflow give 0.
TF_INLINE float exp_approx(float x) {
  const float t = max_of(x * 1.44269504088896341f, -126.0f);
  // Adding 1.5 * 2^23 rounds to the nearest integer in the default rounding mode (|t| < 2^22).
  const float n = (t + 12582912.0f) - 12582912.0f;
  const float f = t - n;
  float p = 1.327647152e-03f;
  p = p * f + 9.675541331e-03f;
  p = p * f + 5.550713275e-02f;
  p = p * f + 2.402211972e-01f;
  p = p * f + 6.931469671e-01f;
  p = p * f + 1.000000072e+00f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  __builtin_memcpy(&two_n, &bits, sizeof(two_n));
  return x < -87.0f ? 0.0f : p * two_n;
}
TF_INLINE double exp_approx(double x) { return std::exp(x); }

// The visible columns [lo, hi) of tile row `row`, relative to the tile's first column `col0`.
// `kv_start == nullptr` marks a full tile.
TF_INLINE void visible_cols(const int32_t* kv_start, const int32_t* kv_end, int64_t row, int64_t col0,
                            int64_t cols, int64_t& lo, int64_t& hi) {
  if (kv_start == nullptr) {
    lo = 0;
    hi = cols;
    return;
  }
  lo = clamp_to(kv_start[row] - col0, 0, cols);
  hi = clamp_to(kv_end[row] - col0, lo, cols);
}

// Online softmax over one tile of scores: S (rows x cols, row stride ld) becomes P = exp(S - m_new)
// (0 outside each row's visible columns), the running max / sum are updated and the output
// accumulator rescaled by exp(m_old - m_new).
template <typename T>
TF_INLINE void softmax_tile_forward(T* S, int64_t ld, int64_t rows, int64_t cols,
                                    const int32_t* kv_start, const int32_t* kv_end, int64_t col0,
                                    T* row_max, T* row_sum, T* acc, int64_t head_dim) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  for (int64_t i = 0; i < rows; ++i) {
    T* s = S + i * ld;
    int64_t lo, hi;
    visible_cols(kv_start, kv_end, i, col0, cols, lo, hi);
    T mx = kNegInf;
#pragma omp simd reduction(max : mx)
    for (int64_t j = lo; j < hi; ++j) mx = max_of(mx, s[j]);
    for (int64_t j = 0; j < lo; ++j) s[j] = T(0);
    for (int64_t j = hi; j < cols; ++j) s[j] = T(0);
    const T m_old = row_max[i];
    const T m_new = max_of(m_old, mx);
    if (m_new == kNegInf) {  // nothing visible in this row yet
#pragma omp simd
      for (int64_t j = lo; j < hi; ++j) s[j] = T(0);
      continue;
    }
    T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = lo; j < hi; ++j) {
      const T p = exp_approx(s[j] - m_new);
      s[j] = p;
      sum += p;
    }
    if (m_old != m_new) {
      const T correction = exp_approx(m_old - m_new);
      row_sum[i] *= correction;
      T* a = acc + i * head_dim;
#pragma omp simd
      for (int64_t d = 0; d < head_dim; ++d) a[d] *= correction;
    }
    row_sum[i] += sum;
    row_max[i] = m_new;
  }
}

// Backward, one pass per tile: S (scores) becomes P = exp(S - lse), 0 outside the visible columns,
// and dP becomes dS = P * (dP - delta).
template <typename T>
TF_INLINE void probs_dscores_tile(T* S, T* dP, int64_t ld, int64_t rows, int64_t cols,
                                  const int32_t* kv_start, const int32_t* kv_end, int64_t col0,
                                  const T* lse, const T* delta) {
  for (int64_t i = 0; i < rows; ++i) {
    T* s = S + i * ld;
    T* dp = dP + i * ld;
    int64_t lo, hi;
    visible_cols(kv_start, kv_end, i, col0, cols, lo, hi);
    const T l = lse[i], dl = delta[i];
    for (int64_t j = 0; j < lo; ++j) s[j] = dp[j] = T(0);
#pragma omp simd
    for (int64_t j = lo; j < hi; ++j) {
      const T p = exp_approx(s[j] - l);
      s[j] = p;
      dp[j] = p * (dp[j] - dl);
    }
    for (int64_t j = hi; j < cols; ++j) s[j] = dp[j] = T(0);
  }
}

TF_MULTIVERSION void softmax_tile_forward_f32(float* S, int64_t ld, int64_t rows, int64_t cols,
                                              const int32_t* ks, const int32_t* ke, int64_t col0,
                                              float* mx, float* sum, float* acc, int64_t d) {
  softmax_tile_forward<float>(S, ld, rows, cols, ks, ke, col0, mx, sum, acc, d);
}
TF_MULTIVERSION void probs_dscores_tile_f32(float* S, float* dP, int64_t ld, int64_t rows, int64_t cols,
                                            const int32_t* ks, const int32_t* ke, int64_t col0,
                                            const float* lse, const float* delta) {
  probs_dscores_tile<float>(S, dP, ld, rows, cols, ks, ke, col0, lse, delta);
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define TF_AVX512_PATH 1
// Hand-written AVX-512 versions of the two tile passes. The compiler's vectorization of the loops
// above peels, runs scalar tails and reduces through the stack on every row, which dominates on
// the narrow masked sub-blocks of short documents (profiled: ~2.4 cycles per score element in the
// forward pass on packed documents). Here every row is a sequence of 16-lane steps with lane
// masks: the visible columns come from the row's interval, the rest of the row is written as 0.
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

TF_AVX512 void softmax_tile_forward_avx512(float* S, int64_t ld, int64_t rows, int64_t cols,
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
TF_AVX512 void transpose16x16_avx512(const float* src, int64_t ld_src, float* dst, int64_t ld_dst) {
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
// much as the product at these sizes (profiled on packed documents: ~10% of forward+backward in
// its copy routines); here A's columns are read in place (contiguous, any column stride), B is
// broadcast element by element, and a 4 x 6 tile of 16-lane accumulators (64 rows of m x 6
// columns of n) stays in registers across a block of k. What a finished tile does is up to the
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
TF_AVX512 void sgemm_avx512(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
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
struct ProbsAndDScores {
  int64_t d;
  float scale;
  const float *k_t, *v_t;   // (D, keys), row stride ld_t
  int64_t ld_t;
  const float *q, *grad_out;   // (rows, D), row strides
  int64_t ldq, ldo;
  const int32_t *kv_start, *kv_end;  // of the block's rows; kv_start == nullptr: no mask
  int64_t col0;
  const float *lse, *delta;
  float *P, *dS;
  int64_t ld;
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

TF_AVX512 void probs_dscores_fused_avx512(const ProbsAndDScores& block, int64_t keys, int64_t rows) {
  for_each_register_tile(keys, rows, block);
}

// dst[i] = src[i] * scale with streaming stores (dst 64-byte aligned, n a multiple of 16).
TF_AVX512 void stream_scaled_row_avx512(float* dst, const float* src, int64_t n, float scale) {
  if (src == nullptr) {
    for (int64_t i = 0; i < n; i += 16) _mm512_stream_ps(dst + i, _mm512_setzero_ps());
    return;
  }
  const __m512 s = _mm512_set1_ps(scale);
  for (int64_t i = 0; i < n; i += 16) _mm512_stream_ps(dst + i, _mm512_mul_ps(_mm512_loadu_ps(src + i), s));
}

const bool kCpuHasAvx512 = __builtin_cpu_supports("avx512f");
#pragma GCC diagnostic pop
#else
#define TF_AVX512_PATH 0
constexpr bool kCpuHasAvx512 = false;
#endif

// Whether the AVX-512 kernels run: where the CPU has AVX-512, unless the test hook
// attention_cpu_set_avx512 switched them off to run the portable path (BLAS products, compiler-
// vectorized passes) on an AVX-512 machine.
std::atomic<bool> g_use_avx512{kCpuHasAvx512};
TF_INLINE bool use_avx512() { return g_use_avx512.load(std::memory_order_relaxed); }

// Column-major C (m x n) = alpha * op(A) op(B) + beta * C, as in BLAS: fp32 on AVX-512 through
// sgemm_avx512 (every product of this file has transa == N), the rest through BLAS.
template <typename T>
void gemm(TransposeType transa, TransposeType transb, int64_t m, int64_t n, int64_t k, T alpha,
          const T* a, int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  using Blas = void (*)(const char*, const char*, const int*, const int*, const int*, const T*,
                        const T*, const int*, const T*, const int*, const T*, T*, const int*);
#if TF_AVX512_PATH
  if constexpr (std::is_same_v<T, float>) {
    if (use_avx512() && transa == kN) {
      if (transb == kN) sgemm_avx512<false>(m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
      else sgemm_avx512<true>(m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
      return;
    }
  }
#endif
  Blas blas = nullptr;
  if constexpr (std::is_same_v<T, float>) blas = &sgemm_;
  else blas = &dgemm_;
  if (blas != nullptr) {
    const char ta = transa == kN ? 'n' : 't', tb = transb == kN ? 'n' : 't';
    const int mi = m, ni = n, ki = k, la = lda, lb = ldb, lc = ldc;
    blas(&ta, &tb, &mi, &ni, &ki, &alpha, a, &la, b, &lb, &beta, c, &lc);
    return;
  }
  // Same product through ATen on row-major views: C^T (n x m) = op(B)^T op(A)^T.
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const auto view = [&](const T* p, int64_t rows, int64_t cols, int64_t ld) {
    return at::from_blob(const_cast<T*>(p), {cols, rows}, {ld, 1}, options);  // (col-major X)^T
  };
  const at::Tensor a_t = transa == kN ? view(a, m, k, lda) : view(a, k, m, lda).t();  // op(A)^T
  const at::Tensor b_t = transb == kN ? view(b, k, n, ldb) : view(b, n, k, ldb).t();  // op(B)^T
  at::Tensor c_t = view(c, m, n, ldc);
  c_t.addmm_(b_t, a_t, beta, alpha);
}

// dst[i] = src[i] * scale (0 where src == nullptr) for one row of an output tensor (o, dq, dk,
// dv). A task writes its head's D-element piece of each (T, H, D) row, which nothing reads again
// during the call: with ordinary stores every line is first read from memory (read-for-ownership),
// one demand miss per line, as the strided pieces defeat the prefetchers. With AVX-512, fp32 and
// aligned whole vectors, the row goes out with streaming stores instead (measured on packed
// documents, T = 2,048, 8 heads, D 64, 2 threads, o / dK / dV: forward 7.06 -> 6.55 ms, backward
// 15.03 -> 13.84 ms). Tasks end with finish_output_rows() so that the stores are visible before
// the kernel returns.
template <typename T>
void write_output_row(T* dst, const T* src, int64_t n, T scale) {
#if TF_AVX512_PATH
  if constexpr (std::is_same_v<T, float>) {
    if (use_avx512() && n % 16 == 0 && reinterpret_cast<uintptr_t>(dst) % 64 == 0) {
      return stream_scaled_row_avx512(dst, src, n, scale);
    }
  }
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = src == nullptr ? T(0) : src[i] * scale;
}
inline void finish_output_rows() {
#if TF_AVX512_PATH
  if (use_avx512()) _mm_sfence();  // SSE: no AVX-512 target needed
#endif
}

// Typed entry points: the fp32 softmax goes to the AVX-512 pass where use_avx512(), else to the
// multiversioned clone; the fp32 probs / dS pass only runs on the portable path (with AVX-512,
// probs_and_dscores does it in the product's tile epilogue); fp64 goes to the plain templates.
void softmax_fwd(float* S, int64_t ld, int64_t r, int64_t c, const int32_t* ks, const int32_t* ke,
                 int64_t c0, float* mx, float* sum, float* acc, int64_t d) {
#if TF_AVX512_PATH
  if (use_avx512()) return softmax_tile_forward_avx512(S, ld, r, c, ks, ke, c0, mx, sum, acc, d);
#endif
  softmax_tile_forward_f32(S, ld, r, c, ks, ke, c0, mx, sum, acc, d);
}
void softmax_fwd(double* S, int64_t ld, int64_t r, int64_t c, const int32_t* ks, const int32_t* ke,
                 int64_t c0, double* mx, double* sum, double* acc, int64_t d) {
  softmax_tile_forward<double>(S, ld, r, c, ks, ke, c0, mx, sum, acc, d);
}
void probs_dscores(float* S, float* dP, int64_t ld, int64_t r, int64_t c, const int32_t* ks,
                   const int32_t* ke, int64_t c0, const float* lse, const float* delta) {
  probs_dscores_tile_f32(S, dP, ld, r, c, ks, ke, c0, lse, delta);
}
void probs_dscores(double* S, double* dP, int64_t ld, int64_t r, int64_t c, const int32_t* ks,
                   const int32_t* ke, int64_t c0, const double* lse, const double* delta) {
  probs_dscores_tile<double>(S, dP, ld, r, c, ks, ke, c0, lse, delta);
}

// P (keys x rows, column-major, leading dimension ld) = exp(scale * K Q^T - lse) on each row's
// visible keys [kv_start, kv_end) (all keys when kv_start == nullptr), 0 elsewhere, and
// dS = P * (V dO^T - delta): the backward's scores of one block. k_t / v_t: (D, keys), row stride ld_t.
template <typename T>
void probs_and_dscores(int64_t keys, int64_t rows, int64_t d, T scale, const T* k_t, const T* v_t, int64_t ld_t,
                       const T* q, int64_t ldq, const T* grad_out, int64_t ldo, const int32_t* kv_start,
                       const int32_t* kv_end, int64_t col0, const T* lse, const T* delta, T* P, T* dS, int64_t ld) {
#if TF_AVX512_PATH
  if constexpr (std::is_same_v<T, float>) {
    if (use_avx512()) {
      return probs_dscores_fused_avx512({d, scale, k_t, v_t, ld_t, q, grad_out, ldq, ldo, kv_start, kv_end, col0,
                                         lse, delta, P, dS, ld}, keys, rows);
    }
  }
#endif
  gemm(kN, kN, keys, rows, d, scale, k_t, ld_t, q, ldq, T(0), P, ld);        // S
  gemm(kN, kN, keys, rows, d, T(1), v_t, ld_t, grad_out, ldo, T(0), dS, ld);  // dP = dO V^T
  probs_dscores(P, dS, ld, rows, keys, kv_start, kv_end, col0, lse, delta);
}

// Memory a thread keeps between calls (tile buffers, the transposed keys). A fresh buffer of a few
// MiB comes back from glibc as untouched pages when large freed blocks were returned to the OS, and
// every first touch of a page is then a page fault (~1.4 us per 4 KiB page on the 2-core CI VM).
// Measured on packed documents (T = 2,048, 8 heads, fp32, 2 threads, the two builds run
// alternately): forward 7.2-7.8 -> 6.9-7.0 ms; the backward's time was within noise.
// Each thread keeps up to kRetainedScratchBytes per slot and only grows it; a larger request (long
// sequences) gets its own allocation, freed when the Scratch goes out of scope.
constexpr size_t kRetainedScratchBytes = size_t(8) << 20;
enum class ScratchSlot { kTask, kCall };  // a worker's tile buffers; the calling thread's shared data

class Scratch {
 public:
  Scratch(ScratchSlot slot, size_t bytes) : kept_(kept(slot)) {
    TORCH_INTERNAL_ASSERT(!kept_.in_use, "attention_cpu: scratch slot taken twice by one thread");
    bytes = (std::max<size_t>(bytes, 1) + 63) / 64 * 64;
    if (bytes > kRetainedScratchBytes) {
      data_ = allocate(bytes);
      owned_ = true;
      return;
    }
    if (kept_.bytes < bytes) {
      std::free(kept_.data);
      kept_.data = nullptr;  // stays consistent if the allocation below throws
      kept_.bytes = 0;
      kept_.data = allocate(bytes);
      kept_.bytes = bytes;
    }
    data_ = kept_.data;
    kept_.in_use = true;
  }
  ~Scratch() {
    if (owned_) std::free(data_);
    else kept_.in_use = false;
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  template <typename T>
  T* as() const { return static_cast<T*>(data_); }

 private:
  struct Kept {
    void* data = nullptr;
    size_t bytes = 0;
    bool in_use = false;
    ~Kept() { std::free(data); }
  };
  static Kept& kept(ScratchSlot slot) {
    thread_local Kept slots[2];
    return slots[static_cast<int>(slot)];
  }
  static void* allocate(size_t bytes) {
    void* p = std::aligned_alloc(64, bytes);
    TORCH_CHECK(p != nullptr, "attention_cpu: out of memory allocating ", bytes, " bytes of scratch");
    return p;
  }
  Kept& kept_;
  void* data_ = nullptr;
  bool owned_ = false;
};

// Runs task(order[t]) for every t on all intra-op threads, handing out tasks dynamically in the
// given order (heaviest first). Which thread runs a task never changes what the task writes.
// make_worker(scratch) builds a thread's task function around its `scratch_count` elements of
// (uninitialized) tile memory.
template <typename T, typename MakeWorker>
void run_tasks(const std::vector<int64_t>& order, int64_t scratch_count, const MakeWorker& make_worker) {
  std::atomic<int64_t> next{0};
  const int64_t n = static_cast<int64_t>(order.size());
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  at::parallel_for(0, workers, 1, [&](int64_t /*begin*/, int64_t /*end*/) {
    const Scratch scratch(ScratchSlot::kTask, scratch_count * sizeof(T));
    auto task = make_worker(scratch.as<T>());
    for (int64_t t = next.fetch_add(1); t < n; t = next.fetch_add(1)) task(order[t]);
  });
}

std::vector<int64_t> heaviest_first(const std::vector<int64_t>& work) {
  std::vector<int64_t> order(work.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return work[a] > work[b]; });
  return order;
}

struct Geometry {
  int64_t tq, tk, hq, hkv, d, bm, bn, group;
};

// q/k/v in the compute dtype with unit stride on head_dim and a token stride BLAS accepts.
at::Tensor as_compute(const at::Tensor& t, at::ScalarType compute) {
  at::Tensor c = t.scalar_type() == compute ? t : t.to(compute);
  if (c.stride(2) != 1 || c.stride(0) < c.size(2) || c.stride(1) < 0) c = c.contiguous();
  return c;
}

void check_table(const at::Tensor& t, const char* name, int64_t size) {
  TORCH_CHECK(t.scalar_type() == at::kInt && t.dim() == 1 && t.size(0) == size && t.is_contiguous(),
              "attention_cpu: ", name, " must be a contiguous int32 vector of ", size,
              " entries, got dtype ", t.scalar_type(), " and shape ", t.sizes());
}

Geometry geometry(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t bm, int64_t bn) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3,
              "attention_cpu: q, k, v must be (tokens, heads, head_dim)");
  TORCH_CHECK(k.sizes() == v.sizes(), "attention_cpu: k and v shapes differ: ", k.sizes(), " vs ", v.sizes());
  TORCH_CHECK(q.size(2) == k.size(2), "attention_cpu: q and k head_dim differ");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "attention_cpu: query heads (", q.size(1),
              ") must be a multiple of kv heads (", k.size(1), ")");
  TORCH_CHECK(bm > 0 && bn > 0, "attention_cpu: block sizes must be positive, got ", bm, " x ", bn);
  return {q.size(0), k.size(0), q.size(1), k.size(1), q.size(2), bm, bn, q.size(1) / k.size(1)};
}

at::ScalarType compute_type(const at::Tensor& q) {
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
              "attention_cpu: q must be float32, float64, bfloat16 or float16, got ", dt);
  return dt == at::kDouble ? at::kDouble : at::kFloat;
}

// Row stride of `count` keys stored as (D, count) (transpose_keys): padded, so that it is never a
// power of two, which would put the 16 rows a transposed block writes into one cache set.
constexpr int64_t transposed_stride(int64_t count) { return count + 16; }

// dst[d * ld + i] = src[i * s0 + d] for `count` keys of one head (unit stride on d): keys as
// (D, count), so that the score products run as NN GEMMs (MKL's transposed-A kernel measured ~40%
// slower per flop here); ld: transposed_stride(count) or more. (Tensor::permute().contiguous()
// took 3.7 ms for 2,048 x 8 x 64 fp32 on 2 threads, a quarter of the forward on packed documents.)
template <typename T>
void transpose_keys(const T* src, int64_t s0, int64_t count, int64_t dim, T* dst, int64_t ld) {
  constexpr int64_t kBlock = 16;
  for (int64_t t0 = 0; t0 < count; t0 += kBlock) {
    const int64_t n = std::min(kBlock, count - t0);
    for (int64_t d0 = 0; d0 < dim; d0 += kBlock) {
      const int64_t m = std::min(kBlock, dim - d0);
#if TF_AVX512_PATH
      if constexpr (std::is_same_v<T, float>) {
        if (use_avx512() && n == kBlock && m == kBlock) {
          transpose16x16_avx512(src + t0 * s0 + d0, s0, dst + d0 * ld + t0, ld);
          continue;
        }
      }
#endif
      for (int64_t i = 0; i < n; ++i) {
        const T* row = src + (t0 + i) * s0 + d0;
        for (int64_t j = 0; j < m; ++j) dst[(d0 + j) * ld + t0 + i] = row[j];
      }
    }
  }
}

// The keys of every head as (H, D, T), row stride ld (transposed_stride(T)), into dst: the
// forward's row tiles of all heads share it. The backward instead transposes per task
// (backward_kernel).
template <typename T>
void heads_dim_tokens(const at::Tensor& x, T* dst, int64_t ld) {
  const int64_t tokens = x.size(0), heads = x.size(1), dim = x.size(2), s0 = x.stride(0), s1 = x.stride(1);
  const T* src = x.const_data_ptr<T>();
  constexpr int64_t kBlock = 256;
  const int64_t token_blocks = (tokens + kBlock - 1) / kBlock;
  at::parallel_for(0, heads * token_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t h = task / token_blocks, t0 = (task % token_blocks) * kBlock;
      transpose_keys(src + t0 * s0 + h * s1, s0, std::min(kBlock, tokens - t0), dim, dst + h * dim * ld + t0, ld);
    }
  });
}

// Splits [lo, hi) at the edges of two mask-free ranges and calls piece(p_lo, p_hi, mask_free) for
// each maximal run of pieces that are all inside one of them (mask_free) or all outside (masked).
template <typename Piece>
void for_each_piece(int64_t lo, int64_t hi, int64_t free1_lo, int64_t free1_hi, int64_t free2_lo,
                    int64_t free2_hi, const Piece& piece) {
  if (lo >= hi) return;
  int64_t cuts[6] = {lo, hi, clamp_to(free1_lo, lo, hi), clamp_to(free1_hi, lo, hi),
                     clamp_to(free2_lo, lo, hi), clamp_to(free2_hi, lo, hi)};
  std::sort(cuts, cuts + 6);
  int64_t run_lo = lo;
  bool run_free = false;
  for (int i = 0; i < 5; ++i) {
    const int64_t a = cuts[i], b = cuts[i + 1];
    if (a >= b) continue;
    const bool free = (free1_lo <= a && b <= free1_hi) || (free2_lo <= a && b <= free2_hi);
    if (a > run_lo && free != run_free) {
      piece(run_lo, a, run_free);
      run_lo = a;
    }
    run_free = free;
  }
  if (hi > run_lo) piece(run_lo, hi, run_free);
}

// Calls segment(a, b) for consecutive runs of [lo, hi) whose `start` is the same (rows of one
// document in the forward, keys of one document in the backward, through kv_start / q_end). A run
// shorter than min_len absorbs the next ones up to min_len so that many tiny documents do not turn
// into many tiny GEMMs (the masked path then sorts them out).
template <typename Segment>
void for_each_segment(const int32_t* start, int64_t lo, int64_t hi, int64_t min_len, const Segment& segment) {
  for (int64_t a = lo; a < hi;) {
    int64_t b = a + 1;
    while (b < hi && (start[b] == start[a] || b - a < min_len)) ++b;
    segment(a, b);
    a = b;
  }
}

// One segment [a, b) of a tile walk, shared by the forward (rows over keys, through kv_start /
// kv_end) and the backward (keys over query rows, through q_start / q_end). The segment visits the
// union of its members' intervals inside the table's range [tile_lo, tile_hi), plus the table's full
// tiles [full_lo, full_hi), which are mask-free whatever the intervals say. Pieces that every member
// sees, or full tiles, go to block(a, b, lo, hi, false) whole; the rest is cut into sub-blocks of at
// most masked_len members, each up to its own last member's interval end: block(sa, sb, lo, hi, true).
// start / end are non-decreasing in the member.
template <typename Block>
void walk_segment(const int32_t* start, const int32_t* end, int64_t a, int64_t b, int64_t tile_lo,
                  int64_t tile_hi, int64_t full_lo, int64_t full_hi, int64_t masked_len, const Block& block) {
  int64_t lo = std::max<int64_t>(tile_lo, start[a]), hi = std::min<int64_t>(tile_hi, end[b - 1]);
  if (full_lo < full_hi) {
    lo = std::min(lo, full_lo);
    hi = std::max(hi, full_hi);
  }
  const int64_t seen_lo = start[b - 1], seen_hi = end[a];   // seen by every member
  for_each_piece(lo, hi, seen_lo, seen_hi, full_lo, full_hi, [&](int64_t p_lo, int64_t p_hi, bool free) {
    if (free) {
      block(a, b, p_lo, p_hi, false);
      return;
    }
    for (int64_t sa = a; sa < b; sa += masked_len) {
      const int64_t sb = std::min(b, sa + masked_len);
      block(sa, sb, std::max<int64_t>(p_lo, start[sa]), std::min<int64_t>(p_hi, end[sb - 1]), true);
    }
  });
}

// k_t: the keys as (Hkv, D, Tk) with row stride ldkt (heads_dim_tokens), so that S = Q K^T runs as
// a plain NN GEMM.
// Keys per forward GEMM: consecutive visited key tiles of a row tile are merged up to this many
// columns; the online softmax then runs once over the wide score block (measured on the 2-thread
// AVX-512 Xeon, T = 2,048 Transfusion layout: with 128 x 64 tiles, 1,024 columns ~10% faster
// forward than one GEMM pair per tile; 256 and 512 in between).
constexpr int64_t kForwardGemmCols = 1024;

// Document-aware walk inside a row tile. Where a row tile holds the end of one document and the
// start of the next, the union of its rows' key intervals covers both documents: the rows of each
// document (a segment, same kv_start) only compute their own keys. Inside a segment, the keys that
// every row sees run as wide mask-free GEMMs over all its rows; the rest (the causal diagonal, span
// edges) is cut into row sub-blocks of kMaskedRows, each computing only up to its own last row's
// kv_end, so that the diagonal wastes ~kMaskedRows / 2 keys per row instead of ~block_m / 2.
// Segments shorter than kMinSegmentRows merge with the next rows (then they are masked).
constexpr int64_t kMaskedRows = 32;
constexpr int64_t kMinSegmentRows = 16;

template <typename T>
void forward_kernel(const at::Tensor& q, const T* ktp, int64_t ldkt, const at::Tensor& v, at::Tensor& out,
                    at::Tensor& lse, const int32_t* kv_start, const int32_t* kv_end, const int32_t* kv_lo,
                    const int32_t* kv_hi, const int32_t* kv_full_lo, const int32_t* kv_full_hi,
                    const Geometry& g, T scale) {
  const T* qp = q.const_data_ptr<T>();
  const T* vp = v.const_data_ptr<T>();
  T* op = out.mutable_data_ptr<T>();
  T* lp = lse.mutable_data_ptr<T>();
  const int64_t sq0 = q.stride(0), sq1 = q.stride(1), skt = g.d * ldkt;
  const int64_t sv0 = v.stride(0), sv1 = v.stride(1);
  const int64_t num_m = (g.tq + g.bm - 1) / g.bm;
  std::vector<int64_t> work(g.hq * num_m);
  for (int64_t t = 0; t < g.hq * num_m; ++t) work[t] = kv_hi[t % num_m] - kv_lo[t % num_m];

  const int64_t max_cols = std::max<int64_t>(kForwardGemmCols, g.bn);
  run_tasks<T>(heaviest_first(work), g.bm * (max_cols + g.d + 2), [&](T* scratch) {
    return [=, &g](int64_t t) {
      const int64_t h = t / num_m, m = t % num_m, hk = h / g.group;
      const int64_t r0 = m * g.bm, rows = std::min(g.bm, g.tq - r0);
      T* S = scratch;
      T* O = S + g.bm * max_cols;
      T* row_max = O + g.bm * g.d;
      T* row_sum = row_max + g.bm;
      std::fill(row_max, row_max + rows, -std::numeric_limits<T>::infinity());
      std::fill(row_sum, row_sum + rows, T(0));
      std::fill(O, O + rows * g.d, T(0));
      const T* kt = ktp + hk * skt;
      const T* vh = vp + hk * sv1;
      // Rows [a, b) x keys [c_lo, c_hi), in GEMMs of up to max_cols keys; kv_start == nullptr: no mask.
      const auto block = [&](int64_t a, int64_t b, int64_t c_lo, int64_t c_hi, const int32_t* mask_start) {
        const int64_t i0 = a - r0, n = b - a;
        for (int64_t c0 = c_lo; c0 < c_hi; c0 += max_cols) {
          const int64_t cols = std::min(max_cols, c_hi - c0);
          // S (n x cols, row-major) = scale * Q K^T, i.e. column-major S^T = K Q^T.
          gemm(kN, kN, cols, n, g.d, scale, kt + c0, ldkt, qp + a * sq0 + h * sq1, sq0, T(0), S, max_cols);
          softmax_fwd(S, max_cols, n, cols, mask_start ? mask_start + a : nullptr, kv_end + a, c0,
                      row_max + i0, row_sum + i0, O + i0 * g.d, g.d);
          // O += P V, i.e. column-major O^T += V^T P^T.
          gemm(kN, kN, g.d, n, cols, T(1), vh + c0 * sv0, sv0, S, max_cols, T(1), O + i0 * g.d, g.d);
        }
      };
      // The table's key range and its full (mask-free) tiles; keys outside [tile_lo, tile_hi) are
      // never read.
      const int64_t tile_lo = kv_lo[m] * g.bn, tile_hi = std::min<int64_t>(kv_hi[m] * g.bn, g.tk);
      const int64_t full_lo = kv_full_lo[m] * g.bn, full_hi = std::min<int64_t>(kv_full_hi[m] * g.bn, g.tk);
      for_each_segment(kv_start, r0, r0 + rows, kMinSegmentRows, [&](int64_t a, int64_t b) {
        walk_segment(kv_start, kv_end, a, b, tile_lo, tile_hi, full_lo, full_hi, kMaskedRows,
                     [&](int64_t sa, int64_t sb, int64_t c_lo, int64_t c_hi, bool masked) {
                       block(sa, sb, c_lo, c_hi, masked ? kv_start : nullptr);
                     });
      });
      for (int64_t i = 0; i < rows; ++i) {
        // Every row sees at least its own position, so row_sum > 0.
        write_output_row(op + ((r0 + i) * g.hq + h) * g.d, O + i * g.d, g.d, T(1) / row_sum[i]);
        lp[h * g.tq + r0 + i] = row_max[i] + std::log(row_sum[i]);
      }
      finish_output_rows();
    };
  });
}

std::tuple<at::Tensor, at::Tensor> attention_cpu_fwd(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& kv_start,
    const at::Tensor& kv_end, const at::Tensor& kv_lo, const at::Tensor& kv_hi,
    const at::Tensor& kv_full_lo, const at::Tensor& kv_full_hi, int64_t block_m, int64_t block_n,
    double scale) {
  const auto compute = compute_type(q_in);
  const Geometry g = geometry(q_in, k_in, v_in, block_m, block_n);
  const int64_t num_m = (g.tq + g.bm - 1) / g.bm;
  check_table(kv_start, "kv_start", g.tq);
  check_table(kv_end, "kv_end", g.tq);
  check_table(kv_lo, "kv_lo", num_m);
  check_table(kv_hi, "kv_hi", num_m);
  check_table(kv_full_lo, "kv_full_lo", num_m);
  check_table(kv_full_hi, "kv_full_hi", num_m);
  const at::Tensor q = as_compute(q_in, compute), k = as_compute(k_in, compute), v = as_compute(v_in, compute);
  at::Tensor out = at::empty({g.tq, g.hq, g.d}, q.options());
  at::Tensor lse = at::empty({g.hq, g.tq}, q.options());
  AT_DISPATCH_FLOATING_TYPES(compute, "attention_cpu_fwd", [&] {
    const int64_t ld = transposed_stride(g.tk);
    const Scratch keys_t(ScratchSlot::kCall, g.hkv * g.d * ld * sizeof(scalar_t));
    heads_dim_tokens<scalar_t>(k, keys_t.as<scalar_t>(), ld);
    forward_kernel<scalar_t>(q, keys_t.as<scalar_t>(), ld, v, out, lse, kv_start.const_data_ptr<int32_t>(),
                             kv_end.const_data_ptr<int32_t>(), kv_lo.const_data_ptr<int32_t>(),
                             kv_hi.const_data_ptr<int32_t>(), kv_full_lo.const_data_ptr<int32_t>(),
                             kv_full_hi.const_data_ptr<int32_t>(), g, static_cast<scalar_t>(scale));
  });
  if (q_in.scalar_type() != compute) out = out.to(q_in.scalar_type());
  return {out, lse};
}

// Rows per backward GEMM: consecutive visited query tiles of a key tile are merged up to this many
// rows (measured on the 2-thread AVX-512 Xeon, T = 2,048 Transfusion layout, block 64 x 128:
// 256 rows ~5% faster forward+backward than one GEMM per 64-row tile; 128, 512 and 2,048 slower).
constexpr int64_t kBackwardGemmRows = 256;

// The backward's mirror of the forward's walk: inside a key tile, the keys of one document (same
// q_end) form a segment that only meets its own query rows; the rows that see every key of the
// segment run mask-free over all its keys, the rest in key sub-blocks of kMaskedCols.
constexpr int64_t kMaskedCols = 32;
constexpr int64_t kMinSegmentCols = 16;

template <typename T>
void backward_kernel(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v, const at::Tensor& lse, const at::Tensor& delta,
                     at::Tensor& dq_parts, at::Tensor& dk, at::Tensor& dv, const int32_t* kv_start,
                     const int32_t* kv_end, const int32_t* q_start, const int32_t* q_end,
                     const int32_t* q_lo, const int32_t* q_hi, const int32_t* q_full_lo,
                     const int32_t* q_full_hi, const Geometry& g, int64_t num_chunks, T scale) {
  const T* qp = q.const_data_ptr<T>();
  const T* kp = k.const_data_ptr<T>();
  const T* vp = v.const_data_ptr<T>();
  const T* dop = grad_out.const_data_ptr<T>();
  const T* lp = lse.const_data_ptr<T>();
  const T* deltap = delta.const_data_ptr<T>();
  T* dqp = dq_parts.mutable_data_ptr<T>();
  T* dkp = dk.mutable_data_ptr<T>();
  T* dvp = dv.mutable_data_ptr<T>();
  const int64_t sq0 = q.stride(0), sq1 = q.stride(1), sk0 = k.stride(0), sk1 = k.stride(1);
  const int64_t sv0 = v.stride(0), sv1 = v.stride(1);
  const int64_t sdo0 = grad_out.stride(0), sdo1 = grad_out.stride(1);
  const int64_t sdq0 = g.hq * g.d, dq_part_size = g.tq * g.hq * g.d;
  const int64_t num_n = (g.tk + g.bn - 1) / g.bn;

  // Split the key tiles of each kv head into num_chunks runs of about equal work.
  std::vector<int64_t> prefix(num_n + 1, 0);
  for (int64_t n = 0; n < num_n; ++n) prefix[n + 1] = prefix[n] + 1 + (q_hi[n] - q_lo[n]);
  std::vector<int64_t> bounds(num_chunks + 1, num_n);
  bounds[0] = 0;
  for (int64_t c = 1; c < num_chunks; ++c) {
    const int64_t target = prefix[num_n] * c / num_chunks;
    bounds[c] = std::lower_bound(prefix.begin(), prefix.end(), target) - prefix.begin();
  }
  std::vector<int64_t> work(g.hkv * num_chunks);
  for (int64_t t = 0; t < g.hkv * num_chunks; ++t) {
    const int64_t c = t % num_chunks;
    work[t] = prefix[bounds[c + 1]] - prefix[bounds[c]];
  }

  // Query rows per GEMM: consecutive visited rows are contiguous, so one GEMM covers up to
  // max_rows of them.
  const int64_t max_rows = std::max<int64_t>(kBackwardGemmRows, g.bm);
  // The task's keys and values as (D, keys).
  int64_t max_keys = 0;
  for (int64_t c = 0; c < num_chunks; ++c) {
    max_keys = std::max(max_keys, std::min(bounds[c + 1] * g.bn, g.tk) - bounds[c] * g.bn);
  }
  const int64_t ld_t = transposed_stride(max_keys);
  // The query rows each chunk's key tiles visit: a task accumulates dQ of its group's heads over
  // them in its own contiguous (group, rows, D) buffer, whose rows the prefetchers follow (in place,
  // the D-wide pieces of dq's (T, H, D) rows missed once per line), and writes its slice of
  // dq_parts out at the end, zeros outside the rows.
  std::vector<int64_t> rows_lo(num_chunks, 0), rows_hi(num_chunks, 0);
  int64_t max_visited = 0;
  for (int64_t c = 0; c < num_chunks; ++c) {
    int64_t lo = g.tq, hi = 0;
    for (int64_t n = bounds[c]; n < bounds[c + 1]; ++n) {
      if (q_lo[n] >= q_hi[n]) continue;
      lo = std::min<int64_t>(lo, q_lo[n] * g.bm);
      hi = std::max<int64_t>(hi, std::min<int64_t>(q_hi[n] * g.bm, g.tq));
    }
    if (lo < hi) {
      rows_lo[c] = lo;
      rows_hi[c] = hi;
      max_visited = std::max(max_visited, hi - lo);
    }
  }
  const int64_t scratch_count =
      2 * max_rows * g.bn + 2 * g.bn * g.d + 2 * g.d * ld_t + g.group * max_visited * g.d;
  run_tasks<T>(heaviest_first(work), scratch_count, [&](T* scratch) {
    return [=, &g, &bounds](int64_t t) {
      const int64_t hk = t / num_chunks, c = t % num_chunks;
      T* P = scratch;
      T* dS = P + max_rows * g.bn;
      T* dK = dS + max_rows * g.bn;
      T* dV = dK + g.bn * g.d;
      T* kt_t = dV + g.bn * g.d;
      T* vt_t = kt_t + g.d * ld_t;
      T* dq_rows = vt_t + g.d * ld_t;   // (group, max_visited, D)
      const int64_t row0 = rows_lo[c], visited = rows_hi[c] - rows_lo[c];
      for (int64_t i = 0; i < g.group; ++i) std::fill_n(dq_rows + i * max_visited * g.d, visited * g.d, T(0));
      const int64_t k0 = bounds[c] * g.bn, k1 = std::min(bounds[c + 1] * g.bn, g.tk);
      transpose_keys(kp + k0 * sk0 + hk * sk1, sk0, k1 - k0, g.d, kt_t, ld_t);
      transpose_keys(vp + k0 * sv0 + hk * sv1, sv0, k1 - k0, g.d, vt_t, ld_t);
      for (int64_t n = bounds[c]; n < bounds[c + 1]; ++n) {
        const int64_t c0 = n * g.bn, cols = std::min(g.bn, g.tk - c0);
        std::fill(dK, dK + 2 * g.bn * g.d, T(0));
        // Keys [ja, jb) x query rows [r_lo, r_hi) of head h, in GEMMs of up to max_rows rows;
        // mask_start == nullptr: no mask.
        const auto block = [&](int64_t h, int64_t ja, int64_t jb, int64_t r_lo, int64_t r_hi,
                               const int32_t* mask_start) {
          const int64_t w = jb - ja;
          T* dKj = dK + (ja - c0) * g.d;
          T* dVj = dV + (ja - c0) * g.d;
          const T* kj = kp + ja * sk0 + hk * sk1;
          for (int64_t r0 = r_lo; r0 < r_hi; r0 += max_rows) {
            const int64_t rows = std::min(max_rows, r_hi - r0);
            const T* qt = qp + r0 * sq0 + h * sq1;
            const T* dot = dop + r0 * sdo0 + h * sdo1;
            probs_and_dscores(w, rows, g.d, scale, kt_t + (ja - k0), vt_t + (ja - k0), ld_t, qt, sq0, dot, sdo0,
                              mask_start ? mask_start + r0 : nullptr, kv_end + r0, ja, lp + h * g.tq + r0,
                              deltap + h * g.tq + r0, P, dS, g.bn);                        // P, dS
            gemm(kN, kT, g.d, w, rows, T(1), dot, sdo0, P, g.bn, T(1), dVj, g.d);           // dV += P^T dO
            gemm(kN, kT, g.d, w, rows, scale, qt, sq0, dS, g.bn, T(1), dKj, g.d);           // dK += dS^T Q
            gemm(kN, kN, g.d, rows, w, scale, kj, sk0, dS, g.bn, T(1),
                 dq_rows + ((h - hk * g.group) * max_visited + r0 - row0) * g.d, g.d);     // dQ += dS K
          }
        };
        // The table's query range and its full (mask-free) tiles; rows outside are never read.
        const int64_t tile_lo = q_lo[n] * g.bm, tile_hi = std::min<int64_t>(q_hi[n] * g.bm, g.tq);
        const int64_t full_lo = q_full_lo[n] * g.bm, full_hi = std::min<int64_t>(q_full_hi[n] * g.bm, g.tq);
        for_each_segment(q_end, c0, c0 + cols, kMinSegmentCols, [&](int64_t ja, int64_t jb) {
          for (int64_t h = hk * g.group; h < (hk + 1) * g.group; ++h) {
            walk_segment(q_start, q_end, ja, jb, tile_lo, tile_hi, full_lo, full_hi, kMaskedCols,
                         [&](int64_t sa, int64_t sb, int64_t r_lo, int64_t r_hi, bool masked) {
                           block(h, sa, sb, r_lo, r_hi, masked ? kv_start : nullptr);
                         });
          }
        });
        for (int64_t j = 0; j < cols; ++j) {
          write_output_row(dkp + ((c0 + j) * g.hkv + hk) * g.d, dK + j * g.d, g.d, T(1));
          write_output_row(dvp + ((c0 + j) * g.hkv + hk) * g.d, dV + j * g.d, g.d, T(1));
        }
      }
      T* dq = dqp + c * dq_part_size;
      for (int64_t r = 0; r < g.tq; ++r) {
        const bool was_visited = row0 <= r && r < row0 + visited;
        for (int64_t i = 0; i < g.group; ++i) {
          write_output_row(dq + r * sdq0 + (hk * g.group + i) * g.d,
                           was_visited ? dq_rows + (i * max_visited + r - row0) * g.d : nullptr, g.d, T(1));
        }
      }
      finish_output_rows();
    };
  });
}

// delta[h, i] = sum_d dO[i, h, d] * O[i, h, d], minus the gradient of the LSE when the LSE itself
// is differentiated (d lse_i / d s_ij = P_ij, so it enters dS exactly like delta). Computed here in
// one pass instead of through a (T, H, D) product tensor.
template <typename T>
at::Tensor row_deltas(const at::Tensor& grad_out, const at::Tensor& out, const c10::optional<at::Tensor>& grad_lse,
                      const Geometry& g) {
  at::Tensor delta = at::empty({g.hq, g.tq}, grad_out.options());
  const T* dop = grad_out.const_data_ptr<T>();
  const T* op = out.const_data_ptr<T>();
  const T* glp = grad_lse.has_value() ? grad_lse->const_data_ptr<T>() : nullptr;
  T* dp = delta.mutable_data_ptr<T>();
  const int64_t sdo0 = grad_out.stride(0), sdo1 = grad_out.stride(1), so0 = out.stride(0), so1 = out.stride(1);
  at::parallel_for(0, g.tq, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t h = 0; h < g.hq; ++h) {
        const T* a = dop + i * sdo0 + h * sdo1;
        const T* b = op + i * so0 + h * so1;
        T sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int64_t d = 0; d < g.d; ++d) sum += a[d] * b[d];
        dp[h * g.tq + i] = glp ? sum - glp[h * g.tq + i] : sum;
      }
    }
  });
  return delta;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_cpu_bwd(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, const c10::optional<at::Tensor>& grad_lse_in,
    const at::Tensor& kv_start, const at::Tensor& kv_end, const at::Tensor& q_start, const at::Tensor& q_end, const at::Tensor& q_lo, const at::Tensor& q_hi,
    const at::Tensor& q_full_lo, const at::Tensor& q_full_hi, int64_t block_m, int64_t block_n,
    double scale) {
  const auto compute = compute_type(q_in);
  const Geometry g = geometry(q_in, k_in, v_in, block_m, block_n);
  const int64_t num_n = (g.tk + g.bn - 1) / g.bn;
  TORCH_CHECK(grad_out_in.sizes() == q_in.sizes(), "attention_cpu_bwd: grad_out must have q's shape ",
              q_in.sizes(), ", got ", grad_out_in.sizes());
  TORCH_CHECK(out_in.sizes() == q_in.sizes(), "attention_cpu_bwd: out must have q's shape ", q_in.sizes(),
              ", got ", out_in.sizes());
  TORCH_CHECK(out_in.stride(2) == 1, "attention_cpu_bwd: out must have unit stride on head_dim");
  TORCH_CHECK(lse_in.dim() == 2 && lse_in.size(0) == g.hq && lse_in.size(1) == g.tq,
              "attention_cpu_bwd: lse must be (", g.hq, ", ", g.tq, "), got ", lse_in.sizes());
  if (grad_lse_in.has_value()) {
    TORCH_CHECK(grad_lse_in->sizes() == lse_in.sizes(), "attention_cpu_bwd: grad_lse must have lse's shape ",
                lse_in.sizes(), ", got ", grad_lse_in->sizes());
  }
  check_table(kv_start, "kv_start", g.tq);
  check_table(kv_end, "kv_end", g.tq);
  check_table(q_start, "q_start", g.tk);
  check_table(q_end, "q_end", g.tk);
  check_table(q_lo, "q_lo", num_n);
  check_table(q_hi, "q_hi", num_n);
  check_table(q_full_lo, "q_full_lo", num_n);
  check_table(q_full_hi, "q_full_hi", num_n);
  const at::Tensor q = as_compute(q_in, compute), k = as_compute(k_in, compute), v = as_compute(v_in, compute);
  const at::Tensor grad_out = as_compute(grad_out_in, compute);
  const at::Tensor lse = lse_in.to(compute).contiguous();
  c10::optional<at::Tensor> grad_lse;
  if (grad_lse_in.has_value()) grad_lse = grad_lse_in->to(compute).contiguous();
  at::Tensor delta;
  AT_DISPATCH_FLOATING_TYPES(compute, "attention_cpu_bwd_delta", [&] {
    delta = row_deltas<scalar_t>(grad_out, as_compute(out_in, compute), grad_lse, g);
  });

  // One chunk per kv head when the kv heads alone spread evenly over the threads; otherwise split
  // the key tiles so that every thread has work (each chunk then needs its own dQ buffer).
  const int64_t threads = at::get_num_threads();
  int64_t num_chunks = 1;
  if (g.hkv % threads != 0) num_chunks = std::min<int64_t>(num_n, (2 * threads + g.hkv - 1) / g.hkv);
  num_chunks = std::max<int64_t>(num_chunks, 1);
  at::Tensor dq_parts = at::empty({num_chunks, g.tq, g.hq, g.d}, q.options());  // every element written
  at::Tensor dk = at::empty({g.tk, g.hkv, g.d}, q.options());
  at::Tensor dv = at::empty({g.tk, g.hkv, g.d}, q.options());
  AT_DISPATCH_FLOATING_TYPES(compute, "attention_cpu_bwd", [&] {
    backward_kernel<scalar_t>(grad_out, q, k, v, lse, delta, dq_parts, dk, dv,
                              kv_start.const_data_ptr<int32_t>(), kv_end.const_data_ptr<int32_t>(),
                              q_start.const_data_ptr<int32_t>(), q_end.const_data_ptr<int32_t>(),
                              q_lo.const_data_ptr<int32_t>(), q_hi.const_data_ptr<int32_t>(),
                              q_full_lo.const_data_ptr<int32_t>(), q_full_hi.const_data_ptr<int32_t>(),
                              g, num_chunks, static_cast<scalar_t>(scale));
  });
  at::Tensor dq = num_chunks == 1 ? dq_parts[0] : dq_parts.sum(0);
  const auto dt = q_in.scalar_type();
  if (dt != compute) {
    dq = dq.to(dt);
    dk = dk.to(dt);
    dv = dv.to(dt);
  }
  return {dq, dk, dv};
}

// Test hook: the tile product of this file (gemm: the AVX-512 kernel where use_avx512(), else
// BLAS) on fp32 tensors, in row-major terms: returns alpha * op(b) @ a + beta * c, with a (k, m),
// op(b) = b (n, k) or b^T for b (k, n), c (n, m); a and b may have any row stride (leading
// dimension). c is copied first and is not read when beta == 0.
at::Tensor attention_cpu_tile_gemm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, bool trans_b,
                                   double alpha, double beta) {
  for (const auto& [t, name] : {std::pair{&a, "a"}, std::pair{&b, "b"}, std::pair{&c, "c"}}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 2 && (t->stride(1) == 1 || t->size(1) <= 1),
                "attention_cpu_tile_gemm: ", name, " must be a 2-d float32 tensor with unit column stride, got ",
                t->scalar_type(), " of shape ", t->sizes(), " and strides ", t->strides());
  }
  const int64_t k = a.size(0), m = a.size(1), n = c.size(0);
  TORCH_CHECK(c.size(1) == m, "attention_cpu_tile_gemm: c must be (n, ", m, "), got ", c.sizes());
  const std::vector<int64_t> b_shape = trans_b ? std::vector<int64_t>{k, n} : std::vector<int64_t>{n, k};
  TORCH_CHECK(b.sizes() == at::IntArrayRef(b_shape), "attention_cpu_tile_gemm: b must be ", at::IntArrayRef(b_shape),
              ", got ", b.sizes());
  at::Tensor out = c.contiguous().clone();
  gemm<float>(kN, trans_b ? kT : kN, m, n, k, static_cast<float>(alpha), a.const_data_ptr<float>(),
              std::max<int64_t>(a.stride(0), 1), b.const_data_ptr<float>(), std::max<int64_t>(b.stride(0), 1),
              static_cast<float>(beta), out.mutable_data_ptr<float>(), std::max<int64_t>(m, 1));
  return out;
}

// Test hook: switches the AVX-512 kernels on or off (off: the portable path that CPUs without
// AVX-512 run) and returns the previous setting. Switching them on needs a CPU with AVX-512.
bool attention_cpu_set_avx512(bool enabled) {
  TORCH_CHECK(!enabled || kCpuHasAvx512, "attention_cpu_set_avx512: enabled=True needs a CPU with AVX-512 "
              "(and an x86-64 GCC build), this one has none");
  return g_use_avx512.exchange(enabled);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(transfusion_fast, m) {
  m.def("attention_cpu_fwd(Tensor q, Tensor k, Tensor v, Tensor kv_start, Tensor kv_end, Tensor kv_lo, "
        "Tensor kv_hi, Tensor kv_full_lo, Tensor kv_full_hi, int block_m, int block_n, float scale) "
        "-> (Tensor, Tensor)");
  m.def("attention_cpu_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? grad_lse, "
        "Tensor kv_start, Tensor kv_end, Tensor q_start, Tensor q_end, Tensor q_lo, Tensor q_hi, Tensor q_full_lo, Tensor q_full_hi, "
        "int block_m, int block_n, float scale) -> (Tensor, Tensor, Tensor)");
  m.def("attention_cpu_tile_gemm(Tensor a, Tensor b, Tensor c, bool trans_b, float alpha, float beta) -> Tensor");
  m.def("attention_cpu_set_avx512(bool enabled) -> bool", &attention_cpu_set_avx512);
}

TORCH_LIBRARY_IMPL(transfusion_fast, CPU, m) {
  m.impl("attention_cpu_fwd", &attention_cpu_fwd);
  m.impl("attention_cpu_bwd", &attention_cpu_bwd);
  m.impl("attention_cpu_tile_gemm", &attention_cpu_tile_gemm);
}

}  // namespace transfusion_fast
