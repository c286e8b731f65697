"""The prefix cache: a prompt that begins with tokens a slot holds starts from their K/V -- in that
slot, or copied from it -- and gives, bit for bit, what a fresh prefill of the whole prompt gives.
A reply's K/V are reused where row-invariant kernels wrote them (bf16 through ours here)."""

import math

import pytest
import torch
import transformers

from medusa.eagle import EagleConfig, random_drafter
from medusa.engine import Engine, InvariantError
from medusa.heads import MedusaConfig, random_heads
from medusa.tree import get_tree
from runtime import cpu_kernels
from runtime.config import SamplingParams
from runtime.llama import Llama
from tests.conftest import TINY, Vocab, ours_from_hf, tiny_hf_model

SYSTEM = list(range(3, 23))  # a prefix that prompts share: 20 tokens
GREEDY = SamplingParams(max_new_tokens=10)
SEEDED = SamplingParams(max_new_tokens=10, temperature=0.9, seed=7)


@pytest.fixture(scope="module")
def model():
    return ours_from_hf(tiny_hf_model("llama"))


@pytest.fixture(scope="module")
def served_bf16():
    """bf16 through our CPU kernels, as a CPU server runs (pieces of at most 16 rows), two layers of
    SmolLM2's width: at the tiny models' 64, oneDNN's products sum a row as ours do."""
    if not cpu_kernels.built():
        pytest.skip("our CPU kernels are not built")
    torch.manual_seed(0)
    wide = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3)
    config = transformers.LlamaConfig(**TINY | wide, tie_word_embeddings=True)
    hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    served = ours_from_hf(hf).to(torch.bfloat16).prepare_for_serving(1, 16)
    assert served.invariant_rows == 16
    return served


def drafter_of(model, kind):
    c = model.config
    if kind is None:
        return None, None
    drafter = random_heads(MedusaConfig(hidden_size=c.hidden_size, vocab_size=c.vocab_size), seed=0) \
        if kind == "heads" else random_drafter(EagleConfig.for_base(c, window=8), seed=0)
    return drafter.to(model.embed.weight.dtype).prepare_for_serving(), get_tree(
        "cpu" if kind == "heads" else "eagle-cpu")


def engine(model, kind=None, slots=2, **options):
    drafter, tree = drafter_of(model, kind)
    return Engine(model, Vocab(), (), max_batch_size=slots, max_total_tokens=128, heads=drafter, tree=tree,
                  **options)


def finish(e, request_id, prompt, params, chunk=None, prompt_logprobs=False):
    """Prefill (in chunks of `chunk` tokens, else whole) and run one request to its end, alone: its
    first Emitted and all its tokens."""
    e.start(request_id, prompt, params, prompt_logprobs)
    while (first := e.prefill(request_id, chunk or len(prompt))) is None:
        pass
    tokens = list(first.token_ids)
    while e.running:
        tokens += e.step()[0].token_ids
    return first, tokens


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
@pytest.mark.parametrize("kind", [None, "heads", "eagle"], ids=["plain", "heads", "eagle"])
@pytest.mark.parametrize("dtype", ["float32", "bf16"])
def test_a_conversations_next_turn_reuses_its_prompt_with_a_fresh_prefills_output(model, served_bf16, dtype,
                                                                                   kind, params):
    m = model if dtype == "float32" else served_bf16
    e = engine(m, kind)
    turn1 = SYSTEM + [30, 31]
    first, reply = finish(e, "turn 1", turn1, params)
    assert first.cached_tokens == 0
    turn2 = turn1 + reply + [40, 41, 42]
    first, tokens = finish(e, "turn 2", turn2, params, chunk=5)
    # the reply's K/V (but its last token's, never cached) where our kernels wrote them; the draft
    # layer's window of 8 is computed again
    held = len(turn1) + (len(reply) - 1 if dtype == "bf16" else 0)
    assert first.cached_tokens == min(held, len(turn2) - (8 if kind == "eagle" else 1))

    fresh_first, fresh_tokens = finish(engine(m, kind, prefix_caching=False), "turn 2", turn2, params)
    assert fresh_first.cached_tokens == 0
    assert tokens == fresh_tokens and first.logprobs == fresh_first.logprobs  # the same bits


