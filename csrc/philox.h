#pragma once
// Device-agnostic math shared by the CPU (C++) and CUDA kernels of the diffusion ops:
//   * Philox 4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011),
//   * Box-Muller normals built only from IEEE-exact operations (+, -, *, sqrt, int<->float), and
//   * the per-row coefficients of the DDPM / DDIM sampler steps.
//
// Bit-identical CPU and CUDA results are the point of this header, so:
//   * every float operation is one correctly rounded IEEE operation: on the device through the
//     __fmul_rn / __fadd_rn / __fsqrt_rn intrinsics (immune to --use_fast_math and FMA contraction),
//     on the host with FMA contraction switched off below;
//   * log, sin and cos are our own polynomials (Cephes logf / sinf / cosf minimax coefficients),
//     not libm / CUDA math, whose last-bit rounding differs between the two;
//   * float constants are written as double literals cast to float, the same double rounding that
//     the Python reference twin (transfusion_fast/ops/noise.py) gets from float(...) -> float32.
//
// The noise of element i (flat row-major index) under seed s: Philox block g = i / 4 with
// key = (s mod 2^32, s / 2^32) and counter = (g mod 2^32, g / 2^32, 0, 0) gives 4 uint32 words;
// words (0, 1) become lanes 0 and 1 (r cos, r sin), words (2, 3) lanes 2 and 3.
#include <cstdint>
#include <cstring>
#if !defined(__CUDACC__) && defined(__SSE__)
#include <xmmintrin.h>
#endif

#if defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#pragma GCC optimize("fp-contract=off", "no-math-errno")
#elif defined(__clang__) && !defined(__CUDACC__)
#pragma clang fp contract(off)
#endif

#ifdef __CUDACC__
#define TF_HD __host__ __device__ __forceinline__
#define TF_UNROLL _Pragma("unroll")
#else
#define TF_HD inline
#define TF_UNROLL _Pragma("GCC unroll 10")
#endif

