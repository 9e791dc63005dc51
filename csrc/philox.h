#pragma once
// Device-agnostic math shared by the CPU (C++) and CUDA kernels of the diffusion ops:
//   * Philox 4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011),
//   * Box-Muller normals built only from IEEE-exact operations (+, -, *, sqrt, int<->float), and
//   * the per-row coefficients of the DDPM / DDIM sampler steps and of the flow (Euler / Heun) steps.
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
// The constants of the recipe, shared by the scalar code below and the SIMD versions in noise.cpp.
namespace recipe {
constexpr float kSqrtHalf = static_cast<float>(0.707106781186547524);
// ln(1 + x) = x - x^2/2 + x^3 * P(x), P of degree 8 (Cephes logf), highest coefficient first.
constexpr float kLog8 = static_cast<float>(7.0376836292E-2), kLog7 = static_cast<float>(-1.1514610310E-1),
                kLog6 = static_cast<float>(1.1676998740E-1), kLog5 = static_cast<float>(-1.2420140846E-1),
                kLog4 = static_cast<float>(1.4249322787E-1), kLog3 = static_cast<float>(-1.6668057665E-1),
                kLog2 = static_cast<float>(2.0000714765E-1), kLog1 = static_cast<float>(-2.4999993993E-1),
                kLog0 = static_cast<float>(3.3333331174E-1);
// ln 2 split in a short high part (exact products with small exponents) and a correction.
constexpr float kLn2Low = static_cast<float>(-2.12194440e-4), kLn2High = static_cast<float>(0.693359375);
constexpr float kTwoPowMinus24 = 5.9604644775390625e-8f;
constexpr float kThetaStep = static_cast<float>(3.74507028292216e-07);  // (pi/2) / 2^22
// sin(t) = t + t^3 * S(t^2), cos(t) = 1 - t^2/2 + t^4 * C(t^2) on |t| < pi/4 (Cephes sinf / cosf).
constexpr float kSin2 = static_cast<float>(-1.9515295891E-4), kSin1 = static_cast<float>(8.3321608736E-3),
                kSin0 = static_cast<float>(-1.6666654611E-1);
constexpr float kCos2 = static_cast<float>(2.443315711809948E-5), kCos1 = static_cast<float>(-1.388731625493765E-3),
                kCos0 = static_cast<float>(4.166664568298827E-2);
}  // namespace recipe

// ln(u) for a normal float u in (0, 1]: u = 2^e * m, m in [sqrt(1/2), sqrt(2)), Cephes logf.
TF_HD float log_unit(float u) {
  using namespace recipe;
  const uint32_t bits = float_bits(u);
  int32_t e = static_cast<int32_t>((bits >> 23) & 0xFFu) - 126;
  float m = bits_float((bits & 0x007FFFFFu) | 0x3F000000u);  // [0.5, 1)
  const bool low = m < kSqrtHalf;
  e -= low ? 1 : 0;
  float x = fadd(low ? fadd(m, m) : m, -1.0f);
  const float z = fmul(x, x);
  float y = kLog8;
  y = fadd(fmul(y, x), kLog7);
  y = fadd(fmul(y, x), kLog6);
  y = fadd(fmul(y, x), kLog5);
  y = fadd(fmul(y, x), kLog4);
  y = fadd(fmul(y, x), kLog3);
  y = fadd(fmul(y, x), kLog2);
  y = fadd(fmul(y, x), kLog1);
  y = fadd(fmul(y, x), kLog0);
  y = fmul(fmul(y, x), z);
  const float fe = static_cast<float>(e);
  y = fadd(y, fmul(kLn2Low, fe));
  y = fadd(y, fmul(-0.5f, z));
  x = fadd(x, y);
  return fadd(x, fmul(kLn2High, fe));
}

// (r cos a, r sin a) from two uniform words: r = sqrt(-2 ln u1) with u1 = (w1 >> 8 + 1) / 2^24 in
// (0, 1]; the angle a = q * pi/2 + theta, q the top two bits of the 24 kept bits of w2 and theta
// uniform in (-pi/4, pi/4) from the other 22, so sin/cos only ever see |theta| < pi/4.
TF_HD void box_muller(uint32_t w1, uint32_t w2, float& out_cos, float& out_sin) {
  using namespace recipe;
  const float u1 = fmul(static_cast<float>(static_cast<int32_t>(w1 >> 8) + 1), kTwoPowMinus24);
  const float r = fsqrt(fmul(-2.0f, log_unit(u1)));
  const uint32_t m2 = w2 >> 8;
  const uint32_t quadrant = m2 >> 22;
  const float centered = fadd(static_cast<float>(static_cast<int32_t>(m2 & 0x3FFFFFu) - 0x200000), 0.5f);
  const float theta = fmul(centered, kThetaStep);
  const float z = fmul(theta, theta);
  float sp = kSin2;
  sp = fadd(fmul(sp, z), kSin1);
  sp = fadd(fmul(sp, z), kSin0);
  const float s = fadd(theta, fmul(fmul(theta, z), sp));
  float cp = kCos2;
  cp = fadd(fmul(cp, z), kCos1);
  cp = fadd(fmul(cp, z), kCos0);
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
// Fills buf with the normals of flat elements [first, first + n), rounded up to whole Philox blocks
// (buf must hold 4 * ceil(n / 4) floats); first % 4 == 0. Defined in noise.cpp: AVX-512 / AVX2
// versions of the recipe above, picked by CPU feature at run time, with this scalar code as the
// fallback and for the tail; every version gives the same bits.
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
  // eta = 0 draws no noise whatever the variance: with alpha_bar_t = alpha_bar_prev = 0 (a table
  // that reaches 0 before its last step) it is 0/0 = NaN, and 0 * NaN would ask for noise.
  const double std_dev = eta == 0.0 ? 0.0 : dmul(eta, dsqrt(variance));
  const double direction_sq = dadd(beta_bar_prev, -dmul(std_dev, std_dev));
  const double direction = dsqrt(direction_sq > 0.0 ? direction_sq : 0.0);
  const double sap = dsqrt(alpha_bar_prev);
  const PredictionMap pm = prediction_map(prediction, alpha_bar_t);
  return {dadd(dmul(sap, pm.px), dmul(direction, pm.ex)), dadd(dmul(sap, pm.pm), dmul(direction, pm.em)),
          std_dev};
}

// Rectified-flow ODE steps from t to t_next (t = 1 noise, t = 0 data; h = t_next - t < 0), linear
// like the steps above with the velocity v (the CFG-combined model output) in the model slot:
//   Euler:          x_next = x + h * v(x, t)
//   Heun corrector: x_next = x / 2 + x_pred / 2 + h / 2 * v(x_pred, t_next), with x_pred the Euler
//                   predictor x + h * v(x, t) in the noise slot. This is x + h / 2 * (v(x, t) +
//                   v(x_pred, t_next)) without the first velocity: the caller keeps x_pred only.
TF_HD StepCoefficients flow_coefficients(bool heun, double t, double t_next) {
  const double h = dadd(t_next, -t);
  if (!heun) return {1.0, h, 0.0};
  return {0.5, dmul(0.5, h), 0.5};
}

}  // namespace transfusion_fast
