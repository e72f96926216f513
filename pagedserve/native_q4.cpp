// A small step on an AVX2 CPU: int4 weights times int8 activations, and the whole decoder of a
// decode step of a few sequences in one call (pagedserve/native_q4.py).
//
// The matmul: y[m, n] = sum_k x[m, k] W[n, k], for the few rows of a decode step. W is held as
// groups of 32 along k, each w = lo + d * q with q in 0..15: the grid of a Q4_1 GGUF block, so
// a Q4_1 model's weights are held exactly. Each group of 32 activations is rounded to int8 with
// its own scale s (s = max|x| / 127), as llama.cpp does for Q4_1, so that a group's dot product
// is one integer multiply-add over 32 bytes:
//
//   sum_j (lo + d q_j)(s p_j) = d s sum_j q_j p_j + lo s sum_j p_j
//
// Layout: blocks (N/8, K/32, 160) uint8: per tile of 8 columns and group, the 8 x 20 bytes of
// Q4_1 GGUF blocks (float16 d and lo, 32 nibbles), arranged for AVX2 (q4_tile, pack() in
// native_q4.py). Rows are independent: a row's result does not depend on the other rows.
// Built with -fopenmp: at::parallel_for is OpenMP pragmas in a header, and without the flag it
// runs every loop on the calling thread (parallel_threads() below says which it is).
//
// The decoder (class Decoder): every layer of a Llama-family model for T decoding sequences, one
// token each, float32 throughout except the matmuls above: the same arithmetic as the torch ops
// of pagedserve/models/llama.py in one call instead of ~1,500 (their dispatch was half of a
// one-sequence step). The KV cache is the paged one of pagedserve/attention.py, in float32 or
// float16 (EngineConfig.kv_cache_dtype; F16C converts, attention computes in float32).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/python.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

inline float horizontal_sum(__m256 v) {
  __m128 sum = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  sum = _mm_hadd_ps(sum, sum);
  sum = _mm_hadd_ps(sum, sum);
  return _mm_cvtss_f32(sum);
}

// Each group of 32 activations -> 32 int8, its scale s, and s * (sum of the int8), the last two
// in arrays of their own (index: row * groups + group). Rounded to nearest even, as nearbyint.
void quantize_rows(const float* x, int64_t rows, int64_t groups, int8_t* q, float* scales,
                   float* sums) {
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
    sums[r] = scale * static_cast<float>(_mm_cvtsi128_si32(t));
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

// Columns [8 tile, 8 tile + 8) of rows [row0, row0 + R) of out, R <= 4. W comes in tiles of 8
// columns; a tile holds, per group of 32 along k, 160 bytes (pack() in native_q4.py): the 8
// columns' float16 d, their float16 lo, then 4 vectors of 32 bytes, vector v byte 4c + i holding
// column c's q at 8v + i in its low nibble and at 8v + 4 + i in its high one. So one maddubs
// multiplies 4 positions of 8 columns by the same 4 activation bytes (broadcast): the 32-bit
// lanes of the sums are the 8 columns, and no horizontal sum is needed. A group's pair sums
// stay int16 (8 of them at most 8 * 2 * 15 * 127 = 30,480), one madd makes them int32, and the
// group is scaled by the 8 columns' d (times s) and offset by their lo (times s sum p) in two
// vector multiply-adds, groups in order. The tile is unpacked once for the R rows, and a row's
// arithmetic is the same whatever R is: its result does not depend on the other rows.
template <int R>
void q4_tile(const uint8_t* w, int64_t groups, const int8_t* q, const float* scales,
             const float* sums, int64_t k, int64_t n, int64_t row0, int64_t tile, float* out) {
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const uint8_t* wt = w + tile * groups * 160;
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* b = wt + g * 160;
    // the group's q in two halves of 4 x 32, each unpacked once for the R rows; the sums go
    // in order (pinned: reassociated, they were all computed first and spilled to the stack)
    __m256i pairs[R];
    for (int half = 0; half < 2; ++half) {
      __m256i nibbles[4];
      for (int v = 0; v < 2; ++v) {
        const __m256i bytes = _mm256_loadu_si256(
            reinterpret_cast<const __m256i*>(b + 32 + 64 * half + 32 * v));
        nibbles[2 * v] = _mm256_and_si256(bytes, low);
        nibbles[2 * v + 1] = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low);
      }
      for (int r = 0; r < R; ++r) {
        const int8_t* p = q + (row0 + r) * k + g * 32 + 16 * half;
        for (int j = 0; j < 4; ++j) {
          const __m256i product = _mm256_maddubs_epi16(nibbles[j], broadcast4(p + 4 * j));
          pairs[r] = half == 0 && j == 0 ? product : _mm256_add_epi16(pairs[r], product);
          in_register(pairs[r]);
        }
      }
    }
    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b)));
    const __m256 lo = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 16)));
    for (int r = 0; r < R; ++r) {
      const int64_t at = (row0 + r) * groups + g;
      const __m256 dots = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs[r], ones));
      acc[r] = _mm256_fmadd_ps(dots, _mm256_mul_ps(d, _mm256_set1_ps(scales[at])), acc[r]);
      acc[r] = _mm256_fmadd_ps(lo, _mm256_set1_ps(sums[at]), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(out + (row0 + r) * n + tile * 8, acc[r]);
}

