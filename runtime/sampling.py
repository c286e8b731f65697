"""Turn the base model's logits into the distribution each request samples from, for a whole batch.

Every request of a batch has its own parameters, carried as tensors (`RowParams`, one entry per
row), so a batch with greedy, sampled and penalised requests is processed by one set of tensor
operations, without a host synchronisation: what a compiled step needs. Which processors run at
all is fixed per call by flags (`process`), so a batch of greedy requests pays for none of them.

Order of the processors (as in `transformers`, with vLLM's place for OpenAI's penalties): the
repetition penalty on the raw logits, then the frequency and presence penalties, then the logit
bias, then temperature, then top-k, top-p (nucleus) and typical-p filtering. Greedy rows use only
the penalties and the bias, and take the argmax.

Nothing here raises on a request's parameters, however extreme (one request's parameters must
never fail a batch): temperature and repetition penalty are clamped to [1e-6, 1e6] (`SAFE_RANGE`:
a logit of magnitude 1e4 divided by 1e-6 is still finite in float32); top-p and typical-p keep at
least the first token of their order; NaN logits are excluded; and a row with no finite probability
left is sampled as the argmax of its logits (`probabilities`).

Tokens are drawn by inversion (`draw`) from uniforms the caller provides, drawn on the host from
each request's own generator: the device needs no generator state, and a seeded request's tokens do
not depend on the other requests of its batch.

Legend: B rows (requests), N positions per row (tree nodes), V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from runtime import cpu_kernels
from runtime.config import SamplingParams

SAFE_RANGE = (1e-6, 1e6)  # temperature and repetition_penalty are clamped into it
MODES = ("greedy", "typical", "lossless")  # acceptance rule of a row, by index (`RowParams.mode`)


# A running sum over the vocabulary, as one operation a compiled graph calls as it is. Inductor
# builds a scan this long as a "split scan" and, before torch 2.13, could fuse a reduction over the
# same rows (an argmax, a softmax's sum) into it, then failed to build that kernel ("NYI
# TritonSplitDimKernel reductions": the first compiled step on an H200, torch 2.11). As its own
# operation it runs PyTorch's scan kernel, inside the CUDA graph all the same.
_library = torch.library.Library("medusa", "FRAGMENT")
_library.define("cumsum_last(Tensor x) -> Tensor")
_library.impl("cumsum_last", lambda x: x.cumsum(-1), "CompositeExplicitAutograd")


@torch.library.register_fake("medusa::cumsum_last")
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


cumsum_last = torch.ops.medusa.cumsum_last  # [..., V] -> [..., V]: x.cumsum(-1)


def _clamp(value: float) -> float:
    return min(max(value, SAFE_RANGE[0]), SAFE_RANGE[1])


def acceptance_mode(params: SamplingParams) -> str:
    """The acceptance rule of a request's speculated tokens: greedy, typical or lossless."""
    if params.greedy:
        return "greedy"
    return "typical" if params.acceptance == "typical" else "lossless"


