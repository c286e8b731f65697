// y = x W^T + b for a few rows x [M, K] on the CPU: the products of decoding, where W [N, K] is
// read once per step and the time is the time to read it. `runtime.cpu_kernels` builds this file
// for the machine it runs on and documents why it exists; `F.linear` is its reference.
//
// Memory order, not arithmetic, sets the speed. Each thread walks its share of W in blocks of
// kRows rows, works on the rows of a block side by side (kRows independent sums), and asks the
// cache for the next block's rows while it works on this one. A scratch C benchmark of these loops
// over all SmolLM2 layers' bf16 weights (212 MB), 2 threads, Intel Xeon with AMX, same run: one row
// at a time 16.5 GB/s (inductor's loop reads as fast), 8 rows side by side 15.3 GB/s, 8 rows side by
// side with the next block prefetched 25.5 GB/s.
//
// The kernel reads W in its own order (`block_weight`): a block's rows chunk by chunk, [k / kChunk]
// [kRows][kChunk], so that a block is one stream through memory instead of kRows streams. All
// SmolLM2 products, bf16, 2 threads, AMD EPYC (Zen 5), best of 8 in one process: 1 row 33.4 -> 39.0
// GB/s, 8 rows 26.7 -> 29.8 GB/s (a `.sum()` over 512 MB read 43-46 GB/s there); the same bits.
//
// Each output element is one sum in a fixed order (16 float32 lanes over k, then the lanes
// pairwise, then the tail), whatever M is and however the rows are split among threads: the same row
// gets the same bits alone or among others.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <immintrin.h>

#include "cpu_kernels.h"
#include "cpu_vectors.h"  // f32x16, load16, sum16

namespace {

using namespace medusa_cpu;

constexpr int kRows = 8;  // weight rows per block: 4 read 23 GB/s in the measurement above, 8 25.5

// Elements of a weight row that one load takes: 32 bf16 where the CPU multiplies bf16 pairs in one
// instruction (below), 16 otherwise (widened to 16 float32 lanes)
template <typename T>
constexpr int64_t kChunk = 16;
#if defined(__AVX512BF16__)
template <>
constexpr int64_t kChunk<c10::BFloat16> = 32;
#endif

// A block of R weight rows [R, K] in the kernel's order: [K / kChunk][R][kChunk] (the chunks that
// whole vectors cover), then [R][K % kChunk]. One row (R = 1) is in its own order.
template <int R, typename T>
inline const T* chunk_of(const T* w, int64_t k, int r) {  // row r's kChunk elements from k
  return w + k * R + r * kChunk<T>;
}

template <int R, typename T>
inline const T* tail_of(const T* w, int64_t K, int r) {  // row r's last K % kChunk elements
  const int64_t KC = K / kChunk<T> * kChunk<T>;
  return w + R * KC + r * (K - KC);
}

// acc[m][r] += x[m] . w[r0 + r] for m < MB, r < R, over k < the returned length (the longest that
// whole chunks cover); the MB rows of x share each load of w. Also prefetches the same rows of `next`
// (the next block) unless it is null. Rows of x are ldx apart; w and next are blocks of RB rows in the
// kernel's order.
template <int MB, int R, int RB, typename T>
int64_t accumulate(const T* x, int64_t ldx, const T* w, int r0, int64_t K, const T* next, f32x16 (*acc)[R]) {
  const int64_t K16 = K / 16 * 16;
  for (int64_t k = 0; k < K16; k += 16) {
    f32x16 xv[MB];
    for (int m = 0; m < MB; ++m) xv[m] = load16(x + m * ldx + k);
    for (int r = 0; r < R; ++r) {
      const f32x16 wv = load16(chunk_of<RB>(w, k, r0 + r));
      for (int m = 0; m < MB; ++m) acc[m][r] += xv[m] * wv;
    }
    if (next != nullptr)
      for (int r = 0; r < R; ++r) __builtin_prefetch(chunk_of<RB>(next, k, r0 + r));
  }
  return K16;
}

#if defined(__AVX512BF16__)
// Where the CPU multiplies bf16 pairs into float32 sums in one instruction (vdpbf16ps, AVX-512
// BF16) the weights need no widening: same measurement, 25.5 -> 29-30 GB/s.
template <int MB, int R, int RB>
int64_t accumulate(const c10::BFloat16* x, int64_t ldx, const c10::BFloat16* w, int r0, int64_t K,
                   const c10::BFloat16* next, f32x16 (*acc)[R]) {
  const int64_t K32 = K / 32 * 32;
  for (int64_t k = 0; k < K32; k += 32) {
    __m512bh xv[MB];
    for (int m = 0; m < MB; ++m) xv[m] = (__m512bh)_mm512_loadu_si512(x + m * ldx + k);
    for (int r = 0; r < R; ++r) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(chunk_of<RB>(w, k, r0 + r));
      for (int m = 0; m < MB; ++m) acc[m][r] = (f32x16)_mm512_dpbf16_ps((__m512)acc[m][r], xv[m], wv);
    }
    if (next != nullptr)
      for (int r = 0; r < R; ++r) __builtin_prefetch(chunk_of<RB>(next, k, r0 + r));
  }
  return K32;
}
#endif

