"""A prompt prefilled in chunks (`start` + `prefill`) gives what one whole-prompt `add` gives."""

import pytest

from medusa.engine import Engine
from medusa.heads import MedusaConfig, random_heads
from medusa.tree import get_tree
from runtime.config import SamplingParams
from tests.conftest import Vocab, ours_from_hf, tiny_hf_model

PROMPT = [11, 3, 9, 2, 40, 41, 42, 1, 17, 5, 6, 7, 60, 8, 8, 1, 23]



@pytest.fixture(scope="module")
def model():
    return ours_from_hf(tiny_hf_model("llama"))


def engine(model, heads=None):
    tree = get_tree("cpu") if heads is not None else None
    return Engine(model, Vocab(), (), max_batch_size=2, max_total_tokens=64, heads=heads, tree=tree)


def run_chunked(e, request_id, prompt, params, chunk, prompt_logprobs=False):
    """Prefill `prompt` in chunks of `chunk` tokens, then step to the end; (Emitted of prefill, tokens)."""
    e.start(request_id, prompt, params, prompt_logprobs)
    calls = 0
    while (first := e.prefill(request_id, chunk)) is None:
        calls += 1
    assert calls == (len(prompt) - 1) // chunk
    tokens = list(first.token_ids)
    while e.running:
        tokens += e.step()[0].token_ids
    return first, tokens


@pytest.mark.parametrize("chunk", [1, 4, 16, 17, 100])
def test_chunked_prefill_equals_whole_prefill(model, chunk):
    params = SamplingParams(max_new_tokens=12)
    whole = engine(model)
    first = whole.add("a", PROMPT, params, prompt_logprobs=True)
    expected = list(first.token_ids)
    while whole.running:
        expected += whole.step()[0].token_ids

    chunked_first, tokens = run_chunked(engine(model), "a", PROMPT, params, chunk, prompt_logprobs=True)
    assert tokens == expected
    assert chunked_first.prefill_logprobs[0] is None
    assert chunked_first.prefill_logprobs[1:] == pytest.approx(first.prefill_logprobs[1:], abs=1e-5)
    assert chunked_first.logprobs == pytest.approx(first.logprobs, abs=1e-5)


def test_a_served_model_scores_a_one_token_prompt_and_a_last_chunk_of_one_token():
    """A prompt's last token scores no prompt token (nothing follows it in the prompt), so a one-token
    prompt's logprobs, or a last chunk of one token, multiply zero rows by lm_head: on the CPU through
    our kernel, which once divided by zero there and killed the server (SIGFPE: `/v1/completions` of
    one token with echo and logprobs)."""
    served = ours_from_hf(tiny_hf_model("llama")).prepare_for_serving(packed_from_rows=1, own_kernel_rows=16)
    assert served.lm_head.own_weight is not None and served.config.vocab_size >= 16  # whole blocks
    params = SamplingParams(max_new_tokens=3)
    first = engine(served).add("a", PROMPT[:1], params, prompt_logprobs=True)
    assert first.prefill_logprobs == [None] and len(first.token_ids) == 1
    whole = engine(served).add("a", PROMPT, params, prompt_logprobs=True)
    chunked_first, _ = run_chunked(engine(served), "a", PROMPT, params, 1, prompt_logprobs=True)
    assert chunked_first.prefill_logprobs[1:] == pytest.approx(whole.prefill_logprobs[1:], abs=1e-5)


def test_chunked_prefill_under_speculation_with_seeded_sampling(model):
    heads = random_heads(MedusaConfig(hidden_size=model.config.hidden_size,
                                      vocab_size=model.config.vocab_size), seed=0)
    params = SamplingParams(max_new_tokens=8, temperature=0.9, seed=4)
    expected = engine(model, heads).generate([PROMPT], params)[0]
    assert run_chunked(engine(model, heads), "a", PROMPT, params, chunk=5)[1] == expected


def test_steps_run_between_chunks_and_cancel_frees_a_prefilling_slot(model):
    params = SamplingParams(max_new_tokens=20)
    alone = engine(model).generate([[5, 6, 7]], params)[0]
    e = engine(model)
    tokens = list(e.add("running", [5, 6, 7], params).token_ids)
    e.start("long", PROMPT, params)
    assert (e.running, e.free_slots) == (1, 0)
    for _ in range(3):  # the long prompt is not in the batch until its last chunk
        assert e.prefill("long", 4) is None
        (out,) = e.step()
        tokens += out.token_ids
    e.cancel("long")
    assert e.free_slots == 1
    while e.running:
        tokens += e.step()[0].token_ids
    assert tokens == alone

