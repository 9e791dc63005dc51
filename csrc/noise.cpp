// Forward diffusion (q_sample) with fused Philox noise: schemas and CPU kernels.
//   x_t = sqrt(alpha_bar[t_row]) * x0 + sqrt(1 - alpha_bar[t_row]) * eps,  one timestep per row of x0.
// The coefficient tables (float64, one entry per train step) come from transfusion_fast.schedules.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <iterator>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "isa.h"
#include "philox.h"

namespace transfusion_fast {

void check_q_sample_args(const at::Tensor& x0, const at::Tensor& timesteps, const at::Tensor& sqrt_ab,
                         const at::Tensor& sqrt_1m_ab);
void check_q_sample_noise(const at::Tensor& x0, const at::Tensor& noise);

// ------------------------------------------------------------------ SIMD noise
// The recipe of philox.h (Philox 4x32-10, then Box-Muller on words (0, 1) and (2, 3)) for kBlocks
// consecutive Philox blocks at once, one block per SIMD lane, written once over an ISA "V" (AVX-512:
// 16 lanes, AVX2: 8 lanes) whose primitives are single IEEE operations; the functions of each ISA
// carry their target attribute and the generic code is flattened into a target-attributed entry
// point, so the build needs no -mavx flags and the CPU is asked at run time which entry to use.
// Operation for operation the scalar recipe: FMA contraction is off (philox.h), the quadrant
// rotation flips sign bits exactly where the scalar code negates.
#if TF_X86
#define TF_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))
#define TF_TARGET_AVX2 __attribute__((target("avx2")))
#pragma GCC diagnostic ignored "-Wpsabi"  // vector arguments of the inlined helpers: never a real call
// GCC 12 flags the deliberately undefined lanes of _mm512_undefined_* inside its own intrinsics.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace simd {

struct Avx512 {
  static constexpr int kBlocks = 16;
  using F = __m512;
  using I = __m512i;
  using M = __mmask16;
  TF_TARGET_AVX512 static inline F add(F a, F b) { return _mm512_add_ps(a, b); }
  TF_TARGET_AVX512 static inline F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  TF_TARGET_AVX512 static inline F sqrt(F a) { return _mm512_sqrt_ps(a); }
  TF_TARGET_AVX512 static inline F set(float a) { return _mm512_set1_ps(a); }
  TF_TARGET_AVX512 static inline I set_int(uint32_t a) { return _mm512_set1_epi32(static_cast<int>(a)); }
  TF_TARGET_AVX512 static inline F to_float(I a) { return _mm512_cvtepi32_ps(a); }
  TF_TARGET_AVX512 static inline F as_float(I a) { return _mm512_castsi512_ps(a); }
  TF_TARGET_AVX512 static inline I as_int(F a) { return _mm512_castps_si512(a); }
  TF_TARGET_AVX512 static inline I load_int(const uint32_t* p) { return _mm512_loadu_si512(p); }
  TF_TARGET_AVX512 static inline I and_(I a, I b) { return _mm512_and_si512(a, b); }
  TF_TARGET_AVX512 static inline I or_(I a, I b) { return _mm512_or_si512(a, b); }
  TF_TARGET_AVX512 static inline I xor3(I a, I b, I c) { return _mm512_ternarylogic_epi32(a, b, c, 0x96); }
  TF_TARGET_AVX512 static inline I xor_(I a, I b) { return _mm512_xor_si512(a, b); }
  TF_TARGET_AVX512 static inline I add_int(I a, I b) { return _mm512_add_epi32(a, b); }
  TF_TARGET_AVX512 static inline I sub_int(I a, I b) { return _mm512_sub_epi32(a, b); }
  template <int N> TF_TARGET_AVX512 static inline I shift_right(I a) { return _mm512_srli_epi32(a, N); }
  template <int N> TF_TARGET_AVX512 static inline I shift_left(I a) { return _mm512_slli_epi32(a, N); }
  TF_TARGET_AVX512 static inline M less(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
  TF_TARGET_AVX512 static inline F select(M m, F if_true, F if_false) { return _mm512_mask_blend_ps(m, if_false, if_true); }
  TF_TARGET_AVX512 static inline I select_int(I bit, I if_one, I if_zero) {
    return _mm512_mask_blend_epi32(_mm512_test_epi32_mask(bit, bit), if_zero, if_one);
  }
  TF_TARGET_AVX512 static inline I minus_one_where(M m, I a) {
    return _mm512_mask_sub_epi32(a, m, a, _mm512_set1_epi32(1));
  }
  // High and low 32 bits of m * a per lane: even lanes from one 64-bit product, odd from another.
  TF_TARGET_AVX512 static inline void mulhilo(uint32_t m, I a, I& hi, I& lo) {
    const I multiplier = _mm512_set1_epi32(static_cast<int>(m));
    const I even = _mm512_mul_epu32(a, multiplier), odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), multiplier);
    hi = _mm512_mask_shuffle_epi32(odd, 0x5555, even, _MM_PERM_CDAB);
    lo = _mm512_mask_shuffle_epi32(even, 0xAAAA, odd, _MM_PERM_CDAB);  // not vpmulld: 2 uops, port 0
  }
  // out[4 l + k] = zk[l]: block l's four normals in element order.
  TF_TARGET_AVX512 static inline void store_interleaved(float* out, F z0, F z1, F z2, F z3) {
    const F t0 = _mm512_unpacklo_ps(z0, z1), t1 = _mm512_unpackhi_ps(z0, z1);
    const F t2 = _mm512_unpacklo_ps(z2, z3), t3 = _mm512_unpackhi_ps(z2, z3);
    // u_j: blocks j, j + 4, j + 8, j + 12, one per 128-bit quarter.
    const F u0 = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t2)));
    const F u1 = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t2)));
    const F u2 = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t1), _mm512_castps_pd(t3)));
    const F u3 = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t1), _mm512_castps_pd(t3)));
    const F w0 = _mm512_shuffle_f32x4(u0, u1, _MM_SHUFFLE(1, 0, 1, 0));  // blocks 0 4 1 5
    const F w1 = _mm512_shuffle_f32x4(u0, u1, _MM_SHUFFLE(3, 2, 3, 2));  // blocks 8 12 9 13
    const F w2 = _mm512_shuffle_f32x4(u2, u3, _MM_SHUFFLE(1, 0, 1, 0));  // blocks 2 6 3 7
    const F w3 = _mm512_shuffle_f32x4(u2, u3, _MM_SHUFFLE(3, 2, 3, 2));  // blocks 10 14 11 15
    _mm512_storeu_ps(out, _mm512_shuffle_f32x4(w0, w2, _MM_SHUFFLE(2, 0, 2, 0)));
    _mm512_storeu_ps(out + 16, _mm512_shuffle_f32x4(w0, w2, _MM_SHUFFLE(3, 1, 3, 1)));
    _mm512_storeu_ps(out + 32, _mm512_shuffle_f32x4(w1, w3, _MM_SHUFFLE(2, 0, 2, 0)));
    _mm512_storeu_ps(out + 48, _mm512_shuffle_f32x4(w1, w3, _MM_SHUFFLE(3, 1, 3, 1)));
  }
};

