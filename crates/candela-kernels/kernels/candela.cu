// The one translation unit build.rs compiles into candela.fatbin: C entry
// points (names the Rust launchers look up) for every dtype and head size.
#include "attention.cuh"
#include "sampling.cuh"

using candela::ATTN_THREADS;

#define CANDELA_WRITE_ROWS(T, TN)                                                                            \
  extern "C" __global__ void candela_write_rows_##TN(T *dst, const T *src, const uint32_t *slots,           \
                                                     uint32_t row, uint64_t num_slots) {                     \
    candela::write_rows<T>(dst, src, slots, row, num_slots);                                                 \
  }

#define CANDELA_ATTENTION(T, TN, HD)                                                                         \
  extern "C" __global__ void __launch_bounds__(ATTN_THREADS) candela_decode_##TN##_##HD(                     \
      T *out, float *part_out, float *part_ml, const T *q, const T *kc, const T *vc, const uint32_t *items,  \
      const uint32_t *block_tables, uint32_t max_blocks, uint32_t block_size, uint64_t num_blocks,           \
      uint32_t n_heads, uint32_t n_kv, uint32_t group, uint32_t head_chunks, uint32_t max_parts,             \
      float scale) {                                                                                         \
    candela::decode<T, HD>(out, part_out, part_ml, q, kc, vc, items, block_tables, max_blocks, block_size,   \
                           num_blocks, n_heads, n_kv, group, head_chunks, max_parts, scale);                 \
  }                                                                                                          \
  extern "C" __global__ void candela_decode_reduce_##TN##_##HD(T *out, const float *part_out,                \
                                                                const float *part_ml, const uint32_t *items, \
                                                                uint32_t n_heads, uint32_t max_parts) {      \
    candela::decode_reduce<T, HD>(out, part_out, part_ml, items, n_heads, max_parts);                        \
  }                                                                                                          \
  extern "C" __global__ void __launch_bounds__(ATTN_THREADS) candela_prefill_##TN##_##HD(                    \
      T *out, const T *q, const T *kc, const T *vc, const uint32_t *tiles, const uint32_t *query_starts,     \
      const uint32_t *context_lens, const uint32_t *block_tables, uint32_t max_blocks, uint32_t block_size,  \
      uint64_t num_blocks, uint32_t n_heads, uint32_t n_kv, uint32_t group, float scale) {                   \
    candela::prefill<T, HD>(out, q, kc, vc, tiles, query_starts, context_lens, block_tables, max_blocks,     \
                            block_size, num_blocks, n_heads, n_kv, group, scale);                            \
  }

#define CANDELA_ALL_HEAD_DIMS(T, TN)                                                                         \
  CANDELA_WRITE_ROWS(T, TN)                                                                                  \
  CANDELA_ATTENTION(T, TN, 8)                                                                                \
  CANDELA_ATTENTION(T, TN, 16)                                                                               \
  CANDELA_ATTENTION(T, TN, 32)                                                                               \
  CANDELA_ATTENTION(T, TN, 64)                                                                               \
  CANDELA_ATTENTION(T, TN, 80)                                                                               \
  CANDELA_ATTENTION(T, TN, 96)                                                                               \
  CANDELA_ATTENTION(T, TN, 128)                                                                              \
  CANDELA_ATTENTION(T, TN, 256)

CANDELA_ALL_HEAD_DIMS(float, f32)
CANDELA_ALL_HEAD_DIMS(__half, f16)
CANDELA_ALL_HEAD_DIMS(__nv_bfloat16, bf16)

// params_u: (row, top_k) per sampled row; params_f: (temperature, top_p, min_p, uniform).
extern "C" __global__ void __launch_bounds__(candela::SAMPLE_THREADS)
    candela_sample(uint32_t *out, const float *logits, uint64_t row_stride, uint32_t vocab,
                   const uint32_t *params_u, const float *params_f) {
  const uint32_t b = blockIdx.x;
  const float *p = params_f + 4 * b;
  candela::sample_row<candela::SAMPLE_THREADS>(out + b, logits + (uint64_t)params_u[2 * b] * row_stride, vocab, p[0],
                                               params_u[2 * b + 1], p[1], p[2], p[3]);
}
