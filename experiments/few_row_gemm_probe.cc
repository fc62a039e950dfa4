// Helper library of experiments/few_row_gemm_probe.py: the libraries it compares against, timed
// over one decode step's projections (the shapes the Python side passes), plus the project's
// previous kernel (8-row register block, prefetch within the panel) as an XLA FFI target, so one
// run times every path alike.
//
//   * MKL packed GEMM: cblas_sgemm_pack once per matrix, cblas_sgemm_compute(CblasPacked) per call.
//     libmkl_rt is opened at run time (dlopen), so no MKL header or link is needed to build this.
//   * oneDNN matmul with weights in the layout it chooses (format_tag::any, reordered once), one
//     primitive per row count. Built only with -DPROBE_DNNL (the Python side does so when it finds
//     oneDNN's headers and library).
#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

#ifdef PROBE_DNNL
#include "oneapi/dnnl/dnnl.hpp"
#endif

#ifdef PROBE_KERNEL_SRC
// The project's kernel compiled into this helper too, so that it can also be timed from C, the
// way the libraries are (no XLA dispatch between the projections).
#include PROBE_KERNEL_SRC
#endif

namespace ffi = xla::ffi;

namespace probe {
namespace {

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// ------------------------------------------------------------------ libraries
struct Shape {
  int64_t K, N;
};
std::vector<Shape> g_shapes;
std::vector<float> g_x, g_y;

float Rand(uint64_t& s) {
  s = s * 6364136223846793005ull + 1442695040888963407ull;
  return (static_cast<int32_t>(s >> 33) % 2001 - 1000) * 2e-5f;
}

std::vector<float> RandomMatrix(int64_t K, int64_t N, uint64_t seed) {
  std::vector<float> w(K * N);
  for (auto& v : w) v = Rand(seed);
  return w;
}

// MKL through dlopen.
using PackGetSize = size_t (*)(int, int, int, int);
using Pack = void (*)(int, int, int, int, int, int, float, const float*, int, float*);
using Compute = void (*)(int, int, int, int, int, int, const float*, int, const float*, int, float,
                         float*, int);
using SetThreads = void (*)(int);
struct Mkl {
  PackGetSize get_size;
  Pack pack;
  Compute compute;
  std::vector<float*> packed;
} g_mkl;
constexpr int kRowMajor = 101, kNoTrans = 111, kPacked = 151, kBMatrix = 162;

#ifdef PROBE_DNNL
struct DnnlRows {
  std::vector<dnnl::matmul> prims;
  std::vector<dnnl::memory> w, x, y;
};
struct Dnnl {
  std::unique_ptr<dnnl::engine> eng;
  std::unique_ptr<dnnl::stream> stream;
  std::map<int64_t, DnnlRows> rows;  // primitives and weights per row count
} g_dnnl;
#endif

// A pool for the kernel timed from C: started for one pass, its workers spin on a generation
// counter between the pass's GEMMs (timing only; they never sleep, so they are stopped after it).
struct SpinPool {
  std::vector<std::thread> threads;
  std::atomic<int64_t> gen{0};
  std::atomic<int> done{0};
  void (*fn)(void*) = nullptr;
  void* arg = nullptr;
  explicit SpinPool(int extra) {
    for (int i = 0; i < extra; ++i)
      threads.emplace_back([this] {
        for (int64_t seen = 0;;) {
          int64_t g;
          while ((g = gen.load(std::memory_order_acquire)) == seen) __builtin_ia32_pause();
          if (g < 0) return;
          seen = g;
          fn(arg);
          done.fetch_add(1, std::memory_order_release);
        }
      });
  }
  ~SpinPool() {
    gen.store(-1, std::memory_order_release);
    for (auto& t : threads) t.join();
  }
  void Run(void (*f)(void*), void* a) {
    fn = f;
    arg = a;
    done.store(0);
    gen.fetch_add(1, std::memory_order_release);
    f(a);
    while (done.load(std::memory_order_acquire) < static_cast<int>(threads.size())) __builtin_ia32_pause();
  }
};
int g_threads = 1;
std::vector<float*> g_packed;

}  // namespace
}  // namespace probe