// out[m, r] = x[m] . w[r0 + r] + bias[r] for m < MB, r < R; rows of x and out are K and ldo apart, w
// is a block of RB rows in the kernel's order.
template <int MB, int R, int RB, typename T>
void product_tile(const T* x, const T* w, int r0, int64_t K, const T* bias, const T* next, T* out, int64_t ldo) {
  f32x16 acc[MB][R] = {};
  const int64_t done = accumulate<MB, R, RB>(x, K, w, r0, K, next, acc);
  for (int m = 0; m < MB; ++m) {
    for (int r = 0; r < R; ++r) {
      float s = sum16(acc[m][r]);
      const T* tail = tail_of<RB>(w, K, r0 + r);
      for (int64_t k = done; k < K; ++k) s += float(x[m * K + k]) * float(tail[k - done]);
      out[m * ldo + r] = T(bias == nullptr ? s : s + float(bias[r]));
    }
  }
}

// Rows r0 and r0 + 1 of a block of RB against the M rows of x, up to 8 of them at a time
template <int RB, typename T>
void pair_against_rows(const T* x, int64_t M, const T* w, int r0, int64_t K, const T* bias, const T* next,
                       T* out, int64_t ldo) {
  const T* b = bias == nullptr ? nullptr : bias + r0;
  for (int64_t m = 0; m < M; m += 8) {
    const T* pf = m == 0 ? next : nullptr;
    const T* xm = x + m * K;
    T* o = out + m * ldo + r0;
    switch (std::min<int64_t>(8, M - m)) {
      case 8: product_tile<8, 2, RB>(xm, w, r0, K, b, pf, o, ldo); break;
      case 7: product_tile<7, 2, RB>(xm, w, r0, K, b, pf, o, ldo); break;
      case 6: product_tile<6, 2, RB>(xm, w, r0, K, b, pf, o, ldo); break;
      case 5: product_tile<5, 2, RB>(xm, w, r0, K, b, pf, o, ldo); break;
      case 4: product_tile<4, 2, RB>(xm, w, r0, K, b, pf, o, ldo); break;
      case 3: product_tile<3, 2, RB>(xm, w, r0, K, b, pf, o, ldo); break;
      case 2: product_tile<2, 2, RB>(xm, w, r0, K, b, pf, o, ldo); break;
      default: product_tile<1, 2, RB>(xm, w, r0, K, b, pf, o, ldo); break;
    }
  }
}

// out[m, r] = x[m] . w[r] + bias[r] for m < M, r < RB; `next`: the next block to prefetch, or null.
// One or two rows of x go against the whole block at once; more, the block's rows two at a time
// against up to 8 rows of x, so that the block is read from memory during all of its work, not the
// first pass only: all SmolLM2 bf16 products, AMD EPYC (Zen 5), 2 threads, one process, best of 10,
// 8 rows 27.4 -> 33.6 GB/s, 12 rows 23.8 -> 29.2 (4 rows the same; the block's rows four at a time
// against 4 rows of x were no faster). Each output is the same sum in any tile.
template <int RB, typename T>
void product_block(const T* x, int64_t M, const T* w, int64_t K, const T* bias, const T* next,
                   T* out, int64_t ldo) {
  if (M > 2 && RB % 2 == 0) {
    for (int r0 = 0; r0 < RB; r0 += 2) pair_against_rows<RB>(x, M, w, r0, K, bias, next, out, ldo);
    return;
  }
  int64_t m = 0;
  for (; m + 2 <= M; m += 2)
    product_tile<2, RB, RB>(x + m * K, w, 0, K, bias, m == 0 ? next : nullptr, out + m * ldo, ldo);
  if (m < M) product_tile<1, RB, RB>(x + m * K, w, 0, K, bias, m == 0 ? next : nullptr, out + m * ldo, ldo);
}

}  // namespace

namespace medusa_cpu {

template <typename T>
void rows_product_of(const T* x, int64_t M, const T* w, int64_t N, int64_t K, const T* bias, T* out) {
  const int64_t blocks = (N + kRows - 1) / kRows;
  // Threads share a product only where each gets 64 KiB of weights or more (all of SmolLM2's): a
  // tiny one is done before a second thread would have started.
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, kRows * K * int64_t(sizeof(T))));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i * kRows;
      const T* b = bias == nullptr ? nullptr : bias + n;
      if (n + kRows <= N) {
        const T* next = i + 1 < end && n + 2 * kRows <= N ? w + (n + kRows) * K : nullptr;
        product_block<kRows, T>(x, M, w + n * K, K, b, next, out + n, N);
      } else {  // the last rows of W, fewer than a block
        for (int64_t r = 0; n + r < N; ++r)
          product_block<1, T>(x, M, w + (n + r) * K, K, b == nullptr ? nullptr : b + r, nullptr, out + n + r, N);
      }
    }
  });
}

template void rows_product_of(const float*, int64_t, const float*, int64_t, int64_t, const float*, float*);
template void rows_product_of(const c10::BFloat16*, int64_t, const c10::BFloat16*, int64_t, int64_t,
                              const c10::BFloat16*, c10::BFloat16*);

}  // namespace medusa_cpu

namespace {

// W [N, K] in the kernel's order: each whole block of kRows rows as `chunk_of` and `tail_of` read
// it, the last N % kRows rows as they are
template <typename T>
void block_rows(const T* w, int64_t N, int64_t K, T* out) {
  const int64_t KC = K / kChunk<T> * kChunk<T>;
  int64_t n = 0;
  for (; n + kRows <= N; n += kRows) {
    const T* rows = w + n * K;
    T* block = out + n * K;
    for (int r = 0; r < kRows; ++r) {
      for (int64_t k = 0; k < KC; k += kChunk<T>)
        std::memcpy(const_cast<T*>(chunk_of<kRows>(block, k, r)), rows + r * K + k, kChunk<T> * sizeof(T));
      std::memcpy(const_cast<T*>(tail_of<kRows>(block, K, r)), rows + r * K + KC, (K - KC) * sizeof(T));
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
