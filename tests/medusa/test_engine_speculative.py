"""Medusa speculation through the engine: greedy output equals plain greedy output token for
token, and lossless sampling keeps the base model's distribution."""

import dataclasses
import itertools
import math

import pytest
import torch
from scipy.stats import chisquare

from medusa.draft import draft_heads
from medusa.eagle import EagleConfig, random_drafter
from medusa.engine import Engine
from medusa.heads import MedusaConfig, random_heads
from medusa.tree import TreeError, build_tree, get_tree
from runtime.config import ModelConfig, SamplingParams
from runtime.llama import Llama
from tests.conftest import Vocab, ours_from_hf, tiny_hf_model

PROMPTS = [[5, 6, 7], [11, 3, 9, 2, 40, 41, 42, 1, 17], [60], [8, 8, 8, 8, 8, 1]]



@pytest.fixture(scope="module")
def model():
    return ours_from_hf(tiny_hf_model("llama"))


def heads_for(model, seed=0, num_heads=4, **options):
    c = model.config
    return random_heads(MedusaConfig(hidden_size=c.hidden_size, vocab_size=c.vocab_size,
                                     num_heads=num_heads, **options), seed=seed)


def eagle_for(model, seed=0, window=8, draft_vocab_size=0):
    config = EagleConfig.for_base(model.config, window=window, draft_vocab_size=draft_vocab_size)
    return random_drafter(config, seed=seed)


DRAFTERS = {"medusa": heads_for,
            "path-input+draft-vocab": lambda model: heads_for(model, path_input=True, draft_vocab_size=40),
            "eagle": lambda model: eagle_for(model, draft_vocab_size=40)}


TREES = {"chain": get_tree("chain"), "cpu": get_tree("cpu"), "mc_sim_7b_63": get_tree("mc_sim_7b_63"),
         "mc_sim_7b_63+lookup": build_tree(get_tree("mc_sim_7b_63").choices, lookup=8),
         **{spec: get_tree(spec) for spec in ("dynamic:16", "dynamic:24,topk=3,lookup=4",
                                              "dynamic:24,topk=3,lookup=4,min_p=0.05")}}


@pytest.mark.parametrize("kind", DRAFTERS)
@pytest.mark.parametrize("tree_name", TREES)
@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_speculation_equals_plain_greedy(model, tree_name, batch, kind):
    params = SamplingParams(max_new_tokens=24)
    prompts = PROMPTS[:batch]
    plain = Engine(model, Vocab(), (), max_batch_size=4, max_total_tokens=64).generate(prompts, params)
    spec = Engine(model, Vocab(), (), max_batch_size=4, max_total_tokens=64,
                  heads=DRAFTERS[kind](model), tree=TREES[tree_name])
    assert spec.generate(prompts, params) == plain


PENALTIES = {"repetition": {"repetition_penalty": 0.5}, "frequency": {"frequency_penalty": -0.3},
             # a token there is favoured, less so each time: loops that end once their counts grow
             "both": {"frequency_penalty": 0.1, "presence_penalty": -0.3},
             "logit bias": {"logit_bias": ((7, 2.5), (11, -100.0))},
             # EOS is 60 here, which three texts reach by their fifth token: banned for 20 tokens, and
             # one text reaches it later
             "min_tokens": {"min_tokens": 20}}


@pytest.mark.parametrize("penalty", PENALTIES)
@pytest.mark.parametrize("tree_name", ["mc_sim_7b_63+lookup", "dynamic:24,topk=3,lookup=4"])
def test_greedy_speculation_with_a_penalty_equals_plain(model, tree_name, penalty):
    """Each node is penalised for the tokens of its own text: its sequence's and its ancestors' drafts
    (in a dynamic tree, its own row's ancestors), a draft repeated on the path counted each time. A
    penalty that favours tokens already there makes the text loop, and the lookup branch accepts long
    chains, whose nodes' targets then decide the output."""
    params = SamplingParams(max_new_tokens=40, **PENALTIES[penalty])
    eos = (60,) if penalty == "min_tokens" else ()
    plain = Engine(model, Vocab(), eos, max_batch_size=4, max_total_tokens=64).generate(PROMPTS, params)
    engine = Engine(model, Vocab(), eos, max_batch_size=4, max_total_tokens=64,
                    heads=DRAFTERS["eagle"](model), tree=TREES[tree_name])
    out, accepted = {i: engine.add(i, prompt, params).token_ids for i, prompt in enumerate(PROMPTS)}, 0
    while engine.running:
        for e in engine.step():
            out[e.request_id] += e.token_ids
            accepted += len(e.token_ids) - 1
    assert [out[i] for i in range(len(PROMPTS))] == plain
    assert accepted >= 30  # of 160 tokens (130 with min_tokens): deep nodes were accepted


