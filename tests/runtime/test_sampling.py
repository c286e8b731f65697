"""Our logit processors agree with transformers' own warpers, row by row within a mixed batch; draws
by inversion follow their weights."""

import pytest
import torch
from scipy.stats import chisquare
from transformers import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from runtime import cpu_kernels, sampling
from runtime.config import SamplingParams
from runtime.sampling import LogitBias, Needs, RowParams, Text, draw, process, warp
from tests.conftest import GraphRecorder

CASES = [
    (SamplingParams(temperature=0.7, top_k=5), [TemperatureLogitsWarper(0.7), TopKLogitsWarper(5)]),
    (SamplingParams(temperature=1.3, top_p=0.6), [TemperatureLogitsWarper(1.3), TopPLogitsWarper(0.6)]),
    (SamplingParams(temperature=1.0, typical_p=0.5), [TypicalLogitsWarper(0.5)]),
]


@pytest.fixture(params=["our kernels", "pytorch lines"])
def filters(request, monkeypatch):
    """Top-k, top-p and draws through our CPU kernels (`runtime/sampling_ops.cpp`), or through the
    PyTorch lines a GPU and a compiled step run."""
    if request.param == "pytorch lines":
        monkeypatch.setattr(cpu_kernels, "eager_cpu", lambda t: False)
    else:
        assert cpu_kernels.built()
    return request.param


@pytest.mark.parametrize("params,warpers", CASES)
def test_warpers_keep_the_same_tokens_as_transformers(params, warpers, filters):
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)) * 3
    expected = logits.clone()
    for w in warpers:
        expected = w(None, expected)
    got = warp(logits, params)
    assert torch.equal(got.isinf(), expected.isinf())
    finite = ~got.isinf()
    torch.testing.assert_close(got[finite], expected[finite])


def test_repetition_penalty_matches_transformers():
    logits = torch.randn(1, 30, generator=torch.Generator().manual_seed(1))
    history = torch.tensor([[3, 7, 7, 21]])
    seen = torch.zeros(1, 30, dtype=torch.bool)
    seen[0, history[0]] = True
    expected = RepetitionPenaltyLogitsProcessor(1.5)(history, logits.clone())
    params = SamplingParams(repetition_penalty=1.5)
    text = Text(seen[None, None], torch.zeros(1, 1, 30))
    got = process(logits[None, None], RowParams.of([params]), text, Needs.of([params]))[0, 0]
    torch.testing.assert_close(got, expected)


def test_frequency_and_presence_penalties_follow_openais_formula():
    """logit - count x frequency_penalty - (count > 0) x presence_penalty, after the repetition
    penalty, written out token by token; counts are of the generated text, `seen` of the whole."""
    V = 12
    logits = torch.randn(V, generator=torch.Generator().manual_seed(5)) * 3
    counts = torch.tensor([0, 1, 3, 0, 2, 0, 0, 1, 0, 0, 5, 0], dtype=torch.float32)
    seen = (counts > 0) | (torch.arange(V) == 3)  # token 3 only in the prompt
    params = SamplingParams(repetition_penalty=1.2, frequency_penalty=0.7, presence_penalty=-0.4)
    got = process(logits[None, None], RowParams.of([params]), Text(seen[None, None], counts[None, None]),
                  Needs.of([params]))[0, 0]
    expected = []
    for logit, count, in_text in zip(logits.tolist(), counts.tolist(), seen.tolist(), strict=True):
        if in_text:
            logit = logit / 1.2 if logit > 0 else logit * 1.2
        expected.append(logit - count * 0.7 - (-0.4 if count > 0 else 0.0))
    torch.testing.assert_close(got, torch.tensor(expected))
    assert got[3] != logits[3] and got[6] == logits[6]  # the prompt's token: the repetition penalty alone


def test_a_logit_bias_is_added_after_the_penalties():
    V = 12
    logits = torch.randn(V, generator=torch.Generator().manual_seed(6)) * 3
    counts = torch.zeros(V)
    counts[[2, 5]] = 1
    params = SamplingParams(presence_penalty=0.5, logit_bias=((5, 2.0), (0, -100.0), (7, 0.25)))
    bias = LogitBias(torch.tensor([[5, 0, 7, 0]]), torch.tensor([[2.0, -100.0, 0.25, 0.0]]))  # a spare pair
    text = Text(counts[None, None] > 0, counts[None, None])
    got = process(logits[None, None], RowParams.of([params]), text, Needs.of([params]), bias)[0, 0]
    expected = logits - 0.5 * counts + torch.tensor([-100.0, 0, 0, 0, 0, 2.0, 0, 0.25, 0, 0, 0, 0])
    torch.testing.assert_close(got, expected)