struct Avx2 {
  static constexpr int kBlocks = 8;
  using F = __m256;
  using I = __m256i;
  using M = __m256;  // all-ones / all-zeros lanes
  TF_TARGET_AVX2 static inline F add(F a, F b) { return _mm256_add_ps(a, b); }
  TF_TARGET_AVX2 static inline F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  TF_TARGET_AVX2 static inline F sqrt(F a) { return _mm256_sqrt_ps(a); }
  TF_TARGET_AVX2 static inline F set(float a) { return _mm256_set1_ps(a); }
  TF_TARGET_AVX2 static inline I set_int(uint32_t a) { return _mm256_set1_epi32(static_cast<int>(a)); }
  TF_TARGET_AVX2 static inline F to_float(I a) { return _mm256_cvtepi32_ps(a); }
  TF_TARGET_AVX2 static inline F as_float(I a) { return _mm256_castsi256_ps(a); }
  TF_TARGET_AVX2 static inline I as_int(F a) { return _mm256_castps_si256(a); }
  TF_TARGET_AVX2 static inline I load_int(const uint32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const I*>(p)); }
  TF_TARGET_AVX2 static inline I and_(I a, I b) { return _mm256_and_si256(a, b); }
  TF_TARGET_AVX2 static inline I or_(I a, I b) { return _mm256_or_si256(a, b); }
  TF_TARGET_AVX2 static inline I xor_(I a, I b) { return _mm256_xor_si256(a, b); }
  TF_TARGET_AVX2 static inline I xor3(I a, I b, I c) { return _mm256_xor_si256(_mm256_xor_si256(a, b), c); }
  TF_TARGET_AVX2 static inline I add_int(I a, I b) { return _mm256_add_epi32(a, b); }
  TF_TARGET_AVX2 static inline I sub_int(I a, I b) { return _mm256_sub_epi32(a, b); }
  template <int N> TF_TARGET_AVX2 static inline I shift_right(I a) { return _mm256_srli_epi32(a, N); }
  template <int N> TF_TARGET_AVX2 static inline I shift_left(I a) { return _mm256_slli_epi32(a, N); }
  TF_TARGET_AVX2 static inline M less(F a, F b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
  TF_TARGET_AVX2 static inline F select(M m, F if_true, F if_false) { return _mm256_blendv_ps(if_false, if_true, m); }
  TF_TARGET_AVX2 static inline I select_int(I bit, I if_one, I if_zero) {
    const I mask = _mm256_cmpeq_epi32(bit, _mm256_setzero_si256());
    return _mm256_blendv_epi8(if_one, if_zero, mask);
  }
  TF_TARGET_AVX2 static inline I minus_one_where(M m, I a) { return _mm256_add_epi32(a, _mm256_castps_si256(m)); }
  TF_TARGET_AVX2 static inline void mulhilo(uint32_t m, I a, I& hi, I& lo) {
    const I multiplier = _mm256_set1_epi32(static_cast<int>(m));
    const I even = _mm256_mul_epu32(a, multiplier), odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), multiplier);
    hi = _mm256_blend_epi32(_mm256_shuffle_epi32(even, _MM_SHUFFLE(2, 3, 0, 1)), odd, 0xAA);
    lo = _mm256_blend_epi32(even, _mm256_shuffle_epi32(odd, _MM_SHUFFLE(2, 3, 0, 1)), 0xAA);
  }
  TF_TARGET_AVX2 static inline void store_interleaved(float* out, F z0, F z1, F z2, F z3) {
    const F t0 = _mm256_unpacklo_ps(z0, z1), t1 = _mm256_unpackhi_ps(z0, z1);
    const F t2 = _mm256_unpacklo_ps(z2, z3), t3 = _mm256_unpackhi_ps(z2, z3);
    // u_j: blocks j and j + 4, one per 128-bit half.
    const F u0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0)), u1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
    const F u2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0)), u3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
    _mm256_storeu_ps(out, _mm256_permute2f128_ps(u0, u1, 0x20));
    _mm256_storeu_ps(out + 8, _mm256_permute2f128_ps(u2, u3, 0x20));
    _mm256_storeu_ps(out + 16, _mm256_permute2f128_ps(u0, u1, 0x31));
    _mm256_storeu_ps(out + 24, _mm256_permute2f128_ps(u2, u3, 0x31));
  }
};

