// Sampling's work over a vocabulary on the CPU: `probabilities`, `draw` and the lossless acceptance rule
// (after the filters), and the filters top-k then top-p for rows of processed logits, without sorting a vocabulary: `runtime.sampling._top_k_top_p` calls it while serving on the CPU, and its PyTorch
// lines (a sort of each row, then a softmax and a cumulative sum in that order) are the reference.
// Sorting is what those lines cost: 8 tree nodes of SmolLM2's 49152, AMD EPYC (Zen 5), 2 threads, the
// sort alone 12.4 ms, the whole of `process` with top-p 21.0 ms, against ~0.16 ms without a filter.
// SmolLM2 bf16, temperature 0.7, top-p 0.95, 8 dev prompts, the two taking turns, the same tokens:
// Medusa (`dynamic-cpu-bf16`, lossless) 57.3 -> 138.4 tok/s, plain decoding 83.5 -> 114.2.
//
// Per row:
//   - top-k (0 < k < V): the k-th largest value, by selection (nth_element), and every logit below it
//     to -inf; ties with it stay, as the reference's `<` keeps them.
//   - top-p (p < 1): the reference keeps a token iff the probability of the tokens ranked before it
//     (by descending logit) is below p, the first token always. A token of probability below
//     (1 - p) / (2V) is never kept: with every token ranked after it, it holds less than (1 - p) / 2,
//     so the tokens before it hold more than p. So only the tokens at or above that bound (a few
//     hundred, usually) are sorted, ties by index, and their probabilities added in that order, in
//     double, as PyTorch's cumulative sum adds on the CPU. A row whose largest logit is not finite is
//     left as it is (the reference's softmax is NaN there, and NaN drops nothing).
// The probabilities are ours (float32 exponentials, a double sum), not PyTorch's softmax: a token whose
// preceding mass is within float rounding of p may be kept by one and dropped by the other.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <tuple>
#include <vector>

#include <immintrin.h>

#include "cpu_vectors.h"  // f32xN, loadN, store_lanes, exp_lanes, Sum16, max_of

