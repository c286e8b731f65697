// The small steps of a decoder layer between its products, for a few rows on the CPU: RMSNorm, the rotary
// embedding of the queries and keys, SwiGLU's silu(gate) * up, the residual additions; the whole layer
// (`decoder_layer`: these, our product and our attention), every layer of the model in one call
// (`decoder_layers`), and the EAGLE-style draft layer in one call (`draft_layer`); and, after the forward of
// a step, each node's argmax and the kept nodes' logsumexp, greedy acceptance, and the cache's move of the
// accepted entries. In PyTorch each small step is 3-8 operations, and a token through SmolLM2's 30 layers
// spent ~2 ms of an ~11 ms forward in them (bf16, AMD EPYC Zen 5); their arithmetic is a few thousand values.
// `runtime.llama` calls them (`RMSNorm`, `Block`) while serving on the CPU, and its PyTorch lines there are
// the reference. Each row is computed on its own in a fixed order, and the roundings to the tensors' dtype
// are the reference's: a row gets the same bits alone or among others, and the layer in one call the bits of
// its steps.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu_kernels.h"
#include "cpu_vectors.h"

namespace {

using namespace medusa_cpu;

template <typename T>
inline float round_to(float x) {  // x rounded to T, as a PyTorch operation's T result is
  return float(T(x));
}

// A prompt's rows split between the threads, a few tokens' rows on this one: the one-call layer runs
// the loops below on a step's few rows between its products, but a prefill through the modules calls
// the operations on a whole chunk of the prompt (with `Llama.forward` taking them there: 40 dev prompts'
// prefills, SmolLM2 bf16, Intel Xeon (AMX), 46.27 -> 42.35 ms mean)
constexpr int64_t kRowsPerThread = 16;

template <typename F>
void over_rows(int64_t M, const F& rows) {
  at::parallel_for(0, M, kRowsPerThread, [&](int64_t begin, int64_t end) { rows(begin, end); });
}

// y = weight * T(x / rms(x)) per row of C: x, y [M, C]
template <typename T>
void rms_norm_rows(const T* x, const T* weight, T* y, int64_t M, int64_t C, float eps) {
  const int64_t C16 = C / 16 * 16;
  for (int64_t m = 0; m < M; ++m, x += C, y += C) {
    Sum16 squares;
    for (int64_t c = 0; c < C16; c += 16) squares.add(x + c, [](f32xN v) { return v * v; });
    float sum = squares.total();
    for (int64_t c = C16; c < C; ++c) sum += float(x[c]) * float(x[c]);
    const float r = 1.0f / std::sqrt(sum / float(C) + eps);
    for (int64_t c = 0; c < C16; c += kLanes) store_lanes(y + c, loadN(weight + c) * round_lanes(loadN(x + c) * r, x));
    for (int64_t c = C16; c < C; ++c) y[c] = T(float(weight[c]) * round_to<T>(float(x[c]) * r));
  }
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const int64_t C = x.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == C && weight.is_contiguous(), "rms_norm: weight must be [C]");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "rms_norm: x and weight differ in dtype");
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options());
  const int64_t M = C == 0 ? 0 : x.numel() / C;
  auto run = [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    over_rows(M, [&](int64_t m0, int64_t m1) {
      rms_norm_rows(xc.const_data_ptr<T>() + m0 * C, weight.const_data_ptr<T>(), y.mutable_data_ptr<T>() + m0 * C,
                    m1 - m0, C, float(eps));
    });
  };
  if (x.scalar_type() == at::kFloat) {
    run(static_cast<float*>(nullptr));
  } else {
    TORCH_CHECK(x.scalar_type() == at::kBFloat16, "rms_norm: float32 or bfloat16 only");
    run(static_cast<c10::BFloat16*>(nullptr));
  }
  return y;
}

// The first `heads` heads of each token's [heads + ..., D] rotated: pairs (i, i + D/2),
// x cos + (-x2, x1) sin, the sign in `sin`; a token's cos and sin are [D]. out [M, heads, D].
template <typename T>
void rope_rows(const T* x, int64_t x_stride, const T* cos, const T* sin, T* out, int64_t M, int64_t heads, int64_t D) {
  const int64_t half = D / 2;
  for (int64_t m = 0; m < M; ++m, x += x_stride, cos += D, sin += D) {
    for (int64_t h = 0; h < heads; ++h, out += D) {
      const T* xh = x + h * D;
      if (half % 16 == 0) {
        for (int64_t i = 0; i < D; i += kLanes) {
          const f32xN rotated = loadN(xh + (i < half ? i + half : i - half));
          store_lanes(out + i, round_lanes(loadN(xh + i) * loadN(cos + i), x) + round_lanes(rotated * loadN(sin + i), x));
        }
        continue;
      }
      for (int64_t i = 0; i < D; ++i) {
        const float rotated = float(xh[i < half ? i + half : i - half]);
        out[i] = T(round_to<T>(float(xh[i]) * float(cos[i])) + round_to<T>(rotated * float(sin[i])));
      }
    }
  }
}

at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, int64_t heads) {
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous(), "rope: x must be [B, T, heads + ..., D], contiguous");
  const int64_t B = x.size(0), Tn = x.size(1), D = x.size(3);
  TORCH_CHECK(heads >= 0 && heads <= x.size(2) && D % 2 == 0, "rope: bad heads or odd head dim");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.numel() == B * Tn * D && sin.numel() == B * Tn * D,
              "rope: cos and sin must be [B, T, 1, D], contiguous");
  TORCH_CHECK(cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type(),
              "rope: x, cos and sin differ in dtype");
  at::Tensor out = at::empty({B, Tn, heads, D}, x.options());
  const int64_t row = x.size(2) * D;
  auto run = [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    over_rows(B * Tn, [&](int64_t m0, int64_t m1) {
      rope_rows(x.const_data_ptr<T>() + m0 * row, row, cos.const_data_ptr<T>() + m0 * D, sin.const_data_ptr<T>() + m0 * D,
                out.mutable_data_ptr<T>() + m0 * heads * D, m1 - m0, heads, D);
    });
  };
  if (x.scalar_type() == at::kFloat) {
    run(static_cast<float*>(nullptr));
  } else {
    TORCH_CHECK(x.scalar_type() == at::kBFloat16, "rope: float32 or bfloat16 only");
    run(static_cast<c10::BFloat16*>(nullptr));
  }
  return out;
}

