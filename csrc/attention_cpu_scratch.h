// Per-thread scratch memory of the CPU attention and the task runner that hands it to the workers.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <numeric>
#include <vector>

namespace transfusion_fast::attention_cpu {

// Memory a thread keeps between calls (tile buffers, the transposed keys). A fresh buffer of a few
// MiB comes back from glibc as untouched pages when large freed blocks were returned to the OS, and
// every first touch of a page is then a page fault (microseconds per 4 KiB page on a small VM,
// enough to show in a forward of a few milliseconds).
// Each thread keeps up to kRetainedScratchBytes per slot and only grows it; a larger request (long
// sequences) gets its own allocation, freed when the Scratch goes out of scope.
constexpr size_t kRetainedScratchBytes = size_t(8) << 20;
enum class ScratchSlot { kTask, kCall };  // a worker's tile buffers; the calling thread's shared data

class Scratch {
 public:
  Scratch(ScratchSlot slot, size_t bytes) : kept_(kept(slot)) {
    TORCH_INTERNAL_ASSERT(!kept_.in_use, "attention_cpu: scratch slot taken twice by one thread");
    bytes = (std::max<size_t>(bytes, 1) + 63) / 64 * 64;
    if (bytes > kRetainedScratchBytes) {
      data_ = allocate(bytes);
      owned_ = true;
      return;
    }
    if (kept_.bytes < bytes) {
      std::free(kept_.data);
      kept_.data = nullptr;  // stays consistent if the allocation below throws
      kept_.bytes = 0;
      kept_.data = allocate(bytes);
      kept_.bytes = bytes;
    }
    data_ = kept_.data;
    kept_.in_use = true;
  }
  ~Scratch() {
    if (owned_) std::free(data_);
    else kept_.in_use = false;
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  template <typename T>
  T* as() const { return static_cast<T*>(data_); }

 private:
  struct Kept {
    void* data = nullptr;
    size_t bytes = 0;
    bool in_use = false;
    ~Kept() { std::free(data); }
  };
  static Kept& kept(ScratchSlot slot) {
    thread_local Kept slots[2];
    return slots[static_cast<int>(slot)];
  }
  static void* allocate(size_t bytes) {
    void* p = std::aligned_alloc(64, bytes);
    TORCH_CHECK(p != nullptr, "attention_cpu: out of memory allocating ", bytes, " bytes of scratch");
    return p;
  }
  Kept& kept_;
  void* data_ = nullptr;
  bool owned_ = false;
};

// Runs task(order[t]) for every t on all intra-op threads, handing out tasks dynamically in the
// given order (heaviest first). Which thread runs a task never changes what the task writes.
// make_worker(scratch) builds a thread's task function around its `scratch_count` elements of
// (uninitialized) tile memory.
template <typename T, typename MakeWorker>
void run_tasks(const std::vector<int64_t>& order, int64_t scratch_count, const MakeWorker& make_worker) {
  std::atomic<int64_t> next{0};
  const int64_t n = static_cast<int64_t>(order.size());
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  at::parallel_for(0, workers, 1, [&](int64_t /*begin*/, int64_t /*end*/) {
    const Scratch scratch(ScratchSlot::kTask, scratch_count * sizeof(T));
    auto task = make_worker(scratch.as<T>());
    for (int64_t t = next.fetch_add(1); t < n; t = next.fetch_add(1)) task(order[t]);
  });
}

inline std::vector<int64_t> heaviest_first(const std::vector<int64_t>& work) {
  std::vector<int64_t> order(work.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return work[a] > work[b]; });
  return order;
}

}  // namespace transfusion_fast::attention_cpu
