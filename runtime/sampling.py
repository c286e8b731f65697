"""Turn the base model's logits into the distribution a request samples from.

Order of the processors (as in `transformers`): repetition penalty on the raw logits, then
temperature, then top-k, top-p (nucleus) and typical-p filtering. Greedy requests use only the
repetition penalty and take the argmax. Everything works on a leading batch of rows, so the
same code serves the prompt's last position and every node of a speculation tree.

Nothing here raises on a request's parameters, however extreme (one request's parameters must
never fail a batch): temperature and repetition penalty are clamped to [1e-6, 1e6] (`SAFE_RANGE`:
a logit of magnitude 1e4 divided by 1e-6 is still finite in float32); top-p and typical-p keep at
least the first token of their order; NaN logits are excluded; and a row with no finite probability
left is sampled as the argmax of its logits, never passed to `multinomial`.

Legend: N rows (positions or tree nodes), V vocabulary.
"""

from __future__ import annotations

import math

import torch

from runtime.config import SamplingParams

SAFE_RANGE = (1e-6, 1e6)  # temperature and repetition_penalty are clamped into it


def _clamp(value: float) -> float:
    return min(max(value, SAFE_RANGE[0]), SAFE_RANGE[1])


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Divide positive (multiply negative) logits of already-seen tokens by `penalty`.

    logits: [N, V] float; seen: [N, V] bool (tokens in the prompt or generated so far).
    """
    if penalty == 1.0:
        return logits
    penalty = _clamp(penalty)
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def warp(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k, top-p and typical-p: [N, V] logits -> [N, V] logits (-inf = excluded)."""
    logits = logits / _clamp(params.temperature)
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k, dim=-1).values[:, -1:]  # [N, 1]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if params.top_p < 1.0:
        logits = _keep_smallest_set(logits, logits.argsort(dim=-1, descending=True), params.top_p)
    if params.typical_p < 1.0:
        log_probs = logits.log_softmax(dim=-1)
        probs = log_probs.exp()
        entropy = -(probs * log_probs).nan_to_num().sum(-1, keepdim=True)  # [N, 1]
        surprise_gap = (-log_probs - entropy).abs()  # [N, V]; excluded tokens are +inf
        logits = _keep_smallest_set(logits, surprise_gap.argsort(dim=-1), params.typical_p)
    return logits


def _keep_smallest_set(logits: torch.Tensor, order: torch.Tensor, mass: float) -> torch.Tensor:
    """Keep the shortest prefix of `order` whose probability reaches `mass` (at least one token)."""
    probs = logits.softmax(dim=-1).gather(-1, order)  # [N, V] in `order`
    before = probs.cumsum(-1) - probs  # mass of the tokens ranked before each one
    drop_sorted = before >= mass
    drop_sorted[..., 0] = False  # a mass below float32's smallest number must still keep one token
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, -math.inf)


def target_logits(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None) -> torch.Tensor:
    """The processed logits a request's tokens come from: [N, V] -> [N, V].

    seen: [N, V] bool, needed only when the request has a repetition penalty.
    """
    logits = logits.float().nan_to_num(nan=-math.inf, posinf=math.inf, neginf=-math.inf)  # NaN: never drawn
    if params.repetition_penalty != 1.0:
        assert seen is not None
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    return logits if params.greedy else warp(logits, params)


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Processed logits -> probabilities, [N, V] -> [N, V]. A row without a finite distribution
    (every logit -inf, or +inf ones) becomes one-hot at its argmax, so a draw from it cannot raise;
    decided on the device, without a host synchronisation."""
    p = logits.softmax(dim=-1)  # [N, V]
    ok = p.isfinite().all(dim=-1, keepdim=True) & (p.sum(dim=-1, keepdim=True) > 0)  # [N, 1]
    fallback = torch.zeros_like(p).scatter_(-1, logits.argmax(dim=-1, keepdim=True), 1.0)  # [N, V]
    return torch.where(ok, p, fallback)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> torch.Tensor:
    """One token per row from processed logits: argmax when greedy, else a seeded draw. [N, V] -> [N]."""
    if params.greedy:
        return logits.argmax(dim=-1)
    return torch.multinomial(probabilities(logits), 1, generator=generator)[:, 0]
