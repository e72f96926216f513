// Vector helpers of the decoder on x86 (AVX2, FMA, F16C: the baseline of every x86 variant;
// the wider variants keep these 256-bit, only their matmul tiles differ). A port to another
// architecture (ARM NEON) gives the same functions over its own vectors: simd_neon.h beside
// this file, chosen in kernels.cpp by the target.
#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace ps {

inline float horizontal_sum(__m256 v) {
  __m128 sum = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  sum = _mm_hadd_ps(sum, sum);
  sum = _mm_hadd_ps(sum, sum);
  return _mm_cvtss_f32(sum);
}

// Each group of 32 activations -> 32 int8, its scale s, s * (sum of the int8) and that sum, the
// last three in arrays of their own (index: row * groups + group). Rounded to nearest even, as
// nearbyint; s = max|x| / 127, so the int8 stay within -127..127.
inline void quantize_rows(const float* x, int64_t rows, int64_t groups, int8_t* q, float* scales,
                          float* sums, int32_t* isums) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t r = 0; r < rows * groups; ++r) {
    const float* v = x + r * 32;
    __m256 in[4];
    for (int i = 0; i < 4; ++i) in[i] = _mm256_loadu_ps(v + 8 * i);
    const __m256 top = _mm256_max_ps(
        _mm256_max_ps(_mm256_andnot_ps(sign, in[0]), _mm256_andnot_ps(sign, in[1])),
        _mm256_max_ps(_mm256_andnot_ps(sign, in[2]), _mm256_andnot_ps(sign, in[3])));
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    const float scale = _mm_cvtss_f32(m) / 127.f;
    const __m256 inverse = _mm256_set1_ps(scale > 0.f ? 1.f / scale : 0.f);
    __m256i p[4];
    for (int i = 0; i < 4; ++i) p[i] = _mm256_cvtps_epi32(_mm256_mul_ps(in[i], inverse));
    // int32 -> int8 (packs work within 128-bit lanes; the permute puts the 8 dwords in order)
    const __m256i bytes = _mm256_permutevar8x32_epi32(
        _mm256_packs_epi16(_mm256_packs_epi32(p[0], p[1]), _mm256_packs_epi32(p[2], p[3])),
        order);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + r * 32), bytes);
    const __m256i total = _mm256_add_epi32(_mm256_add_epi32(p[0], p[1]),
                                           _mm256_add_epi32(p[2], p[3]));
    __m128i t = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, _MM_SHUFFLE(1, 0, 3, 2)));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, _MM_SHUFFLE(2, 3, 0, 1)));
    scales[r] = scale;
    isums[r] = _mm_cvtsi128_si32(t);
    sums[r] = scale * static_cast<float>(isums[r]);
  }
}

// v is computed here, in a register: keeps the compiler from reordering a chain of sums
inline void in_register(__m256i& v) { asm("" : "+x"(v)); }

// 4 activation bytes (int8) as every 32-bit lane of a vector
inline __m256i broadcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// a . b over n floats (n a multiple of 8 is the fast path)
inline float dot(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float sum = horizontal_sum(acc);
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// y += x over n floats
inline void add(const float* x, float* y, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_add_ps(_mm256_loadu_ps(y + i), _mm256_loadu_ps(x + i)));
  for (; i < n; ++i) y[i] += x[i];
}

// e^x for 8 floats, within 2 ulp (Cephes' expf: x = n ln 2 + r, a degree-6 polynomial in r,
// then 2^n in the exponent bits); x is clamped to [-87, 88], where 2^n stays a normal float
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.f)), _mm256_set1_ps(88.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i bits = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

// out = silu(gate) * up = gate / (1 + e^-gate) * up, gate_up one row of [gate | up] (2 n)
inline void swiglu(const float* gate_up, int64_t n, float* out) {
  const float* up = gate_up + n;
  const __m256 one = _mm256_set1_ps(1.f), sign = _mm256_set1_ps(-0.f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 g = _mm256_loadu_ps(gate_up + i);
    const __m256 silu = _mm256_div_ps(g, _mm256_add_ps(one, exp8(_mm256_xor_ps(g, sign))));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(silu, _mm256_loadu_ps(up + i)));
  }
  for (; i < n; ++i) out[i] = gate_up[i] / (1.f + std::exp(-gate_up[i])) * up[i];
}

// x = softmax(x) over n floats: e^(x - max) / sum, the exponentials 8 at a time
inline void softmax(float* x, int64_t n) {
  float top = -INFINITY;
  for (int64_t i = 0; i < n; ++i) top = std::max(top, x[i]);
  const __m256 shift = _mm256_set1_ps(top);
  __m256 sums = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), shift));
    _mm256_storeu_ps(x + i, e);
    sums = _mm256_add_ps(sums, e);
  }
  float sum = horizontal_sum(sums);
  for (; i < n; ++i) sum += x[i] = std::exp(x[i] - top);
  const __m256 total = _mm256_set1_ps(sum);
  for (i = 0; i + 8 <= n; i += 8)
    _mm256_storeu_ps(x + i, _mm256_div_ps(_mm256_loadu_ps(x + i), total));
  for (; i < n; ++i) x[i] /= sum;
}

// A KV cache row holds float32 or float16 (uint16_t bits: F16C converts 8 at a time, the
// halves rounded to nearest even as torch's .to(float16))
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline float to_float(float x) { return x; }
inline float to_float(uint16_t x) { return _cvtsh_ss(x); }

