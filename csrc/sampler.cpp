// DDPM ancestral and DDIM sampler steps, each one fused pass: classifier-free guidance combine,
// prediction-type conversion, the step itself and (when the step is stochastic) Philox noise.
// The rectified-flow ODE steps (Euler, and Heun's corrector) run through the same pass: they are
// linear in (x_t, guided velocity, predictor point) too. Schemas and CPU kernels; the per-row
// coefficient math lives in philox.h, shared with CUDA.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <type_traits>
#include <vector>

#include "isa.h"
#include "philox.h"

namespace transfusion_fast {

enum class StepKind { kDDPM, kDDIM };

// Validation shared with the CUDA kernels (the Python fronts check the same with clearer messages).
void check_step_args(const at::Tensor& x_t, const at::Tensor& model_out, const std::optional<at::Tensor>& uncond_out,
                     const at::Tensor& t, const at::Tensor& t_prev, const at::Tensor& alphas_cumprod,
                     int64_t prediction, const std::optional<at::Tensor>& noise) {
  TORCH_CHECK(x_t.dim() >= 1, "sampler step: x_t needs a leading row dimension");
  TORCH_CHECK(model_out.sizes() == x_t.sizes() && model_out.scalar_type() == x_t.scalar_type(),
              "sampler step: model_out must match x_t in shape and dtype");
  TORCH_CHECK(!uncond_out || (uncond_out->sizes() == x_t.sizes() && uncond_out->scalar_type() == x_t.scalar_type()),
              "sampler step: uncond_out must match x_t in shape and dtype");
  TORCH_CHECK(!noise || (noise->sizes() == x_t.sizes() && noise->scalar_type() == x_t.scalar_type()),
              "sampler step: noise must match x_t in shape and dtype");
  for (const auto* steps : {&t, &t_prev}) {
    TORCH_CHECK(steps->dim() == 1 && steps->size(0) == x_t.size(0) &&
                    (steps->scalar_type() == at::kLong || steps->scalar_type() == at::kInt),
                "sampler step: t and t_prev must be int32/int64 tensors of shape (", x_t.size(0), ",)");
  }
  TORCH_CHECK(alphas_cumprod.dim() == 1 && alphas_cumprod.scalar_type() == at::kDouble,
              "sampler step: alphas_cumprod must be a float64 vector");
  TORCH_CHECK(prediction >= kPredictEps && prediction <= kPredictV, "sampler step: unknown prediction code ",
              prediction);
  std::vector<const at::Tensor*> tensors = {&model_out, &t, &t_prev, &alphas_cumprod};
  if (uncond_out) tensors.push_back(&*uncond_out);
  if (noise) tensors.push_back(&*noise);
  for (const auto* tensor : tensors) {
    TORCH_CHECK(tensor->device() == x_t.device(), "sampler step: all tensors must be on ", x_t.device(), ", got ",
                tensor->device());
  }
}

void check_flow_step_args(const at::Tensor& x_t, const std::optional<at::Tensor>& x_pred, const at::Tensor& model_out,
                          const std::optional<at::Tensor>& uncond_out, const at::Tensor& t, const at::Tensor& t_next) {
  TORCH_CHECK(x_t.dim() >= 1, "flow step: x_t needs a leading row dimension");
  const auto check_like = [&](const at::Tensor& other, const char* name) {
    TORCH_CHECK(other.sizes() == x_t.sizes() && other.scalar_type() == x_t.scalar_type(), "flow step: ", name,
                " must match x_t in shape and dtype");
    TORCH_CHECK(other.device() == x_t.device(), "flow step: all tensors must be on ", x_t.device(), ", got ",
                other.device());
  };
  check_like(model_out, "model_out");
  if (uncond_out) check_like(*uncond_out, "uncond_out");
  if (x_pred) check_like(*x_pred, "x_pred");
  for (const auto* times : {&t, &t_next}) {
    TORCH_CHECK(times->dim() == 1 && times->size(0) == x_t.size(0) &&
                    (times->scalar_type() == at::kFloat || times->scalar_type() == at::kDouble),
                "flow step: t and t_next must be float32/float64 tensors of shape (", x_t.size(0), ",)");
    TORCH_CHECK(times->device() == x_t.device(), "flow step: all tensors must be on ", x_t.device(), ", got ",
                times->device());
  }
}

namespace {

constexpr int64_t kChunk = 1024;  // multiple of 4: a Philox block never straddles two work items

// The float32 work of one chunk [begin, end) of a step: out = cx * x + cm * m (+ cz * z), with
// m = u + scale * (c - u) when guided. z: the given noise or, when null, Philox noise generated into
// buf on the first row that draws noise. A clone per vector width, picked at load time: one thread
// keeps more cache lines in flight with wider loads (the loop is memory bound). No FMA in any clone
// (contraction is off), so every clone gives the generic kernel's bits.
TF_TARGET_CLONES
void step_chunk_f32(int64_t begin, int64_t end, int64_t row_size, const StepCoefficients* coefficients,
                    const float* __restrict x, const float* __restrict cond, const float* __restrict uncond,
                    float scale, const float* __restrict given_noise, uint64_t seed, float* __restrict buf,
                    float* __restrict out) {
  const float* z = given_noise ? given_noise + begin : nullptr;
  for (int64_t i = begin; i < end;) {
    const int64_t row = i / row_size, row_end = std::min(end, (row + 1) * row_size);
    const StepCoefficients& c = coefficients[row];
    const float cx = static_cast<float>(c.x), cm = static_cast<float>(c.model), cz = static_cast<float>(c.noise);
    if (c.noise != 0.0 && !z) {
      philox_normals_cpu(seed, begin, end - begin, buf);
      z = buf;
    }
    const int64_t first = i - begin, n = row_end - i;
    const float *xr = x + i, *cr = cond + i, *ur = uncond ? uncond + i : nullptr, *zr = z ? z + first : nullptr;
    float* o = out + i;
    if (ur && c.noise != 0.0) {
      for (int64_t k = 0; k < n; ++k) {
        const float m = fadd(ur[k], fmul(scale, fadd(cr[k], -ur[k])));
        o[k] = fadd(fadd(fmul(cx, xr[k]), fmul(cm, m)), fmul(cz, zr[k]));
      }
    } else if (ur) {
      for (int64_t k = 0; k < n; ++k) {
        const float m = fadd(ur[k], fmul(scale, fadd(cr[k], -ur[k])));
        o[k] = fadd(fmul(cx, xr[k]), fmul(cm, m));
      }
    } else if (c.noise != 0.0) {
      for (int64_t k = 0; k < n; ++k) o[k] = fadd(fadd(fmul(cx, xr[k]), fmul(cm, cr[k])), fmul(cz, zr[k]));
    } else {
      for (int64_t k = 0; k < n; ++k) o[k] = fadd(fmul(cx, xr[k]), fmul(cm, cr[k]));
    }
    i = row_end;
  }
}

template <typename scalar_t>
void step_cpu_kernel(const std::vector<StepCoefficients>& coefficients, const at::Tensor& x_t,
                     const at::Tensor& model_out, const at::Tensor* uncond_out, double cfg_scale,
                     const at::Tensor* noise, uint64_t seed, const at::Tensor& out) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t numel = x_t.numel(), row_size = numel / std::max<int64_t>(x_t.size(0), 1);
  const scalar_t* x = x_t.const_data_ptr<scalar_t>();
  const scalar_t* cond = model_out.const_data_ptr<scalar_t>();
  const scalar_t* uncond = uncond_out ? uncond_out->const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* given_noise = noise ? noise->const_data_ptr<scalar_t>() : nullptr;
  scalar_t* result = out.mutable_data_ptr<scalar_t>();
  const opmath_t scale = static_cast<opmath_t>(cfg_scale);
  const int64_t chunks = (numel + kChunk - 1) / kChunk;
  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    alignas(64) float buf[kChunk];
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      const int64_t begin = chunk * kChunk, end = std::min(numel, begin + kChunk);
      if constexpr (std::is_same_v<scalar_t, float>) {
        step_chunk_f32(begin, end, row_size, coefficients.data(), x, cond, uncond, scale, given_noise, seed, buf,
                       result);
        continue;
      }
      bool generated = false;
      for (int64_t i = begin; i < end;) {
        const int64_t row = i / row_size, row_end = std::min(end, (row + 1) * row_size);
        const StepCoefficients& c = coefficients[row];
        const opmath_t cx = static_cast<opmath_t>(c.x), cm = static_cast<opmath_t>(c.model);
        const opmath_t cz = static_cast<opmath_t>(c.noise);
        const bool with_noise = c.noise != 0.0;
        if (with_noise && !given_noise && !generated) {
          philox_normals_cpu(seed, begin, end - begin, buf);
          generated = true;
        }
        // One branch-free loop per (guided, noisy, noise source) so the compiler vectorizes it.
        const auto run = [&](auto guided, auto noisy, const auto* z, int64_t z_first) {
          for (; i < row_end; ++i) {
            opmath_t m = static_cast<opmath_t>(cond[i]);
            if constexpr (decltype(guided)::value) {
              const opmath_t u = static_cast<opmath_t>(uncond[i]);
              m = add_rn(u, mul_rn(scale, add_rn(m, -u)));
            }
            opmath_t value = add_rn(mul_rn(cx, static_cast<opmath_t>(x[i])), mul_rn(cm, m));
            if constexpr (decltype(noisy)::value) {
              const scalar_t noise_value = static_cast<scalar_t>(z[i - z_first]);
              value = add_rn(value, mul_rn(cz, static_cast<opmath_t>(noise_value)));
            }
            result[i] = static_cast<scalar_t>(value);
          }
        };
        const auto run_guided = [&](auto guided) {
          if (!with_noise) run(guided, std::false_type{}, buf, begin);
          else if (given_noise) run(guided, std::true_type{}, given_noise, 0);
          else run(guided, std::true_type{}, buf, begin);
        };
        if (uncond) run_guided(std::true_type{}); else run_guided(std::false_type{});
      }
    }
  });
}

