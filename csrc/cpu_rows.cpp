// Native CPU row kernels of the GFT loss (backend="cpu").
//
// The three primitives of gft_kernels/backends/base.py (the contract; torch_rows.py is the
// portable spec):
//
//   token_pass(logits (N, V), targets, advantages, mask, ...) -> per-token
//       (loss, logprobs, probs, entropy, row_max, sum_exp, scale), the data checks, and
//       on request the gradient of sum_t w_t l_t written in the same pass;
//   partial_stats(logits, local_targets, ...) -> (row_max, sum_exp, sum_exp_1, weighted,
//       target_logit) of a block of vocabulary columns (vocab-parallel heads);
//   row_grad(logits, targets, row_max, sum_exp, grad_rows, scale, ..., out) -> out.
//
// Numerics: a row is summarised by its max m of the transformed logits z' and by
// S = sum exp((z' - m) / T); the softmax is exp((z' - m) / T) / S in both directions, never
// exp(z / T - lse) with a rounded lse, and the module is compiled with -ffp-contract=off.
// A certain token (x = 0, S = 1) thus gets a gradient of exactly 0 at any temperature.
//
// Design:
// * Rows are split across threads with at::parallel_for (honours torch.set_num_threads).
// * The statistics stream each row once, in L1-sized blocks: a max pass over the block,
//   then an exp pass over the same (now cache-hot) block. When the running max grows the
//   per-row accumulators (exp-sum at T, exp-sum at 1, entropy numerator) are rescaled once
//   per block instead of once per element.
// * The gradient reads and writes each row once; rows with a zero coefficient are only
//   zero-filled, never read.
// * fp32 / bf16 / fp16 inputs accumulate in fp32 within a block and in fp64 across blocks;
//   fp64 inputs use a scalar fp64 path (gradcheck).
// * The vector path is AVX2+FMA+F16C, compiled through function target attributes and
//   chosen at run time, so the shared object never needs -march=native and still runs on
//   CPUs without AVX2 (scalar path). ATen's Vectorized<float> is not used for exp because in
//   an extension build (no CPU_CAPABILITY macro) it falls back to a per-element std::exp.
// * Data checks (target range, 0/1 mask, finite advantages) run on the host before any row
//   is touched and raise ValueError naming the first bad value: no device sync on a CPU.

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
// Shared pieces.
// ---------------------------------------------------------------------------------------

// The logit transform of soft-capped or scaled heads: z' = cap * tanh(z * scale / cap), or
// z' = z * scale. kind: 0 none, 1 scale, 2 soft-cap.
struct LogitTransform {
  int kind = 0;
  double scale = 1.0;
  double cap = 0.0;
  double slope = 0.0;  // scale / cap
};

LogitTransform make_transform(double logit_scale, double logit_softcap) {
  LogitTransform tf;
  if (logit_softcap > 0.0) {
    tf.kind = 2;
    tf.scale = logit_scale;
    tf.cap = logit_softcap;
    tf.slope = logit_scale / logit_softcap;
  } else if (logit_scale != 1.0) {
    tf.kind = 1;
    tf.scale = logit_scale;
  }
  return tf;
}

// Compute type of the scalar path: fp64 stays fp64, reduced precision computes in fp32.
template <typename T>
using compute_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Per-row results of a token pass, in the compute type.
template <typename C>
struct TokenOut {
  C* loss;
  C* logprobs;
  C* probs;
  C* entropy;  // nullptr unless stats
  C* row_max;
  C* sum_exp;
  C* scale;
};

// Per-token inputs of a token pass (the checks already ran).
template <typename C, typename I>
struct TokenIn {
  const I* targets;
  const C* advantages;
  int64_t tokens_per_advantage;
  const uint8_t* mask_u8;  // at most one of the two masks
  const float* mask_f32;
  const C* grad_weights;  // nullptr unless the gradient is written in the same pass
  int64_t ignore_index;
  double tau;
  double inv_t;

  bool valid(int64_t row) const {
    if (static_cast<int64_t>(targets[row]) == ignore_index) return false;
    if (mask_u8 != nullptr) return mask_u8[row] != 0;
    if (mask_f32 != nullptr) return mask_f32[row] != 0.0f;
    return true;
  }
  C advantage(int64_t row) const { return advantages[row / tokens_per_advantage]; }
};

// A row that carries neither loss nor gradient (masked, zero advantage) is not read.
template <typename C>
inline void skip_row(const TokenOut<C>& out, int64_t row) {
  out.loss[row] = 0;
  out.logprobs[row] = 0;
  out.probs[row] = 0;
  if (out.entropy != nullptr) out.entropy[row] = 0;
  out.row_max[row] = 0;
  out.sum_exp[row] = 1;
  out.scale[row] = 0;
}

