// Forward diffusion (q_sample) with fused Philox noise: CUDA kernels, one thread per Philox block of
// 4 elements. The arithmetic is the CPU kernel's, operation for operation (philox.h), so both devices
// produce the same bits.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/types.h>

#include "philox.h"

namespace transfusion_fast {

void check_q_sample_args(const at::Tensor& x0, const at::Tensor& timesteps, const at::Tensor& sqrt_ab,
                         const at::Tensor& sqrt_1m_ab);
void check_q_sample_noise(const at::Tensor& x0, const at::Tensor& noise);

// Kernels stay outside anonymous namespaces: nvcc's host stubs for templated kernels fail there.

constexpr int kThreads = 256;

static int64_t grid_for(int64_t work) {
  return std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, 65535 * 8));
}

template <typename scalar_t, bool GenerateNoise>
__global__ void q_sample_kernel(const scalar_t* __restrict__ x0, const int64_t* __restrict__ t_rows,
                                const double* __restrict__ a_table, const double* __restrict__ b_table,
                                const scalar_t* __restrict__ noise_in, scalar_t* __restrict__ noise_out,
                                scalar_t* __restrict__ x_t, int64_t numel, int64_t row_size, uint64_t seed) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t blocks = (numel + 3) / 4;
  for (int64_t block = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; block < blocks;
       block += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float z[4];
    if (GenerateNoise) philox_normal4(seed, static_cast<uint64_t>(block), z);
#pragma unroll
    for (int lane = 0; lane < 4; ++lane) {
      const int64_t i = block * 4 + lane;
      if (i >= numel) break;
      const int64_t t = t_rows[i / row_size];
      const opmath_t a = static_cast<opmath_t>(a_table[t]), b = static_cast<opmath_t>(b_table[t]);
      scalar_t eps;
      if (GenerateNoise) {
        eps = static_cast<scalar_t>(z[lane]);
        noise_out[i] = eps;
      } else {
        eps = noise_in[i];
      }
      x_t[i] = static_cast<scalar_t>(add_rn(mul_rn(a, static_cast<opmath_t>(x0[i])), mul_rn(b, static_cast<opmath_t>(eps))));
    }
  }
}

static void launch_q_sample(const at::Tensor& x0, const at::Tensor& timesteps, const at::Tensor& sqrt_ab,
                     const at::Tensor& sqrt_1m_ab, const at::Tensor* noise_in, const at::Tensor* noise_out,
                     const at::Tensor& x_t, uint64_t seed) {
  const int64_t numel = x0.numel();
  if (numel == 0) return;
  const int64_t row_size = numel / x0.size(0);
  const at::Tensor t64 = timesteps.to(at::kLong).contiguous();
  const at::Tensor a = sqrt_ab.contiguous(), b = sqrt_1m_ab.contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x0.scalar_type(), "q_sample_cuda", [&] {
    const int64_t grid = grid_for((numel + 3) / 4);
    if (noise_out) {
      q_sample_kernel<scalar_t, true><<<grid, kThreads, 0, stream>>>(
          x0.const_data_ptr<scalar_t>(), t64.const_data_ptr<int64_t>(), a.const_data_ptr<double>(),
          b.const_data_ptr<double>(), nullptr, noise_out->mutable_data_ptr<scalar_t>(),
          x_t.mutable_data_ptr<scalar_t>(), numel, row_size, seed);
    } else {
      q_sample_kernel<scalar_t, false><<<grid, kThreads, 0, stream>>>(
          x0.const_data_ptr<scalar_t>(), t64.const_data_ptr<int64_t>(), a.const_data_ptr<double>(),
          b.const_data_ptr<double>(), noise_in->const_data_ptr<scalar_t>(), nullptr,
          x_t.mutable_data_ptr<scalar_t>(), numel, row_size, seed);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

__global__ void philox_kernel(const int64_t* counters, const int64_t* keys, int64_t* out, int64_t n) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  uint32_t block[4];
  for (int j = 0; j < 4; ++j) block[j] = static_cast<uint32_t>(counters[4 * i + j]);
  philox4x32_10(block, static_cast<uint32_t>(keys[2 * i]), static_cast<uint32_t>(keys[2 * i + 1]));
  for (int j = 0; j < 4; ++j) out[4 * i + j] = block[j];
}

at::Tensor q_sample_cuda(const at::Tensor& x0_in, const at::Tensor& timesteps, const at::Tensor& sqrt_ab,
                         const at::Tensor& sqrt_1m_ab, const at::Tensor& noise_in) {
  c10::cuda::CUDAGuard guard(x0_in.device());
  check_q_sample_args(x0_in, timesteps, sqrt_ab, sqrt_1m_ab);
  check_q_sample_noise(x0_in, noise_in);
  const at::Tensor x0 = x0_in.contiguous(), noise = noise_in.contiguous();
  at::Tensor x_t = at::empty_like(x0);
  launch_q_sample(x0, timesteps, sqrt_ab, sqrt_1m_ab, &noise, nullptr, x_t, 0);
  return x_t;
}

std::tuple<at::Tensor, at::Tensor> q_sample_philox_cuda(const at::Tensor& x0_in, const at::Tensor& timesteps,
                                                        const at::Tensor& sqrt_ab, const at::Tensor& sqrt_1m_ab,
                                                        int64_t seed) {
  c10::cuda::CUDAGuard guard(x0_in.device());
  check_q_sample_args(x0_in, timesteps, sqrt_ab, sqrt_1m_ab);
  const at::Tensor x0 = x0_in.contiguous();
  at::Tensor x_t = at::empty_like(x0), noise = at::empty_like(x0);
  launch_q_sample(x0, timesteps, sqrt_ab, sqrt_1m_ab, nullptr, &noise, x_t, static_cast<uint64_t>(seed));
  return {x_t, noise};
}

at::Tensor philox4x32_10_cuda(const at::Tensor& counters_in, const at::Tensor& keys_in) {
  c10::cuda::CUDAGuard guard(counters_in.device());
  TORCH_CHECK(counters_in.dim() == 2 && counters_in.size(1) == 4 && counters_in.scalar_type() == at::kLong,
              "philox4x32_10: counters must be an int64 (N, 4) tensor");
  TORCH_CHECK(keys_in.dim() == 2 && keys_in.size(1) == 2 && keys_in.size(0) == counters_in.size(0) &&
                  keys_in.scalar_type() == at::kLong && keys_in.device() == counters_in.device(),
              "philox4x32_10: keys must be an int64 (N, 2) tensor on the counters' device");
  const at::Tensor counters = counters_in.contiguous(), keys = keys_in.contiguous();
  at::Tensor out = at::empty_like(counters);
  const int64_t n = counters.size(0);
  if (n > 0) {
    philox_kernel<<<(n + kThreads - 1) / kThreads, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        counters.const_data_ptr<int64_t>(), keys.const_data_ptr<int64_t>(), out.mutable_data_ptr<int64_t>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

TORCH_LIBRARY_IMPL(transfusion_fast, CUDA, m) {
  m.impl("q_sample", &q_sample_cuda);
  m.impl("q_sample_philox", &q_sample_philox_cuda);
  m.impl("philox4x32_10", &philox4x32_10_cuda);
}

}  // namespace transfusion_fast
