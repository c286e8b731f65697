// y = x W^T + b for a few rows x [M, K] on the CPU: the products of decoding, where W [N, K] is
// read once per step and the time is the time to read it. `runtime.cpu_kernels` builds this file
// for the machine it runs on and documents why it exists; `F.linear` is its reference.
//
// The kernel reads W in its own order (`block_weight`, a copy taken once): blocks of 16 rows, each
// one stream through memory, in which one vector holds the 16 rows' weights at the same k (a pair of
// k in bf16, which vdpbf16ps multiplies at once). So a vector of sums is 16 outputs, each lane its
// own: a row of x, broadcast one k (or pair) at a time, multiplies a whole block with no horizontal
// additions, and the outputs are stored 16 at a time. A tile of rows of x (up to 16 with AVX-512, 6
// or 8 without) goes through a block at once, each with its own vector of sums in a register; blocks
// split among threads.
//
// Before, a vector held 16 (or 32) k of one weight row, and each output was a horizontal sum of
// its lanes: with few k per row (SmolLM2's 576) those sums cost as much as the products from 8
// rows of x. All SmolLM2 products, bf16, 2 threads, AMD EPYC (Zen 5), taking turns in one process:
// 1 row 38.8 -> 40.8 GB/s, 8 rows 32.2 -> 38.9, 12 rows 25.8 -> 37.0, 16 rows 21.3 -> 34.4; float32
// (another run) 1 row 43.6 -> 45.5, 8 rows 33.7 -> 41.5. Blocks side by side (2, 3, 4 per task)
// were no faster on 1-8 rows, and 3 with 8 rows of x at a time slower from 12 rows (32.4 and 30.1
// GB/s on 12 and 16 rows).
//
// Each output element is one sum in a fixed order (over k, from the first), whatever M is and however
// the rows are split among threads: the same row gets the same bits alone or among others.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "cpu_kernels.h"
#include "cpu_vectors.h"  // f32x16, load16, store16, splat16, fma16