// The per-token terms from a row summary (m, S_t, S_1, W) and the target logit z'_y:
// log p = (z'_y - m) / T - log S_t, q = exp(z'_y - m) / S_1, c = q if q <= tau else 1.
// A row holding a NaN has S_t = NaN (the sums pass NaN on, while the max skips it): it
// stays live, so a token that carries loss gets a NaN loss and gradient. A row without NaN
// whose max is not finite (all -inf, a +inf entry) carries no loss and no gradient.
template <typename C>
inline void finish_row(const TokenOut<C>& out, int64_t row, bool valid, C adv, double row_max,
                       double sum_t, double sum_1, double weighted, C target_logit, double tau,
                       double inv_t) {
  // In the compute type, as the other backends do: q is compared with tau exactly as it is
  // reported, and tau is rounded to the compute type first (q <= tau in double would take
  // q = float(0.1) as above tau = 0.1, where torch's comparison takes it as equal).
  const bool finite = std::isfinite(row_max);
  const bool live_row = finite || std::isnan(sum_t);
  const C shift = finite ? static_cast<C>(row_max) : C(0);
  const C log_t = static_cast<C>(std::log(sum_t));
  const C logp = (target_logit - shift) * static_cast<C>(inv_t) - log_t;
  const C q = std::exp(target_logit - shift) / static_cast<C>(sum_1);
  const C dcr = q <= static_cast<C>(tau) ? q : C(1);  // NaN: c = 1, so A = 0 keeps scale 0
  const bool live = valid && live_row;
  const C scale = live ? adv * dcr : C(0);
  out.scale[row] = scale;
  out.loss[row] = scale != C(0) ? -scale * logp : C(0);
  out.logprobs[row] = live ? logp : (valid ? -std::numeric_limits<C>::infinity() : C(0));
  out.probs[row] = live ? q : C(0);
  if (out.entropy != nullptr) {
    out.entropy[row] = live_row ? static_cast<C>(log_t - weighted / sum_t) : C(0);
  }
  out.row_max[row] = static_cast<C>(row_max);
  out.sum_exp[row] = static_cast<C>(sum_t);
}

// ---------------------------------------------------------------------------------------
// Scalar path: fp64 inputs, and every dtype on CPUs without AVX2 (or when disabled).
// Two passes over the row (max, then sums): simple, exact and not the fast path.
// ---------------------------------------------------------------------------------------

template <typename C>
inline C transform1(C z, const LogitTransform& tf) {
  if (tf.kind == 1) return z * static_cast<C>(tf.scale);
  if (tf.kind == 2) return static_cast<C>(tf.cap) * std::tanh(z * static_cast<C>(tf.slope));
  return z;
}

// dz'/dz from the transformed value: scale * (1 - (z' / cap)^2), or scale.
template <typename C>
inline C slope1(C zt, const LogitTransform& tf) {
  if (tf.kind == 1) return static_cast<C>(tf.scale);
  if (tf.kind == 2) {
    const C t = zt / static_cast<C>(tf.cap);
    return static_cast<C>(tf.scale) * (C(1) - t * t);
  }
  return C(1);
}

struct Summary {
  double row_max = -std::numeric_limits<double>::infinity();
  double sum_t = 0.0, sum_1 = 0.0, weighted = 0.0;
};

template <typename T>
Summary summarize_row_scalar(const T* z, int64_t n_cols, double inv_t, bool t_one,
                             const LogitTransform& tf) {
  using C = compute_t<T>;
  C row_max = -std::numeric_limits<C>::infinity();
  for (int64_t v = 0; v < n_cols; ++v) {
    const C x = transform1(static_cast<C>(z[v]), tf);
    if (x > row_max) row_max = x;  // NaN never wins; it still poisons the sums below.
  }
  const C shift = std::isfinite(row_max) ? row_max : C(0);
  const C inv = static_cast<C>(inv_t);
  // Sums in fp64: this path is sequential, so fp32 sums over ~1e5 terms would drift.
  Summary s;
  s.row_max = row_max;
  for (int64_t v = 0; v < n_cols; ++v) {
    const C x1 = transform1(static_cast<C>(z[v]), tf) - shift;
    const C x = t_one ? x1 : x1 * inv;
    const C e = std::exp(x);
    s.sum_t += e;
    if (!t_one) s.sum_1 += std::exp(x1);
    if (e > C(0)) s.weighted += static_cast<double>(e) * static_cast<double>(x);
  }
  if (t_one) s.sum_1 = s.sum_t;
  return s;
}

