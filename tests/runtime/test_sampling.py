"""Our logit processors agree with transformers' own warpers."""

import pytest
import torch
from transformers import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from runtime.config import SamplingParams
from runtime.sampling import target_logits

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
    got = target_logits(logits, params, None)
    assert torch.equal(got.isinf(), expected.isinf())
    finite = ~got.isinf()
    torch.testing.assert_close(got[finite], expected[finite])


def test_repetition_penalty_matches_transformers():
    logits = torch.randn(1, 30, generator=torch.Generator().manual_seed(1))
    history = torch.tensor([[3, 7, 7, 21]])
    seen = torch.zeros(1, 30, dtype=torch.bool)
    seen[0, history[0]] = True
    expected = RepetitionPenaltyLogitsProcessor(1.5)(history, logits.clone())
    got = target_logits(logits, SamplingParams(repetition_penalty=1.5), seen)
    torch.testing.assert_close(got, expected)
