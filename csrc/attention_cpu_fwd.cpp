// Forward of the block-sparse CPU attention (FlashAttention-2): one task per (query head, row
// tile), online softmax over wide score blocks, saves the log-sum-exp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "attention_cpu.h"
#include "attention_cpu_scratch.h"
#include "attention_cpu_walk.h"

namespace transfusion_fast::attention_cpu {
namespace {

// The keys of every head as (H, D, T), row stride ld (transposed_stride(T)), into dst: the
// forward's row tiles of all heads share it. The backward instead transposes per task
// (backward_kernel).
template <typename T>
void heads_dim_tokens(Isa isa, const at::Tensor& x, T* dst, int64_t ld) {
  const int64_t tokens = x.size(0), heads = x.size(1), dim = x.size(2), s0 = x.stride(0), s1 = x.stride(1);
  const T* src = x.const_data_ptr<T>();
  constexpr int64_t kBlock = 256;
  const int64_t token_blocks = (tokens + kBlock - 1) / kBlock;
  at::parallel_for(0, heads * token_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t h = task / token_blocks, t0 = (task % token_blocks) * kBlock;
      transpose_keys(isa, src + t0 * s0 + h * s1, s0, std::min(kBlock, tokens - t0), dim, dst + h * dim * ld + t0, ld);
    }
  });
}

// Keys per forward GEMM: consecutive visited key tiles of a row tile are merged up to this many
// columns; the online softmax then runs once over the wide score block, and fewer, longer products
// amortize each register tile's setup. The block_m x cols score block is written, read and
// rewritten by the softmax and read again by P V: it has to stay in the L2 cache. AVX2 machines
// (AMD Zen: 512 KiB of L2 per core) take 256 columns (128 KiB at block_m 128), the AVX-512 Xeons
// (1-2 MiB) 1,024; docs/cpu_attention.md has the sweeps.
constexpr int64_t kForwardGemmCols = 1024;
constexpr int64_t kForwardGemmColsAvx2 = 256;
constexpr int64_t forward_gemm_cols(Isa isa) { return isa == Isa::kAvx2 ? kForwardGemmColsAvx2 : kForwardGemmCols; }

// Document-aware walk inside a row tile. Where a row tile holds the end of one document and the
// start of the next, the union of its rows' key intervals covers both documents: the rows of each
// document (a segment, same kv_start) only compute their own keys. Inside a segment, the keys that
// every row sees run as wide mask-free GEMMs over all its rows; the rest (the causal diagonal, span
// edges) is cut into row sub-blocks of kMaskedRows, each computing only up to its own last row's
// kv_end, so that the diagonal wastes ~kMaskedRows / 2 keys per row instead of ~block_m / 2.
// Segments shorter than kMinSegmentRows merge with the next rows (then they are masked).
constexpr int64_t kMaskedRows = 32;
constexpr int64_t kMinSegmentRows = 16;

