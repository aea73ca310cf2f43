// Token sampling on the GPU, one CTA per logits row, so only the chosen ids
// (4 bytes a row) go back to the host.
//
// Same order as the host sampler (candela-core sampler.rs) for rows without
// penalties: greedy argmax (ties to the lowest id, NaN ignored) when the
// temperature is ~0; else y = logit / temperature, then min_p, top_k and
// top_p become one threshold tau (kept: finite y >= tau), and the caller's
// uniform u picks the first id (in id order) whose cumulative mass exceeds
// u * total. Thresholds are found by radix selection over order-preserving
// 32-bit keys (4 passes of 8 bits) rather than sorting the row. Unlike the
// host, tokens tied with the top_p boundary value are all kept.
#pragma once

#include "common.cuh"

namespace candela {

constexpr int SAMPLE_THREADS = 1024;
constexpr float SAMPLE_GREEDY_EPS = 1e-5f; // sampler::SAMPLING_EPS

// Monotone map float -> u32 (NaN below everything).
__device__ __forceinline__ uint32_t order_key(float x) {
  if (isnan(x)) return 0u;
  const uint32_t b = __float_as_uint(x);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
__device__ __forceinline__ float key_value(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

struct SampleShared {
  float f[32];
  unsigned long long u64[32];
  uint32_t u[32];
  uint32_t hist[256];
  float mass[256];
  uint32_t prefix, remaining;
  float above;
  int done;
};

template <int NT> __device__ __forceinline__ float block_inclusive_scan(float v, float *tot, float &total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const float t = __shfl_up_sync(0xffffffffu, v, o);
    if (lane >= o) v += t;
  }
  __syncthreads();
  if (lane == 31) tot[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float t = lane < NT / 32 ? tot[lane] : 0.f;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const float s = __shfl_up_sync(0xffffffffu, t, o);
      if (lane >= o) t += s;
    }
    tot[lane] = t;
  }
  __syncthreads();
  total = tot[NT / 32 - 1];
  return v + (warp > 0 ? tot[warp - 1] : 0.f);
}

// Key of the k-th largest finite y (1 <= k <= number of finite values).
template <int NT>
__device__ uint32_t kth_largest_key(const float *x, uint32_t vocab, float temp, uint32_t k, SampleShared &sh) {
  uint32_t prefix = 0, mask = 0, remaining = k;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += NT) sh.hist[i] = 0;
    __syncthreads();
    for (uint32_t i = threadIdx.x; i < vocab; i += NT) {
      const float y = x[i] / temp;
      if (!isfinite(y)) continue;
      const uint32_t key = order_key(y);
      if ((key & mask) == prefix) atomicAdd(&sh.hist[(key >> shift) & 255u], 1u);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      uint32_t cum = 0;
      int d = 255;
      for (; d > 0; --d) {
        if (cum + sh.hist[d] >= remaining) break;
        cum += sh.hist[d];
      }
      sh.remaining = remaining - cum;
      sh.prefix = prefix | ((uint32_t)d << shift);
    }
    __syncthreads();
    remaining = sh.remaining;
    prefix = sh.prefix;
    mask |= 255u << shift;
    __syncthreads();
  }
  return prefix;
}

// Key of the top_p boundary: the largest value v whose mass of kept y >= v
// reaches `target`. Returns false when rounding left no digit to pick.
template <int NT>
__device__ bool top_p_key(const float *x, uint32_t vocab, float temp, float tau, float ymax, float target,
                          SampleShared &sh, uint32_t &out) {
  uint32_t prefix = 0, mask = 0;
  if (threadIdx.x == 0) {
    sh.above = 0.f;
    sh.done = 0;
  }
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += NT) sh.mass[i] = 0.f;
    __syncthreads();
    for (uint32_t i = threadIdx.x; i < vocab; i += NT) {
      const float y = x[i] / temp;
      if (!isfinite(y) || y < tau) continue;
      const uint32_t key = order_key(y);
      if ((key & mask) == prefix) atomicAdd(&sh.mass[(key >> shift) & 255u], __expf(y - ymax));
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      float cum = sh.above;
      int d = 255;
      for (; d >= 0; --d) {
        if (cum + sh.mass[d] >= target) break;
        cum += sh.mass[d];
      }
      if (d < 0) {
        // f32 rounding between passes: take the lowest non-empty digit (the
        // whole remaining range is needed to reach the target).
        cum = sh.above;
        int lowest = -1;
        for (int e = 255; e >= 0; --e) {
          if (sh.mass[e] > 0.f) lowest = e;
        }
        for (int e = 255; e > lowest; --e) cum += sh.mass[e];
        d = lowest;
      }
      if (d < 0) {
        sh.done = 1;
      } else {
        sh.above = cum;
        sh.prefix = prefix | ((uint32_t)d << shift);
      }
    }
    __syncthreads();
    if (sh.done) return false;
    prefix = sh.prefix;
    mask |= 255u << shift;
    __syncthreads();
  }
  out = prefix;
  return true;
}

