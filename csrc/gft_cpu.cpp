// Native CPU row kernels of the GFT loss (backend="cpu").
//
// The same two primitives as gft_kernels/cpu/torch_rows.py (the portable spec):
//
//   row_stats(logits (N, V), T, with_entropy, active=None) -> (lse_t, lse_1, entropy)
//       lse_t = logsumexp(z / T), lse_1 = logsumexp(z), entropy of softmax(z / T).
//   row_grad(logits (N, V), targets (N,), lse_t (N,), coef (N,), T, out (N, V)) -> out
//       out = coef * (softmax(z / T) - onehot(targets)); out may alias logits.
//
// Design:
// * Rows are split across threads with at::parallel_for (honours torch.set_num_threads).
// * row_stats streams each row once, in L1-sized blocks: a max pass over the block, then an
//   exp pass over the same (now cache-hot) block. When the running max grows, the three
//   per-row accumulators (exp-sum at T, exp-sum at 1, entropy numerator) are rescaled once
//   per block instead of once per element.
// * row_grad reads and writes each row once; rows with coef == 0 are only zero-filled.
// * fp32 / bf16 / fp16 inputs accumulate in fp32 within a block and in fp64 across blocks;
//   fp64 inputs use a scalar fp64 path (gradcheck).
// * The vector path is AVX2+FMA+F16C, compiled through function target attributes and
//   chosen at run time, so the shared object never needs -march=native and still runs on
//   CPUs without AVX2 (scalar path). ATen's Vectorized<float> is not used for exp because in
//   an extension build (no CPU_CAPABILITY macro) it falls back to a per-element std::exp.

// ATen + torch/python.h (pybind11 with the Tensor casters) rather than torch/extension.h:
// the latter pulls in the whole C++ frontend and made the first-use compile ~40% slower.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/python.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define GFT_HAVE_AVX2_PATH 1
#include <immintrin.h>
#define GFT_AVX2 __attribute__((target("avx2,fma,f16c")))
#else
#define GFT_HAVE_AVX2_PATH 0
#endif

namespace {

// Elements per block of row_stats: 2048 fp32 = 8 KiB (plus an 8 KiB conversion buffer for
// 16-bit inputs) stays in L1 between the max pass and the exp pass.
constexpr int64_t kBlock = 2048;

// Below this many elements per thread the OpenMP fork costs more than it saves.
constexpr int64_t kMinElementsPerTask = 32768;

constexpr float kInf = std::numeric_limits<float>::infinity();

std::atomic<bool> g_simd_enabled{true};

bool cpu_has_avx2() {
#if GFT_HAVE_AVX2_PATH
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c");
  return has;
#else
  return false;
#endif
}

bool use_avx2() { return g_simd_enabled.load(std::memory_order_relaxed) && cpu_has_avx2(); }

// Runs f(begin, end) over row ranges covering [0, n_rows) on torch's intra-op threads.
//
// Rows are claimed in chunks from a shared counter instead of one even split up front: row
// costs differ (a coef == 0 row is only a memset) and such rows come in runs (padding,
// whole zero-advantage groups), which an even split hands to a single thread. Every row is
// computed the same way whichever thread takes it, so results do not depend on scheduling.
template <typename F>
void parallel_rows(int64_t n_rows, int64_t n_cols, const F& f) {
  const int64_t min_rows = std::max<int64_t>(1, kMinElementsPerTask / std::max<int64_t>(n_cols, 1));
  const int64_t n_threads = std::min<int64_t>(at::get_num_threads(), n_rows / min_rows);
  if (n_threads <= 1 || at::in_parallel_region()) {
    f(0, n_rows);
    return;
  }
  // ~16 chunks per thread: fine enough to balance, coarse enough to keep rows contiguous.
  const int64_t chunk = std::max(min_rows, (n_rows + 16 * n_threads - 1) / (16 * n_threads));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, n_threads, 1, [&](int64_t task_begin, int64_t task_end) {
    for (int64_t task = task_begin; task < task_end; ++task) {
      for (int64_t start = next.fetch_add(chunk); start < n_rows; start = next.fetch_add(chunk)) {
        f(start, std::min(start + chunk, n_rows));
      }
    }
  });
}