@pytest.mark.parametrize("tree_name", ["mc_sim_7b_63+lookup", "dynamic:24,topk=3,lookup=4"])
def test_a_prediction_is_drafted_and_leaves_the_output_as_it_was(model, tree_name):
    """OpenAI's Predicted Outputs: a prediction that is the output (but for a few changed tokens) is
    mostly accepted through the lookup branch; any prediction leaves greedy output plain decoding's."""
    params = SamplingParams(max_new_tokens=40)
    plain = Engine(model, Vocab(), (), max_batch_size=4, max_total_tokens=64).generate(PROMPTS, params)

    def run(predictions):
        engine = Engine(model, Vocab(), (), max_batch_size=4, max_total_tokens=64, heads=heads_for(model),
                        tree=TREES[tree_name])
        out = {i: engine.add(i, p, dataclasses.replace(params, prediction=tuple(q))).token_ids
               for i, (p, q) in enumerate(zip(PROMPTS, predictions, strict=True))}
        steps = 0
        while engine.running:
            steps += 1
            for e in engine.step():
                out[e.request_id] += e.token_ids
        return [out[i] for i in range(len(PROMPTS))], steps

    edited = [o[:15] + [(o[15] + 1) % 97] + o[16:] for o in plain]  # one token changed in each
    got, steps = run(edited)
    assert got == plain and steps <= 12  # 39 tokens after the first, in at most 12 steps
    got, _ = run([[(t * 7 + 3) % 97 for t in o] for o in plain])  # a wrong prediction
    assert got == plain
    _, without = run([[] for _ in plain])
    assert without > 2 * steps


@pytest.mark.parametrize("tree_name", ["mc_sim_7b_63+lookup", "dynamic:24,topk=3,lookup=4"])
def test_greedy_speculation_stops_at_a_stop_token_as_plain(model, tree_name):
    """A stop token among a step's accepted drafts ends the text there, the drafts after it dropped."""
    free = Engine(model, Vocab(), (), max_batch_size=4, max_total_tokens=64).generate(
        PROMPTS, SamplingParams(max_new_tokens=30))
    params = SamplingParams(max_new_tokens=30, stop_token_ids=(free[0][10], free[1][12]))
    plain = Engine(model, Vocab(), (), max_batch_size=4, max_total_tokens=64).generate(PROMPTS, params)
    assert len(plain[0]) == 11 and plain != free
    speculative = Engine(model, Vocab(), (), max_batch_size=4, max_total_tokens=64,
                         heads=DRAFTERS["eagle"](model), tree=TREES[tree_name])
    assert speculative.generate(PROMPTS, params) == plain


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_never_emits_a_token_whose_logit_is_nan(penalty):
    """A token whose every logit is NaN (its lm_head row poisoned) is never emitted, by plain or
    speculative greedy decoding, which still agree, and every logprob stays finite: on the CPU a
    greedy batch leaves NaN in its logits (`sampling.process`) for our argmax to pass over."""
    model = ours_from_hf(tiny_hf_model("llama"))
    params = SamplingParams(max_new_tokens=24, repetition_penalty=penalty)
    clean = Engine(model, Vocab(), (), max_batch_size=4, max_total_tokens=64).generate(PROMPTS, params)
    poison = max(range(model.config.vocab_size), key=[t for out in clean for t in out].count)
    with torch.no_grad():
        model.lm_head.weight[poison] = float("nan")
    outputs = []
    for heads, tree in ((None, None), (heads_for(model), get_tree("mc_sim_7b_63")),
                        (eagle_for(model), get_tree("dynamic:16"))):
        engine = Engine(model, Vocab(), (), max_batch_size=4, max_total_tokens=64, heads=heads, tree=tree)
        out = {i: ([], []) for i in range(len(PROMPTS))}
        for e in engine.run(zip(range(len(PROMPTS)), PROMPTS, [params] * len(PROMPTS), strict=True)):
            out[e.request_id][0].extend(e.token_ids)
            out[e.request_id][1].extend(e.logprobs)
        outputs.append([out[i][0] for i in out])
        assert all(math.isfinite(lp) for _, logprobs in out.values() for lp in logprobs)
    assert outputs[0] != clean  # the poisoned token was in the output before
    assert all(poison not in tokens for tokens in outputs[0])
    assert outputs[1] == outputs[0] and outputs[2] == outputs[0]


