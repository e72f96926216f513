// pagedserve's CPU kernels: int4 (Q4_1) and int8 (Q8_0) weights times int8-rounded activations,
// and the whole decoder of a step in one call. One source, compiled once per instruction set
// (PS_ISA_* below; pagedserve/ops/cpu_kernels/isa.py lists the variants and their flags), each
// variant a shared library of its own with the C interface of kernels.h; Python picks one at
// run time from what the CPU and the OS allow and what passes ps_selftest().
//
// The matmul: y[m, n] = sum_k x[m, k] W[n, k] with W in the tiles of kernels.h. Each group of
// 32 activations is rounded to int8 with its own scale s = max|x| / 127, as llama.cpp does for
// Q4_1, so that a group's dot product is integer multiply-adds:
//
//   sum_j (lo + d q_j)(s p_j) = d s sum_j q_j p_j + lo s sum_j p_j
//
// Rows are independent: a row's result does not depend on the other rows of the step.
//
// The decoder (class Decoder): every layer of a Llama-family model for T tokens, each a query
// over the positions up to its own, float32 throughout except the matmuls: the same arithmetic
// as the torch ops of pagedserve/models/llama.py in one call instead of ~1,500. The KV cache is
// the paged one of pagedserve/ops/attention.py, float32 or float16 (F16C converts, attention
// computes in float32).
//
// Instruction sets: the x86 variants share simd_x86.h (AVX2 + FMA + F16C) for everything but
// the matmul tiles (tiles_avx2.h: AVX2 or AVX-VNNI; tiles_avx512.h: AVX-512 VNNI). A port to
// ARM gives simd_neon.h and tiles_neon.h (sdot) with the same functions over the same tiles.
#include "kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "thread_pool.h"

namespace ps {
// One step's rows, quantized per group of 32 (quantize_rows): what the tiles read.
struct Activations {
  const int8_t* q;       // (rows, k)
  const float* scales;   // (rows, groups): s
  const float* sums;     // s * sum p
  const int32_t* isums;  // sum p
  int64_t k, groups;
};
}  // namespace ps

#if defined(PS_ISA_AVX512VNNI)
#include "tiles_avx512.h"
#define PS_ISA_NAME "avx512vnni"
#elif defined(PS_ISA_AVXVNNI)
#define PS_VNNI256 1
#include "tiles_avx2.h"
#define PS_ISA_NAME "avxvnni"
#elif defined(PS_ISA_AVX2)
#include "tiles_avx2.h"
#define PS_ISA_NAME "avx2"
#else
#error "compile with one of -DPS_ISA_AVX2, -DPS_ISA_AVXVNNI, -DPS_ISA_AVX512VNNI"
#endif

#ifndef PS_SOURCE_HASH
#define PS_SOURCE_HASH "unknown"
#endif

#define PS_ABI_VERSION 1

namespace ps {
namespace {

thread_local std::string last_error;

// fn(begin, end) over [0, n) on the pool (thread_pool.h), chunks of at least `grain` items
template <typename F>
void parallel(int64_t n, int64_t grain, const F& fn) {
  ThreadPool::get().run(n, grain, fn);
}

// fn(t) for each row t < rows (one row: this thread)
template <typename F>
void each_row(int64_t rows, const F& fn) {
  parallel(rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) fn(t);
  });
}

// tile(std::integral_constant<int, R>{}, row0, rows, t) for R in 1..TILE_ROWS
template <int R, typename F>
void tile_of_rows(int64_t left, int64_t row0, int64_t t, const F& tile) {
  if constexpr (R > 1) {
    if (left < R) return tile_of_rows<R - 1>(left, row0, t, tile);
  }
  tile(std::integral_constant<int, R>{}, row0, t);
}

// tile(std::integral_constant<int, R>{}, row0, t) for each tile t of the n columns and each
// tile of R <= TILE_ROWS (the ISA's, tiles_*.h) of the rows, the column tiles shared out over
// the pool
template <typename F>
void each_tile(int64_t rows, int64_t n, const F& tile) {
  parallel(n / TILE_COLUMNS, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t row0 = 0; row0 < rows; row0 += TILE_ROWS)
        tile_of_rows<TILE_ROWS>(rows - row0, row0, t, tile);
  });
}

// x (rows, k) rounded to int8 per group, for the tiles; owns its buffers
struct Quantized {
  std::vector<int8_t> q;
  std::vector<float> scales, sums;
  std::vector<int32_t> isums;
  Activations a;