// ---------------------------------------------------------------------------------------
// Scalar path: fp64 inputs, and every dtype on CPUs without AVX2 (or when disabled).
// ---------------------------------------------------------------------------------------

// Compute type of the scalar path: fp64 stays fp64, reduced precision computes in fp32.
template <typename T>
using compute_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// A row that can carry neither loss nor gradient (masked, zero advantage) is not read: its
// log-sum-exps are +inf, i.e. softmax 0 everywhere and q = 0, so c = 0 downstream.
template <typename C>
inline void skip_row(int64_t row, C* lse_t, C* lse_1, C* entropy) {
  lse_t[row] = std::numeric_limits<C>::infinity();
  lse_1[row] = std::numeric_limits<C>::infinity();
  if (entropy != nullptr) entropy[row] = 0;
}

template <typename T>
void stats_row_scalar(const T* z, int64_t n_cols, double inv_t, bool with_entropy,
                      compute_t<T>* lse_t, compute_t<T>* lse_1, compute_t<T>* entropy) {
  using C = compute_t<T>;
  C row_max = -std::numeric_limits<C>::infinity();
  for (int64_t v = 0; v < n_cols; ++v) {
    const C x = static_cast<C>(z[v]);
    if (x > row_max) row_max = x;  // NaN never wins; it still poisons the sums below.
  }
  // A row with no finite max is shifted by 0 so that exp(-inf) stays 0 instead of NaN.
  const C shift = std::isfinite(row_max) ? row_max : C(0);
  const C inv = static_cast<C>(inv_t);
  // Sums in fp64: this path is sequential, so fp32 sums over ~1e5 terms would drift.
  double sum_t = 0.0, sum_1 = 0.0, weighted = 0.0;
  for (int64_t v = 0; v < n_cols; ++v) {
    const C x1 = static_cast<C>(z[v]) - shift;
    const C x = x1 * inv;
    const C e = std::exp(x);
    sum_t += e;
    sum_1 += std::exp(x1);
    if (e > C(0)) weighted += static_cast<double>(e) * static_cast<double>(x);
  }
  const double log_t = std::log(sum_t);
  *lse_t = static_cast<C>(static_cast<double>(shift) * inv_t + log_t);
  *lse_1 = static_cast<C>(static_cast<double>(shift) + std::log(sum_1));
  if (with_entropy) *entropy = static_cast<C>(log_t - weighted / sum_t);
}

template <typename T>
void grad_row_scalar(const T* z, T* out, int64_t n_cols, int64_t target, compute_t<T> lse,
                     compute_t<T> coef, double inv_t) {
  using C = compute_t<T>;
  const C inv = static_cast<C>(inv_t);
  // Read the target logit before the row is overwritten (out may alias logits).
  const C g_target = coef * (std::exp(static_cast<C>(z[target]) * inv - lse) - C(1));
  for (int64_t v = 0; v < n_cols; ++v) {
    out[v] = static_cast<T>(coef * std::exp(static_cast<C>(z[v]) * inv - lse));
  }
  out[target] = static_cast<T>(g_target);
}

// ---------------------------------------------------------------------------------------
// AVX2 path.
// ---------------------------------------------------------------------------------------
#if GFT_HAVE_AVX2_PATH

GFT_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