@dataclass(frozen=True)
class RowParams:
    """The sampling parameters of B requests, one tensor entry per request ([B] each)."""

    greedy: torch.Tensor  # bool
    temperature: torch.Tensor  # float32, clamped (1 for greedy rows)
    top_k: torch.Tensor  # long, 0 = off
    top_p: torch.Tensor  # float32, 1 = off
    typical_p: torch.Tensor  # float32, 1 = off
    penalty: torch.Tensor  # float32, clamped, 1 = off: the repetition penalty
    frequency: torch.Tensor  # float32, 0 = off: the frequency penalty
    presence: torch.Tensor  # float32, 0 = off: the presence penalty
    mode: torch.Tensor  # long, index into MODES
    typical_epsilon: torch.Tensor  # float32
    typical_delta: torch.Tensor  # float32

    @staticmethod
    def columns(params: SamplingParams) -> list[float]:
        """One request's row of the host table `from_columns` reads, in field order."""
        penalty = 1.0 if params.repetition_penalty == 1.0 else _clamp(params.repetition_penalty)
        return [float(params.greedy), 1.0 if params.greedy else _clamp(params.temperature), params.top_k,
                params.top_p, params.typical_p, penalty, params.frequency_penalty, params.presence_penalty,
                MODES.index(acceptance_mode(params)),
                params.typical_epsilon, params.typical_delta]

    @staticmethod
    def from_columns(table: torch.Tensor) -> RowParams:
        """[B, ROW_PARAMS_WIDTH] (any float dtype, on the device) -> the parameters as tensors."""
        c = table.unbind(-1)
        f32 = [x.float() for x in c]
        return RowParams(greedy=c[0] > 0, temperature=f32[1], top_k=c[2].long(), top_p=f32[3],
                         typical_p=f32[4], penalty=f32[5], frequency=f32[6], presence=f32[7],
                         mode=c[8].long(), typical_epsilon=f32[9], typical_delta=f32[10])

    @staticmethod
    def of(params: list[SamplingParams], device: torch.device | str = "cpu") -> RowParams:
        table = torch.tensor([RowParams.columns(p) for p in params], dtype=torch.float64)
        return RowParams.from_columns(table.to(device))


ROW_PARAMS_WIDTH = len(dataclasses.fields(RowParams))  # columns of a row in `columns`


@dataclass(frozen=True)
class Needs:
    """Which processors a batch needs; fixed per compiled graph. A batch may run with more than it
    needs (each processor leaves a row whose parameter is off unchanged), never with less."""

    sample: bool = False  # some row samples: temperature and acceptance by typical or lossless rules
    filter: bool = False  # some row has top-k or top-p
    penalise: bool = False  # some row has a repetition, frequency or presence penalty
    typical: bool = False  # some row has typical-p
    typical_acceptance: bool = False  # some row accepts drafts by the typical rule (others: lossless)
    top_n: bool = False  # some row reports the most likely tokens beside each of its tokens
    bias: bool = False  # some row has a logit bias
    # some row brings a bitmask of the tokens it allows: a grammar's, or EOS banned (min_tokens); the
    # step sets it from its rows (`of` knows only the grammars), as a ban ends before its request does
    mask: bool = False

    @staticmethod
    def of(params: list[SamplingParams]) -> Needs:
        sampled = [p for p in params if not p.greedy]
        return Needs(sample=bool(sampled), filter=any(p.top_k or p.top_p < 1 for p in sampled),
                     penalise=any(penalised(p) for p in params),
                     typical=any(p.typical_p < 1 for p in sampled),
                     typical_acceptance=any(acceptance_mode(p) == "typical" for p in sampled),
                     top_n=any(p.top_n for p in params), bias=any(p.logit_bias for p in params),
                     mask=any(p.grammar is not None for p in params))


def _per_row(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, ..., 1], to broadcast against `like` ([B, ...])."""
    return x.view(-1, *[1] * (like.dim() - 1))


def penalised(params: SamplingParams) -> bool:
    return (params.repetition_penalty, params.frequency_penalty, params.presence_penalty) != (1.0, 0.0, 0.0)


@dataclass(frozen=True)
class Text:
    """What the text before each position holds, as the penalties read it ([B, N, V] each)."""

    seen: torch.Tensor  # bool: the token is in the text, prompt included (the repetition penalty)
    counts: torch.Tensor  # float32: its count in the generated text (the frequency and presence penalties)


@dataclass(frozen=True)
class LogitBias:
    """Each row's logit bias as K (token, bias) pairs ([B, K] each); unused pairs are (0, 0.0)."""

    tokens: torch.Tensor  # long
    values: torch.Tensor  # float32


