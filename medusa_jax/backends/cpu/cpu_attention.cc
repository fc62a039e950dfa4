// out[B, L, H, E] = grouped-query attention of q[B, L, H, E] over a KV cache k, v [B, K, S, E]
// under a boolean mask[B, L, S] (true: query row l of sequence b attends to cache row s).
//
// Decoding attends a few new rows (one token, or a Medusa tree's nodes) over a cache whose capacity
// is fixed when decoding starts. XLA's masked attention reads every row of that capacity on every
// step, written or not, and runs as a dozen small ops per layer; on a 2-core CPU that was 4 ms of a
// 28 ms one-token step and 9 ms of a 16-node step with a 256-row cache, and it grows with the
// capacity (a 4,096-row cache doubled a 4-node step's time). This kernel does one layer's attention
// in one call and reads only the rows up to the last one a query row attends to: the rows written
// so far, whatever the capacity.
//
// Work items are (sequence, kv head, query row): the G = H / K query heads sharing a kv head read
// each K and V row once together. Per item: scores = q . k_s / sqrt(E) for the attended rows s,
// p_s = exp(score_s - max), out = (sum_s p_s v_s) / (sum_s p_s). Each query row's result depends
// only on its own q, mask row and the cache rows it attends to, computed by the same instructions
// whatever else is in the call (greedy Medusa needs a tree node's row to round exactly as the same
// token's row in a one-token step). A row that attends to nothing gets zeros.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "cpu_pool.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Items are handed out in chunks; below this many multiply-adds in all (over the rows actually
// attended), one thread does everything (waking the pool costs more than the work: a one-token
// step's layer over ~100 rows is ~0.1 M).
constexpr int64_t kSerialMacs = int64_t{1} << 20;
constexpr int kMaxG = 16;

#if defined(__AVX512F__)
// exp for x <= 0 (scores minus their maximum): x = n ln2 + r, |r| <= ln2 / 2, exp(r) by Cephes'
// degree-6 polynomial (about 1 ulp), times 2^n. Below -87.3 the result is flushed to 0.
inline __m512 Exp(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.3f);
  const __mmask16 tiny = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
  x = _mm512_max_ps(x, lo);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_maskz_mov_ps(static_cast<__mmask16>(~tiny), _mm512_scalef_ps(y, n));
}
#endif

// Turns a row of n16 scores (-inf where not attended) into exp(score - mx) in place; returns their
// sum. Not-attended rows become exactly 0.
inline float ExpInPlace(float* row, int64_t n16, float mx) {
#if defined(__AVX512F__)
  const __m512 m512 = _mm512_set1_ps(mx);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t s = 0; s < n16; s += 16) {
    const __m512 p = Exp(_mm512_sub_ps(_mm512_loadu_ps(row + s), m512));
    _mm512_storeu_ps(row + s, p);
    acc = _mm512_add_ps(acc, p);
  }
  return _mm512_reduce_add_ps(acc);
#else
  float sum = 0.f;
  for (int64_t s = 0; s < n16; ++s) {
    row[s] = row[s] == -INFINITY ? 0.f : std::exp(row[s] - mx);
    sum += row[s];
  }
  return sum;
#endif
}

// q . k over E floats: one product, then fused multiply-adds, 16 lanes at a time where E allows
// (the order ItemFast uses), else one scalar chain.
inline float Dot(const float* q, const float* k, int64_t E) {
#if defined(__AVX512F__)
  if (E % 16 == 0) {
    __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(q), _mm512_loadu_ps(k));
    for (int64_t e = 16; e < E; e += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + e), _mm512_loadu_ps(k + e), acc);
    return _mm512_reduce_add_ps(acc);
  }
#endif
  float d = 0.f;
  for (int64_t e = 0; e < E; ++e) d = std::fma(q[e], k[e], d);
  return d;
}

// o += p * v over E floats, one fused multiply-add per element.
inline void Axpy(float p, const float* v, float* o, int64_t E) {
#if defined(__AVX512F__)
  if (E % 16 == 0) {
    const __m512 pv = _mm512_set1_ps(p);
    for (int64_t e = 0; e < E; e += 16) _mm512_storeu_ps(o + e, _mm512_fmadd_ps(pv, _mm512_loadu_ps(v + e), _mm512_loadu_ps(o + e)));
    return;
  }
#endif
  for (int64_t e = 0; e < E; ++e) o[e] = std::fma(p, v[e], o[e]);
}

