// One small step's matmul on an AVX2 CPU: int4 weights times int8 activations.
//
// y[m, n] = sum_k x[m, k] W[n, k], for the few rows of a decode step (pagedserve/native_q4.py).
// W is held as groups of 32 along k, each w = lo + d * q with q in 0..15: the grid of a Q4_1
// GGUF block, so a Q4_1 model's weights are held exactly. Each group of 32 activations is
// rounded to int8 with its own scale s (s = max|x| / 127), as llama.cpp does for Q4_1, so that
// a group's dot product is one integer multiply-add over 32 bytes:
//
//   sum_j (lo + d q_j)(s p_j) = d s sum_j q_j p_j + lo s sum_j p_j
//
// Layout: blocks (N, K/32, 20) uint8, one block per group as in a Q4_1 GGUF file: d and lo as
// float16, then 16 bytes whose byte j holds q_j in its low nibble and q_{j+16} in its high one.
// Rows are independent: a row's result does not depend on the other rows of the step.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/python.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

inline float horizontal_sum(__m256 v) {
  __m128 sum = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  sum = _mm_hadd_ps(sum, sum);
  sum = _mm_hadd_ps(sum, sum);
  return _mm_cvtss_f32(sum);
}

// Each group of 32 activations -> 32 int8, its scale, and scale * (sum of the int8).
void quantize_rows(const float* x, int64_t rows, int64_t groups, int8_t* q, float* scales) {
  for (int64_t r = 0; r < rows * groups; ++r) {
    const float* v = x + r * 32;
    float amax = 0.f;
    for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(v[j]));
    const float scale = amax / 127.f;
    const float inverse = scale > 0.f ? 1.f / scale : 0.f;
    int sum = 0;
    for (int j = 0; j < 32; ++j) {
      const int p = static_cast<int>(std::nearbyint(v[j] * inverse));
      q[r * 32 + j] = static_cast<int8_t>(p);
      sum += p;
    }
    scales[r * 2] = scale;
    scales[r * 2 + 1] = scale * static_cast<float>(sum);
  }
}

}  // namespace

at::Tensor q4_matmul(const at::Tensor& x, const at::Tensor& blocks) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "x must be a contiguous float32 matrix");
  TORCH_CHECK(blocks.dim() == 3 && blocks.size(2) == 20 && blocks.scalar_type() == at::kByte
              && blocks.is_contiguous(), "blocks must be contiguous uint8 (N, K/32, 20)");
  const int64_t rows = x.size(0), k = x.size(1), n = blocks.size(0), groups = blocks.size(1);
  TORCH_CHECK(k == groups * 32, "x has ", k, " columns, the weights ", groups * 32);

  auto xq = at::empty({rows, k}, at::kChar);
  auto xs = at::empty({rows, groups, 2}, at::kFloat);
  auto y = at::empty({rows, n}, at::kFloat);
  quantize_rows(x.data_ptr<float>(), rows, groups, xq.data_ptr<int8_t>(), xs.data_ptr<float>());

  const uint8_t* w = blocks.data_ptr<uint8_t>();
  const int8_t* q = xq.data_ptr<int8_t>();
  const float* s = xs.data_ptr<float>();
  float* out = y.data_ptr<float>();
  // torch's own thread pool (at::parallel_for), not a second OpenMP runtime
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    const __m256i low_nibbles = _mm256_set1_epi8(0x0F);
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t col = begin; col < end; ++col) {
      const uint8_t* wc = w + col * groups * 20;
      for (int64_t r = 0; r < rows; ++r) {
        const int8_t* qr = q + r * k;
        const float* sr = s + r * groups * 2;
        __m256 acc = _mm256_setzero_ps();
        float offset = 0.f;
        for (int64_t g = 0; g < groups; ++g) {
          const uint8_t* block = wc + g * 20;
          uint16_t half_d, half_lo;
          std::memcpy(&half_d, block, 2);
          std::memcpy(&half_lo, block + 2, 2);
          const float d = _cvtsh_ss(half_d), lo = _cvtsh_ss(half_lo);
          const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 4));
          const __m256i q4 = _mm256_and_si256(
              _mm256_set_m128i(_mm_srli_epi16(bytes, 4), bytes), low_nibbles);
          const __m256i p8 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qr + g * 32));
          const __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(q4, p8), ones);
          acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(d * sr[g * 2]), acc);
          offset += lo * sr[g * 2 + 1];
        }
        out[r * n + col] = horizontal_sum(acc) + offset;
      }
    }
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("q4_matmul", &q4_matmul, "Q4_1 blocks times int8-rounded activations");
}