namespace {

using namespace medusa_cpu;

struct Scratch {
  std::vector<float> values;  // top-k's selection, then each token's e^(y - max)
  std::vector<int64_t> kept;  // top-p's candidates, by rank
};

// row y [V], in place
void top_k_top_p_row(float* y, int64_t V, int64_t k, float p, Scratch& s) {
  const float inf = std::numeric_limits<float>::infinity();
  if (k > 0 && k < V) {
    s.values.assign(y, y + V);
    std::nth_element(s.values.begin(), s.values.begin() + (k - 1), s.values.end(), std::greater<float>());
    const float kth = s.values[k - 1];
    for (int64_t v = 0; v < V; ++v)
      if (y[v] < kth) y[v] = -inf;
  }
  if (!(p < 1.0f)) return;
  const int64_t V16 = V / 16 * 16;
  const float most = max_of(y, V);
  if (!std::isfinite(most)) return;
  s.values.resize(V + 16);
  float* e = s.values.data();
  double total = 0;
  for (int64_t v = 0; v < V16; v += 16) {
    Sum16 ev;
    for (int j = 0; j < 16 / kLanes; ++j) {
      ev.part[j] = exp_lanes(loadN(y + v + j * kLanes) - most);  // ~1e-38 for -inf: below the bound
      store_lanes(e + v + j * kLanes, ev.part[j]);
    }
    total += ev.total();
  }
  for (int64_t v = V16; v < V; ++v) total += e[v] = std::exp(y[v] - most);
  const float bound = static_cast<float>((1.0 - p) / (2.0 * V) * total);  // a probability times total
  s.kept.clear();
  int64_t v = 0;
#if defined(__AVX512F__)
  for (; v < V16; v += 16)  // 16 at a time: most vectors hold no candidate
    for (__mmask16 hit = _mm512_cmp_ps_mask(_mm512_loadu_ps(e + v), _mm512_set1_ps(bound), _CMP_GE_OQ); hit;
         hit &= hit - 1)
      s.kept.push_back(v + __builtin_ctz(hit));
#endif
  for (; v < V; ++v)
    if (e[v] >= bound) s.kept.push_back(v);
  if (s.kept.empty()) return;  // not for numbers: the largest is e^0 = 1, above the bound
  std::sort(s.kept.begin(), s.kept.end(), [&](int64_t a, int64_t b) { return y[a] > y[b] || (y[a] == y[b] && a < b); });
  double before = 0;  // the mass of the tokens ranked before this one
  size_t kept = 1;
  for (; kept < s.kept.size(); ++kept) {
    before += e[s.kept[kept - 1]] / total;
    if (before >= p) break;
  }
  for (size_t r = 0; r < kept; ++r) e[r] = y[s.kept[r]];  // e's first entries now hold the kept logits
  std::fill(y, y + V, -inf);
  for (size_t r = 0; r < kept; ++r) y[s.kept[r]] = e[r];
}

// logits [M, V] float32 contiguous, in place; top_k [M] int64 (0: off), top_p [M] float32 (1: off). In
// place, and each thread's scratch kept from call to call: a new [8, 49152] output and scratch rows at
// every call cost more in page faults than the filter (8 rows of top-k ~1.4 ms, against ~0.2).
void top_k_top_p_(at::Tensor& logits, const at::Tensor& top_k, const at::Tensor& top_p) {
  TORCH_CHECK(logits.scalar_type() == at::kFloat && logits.dim() == 2 && logits.is_contiguous() &&
                  top_k.scalar_type() == at::kLong && top_p.scalar_type() == at::kFloat &&
                  top_k.numel() == logits.size(0) && top_p.numel() == logits.size(0),
              "top_k_top_p_: logits [M, V] float32 contiguous, top_k [M] int64, top_p [M] float32");
  const at::Tensor k = top_k.contiguous(), p = top_p.contiguous();
  const int64_t M = logits.size(0), V = logits.size(1);
  float* y = logits.mutable_data_ptr<float>();
  const int64_t* ks = k.const_data_ptr<int64_t>();
  const float* ps = p.const_data_ptr<float>();
  at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
    thread_local Scratch scratch;
    for (int64_t m = begin; m < end; ++m) top_k_top_p_row(y + m * V, V, ks[m], ps[m], scratch);
  });
}

// `runtime.sampling.probabilities`' lines in one pass a row: softmax(x), or where the row has no finite
// distribution (its largest logit -inf or +inf) one-hot at its argmax, the first of equal maxima. Those
// lines are six operations over the whole [B, T, V] (a softmax, a check that every value is finite, a
// sum, an argmax, a scatter, a choice): 0.56 ms for 8 rows of SmolLM2's 49152 (AMD EPYC Zen 5), twice a
// sampled step. Each row's exponentials are float32 (`exp_lanes`) over a double sum.
void probabilities_row(const float* x, float* p, int64_t V) {
  const float inf = std::numeric_limits<float>::infinity();
  const float most = max_of(x, V);
  if (most == inf || most == -inf) {
    std::fill(p, p + V, 0.0f);
    p[std::find(x, x + V, most) - x] = 1.0f;  // the first of equal maxima
    return;
  }
  const int64_t V16 = V / 16 * 16;
  double total = 0;
  for (int64_t v = 0; v < V16; v += 16) {
    Sum16 e;
    for (int j = 0; j < 16 / kLanes; ++j) {
      const f32xN xv = loadN(x + v + j * kLanes);
      e.part[j] = xv > -inf ? exp_lanes(xv - most) : f32xN{};  // exp_lanes gives ~1e-38, not 0, at -inf
      store_lanes(p + v + j * kLanes, e.part[j]);
    }
    total += e.total();
  }
  for (int64_t v = V16; v < V; ++v) total += p[v] = std::exp(x[v] - most);
  const float scale = static_cast<float>(1.0 / total);
  for (int64_t v = 0; v < V16; v += kLanes) store_lanes(p + v, loadN(p + v) * scale);
  for (int64_t v = V16; v < V; ++v) p[v] *= scale;
}

