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
from scipy.stats import chisquare
from tokenizers import decoders

from medusa.engine import Engine, EngineError
from medusa.step import CHAIN_MASKS, chain_masks
from medusa.tree import build_tree, get_tree
from runtime.config import SamplingParams
from runtime.grammar import GrammarError, compile_grammar, only, unpack
from tests.conftest import GraphRecorder
from tests.medusa.test_engine_speculative import TREES, OracleHeads, heads_for
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


def run_engine(e, prompts, params):
    """Each prompt's tokens and the drafts its steps accepted, through add/step."""
    out, accepted = {i: e.add(i, p, params).token_ids for i, p in enumerate(prompts)}, 0
    while e.running:
        for emitted in e.step():
            assert emitted.error is None, emitted.error
            out[emitted.request_id] += emitted.token_ids
            accepted += emitted.accepted
    return [out[i] for i in range(len(prompts))], accepted


@pytest.mark.parametrize("tree_name", ["mc_sim_7b_63+lookup", "dynamic:24,topk=3,lookup=4"])
def test_a_grammar_speculates_on_the_tokens_it_forces_with_plain_decodings_output(loaded, tree_name):
    """The schema forces its keys and punctuation: a step verifies them as its lookup chain, the row's
    other nodes never kept, and greedy output is plain decoding's under the same grammar."""
    params = SamplingParams(max_new_tokens=60, grammar=compile_grammar("json", SCHEMA))
    plain = engine(loaded).generate(PROMPTS, params)
    out, accepted = run_engine(engine(loaded, heads=heads_for(loaded.model), tree=TREES[tree_name]), PROMPTS,
                               params)
    assert out == plain
    assert accepted >= 5 * len(PROMPTS)  # '", "size": "' and the like, several tokens a step


def test_no_node_below_the_forced_tokens_is_kept(loaded):
    """Heads that guess the whole continuation right: below the forced tokens their nodes would be
    accepted under the mask of the last forced one, not their own; the node after the forced tokens is
    the next token instead, and the output is still plain decoding's."""
    # after the digit, the digits' mask (the last forced token's) would let a digit follow the digit
    params = SamplingParams(max_new_tokens=40, grammar=compile_grammar("regex", "[0-9]xq[0-9]zq[0-9]"))
    (plain,) = engine(loaded).generate([PROMPTS[1]], params)
    oracle = OracleHeads(loaded.model, PROMPTS[1], plain)
    tree = build_tree(get_tree("chain").choices, lookup=4)
    emitted = list(engine(loaded, heads=oracle, tree=tree).run([(0, PROMPTS[1], params)]))
    assert all(e.error is None for e in emitted), [e.error for e in emitted if e.error]
    assert [t for e in emitted for t in e.token_ids] == plain
    assert any(e.accepted > 0 for e in emitted)


@pytest.mark.parametrize("kind, value", [("regex", PATTERN), ("json", SCHEMA)])
def test_a_grammar_speculates_on_the_free_tokens_prompt_lookup_guesses(loaded, kind, value):
    """Between the tokens a grammar forces, the lookup chain goes on with the prompt-lookup guesses it
    allows (here a predicted output, OpenAI's `prediction`, that is plain decoding's answer): greedy
    output is still plain decoding's, and the free tokens are accepted too, several a step."""
    params = SamplingParams(max_new_tokens=60, grammar=compile_grammar(kind, value))
    plain = engine(loaded).generate(PROMPTS, params)
    tree = TREES["dynamic:24,topk=3,lookup=4"]
    for prompt, answer in zip(PROMPTS, plain, strict=True):
        drafting = engine(loaded, heads=heads_for(loaded.model), tree=tree)
        (out,), forced = run_engine(drafting, [prompt], params)
        assert out == answer
        predicted = dataclasses.replace(params, prediction=tuple(answer))
        (out,), accepted = run_engine(engine(loaded, heads=heads_for(loaded.model), tree=tree), [prompt],
                                      predicted)
        assert out == answer
        # all but the first token guessed, up to 4 a step: the forced ones and the free ones
        assert accepted > forced and accepted >= (len(answer) - 1) * 3 // 4, (accepted, forced, len(answer))
    # a wrong prediction changes nothing
    wrong = [dataclasses.replace(params, prediction=tuple(t + 1 for t in answer)) for answer in plain]
    assert engine(loaded, heads=heads_for(loaded.model), tree=tree).generate(PROMPTS, wrong) == plain


