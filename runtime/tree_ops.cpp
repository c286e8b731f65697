// A dynamic tree's drafting glue on the CPU, each in one call: the k best log-probabilities of a
// drafter's rows (`top_logp`), path-input heads' and the draft layer's growth of the candidates
// (`heads_draft`, `eagle_draft`), and the choice of each row's tree from its candidates (`select_tree`).
// `medusa.dynamic` and `medusa.draft` call them while serving on the CPU, and their PyTorch lines there are
// the reference (`top_logp`, `heads_logits` under `grow`, `select` and `rows_of`). Those lines are ~240 operations on a few hundred numbers a step,
// and after a verification forward has streamed the weights through the caches each runs cold (as
// `accept_greedy`, layer_ops.cpp, measured). SmolLM2 bf16 with its heads and `dynamic-cpu-bf16`, AMD EPYC
// (Zen 5), 12 dev prompts, the two taking turns: drafting 1.218 -> 0.934 ms a step (median), 201.4 ->
// 210.7 tok/s, the same tokens.
//
// Drafts only propose tokens: what these choose changes how many tokens a step accepts, never which.

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <numeric>
#include <tuple>
#include <vector>

#include "cpu_kernels.h"  // rows_product_of
#include "cpu_vectors.h"

namespace {

using namespace medusa_cpu;

// The k largest of row x [V] under log_softmax, best first (ties: the lower index first; NaN never
// before a number), in two passes: the max, then the sum of e^(x - max) and the running top k, which
// 16 values pass by with a comparison a register unless a lane beats the k-th so far.
void top_logp_row(const float* x, int64_t V, int64_t k, float* values, int64_t* indices) {
  const int64_t V16 = V / 16 * 16;
  const float m = max_of(x, V);
  int64_t count = 0;  // values[0 .. count) sorted, best first
  auto offer = [&](int64_t v) {
    const float xv = x[v];
    if (count == k && !(xv > values[k - 1])) return;
    int64_t at = std::min(count, k - 1);
    while (at > 0 && (xv > values[at - 1] || values[at - 1] != values[at - 1])) {  // NaN sinks
      values[at] = values[at - 1], indices[at] = indices[at - 1];
      --at;
    }
    values[at] = xv, indices[at] = v;
    count = std::min(count + 1, k);
  };
  Sum16 sums;
  for (int64_t v = 0; v < V16; v += 16) {
    sums.add(x + v, [m](f32xN xv) { return exp_from(xv, m); });
    bool any = count < k;
    for (int j = 0; j < 16 / kLanes && !any; ++j) {
      const auto beats = loadN(x + v + j * kLanes) > splatN(values[k - 1]);
      for (int i = 0; i < kLanes; ++i) any |= beats[i] != 0;
    }
    if (any)
      for (int i = 0; i < 16; ++i) offer(v + i);
  }
  float total = sums.total();
  for (int64_t v = V16; v < V; ++v) {
    if (x[v] == x[v]) total += std::exp(x[v] - m);
    offer(v);
  }
  const float log_total = std::log(total);
  for (int64_t i = 0; i < k; ++i) values[i] = values[i] - m - log_total;  // log_softmax's order of operations
}

// logits [..., V] float32 -> (the k largest log-probabilities [..., k], best first; their indices
// [..., k] int64): `logits.log_softmax(-1).topk(k)`
std::tuple<at::Tensor, at::Tensor> top_logp(const at::Tensor& logits, int64_t k) {
  TORCH_CHECK(logits.scalar_type() == at::kFloat && logits.dim() >= 1 && k >= 1 && k <= logits.size(-1),
              "top_logp: logits must be float32 [..., V] and 1 <= k <= V");
  const at::Tensor x = logits.contiguous();
  const int64_t V = x.size(-1), M = x.numel() / V;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = k;
  at::Tensor values = at::empty(shape, x.options()), indices = at::empty(shape, x.options().dtype(at::kLong));
  const float* data = x.const_data_ptr<float>();
  for (int64_t m = 0; m < M; ++m)
    top_logp_row(data + m * V, V, k, values.mutable_data_ptr<float>() + m * k,
                 indices.mutable_data_ptr<int64_t>() + m * k);
  return {values, indices};
}

// order's first k: the indices of the k largest keys, best first (ties: the lower index first)
template <typename Key>
void best_first(std::vector<int64_t>& order, int64_t k, const Key& key) {
  std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int64_t i, int64_t j) {
    return key[i] > key[j] || (key[i] == key[j] && i < j);
  });
}

