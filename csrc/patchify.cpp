// patchify / unpatchify (batched and packed): schemas, validation, CPU kernels.
// CPU: at::parallel_for over patch rows (b, hp). Each image row is one of three loops picked by the
// strides: channels-last (p*C contiguous elements per patch: memcpy), channels-first with
// p = 1, 2, 4, 8 (an interleave / de-interleave of C channel streams through an L1 tile, with the
// p image rows of a patch row done back to back, so the patch side is one contiguous stream) or any
// other strides (element by element). Outputs of 8 MiB and more are written with non-temporal
// stores on the contiguous side; the loops are compiled once per vector width (run-time choice).
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "isa.h"
#include "patchify.h"

namespace transfusion_fast {

PatchGeometry patch_geometry(const at::Tensor& images, int64_t p) {
  TORCH_CHECK(images.dim() == 4, "patchify: images must be (B, C, H, W), got ", images.dim(), " dims");
  check_patch_size("patchify", p);
  PatchGeometry g;
  g.B = images.size(0); g.C = images.size(1); g.H = images.size(2); g.W = images.size(3); g.p = p;
  TORCH_CHECK(g.H % p == 0 && g.W % p == 0, "patchify: H and W must be divisible by p=", p,
              ", got H=", g.H, " W=", g.W);
  g.Hp = g.H / p; g.Wp = g.W / p; g.D = checked_mul("patchify", "p*p*C", p * p, g.C);
  checked_mul("patchify", "the number of patches", g.B, checked_mul("patchify", "the number of patches", g.Hp, g.Wp));
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
    int64_t end = 0;
    TORCH_CHECK(!c10::add_overflows(plan.offsets.back(), plan.geometry.back().Hp * plan.geometry.back().Wp, &end),
                "patchify_packed: the number of patches overflows int64");
    plan.offsets.push_back(end);
  }
  plan.D = plan.geometry[0].D;
  return plan;
}

PackedPlan packed_plan(const at::Tensor& patches, int64_t p, at::IntArrayRef heights, at::IntArrayRef widths) {
  TORCH_CHECK(patches.dim() == 2, "unpatchify_packed: patches must be (total_patches, p*p*C), got ", patches.sizes());
  check_patch_size("unpatchify_packed", p);
  TORCH_CHECK(patches.size(1) % (p * p) == 0, "unpatchify_packed: last dim ", patches.size(1),
              " is not a multiple of p*p=", p * p);
  TORCH_CHECK(!heights.empty() && heights.size() == widths.size(),
              "unpatchify_packed: heights and widths must be non-empty lists of one length");
  PackedPlan plan;
  plan.offsets.push_back(0);
  const int64_t C = patches.size(1) / (p * p);
  for (size_t i = 0; i < heights.size(); ++i) {
    TORCH_CHECK(heights[i] > 0 && widths[i] > 0 && heights[i] % p == 0 && widths[i] % p == 0,
                "unpatchify_packed: image ", i, " size ", heights[i], "x", widths[i], " is not a positive multiple of p=", p);
    check_side("unpatchify_packed", "height", heights[i]);
    check_side("unpatchify_packed", "width", widths[i]);
    // Output images are fresh contiguous (C, H, W) tensors.
    PatchGeometry g{1, C, heights[i], widths[i], p, heights[i] / p, widths[i] / p, p * p * C,
                    checked_mul("unpatchify_packed", "an image's size", C, heights[i] * widths[i]),
                    heights[i] * widths[i], widths[i], 1};
    plan.geometry.push_back(g);
    int64_t end = 0;
    TORCH_CHECK(!c10::add_overflows(plan.offsets.back(), g.Hp * g.Wp, &end),
                "unpatchify_packed: the number of patches overflows int64");
    plan.offsets.push_back(end);
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

// Outputs of at least this size are written with non-temporal stores on the patch side of the
// blocked kernels: far larger than L2, they would only evict the input on the way, and the stores
// skip the read-for-ownership of every output line (one memory stream fewer than a plain copy:
// measured ~25% faster than regular stores for 16 MiB that is not in cache, the same when it is).
constexpr int64_t kStreamBytes = int64_t{8} << 20;

#if TF_X86
__attribute__((target("avx512f"))) void stream_copy_avx512(char* dst, const char* src, size_t bytes) {
  for (size_t i = 0; i < bytes; i += 64) {
    _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + i), _mm512_loadu_si512(src + i));
  }
}