// out[v] = coef * (exp((z'_v - m) / T) / S - [v == target]) * dz'/dz; out may alias z.
template <typename T>
void grad_row_scalar(const T* z, T* out, int64_t n_cols, int64_t target, double row_max,
                     double sum_exp, double coef, double inv_t, const LogitTransform& tf) {
  using C = compute_t<T>;
  const C inv = static_cast<C>(inv_t);
  const C m = static_cast<C>(row_max);
  const C cs = static_cast<C>(coef / sum_exp);
  const C c = static_cast<C>(coef);
  auto grad_at = [&](int64_t v) {
    const C zt = transform1(static_cast<C>(z[v]), tf);
    return cs * std::exp((zt - m) * inv) * slope1(zt, tf);
  };
  // Read the target logit before the row is overwritten (out may alias logits).
  C g_target = 0;
  if (target >= 0) {
    const C zt = transform1(static_cast<C>(z[target]), tf);
    g_target = (cs * std::exp((zt - m) * inv) - c) * slope1(zt, tf);
  }
  for (int64_t v = 0; v < n_cols; ++v) out[v] = static_cast<T>(grad_at(v));
  if (target >= 0) out[target] = static_cast<T>(g_target);
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

// tanh for 8 floats: an odd polynomial below |x| = 0.625 (Cephes' tanhf coefficients),
// 1 - 2 / (exp(2|x|) + 1) with the sign restored above; ~2 ulp.
GFT_AVX2 inline __m256 tanh8(__m256 x) {
  const __m256 sign = _mm256_and_ps(x, _mm256_set1_ps(-0.0f));
  const __m256 ax = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x);
  // min returns its second operand when either is NaN: NaN must come out NaN, not cap.
  const __m256 e = exp8(_mm256_min_ps(_mm256_set1_ps(88.0f), _mm256_add_ps(ax, ax)));
  const __m256 big = _mm256_sub_ps(
      _mm256_set1_ps(1.0f), _mm256_div_ps(_mm256_set1_ps(2.0f), _mm256_add_ps(e, _mm256_set1_ps(1.0f))));
  const __m256 z = _mm256_mul_ps(x, x);
  __m256 p = _mm256_set1_ps(-5.70498872745e-3f);
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(2.06390887954e-2f));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(-5.37397155531e-2f));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(1.33314422036e-1f));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(-3.33332819422e-1f));
  const __m256 small = _mm256_fmadd_ps(_mm256_mul_ps(p, z), x, x);
  const __m256 is_small = _mm256_cmp_ps(ax, _mm256_set1_ps(0.625f), _CMP_LT_OQ);
  return _mm256_blendv_ps(_mm256_or_ps(big, sign), small, is_small);
}

// The transform of 8 logits and, for the gradient, its slope dz'/dz.
struct VecTransform {
  int kind;
  __m256 scale, cap, slope;
};

GFT_AVX2 inline VecTransform vec_transform(const LogitTransform& tf) {
  return {tf.kind, _mm256_set1_ps(static_cast<float>(tf.scale)),
          _mm256_set1_ps(static_cast<float>(tf.cap)), _mm256_set1_ps(static_cast<float>(tf.slope))};
}

GFT_AVX2 inline __m256 transform8(__m256 z, const VecTransform& tf) {
  if (tf.kind == 1) return _mm256_mul_ps(z, tf.scale);
  if (tf.kind == 2) return _mm256_mul_ps(tf.cap, tanh8(_mm256_mul_ps(z, tf.slope)));
  return z;
}

// z' and dz'/dz = scale * (1 - t^2) with t = tanh(z * scale / cap), from one tanh.
GFT_AVX2 inline __m256 transform8_slope(__m256 z, const VecTransform& tf, __m256& slope) {
  if (tf.kind == 2) {
    const __m256 t = tanh8(_mm256_mul_ps(z, tf.slope));
    slope = _mm256_mul_ps(tf.scale, _mm256_fnmadd_ps(t, t, _mm256_set1_ps(1.0f)));
    return _mm256_mul_ps(tf.cap, t);
  }
  slope = tf.kind == 1 ? tf.scale : _mm256_set1_ps(1.0f);
  return tf.kind == 1 ? _mm256_mul_ps(z, tf.scale) : z;
}

// One element through the vector code, so that a scalar (the target logit) is rounded
// exactly like the same element inside a vector pass.
template <typename T>
GFT_AVX2 inline float transform_one(const T* p, const VecTransform& tf, float* slope) {
  __m256 s;
  const __m256 zt = transform8_slope(_mm256_set1_ps(static_cast<float>(*p)), tf, s);
  if (slope != nullptr) *slope = _mm256_cvtss_f32(s);
  return _mm256_cvtss_f32(zt);
}

GFT_AVX2 inline float exp_one(float x) { return _mm256_cvtss_f32(exp8(_mm256_set1_ps(x))); }

