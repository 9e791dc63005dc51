// patchify / unpatchify: schema, CPU kernels (at::parallel_for over patch rows).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

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

// Walks one (b, hp, py) image row segment: W pixels, each C channels, into its patch rows.
// ToPatches selects the direction; the same loop serves patchify and unpatchify.
template <typename T, bool ToPatches>
void patch_rows_cpu(T* img, T* patches, const PatchGeometry& g) {
  const int64_t rows = g.B * g.Hp * g.p;
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t py = r % g.p, hp = (r / g.p) % g.Hp, b = r / (g.p * g.Hp);
      const int64_t h = hp * g.p + py;
      T* img_row = img + b * g.sb + h * g.sh;
      T* patch_base = patches + (b * g.Hp * g.Wp + hp * g.Wp) * g.D + py * g.p * g.C;
      for (int64_t w = 0; w < g.W; ++w) {
        const int64_t wp = w / g.p, px = w % g.p;
        T* out = patch_base + wp * g.D + px * g.C;
        T* in = img_row + w * g.sw;
        if (g.sc == 1) {  // channels last: C contiguous values on both sides
          if (ToPatches) std::copy(in, in + g.C, out); else std::copy(out, out + g.C, in);
        } else {
          for (int64_t c = 0; c < g.C; ++c) {
            if (ToPatches) out[c] = in[c * g.sc]; else in[c * g.sc] = out[c];
          }
        }
      }
    }
  });
}

at::Tensor patchify_cpu(const at::Tensor& images, int64_t p) {
  auto g = patch_geometry(images, p);
  auto patches = at::empty({g.B, g.Hp * g.Wp, g.D}, images.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, images.scalar_type(), "patchify_cpu", [&] {
    patch_rows_cpu<scalar_t, true>(const_cast<scalar_t*>(images.const_data_ptr<scalar_t>()),
                                   patches.mutable_data_ptr<scalar_t>(), g);
  });
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, patches.scalar_type(), "unpatchify_cpu", [&] {
    patch_rows_cpu<scalar_t, false>(images.mutable_data_ptr<scalar_t>(),
                                    const_cast<scalar_t*>(patches.const_data_ptr<scalar_t>()), g);
  });
  return images;
}

TORCH_LIBRARY_FRAGMENT(transfusion_fast, m) {
  m.def("patchify(Tensor images, int p) -> Tensor");
  m.def("unpatchify(Tensor patches, int p, int height, int width) -> Tensor");
}

TORCH_LIBRARY_IMPL(transfusion_fast, CPU, m) {
  m.impl("patchify", &patchify_cpu);
  m.impl("unpatchify", &unpatchify_cpu);
}

}  // namespace transfusion_fast
