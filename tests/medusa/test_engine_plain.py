"""Plain decoding (no heads): equals transformers' generate, batch-invariant, seeded, stops exactly."""

import dataclasses

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from medusa.engine import Engine, EngineError
from runtime.config import SamplingParams
from tests.conftest import Vocab, ours_from_hf, tiny_hf_model

PROMPTS = [[5, 6, 7], [11, 3, 9, 2, 40, 41, 42, 1, 17], [60], [8, 8, 8, 8, 8, 1]]



@pytest.fixture(scope="module")
def hf_and_ours():
    hf = tiny_hf_model("llama")
    return hf, ours_from_hf(hf)


def engine(model, **kw):
    kw.setdefault("max_batch_size", 4)
    kw.setdefault("max_total_tokens", 64)
    return Engine(model, Vocab(), kw.pop("eos", ()), **kw)


def test_greedy_equals_transformers_generate(hf_and_ours):
    hf, ours = hf_and_ours
    got = engine(ours).generate(PROMPTS, SamplingParams(max_new_tokens=12))
    for prompt, tokens in zip(PROMPTS, got, strict=True):
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                               min_new_tokens=12, pad_token_id=0)[0, len(prompt):]
        assert tokens == expected.tolist()


def test_batch_equals_alone(hf_and_ours):
    _, ours = hf_and_ours
    params = SamplingParams(max_new_tokens=10, temperature=0.8, seed=3)
    together = engine(ours).generate(PROMPTS, params)
    alone = [engine(ours).generate([p], params)[0] for p in PROMPTS]
    assert together == alone


def test_seed_reproducible_and_seed_matters(hf_and_ours):
    _, ours = hf_and_ours
    e = engine(ours)
    runs = [e.generate([PROMPTS[1]], SamplingParams(max_new_tokens=16, temperature=1.5, seed=s))[0]
            for s in (1, 1, 2)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_stop_eos_and_length_are_exact(hf_and_ours):
    _, ours = hf_and_ours
    free = engine(ours).generate([PROMPTS[0]], SamplingParams(max_new_tokens=12))[0]
    text = Vocab().decode(free)
    # stop on the text of tokens 4..5: generation must end right after token 5
    stop = text[4:6]
    first = text.find(stop) + len(stop)
    e = engine(ours)
    out = e.add("a", PROMPTS[0], SamplingParams(max_new_tokens=12, stop=(stop,)))
    tokens, reason = list(out.token_ids), out.finish_reason
    while reason is None:
        (out,) = e.step()
        tokens += out.token_ids
        reason = out.finish_reason
    assert reason == "stop_sequence" and tokens == free[:first]
    eos = free[7]
    with_eos = engine(ours, eos=[eos]).generate([PROMPTS[0]], SamplingParams(max_new_tokens=12))[0]
    assert with_eos == free[:free.index(eos) + 1]
    assert engine(ours).generate([PROMPTS[0]], SamplingParams(max_new_tokens=3))[0] == free[:3]
    assert e.free_slots == 4 and e.running == 0


class CountingVocab(Vocab):
    """Vocab that records how many tokens each decode call was given."""

    def __init__(self):
        self.decoded = []

    def decode(self, ids):
        self.decoded.append(len(ids))
        return super().decode(ids)


def test_stop_strings_decode_a_bounded_tail(hf_and_ours):
    """Looking for a stop string decodes a few tokens per new token, however long the generation, and
    still stops right after a stop string that spans many tokens."""
    _, ours = hf_and_ours
    free = engine(ours).generate([PROMPTS[1]], SamplingParams(max_new_tokens=40))[0]
    vocab = CountingVocab()
    never = SamplingParams(max_new_tokens=40, stop=("!?",))  # Vocab decodes letters only
    assert Engine(ours, vocab, (), max_total_tokens=64).generate([PROMPTS[1]], never)[0] == free
    assert len(vocab.decoded) == 40 and max(vocab.decoded) == len("!?") + 4
    text = Vocab().decode(free)
    long_stop = text[20:32]  # 12 tokens
    out = engine(ours).generate([PROMPTS[1]], SamplingParams(max_new_tokens=40, stop=(long_stop,)))[0]
    assert out == free[:text.find(long_stop) + len(long_stop)]


def test_repetition_penalty_changes_greedy_output(hf_and_ours):
    hf, ours = hf_and_ours
    params = SamplingParams(max_new_tokens=12, repetition_penalty=1.8)
    got = engine(ours).generate([PROMPTS[3]], params)[0]
    expected = hf.generate(torch.tensor([PROMPTS[3]]), max_new_tokens=12, do_sample=False,
                           repetition_penalty=1.8, min_new_tokens=12, pad_token_id=0)[0, 6:]
    assert got == expected.tolist()


class _OpenAIPenalties(LogitsProcessor):
    """OpenAI's frequency and presence penalties written out for transformers' generate: each
    logit less frequency x its token's count in the generated text, less presence if it is there."""

    def __init__(self, prompt_len: int, frequency: float, presence: float):
        self.prompt_len, self.frequency, self.presence = prompt_len, frequency, presence

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        counts = torch.zeros_like(scores)
        counts.scatter_add_(1, input_ids[:, self.prompt_len:], torch.ones_like(scores[:, :1]).expand(
            -1, input_ids.shape[1] - self.prompt_len))
        return scores - self.frequency * counts - self.presence * (counts > 0)


def test_stop_token_ids_end_the_text_as_eos_does_and_are_kept(hf_and_ours):
    _, ours = hf_and_ours
    free = engine(ours).generate([PROMPTS[0]], SamplingParams(max_new_tokens=12))[0]
    stop = free[5]
    params = SamplingParams(max_new_tokens=12, stop_token_ids=(stop, 96))
    assert engine(ours).generate([PROMPTS[0]], params)[0] == free[:free.index(stop) + 1]
    ignoring = dataclasses.replace(params, ignore_eos=True)  # ignore_eos is EOS's alone, as vLLM's
    assert engine(ours).generate([PROMPTS[0]], ignoring)[0] == free[:free.index(stop) + 1]
    banned = engine(ours).generate([PROMPTS[0]], dataclasses.replace(params, min_tokens=8))[0]
    assert stop not in banned[:8] and banned[:free.index(stop)] == free[:free.index(stop)]
    with pytest.raises(EngineError, match="stop_token_ids: token id 97 is outside"):
        engine(ours).add("x", PROMPTS[0], SamplingParams(stop_token_ids=(97,)))


def test_min_tokens_bans_eos_until_then_as_transformers_min_new_tokens(hf_and_ours):
    hf, ours = hf_and_ours
    prompt = PROMPTS[0]
    free = engine(ours).generate([prompt], SamplingParams(max_new_tokens=16))[0]
    eos = free[2]  # greedy would end at the third token
    for min_tokens in (0, 5, 16):
        got = engine(ours, eos=[eos]).generate([prompt], SamplingParams(max_new_tokens=16,
                                                                        min_tokens=min_tokens))[0]
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False,
                               min_new_tokens=min_tokens, eos_token_id=eos, pad_token_id=0)[0, len(prompt):]
        assert got == expected.tolist()
        assert eos not in got[:min_tokens] and len(got) >= min(min_tokens + 1, 16)
    sampled = SamplingParams(max_new_tokens=12, min_tokens=8, temperature=1.0, logit_bias=((eos, 5.0),))
    for seed in range(4):  # EOS favoured: drawn at once without the ban, never before it with it
        got = engine(ours, eos=[eos]).generate([prompt], dataclasses.replace(sampled, seed=seed))[0]
        assert eos not in got[:8] and len(got) >= 9
    assert len(engine(ours, eos=[eos]).generate(
        [prompt], dataclasses.replace(sampled, seed=0, min_tokens=0))[0]) < 9


