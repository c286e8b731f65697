// y = x W^T * scale + b with W rounded to int8 per row (`runtime.cpu_kernels.quantize_weight`) and each row
// of x rounded to int8 per group of k as it is multiplied: the drafters' products on CPUs with AMX's int8
// tiles. A step drafts 4 levels and each reads the draft layer's 4.2M weights and the 2048 scored lm_head
// rows again (~10.8 MB in bf16), at the rate memory and L3 deliver them: the drafting took ~1.8 of a ~17 ms
// step. Drafts only propose, so their rounding changes how many tokens a step accepts, never which; and int8
// kept it (SmolLM2's shipped draft layer, `eagle-dynamic-cpu`, 20 dev prompts, PyTorch's lines rounding the
// same way: 2.786 tokens a step in bf16; int8 weights 2.789; and each row of x rounded too, 2.753 with one
// scale per row, 2.779 with fc's features and embeddings rounded apart, the `group` here). Intel Xeon (AMX),
// 2 threads, SmolLM2 bf16, that layer: one step's drafting call (depth 4, top 4), caches flushed before each,
// 1.92 -> 1.50 ms (median of 100); a tree level's layer call, warm, 344 -> 250 us; 20 dev prompts, the two
// taking turns, drafting 2.29 -> 1.72 ms a step and 1.994x -> 2.058x plain decoding's speed (prefills in).
//
// A quantized weight [N, K] is an int8 tensor [N, K + 4]: each block of 16 rows holds its int8 weights in the
// order AMX's int8 tiles read them, [K / 4][16][4] (the 16 rows' four k side by side), then the 16 rows'
// scales as float32 (64 bytes). N a multiple of 16, K and the group multiples of 64 (`int8_fits`).
//
// Each output is exact integer sums (one per group), then the same float32 operations in the same order, so
// a row gets the same bits alone or among others, through the tiles or the portable loop (CPUs without AMX,
// where only tests call it).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>
#include <immintrin.h>

#include "cpu_kernels.h"
#include "cpu_vectors.h"

// AMX's int8 tiles, and `amx_permitted` (declared with its bf16 ones)
#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AMX_BF16__)
#define MEDUSA_AMX_INT8 1
#else
#define MEDUSA_AMX_INT8 0
#endif

namespace medusa_cpu {
namespace {

constexpr int64_t kCols = 16;  // weight rows per block
constexpr int64_t kChunk = 64;  // k one int8 tile multiplies: 16 rows of 64 bytes, four k per column
constexpr int64_t kRowTile = 16;  // rows of x one tile holds
constexpr int kRowTiles = 4;  // tiles of rows a block's pass takes at most (their sums in tiles 0-3)

// x [M, K] rounded to int8, each row's groups of `group` k by their own scale (largest |x| / 127; 0 for a
// group of zeros): q [whole tiles of rows, K] (the last padded with zeros), scale [M][K / group]
struct QuantRows {
  std::vector<int8_t> q;
  std::vector<float> scale;
};

// one group's largest |x|, and x * inv rounded to the nearest integer (ties to even), 16 at a time where the
// CPU has AVX-512 (scalar, the loop of a 4-row product of 1536 k took ~5 us of its ~37)
template <typename T>
float largest(const T* x, int64_t n) {
#if defined(__AVX512F__)
  __m512 most = _mm512_setzero_ps();
  for (int64_t k = 0; k < n; k += 16) most = _mm512_max_ps(most, _mm512_abs_ps((__m512)load16(x + k)));
  return _mm512_reduce_max_ps(most);
#else
  float most = 0.0f;
  for (int64_t k = 0; k < n; ++k) most = std::max(most, std::fabs(float(x[k])));
  return most;
#endif
}

template <typename T>
void rounded(const T* x, int64_t n, float inv, int8_t* q) {
#if defined(__AVX512F__)
  for (int64_t k = 0; k < n; k += 16)  // vcvtps2dq rounds as nearbyint does: to nearest, ties to even
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k),
                     _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32((__m512)(load16(x + k) * splat16(inv)))));