template <class V>
inline typename V::F log_unit(typename V::F u) {
  using namespace recipe;
  using F = typename V::F;
  using I = typename V::I;
  const I bits = V::as_int(u);
  I e = V::sub_int(V::and_(V::template shift_right<23>(bits), V::set_int(0xFFu)), V::set_int(126));
  const F m = V::as_float(V::or_(V::and_(bits, V::set_int(0x007FFFFFu)), V::set_int(0x3F000000u)));
  const auto low = V::less(m, V::set(kSqrtHalf));
  e = V::minus_one_where(low, e);
  F x = V::add(V::select(low, V::add(m, m), m), V::set(-1.0f));
  const F z = V::mul(x, x);
  F y = V::set(kLog8);
  for (const float coefficient : {kLog7, kLog6, kLog5, kLog4, kLog3, kLog2, kLog1, kLog0}) {
    y = V::add(V::mul(y, x), V::set(coefficient));
  }
  y = V::mul(V::mul(y, x), z);
  const F fe = V::to_float(e);
  y = V::add(y, V::mul(V::set(kLn2Low), fe));
  y = V::add(y, V::mul(V::set(-0.5f), z));
  x = V::add(x, y);
  return V::add(x, V::mul(V::set(kLn2High), fe));
}

template <class V>
inline void box_muller(typename V::I w1, typename V::I w2, typename V::F& out_cos, typename V::F& out_sin) {
  using namespace recipe;
  using F = typename V::F;
  using I = typename V::I;
  const F u1 = V::mul(V::to_float(V::add_int(V::template shift_right<8>(w1), V::set_int(1))), V::set(kTwoPowMinus24));
  const F r = V::sqrt(V::mul(V::set(-2.0f), log_unit<V>(u1)));
  const I m2 = V::template shift_right<8>(w2);
  const I quadrant = V::template shift_right<22>(m2);
  const F centered = V::add(V::to_float(V::sub_int(V::and_(m2, V::set_int(0x3FFFFFu)), V::set_int(0x200000u))),
                            V::set(0.5f));
  const F theta = V::mul(centered, V::set(kThetaStep));
  const F z = V::mul(theta, theta);
  F sp = V::set(kSin2);
  sp = V::add(V::mul(sp, z), V::set(kSin1));
  sp = V::add(V::mul(sp, z), V::set(kSin0));
  const F s = V::add(theta, V::mul(V::mul(theta, z), sp));
  F cp = V::set(kCos2);
  cp = V::add(V::mul(cp, z), V::set(kCos1));
  cp = V::add(V::mul(cp, z), V::set(kCos0));
  const F c = V::add(V::add(V::set(1.0f), V::mul(V::set(-0.5f), z)), V::mul(V::mul(z, z), cp));
  // Quadrant q: cos_a = c, -s, -c, s and sin_a = s, c, -s, -c; negation is a sign-bit flip.
  const I odd = V::and_(quadrant, V::set_int(1u));
  const I cos_sign = V::template shift_left<31>(V::xor_(quadrant, V::template shift_right<1>(quadrant)));
  const I sin_sign = V::template shift_left<31>(V::template shift_right<1>(quadrant));
  const I cos_a = V::xor_(V::select_int(odd, V::as_int(s), V::as_int(c)), cos_sign);
  const I sin_a = V::xor_(V::select_int(odd, V::as_int(c), V::as_int(s)), sin_sign);
  out_cos = V::mul(r, V::as_float(cos_a));
  out_sin = V::mul(r, V::as_float(sin_a));
}