@pytest.mark.parametrize("frequency, presence", [(0.1, 0.0), (0.0, 1.5), (-0.8, 0.5)])
def test_frequency_and_presence_penalties_count_the_generated_tokens(hf_and_ours, frequency, presence):
    """Against transformers' greedy generate with the penalties written out: the prompt's tokens do
    not count, a generated token counts each time it appears (at 0.1 a loop of two tokens goes on
    until their counts reach 2 or 3, not at once or forever)."""
    hf, ours = hf_and_ours
    prompt = PROMPTS[3]
    params = SamplingParams(max_new_tokens=40, frequency_penalty=frequency, presence_penalty=presence)
    got = engine(ours).generate([prompt], params)[0]
    expected = hf.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False, min_new_tokens=40,
                           pad_token_id=0, logits_processor=LogitsProcessorList(
                               [_OpenAIPenalties(len(prompt), frequency, presence)]))[0, len(prompt):]
    assert got == expected.tolist()
    assert got != engine(ours).generate([prompt], SamplingParams(max_new_tokens=40))[0]


def test_a_logit_bias_is_transformers_sequence_bias_of_single_tokens(hf_and_ours):
    hf, ours = hf_and_ours
    prompt, free = PROMPTS[1], engine(ours).generate([PROMPTS[1]], SamplingParams(max_new_tokens=16))[0]
    bias = ((free[0], -100.0), (free[3], -3.0), (50, 4.0))  # the first token banned, two others moved
    got = engine(ours).generate([prompt], SamplingParams(max_new_tokens=16, logit_bias=bias))[0]
    expected = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, min_new_tokens=16,
                           pad_token_id=0, sequence_bias={(t,): b for t, b in bias})[0, len(prompt):]
    assert got == expected.tolist()
    assert free[0] not in got and got != free
    one_slot = engine(ours, max_batch_size=1)
    one_slot.generate([prompt], SamplingParams(max_new_tokens=16, logit_bias=bias))
    # the slot's next request, whose one pair moves nothing, reads none of the bias before it
    assert one_slot.generate([prompt], SamplingParams(max_new_tokens=16, logit_bias=((50, 0.0),)))[0] == free
    with pytest.raises(EngineError, match="logit_bias: token id 128 is outside"):
        engine(ours).add("x", prompt, SamplingParams(logit_bias=((128, 1.0),)))


def test_too_long_and_full_are_clear_errors(hf_and_ours):
    _, ours = hf_and_ours
    e = engine(ours, max_batch_size=1)
    with pytest.raises(EngineError, match="max_total_tokens"):
        e.add("x", list(range(60)), SamplingParams(max_new_tokens=10))
    e.add("y", [1, 2], SamplingParams(max_new_tokens=10))
    with pytest.raises(EngineError, match="slot"):
        e.add("z", [1, 2], SamplingParams(max_new_tokens=10))
    e.cancel("y")
    assert e.free_slots == 1


def test_greedy_logprobs_are_the_models(hf_and_ours):
    hf, ours = hf_and_ours
    e = engine(ours)
    out = e.add("r", PROMPTS[1], SamplingParams(max_new_tokens=5))
    tokens, logprobs = list(out.token_ids), list(out.logprobs)
    while e.running:
        (out,) = e.step()
        tokens += out.token_ids
        logprobs += out.logprobs
    ref = hf.generate(torch.tensor([PROMPTS[1]]), max_new_tokens=5, do_sample=False, min_new_tokens=5,
                      pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    expected = [step.log_softmax(-1)[0, t].item() for step, t in zip(ref.logits, tokens, strict=True)]
    assert logprobs == pytest.approx(expected, abs=1e-4)