namespace {

using namespace medusa_cpu;

constexpr int kCols = 16;  // weight rows per block: the 16 lanes of one vector of outputs

// k elements of a weight row one lane multiplies per instruction: bf16 pairs where the CPU has
// vdpbf16ps (AVX-512 BF16), else one (widened to float32, a fused multiply-add)
template <typename T>
constexpr int64_t kPair = 1;
#if defined(__AVX512BF16__)
template <>
constexpr int64_t kPair<c10::BFloat16> = 2;
#endif

// A block of 16 weight rows in the kernel's order: for each of the K / kPair whole groups of k, the
// 16 rows' kPair elements ([K / kPair][16][kPair]: one vector, its rows in `slot_of`'s order), then
// the rows' last K % kPair ([16][K % kPair]). The N % 16 rows after the last block stay as they are.
template <typename T>
inline int64_t paired(int64_t K) {
  return K / kPair<T> * kPair<T>;
}

// Where weight row r of a block sits among the 16 of one k: in order, except for bf16 without AVX-512,
// where rows r and r + 8 share the 32 bits of lane r (r in the low half), so that one load, a shift and
// an and widen all 16 (`halves`), not two widening loads (vpmovzxwd) and two shifts, which share Zen 3's
// FMA pipes with the multiply-adds. The same sums, the same bits. AMD EPYC (Zen 3), 2 threads, taking
// turns in one process: one layer's products (in L3: the multiply-adds bound them) 6 rows 13.59 ->
// 12.72 ms, 8 rows 27.17 -> 23.95; all SmolLM2's (from memory) 1 row 13.55 -> 12.87, 12 rows 31.47 ->
// 30.45, 8 rows 23.19 -> 22.97.
template <typename T>
constexpr bool kInterleaved = false;
#if !defined(__AVX512F__)
template <>
constexpr bool kInterleaved<c10::BFloat16> = true;
#endif

template <typename T>
constexpr int64_t slot_of(int64_t r) {
  return kInterleaved<T> ? (r < 8 ? 2 * r : 2 * (r - 8) + 1) : r;
}

// The next block's lines are fetched into L2 (prefetcht1), not L1 (prefetcht0, `__builtin_prefetch`'s
// default): L1 holds the block being read and the hardware brings each line on from L2. On 8 rows
// the L1 prefetch made the products 1.5x slower than one row; into L2 they cost what one row does.
// SmolLM2's 30 layers of products, bf16, AMD EPYC (Zen 4, family 25), 2 threads, taking turns in one
// process, ms: 1 row 7.96 -> 7.92, 4 rows 8.88 -> 8.24, 8 rows 11.59 -> 7.88, 12 rows 12.15 ->
// 10.01, 16 rows 13.71 -> 12.99; float32, 8 rows 23.71 -> 17.14, 12 rows 26.04 -> 18.08. Fewer
// than 4 rows read faster with no prefetch at all (the hardware's alone), the same way: 1 row 8.44 ->
// 7.93 ms, 2 rows 8.09 -> 7.64; float32, 1 row 15.85 -> 14.40 (4 and 8 rows no slower with it).
template <typename T>
inline void prefetch_l2(const T* p) {
  __builtin_prefetch(p, 0, 2);
}

// One tile's share of the next block: at its k-th step a tile of T fetches the line at k / T of its
// share (a line T steps in a row: the 2nd to the T-th cost a load each and fetch nothing), so the T
// tiles of a block read the next block while all of them run, not only while the first does. All
// SmolLM2 products, Zen 3, 2 threads, taking turns, against the first tile fetching all of it: float32
// 12 rows 40.18 -> 31.00 ms, 16 rows 52.20 -> 41.26; bf16 8 rows 19.95 -> 18.00, 12 rows no change.
//
// Where nothing is fetched into L2 ahead (fewer than 4 rows, with AVX-512 on AMD: `reading`), a block's own
// lines are fetched kStreamAhead lines ahead of its reads with the non-temporal hint (prefetchnta: into L1,
// and not kept in L2 or L3 once evicted), so that the weights a token streams (269 MB in bf16) do not push
// out what the step reads again: the KV cache, the activations, the code of its other operations. Plain
// decoding, SmolLM2, AMD EPYC (Zen 4), steps with and without it taking turns in one process (blocks of 15),
// time with / without, five runs: bf16 0.95, 0.94, 0.92 where a step took ~8.3 ms (memory read fast, so the
// fixed costs weighed most) and 0.99, 0.97 where it took 10-11 ms; float32 0.97 and 0.94; prefetcht0 at the
// same distance 1.01. A tree's steps, with the L2 fetch of the next block too, were 1.09-1.10 with it, so
// they keep that alone.
constexpr int64_t kStreamAhead = 4;  // lines; 2 / 3 / 6 / 8 within the runs' noise of it, 16 slower (1.08)

struct NextBlock {
  const char* share;  // null: nothing to fetch
  int64_t bytes;  // on from `share` per step: the bytes a step of k reads / T
  const char* own;  // the block itself where it is streamed, else null
  int64_t own_bytes;  // on from `own` per step: the bytes a step of k reads
  void at(int64_t k) const {
    if (share != nullptr) prefetch_l2(share + k * bytes);
    if (own != nullptr) _mm_prefetch(own + k * own_bytes + kStreamAhead * 64, _MM_HINT_NTA);
  }
};

// A product's 16 outputs as stored: with a residual (the same layout as the output, at `at`), T(res + T(y)),
// as the layer adds the product it rounded to T (a residual connection fused into its product)
template <typename T>
inline f32x16 with_residual(f32x16 y, const T* res, int64_t at, const T* type) {
  return res == nullptr ? y : round16(y, type) + load16(res + at);
}

// acc[m] += x[m] . (the block's rows), lane r being row r, for MB rows of x (ldx apart); prefetches
// its share of the next block (`NextBlock`). Each lane is one sum over k in order: the same for any MB.
#if defined(__AVX512F__)
// rows of x through a block at once: 16 vectors of sums, of 32 registers (kTileRows: float32 on up
// to that many rows; kSplitRows: the rest, below)
constexpr int kTileRows = 16;
constexpr int kSplitRows = 16;

template <int MB, typename X, typename T>
void accumulate(const X* x, int64_t ldx, const T* w, int64_t K, NextBlock next, f32x16* acc) {
  for (int64_t k = 0; k < K; ++k) {
    const f32x16 wv = load16(w + k * kCols);
    next.at(k);
    for (int m = 0; m < MB; ++m) acc[m] = fma16(splat16(float(x[m * ldx + k])), wv, acc[m]);
  }
}
#else
// Without AVX-512 GCC has no register for a 16-lane vector and keeps each in memory, copied piece by
// piece at every use: the loop above read SmolLM2's float32 products at 4.3 GB/s on one row where
// MKL reads 18.2 (AMD EPYC, Zen 3, AVX2). So here each 16 lanes are summed as two halves of 8, in
// registers, the same fused multiply-add per lane and k in the same order.
//
// A tile has at most 6 rows of x: 12 vectors of sums, the weights' 2 and the broadcast x fit in 16
// registers, and the multiply-adds run near the core's rate (one thread, float32, blocks in L2, Zen 3:
// 84-92 GFLOP/s 6 rows at a time, 53 with 8, whose 16 sums spill; the peak is 95). All SmolLM2 bf16
// products, Zen 3, 2 threads, taking turns, tiles of at most 6 against one tile of up to 8 summed a
// half of the block at a time (8 sums in registers): 4 rows 24.56 -> 18.42 ms, 6 rows 24.36 -> 16.66,
// 8 rows (4 + 4) 19.46 -> 16.91, 16 rows (6 + 5 + 5) 55.80 -> 46.56. Only float32 on up to 8 rows
// stays one tile, sums spilled: its 36 KB block does not stay in L1 for a second tile (8 rows as
// 4 + 4, 35.96 -> 40.19 ms), and the products there take what reading the weights takes.
constexpr int kTileRows = 8;
constexpr int kSplitRows = 6;

// the 16 weights of one k in a block as two halves of 8 float32 lanes: rows 0-7 and 8-15
inline void halves(const float* w, f32x8& lo, f32x8& hi) {
  lo = load8(w);
  hi = load8(w + 8);
}

inline void halves(const c10::BFloat16* w, f32x8& lo, f32x8& hi) {  // interleaved: `slot_of`
  u32x8 both;
  std::memcpy(&both, w, sizeof both);
  lo = (f32x8)(both << 16);
  hi = (f32x8)(both & 0xFFFF0000u);
}

template <int MB, typename X, typename T>
void accumulate(const X* x, int64_t ldx, const T* w, int64_t K, NextBlock next, f32x16* acc) {
  f32x8 lo[MB], hi[MB];
  for (int m = 0; m < MB; ++m) {
    std::memcpy(&lo[m], &acc[m], sizeof lo[m]);
    std::memcpy(&hi[m], reinterpret_cast<const char*>(&acc[m]) + sizeof lo[m], sizeof hi[m]);
  }
  for (int64_t k = 0; k < K; ++k) {
    f32x8 wl, wh;
    halves(w + k * kCols, wl, wh);
    next.at(k);
    for (int m = 0; m < MB; ++m) {
      const f32x8 xv = splat8(float(x[m * ldx + k]));
      lo[m] = fma8(xv, wl, lo[m]);
      hi[m] = fma8(xv, wh, hi[m]);
    }
  }
  for (int m = 0; m < MB; ++m) {
    std::memcpy(&acc[m], &lo[m], sizeof lo[m]);
    std::memcpy(reinterpret_cast<char*>(&acc[m]) + sizeof lo[m], &hi[m], sizeof hi[m]);
  }
}
#endif

#if defined(__AVX512BF16__)
template <int MB>
void accumulate(const c10::BFloat16* x, int64_t ldx, const c10::BFloat16* w, int64_t K, NextBlock next,
                f32x16* acc) {
  const int64_t KP = paired<c10::BFloat16>(K);
  for (int64_t k = 0; k < KP; k += 2) {
    const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + k * kCols);
    next.at(k / 2);  // the k-th pair
    for (int m = 0; m < MB; ++m) {
      int32_t pair;  // x[m, k] and x[m, k + 1], in every lane
      std::memcpy(&pair, x + m * ldx + k, sizeof pair);
      acc[m] = (f32x16)_mm512_dpbf16_ps((__m512)acc[m], (__m512bh)_mm512_set1_epi32(pair), wv);
    }
  }
  if (KP < K) {  // the last k of an odd K: the 16 rows' elements, widened
    const f32x16 wv = load16(w + KP * kCols);
    for (int m = 0; m < MB; ++m) acc[m] = fma16(splat16(float(x[m * ldx + KP])), wv, acc[m]);
  }
}
#endif

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
// AMX (Intel Xeon from Sapphire Rapids on): one instruction multiplies 16 rows of x by a block's 16
// weight rows over 32 k, and the block's order is already the one its weights tile wants (16 k pairs
// of 16 rows). Each sum is the same for a row whatever rows share the tile (a row's sums read its own
// row of x alone), so rows stay invariant. The x rows go in tiles of 16, padded with zeros
// (`amx_rows`), so one tile shape serves every M and each thread sets the tiles once per product.
// The next block is fetched into L2 at every M (`NextBlock`), as the loops above do from 4 rows.
//
// All SmolLM2 products (121, from memory), bf16, 2 threads, Intel Xeon with AMX, ms on 1 / 2 / 4 / 8
// / 16 / 32 / 64 rows, the kernel before (AVX-512 BF16) and with AMX in two runs of one script, each
// beside oneDNN's AMX products: before 14.63 / 22.81 / 11.29 / 14.17 / 21.66 / 39.89 / 79.80 (oneDNN
// 14.40 / 14.61 / 13.95 / 14.07 / 14.74 / 18.65 / 21.77); with AMX 12.78 / 12.77 / 12.98 / 13.25 /
// 13.16 / 18.79 / 25.30 (oneDNN 14.40 / 14.61 / 14.48 / 14.62 / 14.53 / 18.80 / 21.26). So the load
// now takes ours to 32 rows there (`runtime.llama.measure_own_kernel_rows`; before: none, oneDNN for
// every product), and with it our one-call layers and the bits a row gets alone: issue 18's command
// (40 dev prompts, bf16), plain 54.8 -> 81.5 tok/s, heads 101.3 -> 149.7, the draft layer 98.2 ->
// 134.4 with exact_match 0.275 -> 1.0 (memory read at 33.5 and 32.1 GB/s).
//
constexpr int kAmxRows = 16;  // rows of x a tile holds
constexpr int64_t kAmxK = 32;  // k one tile multiplies (16 pairs)