def test_a_draft_off_the_chain_is_kept_only_as_the_next_token(loaded):
    """Heads that guess the continuation right beside a lookup chain that guessed a digit wrong: the
    masks below the wrong digit are not those below the right one (x after 1, q after 2), so a step keeps
    the right digit as its next token and none of the heads' nodes below it; output is plain decoding's."""
    params = SamplingParams(max_new_tokens=20, grammar=compile_grammar("regex", "[0-9](1x|2q)[0-9]"))
    (plain,) = engine(loaded).generate([PROMPTS[1]], params)
    tokenizer = loaded.tokenizer
    one, two = tokenizer.convert_tokens_to_ids("1"), tokenizer.convert_tokens_to_ids("2")
    x, q = tokenizer.convert_tokens_to_ids("x"), tokenizer.convert_tokens_to_ids("q")
    assert plain[1:3] in ([one, x], [two, q])
    wrong = [plain[0], *([two, q] if plain[1] == one else [one, x]), *plain[3:]]
    oracle = OracleHeads(loaded.model, PROMPTS[1], plain)
    tree = build_tree(get_tree("chain").choices, lookup=4)
    out, accepted = run_engine(engine(loaded, heads=oracle, tree=tree), [PROMPTS[1]],
                               dataclasses.replace(params, prediction=tuple(wrong)))
    assert out == [plain]


@pytest.mark.parametrize("min_tokens", [2, 3, 4, 5])
def test_min_tokens_under_a_grammar_speculates_only_before_it(loaded, min_tokens):
    """After a digit the grammar forces 'xqz', then allows EOS (favoured here) or 'w'. EOS is banned
    before min_tokens alone: a forced chain verified while it is banned stops at min_tokens, as the
    mask after it must allow EOS from there (greedy speculation is then plain decoding's)."""
    eos = loaded.tokenizer.eos_token_id
    grammar = compile_grammar("regex", "[0-9]xqz(w[0-9]xqz)*")
    params = SamplingParams(max_new_tokens=30, grammar=grammar, min_tokens=min_tokens,
                            logit_bias=((eos, 8.0),))
    (plain,) = engine(loaded).generate([PROMPTS[1]], params)
    assert plain[-1] == eos and len(plain) >= min_tokens + 1
    oracle = OracleHeads(loaded.model, PROMPTS[1], plain)
    out = []
    for e in engine(loaded, heads=oracle, tree=build_tree(get_tree("chain").choices, lookup=4)).run(
            [(0, PROMPTS[1], params)]):
        assert e.error is None, e.error
        out += e.token_ids
    assert out == plain


def test_a_grammar_done_before_min_tokens_ends_the_text(loaded):
    """Where the grammar allows EOS alone, min_tokens does not ban it: nothing the grammar allows
    would be left (the step had then emitted tokens it refuses)."""
    params = SamplingParams(max_new_tokens=20, min_tokens=10, grammar=compile_grammar("regex", "[0-9]{2}"))
    for tokens in engine(loaded).generate(PROMPTS, params):
        assert re.fullmatch("[0-9]{2}", loaded.tokenizer.decode(tokens[:-1]))  # special tokens too
        assert tokens[-1] == loaded.tokenizer.eos_token_id


