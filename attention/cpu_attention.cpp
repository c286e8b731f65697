// Attention of a few new queries per sequence over its cache slot, on the CPU: what a decoding step
// (one token) or a tree's verification (a few) asks of each layer. `attention.cpu_attend` is how
// Python calls it, and `attention.reference.naive_attention` its reference.
//
// Why our own: PyTorch's SDPA gives a query a result that depends on how many queries and keys share
// its call, so in bfloat16 a token verified in a tree and the same token decoded alone drift apart
// (`benchmarks.divergence`: layer 0's attention is where they first differ) and greedy speculation is
// not token-exact. Here each query's result depends only on the keys it sees, in position order:
//   - scores q.k are one sum per key in a fixed order (`dot`);
//   - the softmax's sum puts the key at list index i (its position: the prefix first, then the new
//     tokens the mask shows, in order) into lane i % 16, and adds the lanes in a fixed order at the end;
//   - the output adds p_i v_i in list order; a bfloat16 cache on a CPU with AVX-512 BF16 adds them two
//     at a time, keys 2j and 2j + 1 of the list together (`weigh_pairs`).
// A key the mask hides adds nothing, and where the prefix ends does not change any lane's order, so a
// tree node gets the bits the same token gets decoded alone after its ancestors. No multiply-add is
// contracted (the pragma below): the same sum is the same instructions wherever it is written.

#pragma GCC optimize("fp-contract=off")

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>
#include <immintrin.h>

#include "cpu_kernels.h"  // runtime/: AttentionOperands
#include "cpu_vectors.h"  // runtime/: f32x16 and f32xN, load16 and loadN, sum16, Sum16, fma16, exp_lanes