template <int NT>
__device__ void sample_row(uint32_t *out, const float *x, uint32_t vocab, float temp, uint32_t top_k, float top_p,
                           float min_p, float u) {
  __shared__ SampleShared sh;
  const uint32_t tid = threadIdx.x;
  const bool greedy = !(temp >= SAMPLE_GREEDY_EPS);

  // Pass 1: argmax of the raw row (always: it is also the fallback), and the
  // max / count of finite tempered values.
  unsigned long long best = 0ull;
  float ymax = CANDELA_NEG_INF;
  uint32_t nfin = 0;
  for (uint32_t i = tid; i < vocab; i += NT) {
    const float v = x[i];
    const unsigned long long k = ((unsigned long long)order_key(v) << 32) | (0xffffffffu - i);
    best = k > best ? k : best;
    if (!greedy) {
      const float y = v / temp;
      if (isfinite(y)) {
        ymax = fmaxf(ymax, y);
        ++nfin;
      }
    }
  }
  best = block_max_u64<NT>(best, sh.u64);
  const uint32_t argmax = 0xffffffffu - (uint32_t)(best & 0xffffffffull);
  if (greedy) {
    if (tid == 0) *out = argmax;
    return;
  }
  ymax = block_max<NT>(ymax, sh.f);
  nfin = block_sum_u32<NT>(nfin, sh.u);
  if (nfin == 0) {
    if (tid == 0) *out = argmax;
    return;
  }

  float tau = -3.402823466e38f; // every finite value
  if (min_p > 0.f) tau = fmaxf(tau, ymax + logf(min_p));
  if (top_k > 0 && top_k < nfin) tau = fmaxf(tau, key_value(kth_largest_key<NT>(x, vocab, temp, top_k, sh)));
  if (top_p < 1.f) {
    float z = 0.f;
    for (uint32_t i = tid; i < vocab; i += NT) {
      const float y = x[i] / temp;
      if (isfinite(y) && y >= tau) z += __expf(y - ymax);
    }
    z = block_sum<NT>(z, sh.f);
    uint32_t key;
    if (top_p_key<NT>(x, vocab, temp, tau, ymax, top_p * z, sh, key)) tau = fmaxf(tau, key_value(key));
  }

  // Draw: the first id whose cumulative kept mass exceeds u * total.
  float z = 0.f;
  for (uint32_t i = tid; i < vocab; i += NT) {
    const float y = x[i] / temp;
    if (isfinite(y) && y >= tau) z += __expf(y - ymax);
  }
  z = block_sum<NT>(z, sh.f);
  const float target = u * z;
  float run = 0.f;
  unsigned long long last = 0ull; // 1 + the largest kept id
  for (uint32_t base = 0; base < vocab; base += NT) {
    const uint32_t i = base + tid;
    float w = 0.f;
    if (i < vocab) {
      const float y = x[i] / temp;
      if (isfinite(y) && y >= tau) w = __expf(y - ymax);
    }
    float total;
    const float incl = block_inclusive_scan<NT>(w, sh.f, total);
    const bool hit = w > 0.f && run + incl > target;
    const unsigned long long first = block_max_u64<NT>(hit ? 0xffffffffull - i : 0ull, sh.u64);
    if (first != 0ull) {
      if (tid == 0) *out = (uint32_t)(0xffffffffull - first);
      return;
    }
    const unsigned long long lk = block_max_u64<NT>(w > 0.f ? (unsigned long long)i + 1ull : 0ull, sh.u64);
    last = lk > last ? lk : last;
    run += total;
  }
  if (tid == 0) *out = last > 0ull ? (uint32_t)(last - 1ull) : argmax;
}

} // namespace candela