// Steps of at least this many rows share their loops out in chunks (each_share); smaller ones
// split them in equal shares up front. Measured on the 2-core AVX2 machine, the decoder alone
// and beside a process busy a fifth of the time in bursts of 0.4 ms (as the HTTP thread and the
// load generator are): 64 rows 94.2 -> 90.8 ms quiet, 138.2 -> 113.1 ms disturbed; 16 rows
// 22.1 -> 21.6 and 31.3 -> 29.6 ms; but 1 to 8 rows were slower in chunks (1 row 5.9 -> 6.6 ms:
// their matmuls are a few microseconds of memory reads, and equal halves stream best).
constexpr int64_t CHUNKED_ROWS = 16;

// fn(begin, end) over [0, n): with `chunked`, in chunks of about an eighth of a thread's share
// handed out in turn to torch's threads (at::parallel_for starts them), so that a thread the
// OS takes away for a while leaves the rest of its work to the others instead of holding the
// whole step up at the barrier; else split in equal shares (grain `grain`). Which thread
// computes an item changes nothing in its result.
template <typename F>
void each_share(int64_t n, bool chunked, int64_t grain, const F& fn) {
  if (!chunked) {
    at::parallel_for(0, n, grain, fn);
    return;
  }
  const int64_t chunk = std::max<int64_t>(1, n / (8 * at::get_num_threads()));
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), (n + chunk - 1) / chunk);
  if (threads <= 1 || at::in_parallel_region()) {
    fn(0, n);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t begin; (begin = next.fetch_add(chunk, std::memory_order_relaxed)) < n;)
      fn(begin, std::min(begin + chunk, n));
  });
}

// tile(std::integral_constant<int, R>{}, row0, t) for each tile t of 8 of the n columns and
// each tile of R <= 4 of the rows, the column tiles shared out over torch's threads
template <typename F>
void each_tile(int64_t rows, int64_t n, const F& tile) {
  each_share(n / 8, rows >= CHUNKED_ROWS, 2, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t row0 = 0; row0 < rows; row0 += 4) {
        switch (std::min<int64_t>(4, rows - row0)) {
          case 4: tile(std::integral_constant<int, 4>{}, row0, t); break;
          case 3: tile(std::integral_constant<int, 3>{}, row0, t); break;
          case 2: tile(std::integral_constant<int, 2>{}, row0, t); break;
          default: tile(std::integral_constant<int, 1>{}, row0, t); break;
        }
      }
    }
  });
}