#else
  for (int64_t k = 0; k < n; ++k) q[k] = int8_t(std::nearbyint(float(x[k]) * inv));
#endif
}

template <typename T>
QuantRows quantize_rows(const T* x, int64_t M, int64_t K, int64_t group) {
  const int64_t G = K / group;
  QuantRows r{std::vector<int8_t>((M + kRowTile - 1) / kRowTile * kRowTile * K, 0), std::vector<float>(M * G)};
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      const T* xg = x + m * K + g * group;
      const float most = largest(xg, group);
      r.scale[m * G + g] = most / 127.0f;
      if (most > 0.0f) rounded(xg, group, 127.0f / most, r.q.data() + m * K + g * group);
    }
  return r;
}

// sums[t][m][n] = the rows of tile t (of `tiles`) of xq [.., K] . block row n, over k in [k0, k1)
typedef int32_t TileSums[kRowTile][kCols];

void portable_sums(const int8_t* xq, int64_t K, int tiles, const int8_t* block, int64_t k0, int64_t k1,
                   TileSums* sums) {
  for (int t = 0; t < tiles; ++t)
    for (int64_t m = 0; m < kRowTile; ++m) {
      const int8_t* x = xq + (t * kRowTile + m) * K;
      for (int64_t n = 0; n < kCols; ++n) {
        int32_t s = 0;
        for (int64_t k = k0; k < k1; ++k) s += int32_t(x[k]) * int32_t(block[(k / 4 * kCols + n) * 4 + k % 4]);
        sums[t][m][n] = s;
      }
    }
}

#if MEDUSA_AMX_INT8
// The same sums through the tiles: the block's 64 k (1 KB) loaded once into tile 5, each tile of rows into
// tile 4 in turn, sums in tiles 0-3 (`TileConfig`). `next` (or null): a block fetched into L2 meanwhile.
// (GCC's tile intrinsics take a tile's number as written, hence a line per tile.)
template <int RT>
void amx_sums(const int8_t* xq, int64_t K, const int8_t* block, const int8_t* next, int64_t k0, int64_t k1,
              TileSums* sums) {
  _tile_zero(0);
  if constexpr (RT > 1) _tile_zero(1);
  if constexpr (RT > 2) _tile_zero(2);
  if constexpr (RT > 3) _tile_zero(3);
  const int64_t ld = K, rows = kRowTile * K;
  for (int64_t k = k0; k < k1; k += kChunk) {
    const int8_t* w = block + k * kCols;  // [16 quads of k][16 rows][4]
    if (next != nullptr)
      for (int64_t line = 0; line < kChunk * kCols; line += 64) __builtin_prefetch(next + k * kCols + line, 0, 2);
    _tile_loadd(5, w, 64);
    _tile_loadd(4, xq + k, ld);
    _tile_dpbssd(0, 4, 5);
    if constexpr (RT > 1) { _tile_loadd(4, xq + rows + k, ld); _tile_dpbssd(1, 4, 5); }
    if constexpr (RT > 2) { _tile_loadd(4, xq + 2 * rows + k, ld); _tile_dpbssd(2, 4, 5); }
    if constexpr (RT > 3) { _tile_loadd(4, xq + 3 * rows + k, ld); _tile_dpbssd(3, 4, 5); }
  }
  constexpr int64_t ld_sums = kCols * int64_t(sizeof(int32_t));
  _tile_stored(0, sums[0], ld_sums);
  if constexpr (RT > 1) _tile_stored(1, sums[1], ld_sums);
  if constexpr (RT > 2) _tile_stored(2, sums[2], ld_sums);
  if constexpr (RT > 3) _tile_stored(3, sums[3], ld_sums);
}
#endif

// Whether this process multiplies through the tiles (`amx_permitted`), else the portable loop
bool int8_tiles() {
#if MEDUSA_AMX_INT8
  return amx_permitted();
#else
  return false;
#endif
}