// A panel: up to 4 blocks of weights against the M rows of x (padded to whole tiles of zero rows, ldx = K),
// one sum tile per block (tiles 0-3), each tile of x (tile 4) loaded once per chunk of 32 k and
// multiplied by each block's weights (tiles 5 and 6 in turn; `TileConfig`: every tile 16 rows of 64
// bytes). The k past the last whole tile (K % 32) are added after the tiles' sums, as `accumulate` adds
// them. Each sum is the same tile instructions in the same order of k whatever the panel and M: a row
// gets the same bits alone or among others.
//
// A step's few rows take one block at a time; a prompt's chunk (more than a tile of rows) panels of 4.
// One block at a time loaded each tile of x again for every block, and x's tiles come from L2 (32 rows
// of 576 are 36 KB), so each tile of rows past the first cost about as much as reading the weights: all
// SmolLM2 products, bf16, 2 threads, Intel Xeon (AMX), 16 rows 10.15 ms, 32 rows 14.62, 64 rows 20.26.
// In panels (another run, 1 row 10.72 ms): 16 rows 10.83, 32 rows 11.47, 64 rows 15.90, 96 rows 19.63;
// the load now takes ours to 64 rows (oneDNN 25.40 there), so a prompt goes in pieces of 64, not 32: 40
// dev prompts' prefills (and first token), the two builds taking turns twice, 52.2 / 50.3 -> 38.5 / 38.0
// ms mean (median 35.1 / 33.6 -> 23.6 / 23.3).
// (GCC's tile intrinsics take a tile's number as written, hence the lines per block.)
template <int NB>
inline void panel_products(const c10::BFloat16* const* w, int64_t at) {
  constexpr int64_t ld = kCols * 2 * int64_t(sizeof(c10::BFloat16));
  _tile_loadd(5, w[0] + at, ld);
  _tile_dpbf16ps(0, 4, 5);
  if constexpr (NB > 1) { _tile_loadd(6, w[1] + at, ld); _tile_dpbf16ps(1, 4, 6); }
  if constexpr (NB > 2) { _tile_loadd(5, w[2] + at, ld); _tile_dpbf16ps(2, 4, 5); }
  if constexpr (NB > 3) { _tile_loadd(6, w[3] + at, ld); _tile_dpbf16ps(3, 4, 6); }
}