// out (rows, n) = x (rows, k) times the blocks of W (n / 8, k / 32, 160), on torch's thread
// pool (at::parallel_for, not a second OpenMP runtime), shared out in chunks of column tiles;
// rows go through in tiles of up to 4, each tile of columns read from cache after the first.
void q4_gemm(const float* x, int64_t rows, int64_t k, const uint8_t* w, int64_t n, float* out) {
  const int64_t groups = k / 32;
  std::vector<int8_t> xq(rows * k);
  std::vector<float> xs(rows * groups), xsum(rows * groups);
  quantize_rows(x, rows, groups, xq.data(), xs.data(), xsum.data());
  const int8_t* q = xq.data();
  const float* s = xs.data();
  const float* m = xsum.data();
  each_tile(rows, n, [&](auto r, int64_t row0, int64_t tile) {
    q4_tile<decltype(r)::value>(w, groups, q, s, m, k, n, row0, tile, out);
  });
}

// The LM head's matmul: W as Q8_0 (a GGUF's usual embedding type): groups of 32 along k, each
// w = d * q with q in -127..127, float16 d. Tiles of 8 columns as for int4 (pack_q8() in
// native_q4.py): per group 272 bytes, the 8 columns' d, then 8 vectors of 32 bytes, vector j
// byte 4c + i holding column c's q at 4j + i. maddubs wants one unsigned side: it multiplies
// |q| by the activations with their signs flipped where q < 0, as llama.cpp computes Q8_0 x
// Q8_0; two such products would overflow int16 (2 * 2 * 127 * 127), so each is made int32 at
// once. A row's result does not depend on the other rows.
template <int R>
void q8_tile(const uint8_t* w, int64_t groups, const int8_t* q, const float* scales, int64_t k,
             int64_t n, int64_t row0, int64_t tile, float* out) {
  const __m256i ones = _mm256_set1_epi16(1);
  const uint8_t* wt = w + tile * groups * 272;
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* b = wt + g * 272;
    __m256i dots[R];
    for (int half = 0; half < 2; ++half) {
      __m256i signs[4], magnitudes[4];
      for (int j = 0; j < 4; ++j) {
        signs[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 16 + 128 * half + 32 * j));
        magnitudes[j] = _mm256_sign_epi8(signs[j], signs[j]);
      }
      for (int r = 0; r < R; ++r) {
        const int8_t* p = q + (row0 + r) * k + g * 32 + 16 * half;
        for (int j = 0; j < 4; ++j) {
          const __m256i x = _mm256_sign_epi8(broadcast4(p + 4 * j), signs[j]);
          const __m256i product = _mm256_madd_epi16(_mm256_maddubs_epi16(magnitudes[j], x), ones);
          dots[r] = half == 0 && j == 0 ? product : _mm256_add_epi32(dots[r], product);
          in_register(dots[r]);
        }
      }
    }
    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b)));
    for (int r = 0; r < R; ++r) {
      const float s = scales[(row0 + r) * groups + g];
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots[r]), _mm256_mul_ps(d, _mm256_set1_ps(s)),
                               acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(out + (row0 + r) * n + tile * 8, acc[r]);
}

// out (rows, n) = x (rows, k) times W's Q8_0 blocks (n/8, k/32, 272), as q4_gemm.
void q8_gemm(const float* x, int64_t rows, int64_t k, const uint8_t* w, int64_t n, float* out) {
  const int64_t groups = k / 32;
  std::vector<int8_t> xq(rows * k);
  std::vector<float> xs(rows * groups), xsum(rows * groups);
  quantize_rows(x, rows, groups, xq.data(), xs.data(), xsum.data());
  const int8_t* q = xq.data();
  const float* s = xs.data();
  each_tile(rows, n, [&](auto r, int64_t row0, int64_t tile) {
    q8_tile<decltype(r)::value>(w, groups, q, s, k, n, row0, tile, out);
  });
}

void check_blocks(const at::Tensor& blocks, int64_t k, const char* what) {
  TORCH_CHECK(blocks.dim() == 3 && blocks.size(2) == 160 && blocks.scalar_type() == at::kByte
              && blocks.is_contiguous(), what,
              ": blocks must be contiguous uint8 (N/8, K/32, 160)");
  TORCH_CHECK(k == blocks.size(1) * 32, what, ": the input has ", k, " columns, the weights ",
              blocks.size(1) * 32);
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
void swiglu(const float* gate_up, int64_t n, float* out) {
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
void softmax(float* x, int64_t n) {
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

// fn(t) for each row t < rows, the rows split over torch's threads (one row: this thread)
template <typename F>
void each_row(int64_t rows, const F& fn) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) fn(t);
  });
}