// The normals of blocks [first_block, first_block + n_blocks) into out[0, 4 * n_blocks), n_blocks a
// multiple of V::kBlocks.
template <class V>
inline void philox_normals(uint64_t seed, uint64_t first_block, int64_t n_blocks, float* out) {
  using I = typename V::I;
  uint32_t keys0[10], keys1[10];
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round, k0 += kPhiloxW0, k1 += kPhiloxW1) {
    keys0[round] = k0;
    keys1[round] = k1;
  }
  alignas(64) uint32_t counter_low[V::kBlocks], counter_high[V::kBlocks];
  for (int64_t j = 0; j < n_blocks; j += V::kBlocks, out += 4 * V::kBlocks) {
    for (int l = 0; l < V::kBlocks; ++l) {
      const uint64_t block = first_block + static_cast<uint64_t>(j + l);
      counter_low[l] = static_cast<uint32_t>(block);
      counter_high[l] = static_cast<uint32_t>(block >> 32);
    }
    I c0 = V::load_int(counter_low), c1 = V::load_int(counter_high), c2 = V::set_int(0), c3 = V::set_int(0);
    for (int round = 0; round < 10; ++round) {
      I hi0, lo0, hi1, lo1;
      V::mulhilo(kPhiloxM0, c0, hi0, lo0);
      V::mulhilo(kPhiloxM1, c2, hi1, lo1);
      c0 = V::xor3(hi1, c1, V::set_int(keys0[round]));
      c1 = lo1;
      c2 = V::xor3(hi0, c3, V::set_int(keys1[round]));
      c3 = lo0;
    }
    typename V::F z0, z1, z2, z3;
    box_muller<V>(c0, c1, z0, z1);
    box_muller<V>(c2, c3, z2, z3);
    V::store_interleaved(out, z0, z1, z2, z3);
  }
}

