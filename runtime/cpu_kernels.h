// What one of our CPU kernel files calls in another (`layer_ops.cpp`'s whole decoder layer calls the
// product and the attention, and checks its operands as the attention does): declarations; the definitions and their reasons are in
// `rows_product.cpp` and `attention/cpu_attention.cpp`. T: float or c10::BFloat16.

#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace medusa_cpu {

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
// Whether Linux lets this process use AMX tiles (asked once, `rows_product.cpp`); where it refuses, the
// kernels multiply with AVX-512 instead
bool amx_permitted();

// Every tile as our kernels use them: 16 rows of 64 bytes (16 float32 sums, 32 bf16, or 16 bf16 pairs)
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t bytes_per_row[16] = {64, 64, 64, 64, 64, 64, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};
#endif

// out [M, N] = x [M, K] W^T + bias, W [N, K] in the kernel's order (`medusa::block_weight`), bias [N]
// or null; all contiguous. With residual [M, N]: out = T(residual + T(x W^T + bias)), a residual
// connection's addition in the product's pass
template <typename T>
void rows_product_of(const T* x, int64_t M, const T* w, int64_t N, int64_t K, const T* bias, T* out,
                     const T* residual = nullptr);

// act [M, I] = T(silu(gate)) * up, [gate, up] = x [M, K] W^T + bias, W [2I, K] (gate's rows, then up's) in
// the kernel's order: the product, then `silu_mul`, in one pass, with their bits
template <typename T>
void swiglu_product_of(const T* x, int64_t M, const T* w, int64_t I, int64_t K, const T* bias, T* act);

// The same with W rounded to int8 (`int8_product.cpp`, where the format is): w int8 [N, K + 4], each row of
// x rounded to int8 per `group` of k
inline bool int8_fits(int64_t N, int64_t K, int64_t group) {
  return N % 16 == 0 && group > 0 && group % 64 == 0 && K % group == 0;
}

template <typename T>
void int8_product_of(const T* x, int64_t M, const int8_t* w, int64_t N, int64_t K, int64_t group, const T* bias,
                     T* out, const T* residual = nullptr);

template <typename T>
void int8_swiglu_product_of(const T* x, int64_t M, const int8_t* w, int64_t I, int64_t K, T* act);

// A product through whichever kernel takes W as it is: int8 (`int8_product_of`, x's rows rounded per
// `group` of k, 0: K) or T's own order (`rows_product_of`)
template <typename T>
void product_of(const T* x, int64_t M, const at::Tensor& w, int64_t N, int64_t K, const T* bias, T* out,
                const T* residual = nullptr, int64_t group = 0) {
  if (w.scalar_type() == at::kChar)
    int8_product_of(x, M, w.const_data_ptr<int8_t>(), N, K, group == 0 ? K : group, bias, out, residual);
  else
    rows_product_of(x, M, w.const_data_ptr<T>(), N, K, bias, out, residual);
}

template <typename T>
void swiglu_of(const T* x, int64_t M, const at::Tensor& w, int64_t I, int64_t K, T* act) {
  if (w.scalar_type() == at::kChar)
    int8_swiglu_product_of(x, M, w.const_data_ptr<int8_t>(), I, K, act);
  else
    swiglu_product_of(x, M, w.const_data_ptr<T>(), I, K, static_cast<const T*>(nullptr), act);
}

// Whether w is a weight [N, K] as one of the products above takes it, of x's dtype T or int8
inline bool weight_fits(const at::Tensor& w, at::ScalarType T, int64_t N, int64_t K, int64_t group = 0) {
  if (!w.is_contiguous() || w.dim() != 2 || w.size(0) != N) return false;
  if (w.scalar_type() == at::kChar) return w.size(1) == K + 4 && int8_fits(N, K, group == 0 ? K : group);
  return w.scalar_type() == T && w.size(1) == K;
}

// The draft layer's weights and shapes as `layer_ops.cpp`'s `draft_layer` takes them (its comment says
// what each is), for a call of it from another file (`draft_layer_with`)
struct DraftLayerOperands {
  at::Tensor fc_w;
  std::optional<at::Tensor> fc_b, attn_norm;
  at::Tensor qkv_w, o_w, mlp_norm, gate_up_w, down_w, inv_freq;
  double eps;
  int64_t num_heads, num_kv_heads;
};

// `draft_layer` on these pairs (features, embeds, positions, mask; past keys and values and where this
// call's go, or none) -> (out, keys, values)
std::tuple<at::Tensor, at::Tensor, at::Tensor> draft_layer_with(
    const DraftLayerOperands& layer, const at::Tensor& features, const at::Tensor& embeds, const at::Tensor& positions,
    const at::Tensor& mask, const std::optional<at::Tensor>& past_k, const std::optional<at::Tensor>& past_v,
    const std::optional<at::Tensor>& key_at, int64_t queries);

template <typename T>
struct AttentionOperands {
  const T* q;  // [B, H, T, D], rows of D contiguous, strides below
  int64_t q_stride_b, q_stride_h, q_stride_t;
  const T* k;  // [N, Hkv, S_max, D] contiguous
  const T* v;
  const int64_t* slots;  // [B]
  const int64_t* lens;  // [B]: cached keys before the new ones
  const bool* mask;  // [T, T] or [B, T, T], or null: causal
  int64_t mask_stride_b;  // 0 for one mask for the batch
  T* out;  // [B, T, H, D] contiguous
  int64_t H, Hkv, T_new, D, S_max;
  float scale;
};

// out = softmax(q k^T * scale + mask) v for the B sequences of `a`
template <typename T>
void attend_all(const AttentionOperands<T>& a, int64_t B);

// Checks what attention over the caches reads, for the op named `op` (B sequences, H query heads, T new
// tokens, head dim D): caches [N, Hkv, S_max, D], slots and cache_lens [B] int64 inside the cache,
// new_mask [T, T] or [B, T, T] bool. Returns the mask made contiguous, or an undefined tensor (causal).
at::Tensor checked_attention_operands(const char* op, int64_t B, int64_t H, int64_t T, int64_t D,
                                      const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slots,
                                      const at::Tensor& cache_lens, const std::optional<at::Tensor>& new_mask);

}  // namespace medusa_cpu