// out = x * rsqrt(mean(x^2) + eps) * w, for one row of n
void rms_norm(const float* x, const float* w, float eps, int64_t n, float* out) {
  const float inverse = 1.f / std::sqrt(dot(x, x, n) / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] * inverse * w[i];
}

// the Hugging Face rotation of one head of hd values: [x1 cos - x2 sin | x2 cos + x1 sin]
void rotate_halves(float* x, const float* cos, const float* sin, int64_t half) {
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = x[i], x2 = x[i + half];
    x[i] = x1 * cos[i] - x2 * sin[i];
    x[i + half] = x2 * cos[i] + x1 * sin[i];
  }
}

struct Layer {
  at::Tensor input_norm, qkv, qkv_bias, o, post_norm, gate_up, down;
};

}  // namespace

at::Tensor q4_matmul(const at::Tensor& x, const at::Tensor& blocks) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "x must be a contiguous float32 matrix");
  check_blocks(blocks, x.size(1), "q4_matmul");
  auto y = at::empty({x.size(0), blocks.size(0) * 8}, at::kFloat);
  q4_gemm(x.data_ptr<float>(), x.size(0), x.size(1), blocks.data_ptr<uint8_t>(),
          blocks.size(0) * 8, y.data_ptr<float>());
  return y;
}

at::Tensor q8_matmul(const at::Tensor& x, const at::Tensor& blocks) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "x must be a contiguous float32 matrix");
  TORCH_CHECK(blocks.dim() == 3 && blocks.size(2) == 272 && blocks.scalar_type() == at::kByte
              && blocks.is_contiguous(), "q8_matmul: blocks must be contiguous uint8 (N/8, K/32, 272)");
  TORCH_CHECK(x.size(1) == blocks.size(1) * 32, "q8_matmul: the input has ", x.size(1),
              " columns, the weights ", blocks.size(1) * 32);
  auto y = at::empty({x.size(0), blocks.size(0) * 8}, at::kFloat);
  q8_gemm(x.data_ptr<float>(), x.size(0), x.size(1), blocks.data_ptr<uint8_t>(),
          blocks.size(0) * 8, y.data_ptr<float>());
  return y;
}