at::Tensor sampler_step_cpu(StepKind kind, const at::Tensor& x_t_in, const at::Tensor& model_out_in,
                            const std::optional<at::Tensor>& uncond_in, const at::Tensor& t_in,
                            const at::Tensor& t_prev_in, const at::Tensor& alphas_cumprod, int64_t prediction,
                            double eta, double cfg_scale, const std::optional<at::Tensor>& noise_in,
                            std::optional<int64_t> seed) {
  check_step_args(x_t_in, model_out_in, uncond_in, t_in, t_prev_in, alphas_cumprod, prediction, noise_in);
  const at::Tensor x_t = x_t_in.contiguous(), model_out = model_out_in.contiguous();
  const at::Tensor t = t_in.to(at::kLong).contiguous(), t_prev = t_prev_in.to(at::kLong).contiguous();
  const at::Tensor table = alphas_cumprod.contiguous();
  const int64_t steps = table.size(0), rows = x_t.size(0);
  const int64_t* t_data = t.const_data_ptr<int64_t>();
  const int64_t* t_prev_data = t_prev.const_data_ptr<int64_t>();
  const double* alpha_bar = table.const_data_ptr<double>();
  std::vector<StepCoefficients> coefficients(rows);
  bool needs_noise = false;
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(t_data[r] >= 0 && t_data[r] < steps && t_prev_data[r] >= -1 && t_prev_data[r] < t_data[r],
                "sampler step: row ", r, " needs 0 <= t < ", steps, " and -1 <= t_prev < t, got t=", t_data[r],
                " t_prev=", t_prev_data[r]);
    const double ab_t = alpha_bar[t_data[r]], ab_prev = t_prev_data[r] >= 0 ? alpha_bar[t_prev_data[r]] : 1.0;
    coefficients[r] = kind == StepKind::kDDPM ? ddpm_coefficients(prediction, t_data[r], ab_t, ab_prev)
                                              : ddim_coefficients(prediction, eta, ab_t, ab_prev);
    needs_noise = needs_noise || coefficients[r].noise != 0.0;
  }
  TORCH_CHECK(!needs_noise || noise_in || seed, "sampler step: this step draws noise: give noise or a seed");
  at::Tensor uncond, noise;
  if (uncond_in) uncond = uncond_in->contiguous();
  if (noise_in) noise = noise_in->contiguous();
  at::Tensor out = at::empty_like(x_t);
  const uint64_t seed_value = seed ? static_cast<uint64_t>(*seed) : 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_t.scalar_type(), "sampler_step_cpu", [&] {
    step_cpu_kernel<scalar_t>(coefficients, x_t, model_out, uncond_in ? &uncond : nullptr, cfg_scale,
                              noise_in ? &noise : nullptr, seed_value, out);
  });
  return out;
}