TF_TARGET_AVX512 __attribute__((flatten)) void philox_normals_avx512(uint64_t seed, uint64_t first_block,
                                                                     int64_t n_blocks, float* out) {
  philox_normals<Avx512>(seed, first_block, n_blocks, out);
}

TF_TARGET_AVX2 __attribute__((flatten)) void philox_normals_avx2(uint64_t seed, uint64_t first_block,
                                                                 int64_t n_blocks, float* out) {
  philox_normals<Avx2>(seed, first_block, n_blocks, out);
}

}  // namespace simd
#endif  // TF_X86

// The noise code paths of this build; "auto" picks the widest the CPU runs.
enum class NoiseIsa { kScalar, kAvx2, kAvx512 };

bool cpu_runs(NoiseIsa isa) {
#if TF_X86
  switch (isa) {
    case NoiseIsa::kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
    case NoiseIsa::kAvx2: return __builtin_cpu_supports("avx2");
    default: return true;
  }
#else
  return isa == NoiseIsa::kScalar;
#endif
}

NoiseIsa widest_noise_isa() {
  static const NoiseIsa isa = cpu_runs(NoiseIsa::kAvx512) ? NoiseIsa::kAvx512
                              : cpu_runs(NoiseIsa::kAvx2) ? NoiseIsa::kAvx2
                                                          : NoiseIsa::kScalar;
  return isa;
}

void philox_normals_with(NoiseIsa isa, uint64_t seed, int64_t first, int64_t n, float* buf) {
  const int64_t blocks = (n + 3) / 4, first_block = first / 4;
  int64_t j = 0;
#if TF_X86
  if (isa == NoiseIsa::kAvx512) {
    j = blocks - blocks % simd::Avx512::kBlocks;
    simd::philox_normals_avx512(seed, static_cast<uint64_t>(first_block), j, buf);
  } else if (isa == NoiseIsa::kAvx2) {
    j = blocks - blocks % simd::Avx2::kBlocks;
    simd::philox_normals_avx2(seed, static_cast<uint64_t>(first_block), j, buf);
  }
#endif
  for (; j < blocks; ++j) philox_normal4(seed, static_cast<uint64_t>(first_block + j), buf + 4 * j);
}

void philox_normals_cpu(uint64_t seed, int64_t first, int64_t n, float* buf) {
  philox_normals_with(widest_noise_isa(), seed, first, n, buf);
}

