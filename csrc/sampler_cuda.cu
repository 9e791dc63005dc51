// DDPM / DDIM and flow (Euler / Heun) sampler steps: CUDA kernels. A one-thread-per-row kernel
// computes the step coefficients (philox.h, in double, the same code as the CPU op), then one thread
// per Philox block of 4 elements does CFG combine + step + noise (for Heun: + the predictor point).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/types.h>

#include "philox.h"

namespace transfusion_fast {

void check_step_args(const at::Tensor& x_t, const at::Tensor& model_out, const std::optional<at::Tensor>& uncond_out,
                     const at::Tensor& t, const at::Tensor& t_prev, const at::Tensor& alphas_cumprod,
                     int64_t prediction, const std::optional<at::Tensor>& noise);
void check_flow_step_args(const at::Tensor& x_t, const std::optional<at::Tensor>& x_pred, const at::Tensor& model_out,
                          const std::optional<at::Tensor>& uncond_out, const at::Tensor& t, const at::Tensor& t_next);

// Kernels stay outside anonymous namespaces: nvcc's host stubs for templated kernels fail there.

constexpr int kThreads = 256;

// Rows whose t or t_prev is out of range get NaN coefficients (the Python front rejects them first;
// this keeps a bad direct call from reading outside the table).
__global__ void step_coefficients_kernel(bool ddpm, int64_t prediction, double eta, const int64_t* t,
                                         const int64_t* t_prev, const double* alpha_bar, int64_t steps,
                                         int64_t rows, double* coefficients) {
  const int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (r >= rows) return;
  StepCoefficients c;
  if (t[r] < 0 || t[r] >= steps || t_prev[r] < -1 || t_prev[r] >= t[r]) {
    const double nan = __longlong_as_double(0x7ff8000000000000LL);
    c = {nan, nan, nan};
  } else {
    const double ab_t = alpha_bar[t[r]], ab_prev = t_prev[r] >= 0 ? alpha_bar[t_prev[r]] : 1.0;
    c = ddpm ? ddpm_coefficients(prediction, t[r], ab_t, ab_prev) : ddim_coefficients(prediction, eta, ab_t, ab_prev);
  }
  coefficients[3 * r] = c.x;
  coefficients[3 * r + 1] = c.model;
  coefficients[3 * r + 2] = c.noise;
}

// Rows outside 0 <= t_next < t <= 1 (or with NaN) get NaN coefficients, as above.
__global__ void flow_coefficients_kernel(bool heun, const double* t, const double* t_next, int64_t rows,
                                         double* coefficients) {
  const int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (r >= rows) return;
  StepCoefficients c;
  if (!(t_next[r] >= 0.0 && t_next[r] < t[r] && t[r] <= 1.0)) {
    const double nan = __longlong_as_double(0x7ff8000000000000LL);
    c = {nan, nan, nan};
  } else {
    c = flow_coefficients(heun, t[r], t_next[r]);
  }
  coefficients[3 * r] = c.x;
  coefficients[3 * r + 1] = c.model;
  coefficients[3 * r + 2] = c.noise;
}

template <typename scalar_t>
__global__ void step_kernel(const double* __restrict__ coefficients, const scalar_t* __restrict__ x,
                            const scalar_t* __restrict__ cond, const scalar_t* __restrict__ uncond, double cfg_scale,
                            const scalar_t* __restrict__ given_noise, bool generate_noise, uint64_t seed,
                            scalar_t* __restrict__ result, int64_t numel, int64_t row_size) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t scale = static_cast<opmath_t>(cfg_scale);
  const int64_t blocks = (numel + 3) / 4;
  for (int64_t block = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; block < blocks;
       block += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float z[4] = {0.f, 0.f, 0.f, 0.f};
    bool generated = false;
#pragma unroll
    for (int lane = 0; lane < 4; ++lane) {
      const int64_t i = block * 4 + lane;
      if (i >= numel) break;
      const double* c = coefficients + 3 * (i / row_size);
      opmath_t m = static_cast<opmath_t>(cond[i]);
      if (uncond) {
        const opmath_t u = static_cast<opmath_t>(uncond[i]);
        m = add_rn(u, mul_rn(scale, add_rn(m, -u)));
      }
      opmath_t value = add_rn(mul_rn(static_cast<opmath_t>(c[0]), static_cast<opmath_t>(x[i])),
                              mul_rn(static_cast<opmath_t>(c[1]), m));
      if (c[2] != 0.0) {
        scalar_t noise;
        if (given_noise) {
          noise = given_noise[i];
        } else {
          if (!generated) {
            philox_normal4(seed, static_cast<uint64_t>(block), z);
            generated = true;
          }
          noise = static_cast<scalar_t>(z[lane]);
        }
        value = add_rn(value, mul_rn(static_cast<opmath_t>(c[2]), static_cast<opmath_t>(noise)));
      }
      result[i] = static_cast<scalar_t>(value);
    }
  }
}