template <int NB>
inline void panel_zero() {
  _tile_zero(0);
  if constexpr (NB > 1) _tile_zero(1);
  if constexpr (NB > 2) _tile_zero(2);
  if constexpr (NB > 3) _tile_zero(3);
}

template <int NB>
inline void panel_store(float (*sums)[kAmxRows][kCols]) {
  constexpr int64_t ld = kCols * int64_t(sizeof(float));
  _tile_stored(0, sums[0], ld);
  if constexpr (NB > 1) _tile_stored(1, sums[1], ld);
  if constexpr (NB > 2) _tile_stored(2, sums[2], ld);
  if constexpr (NB > 3) _tile_stored(3, sums[3], ld);
}

// out[b][m, r] = x[m] . w[b][r] + bias[b][r] (+ res[b]) for the NB blocks w[b] (bias[b], res[b] null or
// at the block's first output); next[b]: a block fetched into L2 while the first tile of rows runs, or null
template <int NB>
void amx_panel(const c10::BFloat16* x, int64_t M, const c10::BFloat16* const* w, int64_t K,
               const c10::BFloat16* const* bias, const c10::BFloat16* const* next, c10::BFloat16* const* out,
               int64_t ldo, const c10::BFloat16* const* res) {
  using bf16 = c10::BFloat16;
  const int64_t chunks = K / kAmxK, done = chunks * kAmxK;
  alignas(64) float sums[NB][kAmxRows][kCols];
  for (int64_t m0 = 0; m0 < M; m0 += kAmxRows) {
    const bf16* xg = x + m0 * K;
    panel_zero<NB>();
    for (int64_t c = 0; c < chunks; ++c) {
      if (m0 == 0)
        for (int b = 0; b < NB; ++b)
          if (next[b] != nullptr)
            for (int64_t j = 0; j < kAmxK / 2; ++j) prefetch_l2(next[b] + (c * kAmxK / 2 + j) * 2 * kCols);
      _tile_loadd(4, xg + c * kAmxK, K * int64_t(sizeof(bf16)));
      panel_products<NB>(w, c * kAmxK * kCols);
    }
    panel_store<NB>(sums);
    const int64_t rows = std::min<int64_t>(kAmxRows, M - m0);
    for (int b = 0; b < NB; ++b)
      for (int64_t m = 0; m < rows; ++m) {
        f32x16 acc = load16(sums[b][m]);
        accumulate<1>(xg + m * K + done, K, w[b] + done * kCols, K - done, NextBlock{nullptr, 0, nullptr, 0}, &acc);
        const int64_t at = (m0 + m) * ldo;
        store16(out[b] + at, with_residual(bias[b] == nullptr ? acc : acc + load16(bias[b]), res[b], at, out[b]));
      }
  }
}