namespace {

// Elements per parallel work item: a multiple of 4 so every Philox block lies in one item, which
// makes the noise independent of how the range is split between threads.
constexpr int64_t kChunk = 1024;

// The float32 work of one chunk [begin, end): x_t = a_row * x0 + b_row * eps with eps[0, end - begin)
// (and eps copied to noise_out when it is not null). A clone per vector width, picked at load time:
// one thread keeps more cache lines in flight with wider loads (the loop is memory bound).
// No FMA in any clone (contraction is off), so every clone gives the reference's bits.
TF_TARGET_CLONES
void q_sample_chunk_f32(int64_t begin, int64_t end, int64_t row_size, const int64_t* t_rows, const double* a_table,
                        const double* b_table, const float* __restrict x0, const float* __restrict eps,
                        float* __restrict noise_out, float* __restrict x_t) {
  for (int64_t i = begin; i < end;) {
    const int64_t row = i / row_size, row_end = std::min(end, (row + 1) * row_size);
    const float a = static_cast<float>(a_table[t_rows[row]]), b = static_cast<float>(b_table[t_rows[row]]);
    const float* row_eps = eps + (i - begin);
    const int64_t n = row_end - i;
    if (noise_out) {
      for (int64_t k = 0; k < n; ++k) noise_out[i + k] = row_eps[k];
    }
    for (int64_t k = 0; k < n; ++k) x_t[i + k] = fadd(fmul(a, x0[i + k]), fmul(b, row_eps[k]));
    i = row_end;
  }
}

template <typename scalar_t, bool GenerateNoise>
void q_sample_cpu_kernel(const at::Tensor& x0, const at::Tensor& timesteps, const at::Tensor& sqrt_ab,
                         const at::Tensor& sqrt_1m_ab, const at::Tensor& noise, const at::Tensor& x_t,
                         uint64_t seed) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t numel = x0.numel(), row_size = x0.numel() / std::max<int64_t>(x0.size(0), 1);
  // contiguous(): an int64 view (t[::2]) is not copied by to(kLong), and the loops read t_rows[row].
  const at::Tensor t64 = timesteps.to(at::kLong).contiguous();
  const at::Tensor a = sqrt_ab.contiguous(), b = sqrt_1m_ab.contiguous();
  const int64_t* t_rows = t64.const_data_ptr<int64_t>();
  const double* a_table = a.const_data_ptr<double>();
  const double* b_table = b.const_data_ptr<double>();
  const int64_t steps = a.size(0);
  for (int64_t r = 0; r < t64.size(0); ++r) {
    TORCH_CHECK(t_rows[r] >= 0 && t_rows[r] < steps, "q_sample: timesteps[", r, "] must be in [0, ", steps,
                "), got ", t_rows[r]);
  }
  const scalar_t* x0_data = x0.const_data_ptr<scalar_t>();
  scalar_t* xt_data = x_t.mutable_data_ptr<scalar_t>();
  scalar_t* noise_data = GenerateNoise ? noise.mutable_data_ptr<scalar_t>() : nullptr;
  const scalar_t* noise_in = GenerateNoise ? nullptr : noise.const_data_ptr<scalar_t>();
  const int64_t chunks = (numel + kChunk - 1) / kChunk;
  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    alignas(64) float buf[kChunk];
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      const int64_t begin = chunk * kChunk, end = std::min(numel, begin + kChunk);
      if (GenerateNoise) philox_normals_cpu(seed, begin, end - begin, buf);
      if constexpr (std::is_same_v<scalar_t, float>) {
        const float* eps = GenerateNoise ? buf : noise_in + begin;
        q_sample_chunk_f32(begin, end, row_size, t_rows, a_table, b_table, x0_data, eps, noise_data, xt_data);
      } else {
        for (int64_t i = begin; i < end;) {
          const int64_t row = i / row_size, row_end = std::min(end, (row + 1) * row_size);
          const opmath_t a = static_cast<opmath_t>(a_table[t_rows[row]]);
          const opmath_t b = static_cast<opmath_t>(b_table[t_rows[row]]);
          for (; i < row_end; ++i) {
            scalar_t eps;
            if constexpr (GenerateNoise) {
              eps = static_cast<scalar_t>(buf[i - begin]);
              noise_data[i] = eps;
            } else {
              eps = noise_in[i];
            }
            xt_data[i] = static_cast<scalar_t>(add_rn(mul_rn(a, static_cast<opmath_t>(x0_data[i])),
                                                      mul_rn(b, static_cast<opmath_t>(eps))));
          }
        }
      }
    }
  });
}

}  // namespace