  Quantized(const float* x, int64_t rows, int64_t k)
      : q(rows * k), scales(rows * k / GROUP), sums(rows * k / GROUP), isums(rows * k / GROUP) {
    const int64_t groups = k / GROUP;
    each_row(rows, [&](int64_t r) {
      quantize_rows(x + r * k, 1, groups, q.data() + r * k, scales.data() + r * groups,
                    sums.data() + r * groups, isums.data() + r * groups);
    });
    a = Activations{q.data(), scales.data(), sums.data(), isums.data(), k, groups};
  }
};

void q4_gemm(const float* x, int64_t rows, int64_t k, const uint8_t* w, int64_t n, float* out) {
  const Quantized x8(x, rows, k);
  each_tile(rows, n, [&](auto r, int64_t row0, int64_t tile) {
    q4_tile<decltype(r)::value>(w, x8.a, row0, tile, n, out);
  });
}

void q8_gemm(const float* x, int64_t rows, int64_t k, const uint8_t* w, int64_t n, float* out) {
  const Quantized x8(x, rows, k);
  each_tile(rows, n, [&](auto r, int64_t row0, int64_t tile) {
    q8_tile<decltype(r)::value>(w, x8.a, row0, tile, n, out);
  });
}

void check_matmul(int64_t rows, int64_t k, int64_t n) {
  if (rows < 0 || k <= 0 || n <= 0 || k % GROUP != 0 || n % TILE_COLUMNS != 0)
    throw std::invalid_argument("matmul: k (" + std::to_string(k) + ") must be a multiple of "
                                + std::to_string(GROUP) + " and n (" + std::to_string(n)
                                + ") of " + std::to_string(TILE_COLUMNS));
}

// the message of a failed check, thrown before anything is computed
template <typename... Parts>
[[noreturn]] void fail(const Parts&... parts) {
  std::string message;
  ((message += [](const auto& p) {
     if constexpr (std::is_arithmetic_v<std::decay_t<decltype(p)>>) return std::to_string(p);
     else return std::string(p);
   }(parts)), ...);
  throw std::invalid_argument(message);
}

class Decoder {
 public:
  Decoder(const ps_decoder_dims& dims, const ps_layer* layers, const float* cos, const float* sin)
      : layers_(layers, layers + dims.num_layers), cos_(cos), sin_(sin), dims_(dims),
        eps_(static_cast<float>(dims.eps)) {
    const int64_t nh = dims.num_heads, nkv = dims.num_kv_heads, hd = dims.head_dim;
    if (dims.num_layers < 1 || nh < 1 || nkv < 1 || nh % nkv != 0 || hd % 2 != 0)
      fail("heads: ", nh, " query, ", nkv, " kv, dim ", hd, ", layers ", dims.num_layers);
    for (int64_t dim : {dims.hidden, dims.intermediate, nh * hd})
      if (dim % GROUP != 0 || dim % TILE_COLUMNS != 0) fail("dimension ", dim, " is not a multiple of 32");
    if ((nh + 2 * nkv) * hd % TILE_COLUMNS != 0) fail("q/k/v width is not a multiple of 16");
  }

  void forward(float* x, const ps_step& step) const {
    const int64_t T = step.rows, bs = step.block_size, num_blocks = step.num_blocks;
    if (step.num_caches != 2 * dims_.num_layers) fail("a K and a V cache per layer");
    if (step.cache_dtype != PS_CACHE_FLOAT32 && step.cache_dtype != PS_CACHE_FLOAT16)
      fail("caches must be float32 or float16");
    const int64_t cache_slots = num_blocks * bs;
    int64_t max_len = 0;
    for (int64_t t = 0; t < T; ++t) {
      const int32_t pos = step.positions[t], len = step.seq_lens[t], slot = step.slots[t];
      if (pos < 0 || pos >= dims_.max_positions || pos != len - 1)
        fail("row ", t, ": position ", pos, " for a context of ", len);
      if (slot < 0 || slot >= cache_slots) fail("row ", t, ": slot ", slot, " outside the cache");
      const int64_t blocks = (len + bs - 1) / bs;
      if (blocks > step.table_width) fail("row ", t, ": the block table is too short");
      for (int64_t b = 0; b < blocks; ++b) {
        const int32_t block = step.block_tables[t * step.table_stride + b];
        if (block < 0 || block >= num_blocks)
          fail("row ", t, ": block ", block, " outside the cache");
      }
      max_len = std::max<int64_t>(max_len, len);
    }
    if (step.cache_dtype == PS_CACHE_FLOAT16) {
      std::vector<uint16_t*> caches;
      for (int64_t i = 0; i < step.num_caches; ++i)
        caches.push_back(static_cast<uint16_t*>(step.caches[i]));
      run(step, max_len, x, caches);
    } else {
      std::vector<float*> caches;
      for (int64_t i = 0; i < step.num_caches; ++i)
        caches.push_back(static_cast<float*>(step.caches[i]));
      run(step, max_len, x, caches);
    }
  }