def test_lookup_branch_accepts_repeats_with_the_same_output(model):
    """A tree of only a lookup branch: the tiny model's greedy output falls into loops, which
    prompt lookup guesses; the output must still be plain greedy decoding, token for token."""
    params = SamplingParams(max_new_tokens=40)
    plain = Engine(model, Vocab(), (), max_batch_size=4, max_total_tokens=64).generate(PROMPTS, params)
    engine = Engine(model, Vocab(), (), max_batch_size=4, max_total_tokens=64, heads=heads_for(model),
                    tree=build_tree([], lookup=5))
    out, accepted = {}, 0
    for i, prompt in enumerate(PROMPTS):
        out[i] = engine.add(i, prompt, params).token_ids
    while engine.running:
        for e in engine.step():
            out[e.request_id] += e.token_ids
            accepted += len(e.token_ids) - 1
    assert [out[i] for i in range(len(PROMPTS))] == plain
    assert accepted >= 40  # of 160 tokens: the branch really was used


class OracleHeads(torch.nn.Module):
    """Test double: heads whose top-1 guesses are the known greedy continuation. The position is
    found by matching the engine's hidden state against the hidden states of the full sequence."""

    def __init__(self, model, prompt, continuation, num_heads=4):
        super().__init__()
        self.seq = prompt + continuation
        cache = model.new_cache(1, len(self.seq))
        with torch.no_grad():
            self.hidden = model(torch.tensor([self.seq]), torch.arange(len(self.seq))[None], cache,
                                torch.tensor([0]))[0]  # [S, C]
        c = model.config
        self.config = MedusaConfig(hidden_size=c.hidden_size, vocab_size=c.vocab_size, num_heads=num_heads)

    def forward(self, hidden_last, lm_head, path_embeds=None, num_heads=None):
        B, K, V = hidden_last.shape[0], num_heads or self.config.num_heads, self.config.vocab_size
        last = torch.cdist(hidden_last, self.hidden).argmin(-1).tolist()  # [B] last cached position
        logits = torch.zeros(B, K, V)
        for b, j in enumerate(last):
            for k in range(K):
                if j + 2 + k < len(self.seq):
                    logits[b, k, self.seq[j + 2 + k]] = 1.0
        return logits

    def token_ids(self, indices):
        return indices


class WrongHeads(OracleHeads):
    """Test double: heads whose guesses are never the greedy continuation (each is one token id off)."""

    def forward(self, hidden_last, lm_head, path_embeds=None, num_heads=None):
        return super().forward(hidden_last, lm_head, path_embeds, num_heads).roll(1, dims=-1)


def emitted_by(engine, prompt, params):
    """Every Emitted of one request: its `add`, then one per step."""
    out = [engine.add("r", prompt, params)]
    while engine.running:
        out += engine.step()
    return out


def test_each_step_counts_exactly_the_drafts_it_emitted(model):
    """Drafts known right (every step accepts all 4 of a chain, then the length limit leaves room for
    2 of them) or known wrong (none accepted): each step's `accepted` is the number of drafts it
    emitted, and only steps that verified a tree report `speculated`."""
    greedy = SamplingParams(max_new_tokens=24)
    plain = Engine(model, Vocab(), (), max_total_tokens=64).generate([PROMPTS[1]], greedy)[0]
    params = SamplingParams(max_new_tokens=23)
    cases = [  # heads, request, per step: (tokens emitted, drafts among them), speculated
        (OracleHeads, params, [(5, 4)] * 4 + [(2, 2)], True),
        (WrongHeads, params, [(1, 0)] * 22, True),
        (OracleHeads, SamplingParams(max_new_tokens=23, speculate=False), [(1, 0)] * 22, False),
    ]
    for heads, request, counts, speculated in cases:
        engine = Engine(model, Vocab(), (), max_total_tokens=64, heads=heads(model, PROMPTS[1], plain),
                        tree=get_tree("chain"))
        first, *steps = emitted_by(engine, PROMPTS[1], request)
        assert first.token_ids + [t for e in steps for t in e.token_ids] == plain[:23]
        assert not first.speculated and first.accepted == 0
        assert [(len(e.token_ids), e.accepted) for e in steps] == counts
        assert [e.speculated for e in steps] == [speculated] * len(steps)


def test_drafts_cut_by_the_length_limit_are_not_counted_as_accepted(model):
    """Four right drafts with two tokens left to generate: the step emits two and counts two accepted,
    so a request never reports more accepted drafts than tokens it generated."""
    greedy = SamplingParams(max_new_tokens=24)
    plain = Engine(model, Vocab(), (), max_total_tokens=64).generate([PROMPTS[1]], greedy)[0]
    engine = Engine(model, Vocab(), (), max_total_tokens=64, heads=OracleHeads(model, PROMPTS[1], plain),
                    tree=get_tree("chain"))
    engine.add("r", PROMPTS[1], SamplingParams(max_new_tokens=3))
    (last,) = engine.step()
    assert last.token_ids == plain[1:3] and last.finish_reason == "length"
    assert last.speculated and last.accepted == 2