void check_q_sample_args(const at::Tensor& x0, const at::Tensor& timesteps, const at::Tensor& sqrt_ab,
                         const at::Tensor& sqrt_1m_ab) {
  TORCH_CHECK(x0.dim() >= 1, "q_sample: x0 needs a leading row dimension");
  TORCH_CHECK(timesteps.dim() == 1 && timesteps.size(0) == x0.size(0), "q_sample: timesteps must have shape (",
              x0.size(0), ",), got ", timesteps.sizes());
  TORCH_CHECK(timesteps.scalar_type() == at::kLong || timesteps.scalar_type() == at::kInt,
              "q_sample: timesteps must be int32/int64, got ", timesteps.scalar_type());
  TORCH_CHECK(sqrt_ab.scalar_type() == at::kDouble && sqrt_1m_ab.scalar_type() == at::kDouble &&
                  sqrt_ab.dim() == 1 && sqrt_ab.sizes() == sqrt_1m_ab.sizes(),
              "q_sample: the coefficient tables must be two float64 vectors of one length");
  for (const auto* t : {&timesteps, &sqrt_ab, &sqrt_1m_ab}) {
    TORCH_CHECK(t->device() == x0.device(), "q_sample: all tensors must be on ", x0.device(), ", got ",
                t->device());
  }
}

void check_q_sample_noise(const at::Tensor& x0, const at::Tensor& noise) {
  TORCH_CHECK(noise.sizes() == x0.sizes() && noise.scalar_type() == x0.scalar_type() &&
                  noise.device() == x0.device(),
              "q_sample: noise must match x0 in shape, dtype and device");
}

at::Tensor q_sample_cpu(const at::Tensor& x0_in, const at::Tensor& timesteps, const at::Tensor& sqrt_ab,
                        const at::Tensor& sqrt_1m_ab, const at::Tensor& noise_in) {
  check_q_sample_args(x0_in, timesteps, sqrt_ab, sqrt_1m_ab);
  check_q_sample_noise(x0_in, noise_in);
  const at::Tensor x0 = x0_in.contiguous(), noise = noise_in.contiguous();
  at::Tensor x_t = at::empty_like(x0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x0.scalar_type(), "q_sample_cpu", [&] {
    q_sample_cpu_kernel<scalar_t, false>(x0, timesteps, sqrt_ab, sqrt_1m_ab, noise, x_t, 0);
  });
  return x_t;
}

std::tuple<at::Tensor, at::Tensor> q_sample_philox_cpu(const at::Tensor& x0_in, const at::Tensor& timesteps,
                                                       const at::Tensor& sqrt_ab, const at::Tensor& sqrt_1m_ab,
                                                       int64_t seed) {
  check_q_sample_args(x0_in, timesteps, sqrt_ab, sqrt_1m_ab);
  const at::Tensor x0 = x0_in.contiguous();
  at::Tensor x_t = at::empty_like(x0), noise = at::empty_like(x0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x0.scalar_type(), "q_sample_philox_cpu", [&] {
    q_sample_cpu_kernel<scalar_t, true>(x0, timesteps, sqrt_ab, sqrt_1m_ab, noise, x_t,
                                        static_cast<uint64_t>(seed));
  });
  return {x_t, noise};
}