// y = T(silu(gate)) * up per row: gate_up [..., 2I] (gate, then up) -> y [..., I] (`silu_mul_rows`)
at::Tensor silu_mul(const at::Tensor& gate_up) {
  const int64_t I = gate_up.size(-1) / 2;
  TORCH_CHECK(gate_up.size(-1) % 2 == 0, "silu_mul: gate_up's last dim must be even (gate, then up)");
  const at::Tensor x = gate_up.contiguous();
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = I;
  at::Tensor y = at::empty(shape, x.options());
  const int64_t M = I == 0 ? 0 : x.numel() / (2 * I);
  auto run = [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    over_rows(M, [&](int64_t m0, int64_t m1) {
      silu_mul_rows(x.const_data_ptr<T>() + m0 * 2 * I, 2 * I, y.mutable_data_ptr<T>() + m0 * I, I, m1 - m0, I);
    });
  };
  if (x.scalar_type() == at::kFloat) {
    run(static_cast<float*>(nullptr));
  } else {
    TORCH_CHECK(x.scalar_type() == at::kBFloat16, "silu_mul: float32 or bfloat16 only");
    run(static_cast<c10::BFloat16*>(nullptr));
  }
  return y;
}

template <typename T>
const T* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<T>() : nullptr;
}

// One decoder layer (`runtime.llama.Block.forward`, whose lines are its reference) for a few new
// tokens per sequence, every step through the kernels above and our product and attention, so that
// the layer is one call: x [B, T, C] -> [B, T, C]; the new tokens' K/V written to the caches at
// cache_lens[b] + t of slots[b].
template <typename T>
void decoder_layer_of(const at::Tensor& x, const at::Tensor& attn_norm, const at::Tensor& qkv_w,
                      const std::optional<at::Tensor>& qkv_b, const at::Tensor& o_w, const std::optional<at::Tensor>& o_b,
                      const at::Tensor& mlp_norm, const at::Tensor& gate_up_w, const std::optional<at::Tensor>& gate_up_b,
                      const at::Tensor& down_w, const std::optional<at::Tensor>& down_b, float eps,
                      const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& k_cache, const at::Tensor& v_cache,
                      const at::Tensor& slots, const at::Tensor& cache_lens, const at::Tensor& mask, int64_t H,
                      at::Tensor& out) {
  const int64_t B = x.size(0), Tn = x.size(1), C = x.size(2), M = B * Tn;
  const int64_t Hkv = k_cache.size(1), S_max = k_cache.size(2), D = k_cache.size(3);
  const int64_t I = down_w.size(1), QKV = (H + 2 * Hkv) * D;
  const T* xs = x.const_data_ptr<T>();
  const auto opts = x.options();
  at::Tensor h = at::empty({M, C}, opts), qkv = at::empty({M, QKV}, opts), qk = at::empty({M, H + Hkv, D}, opts);
  at::Tensor attn = at::empty({M, H * D}, opts), x1 = at::empty({M, C}, opts);
  at::Tensor act = at::empty({M, I}, opts);
  T* hp = h.mutable_data_ptr<T>();

  rms_norm_rows(xs, attn_norm.const_data_ptr<T>(), hp, M, C, eps);
  rows_product_of(static_cast<const T*>(hp), M, qkv_w.const_data_ptr<T>(), QKV, C, data_or_null<T>(qkv_b),
                  qkv.mutable_data_ptr<T>());
  const T* qkvp = qkv.const_data_ptr<T>();
  T* qkp = qk.mutable_data_ptr<T>();
  rope_rows(qkvp, QKV, cos.const_data_ptr<T>(), sin.const_data_ptr<T>(), qkp, M, H + Hkv, D);
  const int64_t* slot = slots.const_data_ptr<int64_t>();
  const int64_t* len = cache_lens.const_data_ptr<int64_t>();
  T* kc = k_cache.mutable_data_ptr<T>();
  T* vc = v_cache.mutable_data_ptr<T>();
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < Tn; ++t) {
      const int64_t m = b * Tn + t;
      for (int64_t g = 0; g < Hkv; ++g) {
        const int64_t at_pos = ((slot[b] * Hkv + g) * S_max + len[b] + t) * D;
        std::memcpy(kc + at_pos, qkp + (m * (H + Hkv) + H + g) * D, D * sizeof(T));
        std::memcpy(vc + at_pos, qkvp + m * QKV + (H + Hkv + g) * D, D * sizeof(T));
      }
    }
  }
  const int64_t qk_row = (H + Hkv) * D;
  AttentionOperands<T> a{qkp, Tn * qk_row, D, qk_row, kc, vc, slot, len,
                         mask.defined() ? mask.const_data_ptr<bool>() : nullptr,
                         mask.defined() && mask.dim() == 3 ? Tn * Tn : 0, attn.mutable_data_ptr<T>(),
                         H, Hkv, Tn, D, S_max, 1.0f / std::sqrt(float(D))};
  attend_all(a, B);
  // the residual additions in the products' passes, each thread adding the columns it multiplied
  T* x1p = x1.mutable_data_ptr<T>();
  rows_product_of(attn.const_data_ptr<T>(), M, o_w.const_data_ptr<T>(), C, H * D, data_or_null<T>(o_b), x1p, xs);
  rms_norm_rows(static_cast<const T*>(x1p), mlp_norm.const_data_ptr<T>(), hp, M, C, eps);
  swiglu_product_of(static_cast<const T*>(hp), M, gate_up_w.const_data_ptr<T>(), I, C, data_or_null<T>(gate_up_b),
                    act.mutable_data_ptr<T>());
  rows_product_of(act.const_data_ptr<T>(), M, down_w.const_data_ptr<T>(), C, I, data_or_null<T>(down_b),
                  out.mutable_data_ptr<T>(), static_cast<const T*>(x1p));
}