// amx_panel for nb (1 to 4) blocks
inline void amx_panel_of(int nb, const c10::BFloat16* x, int64_t M, const c10::BFloat16* const* w, int64_t K,
                         const c10::BFloat16* const* bias, const c10::BFloat16* const* next,
                         c10::BFloat16* const* out, int64_t ldo, const c10::BFloat16* const* res) {
  switch (nb) {
    case 4: amx_panel<4>(x, M, w, K, bias, next, out, ldo, res); break;
    case 3: amx_panel<3>(x, M, w, K, bias, next, out, ldo, res); break;
    case 2: amx_panel<2>(x, M, w, K, bias, next, out, ldo, res); break;
    default: amx_panel<1>(x, M, w, K, bias, next, out, ldo, res); break;
  }
}
constexpr int kPanel = 4;  // blocks a panel takes at most (its sums in tiles 0-3)

// x [M, K] as `amx_panel` reads it: whole tiles of rows, the last padded with zero rows
std::vector<c10::BFloat16> amx_rows(const c10::BFloat16* x, int64_t M, int64_t K) {
  std::vector<c10::BFloat16> padded((M + kAmxRows - 1) / kAmxRows * kAmxRows * K, c10::BFloat16(0.0f));
  std::memcpy(padded.data(), x, M * K * sizeof(c10::BFloat16));
  return padded;
}
#endif

// The whole blocks of a product through AMX tiles (`amx_panel`), where they are bf16 and the CPU lets
// this process use them: true if done, else false and nothing done
template <typename X, typename T>
bool amx_products(const X*, int64_t, const T*, int64_t, int64_t, int64_t, const T*, T*, int64_t, const T*) {
  return false;
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
template <>
bool amx_products(const c10::BFloat16* x, int64_t M, const c10::BFloat16* w, int64_t blocks, int64_t K, int64_t grain,
                  const c10::BFloat16* bias, c10::BFloat16* out, int64_t N, const c10::BFloat16* res) {
  using bf16 = c10::BFloat16;
  if (!amx_permitted()) return false;
  const std::vector<bf16> xp = amx_rows(x, M, K);
  const int64_t block = kCols * K;
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    const TileConfig config;
    _tile_loadconfig(&config);
    const int64_t panel = M > kAmxRows ? kPanel : 1;  // blocks a panel takes
    for (int64_t i = begin; i < end; i += panel) {
      const int nb = int(std::min<int64_t>(panel, end - i));
      const bf16 *ws[kPanel], *bs[kPanel], *nx[kPanel], *rs[kPanel];
      bf16* os[kPanel];
      for (int b = 0; b < nb; ++b) {
        const int64_t j = i + b;
        ws[b] = w + j * block, bs[b] = bias == nullptr ? nullptr : bias + j * kCols;
        nx[b] = j + panel < end ? w + (j + panel) * block : nullptr;
        os[b] = out + j * kCols, rs[b] = res == nullptr ? nullptr : res + j * kCols;
      }
      amx_panel_of(nb, xp.data(), M, ws, K, bs, nx, os, N, rs);
    }
    _tile_release();
  });
  return true;
}
#endif

// out[m, r] = x[m] . w[r] + bias[r] for m < MB and the block's 16 rows r
template <int MB, typename X, typename T>
void product_tile(const X* x, int64_t K, const T* w, const T* bias, NextBlock next, T* out, int64_t ldo, const T* res) {
  f32x16 acc[MB] = {};
  accumulate<MB>(x, K, w, K, next, acc);
  for (int m = 0; m < MB; ++m)
    store16(out + m * ldo, with_residual(bias == nullptr ? acc[m] : acc[m] + load16(bias), res, m * ldo, out));
}

