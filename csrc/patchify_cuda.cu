// patchify / unpatchify (batched and packed): CUDA kernels, one thread per patch element (memory
// bound), on raw element bits like the CPU kernels. The packed ops launch once per image.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/types.h>

#include "patchify.h"

namespace transfusion_fast {

// Kernels stay outside anonymous namespaces: nvcc's host stubs for templated kernels fail there.

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

// images: the tensor g describes; patches: the first patch row this image (batch) owns.
template <bool ToPatches>
static void patch_kernel_cuda(const at::Tensor& images, void* patches, const PatchGeometry& g) {
  const int64_t total = g.B * g.Hp * g.Wp * g.D;
  if (total == 0) return;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((total + threads - 1) / threads, 65535 * 8);
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_element_bits(images, "patchify", [&](auto bits) {
    using T = decltype(bits);
    patch_elements_kernel<T, ToPatches><<<blocks, threads, 0, stream>>>(
        static_cast<T*>(images.data_ptr()), static_cast<T*>(patches), g, total);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor patchify_cuda(const at::Tensor& images, int64_t p) {
  c10::cuda::CUDAGuard guard(images.device());
  auto g = patch_geometry(images, p);
  auto patches = at::empty({g.B, g.Hp * g.Wp, g.D}, images.options());
  patch_kernel_cuda<true>(images, patches.data_ptr(), g);
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
  const at::Tensor patches = patches_in.contiguous();
  patch_kernel_cuda<false>(images, patches.data_ptr(), g);
  return images;
}

std::tuple<at::Tensor, at::Tensor> patchify_packed_cuda(at::TensorList images, int64_t p) {
  const PackedPlan plan = packed_plan(images, p);
  c10::cuda::CUDAGuard guard(images[0].device());
  auto patches = at::empty({plan.offsets.back(), plan.D}, images[0].options());
  for (size_t i = 0; i < images.size(); ++i) {
    patch_kernel_cuda<true>(images[i], static_cast<char*>(patches.data_ptr()) +
                                           plan.offsets[i] * plan.D * patches.element_size(), plan.geometry[i]);
  }
  return {patches, offsets_tensor(plan, patches.device())};
}

std::vector<at::Tensor> unpatchify_packed_cuda(const at::Tensor& patches_in, int64_t p, at::IntArrayRef heights,
                                               at::IntArrayRef widths) {
  c10::cuda::CUDAGuard guard(patches_in.device());
  const PackedPlan plan = packed_plan(patches_in, p, heights, widths);
  const at::Tensor patches = patches_in.contiguous();
  std::vector<at::Tensor> images;
  for (size_t i = 0; i < heights.size(); ++i) {
    const PatchGeometry& g = plan.geometry[i];
    images.push_back(at::empty({g.C, g.H, g.W}, patches.options()));
    patch_kernel_cuda<false>(images.back(), static_cast<char*>(patches.data_ptr()) +
                                                plan.offsets[i] * plan.D * patches.element_size(), g);
  }
  return images;
}

TORCH_LIBRARY_IMPL(transfusion_fast, CUDA, m) {
  m.impl("patchify", &patchify_cuda);
  m.impl("unpatchify", &unpatchify_cuda);
  m.impl("patchify_packed", &patchify_packed_cuda);
  m.impl("unpatchify_packed", &unpatchify_packed_cuda);
}

}  // namespace transfusion_fast