inline void store_row(const float* x, int64_t n, float* out) {
  std::memcpy(out, x, n * sizeof(float));
}
inline void store_row(const float* x, int64_t n, uint16_t* out) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
  for (; i < n; ++i) out[i] = _cvtss_sh(x[i], _MM_FROUND_TO_NEAREST_INT);
}

// the 8 sums of 8 vectors' lanes, in order, in one vector: a tree of hadds, then the halves
inline __m256 sums_of_8(const __m256* v) {
  const __m256 s0 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 s1 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(s0, s1, 0x20), _mm256_permute2f128_ps(s0, s1, 0x31));
}

// scores[p] = q . k_rows[p] * scale for p < n: 8 rows at a time, 8 independent sums reduced
// together, then one by one
template <typename E>
void attention_scores(const float* q, const E* const* k_rows, int64_t n, int64_t hd,
                      float scale, float* scores) {
  int64_t p = 0;
  for (; p + 8 <= n && hd % 8 == 0; p += 8) {
    __m256 acc[8];
    for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
    for (int64_t d = 0; d < hd; d += 8) {
      const __m256 qv = _mm256_loadu_ps(q + d);
      for (int j = 0; j < 8; ++j)
        acc[j] = _mm256_fmadd_ps(qv, load8(k_rows[p + j] + d), acc[j]);
    }
    _mm256_storeu_ps(scores + p, _mm256_mul_ps(sums_of_8(acc), _mm256_set1_ps(scale)));
  }
  for (; p < n && hd % 8 == 0; ++p) {  // the last < 8
    __m256 acc = _mm256_setzero_ps();
    for (int64_t d = 0; d < hd; d += 8)
      acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load8(k_rows[p] + d), acc);
    scores[p] = horizontal_sum(acc) * scale;
  }
  for (; p < n; ++p) {  // a head dimension that is not a multiple of 8
    float sum = 0.f;
    for (int64_t d = 0; d < hd; ++d) sum += q[d] * to_float(k_rows[p][d]);
    scores[p] = sum * scale;
  }
}

// out (hd) = sum_p weights[p] v_rows[p], 64 of the hd values at a time held in registers
template <typename E>
void weighted_sum(const float* weights, const E* const* v_rows, int64_t n, int64_t hd,
                  float* out) {
  int64_t d = 0;
  for (; d + 64 <= hd; d += 64) {
    __m256 acc[8];
    for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
    for (int64_t p = 0; p < n; ++p) {
      const __m256 w = _mm256_set1_ps(weights[p]);
      for (int j = 0; j < 8; ++j)
        acc[j] = _mm256_fmadd_ps(w, load8(v_rows[p] + d + 8 * j), acc[j]);
    }
    for (int j = 0; j < 8; ++j) _mm256_storeu_ps(out + d + 8 * j, acc[j]);
  }
  for (; d < hd; ++d) {  // a head dimension that is not a multiple of 64: the rest one by one
    float sum = 0.f;
    for (int64_t p = 0; p < n; ++p) sum += weights[p] * to_float(v_rows[p][d]);
    out[d] = sum;
  }
}

// The largest of n floats and the index of its first occurrence, as torch.max(dim=-1): 8 lanes
// each keep their own first maximum (a strict >), then the lanes' maxima are compared, the
// lowest index winning a tie. A row holding NaN reports NaN (its index is then meaningless).
inline float row_max(const float* x, int64_t n, int64_t* index) {
  float best = -INFINITY;
  int64_t at = 0;
  bool nan = false;
  int64_t i = 0;
  if (n >= 8) {
    __m256 top = _mm256_loadu_ps(x);
    __m256i where = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256i lane = where;
    __m256 unordered = _mm256_cmp_ps(top, top, _CMP_UNORD_Q);
    const __m256i eight = _mm256_set1_epi32(8);
    for (i = 8; i + 8 <= n && i + 8 <= INT32_MAX; i += 8) {
      const __m256 v = _mm256_loadu_ps(x + i);
      lane = _mm256_add_epi32(lane, eight);
      const __m256 greater = _mm256_cmp_ps(v, top, _CMP_GT_OQ);
      top = _mm256_blendv_ps(top, v, greater);
      where = _mm256_blendv_epi8(where, lane, _mm256_castps_si256(greater));
      unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    alignas(32) float tops[8];
    alignas(32) int32_t wheres[8];
    _mm256_store_ps(tops, top);
    _mm256_store_si256(reinterpret_cast<__m256i*>(wheres), where);
    nan = _mm256_movemask_ps(unordered) != 0;
    best = tops[0];
    at = wheres[0];
    for (int j = 1; j < 8; ++j)
      if (tops[j] > best || (tops[j] == best && wheres[j] < at)) best = tops[j], at = wheres[j];
  }
  for (; i < n; ++i) {
    if (x[i] != x[i]) nan = true;
    else if (x[i] > best || (i == 0)) best = x[i], at = i;
  }
  *index = at;
  return nan ? NAN : best;
}

// out = x * rsqrt(mean(x^2) + eps) * w, for one row of n
inline void rms_norm(const float* x, const float* w, float eps, int64_t n, float* out) {
  const float inverse = 1.f / std::sqrt(dot(x, x, n) / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] * inverse * w[i];
}

// the Hugging Face rotation of one head of hd values: [x1 cos - x2 sin | x2 cos + x1 sin]
inline void rotate_halves(float* x, const float* cos, const float* sin, int64_t half) {
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = x[i], x2 = x[i + half];
    x[i] = x1 * cos[i] - x2 * sin[i];
    x[i + half] = x2 * cos[i] + x1 * sin[i];
  }
}

}  // namespace ps
