// patchify / unpatchify: CUDA kernels, one thread per patch element (memory bound).
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/types.h>

#include "patchify.h"

namespace transfusion_fast {

PatchGeometry patch_geometry(const at::Tensor& images, int64_t p);

template <typename T, bool ToPatches>
__global__ void patch_elements_kernel(T* img, T* patches, PatchGeometry g, int64_t total) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
       i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t f = i % g.D, n = (i / g.D) % (g.Hp * g.Wp), b = i / (g.D * g.Hp * g.Wp);
    const int64_t c = f % g.C, px = (f / g.C) % g.p, py = f / (g.C * g.p);
    const int64_t h = (n / g.Wp) * g.p + py, w = (n % g.Wp) * g.p + px;
    T* pixel = img + b * g.sb + c * g.sc + h * g.sh + w * g.sw;
    if (ToPatches) patches[i] = *pixel; else *pixel = patches[i];
  }
}

template <bool ToPatches>
void launch_patch_kernel(const at::Tensor& images, const at::Tensor& patches, const PatchGeometry& g) {
  const int64_t total = patches.numel();
  if (total == 0) return;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((total + threads - 1) / threads, 65535);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, images.scalar_type(), "patchify_cuda", [&] {
    patch_elements_kernel<scalar_t, ToPatches><<<blocks, threads, 0, stream>>>(
        static_cast<scalar_t*>(images.data_ptr()), static_cast<scalar_t*>(patches.data_ptr()), g, total);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor patchify_cuda(const at::Tensor& images, int64_t p) {
  c10::cuda::CUDAGuard guard(images.device());
  auto g = patch_geometry(images, p);
  auto patches = at::empty({g.B, g.Hp * g.Wp, g.D}, images.options());
  launch_patch_kernel<true>(images, patches, g);
  return patches;
}

at::Tensor unpatchify_cuda(const at::Tensor& patches_in, int64_t p, int64_t height, int64_t width) {
  c10::cuda::CUDAGuard guard(patches_in.device());
  TORCH_CHECK(patches_in.dim() == 3, "unpatchify: patches must be (B, N, p*p*C)");
  const int64_t D = patches_in.size(2);
  TORCH_CHECK(p > 0 && D % (p * p) == 0, "unpatchify: last dim ", D, " is not a multiple of p*p=", p * p);
  auto images = at::empty({patches_in.size(0), D / (p * p), height, width}, patches_in.options());
  auto g = patch_geometry(images, p);
  TORCH_CHECK(patches_in.size(1) == g.Hp * g.Wp, "unpatchify: expected ", g.Hp * g.Wp, " patches, got ",
              patches_in.size(1));
  launch_patch_kernel<false>(images, patches_in.contiguous(), g);
  return images;
}

TORCH_LIBRARY_IMPL(transfusion_fast, CUDA, m) {
  m.impl("patchify", &patchify_cuda);
  m.impl("unpatchify", &unpatchify_cuda);
}

}  // namespace transfusion_fast
