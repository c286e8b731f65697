"""Dynamic trees: each row's tree, grown on the device with fixed shapes, is the one the plain
best-first growth gives, and its buffers say what a static tree's would."""

import dataclasses

import pytest
import torch

from medusa.draft import draft_dynamic, eagle_grow, heads_grow
from medusa.dynamic import RowTrees, grow, reference_grow, rows_of, select, top_logp, verified_nodes
from medusa.eagle import EagleConfig, random_drafter, reference_logp
from medusa.heads import MedusaConfig, random_heads
from medusa.step import ROOT_ONLY, DeviceStep
from medusa.tree import DynamicTree, TreeError, get_tree
from runtime import cpu_kernels
from tests.conftest import ours_from_hf, tiny_hf_model


@pytest.fixture(scope="module")
def model():
    return ours_from_hf(tiny_hf_model("llama"))


def heads_logp_reference(heads, model, hidden_last, roots):
    """Per row, path -> the log-probabilities of head len(path), read the plain way."""
    def row(b):
        def logp_after(path):
            d = len(path)
            if not heads.config.path_input:
                return heads(hidden_last[b:b + 1], model.lm_head, num_heads=d + 1)[0, d].log_softmax(-1)
            embeds = model.embed(torch.tensor([[int(roots[b]), *path]]))  # [1, d + 1, C]
            state = heads.head_state(d, hidden_last[b:b + 1], embeds)
            return heads.project(state[:, None], model.lm_head)[0, 0].log_softmax(-1)
        return logp_after
    return [row(b) for b in range(hidden_last.shape[0])]


def drafters(model):
    c = model.config
    return {
        "eagle": random_drafter(EagleConfig.for_base(c, window=8, draft_vocab_size=40), seed=0),
        "heads": random_heads(MedusaConfig(hidden_size=c.hidden_size, vocab_size=c.vocab_size, num_heads=4),
                              seed=0),
        "path-heads": random_heads(MedusaConfig(hidden_size=c.hidden_size, vocab_size=c.vocab_size,
                                                num_heads=4, path_input=True, draft_vocab_size=40), seed=0),
    }


def chosen_paths(candidates, trees, b, nodes):
    """Row b's nodes 1 .. nodes - 1 as token paths below the root."""
    paths = []
    for node in range(1, nodes):
        chain = [n for n in trees.retrieve[b, node].tolist() if n >= 0]
        assert chain[0] == 0 and chain[-1] == node  # root .. node
        paths.append(tuple(candidates[b, chain[1:]].tolist()))
    return paths


@pytest.mark.parametrize("kind", ["eagle", "heads", "path-heads"])
@pytest.mark.parametrize("spec", ["dynamic:12,topk=3,depth=4", "dynamic:20,topk=4,depth=3,lookup=2"])
def test_grown_trees_equal_the_plain_best_first_growth(model, kind, spec):
    """Three rows, one with a window only partly filled: each grows its own tree. With a lookup branch,
    row 0 has a guess for each of its nodes, row 1 none, row 2 one: a row's guesses become a chain from
    the root, and its drafts fill every node its guesses leave."""
    drafter = drafters(model)[kind]
    tree = get_tree(spec)
    gen = torch.Generator().manual_seed(0)
    C, V, T, L = model.config.hidden_size, model.config.vocab_size, tree.num_nodes, tree.lookup
    W = 8 if kind == "eagle" else 1
    features = torch.randn(3, W, C, generator=gen)
    tokens = torch.randint(0, V, (3, W), generator=gen)
    lens, roots = torch.tensor([20, 3, 12]), torch.tensor([5, 9, 4])
    guesses = [list(range(30, 30 + L)), [], [31]] if L else [[], [], []]
    lookup = torch.tensor([g + [-1] * (L - len(g)) for g in guesses], dtype=torch.long).view(3, L)
    with torch.no_grad():
        candidates, trees = draft_dynamic(drafter, model, features, tokens, lens, roots, lookup, tree)
        if kind == "eagle":
            logp_after = reference_logp(drafter, model, features, tokens, lens, roots)
        else:
            logp_after = heads_logp_reference(drafter, model, features[:, -1], roots)
        assert candidates.shape == (3, T) and trees.mask.shape == (3, T, T)
        for b in range(3):
            drafted = T - len(guesses[b])  # the root and the drafted nodes, then the guesses
            expected = reference_grow(tree, logp_after[b], drafter.token_ids, count=drafted - 1)
            assert sorted(chosen_paths(candidates, trees, b, drafted)) == sorted(expected)
            assert trees.depths[b, 1:drafted].tolist() == sorted(len(p) for p in expected)
            chain = list(range(drafted, T))  # the lookup chain: root -> guess 1 -> guess 2 ..
            assert candidates[b, chain].tolist() == guesses[b]
            if chain:
                assert trees.parents[b, chain].tolist() == [0, *chain[:-1]]
                assert trees.child_table[b, 0, tree.topk] == chain[0]  # the root's child after its drafts
        first, second = (chosen_paths(candidates, trees, b, T - len(guesses[b])) for b in range(2))
        assert first != second  # each row its own tree