def test_each_row_of_a_mixed_batch_is_processed_with_its_own_parameters(filters):
    """One call for greedy, penalised, top-k, top-p and typical rows gives each row what it gives
    alone: a parameter that is off leaves a row unchanged, whatever the batch needs."""
    params = [SamplingParams(), SamplingParams(repetition_penalty=1.3), *(p for p, _ in CASES),
              SamplingParams(temperature=0.5, top_k=3, top_p=0.9, typical_p=0.8, repetition_penalty=0.7),
              SamplingParams(frequency_penalty=0.5), SamplingParams(temperature=0.9, presence_penalty=-1.0),
              SamplingParams(logit_bias=((3, 5.0), (9, -1.5)))]
    B, N, V = len(params), 4, 50
    logits = torch.randn(B, N, V, generator=torch.Generator().manual_seed(2)) * 3
    counts = torch.randint(0, 3, (B, N, V), generator=torch.Generator().manual_seed(3)).float()
    text = Text(counts > 0, counts)
    bias = LogitBias(torch.zeros(B, 2, dtype=torch.long), torch.zeros(B, 2))  # unused pairs elsewhere
    bias.tokens[-1], bias.values[-1] = torch.tensor([3, 9]), torch.tensor([5.0, -1.5])
    got = process(logits, RowParams.of(params), text, Needs.of(params), bias)
    for b, p in enumerate(params):
        alone = process(logits[b:b + 1], RowParams.of([p]), Text(text.seen[b:b + 1], counts[b:b + 1]),
                        Needs.of([p]), LogitBias(bias.tokens[b:b + 1], bias.values[b:b + 1]))[0]
        assert torch.equal(got[b], alone), b
    assert not torch.equal(got[1], logits[1]) and torch.equal(got[0], logits[0])
    assert not torch.equal(got[-3], logits[-3]) and not torch.equal(got[-1], logits[-1])


def test_top_k_top_p_in_one_call_keeps_what_the_sorting_lines_keep(monkeypatch):
    """Our kernel, which sorts no vocabulary, against the PyTorch lines that sort each row: peaked and
    flat rows of a large vocabulary, ties at the k-th value, -inf entries, a row of -inf, a row with
    +inf, k of 1, V and past it, p tiny and 1; what is kept keeps its value."""
    assert cpu_kernels.built()
    settings = [(0, 0.9), (1, 1.0), (50, 0.8), (3000, 0.5), (3010, 0.95), (0, 1e-30), (7, 1e-9), (20, 1.0),
                (0, 0.999)]
    params = [SamplingParams(temperature=1.0, top_k=k, top_p=p) for k, p in settings]
    B, N, V = len(params), 3, 3000
    g = torch.Generator().manual_seed(4)
    scale = torch.tensor([8.0, 0.5, 3.0])[None, :, None]  # peaked, flat, between
    logits = torch.randn(B, N, V, generator=g) * scale
    logits[[1, 7], :, 100:110] = logits[[1, 7], :, 100:101] + 60  # ten tied maxima, in top-k rows alone: at
    # a top-p cut, equal tokens make the mass before one land on p itself, where roundings decide
    logits[2, 1, ::3] = -torch.inf
    logits[3, 0] = -torch.inf
    logits[4, 2, 5] = torch.inf
    rows = RowParams.of(params)
    ours = sampling._top_k_top_p(logits.clone(), rows)
    monkeypatch.setattr(cpu_kernels, "eager_cpu", lambda t: False)
    reference = sampling._top_k_top_p(logits.clone(), rows)
    assert torch.equal(ours.isinf(), reference.isinf())
    assert torch.equal(ours[~ours.isinf()], logits[~ours.isinf()])
    kept = (~ours.isinf()).sum(-1)  # [B, N]
    assert kept[1].tolist() == [10, 10, 10] and kept[5].tolist() == [1, 1, 1]  # k = 1 keeps ties; p ~ 0
    assert kept[7].tolist() == [20, 20, 20]
    assert (kept[0] < V).all() and (kept[0] > 1).any()  # p = 0.9 dropped some, kept more than one