using namespace probe;  // NOLINT

extern "C" {

// The projections of one step: n (K, N) pairs; inputs of up to max_rows rows.
void probe_set_shapes(int n, const int64_t* kn, int64_t max_rows) {
  g_shapes.clear();
  int64_t maxk = 0, maxn = 0;
  for (int i = 0; i < n; ++i) {
    g_shapes.push_back({kn[2 * i], kn[2 * i + 1]});
    maxk = std::max(maxk, kn[2 * i]);
    maxn = std::max(maxn, kn[2 * i + 1]);
  }
  uint64_t s = 7;
  g_x.resize(max_rows * maxk);
  for (auto& v : g_x) v = Rand(s) * 50;
  g_y.assign(max_rows * maxn, 0.f);
}

// 0 on success; threads: MKL's (OpenMP) threads.
int probe_mkl_init(const char* lib, int threads) {
  void* h = dlopen(lib, RTLD_NOW | RTLD_GLOBAL);
  if (!h) {
    fprintf(stderr, "probe: %s\n", dlerror());
    return 1;
  }
  g_mkl.get_size = reinterpret_cast<PackGetSize>(dlsym(h, "cblas_sgemm_pack_get_size"));
  g_mkl.pack = reinterpret_cast<Pack>(dlsym(h, "cblas_sgemm_pack"));
  g_mkl.compute = reinterpret_cast<Compute>(dlsym(h, "cblas_sgemm_compute"));
  auto set_threads = reinterpret_cast<SetThreads>(dlsym(h, "MKL_Set_Num_Threads"));
  if (!g_mkl.get_size || !g_mkl.pack || !g_mkl.compute || !set_threads) return 2;
  set_threads(threads);
  uint64_t seed = 1;
  for (const Shape& sh : g_shapes) {
    const size_t bytes = g_mkl.get_size(kBMatrix, 64, sh.N, sh.K);
    float* dst = static_cast<float*>(aligned_alloc(64, (bytes + 63) / 64 * 64));
    std::vector<float> w = RandomMatrix(sh.K, sh.N, seed++);
    g_mkl.pack(kRowMajor, kBMatrix, kNoTrans, 64, sh.N, sh.K, 1.f, w.data(), sh.N, dst);
    g_mkl.packed.push_back(dst);
  }
  return 0;
}

// y[M, N] of shape i alone (for the bitwise check), or a whole pass when i < 0; returns seconds.
double probe_mkl_pass(int64_t M, int i, float* out) {
  const double t = Now();
  for (size_t j = 0; j < g_shapes.size(); ++j) {
    if (i >= 0 && static_cast<int>(j) != i) continue;
    const Shape& sh = g_shapes[j];
    g_mkl.compute(kRowMajor, kNoTrans, kPacked, M, sh.N, sh.K, g_x.data(), sh.K, g_mkl.packed[j],
                  sh.N, 0.f, out && i >= 0 ? out : g_y.data(), sh.N);
  }
  return Now() - t;
}

int probe_kernel_available() {
#ifdef PROBE_KERNEL_SRC
  return 1;
#else
  return 0;
#endif
}

// The kernel from C over the same shapes: weights packed [NP, K, 32] (random), `threads` workers.
void probe_kernel_init(int threads) {
#ifdef PROBE_KERNEL_SRC
  g_threads = threads;
  uint64_t seed = 1;
  for (const Shape& sh : g_shapes) {
    const int64_t np = (sh.N + 31) / 32;
    float* w = static_cast<float*>(aligned_alloc(64, (np * sh.K * 32 * 4 + 63) / 64 * 64));
    for (int64_t i = 0; i < np * sh.K * 32; ++i) w[i] = Rand(seed);
    AdviseHugePages(w, np * sh.K * 32 * 4);
    g_packed.push_back(w);
  }
#else
  (void)threads;
#endif
}

double probe_kernel_pass(int64_t M, int i, float* out) {
#ifdef PROBE_KERNEL_SRC
  const double t = Now();
  const int workers = g_threads;
  SpinPool pool(workers - 1);
  for (size_t j = 0; j < g_shapes.size(); ++j) {
    if (i >= 0 && static_cast<int>(j) != i) continue;
    const Shape& sh = g_shapes[j];
    Job job;
    job.x = g_x.data();
    job.w = g_packed[j];
    job.y = out && i >= 0 ? out : g_y.data();
    job.M = M;
    job.D = sh.K;
    job.NP = (sh.N + 31) / 32;
    job.chunk = std::max<int64_t>(1, job.NP / (8 * workers));
    job.num_chunks = (job.NP + job.chunk - 1) / job.chunk;
    pool.Run([](void* a) { static_cast<Job*>(a)->Work(); }, &job);
  }
  return Now() - t;
#else
  (void)M, (void)i, (void)out;
  return -1;
#endif
}

int probe_dnnl_available() {
#ifdef PROBE_DNNL
  return 1;
#else
  return 0;
#endif
}

// oneDNN: builds the primitives for M rows (and the weights reordered for them) on first use.
double probe_dnnl_pass(int64_t M, int i, float* out) {
#ifdef PROBE_DNNL
  using dt = dnnl::memory::data_type;
  using tag = dnnl::memory::format_tag;
  auto& d = g_dnnl;
  if (!d.eng) {
    d.eng = std::make_unique<dnnl::engine>(dnnl::engine::kind::cpu, 0);
    d.stream = std::make_unique<dnnl::stream>(*d.eng);
  }
  if (!d.rows.count(M)) {
    DnnlRows& e = d.rows[M];
    uint64_t seed = 1;
    for (const Shape& sh : g_shapes) {
      dnnl::memory::desc src({M, sh.K}, dt::f32, tag::ab), dst({M, sh.N}, dt::f32, tag::ab);
      dnnl::memory::desc wany({sh.K, sh.N}, dt::f32, tag::any);
      dnnl::matmul::primitive_desc pd(*d.eng, src, wany, dst);
      std::vector<float> w = RandomMatrix(sh.K, sh.N, seed++);
      dnnl::memory plain({{sh.K, sh.N}, dt::f32, tag::ab}, *d.eng, w.data());
      dnnl::memory packed(pd.weights_desc(), *d.eng);
      dnnl::reorder(plain, packed).execute(*d.stream, plain, packed);
      e.prims.emplace_back(pd);
      e.w.push_back(packed);
      e.x.emplace_back(src, *d.eng, g_x.data());
      e.y.emplace_back(dst, *d.eng, g_y.data());
    }
    d.stream->wait();
  }
  DnnlRows& e = d.rows[M];
  const double t = Now();
  for (size_t j = 0; j < g_shapes.size(); ++j) {
    if (i >= 0 && static_cast<int>(j) != i) continue;
    if (out && i >= 0) e.y[j].set_data_handle(out);
    e.prims[j].execute(*d.stream, {{DNNL_ARG_SRC, e.x[j]}, {DNNL_ARG_WEIGHTS, e.w[j]},
                                   {DNNL_ARG_DST, e.y[j]}});
    if (out && i >= 0) e.y[j].set_data_handle(g_y.data());
  }
  d.stream->wait();
  return Now() - t;
#else
  (void)M, (void)i, (void)out;
  return -1;
#endif
}

// Frees the (large) library copies of the weights.
void probe_free_dnnl() {
#ifdef PROBE_DNNL
  g_dnnl.rows.clear();
#endif
}

}  // extern "C"
