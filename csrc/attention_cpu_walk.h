// The document-aware tile walk of the CPU attention, shared by the forward (rows over keys) and the
// backward (keys over query rows).
//
// Inside the table's range, the walk follows the documents (for_each_segment): the rows of a row
// tile that belong to one document only compute that document's keys (and, in the backward, the
// keys of a key tile only meet their own document's rows); the keys every row of such a segment
// sees run as wide mask-free GEMMs, and only the rest (causal diagonal, span edges) is masked, in
// narrow sub-blocks that stop at their own last row's interval end. On packed short documents this
// keeps the computed elements close to the visible ones (tiles alone compute half as many more).
#pragma once

#include <algorithm>
#include <cstdint>

#include "attention_cpu.h"

namespace transfusion_fast::attention_cpu {

// Splits [lo, hi) at the edges of two mask-free ranges and calls piece(p_lo, p_hi, mask_free) for
// each maximal run of pieces that are all inside one of them (mask_free) or all outside (masked).
template <typename Piece>
void for_each_piece(int64_t lo, int64_t hi, int64_t free1_lo, int64_t free1_hi, int64_t free2_lo,
                    int64_t free2_hi, const Piece& piece) {
  if (lo >= hi) return;
  int64_t cuts[6] = {lo, hi, clamp_to(free1_lo, lo, hi), clamp_to(free1_hi, lo, hi),
                     clamp_to(free2_lo, lo, hi), clamp_to(free2_hi, lo, hi)};
  std::sort(cuts, cuts + 6);
  int64_t run_lo = lo;
  bool run_free = false;
  for (int i = 0; i < 5; ++i) {
    const int64_t a = cuts[i], b = cuts[i + 1];
    if (a >= b) continue;
    const bool free = (free1_lo <= a && b <= free1_hi) || (free2_lo <= a && b <= free2_hi);
    if (a > run_lo && free != run_free) {
      piece(run_lo, a, run_free);
      run_lo = a;
    }
    run_free = free;
  }
  if (hi > run_lo) piece(run_lo, hi, run_free);
}

// Calls segment(a, b) for consecutive runs of [lo, hi) whose `start` is the same (rows of one
// document in the forward, keys of one document in the backward, through kv_start / q_end). A run
// shorter than min_len absorbs the next ones up to min_len so that many tiny documents do not turn
// into many tiny GEMMs (the masked path then sorts them out).
template <typename Segment>
void for_each_segment(const int32_t* start, int64_t lo, int64_t hi, int64_t min_len, const Segment& segment) {
  for (int64_t a = lo; a < hi;) {
    int64_t b = a + 1;
    while (b < hi && (start[b] == start[a] || b - a < min_len)) ++b;
    segment(a, b);
    a = b;
  }
}

// One segment [a, b) of a tile walk, shared by the forward (rows over keys, through kv_start /
// kv_end) and the backward (keys over query rows, through q_start / q_end). The segment visits the
// union of its members' intervals inside the table's range [tile_lo, tile_hi), plus the table's full
// tiles [full_lo, full_hi), which are mask-free whatever the intervals say. Pieces that every member
// sees, or full tiles, go to block(a, b, lo, hi, false) whole; the rest is cut into sub-blocks of at
// most masked_len members, each up to its own last member's interval end: block(sa, sb, lo, hi, true).
// start / end are non-decreasing in the member.
template <typename Block>
void walk_segment(const int32_t* start, const int32_t* end, int64_t a, int64_t b, int64_t tile_lo,
                  int64_t tile_hi, int64_t full_lo, int64_t full_hi, int64_t masked_len, const Block& block) {
  int64_t lo = std::max<int64_t>(tile_lo, start[a]), hi = std::min<int64_t>(tile_hi, end[b - 1]);
  if (full_lo < full_hi) {
    lo = std::min(lo, full_lo);
    hi = std::max(hi, full_hi);
  }
  const int64_t seen_lo = start[b - 1], seen_hi = end[a];   // seen by every member
  for_each_piece(lo, hi, seen_lo, seen_hi, full_lo, full_hi, [&](int64_t p_lo, int64_t p_hi, bool free) {
    if (free) {
      block(a, b, p_lo, p_hi, false);
      return;
    }
    for (int64_t sa = a; sa < b; sa += masked_len) {
      const int64_t sb = std::min(b, sa + masked_len);
      block(sa, sb, std::max<int64_t>(p_lo, start[sa]), std::min<int64_t>(p_hi, end[sb - 1]), true);
    }
  });
}

}  // namespace transfusion_fast::attention_cpu