 private:
  // every layer over the residual stream (T, H); caches[2 l], caches[2 l + 1] layer l's K and V
  template <typename E>
  void run(const ps_step& st, int64_t max_len, float* stream, const std::vector<E*>& caches) const {
    const int64_t T = st.rows, H = dims_.hidden, I = dims_.intermediate, bs = st.block_size;
    const int64_t nh = dims_.num_heads, nkv = dims_.num_kv_heads, hd = dims_.head_dim;
    const int32_t *pos = st.positions, *slot = st.slots, *lens = st.seq_lens;
    const int64_t qkv_n = (nh + 2 * nkv) * hd, half = hd / 2, group = nh / nkv;
    const float scale = 1.f / std::sqrt(static_cast<float>(hd));
    std::vector<float> h(T * H), qkv(T * qkv_n), attn(T * nh * hd), out(T * H),
        gate_up(T * 2 * I), act(T * I);
    // attention is worth splitting over threads only when there is enough of it
    const bool parallel_attention = max_len * hd * nh * T > (1 << 16);

    for (size_t li = 0; li < layers_.size(); ++li) {
      const ps_layer& l = layers_[li];
      E* k_cache = caches[2 * li];
      E* v_cache = caches[2 * li + 1];
      each_row(T, [&](int64_t t) { rms_norm(stream + t * H, l.input_norm, eps_, H, h.data() + t * H); });
      q4_gemm(h.data(), T, H, l.qkv, qkv_n, qkv.data());
      each_row(T, [&](int64_t t) {
        float* row = qkv.data() + t * qkv_n;
        if (l.qkv_bias != nullptr)
          for (int64_t i = 0; i < qkv_n; ++i) row[i] += l.qkv_bias[i];
        const float* c = cos_ + pos[t] * half;
        const float* s = sin_ + pos[t] * half;
        for (int64_t head = 0; head < nh + nkv; ++head) rotate_halves(row + head * hd, c, s, half);
        // this token's K and V into its slot (each row its own), before attention reads them
        store_row(row + nh * hd, nkv * hd, k_cache + slot[t] * nkv * hd);
        store_row(row + (nh + nkv) * hd, nkv * hd, v_cache + slot[t] * nkv * hd);
      });
      // one task per sequence and KV head, for its `group` query heads
      const auto attend = [&](int64_t begin, int64_t end) {
        std::vector<float> scores(group * max_len);
        std::vector<const E*> k_rows(max_len), v_rows(max_len);
        for (int64_t task = begin; task < end; ++task) {
          const int64_t t = task / nkv, g = task % nkv, len = lens[t];
          const int32_t* table = st.block_tables + t * st.table_stride;
          for (int64_t p = 0; p < len; ++p) {  // where each position's K and V rows are
            const int64_t block = p / bs, at_slot = (table[block] * bs + p - block * bs) * nkv + g;
            k_rows[p] = k_cache + at_slot * hd;
            v_rows[p] = v_cache + at_slot * hd;
          }
          for (int64_t head = 0; head < group; ++head) {
            const int64_t qh = g * group + head;
            float* row = scores.data() + head * max_len;
            attention_scores(qkv.data() + t * qkv_n + qh * hd, k_rows.data(), len, hd, scale, row);
            softmax(row, len);
            weighted_sum(row, v_rows.data(), len, hd, attn.data() + (t * nh + qh) * hd);
          }
        }
      };
      if (parallel_attention)
        parallel(T * nkv, 1, attend);
      else
        attend(0, T * nkv);
      q4_gemm(attn.data(), T, nh * hd, l.o, H, out.data());
      each_row(T, [&](int64_t t) {
        add(out.data() + t * H, stream + t * H, H);
        rms_norm(stream + t * H, l.post_norm, eps_, H, h.data() + t * H);
      });
      q4_gemm(h.data(), T, H, l.gate_up, 2 * I, gate_up.data());
      each_row(T, [&](int64_t t) { swiglu(gate_up.data() + t * 2 * I, I, act.data() + t * I); });
      q4_gemm(act.data(), T, I, l.down, H, out.data());
      each_row(T, [&](int64_t t) { add(out.data() + t * H, stream + t * H, H); });
    }
  }

