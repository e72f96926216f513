// The matmul tiles in 256-bit vectors: AVX2 (vpmaddubsw), or AVX-VNNI (vpdpbusd on 256 bits,
// PS_VNNI256) where the CPU has it without AVX-512. A tile of 16 columns is read as two halves
// of 8 (kernels.h): a vector's 32-bit lanes are 8 columns, each holding 4 weights, and 4
// activation bytes broadcast to every lane make one instruction serve 8 columns.
//
// Every variant computes the same integer dot product of a group and then the same float
// operations in the same order, so all of them give the same bits (tested).
#pragma once

#include "simd_x86.h"

namespace ps {

// rows a tile reads its unpacked weights for: 16 vector registers hold 4 rows' sums
constexpr int TILE_ROWS = 4;

#if defined(PS_VNNI256)
// acc + the 4-byte dot products of u8 a and s8 b in each 32-bit lane
inline __m256i dpbusd256(__m256i acc, __m256i a, __m256i b) {
#if defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(acc, a, b);
#else
  return _mm256_dpbusd_epi32(acc, a, b);  // the AVX-512 VL encoding, same arithmetic
#endif
}
#endif

// Columns [16 tile, 16 tile + 16) of rows [row0, row0 + R) of out (rows, n), R <= TILE_ROWS. Per
// group: q (0..15) times the activations' int8 p, summed exactly in integers; then the group
// is scaled by the columns' d (times s) and offset by their lo (times s sum p) in two vector
// multiply-adds, groups in order:
//   sum_j (lo + d q_j)(s p_j) = d s sum_j q_j p_j + lo s sum_j p_j
// AVX2: vpmaddubsw pair sums stay int16 (8 of them at most 8 * 2 * 15 * 127 = 30,480) until
// one vpmaddwd makes them int32. The tile's half is unpacked once for the R rows, and a row's
// arithmetic is the same whatever R is: its result does not depend on the other rows.
template <int R>
void q4_tile(const uint8_t* w, const Activations& a, int64_t row0, int64_t tile, int64_t n,
             float* out) {
  const __m256i low = _mm256_set1_epi8(0x0F);
#if !defined(PS_VNNI256)
  const __m256i ones = _mm256_set1_epi16(1);
#endif
  const uint8_t* wt = w + tile * a.groups * Q4_TILE_BYTES;
  for (int half = 0; half < 2; ++half) {
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < a.groups; ++g) {
      const uint8_t* b = wt + g * Q4_TILE_BYTES;
      // the group's 32 positions in two parts of 16 (vectors 2 part and 2 part + 1); sums go in
      // order (pinned: reassociated, they were all computed first and spilled to the stack)
      __m256i sums[R];
      for (int part = 0; part < 2; ++part) {
        __m256i nibbles[4];
        for (int v = 0; v < 2; ++v) {
          const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(
              b + Q4_QS + Q4_VECTOR_BYTES * (2 * part + v) + 32 * half));
          nibbles[2 * v] = _mm256_and_si256(bytes, low);
          nibbles[2 * v + 1] = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low);
        }
        for (int r = 0; r < R; ++r) {
          const int8_t* p = a.q + (row0 + r) * a.k + g * GROUP + 16 * part;
          for (int j = 0; j < 4; ++j) {
            const __m256i x = broadcast4(p + 4 * j);
#if defined(PS_VNNI256)
            sums[r] = dpbusd256(part == 0 && j == 0 ? _mm256_setzero_si256() : sums[r],
                                nibbles[j], x);
#else
            const __m256i product = _mm256_maddubs_epi16(nibbles[j], x);
            sums[r] = part == 0 && j == 0 ? product : _mm256_add_epi16(sums[r], product);
#endif
            in_register(sums[r]);
          }
        }
      }
      const __m256 d = _mm256_cvtph_ps(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + Q4_D + 16 * half)));
      const __m256 lo = _mm256_cvtph_ps(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + Q4_LO + 16 * half)));
      for (int r = 0; r < R; ++r) {
        const int64_t at = (row0 + r) * a.groups + g;
#if defined(PS_VNNI256)
        const __m256 dots = _mm256_cvtepi32_ps(sums[r]);
#else
        const __m256 dots = _mm256_cvtepi32_ps(_mm256_madd_epi16(sums[r], ones));
#endif
        acc[r] = _mm256_fmadd_ps(dots, _mm256_mul_ps(d, _mm256_set1_ps(a.scales[at])), acc[r]);
        acc[r] = _mm256_fmadd_ps(lo, _mm256_set1_ps(a.sums[at]), acc[r]);
      }
    }
    for (int r = 0; r < R; ++r)
      _mm256_storeu_ps(out + (row0 + r) * n + tile * TILE_COLUMNS + 8 * half, acc[r]);
  }
}

