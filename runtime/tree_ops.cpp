// A dynamic tree's drafting glue on the CPU, each in one call: the k best log-probabilities of a
// drafter's rows (`top_logp`), and the choice of each row's tree from its candidates (`select_tree`).
// `medusa.dynamic` calls them while serving on the CPU, and its PyTorch lines there are the reference
// (`top_logp`, `select` and `rows_of`). Those lines are ~240 operations on a few hundred numbers a step,
// and after a verification forward has streamed the weights through the caches each runs cold (as
// `accept_greedy`, layer_ops.cpp, measured). SmolLM2 bf16 with its heads and `dynamic-cpu-bf16`, AMD EPYC
// (Zen 5), 12 dev prompts, the two taking turns: drafting 1.218 -> 0.934 ms a step (median), 201.4 ->
// 210.7 tok/s, the same tokens.
//
// Drafts only propose tokens: what these choose changes how many tokens a step accepts, never which.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <tuple>
#include <vector>

#include "cpu_vectors.h"

namespace {

using namespace medusa_cpu;

// The k largest of row x [V] under log_softmax, best first (ties: the lower index first; NaN never
// before a number), in two passes: the max, then the sum of e^(x - max) and the running top k, which
// a vector of 16 passes by with one comparison unless a lane beats the k-th so far.
void top_logp_row(const float* x, int64_t V, int64_t k, float* values, int64_t* indices) {
  const float inf = std::numeric_limits<float>::infinity();
  const int64_t V16 = V / 16 * 16;
  f32x16 top = splat16(-inf);
  for (int64_t v = 0; v < V16; v += 16) {
    const f32x16 xv = load16(x + v);
    top = xv > top ? xv : top;
  }
  float m = max16(top);
  for (int64_t v = V16; v < V; ++v) m = std::max(m, x[v]);
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
  f32x16 sums = {};
  for (int64_t v = 0; v < V16; v += 16) {
    const f32x16 xv = load16(x + v);
    sums += exp16((xv == xv ? xv : splat16(-inf)) - m);  // exp16 is 0 below -87
    bool any = count < k;
    if (!any) {
      const auto beats = xv > splat16(values[k - 1]);
      for (int i = 0; i < 16; ++i) any |= beats[i] != 0;
    }
    if (any)
      for (int i = 0; i < 16; ++i) offer(v + i);
  }
  float total = sum16(sums);
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
    std::partial_sort(order.begin(), order.begin() + (T - 1), order.end(), [&](int64_t i, int64_t j) {
      return key[i] > key[j] || (key[i] == key[j] && i < j);
    });
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
  m.impl("select_tree", &select_tree);
  m.impl("top_logp", &top_logp);
}