// logits [..., V] float32 (no NaN) -> probabilities [..., V] float32
at::Tensor probabilities(const at::Tensor& logits) {
  TORCH_CHECK(logits.scalar_type() == at::kFloat && logits.dim() >= 1 && logits.size(-1) > 0,
              "probabilities: logits [..., V] float32, V > 0");
  const at::Tensor x = logits.contiguous();
  const int64_t V = x.size(-1), M = x.numel() / V;
  at::Tensor p = at::empty(x.sizes(), x.options());
  const float* in = x.const_data_ptr<float>();
  float* out = p.mutable_data_ptr<float>();
  at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) probabilities_row(in + m * V, out + m * V, V);
  });
  return p;
}

// The first token of weights w [V] (>= 0, not all 0) at which their running sum reaches (1 - u) * total,
// as `runtime.sampling.draw` computes it: PyTorch's cumulative sum on the CPU adds in double and rounds
// each partial sum to T; the threshold is T's (1 - u, at least T's smallest normal) times the total.
template <typename T>
int64_t draw_row(const T* w, int64_t V, double u) {
  double sum = 0;
  for (int64_t v = 0; v < V; ++v) sum += w[v];
  const T above = std::max(static_cast<T>(1) - static_cast<T>(u), std::numeric_limits<T>::min());
  const T threshold = above * static_cast<T>(sum);
  double cdf = 0;
  for (int64_t v = 0; v < V; ++v) {
    cdf += w[v];
    if (!(static_cast<T>(cdf) < threshold)) return v;
  }
  return V - 1;
}

// weights [B, V] float32 or float64, uniforms [B] float64 -> [B] int64: `runtime.sampling.draw`'s lines
// (a cumulative sum of the whole [B, V], a comparison, a count) in one pass a row. Plain decoding, bf16,
// temperature 0.7, top-p 0.95, 8 dev prompts, taking turns, the same tokens: 117.5 -> 123.2 tok/s.
at::Tensor draw(const at::Tensor& weights, const at::Tensor& uniforms) {
  TORCH_CHECK((weights.scalar_type() == at::kFloat || weights.scalar_type() == at::kDouble) && weights.dim() == 2 &&
                  uniforms.scalar_type() == at::kDouble && uniforms.numel() == weights.size(0),
              "draw: weights [B, V] float32 or float64, uniforms [B] float64");
  const at::Tensor w = weights.contiguous(), u = uniforms.contiguous();
  const int64_t B = w.size(0), V = w.size(1);
  at::Tensor out = at::empty({B}, w.options().dtype(at::kLong));
  int64_t* token = out.mutable_data_ptr<int64_t>();
  const double* us = u.const_data_ptr<double>();
  for (int64_t b = 0; b < B; ++b)
    token[b] = w.scalar_type() == at::kFloat ? draw_row(w.const_data_ptr<float>() + b * V, V, us[b])
                                             : draw_row(w.const_data_ptr<double>() + b * V, V, us[b]);
  return out;
}

