#pragma once
// Index arithmetic of patchify shared by the CPU and CUDA kernels.
// images (B, C, H, W) with any strides  <->  patches (B, (H/p)(W/p), p*p*C) contiguous,
// patch n = hp * (W/p) + wp, feature f = (py * p + px) * C + c  (channels last inside a patch).
#include <cstdint>

namespace transfusion_fast {

struct PatchGeometry {
  int64_t B, C, H, W, p, Hp, Wp, D;   // D = p * p * C
  int64_t sb, sc, sh, sw;             // image strides, in elements
};

}  // namespace transfusion_fast