namespace {

using namespace medusa_cpu;

// sum16 of 16 vectors at once: lane i of the result is sum16(v[i]), bit for bit (the same additions,
// in the same order), in 15 vector additions instead of 16 x 7 scalar-ish ones
inline f32x16 sum16x16(const f32x16* v) {
  f32x16 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)  // lanes 0-7: v[2i]'s j + (j + 8); lanes 8-15: v[2i + 1]'s
    a[i] = __builtin_shufflevector(v[2 * i], v[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(v[2 * i], v[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int i = 0; i < 4; ++i)  // four lanes each, j + (j + 4): v[4i], v[4i + 2], v[4i + 1], v[4i + 3]
    b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
           __builtin_shufflevector(a[2 * i], a[2 * i + 1], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int i = 0; i < 2; ++i)  // two lanes each, (b0 + b2), (b1 + b3)
    c[i] = __builtin_shufflevector(b[2 * i], b[2 * i + 1], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
           __builtin_shufflevector(b[2 * i], b[2 * i + 1], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
  const f32x16 d = __builtin_shufflevector(c[0], c[1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
                   __builtin_shufflevector(c[0], c[1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
  // d's lanes hold v[0], v[8], v[4], v[12], v[2], v[10], v[6], v[14], v[1], v[9], ... (bits reversed)
  return __builtin_shufflevector(d, d, 0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15);
}

// q . k over D (a multiple of 16) in 16 float32 lanes, to be added up by sum16 or sum16x16
template <typename T>
inline f32x16 widened_dot_lanes(const T* q, const T* k, int64_t D) {
  f32x16 acc = {};
  for (int64_t d = 0; d < D; d += 16) acc += load16(q + d) * load16(k + d);
  return acc;
}

template <typename T>
inline f32x16 dot_lanes(const T* q, const T* k, int64_t D) {
  return widened_dot_lanes(q, k, D);
}

#if defined(__AVX512BF16__)
// bf16 pairs multiplied into float32 sums in one instruction (vdpbf16ps) where the CPU has it
template <>
inline f32x16 dot_lanes(const c10::BFloat16* q, const c10::BFloat16* k, int64_t D) {
  if (D % 32 != 0) return widened_dot_lanes(q, k, D);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += 32)
    acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(q + d), (__m512bh)_mm512_loadu_si512(k + d));
  return (f32x16)acc;
}
#endif

inline float exp1(float x) {  // exp_lanes of one value: the same bits as in a vector
  f32xN v = {};
  v[0] = x;
  return exp_lanes(v)[0];
}

constexpr int kTile = 4;  // query rows whose outputs (D floats each) stay in registers together
constexpr int kMaxD = 256;

#if !defined(__AVX512F__)
// p[r * n16 + s] = q_r . k_s * scale for N rows and the n keys: widened_dot_lanes' 16 lanes held as two
// halves of 8 (a 16-lane vector has no register without AVX-512: cpu_vectors.h) and added up as sum16
// adds them, the same bits. The N rows share each key's loads (in bf16 its widening too): 2N sums, 2
// key halves and a query's load in 16 registers, and a tree's rows add up 8 keys' lanes at once
// (sum8x8). A tree of 8 nodes over 300 keys, SmolLM2's 9 / 3 heads of 64, AMD EPYC (Zen 3), one
// thread, old and new code taking turns in one process (rows alone, each key's sum by sum8x2): bf16
// 310.5 -> 238.8 us and 404.9 -> 312.8, float32 268.6 -> 251.9 and 325.4 -> 304.5; 2 threads, bf16
// 209.1 -> 163.7. One token's rows go alone (a task each) as before, at the same speed.
constexpr int kScoreRows = 4;

// sum8 of 8 keys' lanes at once: lane j of the result is sum8(a[j]) (a[j] = lo_j + hi_j: sum8x2), bit for
// bit (the same additions, in the same order), in 7 vector additions instead of 8 x 3 with extractions
inline f32x8 sum8x8(const f32x8* a) {
  f32x8 b[4], c[2];
  for (int i = 0; i < 4; ++i)  // lanes 0-3: a[2i]'s j + (j + 4); lanes 4-7: a[2i + 1]'s
    b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11) +
           __builtin_shufflevector(a[2 * i], a[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15);
  for (int i = 0; i < 2; ++i)  // per key, lane 0 + lane 2 and lane 1 + lane 3 of its four
    c[i] = __builtin_shufflevector(b[2 * i], b[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13) +
           __builtin_shufflevector(b[2 * i], b[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15);
  return __builtin_shufflevector(c[0], c[1], 0, 2, 4, 6, 8, 10, 12, 14) +
         __builtin_shufflevector(c[0], c[1], 1, 3, 5, 7, 9, 11, 13, 15);
}

template <int N, int kD, typename T>
inline void score_rows(const float (*q)[kMaxD], const T* K, int64_t Dr, int64_t n, float scale, float* p, int64_t n16) {
  // D known when compiling where the caller knows it, so the loop over it unrolls: with that and the
  // weighted sums' two changes (weigh_prefix_rows), a tree of 8 over 300 keys, SmolLM2's heads, Zen 3,
  // taking turns, same bits: float32 159.8 -> 127.7 us, bf16 191.0 -> 165.9 (2 threads; one thread
  // 238.8 -> 203.5 and 221.2 -> 172.5); one token 32.4 -> 31.5 and 45.5 -> 44.0
  const int64_t D = kD ? kD : Dr;
  auto lanes = [&](int64_t s, f32x8* a, int64_t stride) {  // a[r * stride] = lo + hi of row r's dot with key s
    const T* k = K + s * D;
    f32x8 lo[N] = {}, hi[N] = {};
    for (int64_t d = 0; d < D; d += 16) {
      f32x8 kl = load8(k + d), kh = load8(k + d + 8);
      // kept in registers: GCC made them memory operands, read again for every row. A tree of 8 over
      // 300 keys, float32, Zen 3, 2 threads, taking turns, same bits: 114.2 -> 104.3 us (bf16 the same)
      asm("" : "+x"(kl), "+x"(kh));
      for (int r = 0; r < N; ++r) {
        lo[r] += load8(q[r] + d) * kl;
        hi[r] += load8(q[r] + d + 8) * kh;
      }
    }
    for (int r = 0; r < N; ++r) a[r * stride] = lo[r] + hi[r];
  };
  int64_t s = 0;
  for (; N > 1 && s + 8 <= n; s += 8) {  // 8 keys' sums added up at once (for one row no faster)
    f32x8 a[N][8];
    for (int j = 0; j < 8; ++j) lanes(s + j, &a[0][j], 8);
    for (int r = 0; r < N; ++r) {
      const f32x8 scores = sum8x8(a[r]) * scale;
      std::memcpy(p + r * n16 + s, &scores, sizeof scores);
    }
  }
  for (; s < n; ++s) {
    f32x8 a[N];
    lanes(s, a, 1);
    for (int r = 0; r < N; ++r) p[r * n16 + s] = sum8(a[r]) * scale;
  }
}
#endif

// out_r += w_r * v for the rows of a tile (w: one weight per row, v: D values, out: kCols vectors a row)
template <int kCols, typename T>
inline void add_weighted(f32x16 (*out)[kCols], const float* w, int rows, const T* v, int64_t D) {
  for (int64_t d = 0; d < D; d += 16) {
    const f32x16 vd = load16(v + d);
    for (int r = 0; r < rows; ++r) out[r][d / 16] = fma16(splat16(w[r]), vd, out[r][d / 16]);
  }
}

// out += w * v for one row (D values), through 8-lane vectors where a 16-lane one has no register (the
// same fused multiply-add per lane: the same bits). With `scaled_store`, a tree's new tokens and every
// row's output on AVX2 no longer go through 16-lane vectors that GCC copies piece by piece: a tree of 8
// over 300 keys, Zen 3, 2 threads, taking turns, same bits: float32 104.9 -> 86.6 us, bf16 97.8 ->
// 85.7; over 30 keys 37.8 -> 27.4 and 46.6 -> 30.9
template <int kCols, typename T>
inline void add_weighted_row(f32x16 (&out)[kCols], float w, const T* v, int64_t D) {
#if defined(__AVX512F__)
  add_weighted(&out, &w, 1, v, D);
#else
  float* o = reinterpret_cast<float*>(out);
  const f32x8 wv = splat8(w);
  for (int64_t d = 0; d < D; d += 8) {
    const f32x8 y = fma8(wv, load8(v + d), load8(o + d));
    std::memcpy(o + d, &y, sizeof y);
  }
#endif
}

// dst = out * inv (D values), rounded to T as T(float) rounds
template <typename T>
inline void scaled_store(T* dst, const f32x16* out, float inv, int64_t D) {
  const float* o = reinterpret_cast<const float*>(out);
  for (int64_t d = 0; d < D; d += kLanes) store_lanes(dst + d, loadN(o + d) * splatN(inv));
}

// out_r = the sum over the prefix's keys s of w_rs v_s, in key order, for `rows` rows (weights: row r's
// at p + r * n16), where the head dim kD is known when compiling. The sums are locals indexed only by
// constants, 16 vectors at a time, so the compiler keeps them in registers; in an array indexed at run
// time (`add_weighted`'s) it stored and reloaded all of them at every key. The same fused multiply-adds
// in the same order: the same bits. A tree of 8 nodes over 400 keys, SmolLM2's 9 / 3 heads of 64, bf16,
// AMD EPYC (Zen 5), 2 threads, old and new code taking turns in one process: 55.3 -> 44.0 us (1200 keys:
// 145.7 -> 114.1; float32: 74.3 -> 57.2); one token 22.3 -> 17.0. A tile's last rows (a token has 3
// rows a KV head) go as few rows, not as a full tile of repeats.
#if defined(__AVX512F__)
template <int kD, int kRows, typename T>
inline void weigh_prefix_rows(f32x16 (*out)[kD / 16], const float* p, int64_t n16, int64_t len, const T* V) {
  constexpr int kCols = kD / 16;
  f32x16 sums[kRows][kCols] = {};
  for (int64_t s = 0; s < len; ++s) {
    f32x16 v[kCols];
    for (int c = 0; c < kCols; ++c) v[c] = load16(V + s * kD + 16 * c);
    for (int r = 0; r < kRows; ++r) {
      const f32x16 w = splat16(p[r * n16 + s]);
      for (int c = 0; c < kCols; ++c) sums[r][c] = fma16(w, v[c], sums[r][c]);
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < kCols; ++c) out[r][c] = sums[r][c];
}
#else
// The same without AVX-512: each row's sums as halves of 8 lanes, in registers, the same fused
// multiply-add per lane in the same order. A tree of 8 over 300 keys, SmolLM2's heads, float32, AMD
// EPYC (Zen 3, AVX2), 2 threads: the whole attention call took 719 us with 16-lane sums.
//
// Not inlined, here and below: inlined into attend_rows, GCC kept the sums in registers but also
// stored every one of them to the stack at every key (perf annotate), 8 stores a key, which bounded
// the loop. A tree of 8 over 300 keys, float32, Zen 3, one thread, taking turns: 337.8 -> 290.7 us.
template <int kD, int kRows, typename T>
__attribute__((noinline)) void weigh_prefix_rows(f32x16 (*out)[kD / 16], const float* p, int64_t n16, int64_t len, const T* V) {
  constexpr int kHalves = kD / 8;
  f32x8 sums[kRows][kHalves] = {};
  for (int64_t s = 0; s < len; ++s) {
    for (int r = 0; r < kRows; ++r) {
      const f32x8 w = splat8(p[r * n16 + s]);
      for (int c = 0; c < kHalves; ++c) sums[r][c] = fma8(w, load8(V + s * kD + 8 * c), sums[r][c]);
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < kHalves; ++c)
      std::memcpy(reinterpret_cast<float*>(out[r]) + 8 * c, &sums[r][c], sizeof sums[r][c]);
}

// Several rows (a tree's): 16 of the D columns at a time, every row's two halves of them in registers,
// so the rows share each value's loads (in bf16 its widening too), D / 16 passes over the prefix. The
// same fused multiply-add per lane in the same order: the same bits.
template <int kD, int kRows, typename T>
__attribute__((noinline)) void weigh_prefix_columns(f32x16 (*out)[kD / 16], const float* p, int64_t n16, int64_t len, const T* V) {
  for (int c = 0; c < kD / 16; ++c) {
    f32x8 lo[kRows] = {}, hi[kRows] = {};
    for (int64_t s = 0; s < len; ++s) {
      const f32x8 vl = load8(V + s * kD + 16 * c), vh = load8(V + s * kD + 16 * c + 8);
      for (int r = 0; r < kRows; ++r) {
        const f32x8 w = splat8(p[r * n16 + s]);
        lo[r] = fma8(w, vl, lo[r]);
        hi[r] = fma8(w, vh, hi[r]);
      }
    }
    for (int r = 0; r < kRows; ++r) {
      std::memcpy(reinterpret_cast<float*>(out[r]) + 16 * c, &lo[r], sizeof lo[r]);
      std::memcpy(reinterpret_cast<float*>(out[r]) + 16 * c + 8, &hi[r], sizeof hi[r]);
    }
  }
}
#endif

template <int kD, typename T>
inline void weigh_prefix(f32x16 (*out)[kD / 16], const float* p, int64_t n16, int rows, int64_t len, const T* V) {
#if defined(__AVX512F__)
  constexpr int kMost = kD <= 64 ? 4 : kD <= 128 ? 2 : 1;  // rows whose sums fill 16 of 32 registers
  int r = 0;
  for (; r + kMost <= rows; r += kMost) weigh_prefix_rows<kD, kMost>(out + r, p + r * n16, n16, len, V);
  switch (rows - r) {  // the rest: 0 .. kMost - 1 rows
    case 3: weigh_prefix_rows<kD, 3>(out + r, p + r * n16, n16, len, V); break;
    case 2: weigh_prefix_rows<kD, 2>(out + r, p + r * n16, n16, len, V); break;
    case 1: weigh_prefix_rows<kD, 1>(out + r, p + r * n16, n16, len, V); break;
    default: break;
  }
#else
  switch (rows) {  // a token's row alone (its sums of 64 lanes fill 8 of 16 registers), a tree's together
    case 4: weigh_prefix_columns<kD, 4>(out, p, n16, len, V); break;
    case 3: weigh_prefix_columns<kD, 3>(out, p, n16, len, V); break;
    case 2: weigh_prefix_columns<kD, 2>(out, p, n16, len, V); break;
    case 1: weigh_prefix_rows<kD, 1>(out, p, n16, len, V); break;
    default: break;
  }
#endif
}

#if defined(__AVX512BF16__)
// A bfloat16 cache's values weighed two keys at a time, in one instruction per 16 columns (vdpbf16ps:
// lane c += w_a v_a[c] + w_b v_b[c], the products of bfloat16s exact in float32), each weight rounded to
// bfloat16 first, as FlashAttention on a GPU rounds its probabilities before their product with V.
// Half the multiply-adds of float32 weights. The keys pair by their index in the row's list (0 with
// 1, 2 with 3, ...; the last one, if the count is odd, with a weight of 0 on a value of 0), whether
// they are the prefix's or the new tokens', so a tree node still gets its path's bits.
// SmolLM2's 9 / 3 heads of 64, 30 layers' caches, AMD EPYC (Zen 4), 2 threads, the old and new code
// taking turns in one process, us a layer: a tree of 8 over 300 keys 62.0 -> 52.2, 1000 keys 174.2 ->
// 147.9, 2000 keys 349.3 -> 282.9; one token 28.3 -> 24.8, 51.9 -> 49.1, 100.9 -> 97.8. Heads steps
// (`dynamic-cpu-bf16`), 0.976x the time a token with contexts up to 500 tokens, 0.938x up to 1500;
// plain steps 1.00x.
//
// Columns in the order vpunpck{l,h}wd leave them: the sums of value columns 8L .. 8L + 3 of 32 in
// 128-bit lane L of the first, 8L + 4 .. 8L + 7 in the second; `unpaired` puts them back.
alignas(64) const c10::BFloat16 kZeroValues[kMaxD] = {};  // the value a lone last key pairs with

template <int kD>
inline void interleave(const c10::BFloat16* a, const c10::BFloat16* b, __m512bh (&v)[kD / 16]) {
  for (int c = 0; c < kD / 32; ++c) {
    const __m512i x = _mm512_loadu_si512(a + 32 * c), y = _mm512_loadu_si512(b + 32 * c);
    v[2 * c] = (__m512bh)_mm512_unpacklo_epi16(x, y);
    v[2 * c + 1] = (__m512bh)_mm512_unpackhi_epi16(x, y);
  }
}

inline __m512bh weight_pair(const c10::BFloat16* w) {  // w[0] and w[1] in every 32-bit lane
  int32_t pair;
  std::memcpy(&pair, w, sizeof pair);
  return (__m512bh)_mm512_set1_epi32(pair);
}

inline c10::BFloat16 bf16_weight(float w) {  // rounded as the prefix's weights are (vcvtneps2bf16)
  const __m256bh h = _mm512_cvtneps_pbh(_mm512_set1_ps(w));
  c10::BFloat16 out;
  std::memcpy(&out, &h, sizeof out);
  return out;
}

// n float32 weights rounded as the prefix's are (`bf16_weight`), 16 at a time (past n, to the next 16)
inline void bf16_weights(const float* w, int64_t n, c10::BFloat16* out) {
  for (int64_t j = 0; j < n; j += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(w + j)));
}

// out[r] += the pairs of the prefix's keys 0 .. len_even for kRows rows (row r's bfloat16 weights at
// w + r * n16), in the columns' paired order
template <int kD, int kRows>
inline void weigh_prefix_pairs(f32x16 (*out)[kD / 16], const c10::BFloat16* w, int64_t n16, int64_t len_even,
                               const c10::BFloat16* V) {
  constexpr int kCols = kD / 16;
  __m512 sums[kRows][kCols];
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < kCols; ++c) sums[r][c] = (__m512)out[r][c];
  for (int64_t s = 0; s < len_even; s += 2) {
    __m512bh v[kCols];
    interleave<kD>(V + s * kD, V + (s + 1) * kD, v);
    for (int r = 0; r < kRows; ++r) {
      const __m512bh wp = weight_pair(w + r * n16 + s);
      for (int c = 0; c < kCols; ++c) sums[r][c] = _mm512_dpbf16_ps(sums[r][c], v[c], wp);
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < kCols; ++c) out[r][c] = (f32x16)sums[r][c];
}

template <int kD>
inline void weigh_pairs(f32x16 (*out)[kD / 16], const c10::BFloat16* w, int64_t n16, int rows, int64_t len_even,
                        const c10::BFloat16* V) {
  constexpr int kMost = kD <= 64 ? 4 : 2;  // rows whose sums fill 16 of 32 registers
  int r = 0;
  for (; r + kMost <= rows; r += kMost) weigh_prefix_pairs<kD, kMost>(out + r, w + r * n16, n16, len_even, V);
  switch (rows - r) {
    case 3: weigh_prefix_pairs<kD, 3>(out + r, w + r * n16, n16, len_even, V); break;
    case 2: weigh_prefix_pairs<kD, 2>(out + r, w + r * n16, n16, len_even, V); break;
    case 1: weigh_prefix_pairs<kD, 1>(out + r, w + r * n16, n16, len_even, V); break;
    default: break;
  }
}

// the sums in column order again: 16 columns from each (first, second) pair of paired sums
template <int kD>
inline void unpaired(f32x16 (&out)[kD / 16]) {
  const __m512i low = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i high = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int c = 0; c < kD / 16; c += 2) {
    const __m512 a = (__m512)out[c], b = (__m512)out[c + 1];
    out[c] = (f32x16)_mm512_permutex2var_ps(a, low, b);
    out[c + 1] = (f32x16)_mm512_permutex2var_ps(a, high, b);
  }
}

// One row's keys after the prefix's pairs (`weigh_pairs`), weighed two at a time: the prefix's last
// key if their count is odd, then the new tokens the row sees, then a weight of 0 on a value of 0 if
// one is left over
template <int kD>
struct RowPairs {
  c10::BFloat16 weight;  // the key that waits for the next one
  const c10::BFloat16* value = nullptr;

  void add(f32x16 (&out)[kD / 16], c10::BFloat16 w, const c10::BFloat16* v) {
    if (value == nullptr) {
      weight = w, value = v;
      return;
    }
    __m512bh values[kD / 16];
    interleave<kD>(value, v, values);
    const c10::BFloat16 both[2] = {weight, w};
    const __m512bh wp = weight_pair(both);
    for (int c = 0; c < kD / 16; ++c) out[c] = (f32x16)_mm512_dpbf16_ps((__m512)out[c], values[c], wp);
    value = nullptr;
  }

  void finish(f32x16 (&out)[kD / 16]) {
    if (value != nullptr) add(out, c10::BFloat16(0.0f), kZeroValues);
    unpaired<kD>(out);
  }
};

#endif

// The softmax's weights of R rows' scores (row i's at scores + i * n16: the prefix's len keys, then the
// Tn new tokens', of which its token token(i) sees those sees(t, j) says): most[i], the largest score
// the row sees; e^(score - most) in place over the prefix (lanes past it hidden: 0), 16 at a time; and
// lane_sums[i], the prefix's weights summed in 16 lanes by list index. The new tokens' weights are
// taken one by one where they are weighed, each into lane (its list index) % 16.
template <typename Token, typename Sees>
void prefix_weights(float* scores, int64_t R, int64_t n16, int64_t len, int64_t Tn, Token token, Sees sees,
                    float* most, f32x16* lane_sums) {
  const int64_t len16 = len / 16 * 16;
  for (int64_t i = 0; i < R; ++i) {
    const int64_t t = token(i);
    float* p = scores + i * n16;
    f32xN lanes = splatN(-std::numeric_limits<float>::infinity());
    for (int64_t s = 0; s + kLanes <= len; s += kLanes) {
      const f32xN v = loadN(p + s);
      lanes = v > lanes ? v : lanes;
    }
    float m = lanes[0];
    for (int j = 1; j < kLanes; ++j) m = std::max(m, lanes[j]);
    for (int64_t s = len / kLanes * kLanes; s < len; ++s) m = std::max(m, p[s]);
    for (int64_t j = 0; j < Tn; ++j)
      if (sees(t, j)) m = std::max(m, p[len + j]);
    most[i] = m;
    Sum16 sums;  // in registers on either kind of CPU: cpu_vectors.h
    for (int64_t s = 0; s < len16; s += 16) {
      for (int j = 0; j < 16 / kLanes; ++j) {
        const f32xN e = exp_lanes(loadN(p + s + j * kLanes) - m);
        store_lanes(p + s + j * kLanes, e);
        sums.part[j] += e;
      }
    }
    if (len16 < len) {
      float e[16];
      for (int j = 0; j < 16 / kLanes; ++j) store_lanes(e + j * kLanes, exp_lanes(loadN(p + len16 + j * kLanes) - m));
      std::fill(e + (len - len16), e + 16, 0.0f);
      std::memcpy(p + len16, e, (len - len16) * sizeof(float));  // the new tokens' scores are kept
      sums.add(e, [](f32xN v) { return v; });
    }
    std::memcpy(&lane_sums[i], sums.part, sizeof lane_sums[i]);
  }
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
// Attention with AMX tiles (Intel Xeon from Sapphire Rapids on), bfloat16, head dim 64 or 128. A tile
// instruction multiplies 16 rows by 16 columns over 16 pairs; in the AVX-512 loops below, a tree's
// scores and weighted values were ~80% of the call (perf, a tree of 8 over 300 keys). Each query row's
// result still depends only on the keys it sees, in list order, so a tree node keeps its token's bits:
//   - scores: 16 keys as they lie in the cache (a tile's rows) against the task's queries, copied once
//     into the pairs the other operand wants, then transposed to a row's; a score is its key's and
//     its row's alone, whatever shares the tile (the last keys from a copy padded with zero keys: past
//     them is another slot, or the cache's end);
//   - the softmax as the AVX-512 loops take it (`prefix_weights`);
//   - the values: a row's list of keys in chunks of 32 list positions from the first, its weights
//     (bf16, rounded as `weigh_pairs` rounds them) one tile's row, the chunk's values paired as
//     `interleave` pairs them the other tile; a row's sums run through its chunks in order. The chunks
//     inside the prefix are every row's; the rest (the prefix's last < 32 keys, then the new tokens the
//     row sees, padded with zero values) are its token's own, gathered per token, the task's other
//     rows weighing them by 0. So a node's chunks hold what the same token's hold decoded alone after
//     its ancestors.
// A task is a few new tokens' rows of one KV head (every query head of the group), at most 16.
//
// SmolLM2's 9 / 3 heads of 64, 30 layers' caches, Intel Xeon with AMX, 2 threads, ms for the 30 layers,
// the AVX-512 loops then these (one script, run on each build in turn): a tree of 8 nodes over 300 keys
// 1.457 -> 0.893, over 1000 keys 4.177 -> 1.922; one token 0.415 -> 0.445 and 0.973 -> 0.929 (its 3
// rows a KV head are a task either way, and a tile's fixed work is not shared among tasks). Weighing the
// values by (w, 0) and (0, w) pairs against their rows as the cache holds them (no pairing, twice the
// tile products) was as fast over 300 keys and slower over 1000 (a tree of 8: 2.40 ms).
constexpr int kAmxTileRows = 16;
constexpr int kAmxMostNew = 64;  // new tokens a call may have for the tiles (`CPU_ATTENTION_MAX_NEW`)
constexpr int kOwnMost = 32 + kAmxMostNew;  // a token's own positions: the prefix's last < 32, then its new tokens

// r transposed in place (16 x 16 float32): four rounds, each swapping the off-diagonal s x s blocks of
// every 2s x 2s block
template <int s>
inline void swap_blocks(__m512 (&r)[16]) {
  alignas(64) static const int32_t low[16] = {
      0 & s ? 16 + 0 - s : 0, 1 & s ? 16 + 1 - s : 1, 2 & s ? 16 + 2 - s : 2, 3 & s ? 16 + 3 - s : 3,
      4 & s ? 16 + 4 - s : 4, 5 & s ? 16 + 5 - s : 5, 6 & s ? 16 + 6 - s : 6, 7 & s ? 16 + 7 - s : 7,
      8 & s ? 16 + 8 - s : 8, 9 & s ? 16 + 9 - s : 9, 10 & s ? 16 + 10 - s : 10, 11 & s ? 16 + 11 - s : 11,
      12 & s ? 16 + 12 - s : 12, 13 & s ? 16 + 13 - s : 13, 14 & s ? 16 + 14 - s : 14, 15 & s ? 16 + 15 - s : 15};
  alignas(64) static const int32_t high[16] = {
      0 & s ? 16 + 0 : 0 + s, 1 & s ? 16 + 1 : 1 + s, 2 & s ? 16 + 2 : 2 + s, 3 & s ? 16 + 3 : 3 + s,
      4 & s ? 16 + 4 : 4 + s, 5 & s ? 16 + 5 : 5 + s, 6 & s ? 16 + 6 : 6 + s, 7 & s ? 16 + 7 : 7 + s,
      8 & s ? 16 + 8 : 8 + s, 9 & s ? 16 + 9 : 9 + s, 10 & s ? 16 + 10 : 10 + s, 11 & s ? 16 + 11 : 11 + s,
      12 & s ? 16 + 12 : 12 + s, 13 & s ? 16 + 13 : 13 + s, 14 & s ? 16 + 14 : 14 + s, 15 & s ? 16 + 15 : 15 + s};
  const __m512i lo = _mm512_load_si512(low), hi = _mm512_load_si512(high);
  for (int i = 0; i < 16; ++i) {
    if (i & s) continue;
    const __m512 a = r[i], b = r[i + s];
    r[i] = _mm512_permutex2var_ps(a, lo, b);
    r[i + s] = _mm512_permutex2var_ps(a, hi, b);
  }
}

// scores[i * n16 + s0 + j] = sums[j][i] * scale for the R rows i and 16 keys j: a few rows (a token's)
// gathered from their columns, more (a tree's) by transposing all 16
inline void store_transposed(const float (*sums)[16], int64_t R, float scale, float* scores, int64_t n16, int64_t s0) {
  if (R <= 4) {
    const __m512i column = _mm512_setr_epi32(0, 16, 32, 48, 64, 80, 96, 112, 128, 144, 160, 176, 192, 208, 224, 240);
    for (int64_t i = 0; i < R; ++i)
      _mm512_storeu_ps(scores + i * n16 + s0,
                       _mm512_mul_ps(_mm512_i32gather_ps(column, &sums[0][i], 4), _mm512_set1_ps(scale)));
    return;
  }
  __m512 r[16];
  for (int j = 0; j < 16; ++j) r[j] = _mm512_load_ps(sums[j]);
  swap_blocks<8>(r);
  swap_blocks<4>(r);
  swap_blocks<2>(r);
  swap_blocks<1>(r);
  for (int64_t i = 0; i < R; ++i) _mm512_storeu_ps(scores + i * n16 + s0, _mm512_mul_ps(r[i], _mm512_set1_ps(scale)));
}

// The tiles of the scores (a tile's number must be a literal, hence the macros): head dim 64, the
// queries' pairs in tiles 6 and 7, loaded once a task, 4 chunks of 16 keys at a time, their sums in
// tiles 0-3, their keys through 4 and 5; head dim 128, the queries in 4-7, 2 chunks, sums 0-1, keys 2-3
template <int kD>
constexpr int kScoreSums = kD == 64 ? 4 : 2;

#define MEDUSA_SCORE64(sum, keys, k)          \
  _tile_zero(sum);                            \
  _tile_loadd(keys, k, 128);                  \
  _tile_dpbf16ps(sum, keys, 6);               \
  _tile_loadd(keys, (k) + 32, 128);           \
  _tile_dpbf16ps(sum, keys, 7)
#define MEDUSA_SCORE128(sum, keys, k)         \
  _tile_zero(sum);                            \
  _tile_loadd(keys, k, 256);                  \
  _tile_dpbf16ps(sum, keys, 4);               \
  _tile_loadd(keys, (k) + 32, 256);           \
  _tile_dpbf16ps(sum, keys, 5);               \
  _tile_loadd(keys, (k) + 64, 256);           \
  _tile_dpbf16ps(sum, keys, 6);               \
  _tile_loadd(keys, (k) + 96, 256);           \
  _tile_dpbf16ps(sum, keys, 7)

// the scores of 16 kScoreSums<kD> whole keys from k (the caller pads the last) into sums [key][row]
template <int kD>
inline void score_round(const c10::BFloat16* k, float (*sums)[16]) {
  if constexpr (kD == 64) {
    MEDUSA_SCORE64(0, 4, k);
    MEDUSA_SCORE64(1, 5, k + 16 * kD);
    MEDUSA_SCORE64(2, 4, k + 32 * kD);
    MEDUSA_SCORE64(3, 5, k + 48 * kD);
    _tile_stored(0, sums[0], 64);
    _tile_stored(1, sums[16], 64);
    _tile_stored(2, sums[32], 64);
    _tile_stored(3, sums[48], 64);
  } else {
    MEDUSA_SCORE128(0, 2, k);
    MEDUSA_SCORE128(1, 3, k + 16 * kD);
    _tile_stored(0, sums[0], 64);
    _tile_stored(1, sums[16], 64);
  }
}
#undef MEDUSA_SCORE64
#undef MEDUSA_SCORE128

template <int kD>
inline void load_queries(const int32_t (*pairs)[16][16]) {
  if constexpr (kD == 64) {
    _tile_loadd(6, pairs[0], 64);
    _tile_loadd(7, pairs[1], 64);
  } else {
    _tile_loadd(4, pairs[0], 64);
    _tile_loadd(5, pairs[1], 64);
    _tile_loadd(6, pairs[2], 64);
    _tile_loadd(7, pairs[3], 64);
  }
}

// A chunk's 32 values (rows: 32 of D values from `rows`) paired for the tiles of columns [64 pass,
// 64 pass + 64): tiles[j][k] = `interleave`'s vector 4 pass + j of rows 2k and 2k + 1
template <int kD>
inline void paired_values(const c10::BFloat16* rows, int pass, c10::BFloat16 (*tiles)[16][32]) {
  for (int k = 0; k < 16; ++k) {
    __m512bh v[4];
    interleave<64>(rows + 2 * k * kD + 64 * pass, rows + (2 * k + 1) * kD + 64 * pass, v);
    for (int j = 0; j < 4; ++j) _mm512_store_si512(tiles[j][k], (__m512i)v[j]);
  }
}

// The values' tiles, 64 columns a pass: sums 0-3 (`interleave`'s vectors 4 pass .. 4 pass + 3), a
// chunk's weights 4, its paired values through 5
inline void weigh_chunk(const c10::BFloat16* w, int64_t ldw, const c10::BFloat16 (*tiles)[16][32]) {
  _tile_loadd(4, w, ldw * 2);
  _tile_loadd(5, tiles[0], 64);
  _tile_dpbf16ps(0, 4, 5);
  _tile_loadd(5, tiles[1], 64);
  _tile_dpbf16ps(1, 4, 5);
  _tile_loadd(5, tiles[2], 64);
  _tile_dpbf16ps(2, 4, 5);
  _tile_loadd(5, tiles[3], 64);
  _tile_dpbf16ps(3, 4, 5);
}

struct AmxScratch {
  std::vector<float> scores;  // [16][n16]
  std::vector<c10::BFloat16> weights;  // [16][n16]: the prefix's in bf16
  std::vector<c10::BFloat16> own;  // [tokens][chunks][16][32]: each token's own chunks' weights
  std::vector<c10::BFloat16> values;  // [tokens][chunks * 32][D]: their values
};

// Rows of the new tokens [t0, t1) of sequence b's KV head h: row i is token t0 + i / G, query head
// h * G + i % G
template <int kD>
void amx_attend_tokens(const AttentionOperands<c10::BFloat16>& a, int64_t b, int64_t h, int64_t t0, int64_t t1,
                       AmxScratch& s) {
  using bf16 = c10::BFloat16;
  const int64_t G = a.H / a.Hkv, Tn = a.T_new, R = (t1 - t0) * G;
  const int64_t len = a.lens[b], n = len + Tn, n16 = (n + 63) / 64 * 64;
  const int64_t slot = a.slots[b];
  const bf16* K = a.k + (slot * a.Hkv + h) * a.S_max * kD;  // [S_max, D]
  const bf16* V = a.v + (slot * a.Hkv + h) * a.S_max * kD;
  const bool* mask = a.mask == nullptr ? nullptr : a.mask + b * a.mask_stride_b;  // [T, T]
  auto sees = [&](int64_t t, int64_t j) { return mask == nullptr ? j <= t : mask[t * Tn + j]; };
  auto token = [&](int64_t i) { return t0 + i / G; };

  // the queries as pairs: pairs[c][k][i] = row i's bf16 pair k of its head dims 32c .. 32c + 31
  alignas(64) int32_t pairs[kD / 32][16][16] = {};
  for (int64_t i = 0; i < R; ++i) {
    const bf16* q = a.q + b * a.q_stride_b + (h * G + i % G) * a.q_stride_h + token(i) * a.q_stride_t;
    for (int c = 0; c < kD / 32; ++c)
      for (int k = 0; k < 16; ++k) std::memcpy(&pairs[c][k][i], q + 32 * c + 2 * k, sizeof(int32_t));
  }
  s.scores.resize(kAmxTileRows * n16);
  float* scores = s.scores.data();
  constexpr int kRound = 16 * kScoreSums<kD>;  // keys a round of tiles scores
  alignas(64) bf16 last[kRound * kD];
  alignas(64) float sums[kRound][16];  // [key][row]
  load_queries<kD>(pairs);
  for (int64_t s0 = 0; s0 < n; s0 += kRound) {
    const bf16* k = K + s0 * kD;
    if (n - s0 < kRound) {
      std::memset(static_cast<void*>(last), 0, sizeof last);
      std::memcpy(static_cast<void*>(last), k, (n - s0) * kD * sizeof(bf16));
      k = last;
    }
    score_round<kD>(k, sums);
    for (int64_t j = 0; j < kRound && s0 + j < n; j += 16) store_transposed(sums + j, R, a.scale, scores, n16, s0 + j);
  }

  f32x16 lane_sums[kAmxTileRows];
  float most[kAmxTileRows];
  prefix_weights(scores, R, n16, len, Tn, token, sees, most, lane_sums);

  // the prefix's whole chunks' weights in bf16 (rows past R: whatever, their sums are not read)
  const int64_t whole = len / 32, base = 32 * whole;
  s.weights.resize(kAmxTileRows * n16);
  for (int64_t i = 0; i < R; ++i) bf16_weights(scores + i * n16, base, s.weights.data() + i * n16);

  // each token's own chunks: the prefix past its whole chunks, then the new tokens it sees
  const int64_t tokens = t1 - t0, own_chunks = (len - base + Tn + 31) / 32;  // at most kOwnMost / 32
  // zeroed only where read (below), not whole: a chain of 16 zeroed ~50 KB a task. SmolLM2 bf16 forward
  // over 300 keys, Intel Xeon (AMX), taking turns in two runs: a new row cost 0.227 / 0.222 -> 0.193 /
  // 0.196 ms (8 rows 10.72 / 10.88 -> 10.61 / 10.59 ms, 1 row the same)
  s.own.resize(tokens * own_chunks * 16 * 32);
  s.values.resize(tokens * own_chunks * 32 * kD);
  int64_t chunks_of[kAmxTileRows];
  alignas(64) float w[kAmxTileRows][kOwnMost];  // a token's rows' weights at its own positions
  for (int64_t t = t0; t < t1; ++t) {
    bf16* own = s.own.data() + (t - t0) * own_chunks * 16 * 32;  // [own_chunks][16 rows][32]
    bf16* values = s.values.data() + (t - t0) * own_chunks * 32 * kD;  // [own_chunks * 32][D]
    const int64_t first = (t - t0) * G;  // its rows: first .. first + G - 1
    for (int64_t g = 0; g < G; ++g) {
      std::fill(w[g], w[g] + own_chunks * 32, 0.0f);
      std::memcpy(w[g], scores + (first + g) * n16 + base, (len - base) * sizeof(float));
    }
    std::memcpy(static_cast<void*>(values), V + base * kD, (len - base) * kD * sizeof(bf16));
    int64_t at = len - base;  // the token's own positions so far
    for (int64_t j = 0; j < Tn; ++j) {
      if (!sees(t, j)) continue;
      std::memcpy(static_cast<void*>(values + at * kD), V + (len + j) * kD, kD * sizeof(bf16));
      for (int64_t g = 0; g < G; ++g) {
        const int64_t i = first + g;
        w[g][at] = exp1(scores[i * n16 + len + j] - most[i]);
        lane_sums[i][(base + at) % 16] += w[g][at];
      }
      ++at;
    }
    chunks_of[t - t0] = (at + 31) / 32;
    // the chunks' values past the token's last position and the other rows' weights are 0: a value
    // left unset may be a NaN, which even a weight of 0 would carry into the sums
    std::memset(static_cast<void*>(values + at * kD), 0, (chunks_of[t - t0] * 32 - at) * kD * sizeof(bf16));
    std::memset(static_cast<void*>(own), 0, chunks_of[t - t0] * 16 * 32 * sizeof(bf16));
    for (int64_t c = 0; c < chunks_of[t - t0]; ++c)
      for (int64_t g = 0; g < G; ++g) bf16_weights(w[g] + 32 * c, 32, own + (c * 16 + first + g) * 32);
  }

  // the weighted values, 64 columns a pass
  alignas(64) bf16 tiles[4][16][32];
  alignas(64) float out[kAmxTileRows][kD];  // in `interleave`'s column order
  for (int pass = 0; pass < kD / 64; ++pass) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t c = 0; c < whole; ++c) {
      paired_values<kD>(V + 32 * c * kD, pass, tiles);
      weigh_chunk(s.weights.data() + 32 * c, n16, tiles);
    }
    for (int64_t t = 0; t < tokens; ++t)
      for (int64_t c = 0; c < chunks_of[t]; ++c) {
        paired_values<kD>(s.values.data() + (t * own_chunks + c) * 32 * kD, pass, tiles);
        weigh_chunk(s.own.data() + (t * own_chunks + c) * 16 * 32, 32, tiles);
      }
    const int64_t col = 64 * pass;
    _tile_stored(0, &out[0][col], kD * 4);
    _tile_stored(1, &out[0][col + 16], kD * 4);
    _tile_stored(2, &out[0][col + 32], kD * 4);
    _tile_stored(3, &out[0][col + 48], kD * 4);
  }
  for (int64_t i = 0; i < R; ++i) {
    f32x16 o[kD / 16];
    std::memcpy(o, out[i], sizeof o);
    unpaired<kD>(o);
    bf16* dst = a.out + ((b * Tn + token(i)) * a.H + h * G + i % G) * kD;
    scaled_store(dst, o, 1.0f / sum16(lane_sums[i]), kD);
  }
}
#endif

// Rows [r0, r1) of the G * T query rows of sequence b's KV head h (row r: query head h * G + r / T,
// new token r % T). scores: scratch. kD: the head dim where the caller knows it when compiling (the
// loops over it unrolled, a tile's outputs in registers), else 0. With it, fused multiply-adds and a
// vector max, and tasks of 4 rows instead of 8: a tree of 8 nodes over 400 keys, SmolLM2's 9 / 3 heads
// of 64, bf16, AMD EPYC (Zen 5), 2 threads, old and new code taking turns: 79.5 -> 60.3 us and 79.7
// -> 59.4 us (one token: 19.6 -> 16.3, 21.1 -> 18.0).
template <typename T, int kD>
void attend_rows(const AttentionOperands<T>& a, int64_t b, int64_t h, int64_t r0, int64_t r1, std::vector<float>& scores,
                 std::vector<c10::BFloat16>& paired) {
#if defined(__AVX512BF16__)
  constexpr bool kPaired = std::is_same_v<T, c10::BFloat16> && (kD == 64 || kD == 128);  // `weigh_pairs`
#else
  constexpr bool kPaired = false;
#endif
  const int64_t G = a.H / a.Hkv, Tn = a.T_new, D = kD ? kD : a.D, R = r1 - r0;
  const int64_t len = a.lens[b], n = len + Tn;
  const int64_t slot = a.slots[b];
  const T* K = a.k + (slot * a.Hkv + h) * a.S_max * D;  // [S_max, D]
  const T* V = a.v + (slot * a.Hkv + h) * a.S_max * D;
  const bool* mask = a.mask == nullptr ? nullptr : a.mask + b * a.mask_stride_b;  // [T, T]
  const int64_t n16 = (n + 15) / 16 * 16;
  scores.resize(R * n16);
  auto query = [&](int64_t r) { return a.q + b * a.q_stride_b + (h * G + r / Tn) * a.q_stride_h + (r % Tn) * a.q_stride_t; };
  auto sees = [&](int64_t t, int64_t j) { return mask == nullptr ? j <= t : mask[t * Tn + j]; };

  // every row's score against every key, the new ones too (the hidden ones are not used), scaled;
  // two rows at a time share each key's loads, 8 keys of each through one sum16x16 (lane by lane the
  // same sums): a tree of 8 over 400 keys 72.5 -> 62.5 us, head dim 128 88.3 -> 73.4 (bf16, AMD EPYC
  // (Zen 5), taking turns in one process)
#if !defined(__AVX512F__)
  for (int64_t i = 0; i < R; i += kScoreRows) {  // key by key, kScoreRows rows sharing each key's loads
    float q[kScoreRows][kMaxD];  // the queries widened once (exactly), not at every key
    const int rows = int(std::min<int64_t>(kScoreRows, R - i));
    for (int j = 0; j < rows; ++j)
      for (int64_t d = 0; d < D; ++d) q[j][d] = float(query(r0 + i + j)[d]);
    float* p = scores.data() + i * n16;
    switch (rows) {
      case 4: score_rows<4, kD>(q, K, D, n, a.scale, p, n16); break;
      case 3: score_rows<3, kD>(q, K, D, n, a.scale, p, n16); break;
      case 2: score_rows<2, kD>(q, K, D, n, a.scale, p, n16); break;
      default: score_rows<1, kD>(q, K, D, n, a.scale, p, n16); break;
    }
  }
#else
  int64_t i = 0;
  for (; i + 2 <= R; i += 2) {
    const T* q0 = query(r0 + i);
    const T* q1 = query(r0 + i + 1);
    float* p0 = scores.data() + i * n16;
    float* p1 = p0 + n16;
    int64_t s = 0;
    for (; s + 8 <= n; s += 8) {
      f32x16 lanes[16];
      for (int j = 0; j < 8; ++j) {
        lanes[j] = dot_lanes(q0, K + (s + j) * D, D);
        lanes[8 + j] = dot_lanes(q1, K + (s + j) * D, D);
      }
      const f32x16 sums = sum16x16(lanes) * a.scale;
      std::memcpy(p0 + s, &sums, sizeof sums / 2);
      std::memcpy(p1 + s, reinterpret_cast<const float*>(&sums) + 8, sizeof sums / 2);
    }
    for (; s < n; ++s) {
      p0[s] = sum16(dot_lanes(q0, K + s * D, D)) * a.scale;
      p1[s] = sum16(dot_lanes(q1, K + s * D, D)) * a.scale;
    }
  }
  for (; i < R; ++i) {
    const T* qr = query(r0 + i);
    float* p = scores.data() + i * n16;
    int64_t s = 0;
    for (; s + 16 <= n; s += 16) {
      f32x16 lanes[16];
      for (int j = 0; j < 16; ++j) lanes[j] = dot_lanes(qr, K + (s + j) * D, D);
      const f32x16 sums = sum16x16(lanes) * a.scale;
      std::memcpy(p + s, &sums, sizeof sums);
    }
    for (; s < n; ++s) p[s] = sum16(dot_lanes(qr, K + s * D, D)) * a.scale;
  }
#endif

  std::vector<f32x16> lane_sums(R);
  std::vector<float> most(R);
  prefix_weights(scores.data(), R, n16, len, Tn, [&](int64_t i) { return (r0 + i) % Tn; }, sees, most.data(),
                 lane_sums.data());
#if defined(__AVX512BF16__)
  if constexpr (kPaired) {  // the prefix's weights in bfloat16 (past it, lanes that nothing reads)
    paired.resize(R * n16);
    for (int64_t i = 0; i < R; ++i) bf16_weights(scores.data() + i * n16, len, paired.data() + i * n16);
  }
#endif

  // out = sum of weight x value in list order: the prefix for a tile of rows at once, then each
  // row's new tokens
  for (int64_t i0 = 0; i0 < R; i0 += kTile) {
    const int rows = int(std::min<int64_t>(kTile, R - i0));
    f32x16 out[kTile][(kD ? kD : kMaxD) / 16] = {};
    if constexpr (kPaired) {
#if defined(__AVX512BF16__)
      weigh_pairs<kD>(out, paired.data() + i0 * n16, n16, rows, len / 2 * 2, V);
#endif
    } else if constexpr (kD != 0) {
      weigh_prefix<kD>(out, scores.data() + i0 * n16, n16, rows, len, V);
    } else {
      float w[kTile] = {};  // rows past the last: weight 0, so the loop's length is known
      for (int64_t s = 0; s < len; ++s) {
        for (int r = 0; r < rows; ++r) w[r] = scores[(i0 + r) * n16 + s];
        add_weighted(out, w, kTile, V + s * D, D);
      }
    }
    for (int r = 0; r < rows; ++r) {
      const int64_t row = r0 + i0 + r, t = row % Tn;
      const float* p = scores.data() + (i0 + r) * n16;
      // the new tokens this row sees, in list order: each one's weight into the softmax's lanes, then
      // to `weigh` with its value
      auto new_keys = [&](auto&& weigh) {
        int64_t index = len;  // in the list of keys this row sees
        for (int64_t j = 0; j < Tn; ++j) {
          if (!sees(t, j)) continue;
          const float weight = exp1(p[len + j] - most[i0 + r]);
          lane_sums[i0 + r][index % 16] += weight;
          ++index;
          weigh(weight, V + (len + j) * D);
        }
      };
#if defined(__AVX512BF16__)
      if constexpr (kPaired) {
        RowPairs<kD> pairs;
        if (len % 2 == 1) pairs.add(out[r], paired[(i0 + r) * n16 + len - 1], V + (len - 1) * D);
        new_keys([&](float weight, const T* value) { pairs.add(out[r], bf16_weight(weight), value); });
        pairs.finish(out[r]);
      }
#endif
      if constexpr (!kPaired)
        new_keys([&](float weight, const T* value) { add_weighted_row(out[r], weight, value, D); });
      const float inv = 1.0f / sum16(lane_sums[i0 + r]);
      T* dst = a.out + ((b * Tn + t) * a.H + h * G + row / Tn) * D;
      scaled_store(dst, out[r], inv, D);
    }
  }
}

}  // namespace

namespace medusa_cpu {

template <typename T>
void attend_all(const AttentionOperands<T>& a, int64_t B) {
  const int64_t R = a.H / a.Hkv * a.T_new;  // query rows per KV head
#if defined(__AVX512F__)
  constexpr int64_t kTask = kTile;  // rows of a task: a tile, whose rows share each key's loads
#else
  // a token's: a row, so that its 3 rows a KV head are 9 tasks for two threads, not 3. Its attention
  // over 300 keys, bf16, Zen 3, 2 threads, taking turns: 31.1 -> 27.8 us with the query widened once
  // (score_rows' caller), -> 24.0 with this too (30.2 before both in that run; float32 27.3 -> 24.4).
  // A tree's: score_rows' rows, which share each key's loads (the tree's 24 rows a KV head: 18 tasks).
  const int64_t kTask = a.T_new == 1 ? 1 : kScoreRows;
#endif
  const int64_t tiles = (R + kTask - 1) / kTask;  // tasks of kTask rows: a tree's work splits among threads
  int64_t pairs = 0;  // query-key pairs of the whole call
  for (int64_t b = 0; b < B; ++b) pairs += a.Hkv * R * (a.lens[b] + a.T_new);
  // A second thread pays from ~1000 query-key pairs (a token over ~110 keys of SmolLM2's); then every
  // task may go to either, so that the two get halves (an 8-node tree: 18 tasks, 9 and 9). From 10000
  // pairs before: a token over 1100 keys 36.7 -> 24.8 us, over 300 keys 14.0 -> 11.7, a tree of 8
  // over 30 keys 29.6 -> 18.5 (bf16, AMD EPYC (Zen 5), taking turns in one process).
  const int64_t tasks = B * a.Hkv * tiles;
  const int64_t grain = pairs < 1000 ? tasks : 1;
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const int64_t G = a.H / a.Hkv;
    if ((a.D == 64 || a.D == 128) && G <= kAmxTileRows && a.T_new <= kAmxMostNew && amx_permitted()) {
      const int64_t most = kAmxTileRows / G;  // new tokens whose rows a tile holds
      const int64_t groups = (a.T_new + most - 1) / most, per = (a.T_new + groups - 1) / groups;
      const int64_t amx_tasks = B * a.Hkv * groups;
      at::parallel_for(0, amx_tasks, pairs < 1000 ? amx_tasks : 1, [&](int64_t begin, int64_t end) {
        const TileConfig config;
        _tile_loadconfig(&config);
        AmxScratch scratch;
        for (int64_t i = begin; i < end; ++i) {
          const int64_t group = i % groups, bh = i / groups;
          const int64_t t0 = group * per, t1 = std::min(a.T_new, t0 + per);
          if (t0 >= t1) continue;
          if (a.D == 64) amx_attend_tokens<64>(a, bh / a.Hkv, bh % a.Hkv, t0, t1, scratch);
          else amx_attend_tokens<128>(a, bh / a.Hkv, bh % a.Hkv, t0, t1, scratch);
        }
        _tile_release();
      });
      return;
    }
  }
#endif
  at::parallel_for(0, B * a.Hkv * tiles, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<c10::BFloat16> paired;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t tile = i % tiles, bh = i / tiles;
      const int64_t b = bh / a.Hkv, h = bh % a.Hkv, r0 = tile * kTask, r1 = std::min(R, r0 + kTask);
      if (a.D == 64) attend_rows<T, 64>(a, b, h, r0, r1, scores, paired);
      else if (a.D == 128) attend_rows<T, 128>(a, b, h, r0, r1, scores, paired);
      else attend_rows<T, 0>(a, b, h, r0, r1, scores, paired);
    }
  });
}

template void attend_all(const AttentionOperands<float>&, int64_t);
template void attend_all(const AttentionOperands<c10::BFloat16>&, int64_t);

at::Tensor checked_attention_operands(const char* op, int64_t B, int64_t H, int64_t T, int64_t D,
                                      const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slots,
                                      const at::Tensor& cache_lens, const std::optional<at::Tensor>& new_mask) {
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
              k_cache.sizes() == v_cache.sizes() && k_cache.scalar_type() == v_cache.scalar_type(),
              op, ": caches must be [N, Hkv, S_max, D], contiguous, of one dtype");
  const int64_t Hkv = k_cache.size(1), S_max = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == D && D % 16 == 0 && D <= kMaxD, op,
              ": head dim must match and be a multiple of 16, at most ", kMaxD);
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, op, ": query heads must be a multiple of KV heads");
  TORCH_CHECK(slots.scalar_type() == at::kLong && cache_lens.scalar_type() == at::kLong &&
              slots.is_contiguous() && cache_lens.is_contiguous() && slots.numel() == B && cache_lens.numel() == B,
              op, ": slots and cache_lens must be [B] int64");
  const int64_t* slot = slots.const_data_ptr<int64_t>();
  const int64_t* len = cache_lens.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(slot[b] >= 0 && slot[b] < k_cache.size(0) && len[b] >= 0 && len[b] + T <= S_max,
                op, ": sequence ", b, " is outside the cache");
  if (!new_mask.has_value()) return at::Tensor();
  const at::Tensor mask = new_mask->contiguous();
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() >= 2 && mask.size(-1) == T && mask.size(-2) == T &&
              (mask.dim() == 2 || (mask.dim() == 3 && mask.size(0) == B)),
              op, ": new_mask must be [T, T] or [B, T, T] bool");
  return mask;
}

}  // namespace medusa_cpu

