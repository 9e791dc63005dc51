// patchify / unpatchify (batched and packed): CUDA kernels, one thread per patch element (memory
// bound), on raw element bits like the CPU kernels. The packed ops launch once per image.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>
#include <torch/types.h>

#include <cstdint>
#include <limits>

#include <ATen/cuda/detail/IntegerDivider.cuh>   // not self-contained: after c10's macros and <cstdint>

#include "patchify.h"

namespace transfusion_fast {

using at::cuda::detail::IntDivider;

// The divisors that split a patch element's index into (image, patch, row, column, channel).
// With 32-bit indices IntDivider divides by a multiply-high and a shift: a 64-bit division is a
// long software routine on the GPU, and five of them per element made the kernel compute-bound
// (0.22 of copy bandwidth on an H100).
template <typename Index>
struct PatchDividers {
  IntDivider<Index> features, patches, channels, p, patch_cols;
  explicit PatchDividers(const PatchGeometry& g)
      : features(g.D), patches(g.Hp * g.Wp), channels(g.C), p(g.p), patch_cols(g.Wp) {}
};

// Kernels stay outside anonymous namespaces: nvcc's host stubs for templated kernels fail there.

template <typename T, bool ToPatches, typename Index>
__global__ void patch_elements_kernel(T* img, T* patches, PatchGeometry g, PatchDividers<Index> div,
                                      Index total) {
  for (Index i = blockIdx.x * (Index)blockDim.x + threadIdx.x; i < total;
       i += (Index)gridDim.x * blockDim.x) {
    const auto patch_feature = div.features.divmod(i);             // (b * Hp * Wp + n, f)
    const auto image_patch = div.patches.divmod(patch_feature.div);  // (b, n)
    const auto pixel_channel = div.channels.divmod(patch_feature.mod);  // (py * p + px, c)
    const auto row_col = div.p.divmod(pixel_channel.div);           // (py, px)
    const auto patch_row_col = div.patch_cols.divmod(image_patch.mod);  // (n / Wp, n % Wp)
    const int64_t h = (int64_t)patch_row_col.div * g.p + row_col.div;
    const int64_t w = (int64_t)patch_row_col.mod * g.p + row_col.mod;
    T* pixel = img + (int64_t)image_patch.div * g.sb + (int64_t)pixel_channel.mod * g.sc + h * g.sh +
               w * g.sw;
    if (ToPatches) patches[i] = *pixel; else *pixel = patches[i];
  }
}

template <typename T, bool ToPatches, typename Index>
static void launch_patch_elements(T* img, T* patches, const PatchGeometry& g, int64_t total,
                                  cudaStream_t stream) {
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((total + threads - 1) / threads, 65535 * 8);
  patch_elements_kernel<T, ToPatches, Index><<<blocks, threads, 0, stream>>>(
      img, patches, g, PatchDividers<Index>(g), static_cast<Index>(total));
}

// images: the tensor g describes; patches: the first patch row this image (batch) owns.
template <bool ToPatches>
static void patch_kernel_cuda(const at::Tensor& images, void* patches, const PatchGeometry& g) {
  const int64_t total = g.B * g.Hp * g.Wp * g.D;
  if (total == 0) return;
  c10::cuda::CUDAGuard guard(images.device());   // the launch and its stream on the images' device
  auto stream = c10::cuda::getCurrentCUDAStream();
  // IntDivider<unsigned int> is exact for dividends and divisors below 2^31; the grid-stride loop
  // then cannot wrap (its stride is below 2^28).
  const bool narrow = total <= std::numeric_limits<int32_t>::max();
  dispatch_element_bits(images, "patchify", [&](auto bits) {
    using T = decltype(bits);
    T* img = static_cast<T*>(images.data_ptr());
    T* rows = static_cast<T*>(patches);
    if (narrow) launch_patch_elements<T, ToPatches, unsigned int>(img, rows, g, total, stream);
    else launch_patch_elements<T, ToPatches, int64_t>(img, rows, g, total, stream);
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
