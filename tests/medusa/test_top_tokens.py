"""`SamplingParams.top_n`: beside each token, the most likely tokens where it was chosen and their
logprobs, under the request's processed distribution; from a plain step, a verified tree (any node of
the accepted path) and the prefill's first token alike, so that speculation changes none of them."""

import pytest
import torch

from medusa.engine import Engine
from medusa.step import ROOT_ONLY, DeviceStep
from medusa.tree import get_tree
from runtime.config import ConfigError, SamplingParams
from runtime.llama import Llama
from tests.conftest import Vocab, ours_from_hf, tiny_hf_model
from tests.medusa.test_engine_speculative import PROMPTS, eagle_for, heads_for


@pytest.fixture(scope="module")
def model() -> Llama:
    return ours_from_hf(tiny_hf_model("llama"))


def tokens_and_tops(engine: Engine, params: SamplingParams) -> dict[int, list]:
    """Each request's (token, logprob, top) triples, in order."""
    out: dict[int, list] = {i: [] for i in range(len(PROMPTS))}
    for e in engine.run(zip(range(len(PROMPTS)), PROMPTS, [params] * len(PROMPTS), strict=True)):
        assert e.error is None and e.top_tokens is not None and len(e.top_tokens) == len(e.token_ids)
        out[e.request_id] += list(zip(e.token_ids, e.logprobs, e.top_tokens, strict=True))
    return out


def reference(model: Llama, prompt: list[int], generated: list[int], temperature: float, n: int) -> list:
    """The top n (id, logprob) at each generated position, from one plain forward over the whole text."""
    step = DeviceStep(model, None, ROOT_ONLY, 1, 128)
    text = prompt + generated
    hidden = step.prefill(0, text, 0)  # [len, C]
    logits = model.logits(hidden[len(prompt) - 1:len(text) - 1]).float()
    logp = (logits / (temperature or 1.0)).log_softmax(-1)
    values, ids = logp.topk(n, dim=-1)
    return [list(zip(i.tolist(), v.tolist(), strict=True)) for i, v in zip(ids, values, strict=True)]


@pytest.mark.parametrize("drafter", [None, heads_for, eagle_for], ids=["plain", "heads", "draft-layer"])
@pytest.mark.parametrize("temperature", [0.0, 0.8], ids=["greedy", "sampled"])
def test_each_token_reports_the_most_likely_tokens_where_it_was_chosen(model, drafter, temperature):
    heads = None if drafter is None else drafter(model)
    engine = Engine(model, Vocab(), (), max_batch_size=4, max_total_tokens=128, heads=heads,
                    tree=None if heads is None else get_tree("cpu"))
    params = SamplingParams(max_new_tokens=16, temperature=temperature, seed=3, top_n=4)
    with torch.inference_mode():
        got = tokens_and_tops(engine, params)
    for i, triples in got.items():
        expected = reference(model, PROMPTS[i], [t for t, _, _ in triples], temperature, 4)
        for (token, logprob, top), want in zip(triples, expected, strict=True):
            assert [t for t, _ in top] == [t for t, _ in want]
            torch.testing.assert_close(torch.tensor([lp for _, lp in top]),
                                       torch.tensor([lp for _, lp in want]), atol=1e-4, rtol=0)
            assert [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)
            if temperature == 0.0:
                assert top[0] == (token, logprob)  # greedy: the token is the most likely one
            else:
                assert logprob <= top[0][1]


def test_without_top_n_no_alternatives_are_reported_and_top_n_is_bounded(model):
    engine = Engine(model, Vocab(), (), max_total_tokens=64)
    assert all(e.top_tokens is None for e in engine.run([(0, PROMPTS[0], SamplingParams(max_new_tokens=4))]))
    with pytest.raises(ConfigError, match="top_n"):
        SamplingParams(top_n=21)


def test_a_prompts_logprobs_come_with_its_most_likely_tokens_where_asked(model):
    engine = Engine(model, Vocab(), (), max_total_tokens=64)
    prompt = PROMPTS[1]
    params = SamplingParams(max_new_tokens=1, top_n=3)
    with torch.inference_mode():
        first = engine.add(0, prompt, params, prompt_logprobs=True)
        expected = reference(model, prompt[:1], prompt[1:], 0.0, 3)  # the raw distribution at each position
    assert first.prefill_top_tokens[0] is None  # nothing before the first prompt token
    scored = zip(first.prefill_top_tokens[1:], expected, first.prefill_logprobs[1:], strict=True)
    for got, want, logprob in scored:
        assert [t for t, _ in got] == [t for t, _ in want]
        torch.testing.assert_close(torch.tensor([lp for _, lp in got]), torch.tensor([lp for _, lp in want]),
                                   atol=1e-4, rtol=0)
        assert got[0][1] >= logprob
    assert Engine(model, Vocab(), (), max_total_tokens=64).add(
        0, prompt, SamplingParams(max_new_tokens=1), prompt_logprobs=True).prefill_top_tokens is None