GFT_AVX2 inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// exp(x) for 8 floats, ~2 ulp on [-87.3, 88.3] (Cephes/Sleef range reduction and
// polynomial). It is the inner-loop cost of both kernels, so it avoids compares and blends:
// * x is clamped to [-88, 88.73] (max/min operand order lets NaN through: they return the
//   second operand when either is NaN);
// * n = round(x / ln2) comes from the "magic number" addition, whose low mantissa bits
//   already hold n + 127, so 2^n is one shift of those bits: no round/convert instructions;
// * at the low clamp n = -127, the biased exponent is 0 and 2^n reads as +0.0, so exp(-inf)
//   and every x <= -88 give exactly 0 (x in (-88, -87.3] may give a denormal or 0);
// * at the high end n = 128 gives an exponent of 255, i.e. +inf (for x > ~88.38).
GFT_AVX2 inline __m256 exp8(__m256 x) {
  const __m256 magic = _mm256_set1_ps(12582912.0f + 127.0f);  // 1.5 * 2^23 + exponent bias
  x = _mm256_min_ps(_mm256_set1_ps(88.7228394f), _mm256_max_ps(_mm256_set1_ps(-88.0f), x));
  const __m256 t = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), magic);
  const __m256 n = _mm256_sub_ps(t, magic);
  // r = x - n ln2 in two steps so that r keeps full precision.
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(t), 23));
  return _mm256_mul_ps(p, scale);
}

// 8 elements -> 8 floats.
template <typename T>
GFT_AVX2 inline __m256 load8(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm256_loadu_ps(p);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
  } else {
    static_assert(std::is_same_v<T, c10::Half>);
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
}

GFT_AVX2 inline __m256i bf16_round_bits(__m256 v) {
  // Round to nearest even on the bit pattern, as c10::BFloat16 does. No NaN special case:
  // a carry out of the rounding needs a NaN whose low 16 bits are >= 0x8000, while the
  // NaNs reaching here come from bf16 inputs (low bits 0) or are the default NaN.
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded =
      _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
  return _mm256_srli_epi32(rounded, 16);
}

// 16 floats (a: elements 0-7, b: 8-15) -> 16 elements, rounded to nearest even like
// Tensor.to(dtype).
template <typename T>
GFT_AVX2 inline void store16(T* p, __m256 a, __m256 b) {
  if constexpr (std::is_same_v<T, float>) {
    _mm256_storeu_ps(p, a);
    _mm256_storeu_ps(p + 8, b);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    // packus interleaves 128-bit lanes (a0-3 b0-3 | a4-7 b4-7); the permute restores order.
    const __m256i packed = _mm256_packus_epi32(bf16_round_bits(a), bf16_round_bits(b));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_permute4x64_epi64(packed, 0xD8));
  } else {
    static_assert(std::is_same_v<T, c10::Half>);
    constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(a, kRound));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p + 8), _mm256_cvtps_ph(b, kRound));
  }
}