// Per-row running state of the statistics; fp64 so that rescaling across ~100 blocks is
// exact enough and the block partial sums (fp32, <= kBlock terms) add without drift.
struct RowAcc {
  double sum_t = 0.0;
  double sum_1 = 0.0;
  double weighted = 0.0;  // sum e * x, x = (z' - shift) / T
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
      const double dt = kTOne ? d1 : d1 * inv_t;
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

// Streams one row block by block: the max pass widens (and transforms) each block into buf,
// the exp pass folds it into the running state. Returns the row summary.
template <typename T, bool kTOne, bool kEntropy>
GFT_AVX2 Summary summarize_row_avx2(const T* z, int64_t n_cols, float inv_t,
                                    const VecTransform& tf, float* buf) {
  RowAcc acc;
  constexpr int64_t kPerLine = kLineBytes / sizeof(T);
  for (int64_t start = 0; start < n_cols; start += kBlock) {
    const int64_t n = std::min(kBlock, n_cols - start);
    const int64_t n_vec = n & ~int64_t(7);
    const T* zb = z + start;
    // fp32 without a transform: the exp pass re-reads the (L1-hot) input, no copy.
    const bool direct = std::is_same_v<T, float> && tf.kind == 0 && n_vec == n;
    __m256 vmax[kPerLine / 8];
    for (auto& m : vmax) m = _mm256_set1_ps(-kInf);
    int64_t i = 0;
    for (; i + kPerLine <= n_vec; i += kPerLine) {
      prefetch_ahead(zb + i);
      for (int64_t k = 0; k < kPerLine / 8; ++k) {
        const __m256 x = transform8(load8(zb + i + 8 * k), tf);
        if (!direct) _mm256_store_ps(buf + i + 8 * k, x);
        vmax[k] = _mm256_max_ps(vmax[k], x);
      }
    }
    for (; i < n_vec; i += 8) {
      const __m256 x = transform8(load8(zb + i), tf);
      if (!direct) _mm256_store_ps(buf + i, x);
      vmax[0] = _mm256_max_ps(vmax[0], x);
    }
    for (int64_t k = 1; k < kPerLine / 8; ++k) vmax[0] = _mm256_max_ps(vmax[0], vmax[k]);
    float block_max = hmax(vmax[0]);
    int64_t n_pad = n_vec;
    if (n_vec != n) {
      // Pad the tail to a full vector with -inf, which adds exactly 0 to every sum.
      alignas(32) float tail[8];
      alignas(32) int32_t lane_live[8];
      for (int64_t j = 0; j < 8; ++j) {
        tail[j] = n_vec + j < n ? static_cast<float>(zb[n_vec + j]) : 0.0f;
        lane_live[j] = n_vec + j < n ? -1 : 0;
      }
      // Lanes past the row are padded after the transform (tanh(-inf) would give -cap).
      const __m256 live = _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(lane_live)));
      const __m256 padded = _mm256_blendv_ps(_mm256_set1_ps(-kInf), transform8(_mm256_load_ps(tail), tf), live);
      _mm256_store_ps(buf + n_vec, padded);
      for (int64_t j = 0; j < n - n_vec; ++j) block_max = std::max(block_max, buf[n_vec + j]);
      n_pad = n_vec + 8;
    }
    const float* src = direct ? reinterpret_cast<const float*>(zb) : buf;
    const char* next =
        start + kBlock < n_cols ? reinterpret_cast<const char*>(zb + kBlock) : nullptr;
    stats_block<kTOne, kEntropy>(src, n_pad, block_max, inv_t, next, sizeof(T), acc);
  }
  Summary s;
  s.row_max = acc.running_max;
  s.sum_t = acc.sum_t;
  s.sum_1 = acc.sum_1;
  s.weighted = acc.weighted;
  return s;
}

struct GradVec {
  __m256 row_max, inv_t, coef_over_sum;
};

// coef / S * exp((z' - m) / T) * dz'/dz for 8 raw logits.
template <bool kTOne, bool kSlope>
GFT_AVX2 inline __m256 grad8(const GradVec& gv, const VecTransform& tf, __m256 raw) {
  __m256 slope;
  const __m256 zt = transform8_slope(raw, tf, slope);
  const __m256 x1 = _mm256_sub_ps(zt, gv.row_max);
  const __m256 g = _mm256_mul_ps(exp8(kTOne ? x1 : _mm256_mul_ps(x1, gv.inv_t)), gv.coef_over_sum);
  return kSlope ? _mm256_mul_ps(g, slope) : g;
}

// out[v] = coef * (exp((z'_v - m) / T) / S - [v == target]) * dz'/dz, one read and one
// write per element; out may be z itself (each element is read before it is written).
template <typename T, bool kTOne, bool kSlope>
GFT_AVX2 void grad_row_avx2(const T* z, T* o, int64_t n_cols, int64_t target, float row_max,
                            float sum_exp, float coef, float inv_t, const VecTransform& tf) {
  const float cs = coef / sum_exp;
  const __m256 vm = _mm256_set1_ps(row_max);
  const __m256 vinv = _mm256_set1_ps(inv_t);
  const __m256 vcs = _mm256_set1_ps(cs);
  const GradVec gv{vm, vinv, vcs};
  // Read the target logit before the row is overwritten (out may alias logits).
  float g_target = 0.0f;
  if (target >= 0) {
    float slope = 1.0f;
    const float zt = transform_one(z + target, tf, &slope);
    const float x1 = zt - row_max;
    const float e = exp_one(kTOne ? x1 : x1 * inv_t);
    g_target = kSlope ? (e * cs - coef) * slope : e * cs - coef;
  }
  constexpr int64_t kPerLine = kLineBytes / sizeof(T);
  int64_t v = 0;
  for (; v + kPerLine <= n_cols; v += kPerLine) {
    prefetch_ahead(z + v);
    prefetch_ahead(o + v);  // same line when in place; a hit then, hence unconditional
    for (int64_t k = 0; k < kPerLine; k += 16) {
      store16(o + v + k, grad8<kTOne, kSlope>(gv, tf, load8(z + v + k)), grad8<kTOne, kSlope>(gv, tf, load8(z + v + k + 8)));
    }
  }
  for (; v + 8 <= n_cols; v += 8) store8(o + v, grad8<kTOne, kSlope>(gv, tf, load8(z + v)));
  if (v < n_cols) {
    alignas(32) float tail[8];
    for (int64_t j = 0; j < 8; ++j) tail[j] = v + j < n_cols ? static_cast<float>(z[v + j]) : 0.0f;
    alignas(32) float g[8];
    _mm256_store_ps(g, grad8<kTOne, kSlope>(gv, tf, _mm256_load_ps(tail)));
    for (int64_t j = 0; v + j < n_cols; ++j) o[v + j] = static_cast<T>(g[j]);
  }
  if (target >= 0) o[target] = static_cast<T>(g_target);
}