at::Tensor decoder_layer(const at::Tensor& x, const at::Tensor& attn_norm, const at::Tensor& qkv_w,
                         const std::optional<at::Tensor>& qkv_b, const at::Tensor& o_w, const std::optional<at::Tensor>& o_b,
                         const at::Tensor& mlp_norm, const at::Tensor& gate_up_w,
                         const std::optional<at::Tensor>& gate_up_b, const at::Tensor& down_w,
                         const std::optional<at::Tensor>& down_b, double eps, const at::Tensor& cos, const at::Tensor& sin,
                         const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slots,
                         const at::Tensor& cache_lens, const std::optional<at::Tensor>& new_mask, int64_t num_heads) {
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous(), "decoder_layer: x must be [B, T, C], contiguous");
  const int64_t B = x.size(0), Tn = x.size(1), C = x.size(2);
  const int64_t D = k_cache.dim() == 4 ? k_cache.size(3) : 0;
  const at::Tensor mask = checked_attention_operands("decoder_layer", B, num_heads, Tn, D, k_cache, v_cache, slots,
                                                     cache_lens, new_mask);
  const int64_t Hkv = k_cache.size(1);
  const int64_t I = down_w.size(1);
  for (const at::Tensor* w : {&attn_norm, &qkv_w, &o_w, &mlp_norm, &gate_up_w, &down_w, &cos, &sin, &k_cache, &v_cache})
    TORCH_CHECK(w->is_contiguous() && w->scalar_type() == x.scalar_type(), "decoder_layer: every tensor must be "
                "contiguous and of x's dtype");
  for (const std::optional<at::Tensor>* b : {&qkv_b, &o_b, &gate_up_b, &down_b})
    TORCH_CHECK(!b->has_value() || ((*b)->is_contiguous() && (*b)->scalar_type() == x.scalar_type()),
                "decoder_layer: a bias must be contiguous and of x's dtype");
  TORCH_CHECK(qkv_w.size(0) == (num_heads + 2 * Hkv) * D && qkv_w.size(1) == C && o_w.size(0) == C &&
              o_w.size(1) == num_heads * D && gate_up_w.size(0) == 2 * I && gate_up_w.size(1) == C &&
              down_w.size(0) == C && attn_norm.numel() == C && mlp_norm.numel() == C &&
              cos.numel() == B * Tn * D && sin.numel() == B * Tn * D, "decoder_layer: shapes do not fit");
  at::Tensor out = at::empty_like(x);
  if (x.scalar_type() == at::kFloat) {
    decoder_layer_of<float>(x, attn_norm, qkv_w, qkv_b, o_w, o_b, mlp_norm, gate_up_w, gate_up_b, down_w, down_b,
                            float(eps), cos, sin, k_cache, v_cache, slots, cache_lens, mask, num_heads, out);
  } else {
    TORCH_CHECK(x.scalar_type() == at::kBFloat16, "decoder_layer: float32 or bfloat16 only");
    decoder_layer_of<c10::BFloat16>(x, attn_norm, qkv_w, qkv_b, o_w, o_b, mlp_norm, gate_up_w, gate_up_b, down_w,
                                    down_b, float(eps), cos, sin, k_cache, v_cache, slots, cache_lens, mask, num_heads,
                                    out);
  }
  return out;
}

// Every layer of the model in one call: `decoder_layer` for each in turn, its output the next one's
// input (`cpu_kernels.decoder_layers`). One call from Python a step, not one a layer: each took ~10 us
// to pass its 20 operands (`Llama.forward` has the measurement).
at::Tensor decoder_layers(const at::Tensor& x, at::TensorList attn_norm, at::TensorList qkv_w,
                          const c10::List<std::optional<at::Tensor>>& qkv_b, at::TensorList o_w,
                          const c10::List<std::optional<at::Tensor>>& o_b, at::TensorList mlp_norm,
                          at::TensorList gate_up_w, const c10::List<std::optional<at::Tensor>>& gate_up_b,
                          at::TensorList down_w, const c10::List<std::optional<at::Tensor>>& down_b, double eps,
                          const at::Tensor& cos, const at::Tensor& sin, at::TensorList k_cache, at::TensorList v_cache,
                          const at::Tensor& slots, const at::Tensor& cache_lens,
                          const std::optional<at::Tensor>& new_mask, int64_t num_heads) {
  const size_t L = attn_norm.size();
  TORCH_CHECK(qkv_w.size() == L && qkv_b.size() == L && o_w.size() == L && o_b.size() == L && mlp_norm.size() == L &&
              gate_up_w.size() == L && gate_up_b.size() == L && down_w.size() == L && down_b.size() == L &&
              k_cache.size() == L && v_cache.size() == L, "decoder_layers: one of each operand a layer");
  at::Tensor h = x;
  for (size_t i = 0; i < L; ++i)
    h = decoder_layer(h, attn_norm[i], qkv_w[i], qkv_b[i], o_w[i], o_b[i], mlp_norm[i], gate_up_w[i], gate_up_b[i],
                      down_w[i], down_b[i], eps, cos, sin, k_cache[i], v_cache[i], slots, cache_lens, new_mask,
                      num_heads);
  return h;
}

