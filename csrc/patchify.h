#pragma once
// Index arithmetic of patchify shared by the CPU and CUDA kernels.
// images (B, C, H, W) with any strides  <->  patches (B, (H/p)(W/p), p*p*C) contiguous,
// patch n = hp * (W/p) + wp, feature f = (py * p + px) * C + c  (channels last inside a patch).
// Patchify only moves elements, so the kernels work on raw element bits (1, 2, 4 or 8 bytes):
// every dtype of a given size, float8 to float64, shares one instantiation.
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/safe_numerics.h>

namespace transfusion_fast {

// Largest patch size and image side, the Python front's bound too (transfusion_fast.checks.MAX_SIZE):
// with p <= 2^31 - 1, p * p fits int64 and is never 0 (p = 2^32 would wrap it to 0, and the
// divisibility checks would divide by it). Every later product of sizes is checked for overflow.
constexpr int64_t kMaxSize = 2147483647;

inline void check_patch_size(const char* op, int64_t p) {
  TORCH_CHECK(p > 0 && p <= kMaxSize, op, ": patch size p must be positive and at most ", kMaxSize, ", got ", p);
}

inline void check_side(const char* op, const char* what, int64_t size) {
  TORCH_CHECK(size >= 0 && size <= kMaxSize, op, ": ", what, " must be in [0, ", kMaxSize, "], got ", size);
}

inline int64_t checked_mul(const char* op, const char* what, int64_t a, int64_t b) {
  int64_t product = 0;
  TORCH_CHECK(!c10::mul_overflows(a, b, &product), op, ": ", what, " overflows int64 (", a, " x ", b, ")");
  return product;
}

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

// The op bodies, shared by the CPU and the CUDA registrations: validation, allocation and the
// per-image loop of the packed forms. move(to_patches, images, patches, g) moves the elements of the
// tensor g describes to / from the patch rows starting at `patches`; to_patches is std::true_type
// (images -> patches) or std::false_type (patches -> images).
template <typename Move>
at::Tensor patchify_with(const at::Tensor& images, int64_t p, Move move) {
  const PatchGeometry g = patch_geometry(images, p);
  auto patches = at::empty({g.B, g.Hp * g.Wp, g.D}, images.options());
  if (patches.numel()) move(std::true_type{}, images, patches.data_ptr(), g);
  return patches;
}

template <typename Move>
at::Tensor unpatchify_with(const at::Tensor& patches_in, int64_t p, int64_t height, int64_t width, Move move) {
  TORCH_CHECK(patches_in.dim() == 3, "unpatchify: patches must be (B, N, p*p*C), got ", patches_in.dim(), " dims");
  const int64_t D = patches_in.size(2);
  check_patch_size("unpatchify", p);
  check_side("unpatchify", "height", height);
  check_side("unpatchify", "width", width);
  TORCH_CHECK(D % (p * p) == 0, "unpatchify: last dim ", D, " is not a multiple of p*p=", p * p);
  checked_mul("unpatchify", "the output size", checked_mul("unpatchify", "the output size",
              checked_mul("unpatchify", "the output size", patches_in.size(0), D / (p * p)), height), width);
  auto images = at::empty({patches_in.size(0), D / (p * p), height, width}, patches_in.options());
  const PatchGeometry g = patch_geometry(images, p);
  TORCH_CHECK(patches_in.size(1) == g.Hp * g.Wp, "unpatchify: expected ", g.Hp * g.Wp, " patches for ",
              height, "x", width, " with p=", p, ", got ", patches_in.size(1));
  const at::Tensor patches = patches_in.contiguous();
  if (patches.numel()) move(std::false_type{}, images, patches.data_ptr(), g);
  return images;
}

// Patch row `row` of `patches` (contiguous, D elements per row).
inline void* patch_row(const at::Tensor& patches, int64_t row, int64_t D) {
  return static_cast<char*>(patches.data_ptr()) + row * D * patches.element_size();
}

template <typename Move>
std::tuple<at::Tensor, at::Tensor> patchify_packed_with(at::TensorList images, int64_t p, Move move) {
  const PackedPlan plan = packed_plan(images, p);
  auto patches = at::empty({plan.offsets.back(), plan.D}, images[0].options());
  for (size_t i = 0; i < images.size(); ++i) {
    if (plan.offsets[i + 1] == plan.offsets[i]) continue;
    move(std::true_type{}, images[i], patch_row(patches, plan.offsets[i], plan.D), plan.geometry[i]);
  }
  return {patches, offsets_tensor(plan, patches.device())};
}

template <typename Move>
std::vector<at::Tensor> unpatchify_packed_with(const at::Tensor& patches_in, int64_t p, at::IntArrayRef heights,
                                               at::IntArrayRef widths, Move move) {
  const PackedPlan plan = packed_plan(patches_in, p, heights, widths);
  const at::Tensor patches = patches_in.contiguous();
  std::vector<at::Tensor> images;
  for (size_t i = 0; i < heights.size(); ++i) {
    const PatchGeometry& g = plan.geometry[i];
    images.push_back(at::empty({g.C, g.H, g.W}, patches.options()));
    if (plan.offsets[i + 1] == plan.offsets[i]) continue;
    move(std::false_type{}, images.back(), patch_row(patches, plan.offsets[i], plan.D), g);
  }
  return images;
}

}  // namespace transfusion_fast