// Path-input Medusa heads grow a dynamic tree's candidates (`medusa.dynamic.grow` over
// `medusa.draft.heads_logits`, whose lines are the reference) in one call. Level 0: head 0 reads the hidden
// state and the root's embedding, and its k best tokens are the root's children; level d: the k best-scored
// candidates of level d - 1 are expanded, head d reading each one's path (the root, then the tokens down to
// it), each giving its k best children. A head is x = h + fuse_d([h; path embeddings]), then residual blocks
// x + silu(W x + b), then the scored rows of the lm_head; a node's score is its path's summed
// log-probabilities. The same products as the reference (ours, `rows_product_of`); silu's exponential may
// round differently from PyTorch's, which drafts tolerate. The reference is ~60 operations around the
// products of a step's two levels: SmolLM2 bf16 with its heads and `dynamic-cpu-bf16`, AMD EPYC (Zen 5), 12
// dev prompts, the two taking turns: drafting 0.867 -> 0.621 ms a step (median), 212.0 -> 219.0 tok/s,
// the same tokens.
// hidden [B, C]; roots [B]; embed [V, C]; per head d < depth: fuse_w[d] ([C, (d + 2) C], our order) and
// fuse_b[d] [C], block_w / block_b [d * layers + l] ([C, C] in our order, [C]); proj_w [V', C] in our order;
// draft_vocab [V'] token ids (or empty: index = token) -> tokens, parents (-1: the root), ranks [B, M] int64
// and scores [B, M] float32, M = k + (depth - 1) k^2, in level order
template <typename T>
void heads_draft_of(const T* hidden, const int64_t* roots, const T* embed, int64_t V, int64_t C,
                    at::TensorList fuse_w, at::TensorList fuse_b, at::TensorList block_w, at::TensorList block_b,
                    int64_t layers,
                    const at::Tensor& proj, int64_t Vd, const int64_t* vocab, int64_t B, int64_t k, int64_t depth,
                    int64_t* tokens, int64_t* parents, float* scores, int64_t* ranks) {
  const int64_t M = k + (depth - 1) * k * k;
  std::vector<T> input(k * (depth + 1) * C), x(k * C), y(k * C), logits(k * Vd);
  std::vector<float> logits32(Vd), values(k);
  std::vector<int64_t> indices(k), path(depth + 1), nodes(k);
  std::vector<float> best(k);
  for (int64_t b = 0; b < B; ++b) {
    const T* h = hidden + b * C;
    int64_t* tok = tokens + b * M;
    int64_t* par = parents + b * M;
    float* sc = scores + b * M;
    int64_t* rk = ranks + b * M;
    int64_t level_start = 0, level_size = 0, made = 0;
    for (int64_t d = 0; d < depth; ++d) {
      const int64_t n = d == 0 ? 1 : k;  // rows this level's head reads
      if (d > 0) {  // the level's k best candidates (ties: the first), best first
        std::vector<int64_t> order(level_size);
        std::iota(order.begin(), order.end(), level_start);
        best_first(order, k, sc);
        for (int64_t i = 0; i < k; ++i) nodes[i] = order[i], best[i] = sc[order[i]];
      }
      const int64_t width = (d + 2) * C;
      for (int64_t r = 0; r < n; ++r) {  // [h; root; tokens down to the node]
        T* in = input.data() + r * width;
        std::memcpy(in, h, C * sizeof(T));
        int64_t node = d == 0 ? -1 : nodes[r];
        for (int64_t j = d; j >= 1; --j, node = par[node]) path[j] = tok[node];
        path[0] = roots[b];
        for (int64_t j = 0; j <= d; ++j) {
          TORCH_CHECK(path[j] >= 0 && path[j] < V, "heads_draft: a token is outside the embedding");
          std::memcpy(in + (j + 1) * C, embed + path[j] * C, C * sizeof(T));
        }
      }
      // [h; root; path]: int8 rows take a scale for each (`int8_product.cpp`)
      product_of(static_cast<const T*>(input.data()), n, fuse_w[d], C, width, fuse_b[d].const_data_ptr<T>(), y.data(),
                 static_cast<const T*>(nullptr), C);
      for (int64_t r = 0; r < n; ++r)
        for (int64_t c = 0; c < C; ++c) x[r * C + c] = T(float(h[c]) + float(y[r * C + c]));
      for (int64_t l = 0; l < layers; ++l) {
        product_of(static_cast<const T*>(x.data()), n, block_w[d * layers + l], C, C,
                   block_b[d * layers + l].const_data_ptr<T>(), y.data());
        for (int64_t i = 0; i < n * C; ++i) {
          const float v = float(y[i]);
          x[i] = T(float(x[i]) + float(T(v / (1.0f + std::exp(-v)))));
        }
      }
      product_of(static_cast<const T*>(x.data()), n, proj, Vd, C, static_cast<const T*>(nullptr), logits.data());
      for (int64_t r = 0; r < n; ++r) {
        for (int64_t v = 0; v < Vd; ++v) logits32[v] = float(logits[r * Vd + v]);
        top_logp_row(logits32.data(), Vd, k, values.data(), indices.data());
        for (int64_t i = 0; i < k; ++i, ++made) {
          tok[made] = vocab == nullptr ? indices[i] : vocab[indices[i]];
          sc[made] = d == 0 ? values[i] : best[r] + values[i];
          par[made] = d == 0 ? -1 : nodes[r];
          rk[made] = i;
        }
      }
      level_start = made - n * k, level_size = n * k;
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> heads_draft(
    const at::Tensor& hidden, const at::Tensor& roots, const at::Tensor& embed, at::TensorList fuse_w,
    at::TensorList fuse_b, at::TensorList block_w, at::TensorList block_b, const at::Tensor& proj_w,
    const std::optional<at::Tensor>& draft_vocab, int64_t topk, int64_t depth) {
  TORCH_CHECK(hidden.dim() == 2 && hidden.is_contiguous() && embed.dim() == 2 && embed.is_contiguous() &&
              embed.size(1) == hidden.size(1) && embed.scalar_type() == hidden.scalar_type() &&
              roots.scalar_type() == at::kLong && roots.is_contiguous() && roots.numel() == hidden.size(0),
              "heads_draft: hidden [B, C], roots [B] int64 and embed [V, C] of hidden's dtype");
  const int64_t B = hidden.size(0), C = hidden.size(1), V = embed.size(0), k = topk;
  const int64_t heads = int64_t(fuse_w.size()), layers = heads == 0 ? 0 : int64_t(block_w.size()) / heads;
  TORCH_CHECK(depth >= 1 && depth <= heads && int64_t(fuse_b.size()) == heads && layers * heads == int64_t(block_w.size()) &&
              block_b.size() == block_w.size(), "heads_draft: a fuse and `layers` blocks per head, depth at most the heads");
  const int64_t Vd = proj_w.size(0);
  TORCH_CHECK(proj_w.dim() == 2 && k >= 1 && k <= Vd, "heads_draft: proj_w [V', C], 1 <= topk <= V'");
  const auto dtype = hidden.scalar_type();
  auto fits = [&](const at::Tensor& t, int64_t numel) {  // a bias
    return t.is_contiguous() && t.scalar_type() == dtype && t.numel() == numel;
  };
  // each weight in our product's order, of hidden's dtype, or rounded to int8 (`quantize_weight`)
  TORCH_CHECK(weight_fits(proj_w, dtype, Vd, C), "heads_draft: proj_w must be contiguous, of hidden's dtype or int8");
  for (int64_t d = 0; d < heads; ++d) {
    TORCH_CHECK(weight_fits(fuse_w[d], dtype, C, (d + 2) * C, C) && fits(fuse_b[d], C),
                "heads_draft: head ", d, "'s fuse does not fit");
    for (int64_t l = 0; l < layers; ++l)
      TORCH_CHECK(weight_fits(block_w[d * layers + l], dtype, C, C) && fits(block_b[d * layers + l], C),
                  "heads_draft: head ", d, "'s blocks do not fit");
  }
  const int64_t* vocab = nullptr;
  if (draft_vocab.has_value()) {
    TORCH_CHECK(draft_vocab->scalar_type() == at::kLong && draft_vocab->is_contiguous() && draft_vocab->numel() == Vd,
                "heads_draft: draft_vocab must be [V'] int64");
    vocab = draft_vocab->const_data_ptr<int64_t>();
  }
  const int64_t M = k + (depth - 1) * k * k;
  const auto options = roots.options();
  at::Tensor tokens = at::empty({B, M}, options), parents = at::empty({B, M}, options), ranks = at::empty({B, M}, options);
  at::Tensor scores = at::empty({B, M}, options.dtype(at::kFloat));
  auto run = [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    heads_draft_of<T>(hidden.const_data_ptr<T>(), roots.const_data_ptr<int64_t>(), embed.const_data_ptr<T>(), V, C,
                      fuse_w, fuse_b, block_w, block_b, layers, proj_w, Vd, vocab, B, k, depth,
                      tokens.mutable_data_ptr<int64_t>(), parents.mutable_data_ptr<int64_t>(),
                      scores.mutable_data_ptr<float>(), ranks.mutable_data_ptr<int64_t>());
  };
  if (hidden.scalar_type() == at::kFloat) {
    run(static_cast<float*>(nullptr));
  } else {
    TORCH_CHECK(hidden.scalar_type() == at::kBFloat16, "heads_draft: float32 or bfloat16 only");
    run(static_cast<c10::BFloat16*>(nullptr));
  }
  return {tokens, parents, scores, ranks};
}

// The EAGLE-style draft layer grows a dynamic tree's candidates (`medusa.dynamic.grow` over
// `medusa.eagle.dynamic_logits`, whose lines are the reference) in one call: the layer on the window's
// pairs guesses the root's feature; level d's k best-scored candidates are expanded, each one's pair (its
// parent's guessed feature, its token) attending to the window and to its expanded ancestors, whose keys
// stay in a buffer of W + (depth - 1) k; each guess is scored by the scored lm_head rows. The layer's calls
// and the products are the reference's (`draft_layer`, ours); what this saves is the ~100 PyTorch
// operations around them a step (~0.7 ms of a ~16 ms step). SmolLM2 bf16 with its shipped layer, Intel
// Xeon (AMX), 20 dev prompts, the builds taking turns in two rounds, speedup over plain: the default
// `eagle-dynamic-cpu` 1.728x / 1.741x -> 1.844x / 1.873x, a tree of 3 levels (dynamic:8,topk=4,depth=3,
// lookup=4) 1.764x / 1.771x -> 1.848x / 1.859x, the same tokens.
// features [B, W, C] and tokens [B, W] (the last W cached positions' final hidden states and tokens,
// oldest first), lens [B] cached tokens, roots [B]; embed [V, C]; the layer's operands as `draft_layer`
// takes them; proj_w [V', C] in our order; draft_vocab [V'] or none; topk k, depth -> tokens, parents (-1:
// the root), ranks [B, M] int64 and scores [B, M] float32, M = k + (depth - 1) k^2, in level order
template <typename T>
void eagle_draft_of(const at::Tensor& features, const int64_t* window_tokens, const int64_t* lens,
                    const int64_t* roots, const T* embed, int64_t V, const DraftLayerOperands& layer,
                    const at::Tensor& proj, int64_t Vd, const int64_t* vocab, int64_t k, int64_t depth, int64_t* tok,
                    int64_t* par, float* sc,
                    int64_t* rk) {
  const int64_t B = features.size(0), W = features.size(1), C = features.size(2);
  const int64_t M = k + (depth - 1) * k * k, E = (depth - 1) * k;
  const auto opts = features.options(), longs = opts.dtype(at::kLong), bools = opts.dtype(at::kBool);
  auto embed_row = [&](int64_t token, T* to) {
    TORCH_CHECK(token >= 0 && token < V, "eagle_draft: a token is outside the embedding");
    std::memcpy(to, embed + token * C, C * sizeof(T));
  };
  // the window: pair w is (feature w, the token after it: the next cached one, or the root), zeroed where
  // the sequence is shorter than W; it sees the pairs before it that hold a position, and itself
  at::Tensor f = at::zeros({B, W, C}, opts), after = at::empty({B, W, C}, opts);
  at::Tensor positions = at::empty({B, W}, longs), seen = at::empty({B, W, W}, bools);
  std::vector<char> filled(B * W);
  const T* fs = features.const_data_ptr<T>();
  T* fp = f.mutable_data_ptr<T>();
  T* ap = after.mutable_data_ptr<T>();
  int64_t* pp = positions.mutable_data_ptr<int64_t>();
  bool* sp = seen.mutable_data_ptr<bool>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t w = 0; w < W; ++w) {
      const int64_t i = b * W + w;
      pp[i] = lens[b] - W + w;
      filled[i] = pp[i] >= 0;
      if (filled[i]) std::memcpy(fp + i * C, fs + i * C, C * sizeof(T));
      embed_row(w + 1 < W ? window_tokens[i + 1] : roots[b], ap + i * C);
    }
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < W; ++i)
      for (int64_t j = 0; j < W; ++j) sp[(b * W + i) * W + j] = j <= i && (filled[b * W + j] || i == j);
  auto [root_guess, window_k, window_v] =
      draft_layer_with(layer, f, after, positions, seen, std::nullopt, std::nullopt, std::nullopt, 1);
  const int64_t Hkv = window_k.size(1), D = window_k.size(3);
  at::Tensor keys = at::zeros({B, Hkv, W + E, D}, opts), values = at::zeros({B, Hkv, W + E, D}, opts);
  keys.narrow(2, 0, W).copy_(window_k);
  values.narrow(2, 0, W).copy_(window_v);

  std::vector<T> guessed(B * std::max<int64_t>(E, 1) * C);  // each expanded row's guessed feature
  std::vector<char> ancestors(B * std::max<int64_t>(E, 1) * std::max<int64_t>(E, 1));  // expanded row sees row
  std::vector<int64_t> row_of(B * M, 0);  // a candidate's expanded row
  std::vector<T> logits(B * k * Vd);
  std::vector<float> logits32(Vd), values_k(k);
  std::vector<int64_t> indices(k);
  auto score = [&](const T* states, int64_t n, auto&& take) {  // n guesses -> each one's k best children
    product_of(states, n, proj, Vd, C, static_cast<const T*>(nullptr), logits.data());
    for (int64_t r = 0; r < n; ++r) {
      for (int64_t v = 0; v < Vd; ++v) logits32[v] = float(logits[r * Vd + v]);
      top_logp_row(logits32.data(), Vd, k, values_k.data(), indices.data());
      for (int64_t i = 0; i < k; ++i) take(r, i, vocab == nullptr ? indices[i] : vocab[indices[i]], values_k[i]);
    }
  };
  const T* root = root_guess.const_data_ptr<T>();  // [B, 1, C]
  score(root, B, [&](int64_t b, int64_t i, int64_t token, float value) {
    tok[b * M + i] = token, sc[b * M + i] = value, par[b * M + i] = -1, rk[b * M + i] = i;
  });
  int64_t level_start = 0, made = k;
  std::vector<int64_t> nodes(B * k);
  std::vector<float> best(B * k);
  for (int64_t d = 1; d < depth; ++d) {
    at::Tensor parent_f = at::empty({B, k, C}, opts), node_emb = at::empty({B, k, C}, opts);
    at::Tensor pos = at::empty({B, k}, longs), mask = at::zeros({B, k, W + E}, bools), at_keys = at::empty({k}, longs);
    T* pf = parent_f.mutable_data_ptr<T>();
    T* ne = node_emb.mutable_data_ptr<T>();
    bool* mk = mask.mutable_data_ptr<bool>();
    const int64_t first_row = (d - 1) * k;  // this level's expanded rows: first_row .. first_row + k - 1
    for (int64_t i = 0; i < k; ++i) at_keys.mutable_data_ptr<int64_t>()[i] = W + first_row + i;
    for (int64_t b = 0; b < B; ++b) {
      std::vector<int64_t> order(made - level_start);
      std::iota(order.begin(), order.end(), level_start);
      best_first(order, k, sc + b * M);
      for (int64_t i = 0; i < k; ++i) {
        const int64_t node = order[i], row = first_row + i;
        nodes[b * k + i] = node, best[b * k + i] = sc[b * M + node];
        bool* sees = mk + (b * k + i) * (W + E);
        for (int64_t w = 0; w < W; ++w) sees[w] = filled[b * W + w];
        if (d == 1) {  // the root's children: their parent's feature is the window's guess
          std::memcpy(pf + (b * k + i) * C, root + b * C, C * sizeof(T));
        } else {
          const int64_t parent_row = row_of[b * M + par[b * M + node]];
          std::memcpy(pf + (b * k + i) * C, guessed.data() + (b * E + parent_row) * C, C * sizeof(T));
          for (int64_t e = 0; e < E; ++e) sees[W + e] = ancestors[(b * E + parent_row) * E + e];
        }
        sees[W + row] = true;
        embed_row(tok[b * M + node], ne + (b * k + i) * C);
        pos.mutable_data_ptr<int64_t>()[b * k + i] = lens[b] - 1 + d;
      }
    }
    auto [out, k2, v2] = draft_layer_with(layer, parent_f, node_emb, pos, mask, keys, values, at_keys, k);
    keys = k2, values = v2;
    const T* o = out.const_data_ptr<T>();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < k; ++i) {
        const int64_t row = first_row + i;
        std::memcpy(guessed.data() + (b * E + row) * C, o + (b * k + i) * C, C * sizeof(T));
        for (int64_t e = 0; e < E; ++e) ancestors[(b * E + row) * E + e] = mk[(b * k + i) * (W + E) + W + e];
        row_of[b * M + nodes[b * k + i]] = row;
      }
    score(o, B * k, [&](int64_t r, int64_t j, int64_t token, float value) {
      const int64_t b = r / k, i = r % k, at = b * M + made + i * k + j;
      tok[at] = token, sc[at] = best[b * k + i] + value, par[at] = nodes[b * k + i], rk[at] = j;
    });
    level_start = made, made += k * k;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> eagle_draft(
    const at::Tensor& features, const at::Tensor& tokens, const at::Tensor& lens, const at::Tensor& roots,
    const at::Tensor& embed, const at::Tensor& fc_w, const std::optional<at::Tensor>& fc_b,
    const std::optional<at::Tensor>& attn_norm, const at::Tensor& qkv_w, const at::Tensor& o_w,
    const at::Tensor& mlp_norm, const at::Tensor& gate_up_w, const at::Tensor& down_w, const at::Tensor& inv_freq,
    double eps, int64_t num_heads, int64_t num_kv_heads, const at::Tensor& proj_w,
    const std::optional<at::Tensor>& draft_vocab, int64_t topk, int64_t depth) {
  TORCH_CHECK(features.dim() == 3 && features.is_contiguous() && embed.dim() == 2 && embed.is_contiguous() &&
              embed.size(1) == features.size(2) && embed.scalar_type() == features.scalar_type(),
              "eagle_draft: features [B, W, C] and embed [V, C] of one dtype, contiguous");
  const int64_t B = features.size(0), W = features.size(1), C = features.size(2), k = topk;
  for (const at::Tensor* t : {&lens, &roots})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous() && t->numel() == B, "eagle_draft: lens and roots [B] int64");
  TORCH_CHECK(tokens.scalar_type() == at::kLong && tokens.is_contiguous() && tokens.numel() == B * W,
              "eagle_draft: tokens [B, W] int64");
  const int64_t Vd = proj_w.size(0);
  TORCH_CHECK(weight_fits(proj_w, features.scalar_type(), Vd, C) && k >= 1 && k <= Vd && depth >= 1,
              "eagle_draft: proj_w [V', C] of features' dtype (or int8 from quantize_weight), 1 <= topk <= V', "
              "depth >= 1");
  const int64_t* vocab = nullptr;
  if (draft_vocab.has_value()) {
    TORCH_CHECK(draft_vocab->scalar_type() == at::kLong && draft_vocab->is_contiguous() && draft_vocab->numel() == Vd,
                "eagle_draft: draft_vocab must be [V'] int64");
    vocab = draft_vocab->const_data_ptr<int64_t>();
  }
  const DraftLayerOperands layer{fc_w, fc_b, attn_norm, qkv_w, o_w, mlp_norm, gate_up_w, down_w, inv_freq, eps,
                                 num_heads, num_kv_heads};
  const int64_t M = k + (depth - 1) * k * k;
  const auto options = roots.options();
  at::Tensor out_tokens = at::empty({B, M}, options), parents = at::empty({B, M}, options), ranks = at::empty({B, M}, options);
  at::Tensor scores = at::empty({B, M}, options.dtype(at::kFloat));
  auto run = [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    eagle_draft_of<T>(features, tokens.const_data_ptr<int64_t>(), lens.const_data_ptr<int64_t>(),
                      roots.const_data_ptr<int64_t>(), embed.const_data_ptr<T>(), embed.size(0), layer,
                      proj_w, Vd, vocab, k, depth, out_tokens.mutable_data_ptr<int64_t>(),
                      parents.mutable_data_ptr<int64_t>(), scores.mutable_data_ptr<float>(), ranks.mutable_data_ptr<int64_t>());
  };
  if (features.scalar_type() == at::kFloat) {
    run(static_cast<float*>(nullptr));
  } else {
    TORCH_CHECK(features.scalar_type() == at::kBFloat16, "eagle_draft: float32 or bfloat16 only");
    run(static_cast<c10::BFloat16*>(nullptr));
  }
  return {out_tokens, parents, scores, ranks};
}

// Each row's tree from its M drafted candidates and L lookup guesses: `medusa.dynamic.select` and
// `rows_of` in one call, reading the same way. Candidates are in level order (k at depth 1, then k^2 a
// level); lookup node j (1..L) is a chain from the root, its token the row's guess or, without one,
// the root. Keys: a draft's score (clamped to -1e9), a guessed lookup node 1, an unguessed one
// -1e12 j; minus 1e-6 x depth, so a parent goes before its child. The T - 1 best keys (ties: the lower
// index) are the nodes below the root, in candidate order.
// tokens, parents, ranks [B, M] int64 and scores [B, M] float32 (`grow`); roots [B]; lookup [B, L]
// (-1 past a row's guesses); num_nodes T, topk k, depth (the deepest node, P - 1) -> candidates, depths,
// parents [B, T], mask [B, T, T], retrieve [B, T, P], child_table [B, T, k + (L > 0)]
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> select_tree(
    const at::Tensor& tokens, const at::Tensor& parents, const at::Tensor& scores, const at::Tensor& ranks,
    const at::Tensor& roots, const at::Tensor& lookup, int64_t num_nodes, int64_t topk, int64_t depth) {
  TORCH_CHECK(tokens.dim() == 2 && tokens.scalar_type() == at::kLong && parents.sizes() == tokens.sizes() &&
              parents.scalar_type() == at::kLong && ranks.sizes() == tokens.sizes() &&
              ranks.scalar_type() == at::kLong && scores.sizes() == tokens.sizes() &&
              scores.scalar_type() == at::kFloat && roots.dim() == 1 && roots.size(0) == tokens.size(0) &&
              roots.scalar_type() == at::kLong && lookup.dim() == 2 && lookup.size(0) == tokens.size(0) &&
              lookup.scalar_type() == at::kLong,
              "select_tree: tokens, parents, ranks [B, M] int64, scores [B, M] float32, roots [B], "
              "lookup [B, L] int64");
  const int64_t B = tokens.size(0), M = tokens.size(1), L = lookup.size(1), T = num_nodes, k = topk, P = depth + 1;
  TORCH_CHECK(k >= 1 && T >= 1 && T - 1 <= M + L && depth >= 0, "select_tree: T - 1 must be at most M + L");
  const int64_t width = k + (L > 0);
  const auto tok = tokens.accessor<int64_t, 2>(), up = parents.accessor<int64_t, 2>(),
             rank = ranks.accessor<int64_t, 2>(), guess = lookup.accessor<int64_t, 2>();
  const auto score = scores.accessor<float, 2>();
  const auto root = roots.accessor<int64_t, 1>();
  const auto options = tokens.options();
  at::Tensor candidates = at::empty({B, T}, options), node_depths = at::empty({B, T}, options),
             node_parents = at::empty({B, T}, options), mask = at::zeros({B, T, T}, options.dtype(at::kBool)),
             retrieve = at::full({B, T, P}, -1, options), child_table = at::full({B, T, width}, -1, options);
  int64_t* cand = candidates.mutable_data_ptr<int64_t>();
  int64_t* dep = node_depths.mutable_data_ptr<int64_t>();
  int64_t* par = node_parents.mutable_data_ptr<int64_t>();
  bool* sees = mask.mutable_data_ptr<bool>();
  int64_t* paths = retrieve.mutable_data_ptr<int64_t>();
  int64_t* children = child_table.mutable_data_ptr<int64_t>();

  std::vector<double> key(M + L);
  std::vector<int64_t> order(M + L), node_of(M + L), level(M + L);
  for (int64_t i = 0; i < M + L; ++i)  // depth: k candidates at 1, then k^2 a level; lookup node j at j
    level[i] = i < M ? (i < k ? 1 : 2 + (i - k) / (k * k)) : i - M + 1;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t i = 0; i < M; ++i) {  // a NaN score (broken drafter) ranks as the lowest
      const double s = score[b][i];
      key[i] = (s == s ? std::max(s, -1e9) : -1e9) - 1e-6 * double(level[i]);
    }
    for (int64_t j = 1; j <= L; ++j)
      key[M + j - 1] = (guess[b][j - 1] >= 0 ? 1.0 : -1e12 * double(j)) - 1e-6 * double(j);
    std::iota(order.begin(), order.end(), 0);
    best_first(order, T - 1, key);
    std::sort(order.begin(), order.begin() + (T - 1));  // candidate order: parents before children
    std::fill(node_of.begin(), node_of.end(), 0);
    for (int64_t n = 1; n < T; ++n) node_of[order[n - 1]] = n;

    int64_t* c = cand + b * T;
    int64_t* d = dep + b * T;
    int64_t* p = par + b * T;
    c[0] = root[b], d[0] = 0, p[0] = -1;
    for (int64_t n = 1; n < T; ++n) {
      const int64_t i = order[n - 1];
      int64_t parent, node_rank;  // as candidate indices (-1: the root), rank among the parent's children
      if (i < M) {
        c[n] = tok[b][i], parent = up[b][i], node_rank = rank[b][i];
      } else {
        const int64_t j = i - M + 1;
        c[n] = guess[b][j - 1] >= 0 ? guess[b][j - 1] : root[b];
        parent = j > 1 ? M + j - 2 : -1, node_rank = j > 1 ? 0 : k;  // the root's lookup child last
      }
      TORCH_CHECK(parent < M + L && node_rank >= 0 && node_rank < width,
                  "select_tree: a candidate's parent or rank is out of range");
      d[n] = level[i];
      TORCH_CHECK(d[n] <= depth, "select_tree: a node is deeper than depth");
      p[n] = parent < 0 ? 0 : node_of[parent];
      TORCH_CHECK(p[n] < n, "select_tree: a candidate comes before its parent");
      children[(b * T + p[n]) * width + node_rank] = n;
    }
    for (int64_t n = 0; n < T; ++n)  // each node sees itself and its ancestors; its path to the root
      for (int64_t a = n; a >= 0; a = p[a]) {
        sees[(b * T + n) * T + a] = true;
        paths[(b * T + n) * P + d[a]] = a;
      }
  }
  return {candidates, node_depths, node_parents, mask, retrieve, child_table};
}

}  // namespace

TORCH_LIBRARY_IMPL(medusa, CPU, m) {
  m.impl("eagle_draft", &eagle_draft);
  m.impl("heads_draft", &heads_draft);
  m.impl("select_tree", &select_tree);
  m.impl("top_logp", &top_logp);
}