def test_draw_follows_the_weights_and_never_draws_a_zero(filters):
    weights = torch.tensor([[0.0, 3.0, 0.0, 1.0, 4.0, 0.0]]).expand(40000, 6)  # unnormalised
    u = torch.rand(40000, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    counts = torch.bincount(draw(weights, u), minlength=6)
    assert counts[[0, 2, 5]].sum() == 0
    expected = torch.tensor([3.0, 1.0, 4.0]) / 8 * 40000
    assert chisquare(counts[[1, 3, 4]].numpy(), expected.numpy()).pvalue > 1e-3
    ends = draw(weights[:2], torch.tensor([0.0, 1 - 1e-12], dtype=torch.float64))  # the extreme uniforms
    assert ends.tolist() == [4, 1]  # still tokens of nonzero weight


def test_a_batch_needs_what_its_rows_ask_for_and_no_more():
    greedy, lossless = SamplingParams(), SamplingParams(temperature=0.8)
    typical = SamplingParams(temperature=0.8, acceptance="typical", typical_p=0.9)
    filtered = SamplingParams(temperature=0.8, top_p=0.9)
    assert Needs.of([greedy]) == Needs()
    assert Needs.of([greedy, lossless]) == Needs(sample=True)
    assert Needs.of([lossless, typical]) == Needs(sample=True, typical=True, typical_acceptance=True)
    assert Needs.of([filtered, SamplingParams(repetition_penalty=1.2)]) == Needs(sample=True, filter=True,
                                                                                  penalise=True)
    # a greedy row's sampling parameters are not used
    assert Needs.of([SamplingParams(top_k=5, acceptance="typical")]) == Needs()


def test_probabilities_in_one_call_are_the_softmax_or_one_hot_at_the_argmax(monkeypatch):
    """Our kernel against `probabilities`' PyTorch lines: softmax rows (with -inf entries, a length
    past the last whole vector of 16), a row of -inf (one-hot at index 0), a row with two +inf (one-hot
    at the first)."""
    assert cpu_kernels.built()
    logits = torch.randn(2, 3, 1003, generator=torch.Generator().manual_seed(5)) * 4
    logits[0, 1, ::2] = -torch.inf
    logits[1, 0] = -torch.inf
    logits[1, 2, [7, 900]] = torch.inf
    ours = sampling.probabilities(logits)
    monkeypatch.setattr(cpu_kernels, "eager_cpu", lambda t: False)
    reference = sampling.probabilities(logits)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-9)
    assert ours[1, 0, 0] == 1 and ours[1, 2, 7] == 1 and ours[1, 2].sum() == 1
    assert (ours[0, 1, ::2] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_draw_in_one_call_draws_what_its_lines_draw(dtype, monkeypatch):
    """The same token for every row as the cumulative-sum lines: unnormalised weights with zeros over a
    large vocabulary, uniforms anywhere in [0, 1), 0 and just below 1 among them."""
    assert cpu_kernels.built()
    g = torch.Generator().manual_seed(6)
    weights = (torch.rand(64, 5000, generator=g) ** 8 * (torch.rand(64, 5000, generator=g) < 0.7)).to(dtype)
    u = torch.rand(64, generator=g, dtype=torch.float64)
    u[:2] = torch.tensor([0.0, 1 - 1e-12])
    ours = draw(weights, u)
    monkeypatch.setattr(cpu_kernels, "eager_cpu", lambda t: False)
    assert torch.equal(ours, draw(weights, u))
    assert (weights.gather(1, ours[:, None]) > 0).all()


def test_a_compiled_graph_scans_the_vocabulary_only_through_cumsum_last():
    """Inductor before torch 2.13 failed to build a vocabulary-long scan fused with a reduction (on an
    H200, torch 2.11), so the graphs of `draw` and of top-p/typical filtering hand it no scan of their
    own: their running sums are `medusa::cumsum_last`, which it calls as it is."""
    recorded = GraphRecorder()
    weights, uniforms = torch.rand(2, 50), torch.rand(2)
    logits = torch.randn(2, 3, 50)
    torch._dynamo.reset()
    drawn = torch.compile(sampling.draw, backend=recorded, fullgraph=True)(weights, uniforms)
    kept = torch.compile(sampling._keep_smallest_set, backend=recorded, fullgraph=True)(
        logits, logits.argsort(-1, descending=True), torch.full((2, 1, 1), 0.9))
    calls = [str(node.target) for gm in recorded.graphs for node in gm.graph.nodes
             if node.op in ("call_function", "call_method")]
    assert sum("cumsum_last" in call for call in calls) == 2
    assert not [call for call in calls if "cum" in call and "cumsum_last" not in call]
    cdf = weights.cumsum(-1)
    assert torch.equal(drawn, (cdf < ((1 - uniforms) * cdf[:, -1])[:, None]).sum(-1))
    assert (kept.isinf() == sampling._keep_smallest_set(logits, logits.argsort(-1, descending=True),
                                                        torch.full((2, 1, 1), 0.9)).isinf()).all()