template <typename T>
GFT_AVX2 void grad_row_avx2_dispatch(const T* z, T* o, int64_t n_cols, int64_t target,
                                     float row_max, float sum_exp, float coef, float inv_t,
                                     const VecTransform& tf) {
  const bool t_one = inv_t == 1.0f;
  if (tf.kind == 0) {
    if (t_one) return grad_row_avx2<T, true, false>(z, o, n_cols, target, row_max, sum_exp, coef, inv_t, tf);
    return grad_row_avx2<T, false, false>(z, o, n_cols, target, row_max, sum_exp, coef, inv_t, tf);
  }
  if (t_one) return grad_row_avx2<T, true, true>(z, o, n_cols, target, row_max, sum_exp, coef, inv_t, tf);
  return grad_row_avx2<T, false, true>(z, o, n_cols, target, row_max, sum_exp, coef, inv_t, tf);
}

template <typename T>
GFT_AVX2 Summary summarize_row_avx2_dispatch(const T* z, int64_t n_cols, float inv_t,
                                             bool entropy, const VecTransform& tf, float* buf) {
  const bool t_one = inv_t == 1.0f;
  if (t_one && entropy) return summarize_row_avx2<T, true, true>(z, n_cols, inv_t, tf, buf);
  if (t_one) return summarize_row_avx2<T, true, false>(z, n_cols, inv_t, tf, buf);
  if (entropy) return summarize_row_avx2<T, false, true>(z, n_cols, inv_t, tf, buf);
  return summarize_row_avx2<T, false, false>(z, n_cols, inv_t, tf, buf);
}

#endif  // GFT_HAVE_AVX2_PATH

// ---------------------------------------------------------------------------------------
// Row drivers (one per primitive), generic over the dtype T and the target type I.
// ---------------------------------------------------------------------------------------

// Scratch of the vector path: one block of widened, transformed logits per thread.
struct Scratch {
  alignas(32) float buf[kBlock + 8];
};

template <typename T>
Summary summarize_row(const T* z, int64_t n_cols, double inv_t, bool entropy,
                      const LogitTransform& tf, bool simd, Scratch& scratch) {
#if GFT_HAVE_AVX2_PATH
  if constexpr (!std::is_same_v<T, double>) {
    if (simd) {
      return summarize_row_avx2_dispatch<T>(z, n_cols, static_cast<float>(inv_t), entropy,
                                            vec_transform(tf), scratch.buf);
    }
  }
#endif
  return summarize_row_scalar<T>(z, n_cols, inv_t, inv_t == 1.0, tf);
}

template <typename T>
double target_logit_of(const T* z, int64_t target, const LogitTransform& tf, bool simd) {
#if GFT_HAVE_AVX2_PATH
  if constexpr (!std::is_same_v<T, double>) {
    if (simd) return transform_one(z + target, vec_transform(tf), nullptr);
  }
#endif
  using C = compute_t<T>;
  return transform1(static_cast<C>(z[target]), tf);
}

template <typename T>
void grad_row(const T* z, T* o, int64_t n_cols, int64_t target, double row_max, double sum_exp,
              double coef, double inv_t, const LogitTransform& tf, bool simd) {
  if (coef == 0.0) {
    // Zero-coefficient rows are the cheap case: a write, never a read of the logits.
    std::memset(static_cast<void*>(o), 0, n_cols * sizeof(T));
    return;
  }
#if GFT_HAVE_AVX2_PATH
  if constexpr (!std::is_same_v<T, double>) {
    if (simd) {
      grad_row_avx2_dispatch<T>(z, o, n_cols, target, static_cast<float>(row_max),
                                static_cast<float>(sum_exp), static_cast<float>(coef),
                                static_cast<float>(inv_t), vec_transform(tf));
      return;
    }
  }
#endif
  grad_row_scalar<T>(z, o, n_cols, target, row_max, sum_exp, coef, inv_t, tf);
}