// 8 floats -> 8 elements (tail of a row).
template <typename T>
GFT_AVX2 inline void store8(T* p, __m256 v) {
  if constexpr (std::is_same_v<T, float>) {
    _mm256_storeu_ps(p, v);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const __m256i r = bf16_round_bits(v);
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
  } else {
    static_assert(std::is_same_v<T, c10::Half>);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                     _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
}

// Software prefetch: on the 2-core Xeon VM used for tuning, the hardware prefetchers alone
// left the in-place read-modify-write stream of row_grad ~3x and the out-of-place one ~1.4x
// slower than with an explicit T0 prefetch of the read and of the write stream 2 KiB ahead
// (prefetchw measured no better than T0 and needs another CPUID check).
constexpr int64_t kPrefetchBytes = 2048;
constexpr int64_t kLineBytes = 64;

GFT_AVX2 inline void prefetch_ahead(const void* p) {
  _mm_prefetch(static_cast<const char*>(p) + kPrefetchBytes, _MM_HINT_T0);
}

// Per-row running state of row_stats; fp64 so that rescaling across ~100 blocks is exact
// enough and the block partial sums (fp32, <= kBlock terms) add without drift.
struct RowAcc {
  double sum_t = 0.0;
  double sum_1 = 0.0;
  double weighted = 0.0;  // sum e * x, x = (z - shift) / T
  float running_max = -kInf;
  float shift = 0.0f;  // running max if finite, else 0
};

// One vector of the exp pass: exp-sum at T, exp-sum at 1 and the entropy numerator.
template <bool kTOne, bool kEntropy>
GFT_AVX2 inline void stats_step(__m256 z, __m256 vshift, __m256 vinv, __m256& st, __m256& s1,
                                __m256& w) {
  const __m256 x1 = _mm256_sub_ps(z, vshift);
  __m256 x = kTOne ? x1 : _mm256_mul_ps(x1, vinv);
  // Clamping x keeps e * x at 0 (not 0 * -inf = NaN) for -inf logits; NaN passes through.
  if (kEntropy) x = _mm256_max_ps(_mm256_set1_ps(-1.0e30f), x);
  const __m256 e = exp8(x);
  st = _mm256_add_ps(st, e);
  if (kEntropy) w = _mm256_fmadd_ps(e, x, w);
  if (!kTOne) s1 = _mm256_add_ps(s1, exp8(x1));
}

// Fold one block (n floats, n a multiple of 8, padding = -inf, max = block_max) into the
// row state; src is cache-hot from the max pass.
//
// next/next_elem_bytes: the next block of the row in memory (nullptr for the last one). It is
// prefetched during this compute-bound exp pass so that the memory-bound max pass of the
// next block finds it in cache: without it, memory and ALUs took turns being idle.
template <bool kTOne, bool kEntropy>
GFT_AVX2 inline void stats_block(const float* src, int64_t n, float block_max, float inv_t,
                                 const char* next, int64_t next_elem_bytes, RowAcc& acc) {
  if (block_max > acc.running_max) {  // false for NaN: NaN reaches the sums instead
    acc.running_max = block_max;
    const float new_shift = std::isfinite(block_max) ? block_max : 0.0f;
    // All-zero accumulators (nothing seen, or only -inf) need no rescale; skipping also
    // avoids 0 * inf when the old shift was a placeholder 0.
    if (new_shift != acc.shift &&
        (acc.sum_t != 0.0 || acc.sum_1 != 0.0 || acc.weighted != 0.0)) {
      const double d1 = static_cast<double>(new_shift) - acc.shift;
      const double dt = d1 * inv_t;
      const double rt = std::exp(-dt);
      // sum e * (x - dt) * exp(-dt) = exp(-dt) * (weighted - dt * sum_t)
      acc.weighted = rt * (acc.weighted - dt * acc.sum_t);
      acc.sum_t *= rt;
      acc.sum_1 *= std::exp(-d1);
    }
    acc.shift = new_shift;
  }

  const __m256 vshift = _mm256_set1_ps(acc.shift);
  const __m256 vinv = _mm256_set1_ps(inv_t);
  // One vector per iteration and one accumulator each: the ~20-uop body already covers the
  // add latency, and a second accumulator set made GCC spill them (16 ymm registers).
  __m256 st = _mm256_setzero_ps(), s1 = st, w = st;
  if (next != nullptr) {
    // One prefetch per vector: 1 (fp32) or 3 (16-bit) of each 2/4 hit an in-flight line,
    // cheaper than the bookkeeping to skip them.
    for (int64_t i = 0; i < n; i += 8) {
      _mm_prefetch(next + i * next_elem_bytes, _MM_HINT_T0);
      stats_step<kTOne, kEntropy>(_mm256_loadu_ps(src + i), vshift, vinv, st, s1, w);
    }
  } else {
    for (int64_t i = 0; i < n; i += 8) {
      stats_step<kTOne, kEntropy>(_mm256_loadu_ps(src + i), vshift, vinv, st, s1, w);
    }
  }
  const double block_t = hsum(st);
  acc.sum_t += block_t;
  acc.sum_1 += kTOne ? block_t : static_cast<double>(hsum(s1));
  if (kEntropy) acc.weighted += hsum(w);
}

template <typename T, bool kTOne, bool kEntropy>
GFT_AVX2 void stats_rows_avx2(const T* logits, int64_t row_stride, int64_t n_cols, float inv_t,
                              int64_t begin, int64_t end, float* lse_t, float* lse_1,
                              float* entropy, const bool* active) {
  alignas(32) float buf[kBlock];
  for (int64_t row = begin; row < end; ++row) {
    if (active != nullptr && !active[row]) {
      skip_row(row, lse_t, lse_1, entropy);
      continue;
    }
    const T* z = logits + row * row_stride;
    RowAcc acc;
    for (int64_t start = 0; start < n_cols; start += kBlock) {
      const int64_t n = std::min(kBlock, n_cols - start);
      const int64_t n_vec = n & ~int64_t(7);
      const T* zb = z + start;
      // Max pass, streaming from memory (16-bit inputs are widened into buf on the way).
      constexpr int64_t kPerLine = kLineBytes / sizeof(T);
      __m256 vmax[kPerLine / 8];
      for (auto& m : vmax) m = _mm256_set1_ps(-kInf);
      int64_t i = 0;
      for (; i + kPerLine <= n_vec; i += kPerLine) {
        prefetch_ahead(zb + i);
        for (int64_t k = 0; k < kPerLine / 8; ++k) {
          const __m256 x = load8(zb + i + 8 * k);
          if constexpr (!std::is_same_v<T, float>) _mm256_store_ps(buf + i + 8 * k, x);
          vmax[k] = _mm256_max_ps(vmax[k], x);
        }
      }
      for (; i < n_vec; i += 8) {
        const __m256 x = load8(zb + i);
        if constexpr (!std::is_same_v<T, float>) _mm256_store_ps(buf + i, x);
        vmax[0] = _mm256_max_ps(vmax[0], x);
      }
      for (int64_t k = 1; k < kPerLine / 8; ++k) vmax[0] = _mm256_max_ps(vmax[0], vmax[k]);
      float block_max = hmax(vmax[0]);
      const float* src = buf;
      if constexpr (std::is_same_v<T, float>) {
        if (n_vec == n) {
          src = zb;  // fp32 full vectors: the exp pass re-reads the (L1-hot) input
        } else {
          std::memcpy(buf, zb, n_vec * sizeof(float));
        }
      }
      int64_t n_pad = n_vec;
      if (n_vec != n) {
        // Pad the tail to a full vector with -inf, which adds exactly 0 to every sum.
        for (int64_t j = n_vec; j < n_vec + 8; ++j) {
          buf[j] = j < n ? static_cast<float>(zb[j]) : -kInf;
          if (buf[j] > block_max) block_max = buf[j];
        }
        n_pad = n_vec + 8;
      }
      const char* next = start + kBlock < n_cols
                             ? reinterpret_cast<const char*>(zb + kBlock)
                             : nullptr;
      stats_block<kTOne, kEntropy>(src, n_pad, block_max, inv_t, next, sizeof(T), acc);
    }
    const double log_t = std::log(acc.sum_t);
    lse_t[row] = static_cast<float>(static_cast<double>(acc.shift) * inv_t + log_t);
    lse_1[row] = static_cast<float>(static_cast<double>(acc.shift) + std::log(acc.sum_1));
    if (kEntropy) entropy[row] = static_cast<float>(log_t - acc.weighted / acc.sum_t);
  }
}

template <typename T>
GFT_AVX2 void grad_rows_avx2(const T* logits, int64_t in_stride, T* out, int64_t out_stride,
                             int64_t n_cols, const int64_t* targets, const float* lse_t,
                             const float* coef, float inv_t, int64_t begin, int64_t end) {
  const __m256 vinv = _mm256_set1_ps(inv_t);
  for (int64_t row = begin; row < end; ++row) {
    T* o = out + row * out_stride;
    const float c = coef[row];
    if (c == 0.0f) {
      // Zero-coefficient rows are the cheap case: a write, never a read of the logits.
      std::memset(static_cast<void*>(o), 0, n_cols * sizeof(T));
      continue;
    }
    const T* z = logits + row * in_stride;
    const float lse = lse_t[row];
    const int64_t target = targets[row];
    // Read the target logit before the row is overwritten (out may alias logits).
    const float g_target =
        c * (std::exp(std::fma(static_cast<float>(z[target]), inv_t, -lse)) - 1.0f);
    const __m256 vneg_lse = _mm256_set1_ps(-lse);
    const __m256 vc = _mm256_set1_ps(c);
    constexpr int64_t kPerLine = kLineBytes / sizeof(T);
    int64_t v = 0;
    for (; v + kPerLine <= n_cols; v += kPerLine) {
      prefetch_ahead(z + v);
      prefetch_ahead(o + v);  // same line when in place; a hit then, hence unconditional
      for (int64_t k = 0; k < kPerLine; k += 16) {
        const __m256 a = exp8(_mm256_fmadd_ps(load8(z + v + k), vinv, vneg_lse));
        const __m256 b = exp8(_mm256_fmadd_ps(load8(z + v + k + 8), vinv, vneg_lse));
        store16(o + v + k, _mm256_mul_ps(vc, a), _mm256_mul_ps(vc, b));
      }
    }
    for (; v + 8 <= n_cols; v += 8) {
      store8(o + v, _mm256_mul_ps(vc, exp8(_mm256_fmadd_ps(load8(z + v), vinv, vneg_lse))));
    }
    for (; v < n_cols; ++v) {
      o[v] = static_cast<T>(c * std::exp(std::fma(static_cast<float>(z[v]), inv_t, -lse)));
    }
    o[target] = static_cast<T>(g_target);
  }
}

#endif  // GFT_HAVE_AVX2_PATH

// ---------------------------------------------------------------------------------------
// Dispatch.
// ---------------------------------------------------------------------------------------

template <typename T>
void stats_dispatch(const at::Tensor& logits, double temperature, bool with_entropy,
                    const bool* act, at::Tensor& lse_t, at::Tensor& lse_1, at::Tensor& entropy) {
  using C = compute_t<T>;
  const int64_t n_rows = logits.size(0), n_cols = logits.size(1);
  const int64_t stride = logits.stride(0);
  const T* z = logits.const_data_ptr<T>();
  C* lt = lse_t.data_ptr<C>();
  C* l1 = lse_1.data_ptr<C>();
  C* ent = with_entropy ? entropy.data_ptr<C>() : nullptr;
  const double inv_t = 1.0 / temperature;
#if GFT_HAVE_AVX2_PATH
  if constexpr (!std::is_same_v<T, double>) {
    if (use_avx2()) {
      const float inv = static_cast<float>(inv_t);
      // T == 1 needs one exp per element instead of two.
      const bool t_one = inv == 1.0f;
      parallel_rows(n_rows, n_cols, [&](int64_t begin, int64_t end) {
        if (t_one && with_entropy) {
          stats_rows_avx2<T, true, true>(z, stride, n_cols, inv, begin, end, lt, l1, ent, act);
        } else if (t_one) {
          stats_rows_avx2<T, true, false>(z, stride, n_cols, inv, begin, end, lt, l1, ent, act);
        } else if (with_entropy) {
          stats_rows_avx2<T, false, true>(z, stride, n_cols, inv, begin, end, lt, l1, ent, act);
        } else {
          stats_rows_avx2<T, false, false>(z, stride, n_cols, inv, begin, end, lt, l1, ent, act);
        }
      });
      return;
    }
  }
#endif
  parallel_rows(n_rows, n_cols, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      if (act != nullptr && !act[row]) {
        skip_row(row, lt, l1, ent);
        continue;
      }
      stats_row_scalar<T>(z + row * stride, n_cols, inv_t, with_entropy, lt + row, l1 + row,
                          with_entropy ? ent + row : nullptr);
    }
  });
}

