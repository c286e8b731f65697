"""Acceptance rules: greedy against hand-made logits, typical against a hand-computed threshold,
lossless against the target distribution (chi-square) and against its one-sequence reference walk."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from scipy.stats import chisquare

from medusa.acceptance import Decision, accept_greedy, accept_lossless, accept_typical, lossless_walk
from medusa.dynamic import rows_of
from medusa.tree import TreeBuffers, build_tree, candidates_from_topk, get_tree
from runtime import cpu_kernels

# nodes: 0 root, 1 [0], 2 [1], 3 [0,0], 4 [0,1], 5 [1,0], 6 [0,0,0]   (see test_tree.py)
SMALL = build_tree([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]])


def typical(candidates: torch.Tensor, probs: torch.Tensor, tree: TreeBuffers, epsilon: float, delta: float,
            uniforms: torch.Tensor) -> Decision:
    """accept_typical with one epsilon and delta for every row."""
    B = candidates.shape[0]
    epsilons, deltas = torch.full((B,), epsilon), torch.full((B,), delta)
    return accept_typical(candidates, probs, tree, epsilons, deltas, uniforms)


def emitted_tokens(candidates: torch.Tensor, decision: Decision) -> list[list[int]]:
    """Per row: the accepted nodes' tokens, then the next token."""
    accepted_len, path, next_token = decision
    return [[int(candidates[b, n]) for n in path[b, 1:n_acc]] + [int(next_token[b])]
            for b, n_acc in enumerate(accepted_len.tolist())]


def test_greedy_three_sequences() -> None:
    #                 node: 0  1  2  3  4  5  6
    candidates = torch.tensor([
        [5, 1, 2, 3, 4, 5, 6],  # seq 0: target says 9 after the root; neither 1 nor 2 -> nothing
        [5, 1, 2, 3, 4, 5, 6],  # seq 1: 2 right (node 2), then 7 expected, node 5 has 5 -> stop
        [5, 1, 2, 3, 4, 5, 6],  # seq 2: 1 (node 1), 3 (node 3), 6 (node 6): the full depth-3 path
    ])
    best = [  # target argmax after each node
        [9, 0, 0, 0, 0, 0, 0],
        [2, 3, 7, 6, 0, 0, 0],  # node 3 and 6 are "right" below node 1, but node 1 is wrong
        [1, 3, 0, 6, 0, 0, 8],
    ]
    accepted_len, path, next_token = accept_greedy(candidates, torch.tensor(best), SMALL)
    assert accepted_len.tolist() == [1, 2, 4]
    assert path.tolist() == [[0, 0, 0, 0], [0, 2, 0, 0], [0, 1, 3, 6]]
    assert next_token.tolist() == [9, 7, 8]


def test_greedy_matches_a_per_node_reference() -> None:
    """Random small-vocabulary cases against a plain walk down the tree (first matching child)."""
    gen = torch.Generator().manual_seed(1)
    B, V, T = 64, 3, SMALL.num_nodes
    # siblings hold distinct tokens (ranks of one head's top-k), as in a real step
    topk = torch.stack([torch.randperm(V, generator=gen)[:2] for _ in range(B * 3)]).view(B, 3, 2)
    candidates = candidates_from_topk(torch.randint(V, (B,), generator=gen), topk, SMALL)
    logits = torch.randn(B, T, V, generator=gen)
    accepted_len, path, next_token = accept_greedy(candidates, logits.argmax(-1), SMALL)
    for b in range(B):
        node, walk = 0, [0]
        while True:
            want = int(logits[b, node].argmax())
            node = next((c for c in SMALL.children[node] if int(candidates[b, c]) == want), None)
            if node is None:
                break
            walk.append(node)
        assert int(accepted_len[b]) == len(walk)
        assert path[b, :len(walk)].tolist() == walk
        assert int(next_token[b]) == int(logits[b, walk[-1]].argmax())