template <typename T, typename I>
void token_rows(const at::Tensor& logits, const TokenIn<compute_t<T>, I>& in,
                const TokenOut<compute_t<T>>& out, T* grad, int64_t grad_stride,
                const LogitTransform& tf, bool with_stats) {
  using C = compute_t<T>;
  const int64_t n_rows = logits.size(0), n_cols = logits.size(1);
  const int64_t stride = logits.stride(0);
  // Not const_data_ptr: when grad aliases logits the same memory is written.
  const T* base = static_cast<const T*>(logits.data_ptr());
  const bool simd = use_avx2();
  parallel_rows(n_rows, n_cols, [&](int64_t begin, int64_t end) {
    Scratch scratch;
    for (int64_t row = begin; row < end; ++row) {
      const bool valid = in.valid(row);
      const C adv = in.advantage(row);
      T* grow = grad != nullptr ? grad + row * grad_stride : nullptr;
      if (!with_stats && (!valid || adv == C(0))) {
        skip_row(out, row);
        if (grow != nullptr) std::memset(static_cast<void*>(grow), 0, n_cols * sizeof(T));
        continue;
      }
      const T* z = base + row * stride;
      const Summary s = summarize_row<T>(z, n_cols, in.inv_t, with_stats, tf, simd, scratch);
      const int64_t target = valid ? static_cast<int64_t>(in.targets[row]) : -1;
      const C z_y = target >= 0 ? static_cast<C>(target_logit_of<T>(z, target, tf, simd)) : C(0);
      finish_row<C>(out, row, valid, adv, s.row_max, s.sum_t, s.sum_1, s.weighted, z_y, in.tau,
                    in.inv_t);
      if (grow != nullptr) {
        const double coef = static_cast<double>(in.grad_weights[row]) * out.scale[row] * in.inv_t;
        grad_row<T>(z, grow, n_cols, target, out.row_max[row], out.sum_exp[row], coef, in.inv_t,
                    tf, simd);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------
// Argument checks and the data checks (the library's ValueError, naming the first bad
// value).
// ---------------------------------------------------------------------------------------

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

at::ScalarType stat_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

void check_vector(const at::Tensor& t, const char* name, int64_t n, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, name, ": expected shape (", n, ",), got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, name, ": expected ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor");
}

void check_targets(const at::Tensor& t, int64_t n) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 1 && t.size(0) == n && t.is_contiguous(),
              "targets: expected a contiguous CPU tensor of shape (", n, ",)");
  TORCH_CHECK(t.scalar_type() == at::kLong || t.scalar_type() == at::kInt,
              "targets: expected int64 or int32, got ", t.scalar_type());
}

void check_out(const at::Tensor& logits, const at::Tensor& out) {
  const int64_t n_rows = logits.size(0), n_cols = logits.size(1);
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == logits.scalar_type() &&
                  out.sizes() == logits.sizes(),
              "out: expected a CPU ", logits.scalar_type(), " tensor of shape ", logits.sizes(),
              ", got ", out.scalar_type(), " ", out.sizes(), " on ", out.device());
  TORCH_CHECK((out.stride(1) == 1 || n_cols == 1) && (n_rows <= 1 || out.stride(0) >= n_cols),
              "out: the last dimension must be contiguous and rows must not overlap, got strides ",
              out.strides());
  if (n_rows == 0) return;
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
}

template <typename C, typename I>
void check_values(const TokenIn<C, I>& in, int64_t n_rows, int64_t n_adv, int64_t vocab) {
  for (int64_t i = 0; i < n_rows; ++i) {
    const int64_t t = static_cast<int64_t>(in.targets[i]);
    TORCH_CHECK_VALUE(t == in.ignore_index || (t >= 0 && t < vocab),
                      "targets: expected values in [0, ", vocab, ") or ignore_index=",
                      in.ignore_index, ", got ", t, " (token ", i, ")");
  }
  if (in.mask_f32 != nullptr) {
    for (int64_t i = 0; i < n_rows; ++i) {
      const float m = in.mask_f32[i];
      TORCH_CHECK_VALUE(m == 0.0f || m == 1.0f, "mask: expected 0/1 values, got ", m,
                        " (token ", i, ")");
    }
  }
  if (in.mask_u8 != nullptr) {
    for (int64_t i = 0; i < n_rows; ++i) {
      TORCH_CHECK_VALUE(in.mask_u8[i] <= 1, "mask: expected 0/1 values, got ",
                        static_cast<int>(in.mask_u8[i]), " (token ", i, ")");
    }
  }
  for (int64_t i = 0; i < n_adv; ++i) {
    TORCH_CHECK_VALUE(std::isfinite(static_cast<double>(in.advantages[i])),
                      "advantages: expected finite values, got ", in.advantages[i], " (entry ", i,
                      ")");
  }
}

// ---------------------------------------------------------------------------------------
// The three primitives.
// ---------------------------------------------------------------------------------------

using Vec7 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                        at::Tensor>;

Vec7 token_pass(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& advantages,
                const c10::optional<at::Tensor>& mask, int64_t tokens_per_advantage, double tau,
                double inv_t, double logit_scale, double logit_softcap, int64_t ignore_index,
                bool with_stats, const c10::optional<at::Tensor>& grad_weights,
                const c10::optional<at::Tensor>& grad_out) {
  check_logits(logits, "logits");
  const int64_t n_rows = logits.size(0), n_cols = logits.size(1);
  const auto acc = stat_dtype(logits.scalar_type());
  check_targets(targets, n_rows);
  TORCH_CHECK(tokens_per_advantage >= 1 && n_rows % tokens_per_advantage == 0,
              "tokens_per_advantage: expected a divisor of N, got ", tokens_per_advantage);
  const int64_t n_adv = n_rows / tokens_per_advantage;
  check_vector(advantages, "advantages", n_adv, acc);
  TORCH_CHECK(std::isfinite(inv_t) && inv_t > 0.0, "inv_t: expected a finite value > 0");
  const bool with_grad = grad_out.has_value() && grad_out->defined();
  if (with_grad) {
    TORCH_CHECK(grad_weights.has_value() && grad_weights->defined(),
                "grad_weights: needed with grad_out");
    check_vector(*grad_weights, "grad_weights", n_rows, acc);
    check_out(logits, *grad_out);
  }
  const auto opts = logits.options().dtype(acc);
  at::Tensor loss = at::empty({n_rows}, opts), logprobs = at::empty({n_rows}, opts),
             probs = at::empty({n_rows}, opts),
             entropy = at::empty({with_stats ? n_rows : 0}, opts),
             row_max = at::empty({n_rows}, opts), sum_exp = at::empty({n_rows}, opts),
             scale = at::empty({n_rows}, opts);
  const uint8_t* mask_u8 = nullptr;
  const float* mask_f32 = nullptr;
  if (mask.has_value() && mask->defined()) {
    TORCH_CHECK(mask->dim() == 1 && mask->size(0) == n_rows && mask->is_contiguous() &&
                    mask->device().is_cpu(),
                "mask: expected a contiguous CPU tensor of shape (", n_rows, ",)");
    if (mask->scalar_type() == at::kByte) {
      mask_u8 = mask->const_data_ptr<uint8_t>();
    } else {
      TORCH_CHECK(mask->scalar_type() == at::kFloat, "mask: expected uint8 or float32, got ",
                  mask->scalar_type());
      mask_f32 = mask->const_data_ptr<float>();
    }
  }
  const LogitTransform tf = make_transform(logit_scale, logit_softcap);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "gft_token_pass", [&] {
    using C = compute_t<scalar_t>;
    const TokenOut<C> out{loss.data_ptr<C>(),    logprobs.data_ptr<C>(),
                          probs.data_ptr<C>(),   with_stats ? entropy.data_ptr<C>() : nullptr,
                          row_max.data_ptr<C>(), sum_exp.data_ptr<C>(),
                          scale.data_ptr<C>()};
    scalar_t* grad = with_grad ? grad_out->data_ptr<scalar_t>() : nullptr;
    const int64_t grad_stride = with_grad ? grad_out->stride(0) : 0;
    const C* gw = with_grad ? grad_weights->const_data_ptr<C>() : nullptr;
    auto run = [&](auto* target_ptr) {
      using I = std::remove_const_t<std::remove_pointer_t<decltype(target_ptr)>>;
      const TokenIn<C, I> in{target_ptr, advantages.const_data_ptr<C>(), tokens_per_advantage,
                             mask_u8, mask_f32, gw, ignore_index, tau, inv_t};
      check_values(in, n_rows, n_adv, n_cols);
      if (n_rows > 0) token_rows<scalar_t, I>(logits, in, out, grad, grad_stride, tf, with_stats);
    };
    if (targets.scalar_type() == at::kLong) {
      run(targets.const_data_ptr<int64_t>());
    } else {
      run(targets.const_data_ptr<int32_t>());
    }
  });
  return {loss, logprobs, probs, entropy, row_max, sum_exp, scale};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> partial_stats(
    const at::Tensor& logits, const at::Tensor& local_targets, double inv_t, double logit_scale,
    double logit_softcap, bool with_entropy) {
  check_logits(logits, "logits");
  const int64_t n_rows = logits.size(0), n_cols = logits.size(1);
  check_vector(local_targets, "local_targets", n_rows, at::kLong);
  const auto opts = logits.options().dtype(stat_dtype(logits.scalar_type()));
  at::Tensor row_max = at::empty({n_rows}, opts), sum_exp = at::empty({n_rows}, opts),
             sum_exp_1 = at::empty({n_rows}, opts),
             weighted = at::empty({with_entropy ? n_rows : 0}, opts),
             target_logit = at::empty({n_rows}, opts);
  const LogitTransform tf = make_transform(logit_scale, logit_softcap);
  const int64_t* tg = local_targets.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < n_rows; ++i) {
    TORCH_CHECK(tg[i] >= -1 && tg[i] < n_cols, "local_targets: row ", i, " holds ", tg[i],
                ", expected -1 or a value in [0, ", n_cols, ")");
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "gft_partial_stats", [&] {
    using C = compute_t<scalar_t>;
    const scalar_t* base = logits.const_data_ptr<scalar_t>();
    const int64_t stride = logits.stride(0);
    const bool simd = use_avx2();
    C *m = row_max.data_ptr<C>(), *st = sum_exp.data_ptr<C>(), *s1 = sum_exp_1.data_ptr<C>(),
      *w = with_entropy ? weighted.data_ptr<C>() : nullptr, *zy = target_logit.data_ptr<C>();
    parallel_rows(n_rows, n_cols, [&](int64_t begin, int64_t end) {
      Scratch scratch;
      for (int64_t row = begin; row < end; ++row) {
        const scalar_t* z = base + row * stride;
        const Summary s = summarize_row<scalar_t>(z, n_cols, inv_t, with_entropy, tf, simd, scratch);
        m[row] = static_cast<C>(s.row_max);
        st[row] = static_cast<C>(s.sum_t);
        s1[row] = static_cast<C>(s.sum_1);
        if (w != nullptr) w[row] = static_cast<C>(s.weighted);
        zy[row] = tg[row] >= 0 ? static_cast<C>(target_logit_of<scalar_t>(z, tg[row], tf, simd)) : C(0);
      }
    });
  });
  return {row_max, sum_exp, sum_exp_1, weighted, target_logit};
}

at::Tensor row_grad(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& row_max,
                    const at::Tensor& sum_exp, const at::Tensor& grad_rows, const at::Tensor& scale,
                    double inv_t, double logit_scale, double logit_softcap, at::Tensor out) {
  check_logits(logits, "logits");
  const int64_t n_rows = logits.size(0), n_cols = logits.size(1);
  const auto acc = stat_dtype(logits.scalar_type());
  check_targets(targets, n_rows);
  check_vector(row_max, "row_max", n_rows, acc);
  check_vector(sum_exp, "sum_exp", n_rows, acc);
  check_vector(grad_rows, "grad_rows", n_rows, acc);
  check_vector(scale, "scale", n_rows, acc);
  check_out(logits, out);
  if (n_rows == 0) return out;
  const LogitTransform tf = make_transform(logit_scale, logit_softcap);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "gft_row_grad", [&] {
    using C = compute_t<scalar_t>;
    // Not const_data_ptr: when out aliases logits the same memory is written below.
    const scalar_t* base = static_cast<const scalar_t*>(logits.data_ptr());
    scalar_t* o = out.data_ptr<scalar_t>();
    const int64_t in_stride = logits.stride(0), out_stride = out.stride(0);
    const C *m = row_max.const_data_ptr<C>(), *s = sum_exp.const_data_ptr<C>(),
            *g = grad_rows.const_data_ptr<C>(), *sc = scale.const_data_ptr<C>();
    const bool simd = use_avx2();
    auto run = [&](auto* tg) {
      // Validate the targets that are read: an out-of-range one would write outside the row.
      for (int64_t i = 0; i < n_rows; ++i) {
        const int64_t t = static_cast<int64_t>(tg[i]);
        TORCH_CHECK(g[i] * sc[i] == C(0) || (t >= -1 && t < n_cols), "targets: row ", i,
                    " holds ", t, ", expected -1 or a value in [0, ", n_cols, ")");
      }
      parallel_rows(n_rows, n_cols, [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) {
          const double coef = static_cast<double>(g[row]) * sc[row] * inv_t;
          grad_row<scalar_t>(base + row * in_stride, o + row * out_stride, n_cols,
                             static_cast<int64_t>(tg[row]), m[row], s[row], coef, inv_t, tf, simd);
        }
      });
    };
    if (targets.scalar_type() == at::kLong) {
      run(targets.const_data_ptr<int64_t>());
    } else {
      run(targets.const_data_ptr<int32_t>());
    }
  });
  return out;
}

