"""Drafting: the token of every node of the candidate tree, from a drafter's guesses.

Two drafters: Medusa heads (`medusa.heads`), which read the last hidden state, and the EAGLE-style
draft layer (`medusa.eagle`), which reads a window of recent features and tokens.

Legend: B running sequences, W window positions, T tree nodes, K Medusa heads, C hidden size,
V' scored vocabulary.
"""

from __future__ import annotations

import torch

from medusa.eagle import EagleDrafter, draft_tokens
from medusa.heads import MedusaHeads
from medusa.tree import TreeBuffers, candidates_from_topk
from runtime.llama import Llama

Drafter = MedusaHeads | EagleDrafter


def drafter_kind(drafter: Drafter) -> str:
    """'eagle' for the draft layer, 'heads' for Medusa heads (the names --drafter takes)."""
    return "eagle" if isinstance(drafter, EagleDrafter) else "heads"


def window_size(drafter: Drafter | None) -> int:
    """How many recent positions' features (and tokens) a step keeps per sequence for the drafter."""
    return drafter.config.window if isinstance(drafter, EagleDrafter) else 1


def draft(drafter: Drafter, model: Llama, features: torch.Tensor, tokens: torch.Tensor, lens: torch.Tensor,
          roots: torch.Tensor, tree: TreeBuffers) -> torch.Tensor:
    """[B, T] the token of every tree node: the roots, then the drafter's guesses (the lookup
    branch, filled by the caller, holds the roots).

    features: [B, W, C] final hidden states of the last W cached tokens (`window_size`), oldest
    first; tokens: [B, W] those tokens; lens: [B] cached tokens; roots: [B] the next (pending) tokens.
    """
    if tree.num_heads_needed == 0:  # a lookup branch only
        return roots[:, None].repeat(1, tree.num_nodes)
    if isinstance(drafter, EagleDrafter):
        return draft_tokens(drafter, model, features, tokens, lens, roots, tree)
    return draft_heads(drafter, model, features[:, -1], roots, tree)


def draft_heads(heads: MedusaHeads, model: Llama, hidden_last: torch.Tensor, roots: torch.Tensor,
                tree: TreeBuffers) -> torch.Tensor:
    """Medusa heads guess all levels at once; path-input heads go level by level, each node's
    children drafted from the tokens on the path to it. hidden_last: [B, C]."""
    if not heads.config.path_input:
        logits = heads(hidden_last, model.lm_head, num_heads=tree.num_heads_needed)  # [B, K, V']
        topk = heads.token_ids(logits.topk(tree.topk_needed, dim=-1).indices)  # [B, K, k]
        return candidates_from_topk(roots, topk, tree)
    (B, C), T = hidden_last.shape, tree.num_nodes
    tokens = roots[:, None].repeat(1, T)  # [B, T]
    for k, level in enumerate(tree.levels):  # head k drafts depth k + 1
        P = level.parent_paths.shape[0]
        path_embeds = model.embed(tokens[:, level.parent_paths]).view(B * P, k + 1, C)  # [B*P, k+1, C]
        state = heads.head_state(k, hidden_last.repeat_interleave(P, dim=0), path_embeds)  # [B*P, C]
        logits = heads.project(state[:, None], model.lm_head)[:, 0]  # [B*P, V']
        top = heads.token_ids(logits.topk(level.topk, dim=-1).indices).view(B, P, level.topk)
        tokens[:, level.nodes] = top[:, level.parent_of, level.ranks]
    return tokens