# Typical acceptance, tree: 0 root, 1 [0], 2 [1], 3 [0,0], 4 [1,0]; V = 5.
#   p0 = [.1, .5, .3, .05, .05]: H = -(.1 ln .1 + .5 ln .5 + .3 ln .3 + 2 * .05 ln .05)
#        = .23026 + .34657 + .36119 + .29957 = 1.23759; exp(-H) = .29010
#   p1 = [.08, .08, .28, .28, .28]: H = 2 * .20206 + 3 * .35643 = 1.47341; exp(-H) = .22915
#   p2 = [.6, .1, .1, .1, .1]: H = .30650 + 4 * .23026 = 1.22753; exp(-H) = .29303
# eps = .09, delta = .3: thresholds min(.09, .3 exp(-H)) = root .08703, node1 .06875, node2 .08791
#   node 1 = token 1: p0 = .5 > .08703 yes;  node 2 = token 2: p0 = .3 > .08703 yes
#   node 3 = token 0: p1 = .08 > .06875 yes (the entropy term lowers the bar below eps)
#   node 4 = token 0: p2 = .6 yes, path score ln .3 + ln .6 = -1.715 > ln .5 + ln .08 = -3.219
#       -> both paths have length 3, [0, 2, 4] wins on log-probability
#   node 4 = token 1 instead: p2 = .1 > .08791 yes, score ln .3 + ln .1 = -3.507 < -3.219 -> [0, 1, 3]
# eps = .09, delta = .5: thresholds min(.09, .5 exp(-H)) = .09 everywhere (.145, .115, .147 are larger)
#   node 3 = token 0: .08 < .09 rejected; node 4 = token 1: .1 > .09 -> [0, 2, 4]
TYPICAL_TREE = build_tree([[0], [1], [0, 0], [1, 0]])
TYPICAL_PROBS = torch.tensor([
    [.1, .5, .3, .05, .05],
    [.08, .08, .28, .28, .28],
    [.6, .1, .1, .1, .1],
    [0, 0, 0, 0, 1.0],  # node 3: next token would be 4
    [0, 0, 0, 1.0, 0],  # node 4: next token would be 3
])


@pytest.mark.parametrize("node4_token, delta, path, next_token", [
    (0, 0.3, [0, 2, 4], 3),
    (1, 0.3, [0, 1, 3], 4),
    (1, 0.5, [0, 2, 4], 3),
])
def test_typical_hand_computed(node4_token: int, delta: float, path: list[int], next_token: int) -> None:
    candidates = torch.tensor([[4, 1, 2, 0, node4_token]])
    accepted_len, got_path, got_next = typical(candidates, TYPICAL_PROBS[None], TYPICAL_TREE, 0.09, delta,
                                               torch.rand(1, 5))
    assert got_path[0, :int(accepted_len[0])].tolist() == path
    assert got_next.tolist() == [next_token]


def test_typical_rejects_everything_below_threshold() -> None:
    candidates = torch.tensor([[4, 3, 4, 0, 0]])  # p0 = .05 for both children: below .08703
    accepted_len, _, _ = typical(candidates, TYPICAL_PROBS[None], TYPICAL_TREE, 0.09, 0.3, torch.rand(1, 5))
    assert accepted_len.tolist() == [1]


# Lossless: V = 5; nodes 0 root, 1 [0], 2 [1], 3 [0,0], 4 [0,1], 5 [1,0]
LOSSLESS_TREE = build_tree([[0], [1], [0, 0], [0, 1], [1, 0]])
LOSSLESS_CANDIDATES = torch.tensor([0, 2, 0, 1, 3, 4])
LOSSLESS_PROBS = torch.tensor([
    [.30, .10, .35, .15, .10],  # root: tries token 2 (node 1), then token 0 (node 2)
    [.20, .40, .10, .25, .05],  # node 1: tries token 1 (node 3), then token 3 (node 4)
    [.10, .20, .30, .10, .30],  # node 2: tries token 4 (node 5)
    [.20, .20, .20, .20, .20],
    [.50, .10, .10, .10, .20],
    [.05, .05, .40, .40, .10],
])


@pytest.fixture(params=["our kernel", "pytorch lines"])
def lossless_rule(request, monkeypatch):
    """Lossless acceptance through our CPU kernel (`runtime/sampling_ops.cpp`), or through the PyTorch
    lines a GPU and a compiled step run: each must keep the distribution and walk as the reference."""
    if request.param == "pytorch lines":
        monkeypatch.setattr(cpu_kernels, "built", lambda: False)
    elif not cpu_kernels.built():
        pytest.skip("no C++ compiler to build our CPU kernels")
    return request.param