template <typename T>
void grad_dispatch(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse_t,
                   const at::Tensor& coef, double temperature, at::Tensor& out) {
  using C = compute_t<T>;
  const int64_t n_rows = logits.size(0), n_cols = logits.size(1);
  const int64_t in_stride = logits.stride(0), out_stride = out.stride(0);
  // Not const_data_ptr: when out aliases logits the same memory is written below.
  const T* z = static_cast<const T*>(logits.data_ptr());
  T* o = out.data_ptr<T>();
  const int64_t* tgt = targets.const_data_ptr<int64_t>();
  const C* lse = lse_t.const_data_ptr<C>();
  const C* cf = coef.const_data_ptr<C>();
  const double inv_t = 1.0 / temperature;
#if GFT_HAVE_AVX2_PATH
  if constexpr (!std::is_same_v<T, double>) {
    if (use_avx2()) {
      const float inv = static_cast<float>(inv_t);
      parallel_rows(n_rows, n_cols, [&](int64_t begin, int64_t end) {
        grad_rows_avx2<T>(z, in_stride, o, out_stride, n_cols, tgt, lse, cf, inv, begin, end);
      });
      return;
    }
  }
#endif
  parallel_rows(n_rows, n_cols, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      T* orow = o + row * out_stride;
      if (cf[row] == C(0)) {
        std::memset(static_cast<void*>(orow), 0, n_cols * sizeof(T));
        continue;
      }
      grad_row_scalar<T>(z + row * in_stride, orow, n_cols, tgt[row], lse[row], cf[row], inv_t);
    }
  });
}

