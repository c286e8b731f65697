"""Medusa on the real embedded model with the shipped heads: greedy output equals plain greedy."""

import pytest
import torch

from medusa.checkpoints import SHIPPED_EAGLE, SHIPPED_HEADS, load_drafter, load_heads, shipped_drafter
from medusa.engine import Engine
from medusa.tree import default_tree, get_tree
from runtime import cpu_kernels
from runtime.config import SamplingParams
from runtime.loading import load_model
from runtime.prompt import Prompter

pytestmark = pytest.mark.slow

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.",
             "Explain in two sentences why the sky is blue to a child who keeps asking questions.",
             "List three prime numbers."]


def plain_and_speculative(real_model, drafter, tree: str) -> tuple[Engine, Engine]:
    """Two engines on the real model: plain decoding, and speculation with this drafter and tree."""
    def engine(**speculation) -> Engine:
        return Engine(real_model.model, real_model.tokenizer, real_model.eos_token_ids, max_batch_size=4,
                      max_total_tokens=160, **speculation)
    return engine(), engine(heads=drafter, tree=get_tree(tree))


def batched(spec: Engine, prompts: list[list[int]], params: SamplingParams) -> tuple[list[list[int]], float]:
    """All prompts through one speculative engine together: each one's tokens, and the tokens a
    request got per step."""
    out, tokens, steps = {}, 0, 0
    for i, prompt in enumerate(prompts):
        out[i] = spec.add(i, prompt, params).token_ids
    while spec.running:
        for e in spec.step():
            out[e.request_id] += e.token_ids
            tokens, steps = tokens + len(e.token_ids), steps + 1
    return [out[i] for i in range(len(prompts))], tokens / steps


@pytest.mark.parametrize("batch", [1, 4])
def test_medusa_greedy_equals_plain_greedy(real_model, batch):
    tok = real_model.tokenizer
    prompts = [Prompter(tok, chat_template=True).encode(q) for q in QUESTIONS[:batch]]
    params = SamplingParams(max_new_tokens=32)
    model = real_model.model
    heads = load_heads(SHIPPED_HEADS, model.config, model.lm_head)
    plain, spec = plain_and_speculative(real_model, heads, "cpu")
    expected = plain.generate(prompts, params)
    assert spec.generate(prompts, params) == expected
    assert all(len(e) > 5 for e in expected)


def test_shipped_draft_layer_keeps_greedy_output_and_is_accepted(real_model):
    """The shipped EAGLE-style layer with its tree: the same tokens as plain decoding, batched, and
    more than one token per step (random drafts accept almost none on a 49k-word vocabulary)."""
    tok = real_model.tokenizer
    prompts = [Prompter(tok, chat_template=True).encode(q) for q in QUESTIONS]
    params = SamplingParams(max_new_tokens=32)
    model = real_model.model
    drafter = load_drafter(SHIPPED_EAGLE, model.config, model.lm_head)
    plain, spec = plain_and_speculative(real_model, drafter, "eagle-cpu")
    outputs, per_step = batched(spec, prompts, params)
    assert outputs == plain.generate(prompts, params)
    assert per_step > 1.4


@pytest.mark.skipif(not cpu_kernels.built(), reason="bf16 exactness rests on our CPU kernels")
@pytest.mark.parametrize("kind", ["heads", "eagle"])
def test_the_default_bf16_cpu_speculation_keeps_greedy_output(kind):
    """What `--dtype bfloat16` serves on the CPU by default: each shipped drafter for bf16 (the draft
    layer trained on bf16 hidden states) with its dynamic tree (grown by our drafting kernels),
    requests batched: plain greedy's tokens, in bfloat16 too, and more than one token per step.
    Exact while our kernel takes every row of a step (README), so a batch holds as many requests as
    the load measured it on rows for (24 rows here once: 3 of 4)."""
    loaded = load_model(device="cpu", dtype="bfloat16")
    model = loaded.model
    load = load_heads if kind == "heads" else load_drafter
    drafter = load(shipped_drafter(kind, "bfloat16"), model.config, model.lm_head, dtype=torch.bfloat16)
    tree = default_tree("cpu", "bfloat16", kind)
    assert get_tree(tree).__class__.__name__ == "DynamicTree"
    plain, spec = plain_and_speculative(loaded, drafter, tree)
    prompts = [Prompter(loaded.tokenizer, chat_template=True).encode(q) for q in QUESTIONS]
    params = SamplingParams(max_new_tokens=32)
    per_batch = max(1, model.lm_head.own_kernel_rows // get_tree(tree).num_nodes)
    for first in range(0, len(prompts), per_batch):
        outputs, per_step = batched(spec, prompts[first:first + per_batch], params)
        assert outputs == plain.generate(prompts[first:first + per_batch], params)
        assert per_step > 1.4