// softmax(q k^T / sqrt(D) under mask) v for S queries of a few sequences over their own K keys each,
// in float32: the draft layer's attention, whose keys are not a cache's prefix (a tree's expanded node
// sees the window and its ancestors only). Drafts only propose, so this needs no fixed order of sums.
// q [B, S, H, D] (row stride q_row), k / v [B, Hkv, K, D], mask [B, S, K] -> out [B, S, H, D]; a query
// that sees no key gets zeros.
//
// Each key-value head's keys are widened once, transposed ([D][K]: a register of scores is a lane per key,
// no sum across lanes), and its values once, for all the S x H / Hkv queries that read them. Each query
// before read and widened every key and value itself, and summed each score across 16 lanes. A tree level's
// call (4 queries, 9 heads, 44 keys; SmolLM2's draft layer, bf16 with int8 weights), Intel Xeon (AMX), warm,
// the builds taking turns: 226.3 / 231.3 -> 212.2 / 219.8 us.
template <typename T>
void masked_attention(const T* q, int64_t q_row, const T* k, const T* v, const bool* mask, T* out, int64_t B,
                      int64_t S, int64_t K, int64_t H, int64_t Hkv, int64_t D) {
  const float scale = 1.0f / std::sqrt(float(D));
  const int64_t KN = (K + kLanes - 1) / kLanes * kLanes, groups = H / Hkv;  // keys padded to whole registers
  const float inf = std::numeric_limits<float>::infinity();
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> keys(D * KN, 0.0f), values(K * D), p(KN);  // keys [D][KN], values [K][D], scores
    std::vector<f32x16> acc(D / 16);
    for (int64_t bg = begin; bg < end; ++bg) {
      const int64_t b = bg / Hkv, g = bg % Hkv;
      const T* kh = k + bg * K * D;
      for (int64_t j = 0; j < K; ++j)
        for (int64_t d = 0; d < D; ++d) keys[d * KN + j] = float(kh[j * D + d]);
      for (int64_t i = 0; i < K * D; i += 16) store16(values.data() + i, load16(v + bg * K * D + i));
      for (int64_t s = 0; s < S; ++s)
        for (int64_t h = g * groups; h < (g + 1) * groups; ++h) {
          const T* qh = q + (b * S + s) * q_row + h * D;
          const bool* sees = mask + (b * S + s) * K;
          for (int64_t j = 0; j < KN; j += kLanes) {
            f32xN dot = {};
            for (int64_t d = 0; d < D; ++d) dot += splatN(float(qh[d])) * loadN(keys.data() + d * KN + j);
            dot *= scale;
            for (int i = 0; i < kLanes; ++i) p[j + i] = j + i < K && sees[j + i] ? dot[i] : -inf;
          }
          const float most = max_of(p.data(), KN);
          float total = 0.0f;
          std::fill(acc.begin(), acc.end(), f32x16{});
          if (most > -inf) {
            for (int64_t j = 0; j < KN; j += kLanes) {
              const f32xN w = exp_from(loadN(p.data() + j), most);
              std::memcpy(p.data() + j, &w, sizeof w);
            }
            for (int64_t j = 0; j < K; ++j) {
              if (p[j] == 0.0f) continue;
              total += p[j];
              for (int64_t d = 0; d < D; d += 16)
                acc[d / 16] = fma16(splat16(p[j]), load16(values.data() + j * D + d), acc[d / 16]);
            }
          }
          T* o = out + ((b * S + s) * H + h) * D;
          const float inv = total > 0.0f ? 1.0f / total : 0.0f;
          for (int64_t d = 0; d < D; d += 16) store16(o + d, acc[d / 16] * inv);
        }
    }
  });
}