// The LM head's matmul over Q8_0 tiles (q in -127..127). AVX2's vpmaddubsw wants one unsigned
// side: it multiplies |q| by the activations with their signs flipped where q < 0, as
// llama.cpp computes Q8_0 x Q8_0; two such products would overflow int16 (2 * 2 * 127 * 127),
// so each is made int32 at once. VNNI takes q + 128 (unsigned) and subtracts 128 sum p after.
template <int R>
void q8_tile(const uint8_t* w, const Activations& a, int64_t row0, int64_t tile, int64_t n,
             float* out) {
#if defined(PS_VNNI256)
  const __m256i offset = _mm256_set1_epi8(static_cast<char>(0x80));
#else
  const __m256i ones = _mm256_set1_epi16(1);
#endif
  const uint8_t* wt = w + tile * a.groups * Q8_TILE_BYTES;
  for (int half = 0; half < 2; ++half) {
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < a.groups; ++g) {
      const uint8_t* b = wt + g * Q8_TILE_BYTES;
      __m256i dots[R];
      for (int part = 0; part < 2; ++part) {
        __m256i weights[4];
#if !defined(PS_VNNI256)
        __m256i magnitudes[4];
#endif
        for (int j = 0; j < 4; ++j) {
          weights[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(
              b + Q8_QS + Q8_VECTOR_BYTES * (4 * part + j) + 32 * half));
#if defined(PS_VNNI256)
          weights[j] = _mm256_xor_si256(weights[j], offset);  // q + 128, as unsigned bytes
#else
          magnitudes[j] = _mm256_sign_epi8(weights[j], weights[j]);
#endif
        }
        for (int r = 0; r < R; ++r) {
          const int8_t* p = a.q + (row0 + r) * a.k + g * GROUP + 16 * part;
          for (int j = 0; j < 4; ++j) {
#if defined(PS_VNNI256)
            dots[r] = dpbusd256(part == 0 && j == 0 ? _mm256_setzero_si256() : dots[r],
                                weights[j], broadcast4(p + 4 * j));
#else
            const __m256i x = _mm256_sign_epi8(broadcast4(p + 4 * j), weights[j]);
            const __m256i product =
                _mm256_madd_epi16(_mm256_maddubs_epi16(magnitudes[j], x), ones);
            dots[r] = part == 0 && j == 0 ? product : _mm256_add_epi32(dots[r], product);
#endif
            in_register(dots[r]);
          }
        }
      }
      const __m256 d = _mm256_cvtph_ps(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + Q8_D + 16 * half)));
      for (int r = 0; r < R; ++r) {
        const int64_t at = (row0 + r) * a.groups + g;
#if defined(PS_VNNI256)
        dots[r] = _mm256_sub_epi32(dots[r], _mm256_set1_epi32(128 * a.isums[at]));
#endif
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots[r]),
                                 _mm256_mul_ps(d, _mm256_set1_ps(a.scales[at])), acc[r]);
      }
    }
    for (int r = 0; r < R; ++r)
      _mm256_storeu_ps(out + (row0 + r) * n + tile * TILE_COLUMNS + 8 * half, acc[r]);
  }
}

}  // namespace ps
