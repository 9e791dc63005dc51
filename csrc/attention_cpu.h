// Block-sparse exact attention on CPU: what the files csrc/attention_cpu_*.cpp share.
//
// The mask of a packed batch is an interval of keys per query row, [kv_start[i], kv_end[i]); the
// Layout turns it into per-tile walk tables (transfusion_fast/layout.py, TileTable): row tile m
// visits key tiles [kv_lo[m], kv_hi[m]) of which [kv_full_lo[m], kv_full_hi[m]) need no mask, and
// key tile n visits query tiles [q_lo[n], q_hi[n]) with full sub-range [q_full_lo[n], q_full_hi[n]).
// Skipped tiles are never read; full tiles never look at the mask; memory is O(T*H*D): each worker
// holds a few tiles, never a T x T matrix. docs/cpu_attention.md describes the whole design.
//
// The files, by concern:
//   attention_cpu.h             this header: helpers, the ISA switch, the kernel entry points
//   attention_cpu_isa.cpp       ISA detection and selection, dispatch of every tile kernel to the
//                               selected ISA, the portable kernels (BLAS, compiler-vectorized)
//   attention_cpu_avx512.cpp    hand-written AVX-512 kernels (fp32)
//   attention_cpu_avx2.cpp      hand-written AVX2 + FMA kernels (fp32)
//   attention_cpu_scratch.h     per-thread scratch buffers and the task runner
//   attention_cpu_walk.h        the document-aware tile walk shared by forward and backward
//   attention_cpu_fwd.cpp       forward kernel and op
//   attention_cpu_bwd.cpp       backward kernel and op
//   attention_cpu_hooks.cpp     test hooks (the tile product, the ISA selector)
#pragma once

#include <ATen/ATen.h>
#include <ATen/native/TransposeType.h>

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// The hand-written x86 kernels: compiled with per-function target attributes, so that one binary
// built for the baseline ISA serves every x86 CPU (the kernels run only where the CPU has them).
#define TF_X86_KERNELS 1
#else
#define TF_X86_KERNELS 0
#endif

#define TF_INLINE inline __attribute__((always_inline))