// The EAGLE-style draft layer (`medusa.eagle.EagleDrafter.forward`, whose lines are its reference) in one
// call: fc([feature; embedding]) -> RMSNorm (if attn_norm) -> attention with RoPE over the keys of `past`
// with this call's written at `at` (or over its own, without past) -> residual -> RMSNorm -> SwiGLU ->
// residual. Its PyTorch lines are ~70 operations on a few rows, each run cold after a verification
// forward, four or five times a step. SmolLM2 bf16 with its shipped layer and `eagle-dynamic-cpu`, AMD EPYC
// (Zen 5), 12 dev prompts, the two taking turns: drafting 3.33 -> 2.50 ms a step (median), 177.8 -> 192.7
// tok/s, the same tokens. A call on the window's 32 pairs costs ~530 us, ~400 of them its products (32
// rows through 4.3M weights: as fast through oneDNN).
template <typename T>
void draft_layer_of(const at::Tensor& features, const at::Tensor& embeds, const at::Tensor& positions,
                    const at::Tensor& mask, const T* past_k, const T* past_v, const int64_t* key_at, at::Tensor& k,
                    at::Tensor& v, const at::Tensor& fc_w, const std::optional<at::Tensor>& fc_b,
                    const std::optional<at::Tensor>& attn_norm, const at::Tensor& qkv_w, const at::Tensor& o_w,
                    const at::Tensor& mlp_norm, const at::Tensor& gate_up_w, const at::Tensor& down_w,
                    const at::Tensor& inv_freq, float eps, int64_t H, at::Tensor& out) {
  const int64_t B = features.size(0), S = features.size(1), C = features.size(2), M = B * S, Q = out.size(1);
  const int64_t MQ = B * Q;  // the rows whose guesses are read: past the keys, only they go on
  const int64_t Hkv = k.size(1), K = k.size(2), D = k.size(3), I = gate_up_w.size(0) / 2;
  const int64_t QKV = (H + 2 * Hkv) * D;
  const auto opts = features.options();
  at::Tensor pairs = at::empty({M, 2 * C}, opts), x = at::empty({M, C}, opts), h = at::empty({M, C}, opts);
  at::Tensor qkv = at::empty({M, QKV}, opts), qk = at::empty({M, H + Hkv, D}, opts), attn = at::empty({MQ, H * D}, opts);
  at::Tensor cos = at::empty({M, D}, opts), sin = at::empty({M, D}, opts);
  at::Tensor x1 = at::empty({MQ, C}, opts), act = at::empty({MQ, I}, opts);
  T* pp = pairs.mutable_data_ptr<T>();
  const T* f = features.const_data_ptr<T>();
  const T* e = embeds.const_data_ptr<T>();
  for (int64_t m = 0; m < M; ++m) {
    std::memcpy(pp + m * 2 * C, f + m * C, C * sizeof(T));
    std::memcpy(pp + m * 2 * C + C, e + m * C, C * sizeof(T));
  }
  T* xp = x.mutable_data_ptr<T>();
  T* hp = h.mutable_data_ptr<T>();
  // fc's input is [feature; embedding]: int8 rows take a scale for each (`int8_product.cpp`)
  product_of(static_cast<const T*>(pp), M, fc_w, C, 2 * C, data_or_null<T>(fc_b), xp, static_cast<const T*>(nullptr), C);
  if (attn_norm.has_value()) rms_norm_rows(static_cast<const T*>(xp), attn_norm->const_data_ptr<T>(), hp, M, C, eps);
  else std::memcpy(hp, xp, M * C * sizeof(T));
  product_of(static_cast<const T*>(hp), M, qkv_w, QKV, C, static_cast<const T*>(nullptr), qkv.mutable_data_ptr<T>());
  const int64_t* pos = positions.const_data_ptr<int64_t>();
  const float* freq = inv_freq.const_data_ptr<float>();
  T* cp = cos.mutable_data_ptr<T>();
  T* sp = sin.mutable_data_ptr<T>();
  for (int64_t m = 0; m < M; ++m)  // as `Llama.forward`: cos, cos and -sin, sin (the sign for rope_rows)
    for (int64_t i = 0; i < D / 2; ++i) {
      const float angle = float(pos[m]) * freq[i];
      cp[m * D + i] = cp[m * D + D / 2 + i] = T(std::cos(angle));
      sp[m * D + i] = T(-std::sin(angle)), sp[m * D + D / 2 + i] = T(std::sin(angle));
    }
  const T* qkvp = qkv.const_data_ptr<T>();
  T* qkp = qk.mutable_data_ptr<T>();
  rope_rows(qkvp, QKV, static_cast<const T*>(cp), static_cast<const T*>(sp), qkp, M, H + Hkv, D);
  T* kp = k.mutable_data_ptr<T>();
  T* vp = v.mutable_data_ptr<T>();
  if (past_k != nullptr) {
    std::memcpy(kp, past_k, B * Hkv * K * D * sizeof(T));
    std::memcpy(vp, past_v, B * Hkv * K * D * sizeof(T));
  }
  for (int64_t b = 0; b < B; ++b)
    for (int64_t s = 0; s < S; ++s)
      for (int64_t g = 0; g < Hkv; ++g) {
        const int64_t m = b * S + s, key = ((b * Hkv + g) * K + (key_at == nullptr ? s : key_at[s])) * D;
        std::memcpy(kp + key, qkp + (m * (H + Hkv) + H + g) * D, D * sizeof(T));
        std::memcpy(vp + key, qkvp + m * QKV + (H + Hkv + g) * D, D * sizeof(T));
      }
  // past the keys, only the last Q pairs of each row (those whose guesses are read) go on: moved to the
  // front, row after row, with their masks, so the rest runs on MQ rows
  const bool* sees = mask.const_data_ptr<bool>();
  at::Tensor some_sees;
  if (Q < S) {
    some_sees = at::empty({B, Q, K}, mask.options());
    bool* ssp = some_sees.mutable_data_ptr<bool>();
    for (int64_t b = 0; b < B; ++b) {
      std::memmove(qkp + b * Q * (H + Hkv) * D, qkp + (b * S + S - Q) * (H + Hkv) * D, Q * (H + Hkv) * D * sizeof(T));
      std::memmove(xp + b * Q * C, xp + (b * S + S - Q) * C, Q * C * sizeof(T));
      std::memcpy(ssp + b * Q * K, sees + (b * S + S - Q) * K, Q * K * sizeof(bool));
    }
    sees = ssp;
  }
  T* ap = attn.mutable_data_ptr<T>();
  masked_attention(static_cast<const T*>(qkp), (H + Hkv) * D, static_cast<const T*>(kp), static_cast<const T*>(vp),
                   sees, ap, B, Q, K, H, Hkv, D);
  T* x1p = x1.mutable_data_ptr<T>();
  const T* none = nullptr;
  product_of(static_cast<const T*>(ap), MQ, o_w, C, H * D, none, x1p, static_cast<const T*>(xp));
  rms_norm_rows(static_cast<const T*>(x1p), mlp_norm.const_data_ptr<T>(), hp, MQ, C, eps);
  swiglu_of(static_cast<const T*>(hp), MQ, gate_up_w, I, C, act.mutable_data_ptr<T>());
  product_of(act.const_data_ptr<T>(), MQ, down_w, C, I, none, out.mutable_data_ptr<T>(), static_cast<const T*>(x1p));
}