// One past the last true entry of mask[0, S) (0 if none), eight bytes at a time: a cache's unwritten
// capacity is a long run of false at the end.
inline int64_t Extent(const bool* m, int64_t S) {
  int64_t n = S;
  while (n > 0 && (n & 7)) {
    if (m[n - 1]) return n;
    --n;
  }
  for (; n >= 8; n -= 8) {
    uint64_t word;
    std::memcpy(&word, m + n - 8, 8);
    if (word) break;
  }
  while (n > 0 && !m[n - 1]) --n;
  return n;
}

#if defined(__AVX512F__)
// The item of Job::Item with G query heads and E = 16 * EV known at compile time: the G query rows
// and their output accumulators stay in registers while the K and V rows stream by once. The same
// arithmetic, in the same order, as the generic path.
template <int G, int EV>
void ItemFast(const float* qr, const float* kr, const float* vr, const bool* m, int64_t n, float scale,
              float* sc, int64_t n16, float* o) {
  __m512 q[G][EV], acc[G][EV];
  for (int g = 0; g < G; ++g) {
    for (int e = 0; e < EV; ++e) q[g][e] = _mm512_loadu_ps(qr + g * 16 * EV + 16 * e);
  }
  float mx[G];
  for (int g = 0; g < G; ++g) mx[g] = -INFINITY;
  for (int64_t s = 0; s < n16; ++s) {
    if (s >= n || !m[s]) {
      for (int g = 0; g < G; ++g) sc[g * n16 + s] = -INFINITY;
      continue;
    }
    __m512 k[EV];
    for (int e = 0; e < EV; ++e) k[e] = _mm512_loadu_ps(kr + s * 16 * EV + 16 * e);
    for (int g = 0; g < G; ++g) {
      __m512 a = _mm512_mul_ps(q[g][0], k[0]);
      for (int e = 1; e < EV; ++e) a = _mm512_fmadd_ps(q[g][e], k[e], a);
      const float d = _mm512_reduce_add_ps(a) / scale;
      sc[g * n16 + s] = d;
      mx[g] = std::max(mx[g], d);
    }
  }
  float inv[G];
  for (int g = 0; g < G; ++g) {
    inv[g] = 1.f / ExpInPlace(sc + g * n16, n16, mx[g]);
    for (int e = 0; e < EV; ++e) acc[g][e] = _mm512_setzero_ps();
  }
  for (int64_t s = 0; s < n; ++s) {
    if (!m[s]) continue;
    __m512 v[EV];
    for (int e = 0; e < EV; ++e) v[e] = _mm512_loadu_ps(vr + s * 16 * EV + 16 * e);
    for (int g = 0; g < G; ++g) {
      const __m512 p = _mm512_set1_ps(sc[g * n16 + s]);
      for (int e = 0; e < EV; ++e) acc[g][e] = _mm512_fmadd_ps(p, v[e], acc[g][e]);
    }
  }
  for (int g = 0; g < G; ++g) {
    const __m512 iv = _mm512_set1_ps(inv[g]);
    for (int e = 0; e < EV; ++e) _mm512_storeu_ps(o + g * 16 * EV + 16 * e, _mm512_mul_ps(acc[g][e], iv));
  }
}

using FastFn = void (*)(const float*, const float*, const float*, const bool*, int64_t, float, float*, int64_t,
                        float*);

// The compiled (G, E) pairs: up to 12 query vectors (and as many accumulators) in registers.
FastFn Fast(int64_t G, int64_t E) {
  if (E == 64) {
    switch (G) {
      case 1: return ItemFast<1, 4>;
      case 2: return ItemFast<2, 4>;
      case 3: return ItemFast<3, 4>;
    }
  }
  if (E == 128) {
    switch (G) {
      case 1: return ItemFast<1, 8>;
    }
  }
  if (E == 32) {
    switch (G) {
      case 1: return ItemFast<1, 2>;
      case 2: return ItemFast<2, 2>;
      case 3: return ItemFast<3, 2>;
      case 4: return ItemFast<4, 2>;
      case 5: return ItemFast<5, 2>;
      case 6: return ItemFast<6, 2>;
    }
  }
  return nullptr;
}
#endif