std::string simd_path() { return use_avx2() ? "avx2" : "scalar"; }

// Tests use this to exercise the scalar path on an AVX2 machine; returns the previous value.
bool set_simd_enabled(bool enabled) { return g_simd_enabled.exchange(enabled); }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Native CPU row kernels of the GFT loss (token_pass, partial_stats, row_grad).";
  m.def("token_pass", &token_pass, "per-token GFT quantities in one pass (optionally the gradient)",
        py::arg("logits"), py::arg("targets"), py::arg("advantages"), py::arg("mask"),
        py::arg("tokens_per_advantage"), py::arg("tau"), py::arg("inv_t"), py::arg("logit_scale"),
        py::arg("logit_softcap"), py::arg("ignore_index"), py::arg("with_stats"),
        py::arg("grad_weights"), py::arg("grad_out"), py::call_guard<py::gil_scoped_release>());
  m.def("partial_stats", &partial_stats, "row statistics of a block of vocabulary columns",
        py::arg("logits"), py::arg("local_targets"), py::arg("inv_t"), py::arg("logit_scale"),
        py::arg("logit_softcap"), py::arg("with_entropy"),
        py::call_guard<py::gil_scoped_release>());
  m.def("row_grad", &row_grad, "gradient rows from their summaries; in place OK", py::arg("logits"),
        py::arg("targets"), py::arg("row_max"), py::arg("sum_exp"), py::arg("grad_rows"),
        py::arg("scale"), py::arg("inv_t"), py::arg("logit_scale"), py::arg("logit_softcap"),
        py::arg("out"), py::call_guard<py::gil_scoped_release>());
  m.def("simd_path", &simd_path, "'avx2' or 'scalar': the inner loops in use");
  m.def("set_simd_enabled", &set_simd_enabled, "enable/disable the SIMD path (tests)",
        py::arg("enabled"));
}