__attribute__((target("avx2"))) void stream_copy_avx2(char* dst, const char* src, size_t bytes) {
  for (size_t i = 0; i < bytes; i += 32) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i),
                        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i)));
  }
}

#endif  // TF_X86

// memcpy with non-temporal stores for the 64-byte-aligned whole lines of dst (the caller fences);
// a plain memcpy where the build has no x86 path or the CPU neither AVX-512 nor AVX2.
void stream_copy(void* dst_ptr, const void* src_ptr, size_t bytes) {
#if TF_X86
  static const int width = __builtin_cpu_supports("avx512f") ? 64 : __builtin_cpu_supports("avx2") ? 32 : 0;
#else
  constexpr int width = 0;
#endif
  auto* dst = static_cast<char*>(dst_ptr);
  const auto* src = static_cast<const char*>(src_ptr);
  const size_t head = std::min<size_t>(bytes, (64 - reinterpret_cast<uintptr_t>(dst) % 64) % 64);
  std::memcpy(dst, src, head);
  dst += head; src += head; bytes -= head;
  const size_t body = width ? bytes & ~size_t{63} : 0;
#if TF_X86
  if (width == 64) stream_copy_avx512(dst, src, body);
  else if (width == 32) stream_copy_avx2(dst, src, body);
#endif
  std::memcpy(dst + body, src + body, bytes - body);
}

// One image row of a channels-first image (contiguous along w, channels sc apart) to or from its
// patch features, through a pixel-major tile (tile[w * C + c]) that stays in L1: one side is an
// interleave / de-interleave of C channel streams with a compile-time C (vectorized with shuffles),
// the other copies the p * C contiguous features of each patch row.
// CT > 0: the channel count known at compile time (fully unrolled inner loops), else C.
constexpr int64_t kTileBytes = 16384;

template <typename T, bool ToPatches, int P, int CT>
inline void channels_first_row(T* img_row, int64_t sc, T* patch_base, int64_t Wp, int64_t D, int64_t runtime_C,
                               bool stream) {
  const int64_t C = CT > 0 ? CT : runtime_C;
  constexpr int64_t kTileElements = kTileBytes / sizeof(T);
  alignas(64) T tile[kTileElements];
  const int64_t tile_wp = kTileElements / (P * C);  // >= 1: the caller checks P * C <= kTileElements
  for (int64_t wp0 = 0; wp0 < Wp; wp0 += tile_wp) {
    const int64_t n_wp = std::min(tile_wp, Wp - wp0), n_w = n_wp * P;
    T* img = img_row + wp0 * P;
    T* patch = patch_base + wp0 * D;
    if constexpr (ToPatches) {
      for (int64_t w = 0; w < n_w; ++w) {
        for (int64_t c = 0; c < C; ++c) tile[w * C + c] = img[c * sc + w];
      }
      for (int64_t wp = 0; wp < n_wp; ++wp) std::memcpy(patch + wp * D, tile + wp * P * C, sizeof(T) * P * C);
    } else {
      for (int64_t wp = 0; wp < n_wp; ++wp) std::memcpy(tile + wp * P * C, patch + wp * D, sizeof(T) * P * C);
      if (stream) {  // channel rows built in L1, then written around the caches
        alignas(64) T rows[kTileElements];
        for (int64_t w = 0; w < n_w; ++w) {
          for (int64_t c = 0; c < C; ++c) rows[c * n_w + w] = tile[w * C + c];
        }
        for (int64_t c = 0; c < C; ++c) stream_copy(img + c * sc, rows + c * n_w, sizeof(T) * n_w);
      } else {
        for (int64_t w = 0; w < n_w; ++w) {
          for (int64_t c = 0; c < C; ++c) img[c * sc + w] = tile[w * C + c];
        }
      }
    }
  }
}

