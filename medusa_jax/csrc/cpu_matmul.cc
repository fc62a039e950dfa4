// y[M, NP*32] = x[M, D] @ W, with W packed as NP column panels [NP, D, 32] (see cpu_kernels.pack).
//
// Decoding on a CPU multiplies a few rows (one token, or a small Medusa tree) by every weight
// matrix once per step, so a step is bound by how fast the weights stream from memory. Each panel
// is one contiguous 32-column strip of W: the kernel reads it once, front to back, and keeps the
// products of up to 8 rows in registers (16 vector accumulators), so 1 to 8 rows cost about the
// same memory traffic; more rows re-read the panel from cache. Panels are shared out among XLA's
// intra-op threads. A row's result does not depend on which other rows are in the call.
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float v16 __attribute__((vector_size(64), aligned(4)));
constexpr int64_t kPanel = 32;
constexpr int64_t kRows = 8;
// Prefetch this many panel rows ahead (8 KiB): without it 8 rows cost ~1.5x one row, with it ~1x
// (2-core Zen 4; the hardware prefetcher alone does not keep enough loads in flight).
constexpr int64_t kAhead = 64;

template <int R>
void Panel(const float* __restrict x, int64_t D, const float* __restrict w, float* __restrict y,
           int64_t ldy) {
  v16 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = v16{};
  for (int64_t k = 0; k < D; ++k) {
    __builtin_prefetch(w + (k + kAhead) * kPanel);
    __builtin_prefetch(w + (k + kAhead) * kPanel + 16);
    v16 w0, w1;
    std::memcpy(&w0, w + k * kPanel, 64);
    std::memcpy(&w1, w + k * kPanel + 16, 64);
    for (int r = 0; r < R; ++r) {
      const float s = x[r * D + k];
      acc[r][0] += s * w0;
      acc[r][1] += s * w1;
    }
  }
  for (int r = 0; r < R; ++r) {
    std::memcpy(y + r * ldy, &acc[r][0], 64);
    std::memcpy(y + r * ldy + 16, &acc[r][1], 64);
  }
}

using PanelFn = void (*)(const float*, int64_t, const float*, float*, int64_t);
constexpr PanelFn kPanels[kRows + 1] = {nullptr,  Panel<1>, Panel<2>, Panel<3>, Panel<4>,
                                        Panel<5>, Panel<6>, Panel<7>, Panel<8>};

struct Job {
  const float* x;
  const float* w;
  float* y;
  int64_t M, D, NP, chunk, num_chunks;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void Work() {
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < num_chunks;) {
      const int64_t p1 = std::min(NP, (c + 1) * chunk);
      for (int64_t p = c * chunk; p < p1; ++p) {
        const float* wp = w + p * D * kPanel;
        for (int64_t r0 = 0; r0 < M; r0 += kRows) {
          const int64_t R = std::min(kRows, M - r0);
          kPanels[R](x + r0 * D, D, wp, y + r0 * NP * kPanel + p * kPanel, NP * kPanel);
        }
      }
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                  ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 3 || yd.size() != 2 || wd[2] != kPanel || xd[1] != wd[1] ||
      yd[0] != xd[0] || yd[1] != wd[0] * kPanel) {
    return ffi::Error::InvalidArgument(
        "medusa_cpu_matmul expects x [M, D], packed w [NP, D, 32] and y [M, NP*32]");
  }
  auto job = std::make_shared<Job>();
  job->x = x.typed_data();
  job->w = w.typed_data();
  job->y = y->typed_data();
  job->M = xd[0];
  job->D = xd[1];
  job->NP = wd[0];
  if (job->M == 0 || job->NP == 0) return ffi::Error::Success();
  const int64_t hw = std::max<int64_t>(1, std::thread::hardware_concurrency());
  static const int64_t cap = [] { const char* e = std::getenv("MEDUSA_JAX_KERNEL_THREADS"); return e ? std::atoll(e) : 0; }();
  int64_t workers = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), hw));
  if (cap > 0) workers = std::min(workers, cap);
  // About 8 chunks per worker, so a thread that starts late or is descheduled costs little.
  job->chunk = std::max<int64_t>(1, job->NP / (8 * workers));
  job->num_chunks = (job->NP + job->chunk - 1) / job->chunk;
  for (int64_t i = 1; i < workers; ++i) pool.Schedule([job] { job->Work(); });
  job->Work();
  // Every chunk has been claimed; wait for the ones other threads are still computing. A task
  // that starts after this returns finds no chunk left and only touches the shared Job.
  while (job->done.load(std::memory_order_acquire) < job->num_chunks) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MedusaCpuMatmul, Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