def test_prefill_pieces_make_a_prompts_kv_independent_of_its_chunks(served_bf16, monkeypatch):
    """Our kernels give each row the same bits whatever rows come with it; oneDNN's products, which a
    forward of more rows than they take goes through, do not: a prompt fed to them in one forward and in
    two has different K/V (negative control), fed in pieces the same."""
    prompt = list(range(5, 45))  # 40 tokens: more than the 16 rows our kernels take

    def kv(chunk):
        e = engine(served_bf16, slots=1, prefix_caching=False)
        finish(e, "a", prompt, SamplingParams(max_new_tokens=1), chunk=chunk)
        return torch.stack([t[0, :, :len(prompt)] for t in e.cache.k + e.cache.v])

    assert torch.equal(kv(None), kv(7))
    monkeypatch.setattr(Llama, "invariant_rows", property(lambda self: None))
    assert not torch.equal(kv(None), kv(7))


def test_a_prefix_is_copied_from_a_running_slot(model):
    """A shared system prompt: the second request copies its K/V from the first's slot while that one
    runs. The cache is poisoned with NaN first, so that K/V left uncopied would show."""
    a, b = SYSTEM + [30, 31], SYSTEM + [50, 51, 52]
    alone = {p[-1]: finish(engine(model, prefix_caching=False), "x", p, GREEDY)[1] for p in (a, b)}
    e = engine(model)
    for t in e.cache.k + e.cache.v:
        t.fill_(math.nan)
    out = {"a": list(e.add("a", a, GREEDY).token_ids)}
    out["a"] += e.step()[0].token_ids
    first = e.add("b", b, GREEDY)
    assert first.cached_tokens == len(SYSTEM)
    out["b"] = list(first.token_ids)
    while e.running:
        for emitted in e.step():
            out[emitted.request_id] += emitted.token_ids
    assert out == {"a": alone[31], "b": alone[52]}


def test_a_slot_kept_longest_unused_is_the_one_taken(model):
    """Two finished conversations keep their slots; an unrelated prompt takes the one unused longest,
    so the more recent conversation goes on from its K/V."""
    e = engine(model, slots=2)
    old, recent = [60, 61, 62, 63, 64], [70, 71, 72, 73, 74]
    finish(e, "old", old, GREEDY)
    finish(e, "recent", recent, GREEDY)
    assert finish(e, "other", [80, 81, 82, 83], GREEDY)[0].cached_tokens == 0
    assert finish(e, "recent again", recent + [1, 2], GREEDY)[0].cached_tokens == len(recent)
    assert finish(e, "old again", old + [1, 2], GREEDY)[0].cached_tokens == 0


def test_the_drafters_window_comes_from_the_prompt_not_the_cache(model):
    """The draft layer reads the last W positions' features: after a cached prefix, the first chunk
    computes at least W of them whatever chunk the caller asked for, so the window is a fresh
    prefill's."""
    prompt = SYSTEM + [30, 31]
    e = engine(model, "eagle", slots=1)
    finish(e, "turn 1", prompt, GREEDY)
    turn2 = prompt + [40, 41, 42, 43]
    e.start("turn 2", turn2, GREEDY)
    while (first := e.prefill("turn 2", 2)) is None:
        pass
    assert first.cached_tokens == len(turn2) - 8  # a window of 8 left to compute
    fresh = engine(model, "eagle", slots=1, prefix_caching=False)
    fresh.add("turn 2", turn2, GREEDY)
    for state in ("features", "window_tokens"):
        assert torch.equal(getattr(e.device_step, state)[0], getattr(fresh.device_step, state)[0])