@pytest.mark.skipif(not cpu_kernels.built(), reason="no C++ compiler to build our CPU kernels")
@pytest.mark.parametrize("spec", ["dynamic:24,topk=4,depth=4,lookup=3", "dynamic:7,topk=2,depth=2,lookup=3"])
def test_tree_glue_in_one_call_matches_its_pytorch_lines(monkeypatch, spec):
    """On the CPU a dynamic tree's top-k log-probabilities and its choice of nodes are calls of our
    kernels; their PyTorch lines are the reference: the same tokens, trees and buffers, for rows with
    all, some and none of their lookup guesses (in the small tree, more nodes than drafts and guesses:
    unguessed lookup nodes hold the root), and log-probabilities within rounding."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 5, 1003, generator=gen) * 4  # 1003: a vocabulary that is not whole vectors
    logits[0, 0, 500:] = float("-inf")
    tree = get_tree(spec)
    B, V, L = 40, 300, tree.lookup
    levels = [torch.randn(B, tree.topk, V, generator=gen) * 3 for _ in range(tree.draft_depth)]
    roots = torch.randint(V, (B,), generator=gen)
    lookup = torch.randint(V, (B, L), generator=gen)
    lookup[torch.arange(L) >= torch.randint(L + 1, (B, 1), generator=gen)] = -1  # a prefix of guesses

    def run():
        tops = [top_logp(logits, k) for k in (1, 4, 16)]
        grown = grow(tree, levels[0][:, 0], lambda d, nodes, tokens, parents: levels[d], lambda i: i)
        return tops, grown, select(tree, roots, lookup, *grown)

    ours = run()
    with monkeypatch.context() as m:
        m.setattr(cpu_kernels, "built", lambda: False)
        reference = run()
    for (values, indices), (ref_values, ref_indices) in zip(ours[0], reference[0], strict=True):
        assert torch.equal(indices, ref_indices)
        torch.testing.assert_close(values, ref_values, rtol=0, atol=1e-5)
    for a, b in zip(ours[1], reference[1], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    (candidates, trees), (ref_candidates, ref_trees) = ours[2], reference[2]
    assert torch.equal(candidates, ref_candidates)
    for field in ("mask", "depths", "parents", "retrieve", "child_table"):
        assert torch.equal(getattr(trees, field), getattr(ref_trees, field)), field
    assert trees.depths.max() == tree.depth and set((lookup >= 0).sum(1).tolist()) == set(range(L + 1))
    with pytest.raises(RuntimeError, match="select_tree: tokens, parents, ranks"):
        cpu_kernels.select_tree(ours[1][0][:, :3], *ours[1][1:], roots, lookup, tree.num_nodes, tree.topk,
                                tree.depth)


@pytest.mark.skipif(not cpu_kernels.built(), reason="no C++ compiler to build our CPU kernels")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("int8", [False, True], ids=["own-dtype", "int8"])
def test_heads_grow_in_one_call_as_their_pytorch_lines(monkeypatch, dtype, int8):
    """On the CPU path-input heads grow a dynamic tree's candidates in one call of our kernel; their
    PyTorch lines (`grow` over `heads_logits`) are the reference: the same tokens, parents and ranks,
    and scores within rounding, for rows with their own roots and hidden states, heads of two blocks;
    with int8 weights (48 scored rows: the projection's too), both multiplying through them."""
    model = ours_from_hf(tiny_hf_model("llama")).to(dtype)
    c = model.config
    config = MedusaConfig(hidden_size=c.hidden_size, vocab_size=c.vocab_size, num_heads=4, num_layers=2,
                          path_input=True, draft_vocab_size=48)
    heads = random_heads(config, seed=1).to(dtype).prepare_for_serving(int8=int8)
    if heads.kernel_operands(model.lm_head) is None:  # a bf16 projection of fp32 heads: not ours to take
        assert dtype == torch.float32
        projection = heads._projection[1]
        projection.weight = torch.nn.Parameter(projection.weight.float(), requires_grad=False)
        projection.pack(1, 1)
    operands = heads.kernel_operands(model.lm_head)
    assert operands is not None
    assert [w.dtype == torch.int8 for w in (*operands[0], *operands[2], operands[4])] == [int8] * 13
    tree = get_tree("dynamic:20,topk=3,depth=4,lookup=2")
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(5, c.hidden_size, generator=gen).to(dtype)
    roots = torch.randint(c.vocab_size, (5,), generator=gen)
    with torch.no_grad():
        ours = heads_grow(heads, model, hidden, roots, tree)
        with monkeypatch.context() as m:
            m.setattr(heads, "kernel_operands", lambda lm_head: None)
            reference = heads_grow(heads, model, hidden, roots, tree)
    for name, a, b in zip(("tokens", "parents", "scores", "ranks"), ours, reference, strict=True):
        assert a.shape == b.shape == (5, tree.num_candidates), name
        if name == "scores":
            torch.testing.assert_close(a, b, rtol=0, atol=1e-4 if dtype == torch.float32 else 2e-2)
        else:
            assert torch.equal(a, b), name
    assert len(set(ours[0][:, 0].tolist())) > 1  # rows drafted apart


@pytest.mark.skipif(not cpu_kernels.built(), reason="no C++ compiler to build our CPU kernels")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("spec", ["dynamic:20,topk=3,depth=4,lookup=2", "dynamic:4,topk=4,depth=1"])
@pytest.mark.parametrize("int8", [False, True], ids=["own-dtype", "int8"])
def test_eagle_grow_in_one_call_as_its_pytorch_lines(monkeypatch, dtype, spec, int8):
    """On the CPU the draft layer grows a dynamic tree's candidates in one call of our kernel; its PyTorch
    lines (`grow` over `dynamic_logits`) are the reference: the same tokens, parents and ranks, and scores
    within rounding, for rows with their own windows (one only partly filled) and roots; with int8 weights
    (48 scored rows: the projection's too) both rounding them and the rows they multiply."""
    model = ours_from_hf(tiny_hf_model("llama")).to(dtype)
    c = model.config
    drafter = random_drafter(EagleConfig.for_base(c, window=8, draft_vocab_size=48), seed=3).to(dtype)
    drafter.prepare_for_serving(int8=int8)
    if drafter.kernel_operands(model.lm_head) is None:  # a bf16 projection of an fp32 layer: not ours to take
        assert dtype == torch.float32
        projection = drafter._projection[1]
        projection.weight = torch.nn.Parameter(projection.weight.float(), requires_grad=False)
        projection.pack(1, 1)
    assert drafter.kernel_operands(model.lm_head) is not None
    assert (drafter.kernel_operands(model.lm_head)[-2].dtype == torch.int8) == int8
    tree = get_tree(spec)
    gen = torch.Generator().manual_seed(4)
    features = torch.randn(4, 8, c.hidden_size, generator=gen).to(dtype)
    tokens = torch.randint(c.vocab_size, (4, 8), generator=gen)
    lens, roots = torch.tensor([20, 3, 12, 8]), torch.randint(c.vocab_size, (4,), generator=gen)
    with torch.no_grad():
        ours = eagle_grow(drafter, model, features, tokens, lens, roots, tree)
        with monkeypatch.context() as m:
            m.setattr(drafter, "kernel_operands", lambda lm_head: None)
            reference = eagle_grow(drafter, model, features, tokens, lens, roots, tree)
    for name, a, b in zip(("tokens", "parents", "scores", "ranks"), ours, reference, strict=True):
        assert a.shape == b.shape == (4, tree.num_candidates), name
        if name == "scores":
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        else:
            assert torch.equal(a, b), name
    assert len(set(ours[0][:, 0].tolist())) > 1  # rows drafted apart


def test_row_buffers_of_a_static_tree_equal_its_own():
    """rows_of, given a static tree's parents, depths and ranks, builds its mask, its paths and its
    children in rank order."""
    tree = get_tree("mc_sim_7b_63")
    rank = tree.rank_index.clamp(min=0)[None]
    rows = rows_of(tree.parents[None], tree.depths[None], rank, tree.topk_needed, tree.depth)
    assert torch.equal(rows.mask[0], tree.mask)
    for leaf_path in tree.retrieve.tolist():
        leaf = max(leaf_path)
        assert rows.retrieve[0, leaf].tolist() == leaf_path
    for node, children in enumerate(tree.children):
        table = rows.child_table[0, node]
        assert [c for c in table.tolist() if c >= 0] == list(children)
        assert all(table[int(tree.rank_index[c])] == c for c in children)  # each at its rank's column
    static = RowTrees.of(tree, 3)
    assert static.mask.shape == (3, tree.num_nodes, tree.num_nodes) and static.depth == tree.depth


@pytest.mark.parametrize("spec, message", [
    ("dynamic:", "write a dynamic tree as dynamic:N"),
    ("dynamic:16,width=3", "write a dynamic tree as dynamic:N"),
    ("dynamic:1", "budget must be >= 2"),
    ("dynamic:64,topk=2,depth=3", "raise topk or depth"),
    ("dynamic:250,lookup=16", "verifies 266 nodes per sequence, more than the 256"),
    ("dynamic:100000,topk=400,depth=6", "verifies 100000 nodes per sequence"),
    ("dynamic:16,min_p=1.5", "write a dynamic tree as dynamic:N"),
])
def test_bad_dynamic_trees_are_refused_with_a_reason(spec, message):
    with pytest.raises(TreeError, match=message):
        get_tree(spec)


def test_dynamic_tree_spec_reads_its_options():
    tree = get_tree("dynamic:24,topk=4,depth=5,lookup=3")
    assert tree == DynamicTree(24, topk=4, draft_depth=5, lookup=3, name="dynamic:24,topk=4,depth=5,lookup=3")
    assert tree.num_nodes == 27 and tree.depth == 5
    assert get_tree("dynamic:16").for_drafter(4).draft_depth == 4  # as deep as the heads go
    assert get_tree("dynamic:16").for_drafter(8).draft_depth == 6  # capped
    assert get_tree("dynamic:12,topk=4,lookup=4,min_p=0.08").min_p == 0.08
    with pytest.raises(TreeError, match="min_p must be a number in"):
        DynamicTree(8, min_p=1.0)


def test_min_p_verifies_the_sure_nodes_of_the_surest_row():
    """T = 1 + the most lookup guesses and drafts of probability >= min_p in any row, within [2, N + L];
    without min_p (or where the step is compiled), every node."""
    tree = DynamicTree(8, topk=4, draft_depth=2, lookup=4, min_p=0.1)
    p = torch.tensor([[0.5, 0.2, 0.09, 0.01, 0.3], [0.05, 0.01, 0.02, 0.03, 0.04]])
    scores = p.log()  # [B, M]: row 0 has three drafts of at least 0.1, row 1 none
    no_guess = torch.full((2, 4), -1)
    assert verified_nodes(tree, scores, no_guess) == 4
    assert verified_nodes(tree, scores, torch.tensor([[-1] * 4, [5, 6, -1, -1]])) == 4  # 1 + max(3, 2)
    assert verified_nodes(tree, scores, torch.tensor([[5, 6, 7, 8], [-1] * 4])) == 8  # 1 + 3 + 4 guesses
    assert verified_nodes(tree, scores.clamp(max=-5), no_guess) == 2  # nothing sure: one draft all the same
    assert verified_nodes(tree, torch.zeros(2, 20), torch.tensor([[5, 6, 7, 8]] * 2)) == 12  # at most N + L
    assert verified_nodes(dataclasses.replace(tree, min_p=0.0), scores, no_guess) == 12


def test_each_node_counts_its_own_rows_drafts_above_it_in_its_text(model):
    """The penalties' view of a node's text in a dynamic tree: its sequence's tokens, then the drafts
    on its own row's path down to it (the root, the pending token, is already counted); a draft that
    repeats a token on the path, or one the sequence generated, counts again."""
    step = DeviceStep(model, None, ROOT_ONLY, num_slots=2, max_len=16)
    V = model.config.vocab_size
    step.in_prompt[1, 3] = True
    step.counts[1, [4, 10]] = torch.tensor([2.0, 1.0])  # generated
    parents = torch.tensor([[-1, 0, 0, 1, 3, 2], [-1, 0, 1, 2, 0, 4]])
    depths = torch.tensor([[0, 1, 1, 2, 3, 2], [0, 1, 2, 3, 1, 2]])
    ranks = torch.tensor([[0, 0, 1, 0, 0, 0], [0, 0, 0, 0, 1, 0]])
    rows = rows_of(parents, depths, ranks, 2, 3)
    candidates = torch.tensor([[9, 10, 11, 10, 13, 14], [20, 21, 22, 21, 24, 25]])
    got = step._text_at_nodes(torch.tensor([1, 0]), candidates, rows)  # [2, 6, V] each
    assert got.counts[0, 4, 10] == 3  # generated once, then drafted at nodes 1 and 3 on its path
    for b, slot in enumerate([1, 0]):
        for node in range(6):
            expected, n = step.counts[slot, :V].clone(), node
            while n > 0:
                expected[candidates[b, n]] += 1
                n = int(parents[b, n])
            assert torch.equal(got.counts[b, node], expected), (b, node)
            assert torch.equal(got.seen[b, node], step.in_prompt[slot] | (expected > 0)), (b, node)
