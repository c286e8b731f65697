"""Dynamic trees (EAGLE-2, Li et al. 2024): each step grows each sequence's own tree from the
drafter's confidence, instead of verifying one fixed shape.

A node's *score* is the drafter's cumulative log-probability of its path: the sum of the
log-probabilities of its token and its ancestors' (each under the drafter's distribution at its
parent). It estimates the log-probability that the whole path is accepted.

Growing (`grow`), with fixed shapes: level 1 is the root's top-k children; at each level
d = 2 .. D, the k best-scored nodes of level d - 1 are *expanded* -- the drafter reads them and
proposes each one's top-k children -- giving k * k candidates at level d. Of all
M = k + (D - 1) k^2 candidates, the best-scored become the tree (reranking, `select`). A child's
score is at most its parent's, and ties go to the shallower node, so the chosen set holds every
chosen node's parent: it is a tree.

A tree of T = N + L nodes may give up to L of them to a prompt-lookup chain from the root
(`medusa.lookup`), as static trees do; but a row's lookup takes only as many nodes as it has
guesses, and the drafter's candidates fill the rest. Lookup often finds nothing (no earlier
occurrence of the last token: 55% of the steps below), where a fixed branch wastes its nodes. On 40
Spec-Bench dev prompts, float32, the draft layer, dynamic:48,topk=16,depth=8,lookup=16: 3.115 tokens
per step against 3.061 with the fixed branch.

The tree's parameters are a `medusa.tree.DynamicTree` (`dynamic:N` where a tree name goes).
`RowTrees` is what verification and acceptance read: each sequence's tree as batched tensors.
A static tree (`medusa.tree.TreeBuffers`) gives the same fields shared by the batch, through
`RowTrees.of`.

Legend: B rows, N budget (root included), L lookup nodes, T = N + L tree nodes, k top-k per
expansion, D depth, M candidates, P = max depth + 1, V' scored vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from medusa.tree import DynamicTree, TreeBuffers
from runtime import cpu_kernels


@dataclass(frozen=True)
class RowTrees:
    """Each row's tree, as verification and acceptance read it. Ancestors have smaller indices."""

    mask: torch.Tensor  # [B, T, T] bool: node i sees node j (j is i or an ancestor of i)
    depths: torch.Tensor  # [B, T] long: 0 for the root
    parents: torch.Tensor  # [B, T] long: -1 for the root
    retrieve: torch.Tensor  # [B, R, P] long: root-to-node paths covering every leaf, -1 padded
    child_table: torch.Tensor  # [B, T, c] long: each node's children in rank order, -1 where none
    depth: int  # P - 1: the longest path

    @classmethod
    def of(cls, tree: TreeBuffers | RowTrees, batch: int) -> RowTrees:
        """A static tree's buffers shared by `batch` rows (views, no copies)."""
        if isinstance(tree, RowTrees):
            return tree

        def rows(t: torch.Tensor) -> torch.Tensor:
            return t.expand(batch, *t.shape)
        return cls(rows(tree.mask), rows(tree.depths), rows(tree.parents), rows(tree.retrieve),
                   rows(tree.child_table), tree.depth)