def test_accepted_runs_keep_the_cache_right_and_stop_exactly(model):
    """With always-right drafts every step accepts a whole chain: the output must still equal
    plain decoding (so the accepted KV entries were kept in place), and stops land exactly."""
    greedy = SamplingParams(max_new_tokens=24)
    plain = Engine(model, Vocab(), (), max_total_tokens=64).generate([PROMPTS[1]], greedy)[0]
    oracle = OracleHeads(model, PROMPTS[1], plain)
    engine = Engine(model, Vocab(), (), max_total_tokens=64, heads=oracle, tree=get_tree("chain"))
    first = engine.add("r", PROMPTS[1], SamplingParams(max_new_tokens=24))
    second = engine.step()[0]
    assert first.token_ids == plain[:1]
    assert second.token_ids == plain[1:6]  # 4 accepted drafts + the next token, in one step
    assert second.speculated and second.accepted == 4
    engine.cancel("r")
    for max_new in (24, 7):
        assert engine.generate([PROMPTS[1]], SamplingParams(max_new_tokens=max_new))[0] == plain[:max_new]
    stop = Vocab().decode(plain[5:7])
    stop_at = Vocab().decode(plain).find(stop) + len(stop)
    out = engine.generate([PROMPTS[1]], SamplingParams(max_new_tokens=24, stop=(stop,)))[0]
    assert out == plain[:stop_at]
    eos = plain[9]
    eos_engine = Engine(model, Vocab(), [eos], max_total_tokens=64, heads=oracle, tree=get_tree("chain"))
    assert eos_engine.generate([PROMPTS[1]], greedy)[0] == plain[:plain.index(eos) + 1]


def test_tree_deeper_than_heads_is_refused(model):
    with pytest.raises(TreeError, match="head"):
        Engine(model, Vocab(), (), max_total_tokens=64, heads=heads_for(model, num_heads=2),
               tree=get_tree("chain"))


def exact_pair_distribution(model, prompt, temperature, frequency_penalty=0.0, presence_penalty=0.0,
                            logit_bias=(), min_tokens=0, eos=0):
    """p(t2, t3 | prompt) for the 2nd and 3rd generated tokens, summing over the 1st, with OpenAI's
    frequency and presence penalties on the tokens generated before each, a logit bias, and token
    `eos` banned from the first min_tokens."""
    V = model.config.vocab_size
    seqs = torch.tensor([prompt + [a, b, c] for a, b, c in itertools.product(range(V), repeat=3)])
    cache = model.new_cache(len(seqs), len(prompt) + 3)
    with torch.no_grad():
        logits = model.logits(model(seqs, torch.arange(seqs.shape[1]).expand_as(seqs), cache,
                                    torch.arange(len(seqs))))
    n = len(prompt)
    generated = torch.nn.functional.one_hot(seqs, V).float()  # [N, S, V]
    generated[:, :n] = 0
    counts = generated.cumsum(1)  # [N, S, V]: each token's count in the generated text up to each position
    logits = logits - frequency_penalty * counts - presence_penalty * (counts > 0)
    for token, bias in logit_bias:
        logits[..., token] += bias
    logits[:, n - 1:n - 1 + min_tokens, eos] = -torch.inf  # the logits of generated tokens 0 .. min_tokens-1
    logp = (logits / temperature).log_softmax(-1)  # [N, S, V]
    a, b, c = seqs[:, n], seqs[:, n + 1], seqs[:, n + 2]
    idx = torch.arange(len(seqs))
    joint = logp[idx, n - 1, a] + logp[idx, n, b] + logp[idx, n + 1, c]
    return joint.exp().view(V, V, V).sum(0)  # [V, V] over (t2, t3)


@pytest.mark.parametrize("drafter, tree_name, penalties", [
    ("medusa", "static", {"logit_bias": ((2, 1.5), (4, -2.0))}), ("eagle", "static", {}),
    # each node's text counts the drafts above it
    ("eagle", "dynamic:6,topk=2,depth=3,lookup=2", {"frequency_penalty": 1.5, "presence_penalty": -0.5}),
    # token 0 is EOS, banned from the first min_tokens: with 3, drafts are kept under the ban; with 2,
    # the step after the first token keeps no draft, as the third token comes after min_tokens (banning
    # EOS there would take its EOS away), and only the root's next token is drawn in that step
    ("eagle", "static", {"min_tokens": 3}), ("eagle", "static", {"min_tokens": 2})])