template <typename T>
void forward_kernel(const at::Tensor& q, const T* ktp, int64_t ldkt, const at::Tensor& v, at::Tensor& out,
                    at::Tensor& lse, const int32_t* kv_start, const int32_t* kv_end, const int32_t* kv_lo,
                    const int32_t* kv_hi, const int32_t* kv_full_lo, const int32_t* kv_full_hi,
                    const Geometry& g, T scale, Isa isa) {
  const T* qp = q.const_data_ptr<T>();
  const T* vp = v.const_data_ptr<T>();
  T* op = out.mutable_data_ptr<T>();
  T* lp = lse.mutable_data_ptr<T>();
  const int64_t sq0 = q.stride(0), sq1 = q.stride(1), skt = g.d * ldkt;
  const int64_t sv0 = v.stride(0), sv1 = v.stride(1);
  const int64_t num_m = (g.tq + g.bm - 1) / g.bm;
  std::vector<int64_t> work(g.hq * num_m);
  for (int64_t t = 0; t < g.hq * num_m; ++t) work[t] = kv_hi[t % num_m] - kv_lo[t % num_m];

  // A multiple of 16: the vector softmax passes read and write whole vectors of a score row.
  const int64_t max_cols = round_up(std::max<int64_t>(forward_gemm_cols(isa), g.bn), 16);
  run_tasks<T>(heaviest_first(work), g.bm * (max_cols + 2 * g.d + 2), [&](T* scratch) {
    return [=, &g](int64_t t) {
      const int64_t h = t / num_m, m = t % num_m, hk = h / g.group;
      const int64_t r0 = m * g.bm, rows = std::min(g.bm, g.tq - r0);
      T* S = scratch;
      T* O = S + g.bm * max_cols;
      T* row_max = O + g.bm * g.d;
      T* row_sum = row_max + g.bm;
      T* product = row_sum + g.bm;   // a masked block's P V (masked_accumulate)
      std::fill(row_max, row_max + rows, -std::numeric_limits<T>::infinity());
      std::fill(row_sum, row_sum + rows, T(0));
      std::fill(O, O + rows * g.d, T(0));
      const T* kt = ktp + hk * skt;
      const T* vh = vp + hk * sv1;
      // Rows [a, b) x keys [c_lo, c_hi), in GEMMs of up to max_cols keys; kv_start == nullptr: no mask.
      const auto block = [&](int64_t a, int64_t b, int64_t c_lo, int64_t c_hi, const int32_t* mask_start) {
        const int64_t i0 = a - r0, n = b - a;
        for (int64_t c0 = c_lo; c0 < c_hi; c0 += max_cols) {
          const int64_t cols = std::min(max_cols, c_hi - c0);
          // S (n x cols, row-major) = scale * Q K^T, i.e. column-major S^T = K Q^T.
          gemm(isa, kN, kN, cols, n, g.d, scale, kt + c0, ldkt, qp + a * sq0 + h * sq1, sq0, T(0), S, max_cols);
          softmax_fwd(isa, S, max_cols, n, cols, mask_start ? mask_start + a : nullptr, kv_end + a, c0,
                      row_max + i0, row_sum + i0, O + i0 * g.d, g.d);
          // O += P V, i.e. column-major O^T += V^T P^T.
          if (mask_start == nullptr) {
            gemm(isa, kN, kN, g.d, n, cols, T(1), vh + c0 * sv0, sv0, S, max_cols, T(1), O + i0 * g.d, g.d);
            continue;
          }
          masked_accumulate(
              g.d, n, O + i0 * g.d, g.d, product,
              [&](T* tmp) { gemm(isa, kN, kN, g.d, n, cols, T(1), vh + c0 * sv0, sv0, S, max_cols, T(0), tmp, g.d); },
              [&] {   // a NaN or an infinity in V (or P): only the visible pairs
                for (int64_t i = 0; i < n; ++i) {
                  int64_t lo, hi;
                  visible_cols(mask_start + a, kv_end + a, i, c0, cols, lo, hi);
                  T* o = O + (i0 + i) * g.d;
                  for (int64_t j = lo; j < hi; ++j) {
                    const T p = S[i * max_cols + j];
                    const T* vj = vh + (c0 + j) * sv0;
                    for (int64_t e = 0; e < g.d; ++e) o[e] += p * vj[e];
                  }
                }
              });
        }
      };
      // The table's key range and its full (mask-free) tiles; keys outside [tile_lo, tile_hi) are
      // never read.
      const int64_t tile_lo = kv_lo[m] * g.bn, tile_hi = std::min<int64_t>(kv_hi[m] * g.bn, g.tk);
      const int64_t full_lo = kv_full_lo[m] * g.bn, full_hi = std::min<int64_t>(kv_full_hi[m] * g.bn, g.tk);
      for_each_segment(kv_start, r0, r0 + rows, kMinSegmentRows, [&](int64_t a, int64_t b) {
        walk_segment(kv_start, kv_end, a, b, tile_lo, tile_hi, full_lo, full_hi, kMaskedRows,
                     [&](int64_t sa, int64_t sb, int64_t c_lo, int64_t c_hi, bool masked) {
                       block(sa, sb, c_lo, c_hi, masked ? kv_start : nullptr);
                     });
      });
      for (int64_t i = 0; i < rows; ++i) {
        // Every row sees at least one key, so row_sum > 0 unless all its scores are -inf (then
        // o = 0 * (1 / 0) = NaN and lse = -inf) or one is NaN / +inf (then both are NaN).
        write_output_row(isa, op + ((r0 + i) * g.hq + h) * g.d, O + i * g.d, g.d, T(1) / row_sum[i]);
        lp[h * g.tq + r0 + i] = row_max[i] + std::log(row_sum[i]);
      }
      finish_output_rows(isa);
    };
  });
}


std::tuple<at::Tensor, at::Tensor> attention_cpu_fwd(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& kv_start,
    const at::Tensor& kv_end, const at::Tensor& kv_lo, const at::Tensor& kv_hi,
    const at::Tensor& kv_full_lo, const at::Tensor& kv_full_hi, int64_t block_m, int64_t block_n,
    double scale) {
  const auto compute = compute_type(q_in);
  const Isa isa = active_isa();
  const Geometry g = geometry(q_in, k_in, v_in, block_m, block_n);
  const int64_t num_m = (g.tq + g.bm - 1) / g.bm;
  check_table(kv_start, "kv_start", g.tq);
  check_table(kv_end, "kv_end", g.tq);
  check_table(kv_lo, "kv_lo", num_m);
  check_table(kv_hi, "kv_hi", num_m);
  check_table(kv_full_lo, "kv_full_lo", num_m);
  check_table(kv_full_hi, "kv_full_hi", num_m);
  const at::Tensor q = as_compute(q_in, compute), k = as_compute(k_in, compute), v = as_compute(v_in, compute);
  at::Tensor out = at::empty({g.tq, g.hq, g.d}, q.options());
  at::Tensor lse = at::empty({g.hq, g.tq}, q.options());
  AT_DISPATCH_FLOATING_TYPES(compute, "attention_cpu_fwd", [&] {
    const int64_t ld = transposed_stride(g.tk);
    const Scratch keys_t(ScratchSlot::kCall, g.hkv * g.d * ld * sizeof(scalar_t));
    heads_dim_tokens<scalar_t>(isa, k, keys_t.as<scalar_t>(), ld);
    forward_kernel<scalar_t>(q, keys_t.as<scalar_t>(), ld, v, out, lse, kv_start.const_data_ptr<int32_t>(),
                             kv_end.const_data_ptr<int32_t>(), kv_lo.const_data_ptr<int32_t>(),
                             kv_hi.const_data_ptr<int32_t>(), kv_full_lo.const_data_ptr<int32_t>(),
                             kv_full_hi.const_data_ptr<int32_t>(), g, static_cast<scalar_t>(scale), isa);
  });
  if (q_in.scalar_type() != compute) out = out.to(q_in.scalar_type());
  return {out, lse};
}

}  // namespace
}  // namespace transfusion_fast::attention_cpu

TORCH_LIBRARY_FRAGMENT(transfusion_fast, m) {
  m.def("attention_cpu_fwd(Tensor q, Tensor k, Tensor v, Tensor kv_start, Tensor kv_end, Tensor kv_lo, "
        "Tensor kv_hi, Tensor kv_full_lo, Tensor kv_full_hi, int block_m, int block_n, float scale) "
        "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(transfusion_fast, CPU, m) {
  m.impl("attention_cpu_fwd", &transfusion_fast::attention_cpu::attention_cpu_fwd);
}
