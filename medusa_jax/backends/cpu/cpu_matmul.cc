// y[M, NP*32] = x[M, D] @ W, with W packed as NP column panels [NP, D, 32] (see kernel.pack in this directory).
//
// Decoding on a CPU multiplies a few rows (one token, or a Medusa tree's nodes) by every weight
// matrix once per step. Up to about 10 rows (2-core Zen 4: ~230 GFLOP/s against ~35-45 GB/s) that
// is bound by how fast the weights stream from memory, from there on by the FMA units. The kernel
// aims at both bounds:
//
//  * Each panel is one contiguous 32-column strip of W, read from memory once per call whatever
//    the row count. Up to 12 rows are one register block; more rows are cut into balanced blocks
//    of up to 8 (16 = 8 + 8, 20 = 7 + 7 + 6) that run over the panel in turn while it sits in L2.
//  * A block is a register tile of R rows x 32 columns, 2R zmm accumulators (24 at R = 12): per k
//    one panel row (two vector loads) feeds 2R FMAs. With the data in cache it runs at ~98% of the
//    FMA peak.
//  * Prefetch: each block pulls its panel into L1 64 rows ahead; with several blocks, each also
//    pulls its share of the next panel into L2, so the memory stream goes on while the blocks that
//    re-read the panel from L2 compute (2-core Zen 4: 16 rows ~10% faster than without).
//  * Large weight buffers are backed by transparent huge pages (AdviseHugePages).
//  * Panels are shared out among XLA's intra-op threads, in chunks claimed from a counter.
//
// Each output is one fused multiply-add chain over k = 0..D-1, the same instructions for every
// block size: a row's result does not depend on which other rows are in the call (greedy Medusa
// needs a verify step's row to round exactly as a one-token step's).
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <set>
#include <utility>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "cpu_pool.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kPanel = 32;
// Row blocks: one block up to 12 rows (24 accumulators + 2 weight registers of the 32 zmm); more
// rows are cut into balanced blocks of up to 8, whose row pointers stay in general registers (at
// 12 the compiler spills some: a few percent slower at 48-128 rows).
constexpr int64_t kMaxSingleBlock = 12;
constexpr int64_t kMaxBlock = 8;
// Prefetch the panel this many rows ahead into L1 (8 KiB): the hardware prefetcher alone does not
// keep enough loads in flight (2-core Zen 4: 8 rows cost ~1.5x one row without it, ~1.05x with it).
constexpr int64_t kAhead = 64;

#if defined(__AVX512F__)
using Vec = __m512;
inline Vec Zero() { return _mm512_setzero_ps(); }
inline Vec Load(const float* p) { return _mm512_loadu_ps(p); }
inline void Store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
inline Vec Fma(float s, Vec w, Vec acc) { return _mm512_fmadd_ps(_mm512_set1_ps(s), w, acc); }
#else
// Portable fallback (GCC/Clang vector extension; -ffp-contract=fast makes the update one FMA where
// the target has one, the same for every block size).
typedef float Vec __attribute__((vector_size(64), aligned(4)));
inline Vec Zero() { return Vec{}; }
inline Vec Load(const float* p) { Vec v; std::memcpy(&v, p, 64); return v; }
inline void Store(float* p, Vec v) { std::memcpy(p, &v, 64); }
inline Vec Fma(float s, Vec w, Vec acc) { return acc + s * w; }
#endif

