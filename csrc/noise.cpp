// Forward diffusion (q_sample) with fused Philox noise: schemas and CPU kernels.
//   x_t = sqrt(alpha_bar[t_row]) * x0 + sqrt(1 - alpha_bar[t_row]) * eps,  one timestep per row of x0.
// The coefficient tables (float64, one entry per train step) come from transfusion_fast.schedules.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include "philox.h"

namespace transfusion_fast {

void check_q_sample_args(const at::Tensor& x0, const at::Tensor& timesteps, const at::Tensor& sqrt_ab,
                         const at::Tensor& sqrt_1m_ab);
void check_q_sample_noise(const at::Tensor& x0, const at::Tensor& noise);

// An AVX2 clone beside the baseline one, picked at load time by CPU feature: no FMA in either
// (and contraction is off), so both give the scalar recipe's bits.
__attribute__((target_clones("avx2", "default")))
void philox_normals_cpu(uint64_t seed, int64_t first, int64_t n, float* buf) {
  const int64_t blocks = (n + 3) / 4, first_block = first / 4;
  int64_t j = 0;
  for (; j + lanes::kLanes <= blocks; j += lanes::kLanes) {
    lanes::philox_normal4(seed, static_cast<uint64_t>(first_block + j), buf + 4 * j);
  }
  for (; j < blocks; ++j) philox_normal4(seed, static_cast<uint64_t>(first_block + j), buf + 4 * j);
}

namespace {

// Elements per parallel work item: a multiple of 4 so every Philox block lies in one item, which
// makes the noise independent of how the range is split between threads.
constexpr int64_t kChunk = 1024;

template <typename scalar_t, bool GenerateNoise>
void q_sample_cpu_kernel(const at::Tensor& x0, const at::Tensor& timesteps, const at::Tensor& sqrt_ab,
                         const at::Tensor& sqrt_1m_ab, const at::Tensor& noise, const at::Tensor& x_t,
                         uint64_t seed) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t numel = x0.numel(), row_size = x0.numel() / std::max<int64_t>(x0.size(0), 1);
  const at::Tensor t64 = timesteps.to(at::kLong);
  const int64_t* t_rows = t64.const_data_ptr<int64_t>();
  const double* a_table = sqrt_ab.const_data_ptr<double>();
  const double* b_table = sqrt_1m_ab.const_data_ptr<double>();
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

TORCH_LIBRARY_FRAGMENT(transfusion_fast, m) {
  m.def("q_sample(Tensor x0, Tensor timesteps, Tensor sqrt_alpha_bar, Tensor sqrt_one_minus_alpha_bar, "
        "Tensor noise) -> Tensor");
  m.def("q_sample_philox(Tensor x0, Tensor timesteps, Tensor sqrt_alpha_bar, "
        "Tensor sqrt_one_minus_alpha_bar, int seed) -> (Tensor, Tensor)");
  m.def("philox4x32_10(Tensor counters, Tensor keys) -> Tensor");
}

TORCH_LIBRARY_IMPL(transfusion_fast, CPU, m) {
  m.impl("q_sample", &q_sample_cpu);
  m.impl("q_sample_philox", &q_sample_philox_cpu);
  m.impl("philox4x32_10", &philox4x32_10_cpu);
}

}  // namespace transfusion_fast