// Lossless acceptance of B trees in one call: `medusa.acceptance.accept_lossless`, whose PyTorch lines
// (and `lossless_walk`, one sequence) are the reference, and which this reads as: from the root, each
// child in rank order is accepted with probability residual(x) / sum(residual), a rejected child's token
// leaves the residual, an accepted child's target becomes the residual; the next token is drawn from the
// residual where the walk stops. Those lines run every turn over the whole batch and vocabulary (a sum of
// the residual each turn): 1.36 ms a step for 8 nodes of SmolLM2's 49152 (bf16, AMD EPYC Zen 5). Here
// the residual's sum is kept as it changes (less a rejected token's share), so a turn is O(1). SmolLM2
// bf16, `dynamic-cpu-bf16`, temperature 0.7, top-p 0.95, 8 dev prompts, the two taking turns, the same
// tokens: 161.2 -> 182.4 tok/s.
// candidates [B, T] int64; probs [B, T, V] float32; child_table [B, T, c] int64 (-1: none; any strides);
// uniforms [B, T] float64; depth -> accepted_len [B], path [B, depth + 1] (0 past accepted_len), next [B]
std::tuple<at::Tensor, at::Tensor, at::Tensor> accept_lossless(const at::Tensor& candidates, const at::Tensor& probs,
                                                               const at::Tensor& child_table,
                                                               const at::Tensor& uniforms, int64_t depth) {
  TORCH_CHECK(candidates.scalar_type() == at::kLong && probs.scalar_type() == at::kFloat &&
                  child_table.scalar_type() == at::kLong && uniforms.scalar_type() == at::kDouble &&
                  candidates.dim() == 2 && probs.dim() == 3 && child_table.dim() == 3 && uniforms.dim() == 2 &&
                  probs.size(0) == candidates.size(0) && probs.size(1) == candidates.size(1) &&
                  child_table.size(0) == candidates.size(0) && child_table.size(1) == candidates.size(1) &&
                  uniforms.size(0) == candidates.size(0) && uniforms.size(1) >= candidates.size(1),
              "accept_lossless: candidates [B, T] int64, probs [B, T, V] float32, child_table [B, T, c] int64, "
              "uniforms [B, >= T] float64");
  const int64_t B = candidates.size(0), T = candidates.size(1), V = probs.size(2), C = child_table.size(2);
  const at::Tensor p = probs.contiguous();
  const float* prob = p.const_data_ptr<float>();
  const auto cand = candidates.accessor<int64_t, 2>();
  const auto children = child_table.accessor<int64_t, 3>();
  const auto u = uniforms.accessor<double, 2>();
  const auto options = candidates.options();
  at::Tensor accepted = at::empty({B}, options), path = at::zeros({B, depth + 1}, options), next = at::empty({B}, options);
  int64_t* accepted_len = accepted.mutable_data_ptr<int64_t>();
  int64_t* kept = path.mutable_data_ptr<int64_t>();
  int64_t* next_token = next.mutable_data_ptr<int64_t>();
  std::vector<double> residual(V);
  for (int64_t b = 0; b < B; ++b) {
    auto take = [&](int64_t node) {  // the residual := the target at `node`, in double; its sum
      const float* row = prob + (b * T + node) * V;
      double total = 0;
      for (int64_t v = 0; v < V; ++v) total += residual[v] = row[v];
      return total;
    };
    double total = take(0);
    int64_t node = 0, length = 1;
    for (int64_t d = 1; d <= depth; ++d) {
      int64_t chosen = -1;
      for (int64_t r = 0; r < C && chosen < 0; ++r) {
        const int64_t child = children[b][node][r];
        if (child < 0) continue;
        const int64_t x = cand[b][child];
        if (u[b][child] * total < residual[x]) {
          chosen = child;
        } else {
          total -= residual[x];
          residual[x] = 0;
        }
      }
      if (chosen < 0) break;
      node = chosen;
      kept[b * (depth + 1) + d] = node;
      ++length;
      total = take(node);
    }
    accepted_len[b] = length;
    next_token[b] = draw_row(residual.data(), V, u[b][0]);
  }
  return {accepted, path, next};
}

}  // namespace

TORCH_LIBRARY_IMPL(medusa, CPU, m) {
  m.impl("accept_lossless", &accept_lossless);
  m.impl("top_k_top_p_", &top_k_top_p_);
  m.impl("probabilities", &probabilities);
  m.impl("draw", &draw);
}
