// Paged attention over a KV pool laid out as [num_blocks * block_size,
// num_kv_heads, head_dim] (slot s = row s), block tables per sequence.
//
// - write_rows: new K (or V) rows into their slots.
// - decode: one CTA per (query token, kv head x chunk of <= 8 of its query
//   heads, partition of 512 keys): grid (items, kv heads * chunks, partitions). The K/V rows of a partition are read once
//   for every query head of the chunk (GQA). Long contexts are split into
//   partitions whose partial results `decode_reduce` merges (flash-decoding).
// - prefill: one CTA per (tile of 16 query tokens of one sequence, query
//   head); K/V tiles stream through shared memory with an online softmax,
//   causal within the new tokens, over the cached prefix and the new tokens.
//
// Accumulation and softmax run in f32. Block ids are bounds-checked against
// the pool so a bad table can never read outside it (the host checks too).
#pragma once

#include "common.cuh"

namespace candela {

constexpr int ATTN_THREADS = 128;
constexpr int DEC_MAX_HEADS = 8;
constexpr int DEC_PART = 512;
constexpr int PF_BQ = 16;

// Keys per prefill K/V tile: the largest of 32/16/8 that keeps the static
// shared memory under 48 KiB (mirrored by plan::prefill_block_keys).
template <typename T, int HD> struct PrefillCfg {
  static constexpr int PAD = sizeof(T) == 4 ? 1 : 2; // odd word stride: no bank conflicts
  static constexpr int ROW = HD + PAD;
  static constexpr int smem(int bk) {
    return PF_BQ * HD * 4 + 2 * bk * ROW * (int)sizeof(T) + PF_BQ * (bk + 1) * 4;
  }
  static constexpr int BK = smem(32) <= 48 * 1024 ? 32 : (smem(16) <= 48 * 1024 ? 16 : 8);
};

template <typename T>
__device__ void write_rows(T *__restrict__ dst, const T *__restrict__ src, const uint32_t *__restrict__ slots,
                           uint32_t row, uint64_t num_slots) {
  const uint64_t slot = slots[blockIdx.x];
  if (slot >= num_slots) return;
  const T *s = src + (uint64_t)blockIdx.x * row;
  T *d = dst + slot * row;
  for (uint32_t i = threadIdx.x; i < row; i += blockDim.x) d[i] = s[i];
}

// Row of kv head `kvh` at causal position `p` of a sequence, or null when its
// block id is outside the pool.
template <typename T>
__device__ __forceinline__ const T *kv_row(const T *cache, const uint32_t *table, uint32_t p, uint32_t block_size,
                                           uint64_t num_blocks, uint32_t n_kv, uint32_t kvh, int hd) {
  const uint32_t block = table[p / block_size];
  if (block >= num_blocks) return nullptr;
  const uint64_t slot = (uint64_t)block * block_size + p % block_size;
  return cache + (slot * n_kv + kvh) * hd;
}

// items: (token, seq, n_keys) per decode token; the token sees keys 0..n_keys.
template <typename T, int HD>
__device__ void decode(T *__restrict__ out, float *__restrict__ part_out, float *__restrict__ part_ml,
                       const T *__restrict__ q, const T *__restrict__ kc, const T *__restrict__ vc,
                       const uint32_t *__restrict__ items, const uint32_t *__restrict__ block_tables,
                       uint32_t max_blocks, uint32_t block_size, uint64_t num_blocks, uint32_t n_heads,
                       uint32_t n_kv, uint32_t group, uint32_t head_chunks, uint32_t max_parts, float scale) {
  constexpr int CH = HD / 8;                 // 8-element chunks per row
  constexpr int KL = ATTN_THREADS / CH;      // key lanes in the P.V product
  static_assert(KL * HD <= DEC_PART * 2, "reduction buffer must fit in the score buffer");
  __shared__ float sq[DEC_MAX_HEADS][HD];
  __shared__ float sbuf[DEC_MAX_HEADS * DEC_PART * 2]; // scores, then the P.V partial sums
  __shared__ float sm[DEC_MAX_HEADS], sl[DEC_MAX_HEADS];

  const uint32_t item = blockIdx.x;
  const uint32_t kvh = blockIdx.y / head_chunks, chunk = blockIdx.y % head_chunks;
  const uint32_t part = blockIdx.z;
  const uint32_t token = items[3 * item], seq = items[3 * item + 1], n_keys = items[3 * item + 2];
  const uint32_t k0 = part * DEC_PART;
  if (k0 >= n_keys) return;
  const int n = (int)min((uint32_t)DEC_PART, n_keys - k0);
  const uint32_t h0 = kvh * group + chunk * DEC_MAX_HEADS;
  const int nh = (int)min((uint32_t)DEC_MAX_HEADS, group - chunk * DEC_MAX_HEADS);
  const uint32_t *table = block_tables + (uint64_t)seq * max_blocks;
  const int tid = threadIdx.x;

  for (int i = tid; i < nh * HD; i += ATTN_THREADS) {
    const int h = i / HD, d = i % HD;
    sq[h][d] = to_f32(q[((uint64_t)token * n_heads + h0 + h) * HD + d]) * scale;
  }
  __syncthreads();

  float(*scores)[DEC_PART] = reinterpret_cast<float(*)[DEC_PART]>(sbuf);
  for (int j = tid; j < n; j += ATTN_THREADS) {
    const T *kr = kv_row(kc, table, k0 + j, block_size, num_blocks, n_kv, kvh, HD);
    float acc[DEC_MAX_HEADS];
#pragma unroll
    for (int h = 0; h < DEC_MAX_HEADS; ++h) acc[h] = 0.f;
    if (kr) {
#pragma unroll 2
      for (int c = 0; c < CH; ++c) {
        float kf[8];
        load8(kr + 8 * c, kf);
#pragma unroll
        for (int h = 0; h < DEC_MAX_HEADS; ++h) {
          if (h < nh) {
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[h] = fmaf(sq[h][8 * c + e], kf[e], acc[h]);
          }
        }
      }
    }
#pragma unroll
    for (int h = 0; h < DEC_MAX_HEADS; ++h)
      if (h < nh) scores[h][j] = kr ? acc[h] : CANDELA_NEG_INF;
  }
  __syncthreads();

  // Softmax statistics per head: warp w takes heads w, w + 4.
  const int lane = tid & 31, warp = tid >> 5;
  for (int h = warp; h < nh; h += ATTN_THREADS / 32) {
    float m = CANDELA_NEG_INF;
    for (int j = lane; j < n; j += 32) m = fmaxf(m, scores[h][j]);
    m = warp_max(m);
    float l = 0.f;
    for (int j = lane; j < n; j += 32) {
      const float p = m == CANDELA_NEG_INF ? 0.f : __expf(scores[h][j] - m);
      scores[h][j] = p;
      l += p;
    }
    l = warp_sum(l);
    if (lane == 0) {
      sm[h] = m;
      sl[h] = l;
    }
  }
  __syncthreads();

  // P.V: thread = (key lane, 8-element chunk of the row).
  float acc[DEC_MAX_HEADS][8];
#pragma unroll
  for (int h = 0; h < DEC_MAX_HEADS; ++h)
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[h][e] = 0.f;
  const int c = tid % CH, kl = tid / CH;
  if (kl < KL) {
    for (int j = kl; j < n; j += KL) {
      const T *vr = kv_row(vc, table, k0 + j, block_size, num_blocks, n_kv, kvh, HD);
      if (!vr) continue;
      float vf[8];
      load8(vr + 8 * c, vf);
#pragma unroll
      for (int h = 0; h < DEC_MAX_HEADS; ++h) {
        if (h < nh) {
          const float p = scores[h][j];
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[h][e] = fmaf(p, vf[e], acc[h][e]);
        }
      }
    }
  }
  __syncthreads(); // scores are dead from here; sbuf holds the partial sums
  float(*red)[DEC_MAX_HEADS][HD] = reinterpret_cast<float(*)[DEC_MAX_HEADS][HD]>(sbuf);
  if (kl < KL) {
#pragma unroll
    for (int h = 0; h < DEC_MAX_HEADS; ++h)
      if (h < nh)
#pragma unroll
        for (int e = 0; e < 8; ++e) red[kl][h][8 * c + e] = acc[h][e];
  }
  __syncthreads();
  for (int i = tid; i < nh * HD; i += ATTN_THREADS) {
    const int h = i / HD, d = i % HD;
    float o = 0.f;
    for (int k = 0; k < KL; ++k) o += red[k][h][d];
    const uint32_t head = h0 + h;
    if (max_parts == 1) {
      const float l = sl[h];
      out[((uint64_t)token * n_heads + head) * HD + d] = from_f32<T>(l > 0.f ? o / l : 0.f);
    } else {
      const uint64_t at = ((uint64_t)item * n_heads + head) * max_parts + part;
      part_out[at * HD + d] = o;
      if (d == 0) {
        part_ml[2 * at] = sm[h];
        part_ml[2 * at + 1] = sl[h];
      }
    }
  }
}

// Merge the partitions of each (decode token, head): out = sum_p e^(m_p - M) o_p / sum_p e^(m_p - M) l_p.
template <typename T, int HD>
__device__ void decode_reduce(T *__restrict__ out, const float *__restrict__ part_out,
                              const float *__restrict__ part_ml, const uint32_t *__restrict__ items, uint32_t n_heads,
                              uint32_t max_parts) {
  const uint32_t item = blockIdx.x, head = blockIdx.y;
  const uint32_t token = items[3 * item], n_keys = items[3 * item + 2];
  const uint32_t parts = min(max_parts, (n_keys + DEC_PART - 1) / DEC_PART);
  const uint64_t base = ((uint64_t)item * n_heads + head) * max_parts;
  float big = CANDELA_NEG_INF;
  for (uint32_t p = 0; p < parts; ++p) big = fmaxf(big, part_ml[2 * (base + p)]);
  float l = 0.f;
  for (uint32_t p = 0; p < parts; ++p) {
    const float m = part_ml[2 * (base + p)];
    if (m != CANDELA_NEG_INF) l += __expf(m - big) * part_ml[2 * (base + p) + 1];
  }
  for (int d = threadIdx.x; d < HD; d += blockDim.x) {
    float o = 0.f;
    for (uint32_t p = 0; p < parts; ++p) {
      const float m = part_ml[2 * (base + p)];
      if (m != CANDELA_NEG_INF) o += __expf(m - big) * part_out[(base + p) * HD + d];
    }
    out[((uint64_t)token * n_heads + head) * HD + d] = from_f32<T>(l > 0.f ? o / l : 0.f);
  }
}

// tiles: (seq, first query of the tile within the sequence's new tokens).
// Query r of sequence s is token query_starts[s] + r at causal position
// context_len - query_len + r and sees keys 0..=that position.
template <typename T, int HD>
__device__ void prefill(T *__restrict__ out, const T *__restrict__ q, const T *__restrict__ kc,
                        const T *__restrict__ vc, const uint32_t *__restrict__ tiles,
                        const uint32_t *__restrict__ query_starts, const uint32_t *__restrict__ context_lens,
                        const uint32_t *__restrict__ block_tables, uint32_t max_blocks, uint32_t block_size,
                        uint64_t num_blocks, uint32_t n_heads, uint32_t n_kv, uint32_t group, float scale) {
  using Cfg = PrefillCfg<T, HD>;
  constexpr int BK = Cfg::BK, ROW = Cfg::ROW, CH = HD / 8;
  constexpr int ROW_THREADS = ATTN_THREADS / PF_BQ; // threads sharing one query row (8)
  constexpr int DPT = HD / ROW_THREADS;             // output dims per thread
  static_assert(ATTN_THREADS % BK == 0 && PF_BQ * ROW_THREADS == ATTN_THREADS, "thread layout");
  __shared__ float sQ[PF_BQ][HD];
  __shared__ T sK[BK][ROW];
  __shared__ T sV[BK][ROW];
  __shared__ float sS[PF_BQ][BK + 1]; // +1: rows in different banks

  const uint32_t tile = blockIdx.x, head = blockIdx.y, kvh = head / group;
  const uint32_t seq = tiles[2 * tile], qo = tiles[2 * tile + 1];
  const uint32_t q_start = query_starts[seq], q_len = query_starts[seq + 1] - q_start;
  const uint32_t first_pos = context_lens[seq] - q_len;
  const int rows = (int)min((uint32_t)PF_BQ, q_len - qo);
  const uint32_t n_keys = first_pos + qo + rows; // the tile's last query sees keys < n_keys
  const uint32_t *table = block_tables + (uint64_t)seq * max_blocks;
  const int tid = threadIdx.x;

  for (int i = tid; i < PF_BQ * HD; i += ATTN_THREADS) {
    const int r = i / HD, d = i % HD;
    sQ[r][d] = r < rows ? to_f32(q[((uint64_t)(q_start + qo + r) * n_heads + head) * HD + d]) * scale : 0.f;
  }

  const int r = tid / ROW_THREADS, dl = tid % ROW_THREADS; // this thread's row and dim lane
  const uint32_t pos_r = first_pos + qo + r;
  float o[DPT];
#pragma unroll
  for (int i = 0; i < DPT; ++i) o[i] = 0.f;
  float m = CANDELA_NEG_INF, l = 0.f;

  for (uint32_t kt0 = 0; kt0 < n_keys; kt0 += BK) {
    __syncthreads(); // the previous tile is consumed (and sQ is written)
    for (int i = tid; i < BK * CH; i += ATTN_THREADS) {
      const int j = i / CH, c = i % CH;
      const uint32_t p = kt0 + j;
      const T *kr = p < n_keys ? kv_row(kc, table, p, block_size, num_blocks, n_kv, kvh, HD) : nullptr;
      if (kr) {
        const T *vr = kv_row(vc, table, p, block_size, num_blocks, n_kv, kvh, HD);
        copy8(&sK[j][8 * c], kr + 8 * c);
        copy8(&sV[j][8 * c], vr + 8 * c);
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          sK[j][8 * c + e] = from_f32<T>(0.f);
          sV[j][8 * c + e] = from_f32<T>(0.f);
        }
      }
    }
    __syncthreads();

    // Scores: thread = (key column, group of query rows).
    {
      const int kj = tid % BK;
      const uint32_t p = kt0 + kj;
      const bool valid_key = p < n_keys && table[p / block_size] < num_blocks;
      for (int rr = tid / BK; rr < PF_BQ; rr += ATTN_THREADS / BK) {
        float s = CANDELA_NEG_INF;
        if (rr < rows && valid_key && p <= first_pos + qo + rr) {
          s = 0.f;
#pragma unroll 8
          for (int d = 0; d < HD; ++d) s = fmaf(sQ[rr][d], to_f32(sK[kj][d]), s);
        }
        sS[rr][kj] = s;
      }
    }
    __syncthreads();

    // Online softmax for row r, shared by its ROW_THREADS consecutive lanes.
    float tmax = CANDELA_NEG_INF;
    for (int j = dl; j < BK; j += ROW_THREADS) tmax = fmaxf(tmax, sS[r][j]);
#pragma unroll
    for (int w = ROW_THREADS / 2; w > 0; w >>= 1) tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, w));
    const float m_new = fmaxf(m, tmax);
    const float corr = m_new == CANDELA_NEG_INF ? 1.f : __expf(m - m_new);
    float psum = 0.f;
    for (int j = dl; j < BK; j += ROW_THREADS) {
      const float p = m_new == CANDELA_NEG_INF ? 0.f : __expf(sS[r][j] - m_new);
      sS[r][j] = p;
      psum += p;
    }
#pragma unroll
    for (int w = ROW_THREADS / 2; w > 0; w >>= 1) psum += __shfl_xor_sync(0xffffffffu, psum, w);
    l = l * corr + psum;
    m = m_new;
#pragma unroll
    for (int i = 0; i < DPT; ++i) o[i] *= corr;
    __syncwarp(); // the row's probabilities (written by its lanes) are visible to all of them

    for (int j = 0; j < BK; ++j) {
      const float p = sS[r][j];
      if (p != 0.f) {
#pragma unroll
        for (int i = 0; i < DPT; ++i) o[i] = fmaf(p, to_f32(sV[j][dl + ROW_THREADS * i]), o[i]);
      }
    }
  }

  if (r < rows && pos_r < n_keys) {
    T *dst = out + ((uint64_t)(q_start + qo + r) * n_heads + head) * HD;
#pragma unroll
    for (int i = 0; i < DPT; ++i) dst[dl + ROW_THREADS * i] = from_f32<T>(l > 0.f ? o[i] / l : 0.f);
  }
}

} // namespace candela
