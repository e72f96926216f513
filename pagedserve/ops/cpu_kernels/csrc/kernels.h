// The C interface of pagedserve's CPU kernels (bound with ctypes by
// pagedserve/ops/cpu_kernels/library.py) and the one definition of their block geometry.
//
// Weights are held in tiles of TILE_COLUMNS output columns (rows of W) by GROUP inputs: every
// group of 32 weights of a column along k is quantized on its own, and a tile keeps the 16
// columns' blocks of one group together so that one 512-bit vector (or two 256-bit halves)
// holds 4 weights of each of the 16 columns and no horizontal sum is ever needed:
//
//   Q4_1 tile, one group (Q4_TILE_BYTES = 320):
//     [0, 32)     d  of columns 0..15, float16        w = lo + d * q, q in 0..15
//     [32, 64)    lo of columns 0..15, float16
//     [64, 320)   4 vectors of 64 bytes; vector v byte 4c + i (c < 16, i < 4) holds column c's
//                 q at position 8v + i in its low nibble and at 8v + 4 + i in its high one
//   Q8_0 tile, one group (Q8_TILE_BYTES = 544):
//     [0, 32)     d of columns 0..15, float16             w = d * q, q in -127..127
//     [32, 544)   8 vectors of 64 bytes; vector j byte 4c + i holds column c's q at 4j + i
//
// A matrix of N x K is (N / 16) tiles x (K / 32) groups, tile-major. A 256-bit kernel reads a
// tile as two halves of 8 columns: half h's d at byte 16h, its lo at 32 + 16h, and bytes
// [32h, 32h + 32) of each vector. pack() and pack_q8() in pagedserve/ops/cpu_kernels/packing.py
// write this layout from the numbers ps_geometry() reports.
#pragma once

#include <stdint.h>

#ifdef __cplusplus
namespace ps {
constexpr int64_t GROUP = 32;
constexpr int64_t TILE_COLUMNS = 16;
constexpr int64_t Q4_D = 0;                                 // byte offsets within a Q4 tile
constexpr int64_t Q4_LO = 2 * TILE_COLUMNS;
constexpr int64_t Q4_QS = 4 * TILE_COLUMNS;
constexpr int64_t Q4_VECTOR_BYTES = 4 * TILE_COLUMNS;       // 4 nibble pairs per column
constexpr int64_t Q4_TILE_BYTES = Q4_QS + TILE_COLUMNS * GROUP / 2;
constexpr int64_t Q8_D = 0;                                 // byte offsets within a Q8 tile
constexpr int64_t Q8_QS = 2 * TILE_COLUMNS;
constexpr int64_t Q8_VECTOR_BYTES = 4 * TILE_COLUMNS;
constexpr int64_t Q8_TILE_BYTES = Q8_QS + TILE_COLUMNS * GROUP;
static_assert(Q4_TILE_BYTES == 320 && Q8_TILE_BYTES == 544, "20 and 34 bytes per column");
}  // namespace ps
extern "C" {
#endif

// the library is compiled with hidden symbols; these functions are its interface
#define PS_API __attribute__((visibility("default")))

// What Python reads instead of repeating the numbers above (and checks its ctypes mirrors of
// the structs below against).
typedef struct {
  int32_t abi_version;
  int32_t group;
  int32_t tile_columns;
  int32_t q4_tile_bytes;
  int32_t q8_tile_bytes;
  int32_t layer_bytes;  // sizeof(ps_layer)
  int32_t step_bytes;   // sizeof(ps_step)
} ps_geometry;

// One decoder layer's weights (Llama family), each a contiguous tensor owned by the caller:
//   input_norm, post_norm (H) float32; qkv_bias ((nh + 2 nkv) hd) float32 or NULL;
//   qkv ((nh + 2 nkv) hd / 16, H / 32) Q4 tiles; o (H / 16, nh hd / 32) Q4 tiles;
//   gate_up (2 I / 16, H / 32) Q4 tiles as [gate | up]; down (H / 16, I / 32) Q4 tiles.
typedef struct {
  const float* input_norm;
  const uint8_t* qkv;
  const float* qkv_bias;
  const uint8_t* o;
  const float* post_norm;
  const uint8_t* gate_up;
  const uint8_t* down;
} ps_layer;

typedef struct {
  int64_t num_layers, hidden, intermediate, num_heads, num_kv_heads, head_dim;
  int64_t max_positions;  // rows of the rotary tables cos and sin, (max_positions, hd / 2)
  double eps;
} ps_decoder_dims;

enum { PS_CACHE_FLOAT32 = 0, PS_CACHE_FLOAT16 = 1 };

// One forward's rows: T tokens, each a query over the seq_lens[t] positions up to its own.
// caches: per layer its K and V, (num_blocks, block_size, nkv, hd) each, all of cache_dtype.
typedef struct {
  int64_t rows;
  const int32_t* positions;
  const int32_t* slots;
  const int32_t* seq_lens;
  const int32_t* block_tables;  // (rows, table_width), row stride table_stride
  int64_t table_stride, table_width;
  void* const* caches;
  int64_t num_caches;
  int32_t cache_dtype;
  int64_t num_blocks, block_size;
} ps_step;

PS_API void ps_get_geometry(ps_geometry* out);
PS_API const char* ps_isa(void);          // the instruction set this library was compiled for
PS_API const char* ps_source_hash(void);  // the sources' hash it was compiled from
PS_API const char* ps_last_error(void);   // this thread's last error message

// Runs every kernel of this library on small fixed inputs against a scalar reference: 0 when
// all agree. Run it guarded (ps_probe_run_guarded): it faults where the ISA is not usable.
PS_API int ps_selftest(void);

// The library's thread pool: total threads (the caller included) and how long an idle one
// spins before it blocks.
PS_API void ps_set_threads(int32_t threads);
PS_API int32_t ps_threads(void);
PS_API void ps_set_spin_us(int32_t microseconds);
PS_API int32_t ps_parallel_threads(int64_t tasks);  // threads that took part in a job of `tasks`

// out (rows, n) float32 = x (rows, k) float32 times W's tiles; 0, or -1 with ps_last_error.
PS_API int ps_q4_matmul(const float* x, int64_t rows, int64_t k, const uint8_t* w, int64_t n,
                 float* out);
PS_API int ps_q8_matmul(const float* x, int64_t rows, int64_t k, const uint8_t* w, int64_t n,
                 float* out);

// values (rows), indices (rows) = each row of x (rows, n)'s largest value and the index of its
// first occurrence (torch.max(dim=-1)); a row holding NaN gives NaN. 0, or -1 with
// ps_last_error.
PS_API int ps_rows_max(const float* x, int64_t rows, int64_t n, float* values, int64_t* indices);

// The layers of a decode step in one call. The handle keeps the pointers, not the tensors.
PS_API void* ps_decoder_new(const ps_decoder_dims* dims, const ps_layer* layers, const float* cos,
                     const float* sin);
PS_API void ps_decoder_free(void* decoder);
// x (rows, hidden) float32, the embedded tokens, becomes the residual stream after the last
// layer (before the final norm). 0, or -1 with ps_last_error (nothing computed).
PS_API int ps_decoder_forward(void* decoder, float* x, const ps_step* step);

#ifdef __cplusplus
}
#endif