// The layers of a Llama-family model, held for decode steps: per layer, in this order,
//   input_norm (H) float32, qkv blocks ((nh + 2 nkv) hd / 8, H/32, 160), qkv bias
//   ((nh + 2 nkv) hd) float32 or an empty tensor, o blocks (H/8, nh hd/32, 160), post_norm (H)
//   float32, gate_up blocks (2I/8, H/32, 160) as [gate | up], down blocks (H/8, I/32, 160);
// cos, sin (max positions, hd/2) float32: the rotary tables of pagedserve/models/llama.py.
class Decoder {
 public:
  Decoder(const std::vector<at::Tensor>& weights, at::Tensor cos, at::Tensor sin,
          int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double eps)
      : cos_(std::move(cos)), sin_(std::move(sin)), nh_(num_heads), nkv_(num_kv_heads),
        hd_(head_dim), eps_(static_cast<float>(eps)) {
    TORCH_CHECK(!weights.empty() && weights.size() % 7 == 0, "7 tensors per layer, got ",
                weights.size());
    TORCH_CHECK(nh_ % nkv_ == 0 && hd_ % 2 == 0, "heads: ", nh_, " query, ", nkv_, " kv, dim ",
                hd_);
    TORCH_CHECK(cos_.scalar_type() == at::kFloat && cos_.is_contiguous()
                && sin_.sizes() == cos_.sizes() && sin_.scalar_type() == at::kFloat
                && sin_.is_contiguous() && cos_.size(1) == hd_ / 2,
                "cos and sin must be contiguous float32 (positions, head_dim / 2)");
    hidden_ = weights[0].numel();  // every layer is checked against the first one's sizes
    intermediate_ = weights[5].size(0) * 8 / 2;
    for (size_t i = 0; i < weights.size(); i += 7) {
      Layer l{weights[i], weights[i + 1], weights[i + 2], weights[i + 3], weights[i + 4],
              weights[i + 5], weights[i + 6]};
      const int64_t qkv_n = (nh_ + 2 * nkv_) * hd_;
      check_blocks(l.qkv, hidden_, "qkv");
      check_blocks(l.o, nh_ * hd_, "o");
      check_blocks(l.gate_up, hidden_, "gate_up");
      check_blocks(l.down, intermediate_, "down");
      TORCH_CHECK(l.qkv.size(0) * 8 == qkv_n && l.o.size(0) * 8 == hidden_
                  && l.down.size(0) * 8 == hidden_ && l.gate_up.size(0) * 8 == 2 * intermediate_,
                  "layer ", i / 7, ": the matrices' shapes do not fit the heads");
      for (const at::Tensor* t : {&l.input_norm, &l.post_norm})
        TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == hidden_,
                    "layer ", i / 7, ": norm weights must be contiguous float32 (H)");
      TORCH_CHECK(l.qkv_bias.numel() == 0 || (l.qkv_bias.scalar_type() == at::kFloat
                  && l.qkv_bias.is_contiguous() && l.qkv_bias.numel() == qkv_n),
                  "layer ", i / 7, ": the qkv bias must be contiguous float32 or empty");
      layers_.push_back(std::move(l));
    }
  }

  // x (T, H) float32: the embedded tokens, one per decoding sequence; it becomes the residual
  // stream after the last layer, before the final norm, and is returned. positions, slots,
  // seq_lens (T,) int32; block_tables (T, >= blocks of the longest) int32, rows of unit stride;
  // caches: per layer its K and V, (num_blocks, block_size, nkv, hd) each, all float32 or all
  // float16 (attention reads float16 rows through F16C, computing in float32).
  at::Tensor forward(at::Tensor x, const at::Tensor& positions, const at::Tensor& slots,
                     const at::Tensor& seq_lens, const at::Tensor& block_tables,
                     const std::vector<at::Tensor>& caches) {
    const int64_t T = x.size(0);
    TORCH_CHECK(x.dim() == 2 && x.size(1) == hidden_ && x.scalar_type() == at::kFloat
                && x.is_contiguous(), "x must be contiguous float32 (T, ", hidden_, ")");
    for (const at::Tensor* t : {&positions, &slots, &seq_lens})
      TORCH_CHECK(t->scalar_type() == at::kInt && t->dim() == 1 && t->size(0) >= T
                  && t->stride(0) == 1, "positions, slots and seq_lens must be int32 (T,)");
    TORCH_CHECK(block_tables.scalar_type() == at::kInt && block_tables.dim() == 2
                && block_tables.size(0) >= T && block_tables.stride(1) == 1,
                "block_tables must be int32 (T, W) with rows of unit stride");
    TORCH_CHECK(caches.size() == 2 * layers_.size(), "a K and a V cache per layer");
    const int64_t bs = caches[0].size(1);
    const at::ScalarType cache_type = caches[0].scalar_type();
    TORCH_CHECK(cache_type == at::kFloat || cache_type == at::kHalf,
                "caches must be float32 or float16");
    for (const at::Tensor& c : caches)
      TORCH_CHECK(c.scalar_type() == cache_type && c.is_contiguous() && c.dim() == 4
                  && c.size(0) == caches[0].size(0) && c.size(1) == bs && c.size(2) == nkv_
                  && c.size(3) == hd_,
                  "caches must be contiguous, of one dtype and shape (blocks, block_size, nkv, hd)");
    const int32_t* pos = positions.data_ptr<int32_t>();
    const int32_t* slot = slots.data_ptr<int32_t>();
    const int32_t* lens = seq_lens.data_ptr<int32_t>();
    const int32_t* tables = block_tables.data_ptr<int32_t>();
    const int64_t num_blocks = caches[0].size(0), cache_slots = num_blocks * bs;
    const int64_t max_pos = cos_.size(0);
    int64_t max_len = 0;
    for (int64_t t = 0; t < T; ++t) {
      TORCH_CHECK(pos[t] >= 0 && pos[t] < max_pos && pos[t] == lens[t] - 1,
                  "row ", t, ": position ", pos[t], " for a context of ", lens[t]);
      TORCH_CHECK(slot[t] >= 0 && slot[t] < cache_slots, "row ", t, ": slot ", slot[t],
                  " outside the cache");
      TORCH_CHECK((lens[t] + bs - 1) / bs <= block_tables.size(1), "row ", t,
                  ": the block table is too short");
      for (int64_t b = 0; b < (lens[t] + bs - 1) / bs; ++b) {
        const int32_t block = tables[t * block_tables.stride(0) + b];
        TORCH_CHECK(block >= 0 && block < num_blocks, "row ", t, ": block ", block,
                    " outside the cache");
      }
      max_len = std::max<int64_t>(max_len, lens[t]);
    }
    const Step step{T, pos, slot, lens, tables, block_tables.stride(0), bs, max_len};
    if (cache_type == at::kHalf) {
      std::vector<uint16_t*> pointers;
      for (const at::Tensor& c : caches)
        pointers.push_back(reinterpret_cast<uint16_t*>(c.data_ptr<at::Half>()));
      run(step, x.data_ptr<float>(), pointers);
    } else {
      std::vector<float*> pointers;
      for (const at::Tensor& c : caches) pointers.push_back(c.data_ptr<float>());
      run(step, x.data_ptr<float>(), pointers);
    }
    return x;
  }

 private:
  struct Step {  // one forward's rows, checked
    int64_t T;
    const int32_t *pos, *slot, *lens, *tables;
    int64_t table_stride, bs, max_len;
  };

  // every layer over the residual stream (T, H), caches[2 l], caches[2 l + 1] layer l's K and V
  template <typename E>
  void run(const Step& st, float* stream, const std::vector<E*>& caches) const {
    const int64_t T = st.T, H = hidden_, I = intermediate_, bs = st.bs, max_len = st.max_len;
    const int32_t *pos = st.pos, *slot = st.slot, *lens = st.lens;
    const int64_t qkv_n = (nh_ + 2 * nkv_) * hd_, half = hd_ / 2, group = nh_ / nkv_;
    const float scale = 1.f / std::sqrt(static_cast<float>(hd_));
    std::vector<float> h(T * H), qkv(T * qkv_n), attn(T * nh_ * hd_), out(T * H),
        gate_up(T * 2 * I), act(T * I);
    // attention is worth splitting over threads only when there is enough of it
    const bool parallel_attention = max_len * hd_ * nh_ * T > (1 << 16);

    for (size_t li = 0; li < layers_.size(); ++li) {
      const Layer& l = layers_[li];
      E* k_cache = caches[2 * li];
      E* v_cache = caches[2 * li + 1];
      const float* bias = l.qkv_bias.numel() ? l.qkv_bias.data_ptr<float>() : nullptr;
      each_row(T, [&](int64_t t) {
        rms_norm(stream + t * H, l.input_norm.data_ptr<float>(), eps_, H, h.data() + t * H);
      });
      q4_gemm(h.data(), T, H, l.qkv.data_ptr<uint8_t>(), qkv_n, qkv.data());
      each_row(T, [&](int64_t t) {
        float* row = qkv.data() + t * qkv_n;
        if (bias != nullptr)
          for (int64_t i = 0; i < qkv_n; ++i) row[i] += bias[i];
        const float* c = cos_.data_ptr<float>() + pos[t] * half;
        const float* s = sin_.data_ptr<float>() + pos[t] * half;
        for (int64_t head = 0; head < nh_ + nkv_; ++head)
          rotate_halves(row + head * hd_, c, s, half);
        // this token's K and V into its slot (each row its own), before attention reads them
        store_row(row + nh_ * hd_, nkv_ * hd_, k_cache + slot[t] * nkv_ * hd_);
        store_row(row + (nh_ + nkv_) * hd_, nkv_ * hd_, v_cache + slot[t] * nkv_ * hd_);
      });
      // one task per sequence and KV head, for its `group` query heads
      const auto attend = [&](int64_t begin, int64_t end) {
        std::vector<float> scores(group * max_len);
        std::vector<const E*> k_rows(max_len), v_rows(max_len);
        for (int64_t task = begin; task < end; ++task) {
          const int64_t t = task / nkv_, g = task % nkv_, len = lens[t];
          const int32_t* table = st.tables + t * st.table_stride;
          for (int64_t p = 0; p < len; ++p) {  // where each position's K and V rows are
            const int64_t block = p / bs, at_slot = (table[block] * bs + p - block * bs) * nkv_ + g;
            k_rows[p] = k_cache + at_slot * hd_;
            v_rows[p] = v_cache + at_slot * hd_;
          }
          for (int64_t head = 0; head < group; ++head) {
            const int64_t qh = g * group + head;
            float* row = scores.data() + head * max_len;
            attention_scores(qkv.data() + t * qkv_n + qh * hd_, k_rows.data(), len, hd_, scale,
                             row);
            softmax(row, len);
            weighted_sum(row, v_rows.data(), len, hd_, attn.data() + (t * nh_ + qh) * hd_);
          }
        }
      };
      if (parallel_attention)
        each_share(T * nkv_, T >= CHUNKED_ROWS, 1, attend);
      else
        attend(0, T * nkv_);
      q4_gemm(attn.data(), T, nh_ * hd_, l.o.data_ptr<uint8_t>(), H, out.data());
      each_row(T, [&](int64_t t) {
        add(out.data() + t * H, stream + t * H, H);
        rms_norm(stream + t * H, l.post_norm.data_ptr<float>(), eps_, H, h.data() + t * H);
      });
      q4_gemm(h.data(), T, H, l.gate_up.data_ptr<uint8_t>(), 2 * I, gate_up.data());
      each_row(T, [&](int64_t t) {
        swiglu(gate_up.data() + t * 2 * I, I, act.data() + t * I);
      });
      q4_gemm(act.data(), T, I, l.down.data_ptr<uint8_t>(), H, out.data());
      each_row(T, [&](int64_t t) { add(out.data() + t * H, stream + t * H, H); });
    }
  }

  std::vector<Layer> layers_;
  at::Tensor cos_, sin_;
  int64_t nh_, nkv_, hd_, hidden_ = 0, intermediate_ = 0;
  float eps_;
};

