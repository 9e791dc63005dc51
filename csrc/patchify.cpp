// patchify / unpatchify (batched and packed): schemas, validation, CPU kernels.
// CPU: at::parallel_for over image rows (b, hp, py); each row is one of three loops picked by the
// strides: channels-last (p*C contiguous elements per patch: memcpy), channels-first with
// p = 1, 2, 4, 8 (patch features written in order from C sequential channel streams, unrolled over
// px) or any other strides (element by element).
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <cstring>
#include <vector>

#include "patchify.h"

namespace transfusion_fast {

PatchGeometry patch_geometry(const at::Tensor& images, int64_t p) {
  TORCH_CHECK(images.dim() == 4, "patchify: images must be (B, C, H, W), got ", images.dim(), " dims");
  TORCH_CHECK(p > 0, "patchify: patch size p must be positive, got ", p);
  PatchGeometry g;
  g.B = images.size(0); g.C = images.size(1); g.H = images.size(2); g.W = images.size(3); g.p = p;
  TORCH_CHECK(g.H % p == 0 && g.W % p == 0, "patchify: H and W must be divisible by p=", p,
              ", got H=", g.H, " W=", g.W);
  g.Hp = g.H / p; g.Wp = g.W / p; g.D = p * p * g.C;
  g.sb = images.stride(0); g.sc = images.stride(1); g.sh = images.stride(2); g.sw = images.stride(3);
  return g;
}

PackedPlan packed_plan(at::TensorList images, int64_t p) {
  TORCH_CHECK(!images.empty(), "patchify_packed: images must be a non-empty list");
  PackedPlan plan;
  plan.offsets.push_back(0);
  for (size_t i = 0; i < images.size(); ++i) {
    const at::Tensor& image = images[i];
    TORCH_CHECK(image.dim() == 3, "patchify_packed: images[", i, "] must be (C, H, W), got ", image.sizes());
    TORCH_CHECK(image.scalar_type() == images[0].scalar_type() && image.device() == images[0].device() &&
                    image.size(0) == images[0].size(0),
                "patchify_packed: images[", i, "] must match images[0] in C, dtype and device");
    plan.geometry.push_back(patch_geometry(image.unsqueeze(0), p));
    plan.offsets.push_back(plan.offsets.back() + plan.geometry.back().Hp * plan.geometry.back().Wp);
  }
  plan.D = plan.geometry[0].D;
  return plan;
}

PackedPlan packed_plan(const at::Tensor& patches, int64_t p, at::IntArrayRef heights, at::IntArrayRef widths) {
  TORCH_CHECK(patches.dim() == 2, "unpatchify_packed: patches must be (total_patches, p*p*C), got ", patches.sizes());
  TORCH_CHECK(p > 0 && patches.size(1) % (p * p) == 0, "unpatchify_packed: last dim ", patches.size(1),
              " is not a multiple of p*p=", p * p);
  TORCH_CHECK(!heights.empty() && heights.size() == widths.size(),
              "unpatchify_packed: heights and widths must be non-empty lists of one length");
  PackedPlan plan;
  plan.offsets.push_back(0);
  const int64_t C = patches.size(1) / (p * p);
  for (size_t i = 0; i < heights.size(); ++i) {
    TORCH_CHECK(heights[i] > 0 && widths[i] > 0 && heights[i] % p == 0 && widths[i] % p == 0,
                "unpatchify_packed: image ", i, " size ", heights[i], "x", widths[i], " is not a positive multiple of p=", p);
    // Output images are fresh contiguous (C, H, W) tensors.
    PatchGeometry g{1, C, heights[i], widths[i], p, heights[i] / p, widths[i] / p, p * p * C,
                    C * heights[i] * widths[i], heights[i] * widths[i], widths[i], 1};
    plan.geometry.push_back(g);
    plan.offsets.push_back(plan.offsets.back() + g.Hp * g.Wp);
  }
  TORCH_CHECK(plan.offsets.back() == patches.size(0), "unpatchify_packed: the image sizes give ", plan.offsets.back(),
              " patches, got ", patches.size(0));
  plan.D = patches.size(1);
  return plan;
}

namespace {

template <typename T, bool ToPatches>
inline void move(T* image_element, T* patch_element) {
  if constexpr (ToPatches) *patch_element = *image_element; else *image_element = *patch_element;
}

// One image row of a channels-first image (contiguous along w, channels sc apart) to or from its
// patch features, walking the written side in order: patchify writes the patch features in order
// from C sequential channel streams, unpatchify writes each channel row in order.
// CT > 0: the channel count known at compile time (fully unrolled inner loops), else C.
template <typename T, bool ToPatches, int P, int CT>
inline void channels_first_row(T* img_row, int64_t sc, T* patch_base, int64_t Wp, int64_t D, int64_t runtime_C) {
  const int64_t C = CT > 0 ? CT : runtime_C;
  if constexpr (ToPatches) {
    for (int64_t wp = 0; wp < Wp; ++wp) {
      T* in = img_row + wp * P;
      T* out = patch_base + wp * D;
      for (int px = 0; px < P; ++px) {
        for (int64_t c = 0; c < C; ++c) out[px * C + c] = in[px + c * sc];
      }
    }
  } else {
    for (int64_t c = 0; c < C; ++c) {
      T* out = img_row + c * sc;
      T* in = patch_base + c;
      for (int64_t wp = 0; wp < Wp; ++wp) {
        for (int px = 0; px < P; ++px) out[wp * P + px] = in[wp * D + px * C];
      }
    }
  }
}

template <typename T, bool ToPatches, int P>
inline void channels_first_dispatch_c(T* img_row, T* patch_base, const PatchGeometry& g) {
  switch (g.C) {
    case 1: channels_first_row<T, ToPatches, P, 1>(img_row, g.sc, patch_base, g.Wp, g.D, g.C); break;
    case 3: channels_first_row<T, ToPatches, P, 3>(img_row, g.sc, patch_base, g.Wp, g.D, g.C); break;
    case 4: channels_first_row<T, ToPatches, P, 4>(img_row, g.sc, patch_base, g.Wp, g.D, g.C); break;
    default: channels_first_row<T, ToPatches, P, 0>(img_row, g.sc, patch_base, g.Wp, g.D, g.C); break;
  }
}

template <typename T, bool ToPatches>
inline void channels_first_dispatch(T* img_row, T* patch_base, const PatchGeometry& g) {
  switch (g.p) {
    case 1: channels_first_dispatch_c<T, ToPatches, 1>(img_row, patch_base, g); break;
    case 2: channels_first_dispatch_c<T, ToPatches, 2>(img_row, patch_base, g); break;
    case 4: channels_first_dispatch_c<T, ToPatches, 4>(img_row, patch_base, g); break;
    default: channels_first_dispatch_c<T, ToPatches, 8>(img_row, patch_base, g); break;
  }
}

template <typename T, bool ToPatches>
void patch_rows_cpu(T* img, T* patches, const PatchGeometry& g) {
  const int64_t rows = g.B * g.Hp * g.p;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(g.W * g.C, 1));
  const bool channels_last = g.sc == 1 && g.sw == g.C;
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t py = r % g.p, hp = (r / g.p) % g.Hp, b = r / (g.p * g.Hp);
      T* img_row = img + b * g.sb + (hp * g.p + py) * g.sh;
      T* patch_base = patches + (b * g.Hp * g.Wp + hp * g.Wp) * g.D + py * g.p * g.C;
      if (channels_last) {
        const size_t bytes = sizeof(T) * g.p * g.C;
        for (int64_t wp = 0; wp < g.Wp; ++wp) {
          T* pixels = img_row + wp * g.p * g.C;
          T* features = patch_base + wp * g.D;
          if (ToPatches) std::memcpy(features, pixels, bytes); else std::memcpy(pixels, features, bytes);
        }
      } else if (g.sw == 1 && (g.p == 1 || g.p == 2 || g.p == 4 || g.p == 8)) {
        channels_first_dispatch<T, ToPatches>(img_row, patch_base, g);
      } else {
        for (int64_t w = 0; w < g.W; ++w) {
          T* out = patch_base + (w / g.p) * g.D + (w % g.p) * g.C;
          T* in = img_row + w * g.sw;
          for (int64_t c = 0; c < g.C; ++c) move<T, ToPatches>(in + c * g.sc, out + c);
        }
      }
    }
  });
}