// A block against the M rows of x, in tiles of rows: the 16 sums of each in registers
template <typename X, typename T>
void product_block(const X* x, int64_t M, const T* w, int64_t K, const T* bias, const T* next, bool streamed, T* out,
                   int64_t ldo, const T* res) {
  const int64_t most = std::is_same_v<T, float> && M <= kTileRows ? kTileRows : kSplitRows;  // rows a tile
  const int tiles = int((M + most - 1) / most);
  const int64_t step = kCols * kPair<T> * int64_t(sizeof(T)), steps = (K + kPair<T> - 1) / kPair<T>;
  const int64_t share = (steps + tiles - 1) / tiles * step;  // bytes of the next block a tile fetches
  for (int64_t tile = 0, m = 0, rows = 0; tile < tiles; ++tile, m += rows) {
    rows = (M - m + (tiles - tile) - 1) / (tiles - tile);  // the rows left, evenly over the tiles left
    const NextBlock pf{next == nullptr ? nullptr : reinterpret_cast<const char*>(next) + tile * share, step / tiles,
                       streamed ? reinterpret_cast<const char*>(w) : nullptr, step};
    const X* xm = x + m * K;
    T* o = out + m * ldo;
    const T* r = res == nullptr ? nullptr : res + m * ldo;
    switch (rows) {
      case 16: product_tile<16>(xm, K, w, bias, pf, o, ldo, r); break;
      case 15: product_tile<15>(xm, K, w, bias, pf, o, ldo, r); break;
      case 14: product_tile<14>(xm, K, w, bias, pf, o, ldo, r); break;
      case 13: product_tile<13>(xm, K, w, bias, pf, o, ldo, r); break;
      case 12: product_tile<12>(xm, K, w, bias, pf, o, ldo, r); break;
      case 11: product_tile<11>(xm, K, w, bias, pf, o, ldo, r); break;
      case 10: product_tile<10>(xm, K, w, bias, pf, o, ldo, r); break;
      case 9: product_tile<9>(xm, K, w, bias, pf, o, ldo, r); break;
      case 8: product_tile<8>(xm, K, w, bias, pf, o, ldo, r); break;
      case 7: product_tile<7>(xm, K, w, bias, pf, o, ldo, r); break;
      case 6: product_tile<6>(xm, K, w, bias, pf, o, ldo, r); break;
      case 5: product_tile<5>(xm, K, w, bias, pf, o, ldo, r); break;
      case 4: product_tile<4>(xm, K, w, bias, pf, o, ldo, r); break;
      case 3: product_tile<3>(xm, K, w, bias, pf, o, ldo, r); break;
      case 2: product_tile<2>(xm, K, w, bias, pf, o, ldo, r); break;
      default: product_tile<1>(xm, K, w, bias, pf, o, ldo, r); break;
    }
  }
}

// A weight row after the last whole block, as it is: one sum over k in order
template <typename X, typename T>
void product_row(const X* x, int64_t M, const T* w, int64_t K, const T* bias, T* out, int64_t ldo, const T* res) {
  for (int64_t m = 0; m < M; ++m) {
    float s = 0.0f;
    for (int64_t k = 0; k < K; ++k) s += float(x[m * K + k]) * float(w[k]);
    const T y(bias == nullptr ? s : s + float(*bias));
    out[m * ldo] = res == nullptr ? y : T(float(res[m * ldo]) + float(y));
  }
}

// How a thread's tasks read their weights: whether each fetches the next task's into L2 (`prefetch_l2`),
// else streams its own (`NextBlock`: non-temporal, a few lines ahead); and the fewest tasks a thread
// takes. Threads share a product only where each gets 64 KiB of weights or more (all of SmolLM2's): a
// tiny one is done before a second thread would have started. Fewer rows read faster on the
// hardware's prefetch alone, except bf16 without AVX-512: all SmolLM2 bf16 products on one row, Zen 3,
// 2 threads, taking turns, 11.81 -> 10.46 ms with it (float32 22.74 -> 25.11). Streaming was not
// measured without AVX-512.
struct Reading {
  bool prefetch, streamed;
  int64_t grain;
};

template <typename T>
Reading reading(int64_t M, int64_t task_elements) {
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, task_elements * int64_t(sizeof(T))));
#if defined(__AVX512F__) && defined(__AMX_TILE__)
  // An Intel Xeon (AMX): the stream of a few rows read at half the rate it reads on AMD, so every M takes
  // the next block into L2. All SmolLM2 products, float32 (bf16 goes through the tiles), 2 threads, one
  // script, ours / oneDNN ms: streamed 1 row 28.68 / 16.65; fetched into L2 1 row 16.63 / 16.87, 2 rows
  // 16.02 / 17.49, 4 rows 17.35 / 28.83; with no prefetch below 4 rows 17.72 / 16.72, 2 rows 21.07 / 17.95.
  // With the stream the load measured ours slower than oneDNN on one row and left it no size in float32.
  return {true, false, grain};
#elif defined(__AVX512F__)
  return {M >= 4, M < 4, grain};
#else
  return {M >= 4 || sizeof(T) == 2, false, grain};
#endif
}

template <typename X, typename T>
void products(const X* x, int64_t M, const T* w, int64_t N, int64_t K, const T* bias, T* out, const T* res) {
  const int64_t blocks = N / kCols, block = kCols * K;  // whole blocks, elements of one
  const auto [prefetch, streamed, grain] = reading<T>(M, block);
  if (!amx_products(x, M, w, blocks, K, grain, bias, out, N, res)) {
    at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t n = i * kCols;
        const T* next = prefetch && i + 1 < end ? w + (i + 1) * block : nullptr;
        product_block(x, M, w + i * block, K, bias == nullptr ? nullptr : bias + n, next, streamed, out + n, N,
                      res == nullptr ? nullptr : res + n);
      }
    });
  }
  for (int64_t n = blocks * kCols; n < N; ++n)
    product_row(x, M, w + n * K, K, bias == nullptr ? nullptr : bias + n, out + n, N, res == nullptr ? nullptr : res + n);
}