at::ScalarType stat_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

void check_logits(const at::Tensor& logits, const char* name) {
  TORCH_CHECK(logits.device().is_cpu(), name, ": expected a CPU tensor, got ", logits.device());
  TORCH_CHECK(logits.dim() == 2, name, ": expected a 2-D (N, V) tensor, got ", logits.dim(),
              "-D");
  const auto dt = logits.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf || dt == at::kDouble,
              name, ": expected float32/bfloat16/float16/float64, got ", dt);
  TORCH_CHECK(logits.size(1) >= 1, name, ": expected V >= 1 columns, got ", logits.size(1));
  // Rows are addressed as base + row * stride(0) + v, so only stride(1) must be 1 (a single
  // column may have any stride since only element 0 of each row is read).
  TORCH_CHECK(logits.stride(1) == 1 || logits.size(1) == 1, name,
              ": the last dimension must be contiguous (stride 1), got stride ", logits.stride(1));
}

void check_temperature(double temperature) {
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0.0,
              "temperature: expected a finite value > 0, got ", temperature);
}

void check_vector(const at::Tensor& t, const char* name, int64_t n, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, name, ": expected shape (", n, ",), got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, name, ": expected ", dtype, ", got ", t.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> row_stats(
    const at::Tensor& logits, double temperature, bool with_entropy,
    const c10::optional<at::Tensor>& active) {
  check_logits(logits, "logits");
  check_temperature(temperature);
  const at::Tensor& z = logits;
  const int64_t n_rows = z.size(0);
  const bool* act = nullptr;
  if (active.has_value() && active->defined()) {
    check_vector(*active, "active", n_rows, at::kBool);
    act = active->const_data_ptr<bool>();
  }
  const auto opts = z.options().dtype(stat_dtype(z.scalar_type()));
  at::Tensor lse_t = at::empty({n_rows}, opts);
  at::Tensor lse_1 = at::empty({n_rows}, opts);
  at::Tensor entropy = with_entropy ? at::empty({n_rows}, opts) : at::Tensor();
  if (n_rows > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, z.scalar_type(), "gft_row_stats",
                                    [&] {
                                      stats_dispatch<scalar_t>(z, temperature, with_entropy,
                                                               act, lse_t, lse_1, entropy);
                                    });
  }
  return {lse_t, lse_1, entropy};
}

