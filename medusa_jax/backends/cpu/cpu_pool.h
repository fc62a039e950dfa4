// Shared by this directory's kernels (cpu_matmul.cc, cpu_attention.cc): how many of XLA's intra-op
// threads a call uses, and handing a job's chunks out to them.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace medusa_cpu {

// XLA's intra-op threads, at most the hardware's, capped by MEDUSA_JAX_KERNEL_THREADS when set.
inline int64_t Workers(xla::ffi::ThreadPool& pool) {
  static const int64_t cap = [] {
    const char* e = std::getenv("MEDUSA_JAX_KERNEL_THREADS");
    return e ? std::atoll(e) : 0;
  }();
  const int64_t hw = std::max<int64_t>(1, std::thread::hardware_concurrency());
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), hw));
  return cap > 0 ? std::min(workers, cap) : workers;
}

// Runs job->Work() on `workers` threads, this one included, and returns once all job->num_chunks
// chunks are done. Work() claims chunks from a counter and counts each finished one in job->done.
// When this one's Work() returns every chunk has been claimed; it waits for the ones other threads
// are still computing. A task that starts after this returns finds no chunk left and only touches
// the shared job.
template <class Job>
void Run(xla::ffi::ThreadPool& pool, const std::shared_ptr<Job>& job, int64_t workers) {
  for (int64_t i = 1; i < workers; ++i) pool.Schedule([job] { job->Work(); });
  job->Work();
  while (job->done.load(std::memory_order_acquire) < job->num_chunks) std::this_thread::yield();
}

}  // namespace medusa_cpu
