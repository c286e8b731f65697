"""Constrained generation: a grammar's request emits only what its grammar allows, decoding plainly
beside speculating requests, which it leaves as they were."""

import copy
import dataclasses
import json
import re

import llguidance
import llguidance.hf
import pytest
import torch
from tokenizers import decoders

from medusa.engine import Engine, EngineError
from medusa.tree import get_tree
from runtime.config import SamplingParams
from runtime.grammar import GrammarError, compile_grammar, unpack
from tests.medusa.test_engine_speculative import heads_for
from tests.server.support import tiny_loaded

PATTERN = r"[0-9]{3}-[a-z]{2,5}"
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "size": {"enum": ["S", "M", "L"]},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["ok", "size", "n"], "additionalProperties": False}
PROMPTS = [[5, 6, 7], [11, 3, 9, 2, 40, 41, 42, 1, 17], [60], [8, 8, 8, 8, 8, 1]]


@pytest.fixture(scope="module")
def loaded():
    return tiny_loaded()


def engine(loaded, **kw):
    return Engine(loaded.model, loaded.tokenizer, loaded.eos_token_ids, max_batch_size=4,
                  max_total_tokens=128, **kw)


def text_of(loaded, tokens):
    return loaded.tokenizer.decode(tokens, skip_special_tokens=True)


def reference_greedy(loaded, prompt, grammar, max_new_tokens):
    """Plain greedy decoding written out: the whole text through the model at each token, the grammar's
    mask from a matcher of its own, the argmax of what it allows."""
    model, V = loaded.model, loaded.model.config.vocab_size
    matcher = llguidance.LLMatcher(llguidance.hf.from_tokenizer(loaded.tokenizer, n_vocab=V), grammar)
    tokens = list(prompt)
    for _ in range(max_new_tokens):
        mask = torch.tensor(list(matcher.compute_bitmask()), dtype=torch.uint8)  # V / 8 bytes
        allowed = ((mask[:, None] >> torch.arange(8)) & 1).flatten()[:V].bool()
        ids = torch.tensor([tokens])
        with torch.no_grad():
            cache = model.new_cache(1, len(tokens))
            hidden = model(ids, torch.arange(len(tokens))[None], cache, torch.tensor([0]))
        logits = model.logits(hidden)[0, -1]
        token = int(logits.masked_fill(~allowed, -torch.inf).argmax())
        tokens.append(token)
        assert matcher.consume_token(token)
        if token in loaded.eos_token_ids:
            break
    return tokens[len(prompt):]


def test_greedy_under_a_grammar_is_the_argmax_of_what_it_allows(loaded):
    grammar = compile_grammar("regex", PATTERN)
    params = SamplingParams(max_new_tokens=20, grammar=grammar)
    free = engine(loaded).generate(PROMPTS, SamplingParams(max_new_tokens=20))
    got = engine(loaded).generate(PROMPTS, params)
    for prompt, tokens, unconstrained in zip(PROMPTS, got, free, strict=True):
        assert tokens == reference_greedy(loaded, prompt, grammar, 20)
        assert tokens[-1] in loaded.eos_token_ids  # the pattern ends, then only EOS is allowed
        assert re.fullmatch(PATTERN, text_of(loaded, tokens)), text_of(loaded, tokens)
        assert not re.fullmatch(PATTERN, text_of(loaded, unconstrained))


def test_sampled_json_follows_its_schema(loaded):
    params = [SamplingParams(max_new_tokens=60, temperature=1.0, seed=seed,
                             grammar=compile_grammar("json", SCHEMA)) for seed in range(8)]
    outputs = engine(loaded).generate(PROMPTS * 2, params)
    values = [json.loads(text_of(loaded, tokens)) for tokens in outputs]
    for value in values:
        assert set(value) == {"ok", "size", "n"} and isinstance(value["ok"], bool)
        assert value["size"] in "SML" and 0 <= value["n"] <= 99
    assert len({json.dumps(v) for v in values}) > 1  # sampled, not one answer


def test_a_grammars_row_leaves_speculating_rows_as_they_were(loaded):
    """A constrained row decodes plainly inside a speculative batch; the others speculate, and every
    row's tokens are what it gets alone."""
    kw = {"heads": heads_for(loaded.model), "tree": get_tree("dynamic:8,topk=2,lookup=2")}
    params = [SamplingParams(max_new_tokens=16), SamplingParams(max_new_tokens=16, grammar=compile_grammar(
        "regex", PATTERN)), SamplingParams(max_new_tokens=16, temperature=0.9, seed=3),
        SamplingParams(max_new_tokens=16, temperature=0.9, seed=4, grammar=compile_grammar("json", SCHEMA))]
    together = engine(loaded, **kw).generate(PROMPTS, params)
    alone = [engine(loaded, **kw).generate([p], q)[0] for p, q in zip(PROMPTS, params, strict=True)]
    assert together == alone
    assert together[0] == engine(loaded).generate([PROMPTS[0]], params[0])[0]  # greedy: plain decoding's
    assert re.fullmatch(PATTERN, text_of(loaded, together[1]))


def test_a_byte_level_vocabulary_decoded_through_a_sequence_is_read_as_bytes(loaded):
    """The decoder transformers builds for SmolLM2's GGUF tokenizer: a Sequence around ByteLevel. Read as
    text, 'Ġ' is two bytes and no token a space, and a JSON schema's ': ' had allowed only ':'."""
    tokenizer = copy.deepcopy(loaded.tokenizer)
    tokenizer.backend_tokenizer.decoder = decoders.Sequence(
        [decoders.ByteFallback(), decoders.Fuse(), decoders.Replace("\u2581", " "), decoders.ByteLevel()])
    assert tokenizer.decode(tokenizer.encode("a: b")) == "a: b"
    as_gguf = dataclasses.replace(loaded, tokenizer=tokenizer)
    params = SamplingParams(max_new_tokens=60, grammar=compile_grammar("json", SCHEMA))
    for tokens in engine(as_gguf).generate(PROMPTS, params):
        assert set(json.loads(text_of(loaded, tokens))) == {"ok", "size", "n"}
        assert ": " in text_of(loaded, tokens)


def test_a_broken_grammar_is_refused():
    with pytest.raises(GrammarError, match="regex"):
        tiny_engine_grammars().check(compile_grammar("regex", "[0-9"))
    with pytest.raises(GrammarError, match="type"):
        compile_grammar("yaml", "a: b")
    with pytest.raises(EngineError, match="grammar"):
        engine(tiny_loaded()).add("x", [1, 2], SamplingParams(grammar="not a grammar {"))


def tiny_engine_grammars():
    return engine(tiny_loaded()).grammars


def test_bitmasks_unpack_bit_t_of_word_t_over_32():
    mask = torch.tensor([[-1, 0, 5]], dtype=torch.int32)  # 5: bits 0 and 2
    allowed = unpack(mask, 70)
    assert allowed.shape == (1, 70)
    assert allowed[0].nonzero().flatten().tolist() == list(range(32)) + [64, 66]
