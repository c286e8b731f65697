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

from runtime.config import SamplingParams
from runtime.sampling import Needs, RowParams, draw, process, warp

CASES = [
    (SamplingParams(temperature=0.7, top_k=5), [TemperatureLogitsWarper(0.7), TopKLogitsWarper(5)]),
    (SamplingParams(temperature=1.3, top_p=0.6), [TemperatureLogitsWarper(1.3), TopPLogitsWarper(0.6)]),
    (SamplingParams(temperature=1.0, typical_p=0.5), [TypicalLogitsWarper(0.5)]),
]


@pytest.mark.parametrize("params,warpers", CASES)
def test_warpers_keep_the_same_tokens_as_transformers(params, warpers):
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
    got = process(logits[None], RowParams.of([params]), seen[None], Needs.of([params]))[0]
    torch.testing.assert_close(got, expected)


def test_each_row_of_a_mixed_batch_is_processed_with_its_own_parameters():
    """One call for greedy, penalised, top-k, top-p and typical rows gives each row what it gives
    alone: a parameter that is off leaves a row unchanged, whatever the batch needs."""
    params = [SamplingParams(), SamplingParams(repetition_penalty=1.3), *(p for p, _ in CASES),
              SamplingParams(temperature=0.5, top_k=3, top_p=0.9, typical_p=0.8, repetition_penalty=0.7)]
    B, N, V = len(params), 4, 50
    logits = torch.randn(B, N, V, generator=torch.Generator().manual_seed(2)) * 3
    seen = torch.rand(B, N, V, generator=torch.Generator().manual_seed(3)) < 0.2
    got = process(logits, RowParams.of(params), seen, Needs.of(params))
    for b, p in enumerate(params):
        alone = process(logits[b:b + 1], RowParams.of([p]), seen[b:b + 1], Needs.of([p]))[0]
        assert torch.equal(got[b], alone), b
    assert not torch.equal(got[1], logits[1]) and torch.equal(got[0], logits[0])


def test_draw_follows_the_weights_and_never_draws_a_zero():
    weights = torch.tensor([[0.0, 3.0, 0.0, 1.0, 4.0, 0.0]]).expand(40000, 6)  # unnormalised
    u = torch.rand(40000, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    counts = torch.bincount(draw(weights, u), minlength=6)
    assert counts[[0, 2, 5]].sum() == 0
    expected = torch.tensor([3.0, 1.0, 4.0]) / 8 * 40000
    assert chisquare(counts[[1, 3, 4]].numpy(), expected.numpy()).pvalue > 1e-3
    ends = draw(weights[:2], torch.tensor([0.0, 1 - 1e-12], dtype=torch.float64))  # the extreme uniforms
    assert ends.tolist() == [4, 1]  # still tokens of nonzero weight