def test_prompt_logprobs_and_a_disabled_cache_reuse_nothing(model):
    e = engine(model)
    finish(e, "a", SYSTEM + [30], GREEDY)
    first, _ = finish(e, "b", SYSTEM + [31], GREEDY, prompt_logprobs=True)
    expected, _ = finish(engine(model), "b", SYSTEM + [31], GREEDY, prompt_logprobs=True)
    assert first.cached_tokens == 0 and first.prefill_logprobs == expected.prefill_logprobs
    off = engine(model, prefix_caching=False)
    finish(off, "a", SYSTEM + [30], GREEDY)
    assert finish(off, "b", SYSTEM + [31], GREEDY)[0].cached_tokens == 0


def test_a_request_that_failed_leaves_no_prefix(model, monkeypatch):
    e = engine(model, slots=1)
    e.add("a", SYSTEM + [30], GREEDY)
    monkeypatch.setattr(e.device_step, "run", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("fault")))
    with pytest.raises(RuntimeError, match="fault"):
        e.step()
    monkeypatch.undo()
    assert e.free_slots == 1
    assert finish(e, "b", SYSTEM + [31], GREEDY)[0].cached_tokens == 0


def test_a_reply_written_by_a_step_of_more_rows_than_the_kernels_take_is_prefilled_again(served_bf16):
    """Three sequences speculating on a tree: more rows than our kernels take (16), so the step's
    products went through oneDNN, whose K/V differ from a prefill's; the next turn reuses the prompt
    only, and gives a fresh prefill's output."""
    e = engine(served_bf16, "heads", slots=3)
    prompts = {"a": SYSTEM + [30, 31], "b": [50, 51, 52, 53], "c": [60, 61]}
    assert 3 * e.tree.num_nodes > served_bf16.invariant_rows
    replies = {rid: list(e.add(rid, p, GREEDY).token_ids) for rid, p in prompts.items()}
    while e.running:
        for emitted in e.step():
            replies[emitted.request_id] += emitted.token_ids
    turn2 = prompts["a"] + replies["a"] + [40, 41]
    first, tokens = finish(e, "a again", turn2, GREEDY)
    assert first.cached_tokens == len(prompts["a"])
    assert tokens == finish(engine(served_bf16, "heads", prefix_caching=False), "x", turn2, GREEDY)[1]


def test_requests_started_together_share_the_prefix_the_first_one_prefills(model):
    """A burst with one system prompt, admitted before any of it is prefilled (as the scheduler
    admits a round): each later request copies the prefix at its first chunk."""
    prompts = {"a": SYSTEM + [30, 31], "b": SYSTEM + [50, 51, 52], "c": SYSTEM + [60]}
    off = engine(model, prefix_caching=False)
    alone = {rid: finish(off, rid, p, GREEDY)[1] for rid, p in prompts.items()}
    e = engine(model, slots=3)
    for rid, prompt in prompts.items():
        e.start(rid, prompt, GREEDY)
    out, cached = {}, {}
    for rid in prompts:
        first = e.prefill(rid, 100)
        out[rid], cached[rid] = list(first.token_ids), first.cached_tokens
    assert cached == {"a": 0, "b": len(SYSTEM), "c": len(SYSTEM)}
    while e.running:
        for emitted in e.step():
            out[emitted.request_id] += emitted.token_ids
    assert out == alone


def test_check_finds_a_held_slot_kept_for_the_cache(model):
    """A slot both held and kept would have its K/V reused while its request rewrites them."""
    e = engine(model, slots=2)
    finish(e, "a", SYSTEM, GREEDY)
    e.check()
    e.start("b", [90, 91], GREEDY)  # takes the slot that kept nothing
    e._kept[e._prefilling["b"].slot] = [90]
    with pytest.raises(InvariantError, match="held but kept"):
        e.check()