at::Tensor row_grad(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse_t,
                    const at::Tensor& coef, double temperature, at::Tensor out) {
  check_logits(logits, "logits");
  check_temperature(temperature);
  const int64_t n_rows = logits.size(0), n_cols = logits.size(1);
  const auto acc = stat_dtype(logits.scalar_type());
  check_vector(targets, "targets", n_rows, at::kLong);
  check_vector(lse_t, "lse_t", n_rows, acc);
  check_vector(coef, "coef", n_rows, acc);
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == logits.scalar_type() &&
                  out.sizes() == logits.sizes(),
              "out: expected a CPU ", logits.scalar_type(), " tensor of shape ", logits.sizes(),
              ", got ", out.scalar_type(), " ", out.sizes(), " on ", out.device());
  TORCH_CHECK((out.stride(1) == 1 || n_cols == 1) && (n_rows <= 1 || out.stride(0) >= n_cols),
              "out: the last dimension must be contiguous and rows must not overlap, got strides ",
              out.strides());
  if (n_rows == 0) return out;
  // In place means out *is* logits (same start and row stride): each element is read before
  // it is written. A shifted, partially overlapping view would read already-written values.
  const bool same_storage = out.data_ptr() == logits.data_ptr() &&
                            (n_rows == 1 || out.stride(0) == logits.stride(0));
  if (!same_storage) {
    const auto bytes = [&](const at::Tensor& t) {
      const auto* begin = static_cast<const char*>(t.data_ptr());
      const int64_t span = (n_rows - 1) * t.stride(0) + n_cols;
      return std::make_pair(begin, begin + span * static_cast<int64_t>(t.element_size()));
    };
    const auto [in_begin, in_end] = bytes(logits);
    const auto [out_begin, out_end] = bytes(out);
    TORCH_CHECK(out_end <= in_begin || in_end <= out_begin,
                "out: must be logits itself (in place) or not overlap it at all");
  }
  const at::Tensor tg = targets.contiguous();
  const at::Tensor lt = lse_t.contiguous();
  const at::Tensor cf = coef.contiguous();
  // Validate up front: an out-of-range target would write outside the row.
  const int64_t* tp = tg.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < n_rows; ++i) {
    TORCH_CHECK(tp[i] >= 0 && tp[i] < n_cols, "targets: row ", i, " holds ", tp[i],
                ", expected a value in [0, ", n_cols, ")");
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "gft_row_grad",
                                  [&] {
                                    grad_dispatch<scalar_t>(logits, tg, lt, cf, temperature, out);
                                  });
  return out;
}

std::string simd_path() { return use_avx2() ? "avx2" : "scalar"; }

// Tests use this to exercise the scalar path on an AVX2 machine; returns the previous value.
bool set_simd_enabled(bool enabled) { return g_simd_enabled.exchange(enabled); }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Native CPU row kernels of the GFT loss (row_stats, row_grad).";
  m.def("row_stats", &row_stats, "(lse_t, lse_1, entropy) of each row of (N, V) logits",
        py::arg("logits"), py::arg("temperature"), py::arg("with_entropy"),
        py::arg("active") = py::none(), py::call_guard<py::gil_scoped_release>());
  m.def("row_grad", &row_grad, "out = coef * (softmax(z / T) - onehot(targets)), in place OK",
        py::arg("logits"), py::arg("targets"), py::arg("lse_t"), py::arg("coef"),
        py::arg("temperature"), py::arg("out"), py::call_guard<py::gil_scoped_release>());
  m.def("simd_path", &simd_path, "'avx2' or 'scalar': the inner loops in use");
  m.def("set_simd_enabled", &set_simd_enabled, "enable/disable the SIMD path (tests)",
        py::arg("enabled"));
}