// features, embeds [B, S, C] (the layer's dtype); positions [B, S] int64; mask [B, S, K] bool; past_k / past_v
// [B, Hkv, K, D] and at [S] int64 (this call's key indices), or none of them (K = S); the layer's weights
// in our product's order (`block_weight`), fc's bias, attn_norm's weight or none; inv_freq [D/2] float32;
// queries Q <= S -> (out [B, Q, C]: the last Q pairs' guesses, keys, values [B, Hkv, K, D]: every pair's)
std::tuple<at::Tensor, at::Tensor, at::Tensor> draft_layer(
    const at::Tensor& features, const at::Tensor& embeds, const at::Tensor& positions, const at::Tensor& mask,
    const std::optional<at::Tensor>& past_k, const std::optional<at::Tensor>& past_v,
    const std::optional<at::Tensor>& key_at, const at::Tensor& fc_w, const std::optional<at::Tensor>& fc_b,
    const std::optional<at::Tensor>& attn_norm, const at::Tensor& qkv_w, const at::Tensor& o_w,
    const at::Tensor& mlp_norm, const at::Tensor& gate_up_w, const at::Tensor& down_w, const at::Tensor& inv_freq,
    double eps, int64_t num_heads, int64_t num_kv_heads, int64_t queries) {
  TORCH_CHECK(features.dim() == 3 && embeds.sizes() == features.sizes() && features.is_contiguous() &&
              embeds.is_contiguous() && embeds.scalar_type() == features.scalar_type(),
              "draft_layer: features and embeds must be [B, S, C], contiguous, of one dtype");
  const int64_t B = features.size(0), S = features.size(1), C = features.size(2);
  const int64_t H = num_heads, Hkv = num_kv_heads;
  TORCH_CHECK(H > 0 && Hkv > 0 && H % Hkv == 0 && C % H == 0 && (C / H) % 16 == 0,
              "draft_layer: heads must divide C into head dims that are multiples of 16, and KV heads the heads");
  const int64_t D = C / H, I = gate_up_w.size(0) / 2;
  TORCH_CHECK(past_k.has_value() == past_v.has_value() && past_k.has_value() == key_at.has_value(),
              "draft_layer: past_k, past_v and at come together");
  const int64_t K = past_k.has_value() ? past_k->size(2) : S;
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous() && positions.numel() == B * S &&
              mask.scalar_type() == at::kBool && mask.is_contiguous() && mask.dim() == 3 && mask.size(0) == B &&
              mask.size(1) == S && mask.size(2) == K, "draft_layer: positions [B, S] int64 and mask [B, S, K] bool");
  const int64_t* at_ptr = nullptr;
  if (past_k.has_value()) {
    for (const at::Tensor* p : {&*past_k, &*past_v})
      TORCH_CHECK(p->dim() == 4 && p->size(0) == B && p->size(1) == Hkv && p->size(3) == D && p->is_contiguous() &&
                  p->sizes() == past_k->sizes() && p->scalar_type() == features.scalar_type(),
                  "draft_layer: past_k and past_v must be [B, Hkv, K, D], contiguous, of features' dtype");
    TORCH_CHECK(key_at->scalar_type() == at::kLong && key_at->is_contiguous() && key_at->numel() == S,
                "draft_layer: at must be [S] int64");
    at_ptr = key_at->const_data_ptr<int64_t>();
    for (int64_t s = 0; s < S; ++s) TORCH_CHECK(at_ptr[s] >= 0 && at_ptr[s] < K, "draft_layer: at is outside the keys");
  }
  const auto dtype = features.scalar_type();
  TORCH_CHECK(mlp_norm.is_contiguous() && mlp_norm.scalar_type() == dtype && mlp_norm.numel() == C,
              "draft_layer: mlp_norm must be [C], contiguous, of features' dtype");
  for (const std::optional<at::Tensor>* w : {&fc_b, &attn_norm})
    TORCH_CHECK(!w->has_value() || ((*w)->is_contiguous() && (*w)->scalar_type() == dtype &&
                                    (*w)->numel() == C), "draft_layer: fc's bias and attn_norm must be [C]");
  // each weight in our product's order, of features' dtype, or rounded to int8 (`quantize_weight`)
  TORCH_CHECK(weight_fits(fc_w, dtype, C, 2 * C, C) && weight_fits(qkv_w, dtype, (H + 2 * Hkv) * D, C) &&
              weight_fits(o_w, dtype, C, C) && weight_fits(gate_up_w, dtype, 2 * I, C) &&
              weight_fits(down_w, dtype, C, I) &&
              inv_freq.scalar_type() == at::kFloat && inv_freq.is_contiguous() && inv_freq.numel() == D / 2,
              "draft_layer: a weight does not fit: [N, K] in our order, of features' dtype, or int8 from "
              "quantize_weight");
  TORCH_CHECK(queries >= 1 && queries <= S, "draft_layer: queries must be in [1, S]");
  at::Tensor out = at::empty({B, queries, C}, features.options());
  // every key is written: past's, then this call's over them (without past, this call's are all of them)
  at::Tensor k = at::empty({B, Hkv, K, D}, features.options()), v = at::empty({B, Hkv, K, D}, features.options());
  auto run = [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    draft_layer_of<T>(features, embeds, positions, mask, past_k.has_value() ? past_k->const_data_ptr<T>() : nullptr,
                      past_v.has_value() ? past_v->const_data_ptr<T>() : nullptr, at_ptr, k, v, fc_w, fc_b,
                      attn_norm, qkv_w, o_w, mlp_norm, gate_up_w, down_w, inv_freq, float(eps), H, out);
  };
  if (features.scalar_type() == at::kFloat) {
    run(static_cast<float*>(nullptr));
  } else {
    TORCH_CHECK(features.scalar_type() == at::kBFloat16, "draft_layer: float32 or bfloat16 only");
    run(static_cast<c10::BFloat16*>(nullptr));
  }
  return {out, k, v};
}