  std::vector<ps_layer> layers_;
  const float *cos_, *sin_;
  ps_decoder_dims dims_;
  float eps_;
};

// Runs fn, turning a thrown check into -1 and this thread's last error.
template <typename F>
int guarded(const F& fn) {
  try {
    fn();
    return 0;
  } catch (const std::exception& e) {
    last_error = e.what();
    return -1;
  }
}

// ---- the self-test: the tiles on small fixed inputs against a scalar reference ----

// a deterministic pseudo-random sequence (no <random>: its distributions differ by library)
struct Lcg {
  uint32_t state;
  uint32_t next() { return state = state * 1664525u + 1013904223u; }
  int between(int lo, int hi) { return lo + static_cast<int>((next() >> 8) % (hi - lo + 1)); }
};

// float16 bits of small powers of two (exact, no conversion instructions needed)
uint16_t half_of_power_of_two(int exponent) { return static_cast<uint16_t>((exponent + 15) << 10); }

int selftest() {
  const ThreadPool::CallerOnly on_this_thread;
  constexpr int64_t rows = 5, k = 2 * GROUP, n = 2 * TILE_COLUMNS, groups = k / GROUP;
  Lcg rng{12345};
  // activations that round to int8 exactly: integers with a group maximum of 127 (s = 1)
  std::vector<float> x(rows * k);
  for (int64_t i = 0; i < rows * k; ++i) x[i] = static_cast<float>(rng.between(-127, 127));
  for (int64_t r = 0; r < rows * groups; ++r) x[r * GROUP] = 127.f;
  // Q4 tiles: d = 2^-e, lo = -2^-e', q random; Q8: d = 2^-e, q random in -127..127
  std::vector<uint8_t> w4((n / TILE_COLUMNS) * groups * Q4_TILE_BYTES);
  std::vector<uint8_t> w8((n / TILE_COLUMNS) * groups * Q8_TILE_BYTES);
  std::vector<double> d4(n * groups), lo4(n * groups), d8(n * groups);
  std::vector<int> q4(n * k), q8(n * k);
  for (int64_t tile = 0; tile < n / TILE_COLUMNS; ++tile) {
    for (int64_t g = 0; g < groups; ++g) {
      uint8_t* b4 = w4.data() + (tile * groups + g) * Q4_TILE_BYTES;
      uint8_t* b8 = w8.data() + (tile * groups + g) * Q8_TILE_BYTES;
      for (int64_t c = 0; c < TILE_COLUMNS; ++c) {
        const int64_t col = tile * TILE_COLUMNS + c;
        const int e = rng.between(2, 6), e_lo = rng.between(1, 4), e8 = rng.between(3, 7);
        const uint16_t hd = half_of_power_of_two(-e), hlo = half_of_power_of_two(-e_lo) | 0x8000;
        const uint16_t hd8 = half_of_power_of_two(-e8);
        std::memcpy(b4 + Q4_D + 2 * c, &hd, 2);
        std::memcpy(b4 + Q4_LO + 2 * c, &hlo, 2);
        std::memcpy(b8 + Q8_D + 2 * c, &hd8, 2);
        d4[col * groups + g] = std::ldexp(1.0, -e);
        lo4[col * groups + g] = -std::ldexp(1.0, -e_lo);
        d8[col * groups + g] = std::ldexp(1.0, -e8);
        for (int64_t pos = 0; pos < GROUP; ++pos) {
          const int v4 = rng.between(0, 15), v8 = rng.between(-127, 127);
          q4[col * k + g * GROUP + pos] = v4;
          q8[col * k + g * GROUP + pos] = v8;
          // Q4: vector pos / 8, byte 4c + pos % 4, high nibble when pos % 8 >= 4
          uint8_t& byte = b4[Q4_QS + Q4_VECTOR_BYTES * (pos / 8) + 4 * c + pos % 4];
          byte = static_cast<uint8_t>(pos % 8 < 4 ? (byte & 0xF0) | v4 : (byte & 0x0F) | (v4 << 4));
          b8[Q8_QS + Q8_VECTOR_BYTES * (pos / 4) + 4 * c + pos % 4] = static_cast<uint8_t>(v8);
        }
      }
    }
  }
  std::vector<float> y4(rows * n), y8(rows * n);
  q4_gemm(x.data(), rows, k, w4.data(), n, y4.data());
  q8_gemm(x.data(), rows, k, w8.data(), n, y8.data());
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t col = 0; col < n; ++col) {
      double want4 = 0, want8 = 0;  // exact in double: small integers times powers of two
      for (int64_t i = 0; i < k; ++i) {
        const int64_t g = i / GROUP;
        want4 += (lo4[col * groups + g] + d4[col * groups + g] * q4[col * k + i]) * x[r * k + i];
        want8 += d8[col * groups + g] * q8[col * k + i] * x[r * k + i];
      }
      // float32 sums of a few products: within a few ulp of the exact value
      const double tolerance = 1e-5 * (1 + std::fabs(want4)), tolerance8 = 1e-5 * (1 + std::fabs(want8));
      if (std::fabs(y4[r * n + col] - want4) > tolerance) return 1;
      if (std::fabs(y8[r * n + col] - want8) > tolerance8) return 2;
    }
  }
  // the decoder's vector helpers (softmax's exponentials, the float16 stores)
  float probabilities[11] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10};
  softmax(probabilities, 11);
  double total = 0;
  for (float p : probabilities) total += p;
  if (std::fabs(total - 1) > 1e-5 || !(probabilities[10] > probabilities[9])) return 3;
  float row[16];
  uint16_t stored[16];
  for (int i = 0; i < 16; ++i) row[i] = static_cast<float>(i) - 8;
  store_row(row, 16, stored);
  for (int i = 0; i < 16; ++i)
    if (to_float(stored[i]) != row[i]) return 4;
  return 0;
}

}  // namespace
}  // namespace ps