namespace transfusion_fast {

// ------------------------------------------------------------------ exact float primitives
TF_HD float fmul(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
TF_HD float fadd(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
TF_HD float fsqrt(float a) {
#ifdef __CUDA_ARCH__
  return __fsqrt_rn(a);
#else
  return __builtin_sqrtf(a);
#endif
}
TF_HD double dmul(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
TF_HD double dadd(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}
TF_HD double ddiv(double a, double b) {
#ifdef __CUDA_ARCH__
  return __ddiv_rn(a, b);
#else
  return a / b;
#endif
}
TF_HD double dsqrt(double a) {
#ifdef __CUDA_ARCH__
  return __dsqrt_rn(a);
#else
  return __builtin_sqrt(a);
#endif
}
// Overloads for the compute type of a kernel (float for fp16/bf16/fp32 data, double for fp64).
TF_HD float mul_rn(float a, float b) { return fmul(a, b); }
TF_HD float add_rn(float a, float b) { return fadd(a, b); }
TF_HD double mul_rn(double a, double b) { return dmul(a, b); }
TF_HD double add_rn(double a, double b) { return dadd(a, b); }

TF_HD uint32_t float_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}
TF_HD float bits_float(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

// ------------------------------------------------------------------ Philox 4x32-10
constexpr uint32_t kPhiloxM0 = 0xD2511F53u, kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;

TF_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#ifdef __CUDA_ARCH__
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Ten rounds on counter c with key (k0, k1); the result replaces c.
TF_HD void philox4x32_10(uint32_t c[4], uint32_t k0, uint32_t k1) {
TF_UNROLL
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = mulhi32(kPhiloxM0, c[0]), lo0 = kPhiloxM0 * c[0];
    const uint32_t hi1 = mulhi32(kPhiloxM1, c[2]), lo1 = kPhiloxM1 * c[2];
    const uint32_t n0 = hi1 ^ c[1] ^ k0, n2 = hi0 ^ c[3] ^ k1;
    c[0] = n0; c[1] = lo1; c[2] = n2; c[3] = lo0;
    k0 += kPhiloxW0; k1 += kPhiloxW1;
  }
}

// ------------------------------------------------------------------ Box-Muller
// ln(u) for a normal float u in (0, 1]: u = 2^e * m, m in [sqrt(1/2), sqrt(2)), Cephes logf.
TF_HD float log_unit(float u) {
  const uint32_t bits = float_bits(u);
  int32_t e = static_cast<int32_t>((bits >> 23) & 0xFFu) - 126;
  float m = bits_float((bits & 0x007FFFFFu) | 0x3F000000u);  // [0.5, 1)
  const bool low = m < static_cast<float>(0.707106781186547524);
  e -= low ? 1 : 0;
  float x = fadd(low ? fadd(m, m) : m, -1.0f);
  const float z = fmul(x, x);
  float y = static_cast<float>(7.0376836292E-2);
  y = fadd(fmul(y, x), static_cast<float>(-1.1514610310E-1));
  y = fadd(fmul(y, x), static_cast<float>(1.1676998740E-1));
  y = fadd(fmul(y, x), static_cast<float>(-1.2420140846E-1));
  y = fadd(fmul(y, x), static_cast<float>(1.4249322787E-1));
  y = fadd(fmul(y, x), static_cast<float>(-1.6668057665E-1));
  y = fadd(fmul(y, x), static_cast<float>(2.0000714765E-1));
  y = fadd(fmul(y, x), static_cast<float>(-2.4999993993E-1));
  y = fadd(fmul(y, x), static_cast<float>(3.3333331174E-1));
  y = fmul(fmul(y, x), z);
  const float fe = static_cast<float>(e);
  y = fadd(y, fmul(static_cast<float>(-2.12194440e-4), fe));
  y = fadd(y, fmul(-0.5f, z));
  x = fadd(x, y);
  return fadd(x, fmul(static_cast<float>(0.693359375), fe));
}

// (r cos a, r sin a) from two uniform words: r = sqrt(-2 ln u1) with u1 = (w1 >> 8 + 1) / 2^24 in
// (0, 1]; the angle a = q * pi/2 + theta, q the top two bits of the 24 kept bits of w2 and theta
// uniform in (-pi/4, pi/4) from the other 22, so sin/cos only ever see |theta| < pi/4.
TF_HD void box_muller(uint32_t w1, uint32_t w2, float& out_cos, float& out_sin) {
  const float u1 = fmul(static_cast<float>(static_cast<int32_t>(w1 >> 8) + 1), 5.9604644775390625e-8f);
  const float r = fsqrt(fmul(-2.0f, log_unit(u1)));
  const uint32_t m2 = w2 >> 8;
  const uint32_t quadrant = m2 >> 22;
  const float centered = fadd(static_cast<float>(static_cast<int32_t>(m2 & 0x3FFFFFu) - 0x200000), 0.5f);
  const float theta = fmul(centered, static_cast<float>(3.74507028292216e-07));  // (pi/2) / 2^22
  const float z = fmul(theta, theta);
  float sp = static_cast<float>(-1.9515295891E-4);
  sp = fadd(fmul(sp, z), static_cast<float>(8.3321608736E-3));
  sp = fadd(fmul(sp, z), static_cast<float>(-1.6666654611E-1));
  const float s = fadd(theta, fmul(fmul(theta, z), sp));
  float cp = static_cast<float>(2.443315711809948E-5);
  cp = fadd(fmul(cp, z), static_cast<float>(-1.388731625493765E-3));
  cp = fadd(fmul(cp, z), static_cast<float>(4.166664568298827E-2));
  const float c = fadd(fadd(1.0f, fmul(-0.5f, z)), fmul(fmul(z, z), cp));
  // Rotation by quadrant * 90 degrees: swaps and sign flips only, no rounding.
  const float cos_a = quadrant == 0 ? c : quadrant == 1 ? -s : quadrant == 2 ? -c : s;
  const float sin_a = quadrant == 0 ? s : quadrant == 1 ? c : quadrant == 2 ? -s : -c;
  out_cos = fmul(r, cos_a);
  out_sin = fmul(r, sin_a);
}

// The four standard normals of Philox block `block` under `seed` (see the header comment).
TF_HD void philox_normal4(uint64_t seed, uint64_t block, float out[4]) {
  uint32_t c[4] = {static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32), 0u, 0u};
  philox4x32_10(c, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  box_muller(c[0], c[1], out[0], out[1]);
  box_muller(c[2], c[3], out[2], out[3]);
}

#if !defined(__CUDACC__)
// ------------------------------------------------------------------ CPU lanes of the same recipe
// philox_normal4 for kLanes consecutive blocks at once, written with GCC vector extensions so the
// CPU kernels run it in SIMD registers. Operation for operation the scalar code above (the tests
// assert bit equality with the reference twin, which mirrors the scalar code).
// Casts between these same-size vector types reinterpret the bits (GCC vector extensions).
// Every function here is always_inline, so the 32-byte-vector calling convention never applies
// (GCC still warns about it, at the definitions and at the SIMD-clone callers: silenced).
#pragma GCC diagnostic ignored "-Wpsabi"
namespace lanes {
constexpr int kLanes = 8;
typedef uint32_t U32 __attribute__((vector_size(4 * kLanes)));
typedef int32_t I32 __attribute__((vector_size(4 * kLanes)));
typedef float F32 __attribute__((vector_size(4 * kLanes)));
typedef uint64_t U64 __attribute__((vector_size(8 * kLanes)));

inline __attribute__((always_inline)) U32 mulhi32(uint32_t m, U32 a) {
  return __builtin_convertvector((__builtin_convertvector(a, U64) * static_cast<uint64_t>(m)) >> 32, U32);
}

inline __attribute__((always_inline)) F32 log_unit(F32 u) {
  const U32 bits = (U32)u;
  I32 e = (I32)((bits >> 23) & 0xFFu) - 126;
  U32 mantissa_bits = (bits & 0x007FFFFFu) | 0x3F000000u;
  const F32 m = (F32)mantissa_bits;
  const I32 low = m < static_cast<float>(0.707106781186547524);  // -1 (true) or 0
  e += low;
  F32 x = (low ? m + m : m) - 1.0f;
  const F32 z = x * x;
  F32 y = x * static_cast<float>(7.0376836292E-2) + static_cast<float>(-1.1514610310E-1);
  y = y * x + static_cast<float>(1.1676998740E-1);
  y = y * x + static_cast<float>(-1.2420140846E-1);
  y = y * x + static_cast<float>(1.4249322787E-1);
  y = y * x + static_cast<float>(-1.6668057665E-1);
  y = y * x + static_cast<float>(2.0000714765E-1);
  y = y * x + static_cast<float>(-2.4999993993E-1);
  y = y * x + static_cast<float>(3.3333331174E-1);
  y = (y * x) * z;
  const F32 fe = __builtin_convertvector(e, F32);
  y = y + static_cast<float>(-2.12194440e-4) * fe;
  y = y + -0.5f * z;
  x = x + y;
  return x + static_cast<float>(0.693359375) * fe;
}

inline __attribute__((always_inline)) void box_muller(U32 w1, U32 w2, F32& out_cos, F32& out_sin) {
  const F32 u1 = __builtin_convertvector((I32)(w1 >> 8) + 1, F32) * 5.9604644775390625e-8f;
  const F32 r_squared = -2.0f * log_unit(u1);
  F32 r;
#if defined(__SSE__)
  // sqrtps (correctly rounded, like sqrtf): GCC would keep a scalar errno-checking sqrtf per lane.
  alignas(32) float lane_values[kLanes];
  __builtin_memcpy(lane_values, &r_squared, sizeof r_squared);
  for (int l = 0; l < kLanes; l += 4) _mm_store_ps(lane_values + l, _mm_sqrt_ps(_mm_load_ps(lane_values + l)));
  __builtin_memcpy(&r, lane_values, sizeof r);
#else
  for (int l = 0; l < kLanes; ++l) r[l] = __builtin_sqrtf(r_squared[l]);
#endif
  const U32 m2 = w2 >> 8;
  const U32 quadrant = m2 >> 22;
  const F32 centered = __builtin_convertvector((I32)(m2 & 0x3FFFFFu) - 0x200000, F32) + 0.5f;
  const F32 theta = centered * static_cast<float>(3.74507028292216e-07);
  const F32 z = theta * theta;
  F32 sp = static_cast<float>(-1.9515295891E-4) * z + static_cast<float>(8.3321608736E-3);
  sp = sp * z + static_cast<float>(-1.6666654611E-1);
  const F32 s = theta + (theta * z) * sp;
  F32 cp = static_cast<float>(2.443315711809948E-5) * z + static_cast<float>(-1.388731625493765E-3);
  cp = cp * z + static_cast<float>(4.166664568298827E-2);
  const F32 c = (1.0f + -0.5f * z) + (z * z) * cp;
  const F32 cos_a = quadrant == 0 ? c : quadrant == 1 ? -s : quadrant == 2 ? -c : s;
  const F32 sin_a = quadrant == 0 ? s : quadrant == 1 ? c : quadrant == 2 ? -s : -c;
  out_cos = r * cos_a;
  out_sin = r * sin_a;
}

// The normals of blocks [first_block, first_block + kLanes) into out[0, 4 * kLanes).
inline __attribute__((always_inline)) void philox_normal4(uint64_t seed, uint64_t first_block, float* out) {
  U32 c0, c1, c2 = {}, c3 = {};
  for (int l = 0; l < kLanes; ++l) {
    c0[l] = static_cast<uint32_t>(first_block + l);
    c1[l] = static_cast<uint32_t>((first_block + l) >> 32);
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const U32 hi0 = mulhi32(kPhiloxM0, c0), lo0 = c0 * kPhiloxM0;
    const U32 hi1 = mulhi32(kPhiloxM1, c2), lo1 = c2 * kPhiloxM1;
    c0 = hi1 ^ c1 ^ k0; c1 = lo1; c2 = hi0 ^ c3 ^ k1; c3 = lo0;
    k0 += kPhiloxW0; k1 += kPhiloxW1;
  }
  F32 z0, z1, z2, z3;
  box_muller(c0, c1, z0, z1);
  box_muller(c2, c3, z2, z3);
  for (int l = 0; l < kLanes; ++l) {
    out[4 * l] = z0[l]; out[4 * l + 1] = z1[l]; out[4 * l + 2] = z2[l]; out[4 * l + 3] = z3[l];
  }
}
}  // namespace lanes

// Fills buf with the normals of flat elements [first, first + n), rounded up to whole Philox blocks
// (buf must hold 4 * ceil(n / 4) floats); first % 4 == 0. Defined in noise.cpp (SIMD clones).
void philox_normals_cpu(uint64_t seed, int64_t first, int64_t n, float* buf);
#endif

// ------------------------------------------------------------------ sampler step coefficients
// Both sampler steps are linear in the step inputs: x_prev = x * x_t + model * out + noise * z,
// where out is the (CFG-combined) model output. Computed in double per row.
enum Prediction : int64_t { kPredictEps = 0, kPredictX0 = 1, kPredictV = 2 };

struct StepCoefficients {
  double x, model, noise;
};

// pred_x0 = px * x_t + pm * out and pred_eps = ex * x_t + em * out for each prediction type.
struct PredictionMap {
  double px, pm, ex, em;
};

TF_HD PredictionMap prediction_map(int64_t prediction, double alpha_bar) {
  const double sa = dsqrt(alpha_bar), sb = dsqrt(dadd(1.0, -alpha_bar));
  if (prediction == kPredictEps) return {ddiv(1.0, sa), -ddiv(sb, sa), 0.0, 1.0};
  if (prediction == kPredictX0) return {0.0, 1.0, ddiv(1.0, sb), -ddiv(sa, sb)};
  return {sa, -sb, sb, sa};  // v = sa * eps - sb * x0
}

// DDPM ancestral step from t to t_prev (t_prev < 0: to x0), "fixed_small" posterior variance,
// no clipping; the variance is clamped at 1e-20 and only drawn for t > 0, as in diffusers.
TF_HD StepCoefficients ddpm_coefficients(int64_t prediction, int64_t t, double alpha_bar_t,
                                         double alpha_bar_prev) {
  const double beta_bar_t = dadd(1.0, -alpha_bar_t), beta_bar_prev = dadd(1.0, -alpha_bar_prev);
  const double alpha_t = ddiv(alpha_bar_t, alpha_bar_prev), beta_t = dadd(1.0, -alpha_t);
  const double c_x0 = ddiv(dmul(dsqrt(alpha_bar_prev), beta_t), beta_bar_t);
  const double c_xt = ddiv(dmul(dsqrt(alpha_t), beta_bar_prev), beta_bar_t);
  const PredictionMap pm = prediction_map(prediction, alpha_bar_t);
  double variance = dmul(ddiv(beta_bar_prev, beta_bar_t), beta_t);
  variance = variance < 1e-20 ? 1e-20 : variance;
  return {dadd(dmul(c_x0, pm.px), c_xt), dmul(c_x0, pm.pm), t > 0 ? dsqrt(variance) : 0.0};
}

// DDIM step (Song et al. 2021) with stochasticity eta; alpha_bar_prev = 1 for the final step.
TF_HD StepCoefficients ddim_coefficients(int64_t prediction, double eta, double alpha_bar_t,
                                         double alpha_bar_prev) {
  const double beta_bar_t = dadd(1.0, -alpha_bar_t), beta_bar_prev = dadd(1.0, -alpha_bar_prev);
  const double variance = dmul(ddiv(beta_bar_prev, beta_bar_t), dadd(1.0, -ddiv(alpha_bar_t, alpha_bar_prev)));
  const double std_dev = dmul(eta, dsqrt(variance));
  const double direction_sq = dadd(beta_bar_prev, -dmul(std_dev, std_dev));
  const double direction = dsqrt(direction_sq > 0.0 ? direction_sq : 0.0);
  const double sap = dsqrt(alpha_bar_prev);
  const PredictionMap pm = prediction_map(prediction, alpha_bar_t);
  return {dadd(dmul(sap, pm.px), dmul(direction, pm.ex)), dadd(dmul(sap, pm.pm), dmul(direction, pm.em)),
          std_dev};
}

}  // namespace transfusion_fast