// act [M, I] = T(silu(gate)) * up (`silu_mul_rows`), gate and up the columns j and I + j of the product
// x W^T + bias, W [2I, K] (gate, then up): each task takes a gate block and its up block, and the two
// blocks' outputs go from L1 into act, not through a [M, 2I] product that one thread then reads (each
// thread's half of it in its own core's caches, the other core fetching it: perf put `silu_mul` at 3.5%
// of a 16-row forward). With the residual additions in the o and down products' passes (`with_residual`),
// SmolLM2 bf16 forwards over 300 keys, Intel Xeon (AMX), builds taking turns, ms: 1 row 10.00 / 9.92 ->
// 9.56 / 9.74, 8 rows 11.37 / 11.17 -> 10.86 / 11.06, 16 rows 13.11 / 12.77 -> 12.17 / 12.38.
template <typename X, typename T>
void swiglu_products(const X* x, int64_t M, const T* w, int64_t I, int64_t K, const T* bias, T* act) {
  const int64_t pairs = I / kCols, block = kCols * K;
  const auto [prefetch, streamed, grain] = reading<T>(M, 2 * block);
  bool amx = false;
  std::vector<c10::BFloat16> padded;
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
  if constexpr (std::is_same_v<T, c10::BFloat16> && std::is_same_v<X, c10::BFloat16>) {
    amx = amx_permitted();
    if (amx) padded = amx_rows(x, M, K);
  }
#endif
  at::parallel_for(0, pairs, grain, [&](int64_t begin, int64_t end) {
    std::vector<T> both(M * 2 * kCols);  // [M][the gate block's 16 outputs, the up block's 16]
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
    if constexpr (std::is_same_v<T, c10::BFloat16> && std::is_same_v<X, c10::BFloat16>) {
      if (amx) {  // gate and up blocks in a panel (`amx_panel`): a pair's, or two pairs' past a tile of rows
        const int64_t per = M > kAmxRows ? 2 : 1;  // pairs a panel takes: gate i.., then up i..
        std::vector<T> second(per > 1 ? M * 2 * kCols : 0);
        const TileConfig config;
        _tile_loadconfig(&config);
        for (int64_t i = begin; i < end; i += per) {
          const int n = int(std::min<int64_t>(per, end - i));
          const T *ws[kPanel], *bs[kPanel], *nx[kPanel], *rs[kPanel] = {};
          T* os[kPanel];
          for (int b = 0; b < 2 * n; ++b) {
            const int64_t j = i + b % n + b / n * pairs;  // the block
            ws[b] = w + j * block, bs[b] = bias == nullptr ? nullptr : bias + j * kCols;
            nx[b] = i + per + b % n < end ? w + (j + per) * block : nullptr;
            os[b] = (b % n == 0 ? both : second).data() + b / n * kCols;
          }
          amx_panel_of(2 * n, padded.data(), M, ws, K, bs, nx, os, 2 * kCols, rs);
          for (int p = 0; p < n; ++p)
            silu_mul_rows(static_cast<const T*>((p == 0 ? both : second).data()), 2 * kCols, act + (i + p) * kCols, I,
                          M, int64_t(kCols));
        }
        _tile_release();
        return;
      }
    }
#endif
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t half = 0; half < 2; ++half) {
        const int64_t j = i + half * pairs;  // the block
        const T* b = bias == nullptr ? nullptr : bias + j * kCols;
        T* out = both.data() + half * kCols;
        const T* next = prefetch && i + 1 < end ? w + (j + 1) * block : nullptr;
        product_block(x, M, w + j * block, K, b, next, streamed, out, 2 * kCols, static_cast<const T*>(nullptr));
      }
      silu_mul_rows(static_cast<const T*>(both.data()), 2 * kCols, act + i * kCols, I, M, int64_t(kCols));
    }
  });
}

}  // namespace

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
namespace medusa_cpu {

// Linux hands a process the tiles' 8 KB of state only on request; where it refuses, the AVX-512 loops
// do the work.
bool amx_permitted() {
  static const bool permitted = [] {
    constexpr long kRequestPermission = 0x1023, kTileData = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
    return syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
  }();
  return permitted;
}

}  // namespace medusa_cpu
#endif