using ps::guarded;

extern "C" {

void ps_get_geometry(ps_geometry* out) {
  *out = ps_geometry{PS_ABI_VERSION,
                     static_cast<int32_t>(ps::GROUP),
                     static_cast<int32_t>(ps::TILE_COLUMNS),
                     static_cast<int32_t>(ps::Q4_TILE_BYTES),
                     static_cast<int32_t>(ps::Q8_TILE_BYTES),
                     static_cast<int32_t>(sizeof(ps_layer)),
                     static_cast<int32_t>(sizeof(ps_step))};
}

const char* ps_isa(void) { return PS_ISA_NAME; }
const char* ps_source_hash(void) { return PS_SOURCE_HASH; }
const char* ps_last_error(void) { return ps::last_error.c_str(); }
int ps_selftest(void) { return ps::selftest(); }

void ps_set_threads(int32_t threads) { ps::ThreadPool::get().set_threads(threads); }
int32_t ps_threads(void) { return ps::ThreadPool::get().threads(); }
void ps_set_spin_us(int32_t microseconds) { ps::ThreadPool::get().set_spin_us(microseconds); }
int32_t ps_parallel_threads(int64_t tasks) { return ps::ThreadPool::get().parallel_threads(tasks); }

int ps_rows_max(const float* x, int64_t rows, int64_t n, float* values, int64_t* indices) {
  return guarded([&] {
    if (rows < 0 || n < 1) ps::fail("rows_max: ", rows, " rows of ", n);
    ps::each_row(rows, [&](int64_t r) { values[r] = ps::row_max(x + r * n, n, indices + r); });
  });
}

int ps_q4_matmul(const float* x, int64_t rows, int64_t k, const uint8_t* w, int64_t n,
                 float* out) {
  return guarded([&] {
    ps::check_matmul(rows, k, n);
    ps::q4_gemm(x, rows, k, w, n, out);
  });
}

int ps_q8_matmul(const float* x, int64_t rows, int64_t k, const uint8_t* w, int64_t n,
                 float* out) {
  return guarded([&] {
    ps::check_matmul(rows, k, n);
    ps::q8_gemm(x, rows, k, w, n, out);
  });
}

void* ps_decoder_new(const ps_decoder_dims* dims, const ps_layer* layers, const float* cos,
                     const float* sin) {
  ps::Decoder* decoder = nullptr;
  if (guarded([&] { decoder = new ps::Decoder(*dims, layers, cos, sin); }) != 0) return nullptr;
  return decoder;
}

void ps_decoder_free(void* decoder) { delete static_cast<ps::Decoder*>(decoder); }

int ps_decoder_forward(void* decoder, float* x, const ps_step* step) {
  return guarded([&] { static_cast<const ps::Decoder*>(decoder)->forward(x, *step); });
}

}  // extern "C"
