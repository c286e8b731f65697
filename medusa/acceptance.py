"""Which of the speculated tree nodes to keep, and the token that follows them.

Terms (as in the speculative-decoding papers):
- target: the base model's next-token distribution at a tree node, computed by one verification
  forward over the whole tree (`target_logits` / `target_probs`, already processed by the caller's
  temperature / top-k / top-p);
- draft: the Medusa heads' guesses, the candidate token placed at each tree node. They are
  deterministic (top-k ranks), i.e. a one-hot draft distribution q.
- accepted path: root (the token already emitted) followed by the accepted nodes, each the child
  of the previous one; the step emits their tokens and then `next_token`.

Three rules:
- greedy (`accept_greedy`): a node is correct when its token is the target's argmax at its parent;
  keep the longest chain of correct nodes. The output equals plain greedy decoding exactly.
- typical (Medusa, Cai et al. 2024): a node is accepted when p_parent(x) > min(epsilon,
  delta * exp(-H(p_parent))); keep the longest accepted chain (ties: highest total log-probability).
  Faster, but it does not keep the target distribution.
- lossless (`accept_lossless`; SpecInfer, Miao et al. 2023; EAGLE, Li et al. 2024): multi-draft
  speculative sampling down the tree. With one-hot drafts, child x is accepted with probability
  p(x); on rejection p(x) := 0 and p is renormalised before the next sibling; when no child is
  accepted the next token is drawn from what is left. Emitted tokens follow the target exactly.

All three decide a whole batch in tensor operations, without a host synchronisation (what a
compiled step needs); randomness comes in as uniforms the caller draws (`runtime.sampling.draw`):
uniforms[b, i] decides node i's test when the walk reaches it (each node is tested at most once a
step), uniforms[b, 0] draws the next token. `lossless_walk` is the readable one-sequence reference
of the batched lossless rule, which must agree with it exactly on the same uniforms.

Each rule takes a static tree (`TreeBuffers`, shared by the batch) or each row's own (`RowTrees`,
a dynamic tree) and reads it as `RowTrees`.

Legend: B batch, T tree nodes (root included), V vocabulary, R root-to-node paths, P = depth + 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from medusa.dynamic import RowTrees
from medusa.tree import TreeBuffers
from runtime import cpu_kernels
from runtime.sampling import draw

# accepted_len [B] (root included, >= 1), path [B, depth + 1] (accepted node indices, 0 after
# them), next_token [B]
Decision = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
Tree = TreeBuffers | RowTrees


def _path_to(retrieve: torch.Tensor, row: torch.Tensor, accepted_len: torch.Tensor) -> torch.Tensor:
    """[B, P]: the first accepted_len[b] nodes of path row[b] of retrieve [B, R, P], 0 after them."""
    B, _, P = retrieve.shape
    step = torch.arange(P, device=retrieve.device)  # [P]
    chosen = retrieve.gather(1, row.view(B, 1, 1).expand(B, 1, P))[:, 0]  # [B, P]
    return torch.where(step < accepted_len[:, None], chosen, 0)


def _along_paths(values: torch.Tensor, retrieve: torch.Tensor) -> torch.Tensor:
    """values [B, T] read along each path of retrieve [B, R, P] -> [B, R, P] (padding reads node 0)."""
    B, R, P = retrieve.shape
    return values.gather(1, retrieve.clamp(min=0).reshape(B, R * P)).view(B, R, P)


def accept_greedy(candidates: torch.Tensor, best: torch.Tensor, tree: Tree) -> Decision:
    """Greedy verification: keep the longest chain of nodes that are the target's argmax at their
    parent. candidates: [B, T] long, the node tokens; best: [B, T] long, the target's argmax after
    each node (`runtime.sampling.argmax_logsumexp`). The next token is the target's argmax at the last
    accepted node.
    """
    B, T = candidates.shape
    assert best.shape == (B, T), (tuple(candidates.shape), tuple(best.shape))
    tree = RowTrees.of(tree, B)
    if cpu_kernels.eager_cpu(candidates):
        # the lines below in one call of our kernel (runtime/layer_ops.cpp, where its measurement is)
        return cpu_kernels.accept_greedy(candidates, best, tree.parents, tree.retrieve)
    parent_best = best.gather(1, tree.parents.clamp(min=0))  # [B, T] (root: its own, unused)
    correct = candidates == parent_best  # [B, T]
    correct[:, 0] = True  # the root was emitted already
    retrieve = tree.retrieve  # [B, R, P], -1 padded
    on_path = _along_paths(correct, retrieve) & (retrieve >= 0)  # [B, R, P]
    chain_len = on_path.long().cumprod(dim=-1).sum(dim=-1)  # [B, R]: correct prefix of each path
    accepted_len, leaf_row = chain_len.max(dim=-1)  # [B], [B]
    path = _path_to(retrieve, leaf_row, accepted_len)
    last = path.gather(1, (accepted_len - 1)[:, None])  # [B, 1]
    return accepted_len, path, best.gather(1, last)[:, 0]


def accept_typical(candidates: torch.Tensor, target_probs: torch.Tensor, tree: Tree,
                   epsilon: torch.Tensor, delta: torch.Tensor, uniforms: torch.Tensor) -> Decision:
    """Medusa typical acceptance. candidates: [B, T] long; target_probs: [B, T, V] (rows sum to 1);
    epsilon, delta: [B]; uniforms: [B, T] (column 0 draws the next token from the target at the last
    accepted node)."""
    B, T, V = target_probs.shape
    assert candidates.shape == (B, T)
    tree = RowTrees.of(tree, B)
    probs = target_probs.double()
    entropy = -torch.xlogy(probs, probs).sum(dim=-1)  # [B, T]: H of the target at each node
    threshold = torch.minimum(delta[:, None].double() * torch.exp(-entropy), epsilon[:, None].double())
    parents = tree.parents[:, 1:]  # [B, T-1]
    p_token = probs.new_ones(B, T)  # [B, T]: target probability of each node's token at its parent
    p_token[:, 1:] = probs.view(B, T * V).gather(1, parents * V + candidates[:, 1:])  # (root: certain)
    ok = torch.ones(B, T, dtype=torch.bool, device=candidates.device)  # [B, T]
    ok[:, 1:] = p_token[:, 1:] > threshold.gather(1, parents)
    log_p = torch.log(p_token)  # [B, T]

    retrieve = tree.retrieve  # [B, R, P]
    prefix = (_along_paths(ok, retrieve) & (retrieve >= 0)).long().cumprod(dim=-1).bool()  # [B, R, P]
    length = prefix.sum(dim=-1)  # [B, R]
    score = torch.where(prefix, _along_paths(log_p, retrieve), 0.0).sum(dim=-1)  # [B, R]
    # longest first, then the most likely
    best_score = torch.where(length == length.max(dim=-1, keepdim=True).values, score, -torch.inf)
    row = best_score.argmax(dim=-1)  # [B]
    accepted_len = length.gather(1, row[:, None])[:, 0]
    path = _path_to(retrieve, row, accepted_len)
    last = path.gather(1, (accepted_len - 1)[:, None])  # [B, 1]
    last_probs = target_probs.gather(1, last[..., None].expand(B, 1, V))[:, 0]  # [B, V]
    return accepted_len, path, draw(last_probs, uniforms[:, 0])


def accept_lossless(candidates: torch.Tensor, target_probs: torch.Tensor, tree: Tree,
                    uniforms: torch.Tensor) -> Decision:
    """Tree speculative sampling with deterministic drafts. candidates: [B, T] long; target_probs:
    [B, T, V]; uniforms: [B, T]. The emitted tokens (accepted nodes' tokens, then next_token) are
    distributed exactly as sampling from the target one token at a time.

    The walk of `lossless_walk`, for every row at once: one round per depth, and in it one turn per
    child rank, each row testing its current node's child of that rank until one is accepted.
    """
    B, T, V = target_probs.shape
    assert candidates.shape == (B, T)
    tree = RowTrees.of(tree, B)
    if cpu_kernels.eager_cpu(candidates):  # one call of our kernel (runtime/sampling_ops.cpp)
        return cpu_kernels.accept_lossless(candidates, target_probs.float(), tree.child_table,
                                           uniforms.double(), tree.depth)
    device = candidates.device
    residual = target_probs[:, 0].double()  # [B, V], unnormalised: rejections zero it
    node = torch.zeros(B, dtype=torch.long, device=device)  # [B]: the last accepted node
    walking = torch.ones(B, dtype=torch.bool, device=device)  # [B]: no level rejected every child yet
    path = torch.zeros(B, tree.depth + 1, dtype=torch.long, device=device)
    width = tree.child_table.shape[2]
    for depth in range(1, tree.depth + 1):
        chosen = torch.full_like(node, -1)  # [B]: the child accepted at this depth, -1 while none
        children = tree.child_table.gather(1, node.view(B, 1, 1).expand(B, 1, width))[:, 0]  # [B, c]
        for rank in range(children.shape[1]):
            child = children[:, rank]  # [B], -1 where the node has no child of this rank
            testing = walking & (chosen < 0) & (child >= 0)
            child = child.clamp(min=0)
            x = candidates.gather(1, child[:, None])  # [B, 1]
            p_x = residual.gather(1, x)[:, 0]  # [B]
            # accept with probability residual(x) / sum(residual): the renormalised residual
            accept = testing & (uniforms.gather(1, child[:, None])[:, 0].double() * residual.sum(-1) < p_x)
            chosen = torch.where(accept, child, chosen)
            residual = residual.scatter(1, x, torch.where(testing & ~accept, 0.0, p_x)[:, None])
        walking = walking & (chosen >= 0)
        node = torch.where(walking, chosen, node)
        path[:, depth] = torch.where(walking, node, 0)
        child_probs = target_probs.gather(1, node[:, None, None].expand(B, 1, V))[:, 0].double()
        residual = torch.where(walking[:, None], child_probs, residual)
    accepted_len = 1 + (path[:, 1:] > 0).sum(dim=-1)  # node 0 is only ever the root
    return accepted_len, path, draw(residual, uniforms[:, 0])


@dataclass(frozen=True)
class Accepted:
    path: list[int]  # accepted node indices from the root (path[0] == 0), len >= 1
    next_token: int  # the token after the last accepted node


def lossless_walk(candidates: torch.Tensor, target_probs: torch.Tensor, tree: TreeBuffers,
                  uniforms: torch.Tensor) -> Accepted:
    """The reference for `accept_lossless`, one sequence: candidates [T], target_probs [T, V],
    uniforms [T]. From the root, try the children in rank order: child x is accepted with
    probability residual(x) / sum(residual); a rejected child's token leaves the residual
    (residual(x) := 0). An accepted child becomes the node whose children are tried next, with the
    target at it as the residual; when every child is rejected (or at a leaf), the next token is
    drawn from the residual."""
    node, path = 0, [0]
    residual = target_probs[0].double().clone()  # [V]
    while True:
        for child in tree.children[node]:
            x = int(candidates[child])
            if float(uniforms[child]) * float(residual.sum()) < float(residual[x]):
                node = child
                path.append(child)
                residual = target_probs[child].double().clone()
                break
            residual[x] = 0.0
        else:
            return Accepted(path, int(draw(residual[None], uniforms[:1])[0]))
