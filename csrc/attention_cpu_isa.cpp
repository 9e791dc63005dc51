// The CPU attention's ISA switch and the dispatch of its tile kernels: every tile product,
// elementwise pass, transpose and output store goes through one function here that picks the
// hand-written kernel of the selected ISA (attention_cpu_avx512.cpp, attention_cpu_avx2.cpp) or the
// portable one (BLAS products, compiler-vectorized passes) defined below.
#include "attention_cpu.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <type_traits>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

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

namespace transfusion_fast::attention_cpu {

// ------------------------------------------------------------------------------------ ISA switch
namespace {

bool cpu_has(Isa isa) {
#if TF_X86_KERNELS
  // The selection is initialized while the library loads, possibly before libgcc's own CPU
  // detection constructor has run in this shared object.
  __builtin_cpu_init();
#endif
  switch (isa) {
    case Isa::kPortable: return true;
#if TF_X86_KERNELS
    // __builtin_cpu_supports also checks that the OS saves the wider registers (XGETBV).
    case Isa::kAvx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case Isa::kAvx512: return __builtin_cpu_supports("avx512f");
#endif
    default: return false;
  }
}

Isa best_isa() {
  const auto isas = supported_isas();
  return isas.back();
}

std::atomic<int> g_isa{static_cast<int>(best_isa())};

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "portable";
  }
}

std::vector<Isa> supported_isas() {
  std::vector<Isa> isas;
  for (Isa isa : {Isa::kPortable, Isa::kAvx2, Isa::kAvx512}) {
    if (cpu_has(isa)) isas.push_back(isa);
  }
  return isas;
}

Isa active_isa() { return static_cast<Isa>(g_isa.load(std::memory_order_relaxed)); }

Isa set_active_isa(const std::string& name) {
  const Isa known[] = {Isa::kPortable, Isa::kAvx2, Isa::kAvx512};
  const auto it = std::find_if(std::begin(known), std::end(known), [&](Isa i) { return name == isa_name(i); });
  TORCH_CHECK(it != std::end(known), "attention_cpu_set_isa: isa must be one of 'avx512', 'avx2', 'portable', got '",
              name, "'");
  std::string supported;
  for (Isa isa : supported_isas()) supported += std::string(supported.empty() ? "" : ", ") + "'" + isa_name(isa) + "'";
  TORCH_CHECK(cpu_has(*it), "attention_cpu_set_isa: isa='", name, "' needs a CPU with ",
              *it == Isa::kAvx512 ? "AVX-512F" : "AVX2 and FMA", " (and an x86-64 GCC build); this one runs ",
              supported);
  return static_cast<Isa>(g_isa.exchange(static_cast<int>(*it)));
}