namespace {

at::Tensor cpu_attend(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                      const at::Tensor& slots, const at::Tensor& cache_lens, const std::optional<at::Tensor>& new_mask) {
  TORCH_CHECK(q.dim() == 4 && q.stride(3) == 1, "cpu_attend: q must be [B, H, T, D] with D contiguous");
  const int64_t B = q.size(0), H = q.size(1), Tn = q.size(2), D = q.size(3);
  const at::Tensor mask = checked_attention_operands("cpu_attend", B, H, Tn, D, k_cache, v_cache, slots, cache_lens,
                                                     new_mask);
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type(), "cpu_attend: q and caches differ in dtype");
  const int64_t Hkv = k_cache.size(1), S_max = k_cache.size(2);
  const int64_t* slot_ptr = slots.const_data_ptr<int64_t>();
  const int64_t* len_ptr = cache_lens.const_data_ptr<int64_t>();
  const int64_t mask_stride_b = mask.defined() && mask.dim() == 3 ? Tn * Tn : 0;
  at::Tensor out = at::empty({B, Tn, H, D}, q.options());
  auto run = [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    AttentionOperands<T> a{q.const_data_ptr<T>(), q.stride(0), q.stride(1), q.stride(2),
                  k_cache.const_data_ptr<T>(), v_cache.const_data_ptr<T>(), slot_ptr, len_ptr,
                  mask.defined() ? mask.const_data_ptr<bool>() : nullptr, mask_stride_b,
                  out.mutable_data_ptr<T>(), H, Hkv, Tn, D, S_max, 1.0f / std::sqrt(float(D))};
    attend_all(a, B);
  };
  if (q.scalar_type() == at::kFloat) {
    run(static_cast<float*>(nullptr));
  } else {
    TORCH_CHECK(q.scalar_type() == at::kBFloat16, "cpu_attend: float32 or bfloat16 only");
    run(static_cast<c10::BFloat16*>(nullptr));
  }
  return out.transpose(1, 2);  // [B, H, T, D]
}

}  // namespace

TORCH_LIBRARY_IMPL(medusa, CPU, m) { m.impl("cpu_attend", &cpu_attend); }