// images: the tensor g describes; patches: the first patch row this image owns.
template <bool ToPatches>
void patch_kernel_cpu(const at::Tensor& images, void* patches, const PatchGeometry& g) {
  dispatch_element_bits(images, "patchify", [&](auto bits) {
    using T = decltype(bits);
    patch_rows_cpu<T, ToPatches>(static_cast<T*>(images.data_ptr()), static_cast<T*>(patches), g);
  });
}

}  // namespace

at::Tensor patchify_cpu(const at::Tensor& images, int64_t p) {
  auto g = patch_geometry(images, p);
  auto patches = at::empty({g.B, g.Hp * g.Wp, g.D}, images.options());
  if (patches.numel()) patch_kernel_cpu<true>(images, patches.data_ptr(), g);
  return patches;
}

at::Tensor unpatchify_cpu(const at::Tensor& patches_in, int64_t p, int64_t height, int64_t width) {
  TORCH_CHECK(patches_in.dim() == 3, "unpatchify: patches must be (B, N, p*p*C), got ", patches_in.dim(), " dims");
  const int64_t D = patches_in.size(2);
  TORCH_CHECK(p > 0 && D % (p * p) == 0, "unpatchify: last dim ", D, " is not a multiple of p*p=", p * p);
  auto images = at::empty({patches_in.size(0), D / (p * p), height, width}, patches_in.options());
  auto g = patch_geometry(images, p);
  TORCH_CHECK(patches_in.size(1) == g.Hp * g.Wp, "unpatchify: expected ", g.Hp * g.Wp, " patches for ",
              height, "x", width, " with p=", p, ", got ", patches_in.size(1));
  auto patches = patches_in.contiguous();
  if (patches.numel()) patch_kernel_cpu<false>(images, patches.data_ptr(), g);
  return images;
}