namespace transfusion_fast::attention_cpu {

using at::native::TransposeType;
constexpr TransposeType kN = TransposeType::NoTranspose;
constexpr TransposeType kT = TransposeType::Transpose;

// std::max / std::clamp are not inlined into target-specific functions (different target
// options), which would keep their loops scalar: the hot code uses these instead.
template <typename T>
TF_INLINE T max_of(T a, T b) { return a > b ? a : b; }
TF_INLINE int64_t clamp_to(int64_t x, int64_t lo, int64_t hi) { return x < lo ? lo : (x > hi ? hi : x); }

// exp(x) for x <= ~0 (softmax arguments): 2^n * 2^f with n = round(x*log2(e)), |f| <= 1/2 and a
// degree-5 polynomial of 2^f fitted for minimal relative error (< 2.4e-7 evaluated in fp32, about 2
// ulp; torch's own CPU flash attention takes an exp of up to 20 ulp); degree 7 bought no accuracy
// the tests can see and cost time on every score. The vector versions (AVX-512, AVX2) use the same
// coefficients. Written without branches so that the loops calling it vectorize; exp(-inf) and
// underflow give 0, and a NaN argument gives NaN (a NaN score must reach its row: see the NaN /
// infinity semantics in transfusion_fast/ops/attention.py).
constexpr float kExpC5 = 1.327647152e-03f, kExpC4 = 9.675541331e-03f, kExpC3 = 5.550713275e-02f,
                kExpC2 = 2.402211972e-01f, kExpC1 = 6.931469671e-01f, kExpC0 = 1.000000072e+00f;
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kExpUnderflow = -87.0f;   // below: exp(x) < 2^-125, returned as 0

TF_INLINE float exp_approx(float x) {
  const float t = max_of(x * kLog2e, -126.0f);
  // Adding 1.5 * 2^23 rounds to the nearest integer in the default rounding mode (|t| < 2^22).
  const float n = (t + 12582912.0f) - 12582912.0f;
  const float f = t - n;
  float p = kExpC5;
  p = p * f + kExpC4;
  p = p * f + kExpC3;
  p = p * f + kExpC2;
  p = p * f + kExpC1;
  p = p * f + kExpC0;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  __builtin_memcpy(&two_n, &bits, sizeof(two_n));
  // NaN: the clamp above made t = -126, a harmless exponent; the select puts the NaN back.
  return x < kExpUnderflow ? 0.0f : (x == x ? p * two_n : x);
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

// ------------------------------------------------------------------------- non-finite inputs
// The early exit of a softmax row whose maximum came out -inf (nothing visible in the block, or
// only -inf scores): the vector max reductions drop a NaN, so a NaN score may hide there; it still
// has to make the row NaN (every other row gets it from exp(NaN - m) = NaN in the exp pass).
template <typename T>
TF_INLINE void nan_reaches_row(const T* s, int64_t lo, int64_t hi, T* row_sum) {
  bool nan = false;
  for (int64_t j = lo; j < hi; ++j) nan |= s[j] != s[j];
  if (nan) *row_sum = std::numeric_limits<T>::quiet_NaN();
}

// A masked block's products hold exact zeros for the pairs (row, key) the mask hides, but a GEMM
// still adds 0 * NaN = NaN (and 0 * inf) from them, which would put a NaN or an infinity of one key
// (or of one row) into rows (or keys) that do not see it, across documents even where short
// documents share a block. So a masked block's product goes to a buffer first: when it is finite
// (always, for finite inputs) it is added to the accumulator; otherwise the block is redone pair by
// pair over the visible pairs only (masked_accumulate). The check costs O(m * n) per block against
// the product's O(m * n * k).
template <typename T>
TF_INLINE bool all_finite(const T* x, int64_t n) {
  T z = 0;   // 0 * x is 0 for finite x, NaN for NaN and infinities
#pragma omp simd reduction(+ : z)
  for (int64_t i = 0; i < n; ++i) z += x[i] * T(0);
  return z == T(0);
}

// C (m x n, column-major, ldc) += the block's product: product(tmp) writes it into tmp (m x n,
// column-major, ld m); when it is not finite, exact() adds it to C pair by pair instead.
template <typename T, typename Product, typename Exact>
void masked_accumulate(int64_t m, int64_t n, T* c, int64_t ldc, T* tmp, const Product& product, const Exact& exact) {
  product(tmp);
  if (!all_finite(tmp, m * n)) {
    exact();
    return;
  }
  for (int64_t col = 0; col < n; ++col) {
    T* cc = c + col * ldc;
    const T* tc = tmp + col * m;
#pragma omp simd
    for (int64_t r = 0; r < m; ++r) cc[r] += tc[r];
  }
}

// ------------------------------------------------------------------------------------ ISA switch
// Which hand-written kernels run. The default is the best the CPU has; attention_cpu_set_isa (a
// test and benchmark hook, exposed in Python as transfusion_fast.ops._cpu_attention.set_cpu_isa)
// forces another one the CPU can run, so that every path is tested and timed on any machine.
// kPortable: BLAS products and compiler-vectorized passes (what non-x86 CPUs run).
enum class Isa : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

const char* isa_name(Isa isa);
std::vector<Isa> supported_isas();     // by this CPU and build, best last
Isa active_isa();                      // read once per op call: one call never mixes paths
Isa set_active_isa(const std::string& name);   // returns the previous one; refuses an unsupported ISA

// ------------------------------------------------------------------------- tile kernel dispatch
// Column-major C (m x n) = alpha * op(A) op(B) + beta * C, as in BLAS (C is not read when beta ==
// 0): fp32 through the ISA's register-tiled kernel (every product of the attention has transa ==
// N), the rest through BLAS.
void gemm(Isa isa, TransposeType transa, TransposeType transb, int64_t m, int64_t n, int64_t k, float alpha,
          const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc);
void gemm(Isa isa, TransposeType transa, TransposeType transb, int64_t m, int64_t n, int64_t k, double alpha,
          const double* a, int64_t lda, const double* b, int64_t ldb, double beta, double* c, int64_t ldc);

// Online softmax over one block of scores: S (rows x cols, row stride ld) becomes P = exp(S - m_new)
// (0 outside each row's visible columns, through kv_start / kv_end relative to col0; kv_start ==
// nullptr: all visible), the running max / sum are updated and the output accumulator (rows x
// head_dim) rescaled by exp(m_old - m_new). ld must be a multiple of 16 and at least cols rounded
// up to 16: the vector kernels read and write whole vectors up to there.
void softmax_fwd(Isa isa, float* S, int64_t ld, int64_t rows, int64_t cols, const int32_t* kv_start,
                 const int32_t* kv_end, int64_t col0, float* row_max, float* row_sum, float* acc, int64_t head_dim);
void softmax_fwd(Isa isa, double* S, int64_t ld, int64_t rows, int64_t cols, const int32_t* kv_start,
                 const int32_t* kv_end, int64_t col0, double* row_max, double* row_sum, double* acc,
                 int64_t head_dim);

// The backward's scores of one block: P (keys x rows, column-major, leading dimension ld) =
// exp(scale * K Q^T - lse) on each row's visible keys [kv_start, kv_end) (all keys when kv_start ==
// nullptr), 0 elsewhere, and dS = P * (V dO^T - delta). k_t / v_t: (D, keys), row stride ld_t.
struct ScoresBlock {
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
};
template <typename T>
void probs_and_dscores(Isa isa, int64_t keys, int64_t rows, int64_t d, T scale, const T* k_t, const T* v_t,
                       int64_t ld_t, const T* q, int64_t ldq, const T* grad_out, int64_t ldo,
                       const int32_t* kv_start, const int32_t* kv_end, int64_t col0, const T* lse,
                       const T* delta, T* P, T* dS, int64_t ld);

// dst[d * ld + i] = src[i * s0 + d] for `count` keys of one head (unit stride on d).
template <typename T>
void transpose_keys(Isa isa, const T* src, int64_t s0, int64_t count, int64_t dim, T* dst, int64_t ld);

// dst[i] = src[i] * scale (0 where src == nullptr) for one row of an output tensor (o, dq, dk,
// dv): streaming stores where the ISA has them (see write_output_row in attention_cpu_isa.cpp).
// Tasks end with finish_output_rows() so that the stores are visible before the kernel returns.
template <typename T>
void write_output_row(Isa isa, T* dst, const T* src, int64_t n, T scale);
void finish_output_rows(Isa isa);

// ------------------------------------------------------------------------ the ISA kernels proper
// Called only through the dispatch above, and only where the CPU has the ISA.
#if TF_X86_KERNELS
namespace avx512 {
void sgemm(bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda, const float* b,
           int64_t ldb, float beta, float* c, int64_t ldc);
void softmax_tile_forward(float* S, int64_t ld, int64_t rows, int64_t cols, const int32_t* kv_start,
                          const int32_t* kv_end, int64_t col0, float* row_max, float* row_sum, float* acc,
                          int64_t head_dim);
void probs_dscores_fused(const ScoresBlock& block, int64_t keys, int64_t rows);
void transpose16x16(const float* src, int64_t ld_src, float* dst, int64_t ld_dst);
void stream_scaled_row(float* dst, const float* src, int64_t n, float scale);
}  // namespace avx512
namespace avx2 {
void sgemm(bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda, const float* b,
           int64_t ldb, float beta, float* c, int64_t ldc);
void softmax_tile_forward(float* S, int64_t ld, int64_t rows, int64_t cols, const int32_t* kv_start,
                          const int32_t* kv_end, int64_t col0, float* row_max, float* row_sum, float* acc,
                          int64_t head_dim);
void probs_dscores_fused(const ScoresBlock& block, int64_t keys, int64_t rows);
void transpose8x8(const float* src, int64_t ld_src, float* dst, int64_t ld_dst);
void stream_scaled_row(float* dst, const float* src, int64_t n, float scale);
}  // namespace avx2
#endif

// ----------------------------------------------------------------------------- shared op pieces
struct Geometry {
  int64_t tq, tk, hq, hkv, d, bm, bn, group;
};

at::ScalarType compute_type(const at::Tensor& q);
at::Tensor as_compute(const at::Tensor& t, at::ScalarType compute);
void check_table(const at::Tensor& t, const char* name, int64_t size);
Geometry geometry(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t bm, int64_t bn);

// Row stride of `count` keys stored as (D, count) (transpose_keys): padded, so that it is never a
// power of two, which would put the 16 rows a transposed block writes into one cache set.
constexpr int64_t transposed_stride(int64_t count) { return count + 16; }

constexpr int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

}  // namespace transfusion_fast::attention_cpu