// ------------------------------------------------------------------------ portable tile kernels
namespace {

#if TF_X86_KERNELS
// One binary for every x86 machine: the portable elementwise loops get an AVX-512 and an AVX2
// clone, picked at load time (the extension itself is built for the baseline ISA).
#define TF_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define TF_MULTIVERSION
#endif

template <typename T>
TF_INLINE void softmax_tile_forward(T* S, int64_t ld, int64_t rows, int64_t cols, const int32_t* kv_start,
                                    const int32_t* kv_end, int64_t col0, T* row_max, T* row_sum, T* acc,
                                    int64_t head_dim) {
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
      nan_reaches_row(s, lo, hi, row_sum + i);
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
TF_INLINE void probs_dscores_tile(T* S, T* dP, int64_t ld, int64_t rows, int64_t cols, const int32_t* kv_start,
                                  const int32_t* kv_end, int64_t col0, const T* lse, const T* delta) {
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

TF_MULTIVERSION void softmax_tile_forward_f32(float* S, int64_t ld, int64_t rows, int64_t cols, const int32_t* ks,
                                              const int32_t* ke, int64_t col0, float* mx, float* sum, float* acc,
                                              int64_t d) {
  softmax_tile_forward<float>(S, ld, rows, cols, ks, ke, col0, mx, sum, acc, d);
}
TF_MULTIVERSION void probs_dscores_tile_f32(float* S, float* dP, int64_t ld, int64_t rows, int64_t cols,
                                            const int32_t* ks, const int32_t* ke, int64_t col0, const float* lse,
                                            const float* delta) {
  probs_dscores_tile<float>(S, dP, ld, rows, cols, ks, ke, col0, lse, delta);
}

void probs_dscores(float* S, float* dP, int64_t ld, int64_t r, int64_t c, const int32_t* ks, const int32_t* ke,
                   int64_t c0, const float* lse, const float* delta) {
  probs_dscores_tile_f32(S, dP, ld, r, c, ks, ke, c0, lse, delta);
}
void probs_dscores(double* S, double* dP, int64_t ld, int64_t r, int64_t c, const int32_t* ks, const int32_t* ke,
                   int64_t c0, const double* lse, const double* delta) {
  probs_dscores_tile<double>(S, dP, ld, r, c, ks, ke, c0, lse, delta);
}

template <typename T>
void blas_gemm(TransposeType transa, TransposeType transb, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
               int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  using Blas = void (*)(const char*, const char*, const int*, const int*, const int*, const T*, const T*,
                        const int*, const T*, const int*, const T*, T*, const int*);
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

}  // namespace

// ------------------------------------------------------------------------------------- dispatch
void gemm(Isa isa, TransposeType transa, TransposeType transb, int64_t m, int64_t n, int64_t k, float alpha,
          const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
#if TF_X86_KERNELS
  if (transa == kN && isa == Isa::kAvx512) return avx512::sgemm(transb == kT, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  if (transa == kN && isa == Isa::kAvx2) return avx2::sgemm(transb == kT, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
#endif
  blas_gemm<float>(transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
void gemm(Isa /*isa*/, TransposeType transa, TransposeType transb, int64_t m, int64_t n, int64_t k, double alpha,
          const double* a, int64_t lda, const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
  blas_gemm<double>(transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void softmax_fwd(Isa isa, float* S, int64_t ld, int64_t r, int64_t c, const int32_t* ks, const int32_t* ke,
                 int64_t c0, float* mx, float* sum, float* acc, int64_t d) {
#if TF_X86_KERNELS
  if (isa == Isa::kAvx512) return avx512::softmax_tile_forward(S, ld, r, c, ks, ke, c0, mx, sum, acc, d);
  if (isa == Isa::kAvx2) return avx2::softmax_tile_forward(S, ld, r, c, ks, ke, c0, mx, sum, acc, d);
#endif
  softmax_tile_forward_f32(S, ld, r, c, ks, ke, c0, mx, sum, acc, d);
}
void softmax_fwd(Isa /*isa*/, double* S, int64_t ld, int64_t r, int64_t c, const int32_t* ks, const int32_t* ke,
                 int64_t c0, double* mx, double* sum, double* acc, int64_t d) {
  softmax_tile_forward<double>(S, ld, r, c, ks, ke, c0, mx, sum, acc, d);
}

template <typename T>
void probs_and_dscores(Isa isa, int64_t keys, int64_t rows, int64_t d, T scale, const T* k_t, const T* v_t,
                       int64_t ld_t, const T* q, int64_t ldq, const T* grad_out, int64_t ldo,
                       const int32_t* kv_start, const int32_t* kv_end, int64_t col0, const T* lse,
                       const T* delta, T* P, T* dS, int64_t ld) {
#if TF_X86_KERNELS
  // The vector ISAs turn the scores into P and dS in the product's tile epilogue.
  if constexpr (std::is_same_v<T, float>) {
    const ScoresBlock block{d, scale, k_t, v_t, ld_t, q, grad_out, ldq, ldo, kv_start, kv_end, col0,
                            lse, delta, P, dS, ld};
    if (isa == Isa::kAvx512) return avx512::probs_dscores_fused(block, keys, rows);
    if (isa == Isa::kAvx2) return avx2::probs_dscores_fused(block, keys, rows);
  }
#endif
  gemm(isa, kN, kN, keys, rows, d, scale, k_t, ld_t, q, ldq, T(0), P, ld);        // S
  gemm(isa, kN, kN, keys, rows, d, T(1), v_t, ld_t, grad_out, ldo, T(0), dS, ld);  // dP = dO V^T
  probs_dscores(P, dS, ld, rows, keys, kv_start, kv_end, col0, lse, delta);
}
template void probs_and_dscores<float>(Isa, int64_t, int64_t, int64_t, float, const float*, const float*, int64_t,
                                       const float*, int64_t, const float*, int64_t, const int32_t*, const int32_t*,
                                       int64_t, const float*, const float*, float*, float*, int64_t);
template void probs_and_dscores<double>(Isa, int64_t, int64_t, int64_t, double, const double*, const double*,
                                        int64_t, const double*, int64_t, const double*, int64_t, const int32_t*,
                                        const int32_t*, int64_t, const double*, const double*, double*, double*,
                                        int64_t);

// Keys as (D, count), so that the score products run as NN GEMMs (MKL's transposed-A kernel was
// slower per flop than its NN one here, and the hand-written kernels read A's columns in place);
// ld: transposed_stride(count) or more. Tensor::permute().contiguous() cost a quarter of a
// forward on packed documents: blocks of 16 x 16 (8 x 8 on AVX2), in registers where the ISA can.
template <typename T>
void transpose_keys(Isa isa, const T* src, int64_t s0, int64_t count, int64_t dim, T* dst, int64_t ld) {
  constexpr int64_t kBlock = 16;
  for (int64_t t0 = 0; t0 < count; t0 += kBlock) {
    const int64_t n = std::min(kBlock, count - t0);
    for (int64_t d0 = 0; d0 < dim; d0 += kBlock) {
      const int64_t m = std::min(kBlock, dim - d0);
#if TF_X86_KERNELS
      if constexpr (std::is_same_v<T, float>) {
        if (isa == Isa::kAvx512 && n == kBlock && m == kBlock) {
          avx512::transpose16x16(src + t0 * s0 + d0, s0, dst + d0 * ld + t0, ld);
          continue;
        }
        if (isa == Isa::kAvx2 && n == kBlock && m == kBlock) {
          for (int64_t i = 0; i < kBlock; i += 8) {
            for (int64_t j = 0; j < kBlock; j += 8) {
              avx2::transpose8x8(src + (t0 + i) * s0 + d0 + j, s0, dst + (d0 + j) * ld + t0 + i, ld);
            }
          }
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
template void transpose_keys<float>(Isa, const float*, int64_t, int64_t, int64_t, float*, int64_t);
template void transpose_keys<double>(Isa, const double*, int64_t, int64_t, int64_t, double*, int64_t);

// A task writes its head's D-element piece of each (T, H, D) output row, which nothing reads again
// during the call: with ordinary stores every line is first read from memory (read-for-ownership),
// one demand miss per line, as the strided pieces defeat the prefetchers. With a vector ISA, fp32
// and aligned whole vectors, the row goes out with streaming stores instead.
template <typename T>
void write_output_row(Isa isa, T* dst, const T* src, int64_t n, T scale) {
#if TF_X86_KERNELS
  if constexpr (std::is_same_v<T, float>) {
    const auto address = reinterpret_cast<uintptr_t>(dst);
    if (isa == Isa::kAvx512 && n % 16 == 0 && address % 64 == 0) return avx512::stream_scaled_row(dst, src, n, scale);
    if (isa == Isa::kAvx2 && n % 8 == 0 && address % 32 == 0) return avx2::stream_scaled_row(dst, src, n, scale);
  }
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = src == nullptr ? T(0) : src[i] * scale;
}
template void write_output_row<float>(Isa, float*, const float*, int64_t, float);
template void write_output_row<double>(Isa, double*, const double*, int64_t, double);

void finish_output_rows(Isa isa) {
#if TF_X86_KERNELS
  if (isa != Isa::kPortable) _mm_sfence();  // SSE: no target attribute needed
#else
  (void)isa;
#endif
}

// ----------------------------------------------------------------------------- shared op pieces
at::ScalarType compute_type(const at::Tensor& q) {
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
              "attention_cpu: q must be float32, float64, bfloat16 or float16, got ", dt);
  return dt == at::kDouble ? at::kDouble : at::kFloat;
}

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

}  // namespace transfusion_fast::attention_cpu
