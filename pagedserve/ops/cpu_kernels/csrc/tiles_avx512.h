// The matmul tiles in 512-bit vectors with AVX-512 VNNI: a vector's 16 lanes are a tile's 16
// columns, each holding 4 of its weights, and one vpdpbusd multiplies them by 4 activation
// bytes broadcast to every lane and adds the 4 products to the lane's int32 sum: 64
// multiply-adds an instruction, against 32 for AVX2's vpmaddubsw, which also needs an add.
//
// The same integer dot products and then the same float operations in the same order as
// tiles_avx2.h: every variant gives the same bits (tested).
#pragma once

#include "simd_x86.h"

namespace ps {

// rows a tile reads its unpacked weights for: 32 vector registers hold 8 rows' sums
constexpr int TILE_ROWS = 8;

// 4 activation bytes (int8) in every 32-bit lane
inline __m512i broadcast4_512(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// the group's 8 vectors against one row's 32 activation bytes, in two independent chains
// (vpdpbusd's latency would otherwise bound one row), added at the end: exact integers
inline __m512i dot_group(const __m512i* weights, const int8_t* p) {
  __m512i even = _mm512_dpbusd_epi32(_mm512_setzero_si512(), weights[0], broadcast4_512(p));
  __m512i odd = _mm512_dpbusd_epi32(_mm512_setzero_si512(), weights[1], broadcast4_512(p + 4));
  for (int j = 2; j < 8; j += 2) {
    even = _mm512_dpbusd_epi32(even, weights[j], broadcast4_512(p + 4 * j));
    odd = _mm512_dpbusd_epi32(odd, weights[j + 1], broadcast4_512(p + 4 * j + 4));
  }
  return _mm512_add_epi32(even, odd);
}

// Columns [16 tile, 16 tile + 16) of rows [row0, row0 + R) of out (rows, n), R <= TILE_ROWS: the
// arithmetic of tiles_avx2.h's q4_tile on the whole tile at once. Nibble vector j (j = 2v + h:
// vector v's low nibbles for h = 0, high for h = 1) holds positions 4j..4j+3 of each column.
template <int R>
void q4_tile(const uint8_t* w, const Activations& a, int64_t row0, int64_t tile, int64_t n,
             float* out) {
  const __m512i low = _mm512_set1_epi8(0x0F);
  const uint8_t* wt = w + tile * a.groups * Q4_TILE_BYTES;
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < a.groups; ++g) {
    const uint8_t* b = wt + g * Q4_TILE_BYTES;
    __m512i nibbles[8];
    for (int v = 0; v < 4; ++v) {
      const __m512i bytes = _mm512_loadu_si512(b + Q4_QS + Q4_VECTOR_BYTES * v);
      nibbles[2 * v] = _mm512_and_si512(bytes, low);
      nibbles[2 * v + 1] = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low);
    }
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + Q4_D)));
    const __m512 lo = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + Q4_LO)));
    for (int r = 0; r < R; ++r) {
      const int64_t at = (row0 + r) * a.groups + g;
      const __m512 dots = _mm512_cvtepi32_ps(dot_group(nibbles, a.q + (row0 + r) * a.k + g * GROUP));
      acc[r] = _mm512_fmadd_ps(dots, _mm512_mul_ps(d, _mm512_set1_ps(a.scales[at])), acc[r]);
      acc[r] = _mm512_fmadd_ps(lo, _mm512_set1_ps(a.sums[at]), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(out + (row0 + r) * n + tile * TILE_COLUMNS, acc[r]);
}

// The LM head's Q8_0 tiles: vpdpbusd wants one unsigned side, so the weights go in as q + 128
// (a xor of the sign bit) and 128 sum p comes off the int32 sum after: the same integer as
// AVX2's sign trick.
template <int R>
void q8_tile(const uint8_t* w, const Activations& a, int64_t row0, int64_t tile, int64_t n,
             float* out) {
  const __m512i offset = _mm512_set1_epi8(static_cast<char>(0x80));
  const uint8_t* wt = w + tile * a.groups * Q8_TILE_BYTES;
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < a.groups; ++g) {
    const uint8_t* b = wt + g * Q8_TILE_BYTES;
    __m512i weights[8];
    for (int j = 0; j < 8; ++j)
      weights[j] = _mm512_xor_si512(_mm512_loadu_si512(b + Q8_QS + Q8_VECTOR_BYTES * j), offset);
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + Q8_D)));
    for (int r = 0; r < R; ++r) {
      const int64_t at = (row0 + r) * a.groups + g;
      const __m512i dots = _mm512_sub_epi32(dot_group(weights, a.q + (row0 + r) * a.k + g * GROUP),
                                            _mm512_set1_epi32(128 * a.isums[at]));
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots),
                               _mm512_mul_ps(d, _mm512_set1_ps(a.scales[at])), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(out + (row0 + r) * n + tile * TILE_COLUMNS, acc[r]);
}

}  // namespace ps