// Euler (x_pred absent) or Heun corrector (x_pred given) step of every row from t to t_next.
at::Tensor flow_step_cpu(const at::Tensor& x_t_in, const std::optional<at::Tensor>& x_pred_in,
                         const at::Tensor& model_out_in, const std::optional<at::Tensor>& uncond_in,
                         const at::Tensor& t_in, const at::Tensor& t_next_in, double cfg_scale) {
  check_flow_step_args(x_t_in, x_pred_in, model_out_in, uncond_in, t_in, t_next_in);
  const at::Tensor x_t = x_t_in.contiguous(), model_out = model_out_in.contiguous();
  const at::Tensor t = t_in.to(at::kDouble).contiguous(), t_next = t_next_in.to(at::kDouble).contiguous();
  const int64_t rows = x_t.size(0);
  const double* t_data = t.const_data_ptr<double>();
  const double* t_next_data = t_next.const_data_ptr<double>();
  std::vector<StepCoefficients> coefficients(rows);
  for (int64_t r = 0; r < rows; ++r) {
    // Written so that NaN fails it too.
    TORCH_CHECK(t_next_data[r] >= 0.0 && t_next_data[r] < t_data[r] && t_data[r] <= 1.0, "flow step: row ", r,
                " needs 0 <= t_next < t <= 1, got t=", t_data[r], " t_next=", t_next_data[r]);
    coefficients[r] = flow_coefficients(x_pred_in.has_value(), t_data[r], t_next_data[r]);
  }
  at::Tensor uncond, x_pred;
  if (uncond_in) uncond = uncond_in->contiguous();
  if (x_pred_in) x_pred = x_pred_in->contiguous();
  at::Tensor out = at::empty_like(x_t);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_t.scalar_type(), "flow_step_cpu", [&] {
    // Heun's predictor point rides in the noise slot with its coefficient 1/2 (philox.h).
    step_cpu_kernel<scalar_t>(coefficients, x_t, model_out, uncond_in ? &uncond : nullptr, cfg_scale,
                              x_pred_in ? &x_pred : nullptr, 0, out);
  });
  return out;
}

}  // namespace