def test_a_grammars_row_leaves_speculating_rows_as_they_were(loaded):
    """A constrained row speculates only on what its grammar forces, inside a speculative batch; every
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


@pytest.mark.parametrize("vocab_size", [300, 320])
def test_a_grammars_row_steps_beside_free_rows_whatever_the_vocabulary(vocab_size):
    """A vocabulary of whole 32-bit words (SmolLM2's 49152 tokens; 320 here): llguidance's bitmask has
    a word more than the step's, and a grammar's row in a batch with a free one failed the whole step."""
    loaded = tiny_loaded(vocab_size=vocab_size)
    params = [SamplingParams(max_new_tokens=16), SamplingParams(max_new_tokens=16, grammar=compile_grammar(
        "regex", PATTERN))]
    for kw in ({}, {"heads": heads_for(loaded.model), "tree": get_tree("dynamic:8,topk=2,lookup=2")}):
        together = engine(loaded, **kw).generate(PROMPTS[:2], params)
        alone = [engine(loaded, **kw).generate([p], q)[0] for p, q in zip(PROMPTS[:2], params, strict=True)]
        assert together == alone
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


def test_a_checked_grammar_is_compiled_once_and_each_request_gets_its_own_matcher(loaded, monkeypatch):
    """`check` (the routes' worker thread) compiles; `constraint` (the engine's thread) copies the
    compiled matcher, each copy at the grammar's start whatever an earlier copy consumed."""
    grammars = engine(loaded).grammars
    grammar = compile_grammar("regex", "[0-9]xq[0-9]")
    grammars.check(grammar)

    def compile_again(*args, **kwargs):
        raise AssertionError("compiled again")

    monkeypatch.setattr(llguidance, "LLMatcher", compile_again)
    grammars.check(grammar)
    first = grammars.constraint(grammar)
    digit = loaded.tokenizer.convert_tokens_to_ids("1")
    first.consume([digit])
    second = grammars.constraint(grammar)
    assert unpack(second.allowed(), grammars.vocab_size)[digit]
    assert not unpack(first.allowed(), grammars.vocab_size)[digit]


def test_the_compiled_grammars_kept_are_the_last_ones_checked(loaded, monkeypatch):
    grammars = engine(loaded).grammars
    monkeypatch.setattr(grammars, "PREPARED", 2)
    for n in (1, 2, 1, 3):
        grammars.check(compile_grammar("regex", f"[0-9]{{{n}}}"))
    assert list(grammars._prepared) == [compile_grammar("regex", f"[0-9]{{{n}}}") for n in (1, 3)]


def tiny_engine_grammars():
    return engine(tiny_loaded()).grammars


def test_bitmasks_unpack_bit_t_of_word_t_over_32():
    mask = torch.tensor([[-1, 0, 5]], dtype=torch.int32)  # 5: bits 0 and 2
    allowed = unpack(mask, 70)
    assert allowed.shape == (1, 70)
    assert allowed[0].nonzero().flatten().tolist() == list(range(32)) + [64, 66]


def test_only_is_the_bitmask_of_one_token_its_word_s_sign_bit_too():
    for token in (0, 31, 32, 63, 299):  # bit 31 is int32's sign
        assert unpack(only(token, 300), 300).nonzero().flatten().tolist() == [token]


@pytest.mark.parametrize("guess", [None, 7])
def test_lossless_sampling_under_a_grammar_keeps_the_masked_distribution(loaded, guess):
    """A digit, two forced letters, a digit: the second digit is drawn in the step that verifies the
    letters (or is the accepted node below them, the lookup branch's spare holding the first digit; or,
    with a predicted output, its guess, a free token on the chain, accepted or not), and the pair must
    follow the model's distribution under the grammar's masks (chi-square)."""
    model, tokenizer, V = loaded.model, loaded.tokenizer, loaded.model.config.vocab_size
    grammar, prompt, temperature = compile_grammar("regex", "[0-9]xq[0-9]"), PROMPTS[1], 0.7
    digits = [tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
    x, q = tokenizer.convert_tokens_to_ids("x"), tokenizer.convert_tokens_to_ids("q")
    matcher = engine(loaded).grammars.constraint(grammar)
    assert unpack(matcher.allowed(), V).nonzero().flatten().tolist() == sorted(digits)
    matcher.consume([digits[0]])
    assert matcher.chain(4)[0] == [x, q]  # then the digits again

    seqs = torch.tensor([prompt + [a, x, q, b] for a in digits for b in digits])  # [100, S]
    with torch.no_grad():
        cache = model.new_cache(len(seqs), seqs.shape[1])
        logits = model.logits(model(seqs, torch.arange(seqs.shape[1]).expand_as(seqs), cache,
                                    torch.arange(len(seqs))))  # [100, S, V]
    n = len(prompt)
    logp = (logits[:, :, digits] / temperature).log_softmax(-1)  # the grammar allows digits alone there
    first, second = torch.arange(100) // 10, torch.arange(100) % 10
    expected = (logp[torch.arange(100), n - 1, first] + logp[torch.arange(100), n + 2, second]).exp()

    spec = Engine(model, tokenizer, loaded.eos_token_ids, max_batch_size=64, max_total_tokens=64,
                  heads=heads_for(model), tree=TREES["mc_sim_7b_63+lookup"])
    counts, seed = torch.zeros(100), 0
    for _ in range(40):
        out = {}
        for slot in range(64):
            params = SamplingParams(max_new_tokens=5, temperature=temperature, seed=seed, grammar=grammar,
                                    prediction=() if guess is None else (digits[3], x, q, digits[guess]))
            out[slot], seed = list(spec.add(slot, prompt, params).token_ids), seed + 1
        while spec.running:
            for e in spec.step():
                assert e.error is None, e.error
                out[e.request_id] += e.token_ids
        for tokens in out.values():
            assert tokens[1:3] == [x, q]
            counts[digits.index(tokens[0]) * 10 + digits.index(tokens[3])] += 1
    keep = expected * counts.sum() >= 5
    observed = torch.cat([counts[keep], counts[~keep].sum()[None]])
    exp = torch.cat([expected[keep], expected[~keep].sum()[None]]) * counts.sum()
    assert chisquare(observed.numpy(), exp.numpy()).pvalue > 1e-3


@pytest.mark.parametrize("tree_name", ["mc_sim_7b_63+lookup", "dynamic:24,topk=3,lookup=4"])
def test_a_grammars_step_compiles_as_one_graph_with_the_eager_outputs(loaded, tree_name):
    """Forced chains, per-node masks and the cap hold no host read: the step is still one graph."""
    params = [SamplingParams(max_new_tokens=30, grammar=compile_grammar("json", SCHEMA)),
              SamplingParams(max_new_tokens=30, temperature=0.8, seed=2,
                             grammar=compile_grammar("json", SCHEMA)),
              SamplingParams(max_new_tokens=30), SamplingParams(max_new_tokens=30, temperature=0.8, seed=3)]

    def run(compile: bool) -> list[list[int]]:
        e = engine(loaded, heads=heads_for(loaded.model), tree=TREES[tree_name], compile=compile)
        if compile:
            torch._dynamo.reset()
            e.device_step._fn = torch.compile(e.device_step._step, fullgraph=True, backend=recorder)
        return e.generate(PROMPTS, params)

    recorder = GraphRecorder()
    eager = run(False)
    assert run(True) == eager
    assert recorder.graphs, "the step did not go through torch.compile"


def test_a_chain_takes_forced_tokens_and_up_to_its_count_of_guesses_and_the_table_holds_few_masks(loaded):
    """After a digit: x and q are forced, a digit is a guess, z and q forced again, then the second
    guess is over the count: the chain stops. In a step's table the forced depths are one-hot (-1),
    built on the device, and only the guess's mask and the one after the chain are sent."""
    tokenizer, V = loaded.tokenizer, loaded.model.config.vocab_size
    x, q, z, seven = (tokenizer.convert_tokens_to_ids(t) for t in "xqz7")
    matcher = engine(loaded).grammars.constraint(compile_grammar("regex", "[0-9]xq[0-9]zq[0-9]"))
    matcher.consume([tokenizer.convert_tokens_to_ids("1")])
    tokens, masks = matcher.chain(8, lambda chain: seven, guesses=1)
    assert tokens == [x, q, seven, z, q]
    digits = unpack(masks[2], V).nonzero().flatten().tolist()
    assert len(digits) == 10 and seven in digits and torch.equal(masks[5], masks[2])
    assert [unpack(m, V).nonzero().flatten().tolist() for m in masks[[0, 1, 3, 4]]] == [[x], [q], [z], [q]]
    assert matcher.chain(8)[0] == [x, q]  # no guess: the chain ends at the digit; the state is as it was
    codes, explicit = chain_masks(masks, tokens, 8, V)
    assert codes.tolist() == [-1, -1, 0, -1, -1, 1, 1, 1, 1]
    assert explicit.shape[0] == CHAIN_MASKS and all(torch.equal(m, masks[2]) for m in explicit)


def test_a_step_of_grammar_rows_alone_verifies_their_chains_alone(loaded, monkeypatch):
    """Where every speculating row is a grammar's, the step's forward takes the root and the longest
    chain, not the whole tree (whose other nodes such rows cannot keep); beside a free speculating row,
    the whole tree. The tokens are those of the whole tree's steps."""
    tree = TREES["dynamic:24,topk=3,lookup=4"]
    params = SamplingParams(max_new_tokens=40, grammar=compile_grammar("json", SCHEMA))
    forward, widths, stepping = loaded.model.forward, [], []  # the tokens of each step's forward

    def counted(tokens, *args, **kwargs):
        if stepping:  # (not a prefill's)
            widths.append(tokens.shape[1])
        return forward(tokens, *args, **kwargs)

    def generate(params) -> list[list[int]]:
        e = engine(loaded, heads=heads_for(loaded.model), tree=tree)
        run = e.device_step.run
        e.device_step.run = lambda *a, **kw: (stepping.append(1), run(*a, **kw), stepping.clear())[1]
        return e.generate(PROMPTS[:2], params)

    monkeypatch.setattr(loaded.model, "forward", counted)
    out = generate(params)
    assert out == engine(loaded).generate(PROMPTS[:2], params)
    assert 1 < max(widths) <= 1 + tree.lookup, widths
    widths.clear()
    assert generate([params, SamplingParams(max_new_tokens=40)])[0] == out[0]
    assert tree.num_nodes in widths