// How many threads at::parallel_for gives a loop of `tasks` items: at most torch's thread count.
// 1 where the library was built without OpenMP, whose pragmas the header's parallel_for is
// made of (it then runs every loop on the calling thread).
int64_t parallel_threads(int64_t tasks) {
  std::vector<int> seen(at::get_num_threads(), 0);
  at::parallel_for(0, tasks, 1, [&](int64_t, int64_t) { seen[at::get_thread_num()] = 1; });
  return std::count(seen.begin(), seen.end(), 1);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("parallel_threads", &parallel_threads, "threads that at::parallel_for used");
  // all three release the GIL while they compute: the server's asyncio thread runs meanwhile
  m.def("q4_matmul", &q4_matmul, "Q4_1 blocks times int8-rounded activations",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("q8_matmul", &q8_matmul, "Q8_0 blocks times int8-rounded activations",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  // module_local: builds of other versions may be loaded in the same process (benchmarks)
  pybind11::class_<Decoder>(m, "Decoder", pybind11::module_local())
      .def(pybind11::init<const std::vector<at::Tensor>&, at::Tensor, at::Tensor, int64_t,
                          int64_t, int64_t, double>())
      .def("forward", &Decoder::forward, "the layers of a decode step; returns x",
           pybind11::call_guard<pybind11::gil_scoped_release>());
}