template <typename T, bool ToPatches, int P>
inline void channels_first_dispatch_c(T* img_row, T* patch_base, int64_t Wp, const PatchGeometry& g, bool stream) {
  switch (g.C) {
    case 1: channels_first_row<T, ToPatches, P, 1>(img_row, g.sc, patch_base, Wp, g.D, g.C, stream); break;
    case 3: channels_first_row<T, ToPatches, P, 3>(img_row, g.sc, patch_base, Wp, g.D, g.C, stream); break;
    case 4: channels_first_row<T, ToPatches, P, 4>(img_row, g.sc, patch_base, Wp, g.D, g.C, stream); break;
    default: channels_first_row<T, ToPatches, P, 0>(img_row, g.sc, patch_base, Wp, g.D, g.C, stream); break;
  }
}

template <typename T, bool ToPatches>
inline void channels_first_dispatch(T* img_row, T* patch_base, int64_t Wp, const PatchGeometry& g, bool stream) {
  switch (g.p) {
    case 1: channels_first_dispatch_c<T, ToPatches, 1>(img_row, patch_base, Wp, g, stream); break;
    case 2: channels_first_dispatch_c<T, ToPatches, 2>(img_row, patch_base, Wp, g, stream); break;
    case 4: channels_first_dispatch_c<T, ToPatches, 4>(img_row, patch_base, Wp, g, stream); break;
    default: channels_first_dispatch_c<T, ToPatches, 8>(img_row, patch_base, Wp, g, stream); break;
  }
}

// One image row r = (b, hp, py), picked by the strides: channels-last (memcpy of p*C elements per
// patch), channels-first through the tile, or element by element.
template <typename T, bool ToPatches>
inline void patch_row(T* img, T* patches, const PatchGeometry& g, int64_t b, int64_t hp, int64_t py) {
  T* img_row = img + b * g.sb + (hp * g.p + py) * g.sh;
  T* patch_base = patches + (b * g.Hp * g.Wp + hp * g.Wp) * g.D + py * g.p * g.C;
  if (g.sc == 1 && g.sw == g.C) {
    const size_t bytes = sizeof(T) * g.p * g.C;
    for (int64_t wp = 0; wp < g.Wp; ++wp) {
      T* pixels = img_row + wp * g.p * g.C;
      T* features = patch_base + wp * g.D;
      if (ToPatches) std::memcpy(features, pixels, bytes); else std::memcpy(pixels, features, bytes);
    }
  } else if (g.sw == 1 && (g.p == 1 || g.p == 2 || g.p == 4 || g.p == 8) &&
             g.p * g.C * static_cast<int64_t>(sizeof(T)) <= kTileBytes) {
    channels_first_dispatch<T, ToPatches>(img_row, patch_base, g.Wp, g, false);
  } else {
    for (int64_t w = 0; w < g.W; ++w) {
      T* out = patch_base + (w / g.p) * g.D + (w % g.p) * g.C;
      T* in = img_row + w * g.sw;
      for (int64_t c = 0; c < g.C; ++c) move<T, ToPatches>(in + c * g.sc, out + c);
    }
  }
}

// Patch rows [begin, end) (u = (b, hp): p image rows <-> Wp patches). Channels-first images go
// through an L1 block of whole patches, so the patch side is one contiguous stream (full cache
// lines, written or read once) instead of p passes over half-lines.
constexpr int64_t kBlockBytes = 32768;

