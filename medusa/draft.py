"""Drafting: the token of every node of the candidate tree, from a drafter's guesses.

Two drafters: Medusa heads (`medusa.heads`), which read the last hidden state, and the EAGLE-style
draft layer (`medusa.eagle`), which reads a window of recent features and tokens.

Legend: B running sequences, W window positions, T tree nodes, K Medusa heads, C hidden size,
V' scored vocabulary.
"""

from __future__ import annotations

import torch

from medusa.dynamic import DynamicTree, Expand, RowTrees, grow, select
from medusa.eagle import EagleDrafter, draft_tokens, dynamic_logits
from medusa.heads import MedusaHeads
from medusa.tree import TreeBuffers, candidates_from_topk
from runtime import cpu_kernels
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


def draft_dynamic(drafter: Drafter, model: Llama, features: torch.Tensor, tokens: torch.Tensor,
                  lens: torch.Tensor, roots: torch.Tensor, lookup: torch.Tensor, tree: DynamicTree
                  ) -> tuple[torch.Tensor, RowTrees]:
    """Each row's own tree, grown from the drafter's confidence, its lookup guesses ([B, L], -1 where
    none) first (`medusa.dynamic`): ([B, T] node tokens, the rows' trees). Others as `draft`'s."""
    if isinstance(drafter, EagleDrafter):
        grown = eagle_grow(drafter, model, features, tokens, lens, roots, tree)
    else:
        grown = heads_grow(drafter, model, features[:, -1], roots, tree)
    return select(tree, roots, lookup, *grown)


def eagle_grow(drafter: EagleDrafter, model: Llama, features: torch.Tensor, tokens: torch.Tensor,
               lens: torch.Tensor, roots: torch.Tensor, tree: DynamicTree
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`grow` over the draft layer (`dynamic_logits`): on the CPU in one call of our kernel
    (`runtime/tree_ops.cpp`: `eagle_draft`, where its measurement is)."""
    operands = drafter.kernel_operands(model.lm_head) if cpu_kernels.eager_cpu(features) else None
    if operands is not None and features.dtype == model.embed.weight.dtype == drafter.fc.weight.dtype:
        return cpu_kernels.eagle_draft(features.contiguous(), tokens.contiguous(), lens.contiguous(),
                                       roots.contiguous(), model.embed.weight, *operands, tree.topk,
                                       tree.draft_depth)
    root_logits, expand = dynamic_logits(drafter, model, features, tokens, lens, roots, tree)
    return grow(tree, root_logits, expand, drafter.token_ids)


def heads_grow(heads: MedusaHeads, model: Llama, hidden_last: torch.Tensor, roots: torch.Tensor,
               tree: DynamicTree) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`grow` over the heads (`heads_logits`): on the CPU, path-input heads in one call of our kernel
    (`runtime/tree_ops.cpp`: `heads_draft`, where its measurement is)."""
    operands = heads.kernel_operands(model.lm_head) if cpu_kernels.eager_cpu(hidden_last) else None
    if operands is not None and hidden_last.dtype == model.embed.weight.dtype == heads.fuse[0].weight.dtype:
        fuse_w, fuse_b, block_w, block_b, projection = operands
        return cpu_kernels.heads_draft(hidden_last.contiguous(), roots.contiguous(), model.embed.weight,
                                       fuse_w, fuse_b, block_w, block_b, projection, heads.draft_vocab,
                                       tree.topk, tree.draft_depth)
    return grow(tree, *heads_logits(heads, model, hidden_last, roots, tree), heads.token_ids)


def heads_logits(heads: MedusaHeads, model: Llama, hidden_last: torch.Tensor, roots: torch.Tensor,
                 tree: DynamicTree) -> tuple[torch.Tensor, Expand]:
    """Medusa heads as a dynamic tree's drafter: head d's logits for the children of depth-d nodes --
    the same for every node, unless the heads read the path to the node."""
    B, C = hidden_last.shape
    if not heads.config.path_input:
        logits = heads(hidden_last, model.lm_head, num_heads=tree.draft_depth)  # [B, K, V']

        def expand(d: int, nodes: torch.Tensor, node_tokens: torch.Tensor, parents: torch.Tensor
                   ) -> torch.Tensor:
            return logits[:, d, None].expand(B, nodes.shape[1], logits.shape[-1])
        return logits[:, 0], expand

    def head_logits(d: int, path: torch.Tensor) -> torch.Tensor:
        """path: [B, n, d + 1] tokens root..node of n nodes at depth d -> [B, n, V']."""
        n = path.shape[1]
        state = heads.head_state(d, hidden_last.repeat_interleave(n, dim=0), model.embed(path.flatten(0, 1)))
        return heads.project(state[:, None], model.lm_head)[:, 0].view(B, n, -1)

    def expand(d: int, nodes: torch.Tensor, node_tokens: torch.Tensor, parents: torch.Tensor) -> torch.Tensor:
        path, node = [], nodes  # walk up from the nodes to the root's children
        for _ in range(d):
            path.append(node_tokens.gather(1, node))
            node = parents.gather(1, node).clamp(min=0)
        path.append(roots[:, None].expand_as(nodes))
        return head_logits(d, torch.stack(path[::-1], dim=-1))  # [B, k, V']

    return head_logits(0, roots[:, None, None])[:, 0], expand
