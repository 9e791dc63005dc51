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
  c10::cuda::CUDAGuard guard(images.device());   // the launch and its stream on the images' device
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

// The op bodies live in patchify.h, shared with the CPU registration; this launches the kernel.
constexpr auto move_cuda = [](auto to_patches, const at::Tensor& images, void* patches, const PatchGeometry& g) {
  patch_kernel_cuda<decltype(to_patches)::value>(images, patches, g);
};

at::Tensor patchify_cuda(const at::Tensor& images, int64_t p) { return patchify_with(images, p, move_cuda); }

at::Tensor unpatchify_cuda(const at::Tensor& patches, int64_t p, int64_t height, int64_t width) {
  return unpatchify_with(patches, p, height, width, move_cuda);
}

std::tuple<at::Tensor, at::Tensor> patchify_packed_cuda(at::TensorList images, int64_t p) {
  return patchify_packed_with(images, p, move_cuda);
}

std::vector<at::Tensor> unpatchify_packed_cuda(const at::Tensor& patches, int64_t p, at::IntArrayRef heights,
                                               at::IntArrayRef widths) {
  return unpatchify_packed_with(patches, p, heights, widths, move_cuda);
}

TORCH_LIBRARY_IMPL(transfusion_fast, CUDA, m) {
  m.impl("patchify", &patchify_cuda);
  m.impl("unpatchify", &unpatchify_cuda);
  m.impl("patchify_packed", &patchify_packed_cuda);
  m.impl("unpatchify_packed", &unpatchify_packed_cuda);
}

}  // namespace transfusion_fast