template <typename T, bool ToPatches>
inline void patch_row_range(T* img, T* patches, const PatchGeometry& g, int64_t begin, int64_t end, bool stream) {
  constexpr int64_t kBlockElements = kBlockBytes / sizeof(T);
  const bool blocked = !(g.sc == 1 && g.sw == g.C) && g.sw == 1 && (g.p == 1 || g.p == 2 || g.p == 4 || g.p == 8) &&
                       g.D <= kBlockElements && g.p * g.C * static_cast<int64_t>(sizeof(T)) <= kTileBytes;
  alignas(64) T block[kBlockElements];
  for (int64_t u = begin; u < end; ++u) {
    const int64_t hp = u % g.Hp, b = u / g.Hp;
    if (!blocked) {
      for (int64_t py = 0; py < g.p; ++py) patch_row<T, ToPatches>(img, patches, g, b, hp, py);
      continue;
    }
    const int64_t block_wp = kBlockElements / g.D;
    T* patch_row_base = patches + (b * g.Hp * g.Wp + hp * g.Wp) * g.D;
    for (int64_t wp0 = 0; wp0 < g.Wp; wp0 += block_wp) {
      const int64_t n_wp = std::min(block_wp, g.Wp - wp0);
      // Unpatchify reads the patches in place: the p image rows of a chunk are done one after the
      // other, so the lines the first row misses serve the others from L1.
      T* patch_side = ToPatches ? block : patch_row_base + wp0 * g.D;
      for (int64_t py = 0; py < g.p; ++py) {
        T* img_row = img + b * g.sb + (hp * g.p + py) * g.sh + wp0 * g.p;
        channels_first_dispatch<T, ToPatches>(img_row, patch_side + py * g.p * g.C, n_wp, g, stream);
      }
      if (ToPatches && stream) stream_copy(patch_row_base + wp0 * g.D, block, sizeof(T) * n_wp * g.D);
      else if (ToPatches) std::memcpy(patch_row_base + wp0 * g.D, block, sizeof(T) * n_wp * g.D);
    }
  }
}

// One clone per vector width, picked at load time: the (de-)interleave of the tile is shuffle work,
// which is what bounds these kernels on one thread (they only move bits: every clone is exact).
#define TF_PATCH_ROWS_CLONES(T)                                                                            \
  TF_TARGET_CLONES __attribute__((flatten)) void patch_row_range_any(                                      \
      bool to_patches, T* img, T* patches, const PatchGeometry& g, int64_t begin, int64_t end, bool stream) { \
    if (to_patches) patch_row_range<T, true>(img, patches, g, begin, end, stream);                          \
    else patch_row_range<T, false>(img, patches, g, begin, end, stream);                                     \
  }
TF_PATCH_ROWS_CLONES(uint8_t)
TF_PATCH_ROWS_CLONES(uint16_t)
TF_PATCH_ROWS_CLONES(uint32_t)
TF_PATCH_ROWS_CLONES(uint64_t)
#undef TF_PATCH_ROWS_CLONES

template <typename T, bool ToPatches>
void patch_rows_cpu(T* img, T* patches, const PatchGeometry& g) {
  const int64_t units = g.B * g.Hp;  // patch rows
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(g.p * g.W * g.C, 1));
  const bool stream = g.B * g.C * g.H * g.W * static_cast<int64_t>(sizeof(T)) >= kStreamBytes;
  at::parallel_for(0, units, grain, [&](int64_t begin, int64_t end) {
    patch_row_range_any(ToPatches, img, patches, g, begin, end, stream);
#if TF_X86
    if (stream) _mm_sfence();  // non-temporal stores are weakly ordered: publish them
#endif
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

// The op bodies live in patchify.h, shared with the CUDA registration; this moves the elements.
constexpr auto move_cpu = [](auto to_patches, const at::Tensor& images, void* patches, const PatchGeometry& g) {
  patch_kernel_cpu<decltype(to_patches)::value>(images, patches, g);
};

at::Tensor patchify_cpu(const at::Tensor& images, int64_t p) { return patchify_with(images, p, move_cpu); }

at::Tensor unpatchify_cpu(const at::Tensor& patches, int64_t p, int64_t height, int64_t width) {
  return unpatchify_with(patches, p, height, width, move_cpu);
}

std::tuple<at::Tensor, at::Tensor> patchify_packed_cpu(at::TensorList images, int64_t p) {
  return patchify_packed_with(images, p, move_cpu);
}

std::vector<at::Tensor> unpatchify_packed_cpu(const at::Tensor& patches, int64_t p, at::IntArrayRef heights,
                                              at::IntArrayRef widths) {
  return unpatchify_packed_with(patches, p, heights, widths, move_cpu);
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