def many(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The lossless case repeated n times, each row with its own uniforms."""
    T = LOSSLESS_TREE.num_nodes
    uniforms = torch.rand(n, T, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return LOSSLESS_CANDIDATES.expand(n, T), LOSSLESS_PROBS.expand(n, T, 5), uniforms


def test_lossless_keeps_the_target_distribution(lossless_rule) -> None:
    candidates, probs, uniforms = many(20000, 1234)
    first: Counter[int] = Counter()
    second: dict[int, Counter[int]] = {2: Counter(), 0: Counter()}  # first token -> second token counts
    for emitted in emitted_tokens(candidates, accept_lossless(candidates, probs, LOSSLESS_TREE, uniforms)):
        first[emitted[0]] += 1
        if len(emitted) > 1:
            second[emitted[0]][emitted[1]] += 1

    def p_value(counts: Counter[int], probs: torch.Tensor) -> float:
        observed = [counts[v] for v in range(5)]
        expected = (probs.double() / probs.double().sum() * sum(observed)).tolist()
        return float(chisquare(observed, expected).pvalue)

    # (a) the first emitted token is distributed as the target at the root
    assert p_value(first, LOSSLESS_PROBS[0]) > 1e-3
    # (b) given the first token is a node's candidate (2 -> node 1, 0 -> node 2), the second
    # emitted token is distributed as the target at that node
    assert sum(second[2].values()) == first[2] and sum(second[0].values()) == first[0]
    assert p_value(second[2], LOSSLESS_PROBS[1]) > 1e-3
    assert p_value(second[0], LOSSLESS_PROBS[2]) > 1e-3


def test_the_check_notices_a_lossy_rule() -> None:
    """The same chi-square check fails typical acceptance, which does not keep the distribution."""
    candidates, probs, uniforms = many(2000, 1234)
    observed = [0] * 5
    for emitted in emitted_tokens(candidates, typical(candidates, probs, LOSSLESS_TREE, 0.09, 0.3, uniforms)):
        observed[emitted[0]] += 1
    probs = LOSSLESS_PROBS[0].double()
    expected = (probs / probs.sum() * 2000).tolist()
    assert chisquare(observed, expected).pvalue < 1e-3


def test_lossless_accepts_certain_tokens_and_leaves_probs_alone(lossless_rule) -> None:
    V, T = 5, LOSSLESS_TREE.num_nodes
    probs = torch.zeros(1, T, V, dtype=torch.float64)
    # the target is certain of each candidate along 0 -> 1 -> 4, then of token 2
    probs[0, 0, 2] = probs[0, 1, 3] = probs[0, 4, 2] = 1.0
    probs[0, 2] = probs[0, 3] = probs[0, 5] = 0.2
    before = probs.clone()
    accepted_len, path, next_token = accept_lossless(LOSSLESS_CANDIDATES[None], probs, LOSSLESS_TREE,
                                                     torch.rand(1, T, dtype=torch.float64))
    assert path[0, :int(accepted_len[0])].tolist() == [0, 1, 4] and next_token.tolist() == [2]
    assert torch.equal(probs, before)


@pytest.mark.parametrize("tree", [LOSSLESS_TREE, SMALL, get_tree("mc_sim_7b_63"), get_tree("cpu")],
                         ids=["lossless", "small", "mc_sim_7b_63", "cpu"])
def test_lossless_batch_agrees_with_the_reference_walk(tree: TreeBuffers, lossless_rule) -> None:
    """Every row of the batched rule takes exactly the reference walk's path and token on the same
    uniforms (peaked targets over 4 tokens, so that walks go deep)."""
    gen = torch.Generator().manual_seed(7)
    B, T, V = 300, tree.num_nodes, 4
    candidates = torch.randint(V, (B, T), generator=gen)
    probs = (torch.randn(B, T, V, generator=gen) * 3).softmax(-1)
    uniforms = torch.rand(B, T, generator=gen, dtype=torch.float64)
    accepted_len, path, next_token = accept_lossless(candidates, probs, tree, uniforms)
    assert accepted_len.max() >= min(3, tree.depth + 1)  # deep walks were exercised
    for b in range(B):
        walk = lossless_walk(candidates[b], probs[b], tree, uniforms[b])
        assert path[b, :int(accepted_len[b])].tolist() == walk.path
        assert int(next_token[b]) == walk.next_token


def random_tree(num_nodes: int, gen: torch.Generator) -> TreeBuffers:
    """A random tree of num_nodes nodes, ranks < 4 with gaps (as a dynamic tree's, where a
    parent keeps some of its top-k children and not others)."""
    paths: list[tuple[int, ...]] = []
    while len(paths) < num_nodes - 1:
        parent = [()] + paths
        path = parent[int(torch.randint(len(parent), (1,), generator=gen))] + (
            int(torch.randint(4, (1,), generator=gen)),)
        if path not in paths and len(path) <= 4:
            paths.append(path)
    return build_tree(paths)


def test_per_row_trees_agree_with_each_rows_own_static_tree(lossless_rule) -> None:
    """Greedy and lossless on a batch where every row has its own tree (`RowTrees`, as a dynamic
    tree gives) decide each row as that row's tree alone does: lossless as the reference walk."""
    gen = torch.Generator().manual_seed(11)
    B, T, V = 200, 9, 4
    trees = [random_tree(T, gen) for _ in range(B)]
    rows = rows_of(torch.stack([t.parents for t in trees]), torch.stack([t.depths for t in trees]),
                   torch.stack([t.rank_index.clamp(min=0) for t in trees]), 4, max(t.depth for t in trees))
    # siblings hold distinct tokens, as one parent's top-k do: the rank shifted by a per-parent offset
    offset = torch.randint(V, (B, T), generator=gen)
    parents = rows.parents.clamp(min=0)
    candidates = (offset.gather(1, parents) + torch.stack([t.rank_index for t in trees])) % V
    probs = (torch.randn(B, T, V, generator=gen) * 3).softmax(-1)
    uniforms = torch.rand(B, T, generator=gen, dtype=torch.float64)
    accepted_len, path, next_token = accept_lossless(candidates, probs, rows, uniforms)
    greedy = accept_greedy(candidates, probs.argmax(-1), rows)
    assert accepted_len.max() >= 3 and greedy[0].max() >= 3  # deep walks were exercised
    for b, tree in enumerate(trees):
        walk = lossless_walk(candidates[b], probs[b], tree, uniforms[b])
        assert path[b, :int(accepted_len[b])].tolist() == walk.path
        assert int(next_token[b]) == walk.next_token
        alone = accept_greedy(candidates[b:b + 1], probs[b:b + 1].argmax(-1), tree)
        n = int(alone[0][0])
        assert int(greedy[0][b]) == n and greedy[1][b, :n].tolist() == alone[1][0, :n].tolist()
        assert int(greedy[2][b]) == int(alone[2][0])


@pytest.mark.skipif(not cpu_kernels.built(), reason="no C++ compiler to build our CPU kernels")
def test_greedy_in_one_call_decides_as_its_pytorch_lines(monkeypatch) -> None:
    """On the CPU greedy acceptance is one call of our kernel; its PyTorch lines are the reference:
    the same decisions for per-row trees and a shared static tree, ties between equal-length paths
    (siblings with one token, as a lookup guess beside a draft) going to the same path."""
    gen = torch.Generator().manual_seed(5)
    B, T, V = 300, 9, 3  # 3 tokens: siblings often share one, and many paths tie
    trees = [random_tree(T, gen) for _ in range(B)]
    rows = rows_of(torch.stack([t.parents for t in trees]), torch.stack([t.depths for t in trees]),
                   torch.stack([t.rank_index.clamp(min=0) for t in trees]), 4, max(t.depth for t in trees))
    static = get_tree("cpu")
    cases = [(rows, torch.randint(V, (B, T), generator=gen), torch.randint(V, (B, T), generator=gen)),
             (static, torch.randint(V, (B, static.num_nodes), generator=gen),
              torch.randint(V, (B, static.num_nodes), generator=gen))]
    for tree, candidates, best in cases:
        ours = accept_greedy(candidates, best, tree)
        with monkeypatch.context() as m:
            m.setattr(cpu_kernels, "built", lambda: False)
            reference = accept_greedy(candidates, best, tree)
        assert reference[0].max() >= 3  # deep paths were exercised
        for a, b in zip(ours, reference, strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b)
    with pytest.raises(RuntimeError, match="accept_greedy: candidates, best, parents"):
        cpu_kernels.accept_greedy(candidates, best[:, :2], rows.parents, rows.retrieve)