// For each cache [N, Hkv, S_max, D] and each sequence b: the entries at positions src[b, :] move to
// dst[b, :] of slot slots[b], all read before any is written. What `KVCache.commit` does after a
// speculative step, in one call instead of four indexing operations per layer (SmolLM2's 30 layers:
// ~0.8 ms of a ~20 ms step, bf16, AMD EPYC Zen 5).
void move_positions(at::TensorList caches, const at::Tensor& slots, const at::Tensor& src, const at::Tensor& dst) {
  TORCH_CHECK(slots.scalar_type() == at::kLong && src.scalar_type() == at::kLong && dst.scalar_type() == at::kLong &&
              slots.is_contiguous() && src.is_contiguous() && dst.is_contiguous() && src.dim() == 2 &&
              src.sizes() == dst.sizes() && src.size(0) == slots.numel(),
              "move_positions: slots [B], src and dst [B, P], int64, contiguous");
  const int64_t B = src.size(0), P = src.size(1);
  const int64_t* slot = slots.const_data_ptr<int64_t>();
  const int64_t* from = src.const_data_ptr<int64_t>();
  const int64_t* to = dst.const_data_ptr<int64_t>();
  std::vector<char> moved;
  for (const at::Tensor& cache : caches) {
    TORCH_CHECK(cache.dim() == 4 && cache.is_contiguous(), "move_positions: caches must be [N, Hkv, S_max, D], contiguous");
    const int64_t N = cache.size(0), Hkv = cache.size(1), S = cache.size(2);
    const int64_t entry = cache.size(3) * cache.element_size();  // bytes of one position's D values
    char* base = static_cast<char*>(cache.data_ptr());
    moved.resize(P * entry);
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(slot[b] >= 0 && slot[b] < N, "move_positions: slot ", slot[b], " is outside the cache");
      for (int64_t p = 0; p < P; ++p)
        TORCH_CHECK(from[b * P + p] >= 0 && from[b * P + p] < S && to[b * P + p] >= 0 && to[b * P + p] < S,
                    "move_positions: a position is outside the cache");
      for (int64_t h = 0; h < Hkv; ++h) {
        char* row = base + ((slot[b] * Hkv + h) * S) * entry;  // [S_max, D] of this slot and head
        // an entry already in its place (the root, a node not kept) stays: its cache lines, cold after the
        // forward, are not read and written back (`KVCache.commit` 0.14-0.15 -> 0.06-0.07 ms a step, median,
        // SmolLM2 bf16, the heads' tree, AMD EPYC Zen 5, two runs of 8 dev prompts each)
        const int64_t* f = from + b * P;
        const int64_t* t = to + b * P;
        for (int64_t p = 0; p < P; ++p)
          if (f[p] != t[p]) std::memcpy(moved.data() + p * entry, row + f[p] * entry, entry);
        for (int64_t p = 0; p < P; ++p)
          if (f[p] != t[p]) std::memcpy(row + t[p] * entry, moved.data() + p * entry, entry);
      }
    }
  }
}

// Each row's argmax (the first of equal maxima; NaN counts as -inf, so it is never chosen), and the
// logsumexp of the rows a step keeps: what a greedy step reads of the logits (the tokens after every
// tree node; the log-probabilities of those it accepts). In PyTorch these were a copy per path node and
// three reductions, each slow over a vocabulary: 8 rows of SmolLM2's 49152, AMD EPYC Zen 5, argmax 124
// us, logsumexp of 3 of them 75 us. The logsumexp's exponentials cost ~4x the argmax's pass, so only
// the kept rows take them (`logsumexp_at`), not all of a tree's: SmolLM2's vocabulary, 3 of 16 nodes kept,
// Intel Xeon (AMX), 2 threads, builds taking turns twice, argmax and logsumexp of every row 156.6 / 156.0
// us -> the argmax of every row and the logsumexp of the kept 77.4 / 82.1 us (one row: 20.4 / 20.8 ->
// 25.3 / 24.7, a second call).

// x's largest value and the first index that holds it (index 0 where every value is -inf or NaN)
void argmax_row(const float* x, int64_t V, int64_t* best, float* most) {
  using I = Lanes<f32xN>::i32;
  const float inf = std::numeric_limits<float>::infinity();
  const int64_t V16 = V / 16 * 16;
  f32xN top = splatN(-inf);
  I at = {}, index = {};
  for (int i = 0; i < kLanes; ++i) index[i] = i;
  for (int64_t v = 0; v < V16; v += kLanes, index += kLanes) {  // per lane: the first of its largest
    const f32xN xv = loadN(x + v);
    const auto above = xv > top;  // false for NaN
    top = above ? xv : top;
    at = above ? index : at;
  }
  float m = -inf;
  int64_t arg = 0;  // all -inf (or NaN): the first
  for (int i = 0; i < kLanes; ++i)
    if (top[i] > m || (top[i] == m && at[i] < arg)) m = top[i], arg = at[i];
  for (int64_t v = V16; v < V; ++v)
    if (x[v] > m) m = x[v], arg = v;
  *best = arg, *most = m;
}

// log(sum(e^x)) over x's numbers (NaN left out), m its largest value (`argmax_row`)
float logsumexp_row(const float* x, int64_t V, float m) {
  if (m == -std::numeric_limits<float>::infinity() || m == std::numeric_limits<float>::infinity())
    return m;  // nothing finite to weigh, or an infinite logit: PyTorch's answers
  const int64_t V16 = V / 16 * 16;
  Sum16 sums;
  for (int64_t v = 0; v < V16; v += 16) sums.add(x + v, [m](f32xN xv) { return exp_from(xv, m); });
  float total = sums.total();
  for (int64_t v = V16; v < V; ++v)
    if (x[v] == x[v]) total += std::exp(x[v] - m);
  return m + std::log(total);
}

// x [..., V] float32 -> each row's argmax [...] int64
at::Tensor argmax_rows(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() >= 1 && x.size(-1) > 0,
              "argmax_rows: x must be float32 [..., V], V > 0");
  const at::Tensor xc = x.contiguous();
  const int64_t V = x.size(-1), M = x.numel() / V;
  at::Tensor best = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kLong));
  const float* data = xc.const_data_ptr<float>();
  int64_t* b = best.mutable_data_ptr<int64_t>();
  at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
    float most;
    for (int64_t m = begin; m < end; ++m) argmax_row(data + m * V, V, b + m, &most);
  });
  return best;
}