static at::Tensor sampler_step_cuda(bool ddpm, const at::Tensor& x_t_in, const at::Tensor& model_out_in,
                             const std::optional<at::Tensor>& uncond_in, const at::Tensor& t_in,
                             const at::Tensor& t_prev_in, const at::Tensor& alphas_cumprod, int64_t prediction,
                             double eta, double cfg_scale, const std::optional<at::Tensor>& noise_in,
                             std::optional<int64_t> seed) {
  c10::cuda::CUDAGuard guard(x_t_in.device());
  check_step_args(x_t_in, model_out_in, uncond_in, t_in, t_prev_in, alphas_cumprod, prediction, noise_in);
  TORCH_CHECK(noise_in || seed || (!ddpm && eta == 0.0), "sampler step: this step draws noise: give noise or a seed");
  const at::Tensor x_t = x_t_in.contiguous(), model_out = model_out_in.contiguous();
  const at::Tensor t = t_in.to(at::kLong).contiguous(), t_prev = t_prev_in.to(at::kLong).contiguous();
  const at::Tensor table = alphas_cumprod.contiguous();
  const int64_t rows = x_t.size(0), numel = x_t.numel();
  at::Tensor out = at::empty_like(x_t);
  if (numel == 0) return out;
  at::Tensor uncond, noise;
  if (uncond_in) uncond = uncond_in->contiguous();
  if (noise_in) noise = noise_in->contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor coefficients = at::empty({rows, 3}, x_t.options().dtype(at::kDouble));
  step_coefficients_kernel<<<(rows + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
      ddpm, prediction, eta, t.const_data_ptr<int64_t>(), t_prev.const_data_ptr<int64_t>(),
      table.const_data_ptr<double>(), table.size(0), rows, coefficients.mutable_data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t grid = std::max<int64_t>(1, std::min<int64_t>(((numel + 3) / 4 + kThreads - 1) / kThreads, 65535 * 8));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_t.scalar_type(), "sampler_step_cuda", [&] {
    step_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        coefficients.const_data_ptr<double>(), x_t.const_data_ptr<scalar_t>(), model_out.const_data_ptr<scalar_t>(),
        uncond_in ? uncond.const_data_ptr<scalar_t>() : nullptr, cfg_scale,
        noise_in ? noise.const_data_ptr<scalar_t>() : nullptr, !noise_in, seed ? static_cast<uint64_t>(*seed) : 0,
        out.mutable_data_ptr<scalar_t>(), numel, numel / rows);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// Euler (x_pred absent) or Heun corrector (x_pred given, in the noise slot) step from t to t_next.
static at::Tensor flow_step_cuda(const at::Tensor& x_t_in, const std::optional<at::Tensor>& x_pred_in,
                                 const at::Tensor& model_out_in, const std::optional<at::Tensor>& uncond_in,
                                 const at::Tensor& t_in, const at::Tensor& t_next_in, double cfg_scale) {
  c10::cuda::CUDAGuard guard(x_t_in.device());
  check_flow_step_args(x_t_in, x_pred_in, model_out_in, uncond_in, t_in, t_next_in);
  const at::Tensor x_t = x_t_in.contiguous(), model_out = model_out_in.contiguous();
  const at::Tensor t = t_in.to(at::kDouble).contiguous(), t_next = t_next_in.to(at::kDouble).contiguous();
  const int64_t rows = x_t.size(0), numel = x_t.numel();
  at::Tensor out = at::empty_like(x_t);
  if (numel == 0) return out;
  at::Tensor uncond, x_pred;
  if (uncond_in) uncond = uncond_in->contiguous();
  if (x_pred_in) x_pred = x_pred_in->contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor coefficients = at::empty({rows, 3}, x_t.options().dtype(at::kDouble));
  flow_coefficients_kernel<<<(rows + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
      x_pred_in.has_value(), t.const_data_ptr<double>(), t_next.const_data_ptr<double>(), rows,
      coefficients.mutable_data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t grid = std::max<int64_t>(1, std::min<int64_t>(((numel + 3) / 4 + kThreads - 1) / kThreads, 65535 * 8));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_t.scalar_type(), "flow_step_cuda", [&] {
    step_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        coefficients.const_data_ptr<double>(), x_t.const_data_ptr<scalar_t>(), model_out.const_data_ptr<scalar_t>(),
        uncond_in ? uncond.const_data_ptr<scalar_t>() : nullptr, cfg_scale,
        x_pred_in ? x_pred.const_data_ptr<scalar_t>() : nullptr, false, 0, out.mutable_data_ptr<scalar_t>(), numel,
        numel / rows);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor euler_step_cuda(const at::Tensor& x_t, const at::Tensor& model_out,
                           const std::optional<at::Tensor>& uncond_out, const at::Tensor& t, const at::Tensor& t_next,
                           double cfg_scale) {
  return flow_step_cuda(x_t, std::nullopt, model_out, uncond_out, t, t_next, cfg_scale);
}

at::Tensor heun_step_cuda(const at::Tensor& x_t, const at::Tensor& x_pred, const at::Tensor& model_out,
                          const std::optional<at::Tensor>& uncond_out, const at::Tensor& t, const at::Tensor& t_next,
                          double cfg_scale) {
  return flow_step_cuda(x_t, x_pred, model_out, uncond_out, t, t_next, cfg_scale);
}

at::Tensor ddpm_step_cuda(const at::Tensor& x_t, const at::Tensor& model_out, const std::optional<at::Tensor>& uncond_out,
                          const at::Tensor& t, const at::Tensor& t_prev, const at::Tensor& alphas_cumprod,
                          int64_t prediction, double cfg_scale, const std::optional<at::Tensor>& noise,
                          std::optional<int64_t> seed) {
  return sampler_step_cuda(true, x_t, model_out, uncond_out, t, t_prev, alphas_cumprod, prediction, 0.0, cfg_scale,
                           noise, seed);
}

at::Tensor ddim_step_cuda(const at::Tensor& x_t, const at::Tensor& model_out, const std::optional<at::Tensor>& uncond_out,
                          const at::Tensor& t, const at::Tensor& t_prev, const at::Tensor& alphas_cumprod,
                          int64_t prediction, double eta, double cfg_scale, const std::optional<at::Tensor>& noise,
                          std::optional<int64_t> seed) {
  return sampler_step_cuda(false, x_t, model_out, uncond_out, t, t_prev, alphas_cumprod, prediction, eta, cfg_scale,
                           noise, seed);
}

TORCH_LIBRARY_IMPL(transfusion_fast, CUDA, m) {
  m.impl("ddpm_step", &ddpm_step_cuda);
  m.impl("ddim_step", &ddim_step_cuda);
  m.impl("euler_step", &euler_step_cuda);
  m.impl("heun_step", &heun_step_cuda);
}

}  // namespace transfusion_fast