// One block: y[r, 0:32] = x[r, :] @ panel for r < R. Alongside, prefetch the panel `ahead` into L1,
// one panel row per k, and when `next` is set, this block's share of the next panel into L2 (`step`
// bytes per k).
template <int R, bool kNext>
__attribute__((noinline)) void Block(const float* __restrict x, int64_t D, const float* __restrict w,
                                     float* __restrict y, int64_t ldy, const float* ahead,
                                     const char* next, int64_t step) {
  Vec a0[R], a1[R];
  for (int r = 0; r < R; ++r) a0[r] = a1[r] = Zero();
  for (int64_t k = 0; k < D; ++k) {
    __builtin_prefetch(ahead + k * kPanel, 0, 3);
    __builtin_prefetch(ahead + k * kPanel + 16, 0, 3);
    if (kNext) {
      __builtin_prefetch(next + k * step, 0, 2);
      __builtin_prefetch(next + k * step + 64, 0, 2);
    }
    const Vec w0 = Load(w + k * kPanel), w1 = Load(w + k * kPanel + 16);
    for (int r = 0; r < R; ++r) {
      const float s = x[r * D + k];
      a0[r] = Fma(s, w0, a0[r]);
      a1[r] = Fma(s, w1, a1[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    Store(y + r * ldy, a0[r]);
    Store(y + r * ldy + 16, a1[r]);
  }
}

using BlockFn = void (*)(const float*, int64_t, const float*, float*, int64_t, const float*,
                         const char*, int64_t);
template <bool kNext>
constexpr BlockFn kBlocks[kMaxSingleBlock + 1] = {
    nullptr,          Block<1, kNext>,  Block<2, kNext>,  Block<3, kNext>, Block<4, kNext>,
    Block<5, kNext>,  Block<6, kNext>,  Block<7, kNext>,  Block<8, kNext>, Block<9, kNext>,
    Block<10, kNext>, Block<11, kNext>, Block<12, kNext>};

struct Job {
  const float* x;
  const float* w;
  float* y;
  int64_t M, D, NP, chunk, num_chunks;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  // Panels p0..p1-1, every row block of each.
  void Panels(int64_t p0, int64_t p1) const {
    const int64_t blocks = M <= kMaxSingleBlock ? 1 : (M + kMaxBlock - 1) / kMaxBlock;
    const int64_t panel = D * kPanel;  // floats
    // With several blocks, each prefetches 1/blocks of the next panel: 128/blocks bytes per k
    // (rounded up, so that together they cover it).
    const int64_t step = (2 * 64 + blocks - 1) / blocks;
    for (int64_t p = p0; p < p1; ++p) {
      const float* wp = w + p * panel;
      const char* next = reinterpret_cast<const char*>(wp + panel);
      for (int64_t b = 0, r0 = 0; b < blocks; ++b) {
        const int64_t R = (M - r0 + (blocks - b) - 1) / (blocks - b);
        (blocks > 1 ? kBlocks<true> : kBlocks<false>)[R](x + r0 * D, D, wp,
                                                         y + r0 * NP * kPanel + p * kPanel,
                                                         NP * kPanel, wp + kAhead * kPanel,
                                                         next + b * D * step, step);
        r0 += R;
      }
    }
  }

  void Work() {
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < num_chunks;) {
      Panels(c * chunk, std::min(NP, (c + 1) * chunk));
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

// Backs the 2 MiB-aligned interior of a large weight buffer with transparent huge pages, once per
// buffer: streaming 538 MB through 4 KiB pages costs a TLB walk every 32 panel rows, and on a
// 2-core Zen 4 huge pages made a one-row pass ~15% faster. Best effort (Linux; errors ignored;
// MEDUSA_JAX_KERNEL_HUGEPAGES=0 turns it off). The contents are untouched.
void AdviseHugePages(const void* data, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  static const bool on = [] {
    const char* e = std::getenv("MEDUSA_JAX_KERNEL_HUGEPAGES");
    return e == nullptr || std::strcmp(e, "0") != 0;
  }();
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (!on || end <= begin) return;
  static std::mutex mu;
  static std::set<std::pair<uintptr_t, uintptr_t>> seen;
  {
    std::lock_guard<std::mutex> lock(mu);
    if (!seen.insert({begin, end}).second) return;
  }
  void* p = reinterpret_cast<void*>(begin);
  if (madvise(p, end - begin, MADV_HUGEPAGE) == 0) {
    madvise(p, end - begin, 25);  // MADV_COLLAPSE (Linux 6.1+): now, not whenever khugepaged gets to it
  }
#else
  (void)data, (void)bytes;
#endif
}

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
  AdviseHugePages(job->w, static_cast<int64_t>(sizeof(float)) * job->NP * job->D * kPanel);
  if (job->D == 0) {
    std::memset(job->y, 0, sizeof(float) * job->M * job->NP * kPanel);
    return ffi::Error::Success();
  }
  const int64_t workers = medusa_cpu::Workers(pool);
  // About 8 chunks per worker, so a thread that starts late or is descheduled costs little.
  job->chunk = std::max<int64_t>(1, job->NP / (8 * workers));
  job->num_chunks = (job->NP + job->chunk - 1) / job->chunk;
  medusa_cpu::Run(pool, job, workers);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MedusaCpuMatmul, Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