std::tuple<at::Tensor, at::Tensor> patchify_packed_cpu(at::TensorList images, int64_t p) {
  const PackedPlan plan = packed_plan(images, p);
  auto patches = at::empty({plan.offsets.back(), plan.D}, images[0].options());
  for (size_t i = 0; i < images.size(); ++i) {
    if (plan.offsets[i + 1] == plan.offsets[i]) continue;
    patch_kernel_cpu<true>(images[i], static_cast<char*>(patches.data_ptr()) +
                                          plan.offsets[i] * plan.D * patches.element_size(), plan.geometry[i]);
  }
  return {patches, offsets_tensor(plan, patches.device())};
}

std::vector<at::Tensor> unpatchify_packed_cpu(const at::Tensor& patches_in, int64_t p, at::IntArrayRef heights,
                                              at::IntArrayRef widths) {
  const PackedPlan plan = packed_plan(patches_in, p, heights, widths);
  const at::Tensor patches = patches_in.contiguous();
  std::vector<at::Tensor> images;
  for (size_t i = 0; i < heights.size(); ++i) {
    const PatchGeometry& g = plan.geometry[i];
    images.push_back(at::empty({g.C, g.H, g.W}, patches.options()));
    patch_kernel_cpu<false>(images.back(), static_cast<char*>(patches.data_ptr()) +
                                               plan.offsets[i] * plan.D * patches.element_size(), g);
  }
  return images;
}

at::Tensor offsets_tensor(const PackedPlan& plan, const at::Device& device) {
  return at::tensor(plan.offsets, at::TensorOptions().dtype(at::kLong)).to(device);
}

TORCH_LIBRARY_FRAGMENT(transfusion_fast, m) {
  m.def("patchify(Tensor images, int p) -> Tensor");
  m.def("unpatchify(Tensor patches, int p, int height, int width) -> Tensor");
  m.def("patchify_packed(Tensor[] images, int p) -> (Tensor, Tensor)");
  m.def("unpatchify_packed(Tensor patches, int p, int[] heights, int[] widths) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(transfusion_fast, CPU, m) {
  m.impl("patchify", &patchify_cpu);
  m.impl("unpatchify", &unpatchify_cpu);
  m.impl("patchify_packed", &patchify_packed_cpu);
  m.impl("unpatchify_packed", &unpatchify_packed_cpu);
}

}  // namespace transfusion_fast