def process(logits: torch.Tensor, rows: RowParams, text: Text | None, needs: Needs,
            bias: LogitBias | None = None, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """The processed logits each row's tokens come from: [B, N, V] -> [B, N, V] float32
    (-inf = excluded; on the CPU a batch of greedy rows keeps NaN, which our argmax reads as -inf).
    text: what each position's text holds, needed iff needs.penalise; bias, needed iff needs.bias;
    allowed: [B, N, V] bool, the tokens each position's grammar allows (all for a row without a grammar),
    iff needs.mask."""
    logits = logits.float()
    if needs.sample or not cpu_kernels.eager_cpu(logits):
        # NaN: never drawn. Greedy rows on the CPU skip this pass over the vocabulary: our
        # argmax_logsumexp, what they read, takes NaN as -inf itself, and the one logit they read
        # after it is the argmax's (SmolLM2 bf16, 8 tree nodes, AMD EPYC Zen 5, 12 dev prompts,
        # the two taking turns: 8.58 -> 8.42 ms a step, the same tokens).
        logits = logits.nan_to_num(nan=-math.inf, posinf=math.inf, neginf=-math.inf)
    if needs.penalise:
        assert text is not None
        penalty = _per_row(rows.penalty, logits)
        penalised = torch.where(logits > 0, logits / penalty, logits * penalty)  # exact for penalty 1
        logits = torch.where(text.seen, penalised, logits)
        # exact for penalties 0 (counts are finite); a logit of +-inf keeps its value
        logits = logits - (_per_row(rows.frequency, logits) * text.counts
                           + _per_row(rows.presence, logits) * (text.counts > 0))
    if needs.bias:
        assert bias is not None
        B, N, K = *logits.shape[:2], bias.tokens.shape[1]
        # an unused pair adds 0.0 to token 0: exact
        logits = logits.scatter_add(-1, bias.tokens[:, None].expand(B, N, K),
                                    bias.values[:, None].expand(B, N, K))
    if needs.mask:
        assert allowed is not None
        logits = logits.masked_fill(~allowed, -math.inf)
    if not needs.sample:
        return logits
    warped = logits / _per_row(rows.temperature, logits)
    if needs.filter:
        warped = _top_k_top_p(warped, rows)
    if needs.typical:
        warped = _typical(warped, rows)
    return torch.where(_per_row(rows.greedy, logits), logits, warped)


def _top_k_top_p(logits: torch.Tensor, rows: RowParams) -> torch.Tensor:
    """Top-k, then top-p, each only on the rows that ask for it: [B, N, V] -> [B, N, V], on the CPU in
    place, one call of our kernel, which sorts no vocabulary (`runtime/sampling_ops.cpp`, where its
    measurement is)."""
    B, N, V = logits.shape
    if cpu_kernels.eager_cpu(logits):
        logits = logits.contiguous()
        cpu_kernels.top_k_top_p_(logits.view(B * N, V), rows.top_k.repeat_interleave(N),
                                 rows.top_p.repeat_interleave(N))
        return logits
    values, order = logits.sort(dim=-1, descending=True, stable=True)  # [B, N, V]; ties by index, as ours
    k = _per_row(rows.top_k, logits)
    kth = values.gather(-1, torch.where((k > 0) & (k < V), k - 1, V - 1).expand(*logits.shape[:-1], 1))
    logits = logits.masked_fill(logits < kth, -math.inf)  # top-k keeps the descending order
    return _keep_smallest_set(logits, order, _per_row(rows.top_p, logits))


def _typical(logits: torch.Tensor, rows: RowParams) -> torch.Tensor:
    """Typical-p on the rows that ask for it. [B, N, V]."""
    log_probs = logits.log_softmax(dim=-1)
    entropy = -(log_probs.exp() * log_probs).nan_to_num().sum(-1, keepdim=True)  # [B, N, 1]
    surprise_gap = (-log_probs - entropy).abs()  # [B, N, V]; excluded tokens are +inf
    return _keep_smallest_set(logits, surprise_gap.argsort(dim=-1), _per_row(rows.typical_p, logits))


def _keep_smallest_set(logits: torch.Tensor, order: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """Keep the shortest prefix of `order` whose probability reaches `mass` (at least one token);
    rows with mass >= 1 keep everything. mass: broadcast against logits' rows."""
    probs = logits.softmax(dim=-1).gather(-1, order)  # [..., V] in `order`
    before = cumsum_last(probs) - probs  # mass of the tokens ranked before each one
    drop_sorted = (before >= mass) & (mass < 1)
    drop_sorted[..., 0] = False  # a mass below float32's smallest number must still keep one token
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, -math.inf)


def warp(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """One request's processors without a penalty: [N, V] -> [N, V] (tests compare it with transformers)."""
    needs = Needs.of([params])
    return process(logits[None], RowParams.of([params], logits.device), None, needs)[0]


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Processed logits -> probabilities, [..., V] -> [..., V]. A row without a finite distribution
    (every logit -inf, or +inf ones) becomes one-hot at its argmax, so a draw from it is well defined;
    decided on the device, without a host synchronisation. On the CPU one call of our kernel
    (`runtime/sampling_ops.cpp`)."""
    if cpu_kernels.eager_cpu(logits):
        return cpu_kernels.probabilities(logits)
    p = logits.softmax(dim=-1)
    ok = p.isfinite().all(dim=-1, keepdim=True) & (p.sum(dim=-1, keepdim=True) > 0)
    fallback = torch.zeros_like(p).scatter_(-1, logits.argmax(dim=-1, keepdim=True), 1.0)
    return torch.where(ok, p, fallback)


def draw(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row, drawn with probability proportional to `weights` by inversion.

    weights: [B, V] >= 0, not all zero (unnormalised is fine); uniforms: [B] in [0, 1).
    A token of weight 0 is never drawn: the threshold (1 - u) * total is above 0 (kept so where
    1 - u rounds to 0 in the weights' dtype).
    """
    if cpu_kernels.eager_cpu(weights):  # one call of our kernel (runtime/sampling_ops.cpp), these lines
        return cpu_kernels.draw(weights, uniforms.double())
    cdf = cumsum_last(weights)  # [B, V]
    above_zero = (1 - uniforms.to(cdf.dtype)).clamp(min=torch.finfo(cdf.dtype).tiny)  # [B] in (0, 1]
    threshold = above_zero * cdf[:, -1]  # [B] in (0, total]
    return (cdf < threshold[:, None]).sum(-1).clamp(max=weights.shape[-1] - 1)


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """Each row's argmax (the first of equal maxima), [..., V] float32 processed logits (no NaN) ->
    [...] long: on the CPU one call of our kernel (`runtime.cpu_kernels.argmax_rows`)."""
    if cpu_kernels.eager_cpu(logits):
        return cpu_kernels.argmax_rows(logits)
    return logits.argmax(-1)


def logsumexp_at(logits: torch.Tensor, path: torch.Tensor) -> torch.Tensor:
    """The logsumexp of the rows a step keeps: logits [B, T, V] float32 processed logits, path [B, P]
    long (nodes) -> [B, P] float32. On the CPU one call of our kernel (`runtime.cpu_kernels.logsumexp_at`),
    which takes the exponentials of those rows alone, not of every node's (`layer_ops.cpp` has the
    measurement)."""
    if cpu_kernels.eager_cpu(logits):
        return cpu_kernels.logsumexp_at(logits, path)
    return logits.logsumexp(-1).gather(1, path)


def next_tokens(target: torch.Tensor, best: torch.Tensor, rows: RowParams, uniforms: torch.Tensor,
                needs: Needs) -> torch.Tensor:
    """The token after one position per row: the argmax `best` ([B] long) for greedy rows, else a
    draw. target: [B, V] processed logits; uniforms: [B]. Returns [B] long."""
    if not needs.sample:
        return best
    drawn = draw(probabilities(target), uniforms)
    return torch.where(rows.greedy, best, drawn)