void block_sums(bool tiles_on, const int8_t* xq, int64_t K, int tiles, const int8_t* block, const int8_t* next,
                int64_t k0, int64_t k1, TileSums* sums) {
#if MEDUSA_AMX_INT8
  if (tiles_on) {
    switch (tiles) {
      case 4: amx_sums<4>(xq, K, block, next, k0, k1, sums); return;
      case 3: amx_sums<3>(xq, K, block, next, k0, k1, sums); return;
      case 2: amx_sums<2>(xq, K, block, next, k0, k1, sums); return;
      default: amx_sums<1>(xq, K, block, next, k0, k1, sums); return;
    }
  }
#endif
  portable_sums(xq, K, tiles, block, k0, k1, sums);
}

// out[m, 0..16) for the M rows of x and one block (16 weight rows): per group, the integer sums times the
// row's scale, summed over groups in order; times the weight rows' scales; + bias; with a residual, T(res +
// T(y)) as `rows_product_of` adds one. bias, res and out at the block's first column; ldo apart.
template <typename T>
void block_product(bool tiles_on, const QuantRows& x, int64_t M, int64_t K, int64_t group, const int8_t* block,
                   const int8_t* next, const T* bias, T* out, int64_t ldo, const T* res) {
  const int64_t G = K / group;
  const f32x16 scale = load16(reinterpret_cast<const float*>(block + kCols * K));
  alignas(64) TileSums sums[kRowTiles];
  for (int64_t m0 = 0; m0 < M; m0 += kRowTiles * kRowTile) {
    const int64_t rows = std::min<int64_t>(kRowTiles * kRowTile, M - m0);
    const int tiles = int((rows + kRowTile - 1) / kRowTile);
    f32x16 acc[kRowTiles * kRowTile] = {};
    for (int64_t g = 0; g < G; ++g) {
      block_sums(tiles_on, x.q.data() + m0 * K, K, tiles, block, m0 == 0 ? next : nullptr, g * group, (g + 1) * group,
                 sums);
      for (int64_t m = 0; m < rows; ++m) {
        i32x16 s;
        std::memcpy(&s, sums[m / kRowTile][m % kRowTile], sizeof s);
        acc[m] += __builtin_convertvector(s, f32x16) * splat16(x.scale[(m0 + m) * G + g]);
      }
    }
    for (int64_t m = 0; m < rows; ++m) {
      f32x16 y = acc[m] * scale;
      if (bias != nullptr) y += load16(bias);
      const int64_t at = (m0 + m) * ldo;
      if (res != nullptr) y = round16(y, out) + load16(res + at);
      store16(out + at, y);
    }
  }
}

inline int64_t block_bytes(int64_t K) { return kCols * (K + 4); }

// Threads share a product only where each gets 64 KiB of weights or more, as `rows_product_of`'s do
inline int64_t grain(int64_t bytes_per_task) { return std::max<int64_t>(1, (64 << 10) / bytes_per_task); }

}  // namespace

template <typename T>
void int8_product_of(const T* x, int64_t M, const int8_t* w, int64_t N, int64_t K, int64_t group, const T* bias,
                     T* out, const T* residual) {
  const QuantRows xq = quantize_rows(x, M, K, group);
  const bool tiles_on = int8_tiles();
  const int64_t blocks = N / kCols, bytes = block_bytes(K);
  at::parallel_for(0, blocks, grain(bytes), [&](int64_t begin, int64_t end) {
#if MEDUSA_AMX_INT8
    const TileConfig config;
    if (tiles_on) _tile_loadconfig(&config);
#endif
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i * kCols;
      block_product(tiles_on, xq, M, K, group, w + i * bytes, i + 1 < end ? w + (i + 1) * bytes : nullptr,
                    bias == nullptr ? nullptr : bias + n, out + n, N, residual == nullptr ? nullptr : residual + n);
    }
#if MEDUSA_AMX_INT8
    if (tiles_on) _tile_release();
#endif
  });
}