def test_lossless_sampling_keeps_the_distribution(drafter, tree_name, penalties):
    """Tree speculative sampling draws from the model's processed distribution, checked by chi-square
    against the exact distribution of two tokens; `penalties`: what processes it."""
    torch.manual_seed(0)
    V = 6
    model = Llama(ModelConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=2,
                              num_kv_heads=1, head_dim=16)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # peaked enough that drafts are often accepted
    prompt, temperature = [1, 2, 3], 0.9
    expected = exact_pair_distribution(model, prompt, temperature, **penalties).flatten()
    if drafter == "eagle":  # a draft layer drafts as deep as the tree
        heads = eagle_for(model, seed=0, window=4)
    else:
        heads = random_heads(MedusaConfig(hidden_size=32, vocab_size=V, num_heads=2), seed=1)
    tree = build_tree([[0], [1], [0, 0], [0, 1], [1, 0]], lookup=2)  # lookup drafts are deterministic too
    if tree_name != "static":  # each sequence's tree shape follows the drafter's confidence
        tree = get_tree(tree_name)
    eos = (0,) if "min_tokens" in penalties else ()
    engine = Engine(model, Vocab(), eos, max_batch_size=64, max_total_tokens=16, heads=heads, tree=tree)
    counts = torch.zeros(V * V)
    accepted = 0
    seeds = iter(range(10**6))
    for _ in range(60):  # 60 batches of 64 sequences, each with its own seed
        rows = {}
        for slot in range(64):
            first = engine.add(slot, prompt, SamplingParams(max_new_tokens=3, temperature=temperature,
                                                            seed=next(seeds), **penalties))
            rows[slot] = list(first.token_ids)
        while engine.running:
            for e in engine.step():
                rows[e.request_id] += e.token_ids
                accepted += len(e.token_ids) - 1
        for tokens in rows.values():
            counts[tokens[1] * V + tokens[2]] += 1
    if penalties.get("min_tokens") != 2:  # (no draft within three tokens can be kept there)
        assert accepted > 500  # the tree path really was exercised
    keep = expected * counts.sum() >= 5
    observed = torch.cat([counts[keep], counts[~keep].sum()[None]])
    exp = torch.cat([expected[keep], expected[~keep].sum()[None]]) * counts.sum()
    assert chisquare(observed.numpy(), exp.numpy()).pvalue > 1e-3


def test_path_heads_draft_each_node_from_the_tokens_on_its_path(model):
    heads = heads_for(model, path_input=True, draft_vocab_size=40)
    tree = get_tree("mc_sim_7b_63")
    hidden = torch.randn(2, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    roots = torch.tensor([3, 7])
    with torch.no_grad():
        tokens = draft_heads(heads, model, hidden, roots, tree)  # [B, T]
        assert tokens[:, 0].tolist() == [3, 7]
        for b, i in itertools.product(range(2), range(1, tree.num_nodes)):
            path = tree.mask[tree.parents[i]].nonzero().flatten()  # root..parent
            k, rank = len(path) - 1, int(tree.rank_index[i])
            state = heads.head_state(k, hidden[b:b + 1], model.embed(tokens[b, path])[None])
            logits = heads.project(state[:, None], model.lm_head)[0, 0]  # [V']
            index = (heads.draft_vocab == tokens[b, i]).nonzero().item()
            assert logits[index] == logits.topk(rank + 1).values[rank]  # the rank-th guess (ties allowed)


def test_batches_over_the_speculative_limit_decode_plainly_with_the_same_output(model):
    params = SamplingParams(max_new_tokens=12)
    prompts = PROMPTS[:3]
    plain = Engine(model, Vocab(), (), max_batch_size=4, max_total_tokens=64).generate(prompts, params)
    engine = Engine(model, Vocab(), (), max_batch_size=4, max_total_tokens=64, heads=heads_for(model),
                    tree=get_tree("cpu"), max_speculative_batch=2)
    assert engine.generate(prompts, params) == plain
    for i, prompt in enumerate(prompts[:3]):
        engine.add(i, prompt, params)
    assert not any(e.speculated for e in engine.step())  # 3 running > 2: a plain step
    engine.cancel(2)
    assert all(e.speculated for e in engine.step())  # 2 running: speculation again
    engine.add(3, PROMPTS[3], SamplingParams(max_new_tokens=12, temperature=0.8, seed=1))
    # a sampled row keeps speculating over the limit (its seeded output must not depend on the load)
    assert all(e.speculated for e in engine.step())
