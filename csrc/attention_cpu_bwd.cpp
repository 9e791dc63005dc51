// Backward of the block-sparse CPU attention: one task per (kv head, chunk of key tiles); it owns
// dK/dV of its key tiles (summed over the GQA group inside the task) and accumulates dQ of the
// group's query heads in a buffer of its own, written out into the slice of dq private to its
// chunk: no two tasks write the same memory, so results do not depend on the thread count or on
// scheduling (deterministic). P is recomputed from the LSE and dS = P * (dP - delta) with delta =
// rowsum(dO * O) (minus the gradient of the LSE, when the LSE itself is differentiated).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "attention_cpu.h"
#include "attention_cpu_scratch.h"
#include "attention_cpu_walk.h"

namespace transfusion_fast::attention_cpu {
namespace {

// Rows per backward GEMM: consecutive visited query tiles of a key tile are merged up to this many
// rows (docs/cpu_attention.md has the sweep: fewer, longer products, up to the point where the
// tile buffers leave the L2 cache).
constexpr int64_t kBackwardGemmRows = 256;

// The backward's mirror of the forward's walk: inside a key tile, the keys of one document (same
// q_end) form a segment that only meets its own query rows; the rows that see every key of the
// segment run mask-free over all its keys, the rest in key sub-blocks of kMaskedCols.
constexpr int64_t kMaskedCols = 32;
constexpr int64_t kMinSegmentCols = 16;

// Row stride of head_dim-wide rows copied out of a (T, H, D) tensor: padded so that it is never a
// power of two.
constexpr int64_t packed_stride(int64_t d) { return d % 32 == 0 ? d + 16 : d; }

// dst[i * ld + d] = src[i * s0 + d] for `count` rows of `dim` elements.
template <typename T>
void copy_rows(const T* src, int64_t s0, int64_t count, int64_t dim, T* dst, int64_t ld) {
  for (int64_t i = 0; i < count; ++i) std::copy_n(src + i * s0, dim, dst + i * ld);
}

template <typename T>
void backward_kernel(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v, const at::Tensor& lse, const at::Tensor& delta,
                     at::Tensor& dq_parts, at::Tensor& dk, at::Tensor& dv, const int32_t* kv_start,
                     const int32_t* kv_end, const int32_t* q_start, const int32_t* q_end,
                     const int32_t* q_lo, const int32_t* q_hi, const int32_t* q_full_lo,
                     const int32_t* q_full_hi, const Geometry& g, int64_t num_chunks, T scale, Isa isa) {
  const T* qp = q.const_data_ptr<T>();
  const T* kp = k.const_data_ptr<T>();
  const T* vp = v.const_data_ptr<T>();
  const T* dop = grad_out.const_data_ptr<T>();
  const T* lp = lse.const_data_ptr<T>();
  const T* deltap = delta.const_data_ptr<T>();
  T* dqp = dq_parts.mutable_data_ptr<T>();
  T* dkp = dk.mutable_data_ptr<T>();
  T* dvp = dv.mutable_data_ptr<T>();
  const int64_t sq0 = q.stride(0), sq1 = q.stride(1), sk0 = k.stride(0), sk1 = k.stride(1);
  const int64_t sv0 = v.stride(0), sv1 = v.stride(1);
  const int64_t sdo0 = grad_out.stride(0), sdo1 = grad_out.stride(1);
  const int64_t sdq0 = g.hq * g.d, dq_part_size = g.tq * g.hq * g.d;
  const int64_t num_n = (g.tk + g.bn - 1) / g.bn;

  // Split the key tiles of each kv head into num_chunks runs of about equal work.
  std::vector<int64_t> prefix(num_n + 1, 0);
  for (int64_t n = 0; n < num_n; ++n) prefix[n + 1] = prefix[n] + 1 + (q_hi[n] - q_lo[n]);
  std::vector<int64_t> bounds(num_chunks + 1, num_n);
  bounds[0] = 0;
  for (int64_t c = 1; c < num_chunks; ++c) {
    const int64_t target = prefix[num_n] * c / num_chunks;
    bounds[c] = std::lower_bound(prefix.begin(), prefix.end(), target) - prefix.begin();
  }
  std::vector<int64_t> work(g.hkv * num_chunks);
  for (int64_t t = 0; t < g.hkv * num_chunks; ++t) {
    const int64_t c = t % num_chunks;
    work[t] = prefix[bounds[c + 1]] - prefix[bounds[c]];
  }

  // Query rows per GEMM: consecutive visited rows are contiguous, so one GEMM covers up to
  // max_rows of them.
  const int64_t max_rows = std::max<int64_t>(kBackwardGemmRows, g.bm);
  // The task's keys and values as (D, keys).
  int64_t max_keys = 0;
  for (int64_t c = 0; c < num_chunks; ++c) {
    max_keys = std::max(max_keys, std::min(bounds[c + 1] * g.bn, g.tk) - bounds[c] * g.bn);
  }
  const int64_t ld_t = transposed_stride(max_keys);
  // The query rows each chunk's key tiles visit: a task accumulates dQ of its group's heads over
  // them in its own contiguous (group, rows, D) buffer, whose rows the prefetchers follow (in place,
  // the D-wide pieces of dq's (T, H, D) rows missed once per line), and writes its slice of
  // dq_parts out at the end, zeros outside the rows.
  std::vector<int64_t> rows_lo(num_chunks, 0), rows_hi(num_chunks, 0);
  int64_t max_visited = 0;
  for (int64_t c = 0; c < num_chunks; ++c) {
    int64_t lo = g.tq, hi = 0;
    for (int64_t n = bounds[c]; n < bounds[c + 1]; ++n) {
      if (q_lo[n] >= q_hi[n]) continue;
      lo = std::min<int64_t>(lo, q_lo[n] * g.bm);
      hi = std::max<int64_t>(hi, std::min<int64_t>(q_hi[n] * g.bm, g.tq));
    }
    if (lo < hi) {
      rows_lo[c] = lo;
      rows_hi[c] = hi;
      max_visited = std::max(max_visited, hi - lo);
    }
  }
  // The task's query rows, output gradient rows and keys, copied into contiguous rows of stride
  // ld_rows: in (T, H, D) their D-wide pieces lie H * D apart, a power of two for the usual head
  // counts, and a product's panel of up to max_rows such pieces then falls into a few L1 sets.
  const int64_t ld_rows = packed_stride(g.d);
  const int64_t scratch_count = 2 * max_rows * g.bn + 2 * g.bn * g.d + 2 * g.d * ld_t + g.group * max_visited * g.d +
                                2 * g.group * max_visited * ld_rows + max_keys * ld_rows +
                                std::max(max_rows, g.bn) * g.d;
  run_tasks<T>(heaviest_first(work), scratch_count, [&](T* scratch) {
    return [=, &g, &bounds](int64_t t) {
      const int64_t hk = t / num_chunks, c = t % num_chunks;
      T* P = scratch;
      T* dS = P + max_rows * g.bn;
      T* dK = dS + max_rows * g.bn;
      T* dV = dK + g.bn * g.d;
      T* kt_t = dV + g.bn * g.d;
      T* vt_t = kt_t + g.d * ld_t;
      T* dq_rows = vt_t + g.d * ld_t;   // (group, max_visited, D)
      T* q_rows = dq_rows + g.group * max_visited * g.d;     // (group, max_visited, ld_rows)
      T* do_rows = q_rows + g.group * max_visited * ld_rows;  // (group, max_visited, ld_rows)
      T* k_rows = do_rows + g.group * max_visited * ld_rows;  // (max_keys, ld_rows)
      T* product = k_rows + max_keys * ld_rows;   // a masked block's product (masked_accumulate)
      const int64_t row0 = rows_lo[c], visited = rows_hi[c] - rows_lo[c];
      for (int64_t i = 0; i < g.group; ++i) std::fill_n(dq_rows + i * max_visited * g.d, visited * g.d, T(0));
      const int64_t k0 = bounds[c] * g.bn, k1 = std::min(bounds[c + 1] * g.bn, g.tk);
      for (int64_t i = 0; i < g.group; ++i) {
        const int64_t h = hk * g.group + i;
        copy_rows(qp + row0 * sq0 + h * sq1, sq0, visited, g.d, q_rows + i * max_visited * ld_rows, ld_rows);
        copy_rows(dop + row0 * sdo0 + h * sdo1, sdo0, visited, g.d, do_rows + i * max_visited * ld_rows, ld_rows);
      }
      copy_rows(kp + k0 * sk0 + hk * sk1, sk0, k1 - k0, g.d, k_rows, ld_rows);
      transpose_keys(isa, kp + k0 * sk0 + hk * sk1, sk0, k1 - k0, g.d, kt_t, ld_t);
      transpose_keys(isa, vp + k0 * sv0 + hk * sv1, sv0, k1 - k0, g.d, vt_t, ld_t);
      for (int64_t n = bounds[c]; n < bounds[c + 1]; ++n) {
        const int64_t c0 = n * g.bn, cols = std::min(g.bn, g.tk - c0);
        std::fill(dK, dK + 2 * g.bn * g.d, T(0));
        // Keys [ja, jb) x query rows [r_lo, r_hi) of head h, in GEMMs of up to max_rows rows;
        // mask_start == nullptr: no mask.
        const auto block = [&](int64_t h, int64_t ja, int64_t jb, int64_t r_lo, int64_t r_hi,
                               const int32_t* mask_start) {
          const int64_t w = jb - ja;
          T* dKj = dK + (ja - c0) * g.d;
          T* dVj = dV + (ja - c0) * g.d;
          const T* kj = k_rows + (ja - k0) * ld_rows;
          const int64_t head_rows = (h - hk * g.group) * max_visited - row0;   // + r: row r of head h
          for (int64_t r0 = r_lo; r0 < r_hi; r0 += max_rows) {
            const int64_t rows = std::min(max_rows, r_hi - r0);
            const T* qt = q_rows + (head_rows + r0) * ld_rows;
            const T* dot = do_rows + (head_rows + r0) * ld_rows;
            probs_and_dscores(isa, w, rows, g.d, scale, kt_t + (ja - k0), vt_t + (ja - k0), ld_t, qt, ld_rows, dot,
                              ld_rows, mask_start ? mask_start + r0 : nullptr, kv_end + r0, ja, lp + h * g.tq + r0,
                              deltap + h * g.tq + r0, P, dS, g.bn);                             // P, dS
            T* dQr = dq_rows + (head_rows + r0) * g.d;
            if (mask_start == nullptr) {
              gemm(isa, kN, kT, g.d, w, rows, T(1), dot, ld_rows, P, g.bn, T(1), dVj, g.d);     // dV += P^T dO
              gemm(isa, kN, kT, g.d, w, rows, scale, qt, ld_rows, dS, g.bn, T(1), dKj, g.d);    // dK += dS^T Q
              gemm(isa, kN, kN, g.d, rows, w, scale, kj, ld_rows, dS, g.bn, T(1), dQr, g.d);    // dQ += dS K
              continue;
            }
            // Masked: products over the visible pairs only (see masked_accumulate). Pair (key j,
            // row i) of the block is visible when kv_start[r0 + i] <= ja + j < kv_end[r0 + i].
            const auto visible = [&](int64_t j, int64_t i) {
              return mask_start[r0 + i] <= ja + j && ja + j < kv_end[r0 + i];
            };
            // dX (w keys) += alpha * sum_i W[j, i] * Y[i]: dV with (P, dO), dK with (dS, Q).
            const auto by_keys = [&](T* dX, const T* W, const T* Y, T alpha) {
              masked_accumulate(
                  g.d, w, dX, g.d, product,
                  [&](T* tmp) { gemm(isa, kN, kT, g.d, w, rows, alpha, Y, ld_rows, W, g.bn, T(0), tmp, g.d); },
                  [&] {
                    for (int64_t j = 0; j < w; ++j) {
                      for (int64_t i = 0; i < rows; ++i) {
                        if (!visible(j, i)) continue;
                        const T weight = alpha * W[j + i * g.bn];
                        for (int64_t e = 0; e < g.d; ++e) dX[j * g.d + e] += weight * Y[i * ld_rows + e];
                      }
                    }
                  });
            };
            by_keys(dVj, P, dot, T(1));
            by_keys(dKj, dS, qt, scale);
            masked_accumulate(
                g.d, rows, dQr, g.d, product,
                [&](T* tmp) { gemm(isa, kN, kN, g.d, rows, w, scale, kj, ld_rows, dS, g.bn, T(0), tmp, g.d); },
                [&] {
                  for (int64_t i = 0; i < rows; ++i) {
                    for (int64_t j = 0; j < w; ++j) {
                      if (!visible(j, i)) continue;
                      const T weight = scale * dS[j + i * g.bn];
                      for (int64_t e = 0; e < g.d; ++e) dQr[i * g.d + e] += weight * kj[j * ld_rows + e];
                    }
                  }
                });
          }
        };
        // The table's query range and its full (mask-free) tiles; rows outside are never read.
        const int64_t tile_lo = q_lo[n] * g.bm, tile_hi = std::min<int64_t>(q_hi[n] * g.bm, g.tq);
        const int64_t full_lo = q_full_lo[n] * g.bm, full_hi = std::min<int64_t>(q_full_hi[n] * g.bm, g.tq);
        for_each_segment(q_end, c0, c0 + cols, kMinSegmentCols, [&](int64_t ja, int64_t jb) {
          for (int64_t h = hk * g.group; h < (hk + 1) * g.group; ++h) {
            walk_segment(q_start, q_end, ja, jb, tile_lo, tile_hi, full_lo, full_hi, kMaskedCols,
                         [&](int64_t sa, int64_t sb, int64_t r_lo, int64_t r_hi, bool masked) {
                           block(h, sa, sb, r_lo, r_hi, masked ? kv_start : nullptr);
                         });
          }
        });
        for (int64_t j = 0; j < cols; ++j) {
          write_output_row(isa, dkp + ((c0 + j) * g.hkv + hk) * g.d, dK + j * g.d, g.d, T(1));
          write_output_row(isa, dvp + ((c0 + j) * g.hkv + hk) * g.d, dV + j * g.d, g.d, T(1));
        }
      }
      T* dq = dqp + c * dq_part_size;
      for (int64_t r = 0; r < g.tq; ++r) {
        const bool was_visited = row0 <= r && r < row0 + visited;
        for (int64_t i = 0; i < g.group; ++i) {
          write_output_row(isa, dq + r * sdq0 + (hk * g.group + i) * g.d,
                           was_visited ? dq_rows + (i * max_visited + r - row0) * g.d : nullptr, g.d, T(1));
        }
      }
      finish_output_rows(isa);
    };
  });
}

// delta[h, i] = sum_d dO[i, h, d] * O[i, h, d], minus the gradient of the LSE when the LSE itself
// is differentiated (d lse_i / d s_ij = P_ij, so it enters dS exactly like delta). Computed here in
// one pass instead of through a (T, H, D) product tensor.
template <typename T>
at::Tensor row_deltas(const at::Tensor& grad_out, const at::Tensor& out, const c10::optional<at::Tensor>& grad_lse,
                      const Geometry& g) {
  at::Tensor delta = at::empty({g.hq, g.tq}, grad_out.options());
  const T* dop = grad_out.const_data_ptr<T>();
  const T* op = out.const_data_ptr<T>();
  const T* glp = grad_lse.has_value() ? grad_lse->const_data_ptr<T>() : nullptr;
  T* dp = delta.mutable_data_ptr<T>();
  const int64_t sdo0 = grad_out.stride(0), sdo1 = grad_out.stride(1), so0 = out.stride(0), so1 = out.stride(1);
  at::parallel_for(0, g.tq, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t h = 0; h < g.hq; ++h) {
        const T* a = dop + i * sdo0 + h * sdo1;
        const T* b = op + i * so0 + h * so1;
        T sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int64_t d = 0; d < g.d; ++d) sum += a[d] * b[d];
        dp[h * g.tq + i] = glp ? sum - glp[h * g.tq + i] : sum;
      }
    }
  });
  return delta;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_cpu_bwd(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, const c10::optional<at::Tensor>& grad_lse_in,
    const at::Tensor& kv_start, const at::Tensor& kv_end, const at::Tensor& q_start, const at::Tensor& q_end, const at::Tensor& q_lo, const at::Tensor& q_hi,
    const at::Tensor& q_full_lo, const at::Tensor& q_full_hi, int64_t block_m, int64_t block_n,
    double scale) {
  const auto compute = compute_type(q_in);
  const Isa isa = active_isa();
  const Geometry g = geometry(q_in, k_in, v_in, block_m, block_n);
  const int64_t num_n = (g.tk + g.bn - 1) / g.bn;
  TORCH_CHECK(grad_out_in.sizes() == q_in.sizes(), "attention_cpu_bwd: grad_out must have q's shape ",
              q_in.sizes(), ", got ", grad_out_in.sizes());
  TORCH_CHECK(out_in.sizes() == q_in.sizes(), "attention_cpu_bwd: out must have q's shape ", q_in.sizes(),
              ", got ", out_in.sizes());
  TORCH_CHECK(out_in.stride(2) == 1, "attention_cpu_bwd: out must have unit stride on head_dim");
  TORCH_CHECK(lse_in.dim() == 2 && lse_in.size(0) == g.hq && lse_in.size(1) == g.tq,
              "attention_cpu_bwd: lse must be (", g.hq, ", ", g.tq, "), got ", lse_in.sizes());
  if (grad_lse_in.has_value()) {
    TORCH_CHECK(grad_lse_in->sizes() == lse_in.sizes(), "attention_cpu_bwd: grad_lse must have lse's shape ",
                lse_in.sizes(), ", got ", grad_lse_in->sizes());
  }
  check_table(kv_start, "kv_start", g.tq);
  check_table(kv_end, "kv_end", g.tq);
  check_table(q_start, "q_start", g.tk);
  check_table(q_end, "q_end", g.tk);
  check_table(q_lo, "q_lo", num_n);
  check_table(q_hi, "q_hi", num_n);
  check_table(q_full_lo, "q_full_lo", num_n);
  check_table(q_full_hi, "q_full_hi", num_n);
  const at::Tensor q = as_compute(q_in, compute), k = as_compute(k_in, compute), v = as_compute(v_in, compute);
  const at::Tensor grad_out = as_compute(grad_out_in, compute);
  const at::Tensor lse = lse_in.to(compute).contiguous();
  c10::optional<at::Tensor> grad_lse;
  if (grad_lse_in.has_value()) grad_lse = grad_lse_in->to(compute).contiguous();
  at::Tensor delta;
  AT_DISPATCH_FLOATING_TYPES(compute, "attention_cpu_bwd_delta", [&] {
    delta = row_deltas<scalar_t>(grad_out, as_compute(out_in, compute), grad_lse, g);
  });

  // One chunk per kv head when the kv heads alone spread evenly over the threads; otherwise split
  // the key tiles so that every thread has work (each chunk then needs its own dQ buffer).
  const int64_t threads = at::get_num_threads();
  int64_t num_chunks = 1;
  if (g.hkv % threads != 0) num_chunks = std::min<int64_t>(num_n, (2 * threads + g.hkv - 1) / g.hkv);
  num_chunks = std::max<int64_t>(num_chunks, 1);
  at::Tensor dq_parts = at::empty({num_chunks, g.tq, g.hq, g.d}, q.options());  // every element written
  at::Tensor dk = at::empty({g.tk, g.hkv, g.d}, q.options());
  at::Tensor dv = at::empty({g.tk, g.hkv, g.d}, q.options());
  AT_DISPATCH_FLOATING_TYPES(compute, "attention_cpu_bwd", [&] {
    backward_kernel<scalar_t>(grad_out, q, k, v, lse, delta, dq_parts, dk, dv,
                              kv_start.const_data_ptr<int32_t>(), kv_end.const_data_ptr<int32_t>(),
                              q_start.const_data_ptr<int32_t>(), q_end.const_data_ptr<int32_t>(),
                              q_lo.const_data_ptr<int32_t>(), q_hi.const_data_ptr<int32_t>(),
                              q_full_lo.const_data_ptr<int32_t>(), q_full_hi.const_data_ptr<int32_t>(),
                              g, num_chunks, static_cast<scalar_t>(scale), isa);
  });
  at::Tensor dq = num_chunks == 1 ? dq_parts[0] : dq_parts.sum(0);
  const auto dt = q_in.scalar_type();
  if (dt != compute) {
    dq = dq.to(dt);
    dk = dk.to(dt);
    dv = dv.to(dt);
  }
  return {dq, dk, dv};
}

}  // namespace
}  // namespace transfusion_fast::attention_cpu

TORCH_LIBRARY_FRAGMENT(transfusion_fast, m) {
  m.def("attention_cpu_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? grad_lse, "
        "Tensor kv_start, Tensor kv_end, Tensor q_start, Tensor q_end, Tensor q_lo, Tensor q_hi, Tensor q_full_lo, "
        "Tensor q_full_hi, int block_m, int block_n, float scale) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(transfusion_fast, CPU, m) {
  m.impl("attention_cpu_bwd", &transfusion_fast::attention_cpu::attention_cpu_bwd);
}