namespace medusa_cpu {

// f(the rows of x as the products read them): without AVX-512, bf16 x widened to float32 once, not at
// every use (a row's broadcast of one k was 4 instructions -- a load, a shift, a move to a vector
// register, the broadcast -- beside the block's 2 multiply-adds); else x itself
template <typename T, typename F>
void on_rows(const T* x, int64_t M, int64_t K, const F& f) {
#if !defined(__AVX512F__)
  if constexpr (!std::is_same_v<T, float>) {
    std::vector<float> wide(M * K);
    for (int64_t i = 0; i < M * K; ++i) wide[i] = float(x[i]);
    f(static_cast<const float*>(wide.data()));
    return;
  }
#endif
  f(x);
}

template <typename T>
void rows_product_of(const T* x, int64_t M, const T* w, int64_t N, int64_t K, const T* bias, T* out, const T* residual) {
  on_rows(x, M, K, [&](const auto* rows) { products(rows, M, w, N, K, bias, out, residual); });
}

template <typename T>
void swiglu_product_of(const T* x, int64_t M, const T* w, int64_t I, int64_t K, const T* bias, T* act) {
  if (I % kCols != 0) {  // the up rows do not start a block: the product, then each row's SwiGLU
    std::vector<T> gate_up(M * 2 * I);
    rows_product_of(x, M, w, 2 * I, K, bias, gate_up.data());
    silu_mul_rows(static_cast<const T*>(gate_up.data()), 2 * I, act, I, M, I);
    return;
  }
  on_rows(x, M, K, [&](const auto* rows) { swiglu_products(rows, M, w, I, K, bias, act); });
}

template void rows_product_of(const float*, int64_t, const float*, int64_t, int64_t, const float*, float*, const float*);
template void swiglu_product_of(const float*, int64_t, const float*, int64_t, int64_t, const float*, float*);
template void swiglu_product_of(const c10::BFloat16*, int64_t, const c10::BFloat16*, int64_t, int64_t,
                                const c10::BFloat16*, c10::BFloat16*);
template void rows_product_of(const c10::BFloat16*, int64_t, const c10::BFloat16*, int64_t, int64_t,
                              const c10::BFloat16*, c10::BFloat16*, const c10::BFloat16*);

}  // namespace medusa_cpu

namespace {

// W [N, K] in the kernel's order: each whole block of 16 rows as `accumulate` reads it, the last
// N % 16 rows as they are
template <typename T>
void block_rows(const T* w, int64_t N, int64_t K, T* out) {
  const int64_t P = kPair<T>, KP = paired<T>(K);
  int64_t n = 0;
  for (; n + kCols <= N; n += kCols) {
    const T* rows = w + n * K;
    T* block = out + n * K;
    for (int64_t r = 0; r < kCols; ++r) {
      for (int64_t k = 0; k < KP; ++k) block[(k / P * kCols + slot_of<T>(r)) * P + k % P] = rows[r * K + k];
      for (int64_t k = KP; k < K; ++k) block[KP * kCols + r * (K - KP) + (k - KP)] = rows[r * K + k];
    }
  }
  std::memcpy(out + n * K, w + n * K, (N - n) * K * sizeof(T));
}

at::Tensor block_weight(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2, "block_weight: weight must be [N, K]");
  const at::Tensor w = weight.contiguous();
  at::Tensor out = at::empty_like(w);
  if (w.scalar_type() == at::kFloat) {
    block_rows(w.const_data_ptr<float>(), w.size(0), w.size(1), out.mutable_data_ptr<float>());
  } else {
    TORCH_CHECK(w.scalar_type() == at::kBFloat16, "block_weight: float32 or bfloat16 only");
    using bf16 = c10::BFloat16;
    block_rows(w.const_data_ptr<bf16>(), w.size(0), w.size(1), out.mutable_data_ptr<bf16>());
  }
  return out;
}

at::Tensor rows_product(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "rows_product: weight must be [N, K], contiguous");
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(x.size(-1) == K, "rows_product: x has ", x.size(-1), " features, weight ", K);
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "rows_product: x and weight differ in dtype");
  TORCH_CHECK(!bias.has_value() || (bias->is_contiguous() && bias->numel() == N &&
                                    bias->scalar_type() == weight.scalar_type()),
              "rows_product: bias must be [N], contiguous, of the weight's dtype");
  const at::Tensor xc = x.contiguous();
  const int64_t M = K == 0 ? 0 : xc.numel() / K;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  at::Tensor out = at::empty(shape, x.options());
  if (M == 0) {  // no rows (a one-token prompt's logprobs: none to score), or K = 0: a sum of nothing
    return bias.has_value() ? out.copy_(bias->expand_as(out)) : out.zero_();  // (tiles of 0 rows divide by 0)
  }
  if (weight.scalar_type() == at::kFloat) {
    rows_product_of(xc.const_data_ptr<float>(), M, weight.const_data_ptr<float>(), N, K,
                    bias.has_value() ? bias->const_data_ptr<float>() : nullptr, out.mutable_data_ptr<float>());
  } else {
    TORCH_CHECK(weight.scalar_type() == at::kBFloat16, "rows_product: float32 or bfloat16 only");
    using bf16 = c10::BFloat16;
    rows_product_of(xc.const_data_ptr<bf16>(), M, weight.const_data_ptr<bf16>(), N, K,
                    bias.has_value() ? bias->const_data_ptr<bf16>() : nullptr, out.mutable_data_ptr<bf16>());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(medusa, CPU, m) {
  m.impl("block_weight", &block_weight);
  m.impl("rows_product", &rows_product);
}