Expand = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def top_logp(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest log-probabilities of softmax(logits) over the last dim and their indices, [..., k]
    each, best first: on the CPU one call of our kernel (`runtime/tree_ops.cpp`), which does not
    write the V' log-probabilities."""
    if cpu_kernels.eager_cpu(logits):
        return cpu_kernels.top_logp(logits, k)
    return logits.log_softmax(-1).topk(k, dim=-1)


def grow(tree: DynamicTree, root_logits: torch.Tensor, expand: Expand, token_ids: Callable
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The M candidates of every row: (tokens, parent candidate (-1: the root), score, rank among
    the parent's top-k), each [B, M], in level order.

    root_logits: [B, V'] the drafter's float32 logits for the root's children; expand(d, nodes,
    tokens, parents): the logits [B, k, V'] for the children of `nodes` ([B, k] candidate indices,
    all at depth d), given every candidate so far (tokens, parents [B, M_d]); token_ids maps
    scored-vocabulary indices to token ids.
    """
    k = tree.topk
    B, device = root_logits.shape[0], root_logits.device
    score, index = top_logp(root_logits, k)  # [B, k]
    tokens, scores = token_ids(index), score
    parents = torch.full((B, k), -1, dtype=torch.long, device=device)
    ranks = torch.arange(k, device=device).expand(B, k)
    level_start = 0  # the first candidate of the deepest level so far
    for d in range(1, tree.draft_depth):
        best, at = scores[:, level_start:].topk(k, dim=-1)  # [B, k]: the level's nodes to expand
        nodes = level_start + at
        child_score, child_index = top_logp(expand(d, nodes, tokens, parents), k)  # [B, k, k]
        level_start = tokens.shape[1]
        tokens = torch.cat([tokens, token_ids(child_index).flatten(1)], dim=1)
        scores = torch.cat([scores, (best[..., None] + child_score).flatten(1)], dim=1)
        parents = torch.cat([parents, nodes.repeat_interleave(k, dim=1)], dim=1)
        ranks = torch.cat([ranks, torch.arange(k, device=device).repeat(k).expand(B, k * k)], dim=1)
    return tokens, parents, scores, ranks


def candidate_depths(tree: DynamicTree, device: torch.device | str) -> torch.Tensor:
    """[M] long: each candidate's depth (level order: k at depth 1, then k^2 per level)."""
    counts = torch.tensor([tree.topk] + [tree.topk ** 2] * (tree.draft_depth - 1), device=device)
    return torch.arange(1, tree.draft_depth + 1, device=device).repeat_interleave(counts)


def verified_nodes(tree: DynamicTree, scores: torch.Tensor, lookup: torch.Tensor) -> int:
    """T, the nodes this step verifies per row: the tree's N + L, or with `min_p` (eager CPU steps) the
    root, the lookup guesses and the drafted candidates of path probability >= min_p of the row that has
    the most, at least 2 (rows with fewer take their next-best candidates: verified, rarely kept).

    Why: a verified row costs about the same whatever its chance (~0.17 ms of a ~15 ms step, SmolLM2
    bf16, Intel Xeon AMX), and the drafter's confidence varies from step to step: on 20 dev prompts (the
    heads' candidates of a 20-node tree, recorded), keeping the nodes of probability >= 0.08, at most 11,
    accepted 2.376 tokens a step with 8.1 nodes on average against 2.323 with the 7 best (8 nodes) every
    step."""
    T = tree.num_nodes
    if not tree.min_p or not cpu_kernels.eager_cpu(scores):
        return T
    sure = (lookup >= 0).sum(1) + (scores >= math.log(tree.min_p)).sum(1)  # [B]
    return max(2, min(T, 1 + int(sure.max())))


def select(tree: DynamicTree, roots: torch.Tensor, lookup: torch.Tensor, tokens: torch.Tensor,
           parents: torch.Tensor, scores: torch.Tensor, ranks: torch.Tensor) -> tuple[torch.Tensor, RowTrees]:
    """Each row's T - 1 nodes below the root (`verified_nodes`): its prompt-lookup guesses as a chain from
    the root, then the best-scored drafted candidates (`grow`) in the nodes its guesses leave. ([B, T]
    node tokens, and the rows' trees.)

    lookup: [B, L] a row's guesses, -1 past the last (a row with no guess gives all its nodes to the
    drafter). Node order is candidate order, drafted ones first, so parents come before their children.
    """
    (B, M), L, k, T = tokens.shape, tree.lookup, tree.topk, verified_nodes(tree, scores, lookup)
    if cpu_kernels.eager_cpu(tokens):  # the lines below and rows_of in one call (runtime/tree_ops.cpp)
        candidates, depths, parents, mask, retrieve, child_table = cpu_kernels.select_tree(
            tokens, parents, scores, ranks, roots, lookup, T, k, tree.depth)
        return candidates, RowTrees(mask, depths, parents, retrieve, child_table, tree.depth)
    device = tokens.device
    j = torch.arange(1, L + 1, device=device)  # a lookup node's depth
    guessed = lookup >= 0  # [B, L]
    # a child's score is at most its parent's; the depth term breaks ties toward the parent (the clamp
    # keeps it from vanishing beside -inf). Drafts key <= 0; a guessed lookup node goes before every draft,
    # one without a guess after every draft (it holds the root: a valid, wasted draft), each in chain order.
    depth = torch.cat([candidate_depths(tree, device), j])  # [M + L]
    key = torch.cat([scores.double().clamp(min=-1e9), torch.where(guessed, 1.0, -1e12 * j.double())],
                    dim=1) - 1e-6 * depth  # [B, M + L]
    tokens = torch.cat([tokens, torch.where(guessed, lookup, roots[:, None])], dim=1)
    chain = torch.where(j > 1, M + j - 2, -1)  # [L]: each lookup node's parent candidate
    parents = torch.cat([parents, chain.expand(B, L)], dim=1)
    ranks = torch.cat([ranks, torch.where(j > 1, 0, k).expand(B, L)], dim=1)  # the root's lookup child last
    chosen = key.topk(T - 1, dim=-1).indices.sort(dim=-1).values  # [B, T - 1] candidate indices
    node_of = torch.zeros(B, M + L, dtype=torch.long, device=device).scatter(
        1, chosen, torch.arange(1, T, device=device).expand(B, T - 1))  # [B, M + L]: node index, if chosen
    parent = parents.gather(1, chosen)  # [B, T - 1]
    parent = torch.where(parent < 0, 0, node_of.gather(1, parent.clamp(min=0)))
    root = torch.full((B, 1), -1, dtype=torch.long, device=device)
    node_parents = torch.cat([root, parent], dim=1)  # [B, T]
    depths = torch.cat([root + 1, depth[chosen]], dim=1)
    node_ranks = torch.cat([root, ranks.gather(1, chosen)], dim=1)
    candidates = torch.cat([roots[:, None], tokens.gather(1, chosen)], dim=1)
    return candidates, rows_of(node_parents, depths, node_ranks, k + (L > 0), tree.depth)


def rows_of(parents: torch.Tensor, depths: torch.Tensor, ranks: torch.Tensor, width: int,
            depth: int) -> RowTrees:
    """Each row's tree from its nodes' parents, depths and ranks among their siblings ([B, T]
    each, parents before children; `width` > every rank), on the device with fixed shapes."""
    B, T = parents.shape
    device = parents.device
    eye = torch.eye(T, dtype=torch.bool, device=device).expand(B, T, T)
    mask = eye
    to_parent = parents.clamp(min=0)[..., None].expand(B, T, T)
    for _ in range(depth):  # after d rounds each node sees its ancestors up to d levels up
        mask = eye | mask.gather(1, to_parent)
    P = depth + 1
    # row i of retrieve: node j at column depth j for every ancestor j of i (the others to a spare column)
    column = torch.where(mask, depths[:, None, :], P)  # [B, T, T]
    retrieve = torch.full((B, T, P + 1), -1, dtype=torch.long, device=device).scatter(
        2, column, torch.arange(T, device=device).expand(B, T, T))[..., :P]  # [B, T, P]
    slot = torch.where(parents >= 0, parents * width + ranks, T * width)  # [B, T]: the root to a spare slot
    child_table = torch.full((B, T * width + 1), -1, dtype=torch.long, device=device).scatter(
        1, slot, torch.arange(T, device=device).expand(B, T))[:, :-1].view(B, T, width)
    return RowTrees(mask, depths, parents, retrieve, child_table, depth)


def reference_grow(tree: DynamicTree, logp_after: Callable[[list[int]], torch.Tensor],
                   token_ids: Callable, count: int | None = None) -> list[tuple[int, ...]]:
    """`grow` and `select` for one sequence, the plain way: the `count` (default N - 1) chosen
    drafted nodes, each as its path (the tokens below the root), best first. logp_after(path) -> the
    drafter's log-probabilities [V'] of the children of the node at `path`."""
    def children(path: tuple[int, ...], score: float) -> list[tuple[tuple[int, ...], float]]:
        top = logp_after(list(path)).topk(tree.topk)
        return [(path + (int(token_ids(i)),), score + float(v)) for v, i in zip(top.values, top.indices,
                                                                             strict=True)]
    level = children((), 0.0)
    candidates = list(level)
    for _ in range(1, tree.draft_depth):
        expanded = sorted(level, key=lambda c: -c[1])[:tree.topk]
        level = [child for path, score in expanded for child in children(path, score)]
        candidates += level
    ranked = sorted(candidates, key=lambda c: (-c[1], len(c[0])))  # ties: the shallower first
    return [path for path, _ in ranked[:tree.budget - 1 if count is None else count]]