template <typename T>
void int8_swiglu_product_of(const T* x, int64_t M, const int8_t* w, int64_t I, int64_t K, T* act) {
  const QuantRows xq = quantize_rows(x, M, K, K);
  const bool tiles_on = int8_tiles();
  const int64_t pairs = I / kCols, bytes = block_bytes(K);
  at::parallel_for(0, pairs, grain(2 * bytes), [&](int64_t begin, int64_t end) {
#if MEDUSA_AMX_INT8
    const TileConfig config;
    if (tiles_on) _tile_loadconfig(&config);
#endif
    std::vector<T> both(M * 2 * kCols);  // [M][the gate block's 16 outputs, the up block's 16]
    const T* none = nullptr;
    for (int64_t i = begin; i < end; ++i) {
      const int8_t* gate = w + i * bytes;
      const int8_t* up = w + (i + pairs) * bytes;
      block_product(tiles_on, xq, M, K, K, gate, up, none, both.data(), 2 * kCols, none);
      block_product(tiles_on, xq, M, K, K, up, i + 1 < end ? gate + bytes : nullptr, none, both.data() + kCols,
                    2 * kCols, none);
      silu_mul_rows(static_cast<const T*>(both.data()), 2 * kCols, act + i * kCols, I, M, kCols);
    }
#if MEDUSA_AMX_INT8
    if (tiles_on) _tile_release();
#endif
  });
}

template void int8_product_of(const float*, int64_t, const int8_t*, int64_t, int64_t, int64_t, const float*, float*,
                              const float*);
template void int8_product_of(const c10::BFloat16*, int64_t, const int8_t*, int64_t, int64_t, int64_t,
                              const c10::BFloat16*, c10::BFloat16*, const c10::BFloat16*);
template void int8_swiglu_product_of(const float*, int64_t, const int8_t*, int64_t, int64_t, float*);
template void int8_swiglu_product_of(const c10::BFloat16*, int64_t, const int8_t*, int64_t, int64_t, c10::BFloat16*);

}  // namespace medusa_cpu

namespace {

// x [..., K] (float32 or bf16), weight int8 [N, K + 4] (`quantize_weight`), bias [N] of x's dtype or none,
// group (k per scale of x's rows; 0: K) -> [..., N] of x's dtype
at::Tensor int8_product(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        int64_t group) {
  TORCH_CHECK(weight.scalar_type() == at::kChar && weight.dim() == 2 && weight.is_contiguous(),
              "int8_product: weight must be int8 [N, K + 4], contiguous (quantize_weight)");
  const int64_t N = weight.size(0), K = weight.size(1) - 4, g = group == 0 ? K : group;
  TORCH_CHECK(medusa_cpu::int8_fits(N, K, g) && x.size(-1) == K,
              "int8_product: N must be a multiple of 16, K and group multiples of 64 that group divides, x [..., K]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "int8_product: x must be float32 or bfloat16");
  TORCH_CHECK(!bias.has_value() || (bias->is_contiguous() && bias->numel() == N && bias->scalar_type() == x.scalar_type()),
              "int8_product: bias must be [N], contiguous, of x's dtype");
  const at::Tensor xc = x.contiguous();
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  at::Tensor out = at::empty(shape, x.options());
  const int64_t M = xc.numel() / K;
  const int8_t* w = weight.const_data_ptr<int8_t>();
  if (x.scalar_type() == at::kFloat) {
    medusa_cpu::int8_product_of(xc.const_data_ptr<float>(), M, w, N, K, g,
                                bias.has_value() ? bias->const_data_ptr<float>() : nullptr, out.mutable_data_ptr<float>());
  } else {
    using bf16 = c10::BFloat16;
    medusa_cpu::int8_product_of(xc.const_data_ptr<bf16>(), M, w, N, K, g,
                                bias.has_value() ? bias->const_data_ptr<bf16>() : nullptr, out.mutable_data_ptr<bf16>());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(medusa, CPU, m) {
  m.impl("int8_product", &int8_product);
}