struct Job {
  const float* q;
  const float* k;
  const float* v;
  const bool* mask;
  float* out;
  std::vector<int64_t> extent;  // [B * L]: attended rows of each query row lie in [0, extent)
  int64_t B, L, H, K, S, E, G;
  float scale;
#if defined(__AVX512F__)
  FastFn fast = nullptr;
#endif
  int64_t num_items, chunk, num_chunks;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  // Query row l of sequence b, the G heads of kv head kv.
  void Item(int64_t item, std::vector<float>& buf) const {
    const int64_t l = item % L, kv = (item / L) % K, b = item / (L * K);
    const bool* m = mask + (b * L + l) * S;
    const int64_t n = extent[b * L + l];
    const float* kr = k + (b * K + kv) * S * E;
    const float* vr = v + (b * K + kv) * S * E;
    const float* qr = q + ((b * L + l) * H + kv * G) * E;
    float* o = out + ((b * L + l) * H + kv * G) * E;
    if (n == 0) {
      std::memset(o, 0, sizeof(float) * G * E);
      return;
    }
    const int64_t n16 = (n + 15) / 16 * 16;
    buf.resize(static_cast<size_t>(G * n16));
    float* sc = buf.data();  // [G, n16]: scores, then weights (0 where not attended)
#if defined(__AVX512F__)
    if (fast != nullptr) {
      fast(qr, kr, vr, m, n, scale, sc, n16, o);
      return;
    }
#endif
    const float kNeg = -INFINITY;
    float mx[kMaxG];
    for (int64_t g = 0; g < G; ++g) mx[g] = kNeg;
    for (int64_t s = 0; s < n16; ++s) {
      if (s >= n || !m[s]) {
        for (int64_t g = 0; g < G; ++g) sc[g * n16 + s] = kNeg;
        continue;
      }
      const float* ks = kr + s * E;
      for (int64_t g = 0; g < G; ++g) {
        const float d = Dot(qr + g * E, ks, E) / scale;
        sc[g * n16 + s] = d;
        mx[g] = std::max(mx[g], d);
      }
    }
    float sum[kMaxG];
    for (int64_t g = 0; g < G; ++g) sum[g] = ExpInPlace(sc + g * n16, n16, mx[g]);
    for (int64_t g = 0; g < G; ++g) std::memset(o + g * E, 0, sizeof(float) * E);
    for (int64_t s = 0; s < n; ++s) {
      if (!m[s]) continue;
      for (int64_t g = 0; g < G; ++g) Axpy(sc[g * n16 + s], vr + s * E, o + g * E, E);
    }
    for (int64_t g = 0; g < G; ++g) {
      const float inv = 1.f / sum[g];
      for (int64_t e = 0; e < E; ++e) o[g * E + e] *= inv;
    }
  }

  void Work() {
    thread_local std::vector<float> buf;
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < num_chunks;) {
      for (int64_t i = c * chunk, end = std::min(num_items, (c + 1) * chunk); i < end; ++i) Item(i, buf);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error Attention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                     ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> mask, ffi::ResultBuffer<ffi::F32> out) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), md = mask.dimensions(),
             od = out->dimensions();
  const bool ok = qd.size() == 4 && kd.size() == 4 && vd.size() == 4 && md.size() == 3 && od.size() == 4 &&
                  std::equal(kd.begin(), kd.end(), vd.begin()) && std::equal(qd.begin(), qd.end(), od.begin()) &&
                  kd[0] == qd[0] && kd[3] == qd[3] && kd[1] > 0 && qd[2] % kd[1] == 0 &&
                  qd[2] / kd[1] <= kMaxG && md[0] == qd[0] && md[1] == qd[1] && md[2] == kd[2];
  if (!ok) {
    return ffi::Error::InvalidArgument(
        "medusa_cpu_attention expects q [B, L, H, E], k and v [B, K, S, E] with H a multiple of K (at most 16 "
        "query heads per kv head), mask [B, L, S] and out [B, L, H, E]");
  }
  auto job = std::make_shared<Job>();
  job->q = q.typed_data();
  job->k = k.typed_data();
  job->v = v.typed_data();
  job->mask = reinterpret_cast<const bool*>(mask.typed_data());
  job->out = out->typed_data();
  job->B = qd[0], job->L = qd[1], job->H = qd[2], job->E = qd[3], job->K = kd[1], job->S = kd[2];
  job->G = job->H / job->K;
  job->scale = std::sqrt(static_cast<float>(job->E));
#if defined(__AVX512F__)
  job->fast = Fast(job->G, job->E);
#endif
  job->num_items = job->B * job->K * job->L;
  if (job->num_items == 0 || job->E == 0) return ffi::Error::Success();
  // Each query row's extent once (its K items share it), and the work they add up to.
  job->extent.resize(job->B * job->L);
  int64_t rows = 0;
  for (int64_t i = 0; i < job->B * job->L; ++i) rows += job->extent[i] = Extent(job->mask + i * job->S, job->S);
  const int64_t macs = rows * job->H * job->E * 2;
  const int64_t workers = macs < kSerialMacs ? 1 : medusa_cpu::Workers(pool);
  job->chunk = std::max<int64_t>(1, job->num_items / (4 * workers));
  job->num_chunks = (job->num_items + job->chunk - 1) / job->chunk;
  medusa_cpu::Run(pool, job, workers);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MedusaCpuAttention, Attention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