at::Tensor euler_step_cpu(const at::Tensor& x_t, const at::Tensor& model_out, const std::optional<at::Tensor>& uncond_out,
                          const at::Tensor& t, const at::Tensor& t_next, double cfg_scale) {
  return flow_step_cpu(x_t, std::nullopt, model_out, uncond_out, t, t_next, cfg_scale);
}

at::Tensor heun_step_cpu(const at::Tensor& x_t, const at::Tensor& x_pred, const at::Tensor& model_out,
                         const std::optional<at::Tensor>& uncond_out, const at::Tensor& t, const at::Tensor& t_next,
                         double cfg_scale) {
  return flow_step_cpu(x_t, x_pred, model_out, uncond_out, t, t_next, cfg_scale);
}

at::Tensor ddpm_step_cpu(const at::Tensor& x_t, const at::Tensor& model_out, const std::optional<at::Tensor>& uncond_out,
                         const at::Tensor& t, const at::Tensor& t_prev, const at::Tensor& alphas_cumprod,
                         int64_t prediction, double cfg_scale, const std::optional<at::Tensor>& noise,
                         std::optional<int64_t> seed) {
  return sampler_step_cpu(StepKind::kDDPM, x_t, model_out, uncond_out, t, t_prev, alphas_cumprod, prediction, 0.0,
                          cfg_scale, noise, seed);
}

at::Tensor ddim_step_cpu(const at::Tensor& x_t, const at::Tensor& model_out, const std::optional<at::Tensor>& uncond_out,
                         const at::Tensor& t, const at::Tensor& t_prev, const at::Tensor& alphas_cumprod,
                         int64_t prediction, double eta, double cfg_scale, const std::optional<at::Tensor>& noise,
                         std::optional<int64_t> seed) {
  return sampler_step_cpu(StepKind::kDDIM, x_t, model_out, uncond_out, t, t_prev, alphas_cumprod, prediction, eta,
                          cfg_scale, noise, seed);
}

TORCH_LIBRARY_FRAGMENT(transfusion_fast, m) {
  m.def("ddpm_step(Tensor x_t, Tensor model_out, Tensor? uncond_out, Tensor t, Tensor t_prev, "
        "Tensor alphas_cumprod, int prediction, float cfg_scale, Tensor? noise, int? seed) -> Tensor");
  m.def("ddim_step(Tensor x_t, Tensor model_out, Tensor? uncond_out, Tensor t, Tensor t_prev, "
        "Tensor alphas_cumprod, int prediction, float eta, float cfg_scale, Tensor? noise, int? seed) -> Tensor");
  m.def("euler_step(Tensor x_t, Tensor model_out, Tensor? uncond_out, Tensor t, Tensor t_next, float cfg_scale) "
        "-> Tensor");
  m.def("heun_step(Tensor x_t, Tensor x_pred, Tensor model_out, Tensor? uncond_out, Tensor t, Tensor t_next, "
        "float cfg_scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(transfusion_fast, CPU, m) {
  m.impl("ddpm_step", &ddpm_step_cpu);
  m.impl("ddim_step", &ddim_step_cpu);
  m.impl("euler_step", &euler_step_cpu);
  m.impl("heun_step", &heun_step_cpu);
}

}  // namespace transfusion_fast
