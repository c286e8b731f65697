// Sampling's work over a vocabulary on the CPU: `probabilities` (at its end), and the filters top-k then
// top-p for rows of processed logits, without sorting a vocabulary: `runtime.sampling._top_k_top_p` calls it while serving on the CPU, and its PyTorch
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
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>

#include "cpu_vectors.h"  // f32x16, load16, store16, exp16, sum16

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
  const float most = *std::max_element(y, y + V);
  if (!std::isfinite(most)) return;
  s.values.resize(V + 16);
  float* e = s.values.data();
  double total = 0;
  const int64_t V16 = V / 16 * 16;
  for (int64_t v = 0; v < V16; v += 16) {
    const f32x16 ev = exp16(load16(y + v) - most);  // ~1e-38 for -inf: below the bound
    store16(e + v, ev);
    total += sum16(ev);
  }
  for (int64_t v = V16; v < V; ++v) total += e[v] = std::exp(y[v] - most);
  const float bound = static_cast<float>((1.0 - p) / (2.0 * V) * total);  // a probability times total
  s.kept.clear();
  for (int64_t v = 0; v < V; ++v)
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
// sampled step. Each row's exponentials are float32 (`exp16`) over a double sum.
void probabilities_row(const float* x, float* p, int64_t V) {
  const float inf = std::numeric_limits<float>::infinity();
  const float* top = std::max_element(x, x + V);
  const float most = *top;
  if (most == inf || most == -inf) {
    std::fill(p, p + V, 0.0f);
    p[top - x] = 1.0f;  // max_element gives the first of equal maxima
    return;
  }
  const int64_t V16 = V / 16 * 16;
  double total = 0;
  for (int64_t v = 0; v < V16; v += 16) {
    const f32x16 xv = load16(x + v);
    const f32x16 e = xv > -inf ? exp16(xv - most) : f32x16{};  // exp16 gives ~1e-38, not 0, at -inf
    store16(p + v, e);
    total += sum16(e);
  }
  for (int64_t v = V16; v < V; ++v) total += p[v] = std::exp(x[v] - most);
  const float scale = static_cast<float>(1.0 / total);
  for (int64_t v = 0; v < V16; v += 16) store16(p + v, load16(p + v) * scale);
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

}  // namespace

TORCH_LIBRARY_IMPL(medusa, CPU, m) {
  m.impl("top_k_top_p_", &top_k_top_p_);
  m.impl("probabilities", &probabilities);
}
