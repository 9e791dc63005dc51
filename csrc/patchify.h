#pragma once
// Index arithmetic of patchify shared by the CPU and CUDA kernels.
// images (B, C, H, W) with any strides  <->  patches (B, (H/p)(W/p), p*p*C) contiguous,
// patch n = hp * (W/p) + wp, feature f = (py * p + px) * C + c  (channels last inside a patch).
// Patchify only moves elements, so the kernels work on raw element bits (1, 2, 4 or 8 bytes):
// every dtype of a given size, float8 to float64, shares one instantiation.
#include <cstdint>
#include <vector>

#include <ATen/core/Tensor.h>

namespace transfusion_fast {

struct PatchGeometry {
  int64_t B, C, H, W, p, Hp, Wp, D;   // D = p * p * C
  int64_t sb, sc, sh, sw;             // image strides, in elements
};

// Validated geometry of a (B, C, H, W) image tensor (TORCH_CHECK errors name the argument).
PatchGeometry patch_geometry(const at::Tensor& images, int64_t p);

// Patch rows of a packed list of (C, H_i, W_i) images: image i owns rows [offsets[i], offsets[i+1]).
struct PackedPlan {
  std::vector<PatchGeometry> geometry;  // of each image viewed as (1, C, H_i, W_i)
  std::vector<int64_t> offsets;         // n + 1 entries
  int64_t D = 0;                        // p * p * C
};

// From input images (patchify_packed) or from the output sizes (unpatchify_packed); both validate.
PackedPlan packed_plan(at::TensorList images, int64_t p);
PackedPlan packed_plan(const at::Tensor& patches, int64_t p, at::IntArrayRef heights, at::IntArrayRef widths);
at::Tensor offsets_tensor(const PackedPlan& plan, const at::Device& device);

// Calls f with the unsigned integer type of the tensor's element size.
template <typename F>
void dispatch_element_bits(const at::Tensor& tensor, const char* op, F&& f) {
  switch (tensor.element_size()) {
    case 1: f(uint8_t{}); break;
    case 2: f(uint16_t{}); break;
    case 4: f(uint32_t{}); break;
    case 8: f(uint64_t{}); break;
    default: TORCH_CHECK(false, op, ": unsupported element size ", tensor.element_size(), " (", tensor.scalar_type(), ")");
  }
}

}  // namespace transfusion_fast