// Raw Philox 4x32-10 on (N, 4) counters and (N, 2) keys holding uint32 values in int64 tensors:
// exposed for the known-answer tests of the generator that the noise kernels use.
at::Tensor philox4x32_10_cpu(const at::Tensor& counters_in, const at::Tensor& keys_in) {
  TORCH_CHECK(counters_in.dim() == 2 && counters_in.size(1) == 4 && counters_in.scalar_type() == at::kLong,
              "philox4x32_10: counters must be an int64 (N, 4) tensor, got ", counters_in.scalar_type(), " ",
              counters_in.sizes());
  TORCH_CHECK(keys_in.dim() == 2 && keys_in.size(1) == 2 && keys_in.size(0) == counters_in.size(0) &&
                  keys_in.scalar_type() == at::kLong,
              "philox4x32_10: keys must be an int64 (N, 2) tensor with N = ", counters_in.size(0));
  const at::Tensor counters = counters_in.contiguous(), keys = keys_in.contiguous();
  at::Tensor out = at::empty_like(counters);
  const int64_t* c = counters.const_data_ptr<int64_t>();
  const int64_t* k = keys.const_data_ptr<int64_t>();
  int64_t* o = out.mutable_data_ptr<int64_t>();
  for (int64_t n = 0; n < counters.size(0); ++n) {
    uint32_t block[4];
    for (int j = 0; j < 4; ++j) block[j] = static_cast<uint32_t>(c[4 * n + j]);
    philox4x32_10(block, static_cast<uint32_t>(k[2 * n]), static_cast<uint32_t>(k[2 * n + 1]));
    for (int j = 0; j < 4; ++j) o[4 * n + j] = block[j];
  }
  return out;
}

// The CPU noise of flat elements [first, first + numel) through one code path ("auto", "avx512",
// "avx2" or "scalar"): lets the tests assert that every path this CPU runs gives the reference's
// bits, also where the block counter's low word wraps (first near 2^34).
at::Tensor philox_normal_cpu(int64_t seed, int64_t first, int64_t numel, c10::string_view isa_name) {
  const std::pair<c10::string_view, NoiseIsa> names[] = {
      {"auto", widest_noise_isa()}, {"avx512", NoiseIsa::kAvx512}, {"avx2", NoiseIsa::kAvx2}, {"scalar", NoiseIsa::kScalar}};
  const auto* found = std::find_if(std::begin(names), std::end(names), [&](const auto& n) { return n.first == isa_name; });
  TORCH_CHECK(found != std::end(names), "philox_normal: isa must be auto, avx512, avx2 or scalar, got ", isa_name);
  TORCH_CHECK(cpu_runs(found->second), "philox_normal: this CPU does not run the ", isa_name, " code path");
  TORCH_CHECK(numel >= 0, "philox_normal: numel must be >= 0, got ", numel);
  TORCH_CHECK(first >= 0 && first % 4 == 0, "philox_normal: first must be a non-negative multiple of 4, got ", first);
  at::Tensor out = at::empty({(numel + 3) / 4 * 4}, at::kFloat);
  philox_normals_with(found->second, static_cast<uint64_t>(seed), first, numel, out.mutable_data_ptr<float>());
  return out.narrow(0, 0, numel);
}

std::vector<std::string> philox_normal_isas() {
  std::vector<std::string> runnable;
  for (const auto& [name, isa] : {std::pair<const char*, NoiseIsa>{"avx512", NoiseIsa::kAvx512},
                                  {"avx2", NoiseIsa::kAvx2}, {"scalar", NoiseIsa::kScalar}}) {
    if (cpu_runs(isa)) runnable.emplace_back(name);
  }
  return runnable;
}

TORCH_LIBRARY_FRAGMENT(transfusion_fast, m) {
  m.def("q_sample(Tensor x0, Tensor timesteps, Tensor sqrt_alpha_bar, Tensor sqrt_one_minus_alpha_bar, "
        "Tensor noise) -> Tensor");
  m.def("q_sample_philox(Tensor x0, Tensor timesteps, Tensor sqrt_alpha_bar, "
        "Tensor sqrt_one_minus_alpha_bar, int seed) -> (Tensor, Tensor)");
  m.def("philox4x32_10(Tensor counters, Tensor keys) -> Tensor");
  m.def("philox_normal(int seed, int first, int numel, str isa) -> Tensor", &philox_normal_cpu);
  m.def("philox_normal_isas() -> str[]", &philox_normal_isas);
}

TORCH_LIBRARY_IMPL(transfusion_fast, CPU, m) {
  m.impl("q_sample", &q_sample_cpu);
  m.impl("q_sample_philox", &q_sample_philox_cpu);
  m.impl("philox4x32_10", &philox4x32_10_cpu);
}

}  // namespace transfusion_fast
