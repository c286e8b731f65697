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

Legend: B batch, T tree nodes (root included), V vocabulary, P root-to-leaf paths.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from medusa.tree import TreeBuffers


@dataclass(frozen=True)
class Accepted:
    path: list[int]  # accepted node indices from the root (path[0] == 0), len >= 1
    next_token: int  # the token after the last accepted node (target or residual distribution)


def accept_greedy(candidates: torch.Tensor, target_logits: torch.Tensor, tree: TreeBuffers
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy verification of B sequences at once, without a host synchronisation.

    candidates: [B, T] long, the node tokens; target_logits: [B, T, V]. Returns accepted_len [B]
    (accepted nodes, root included, >= 1), path [B, depth + 1] (accepted node indices; 0 beyond
    accepted_len) and next_token [B] (the target's argmax at the last accepted node).
    """
    B, T = candidates.shape
    assert T == tree.num_nodes and target_logits.shape[:2] == (B, T), (tuple(candidates.shape),
                                                                        tuple(target_logits.shape))
    device = candidates.device
    best = target_logits.argmax(dim=-1)  # [B, T]: the target's token after each node
    parent_best = best[:, tree.parents.to(device).clamp(min=0)]  # [B, T] (root: its own, unused)
    correct = candidates == parent_best  # [B, T]
    correct[:, 0] = True  # the root was emitted already
    retrieve = tree.retrieve.to(device)  # [P, depth + 1], -1 padded (a no-op when already there)
    on_path = correct[:, retrieve.clamp(min=0)] & (retrieve >= 0)  # [B, P, depth + 1]
    chain_len = on_path.long().cumprod(dim=-1).sum(dim=-1)  # [B, P]: correct prefix of each path
    accepted_len, leaf_row = chain_len.max(dim=-1)  # [B], [B]
    step = torch.arange(retrieve.shape[1], device=device)  # [depth + 1]
    path = torch.where(step < accepted_len[:, None], retrieve[leaf_row], 0)  # [B, depth + 1]
    last = path.gather(1, (accepted_len - 1)[:, None])  # [B, 1]
    next_token = best.gather(1, last)[:, 0]  # [B]
    return accepted_len, path, next_token


def accept_typical(candidates: torch.Tensor, target_probs: torch.Tensor, tree: TreeBuffers,
                   epsilon: float, delta: float, generator: torch.Generator) -> Accepted:
    """Medusa typical acceptance for one sequence.

    candidates: [T] long; target_probs: [T, V] (rows sum to 1). The next token is sampled from
    target_probs at the last accepted node with `generator`, on the generator's device.
    """
    T, V = target_probs.shape
    assert candidates.shape == (T,) and T == tree.num_nodes
    probs = target_probs.double()
    entropy = -torch.xlogy(probs, probs).sum(dim=-1)  # [T]: H of the target at each node
    threshold = torch.clamp(delta * torch.exp(-entropy), max=epsilon)  # [T]
    device = target_probs.device
    candidates = candidates.to(device)
    parents = tree.parents[1:].to(device)  # [T-1]
    p_token = probs.new_ones(T)  # [T]: target probability of each node's token at its parent
    p_token[1:] = probs[parents, candidates[1:]]  # (the root was emitted already: certain)
    ok = torch.ones(T, dtype=torch.bool, device=device)  # [T]
    ok[1:] = p_token[1:] > threshold[parents]
    log_p = torch.log(p_token)  # [T]

    retrieve = tree.retrieve.to(device)  # [P, depth + 1]
    idx = retrieve.clamp(min=0)
    on_path = ok[idx] & (retrieve >= 0)  # [P, depth + 1]
    prefix = on_path.long().cumprod(dim=-1).bool()  # [P, depth + 1]: within the accepted prefix
    length = prefix.sum(dim=-1)  # [P]
    score = torch.where(prefix, log_p[idx], 0.0).sum(dim=-1)  # [P]
    # longest first, then the most likely
    best_score = torch.where(length == length.max(), score, -torch.inf)
    row = int(best_score.argmax())
    path = retrieve[row, :int(length[row])].tolist()
    last_probs = target_probs[path[-1]].to(generator.device, torch.float32)  # [V]
    next_token = torch.multinomial(last_probs, 1, generator=generator)
    return Accepted(path=path, next_token=int(next_token))


def accept_lossless(candidates: torch.Tensor, target_probs: torch.Tensor, tree: TreeBuffers,
                    generator: torch.Generator) -> Accepted:
    """Tree speculative sampling with deterministic drafts for one sequence.

    candidates: [T] long; target_probs: [T, V]. The emitted tokens (accepted nodes' tokens, then
    next_token) are distributed exactly as sampling from the target one token at a time.
    A walk with a host-side decision per child, computed on the generator's device: a CPU
    generator (and CPU target_probs, to move them once) is what it wants.
    """
    T, V = target_probs.shape
    assert candidates.shape == (T,) and T == tree.num_nodes
    tokens = candidates.tolist()
    node = 0
    path = [0]
    device = generator.device
    residual = target_probs[0].to(device, torch.float64, copy=True)  # [V], unnormalised: rejections zero it
    while True:
        for child in tree.children[node]:
            x = tokens[child]
            u = float(torch.rand((), generator=generator, device=device, dtype=torch.float64))
            # accept with probability residual(x) / sum(residual): the renormalised residual
            if u * float(residual.sum()) < float(residual[x]):
                node = child
                path.append(child)
                residual = target_probs[child].to(device, torch.float64, copy=True)
                break
            residual[x] = 0.0
        else:  # a leaf, or every child rejected: sample from what is left
            next_token = torch.multinomial(residual, 1, generator=generator)
            return Accepted(path=path, next_token=int(next_token))