// x [B, T, V] float32, path [B, P] int64 (rows of x) -> [B, P]: x.logsumexp(-1).gather(1, path), each row
// that path names computed once (a step's path repeats its root past the accepted nodes)
at::Tensor logsumexp_at(const at::Tensor& x, const at::Tensor& path) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 3 && x.size(2) > 0 && path.scalar_type() == at::kLong &&
              path.dim() == 2 && path.size(0) == x.size(0), "logsumexp_at: x must be float32 [B, T, V], path [B, P] "
              "int64");
  const at::Tensor xc = x.contiguous(), pc = path.contiguous();
  const int64_t B = x.size(0), T = x.size(1), V = x.size(2), P = path.size(1);
  const int64_t* at_row = pc.const_data_ptr<int64_t>();
  std::vector<int64_t> rows, which(B * P);  // the rows b * T + t, each once; path entry i's among them
  for (int64_t i = 0; i < B * P; ++i) {
    TORCH_CHECK(at_row[i] >= 0 && at_row[i] < T, "logsumexp_at: a path node is outside the rows");
    const int64_t row = i / P * T + at_row[i];
    const auto seen = std::find(rows.begin(), rows.end(), row);
    which[i] = seen - rows.begin();
    if (seen == rows.end()) rows.push_back(row);
  }
  std::vector<float> lse(rows.size());
  const float* data = xc.const_data_ptr<float>();
  at::parallel_for(0, int64_t(rows.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      int64_t best;
      float most;
      argmax_row(data + rows[r] * V, V, &best, &most);
      lse[r] = logsumexp_row(data + rows[r] * V, V, most);
    }
  });
  at::Tensor out = at::empty({B, P}, x.options());
  float* o = out.mutable_data_ptr<float>();
  for (int64_t i = 0; i < B * P; ++i) o[i] = lse[which[i]];
  return out;
}

// Greedy acceptance of B trees in one call: `medusa.acceptance.accept_greedy`'s PyTorch lines are the
// reference, and this reads the same way. A node is correct if it is its parent's argmax (the root
// always); the kept path is the retrieve row with the longest correct prefix, the first of equal ones;
// the next token is the argmax at its last node. Those lines are ~25 operations on a few dozen
// numbers, and after a verification forward has streamed the weights through the caches each one runs
// cold: SmolLM2 bf16, AMD EPYC Zen 5, 12 dev prompts, the two taking turns, the reference 0.271 ms a step
// (median), this 0.026 (the reference called again at once: ~0.05).
// candidates, best, parents [B, T]; retrieve [B, R, P] (-1 padded); int64, any strides (a static
// tree's are expanded) -> accepted_len [B], path [B, P] (0 past accepted_len), next token [B]
std::tuple<at::Tensor, at::Tensor, at::Tensor> accept_greedy(const at::Tensor& candidates, const at::Tensor& best,
                                                             const at::Tensor& parents, const at::Tensor& retrieve) {
  TORCH_CHECK(candidates.scalar_type() == at::kLong && best.scalar_type() == at::kLong &&
              parents.scalar_type() == at::kLong && retrieve.scalar_type() == at::kLong && candidates.dim() == 2 &&
              best.sizes() == candidates.sizes() && parents.sizes() == candidates.sizes() && retrieve.dim() == 3 &&
              retrieve.size(0) == candidates.size(0) && candidates.size(1) > 0,
              "accept_greedy: candidates, best, parents [B, T] and retrieve [B, R, P], int64");
  const int64_t B = candidates.size(0), T = candidates.size(1), R = retrieve.size(1), P = retrieve.size(2);
  const auto cand = candidates.accessor<int64_t, 2>(), top = best.accessor<int64_t, 2>(),
             parent = parents.accessor<int64_t, 2>();
  const auto paths = retrieve.accessor<int64_t, 3>();
  const auto options = candidates.options();
  at::Tensor accepted = at::empty({B}, options), path = at::zeros({B, P}, options), next = at::empty({B}, options);
  int64_t* accepted_len = accepted.mutable_data_ptr<int64_t>();
  int64_t* kept = path.mutable_data_ptr<int64_t>();
  int64_t* next_token = next.mutable_data_ptr<int64_t>();
  std::vector<char> correct(T);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < T; ++t) {
      const int64_t up = parent[b][t];
      TORCH_CHECK(up < T, "accept_greedy: a parent is outside the tree");
      correct[t] = t == 0 || cand[b][t] == top[b][std::max<int64_t>(up, 0)];
    }
    int64_t longest = 0, row = 0;
    for (int64_t r = 0; r < R; ++r) {
      int64_t n = 0;
      while (n < P && paths[b][r][n] >= 0 && paths[b][r][n] < T && correct[paths[b][r][n]]) ++n;
      if (n > longest) longest = n, row = r;
    }
    TORCH_CHECK(longest > 0, "accept_greedy: no path starts at the root");
    accepted_len[b] = longest;
    for (int64_t p = 0; p < longest; ++p) kept[b * P + p] = paths[b][row][p];
    next_token[b] = top[b][kept[b * P + longest - 1]];
  }
  return {accepted, path, next};
}

}  // namespace

namespace medusa_cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor> draft_layer_with(
    const DraftLayerOperands& l, const at::Tensor& features, const at::Tensor& embeds, const at::Tensor& positions,
    const at::Tensor& mask, const std::optional<at::Tensor>& past_k, const std::optional<at::Tensor>& past_v,
    const std::optional<at::Tensor>& key_at, int64_t queries) {
  return draft_layer(features, embeds, positions, mask, past_k, past_v, key_at, l.fc_w, l.fc_b, l.attn_norm, l.qkv_w,
                     l.o_w, l.mlp_norm, l.gate_up_w, l.down_w, l.inv_freq, l.eps, l.num_heads, l.num_kv_heads, queries);
}

}  // namespace medusa_cpu

TORCH_LIBRARY_IMPL(medusa, CPU, m) {
  m.impl("accept_greedy", &accept_greedy);
  m.impl("argmax_rows", &argmax_rows);
  m.impl("decoder_layers", &decoder_layers);
  m.impl("draft_layer", &draft_layer);
  m.impl("logsumexp_at", &logsumexp_at);
  m.impl("move_positions", &move_positions);
  m.impl("rms_norm", &rms_norm);
  m.impl("rope", &rope);
  m.impl("silu_mul", &silu_mul);
}
