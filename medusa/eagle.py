"""An EAGLE-style drafter: one decoder layer that drafts the base model's next *features*.

Medusa heads read one hidden state. This drafter reads the base model's final hidden states
("features") of the last W tokens, each paired with the token that came after it: pair p is
(feature f_p, embedding of token x_(p+1)), fused by `fc` into one vector. One pre-norm decoder
layer (grouped-query attention with RoPE over the pairs, SwiGLU MLP) maps pair p to a guess of
f_(p+1), which the base model's frozen `lm_head` reads out as the distribution of x_(p+2). Deeper
tree levels are drafted from the layer's own guesses: a node's pair is (its parent's guessed
feature, its own token), and it attends to the window and to its ancestors' pairs (as in EAGLE,
Li et al. 2024).

The window is recomputed every step from the last W features and tokens of each sequence, which
the step keeps per slot (`medusa.step`), so the drafter has no cache of its own to grow, compact
or free: W = 32 pairs through one 4M-parameter layer is little beside the base model's verification.
Measured (SmolLM2 bf16, AMD EPYC Zen 5, the layer in one call): the window's call ~0.53 ms of an ~11 ms
step; the same layer read with W = 16 or 8 gave the same speed within 1.5% on 9 dev prompts, taking
turns (2.43 / 2.41 / 2.40 tokens per step). Only the root's pair needs a guess, and the others' keys
and values need only `fc` and `qkv` (`forward`'s `last`): the window's call, its weights in cache,
took 3.04 -> 1.37 ms in float32 and 3.41 -> 1.30 ms in bf16 (AMD EPYC Zen 3, 2 threads, median of 400);
12 dev prompts in float32, dynamic:6,topk=4,depth=3,lookup=4, taking turns: 50.9 -> 51.8 tok/s.

`draft_tokens` is the fixed-shape drafting the step compiles; `reference_draft` drafts the same
tokens the plain way, one explicit sequence per node, for tests.

Legend: B rows, W window pairs, S pairs in one call, K keys, T tree nodes, C hidden size,
H / Hkv attention / key-value heads, D head dim, V' scored vocabulary.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from medusa.dynamic import DynamicTree, Expand
from medusa.heads import scored_projection
from medusa.tree import TreeBuffers
from runtime import cpu_kernels
from runtime.config import ConfigError, ModelConfig
from runtime.llama import NEVER, Linear, Llama, RMSNorm, apply_rope, pack_linears


@dataclass(frozen=True)
class EagleConfig:
    """Shape of a draft layer (saved as eagle_config.json); attention shapes follow the base model's."""

    hidden_size: int  # C: must equal the base model's
    vocab_size: int  # V: must equal the base model's
    num_attention_heads: int
    num_kv_heads: int
    intermediate_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    window: int = 32  # W: pairs of (feature, next token) the layer attends to
    draft_vocab_size: int = 0  # 0: score the whole vocabulary; else only these tokens (draft_vocab)
    max_depth: int = 8  # the deepest tree level it drafts (it was trained for `trained_depth`)
    attn_norm: bool = True  # RMSNorm before attention (the official EAGLE-1/2 layer has none)

    def __post_init__(self) -> None:
        for name in ("hidden_size", "vocab_size", "num_attention_heads", "num_kv_heads", "intermediate_size",
                     "window", "max_depth"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"EagleConfig.{name} must be an integer >= 1, got {value!r}")
        if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_kv_heads:
            raise ConfigError("EagleConfig: hidden_size must divide into num_attention_heads, and those "
                              "into num_kv_heads groups")
        if not isinstance(self.attn_norm, bool):
            raise ConfigError(f"EagleConfig.attn_norm must be a bool, got {self.attn_norm!r}")
        d = self.draft_vocab_size
        if not isinstance(d, int) or isinstance(d, bool) or not 0 <= d <= self.vocab_size:
            raise ConfigError(f"EagleConfig.draft_vocab_size must be an integer in [0, {self.vocab_size}], "
                              f"got {d!r}")

    @classmethod
    def for_base(cls, base: ModelConfig, **overrides) -> EagleConfig:
        """The base model's layer shapes (as EAGLE: the draft layer is one more layer of the base)."""
        return cls(hidden_size=base.hidden_size, vocab_size=base.vocab_size,
                   num_attention_heads=base.num_heads, num_kv_heads=base.num_kv_heads,
                   intermediate_size=base.intermediate_size, rms_norm_eps=base.rms_norm_eps,
                   rope_theta=base.rope_theta, **overrides)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def scored_vocab_size(self) -> int:
        return self.draft_vocab_size or self.vocab_size

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class EagleDrafter(nn.Module):
    """fc([feature; embedding]) -> one decoder layer -> the next feature; scored by the base lm_head."""

    def __init__(self, config: EagleConfig) -> None:
        super().__init__()
        self.config = config
        C, H, Hkv, D = config.hidden_size, config.num_attention_heads, config.num_kv_heads, config.head_dim
        self.fc = Linear(2 * C, C)
        self.attn_norm = RMSNorm(C, config.rms_norm_eps) if config.attn_norm else nn.Identity()
        self.qkv = Linear(C, (H + 2 * Hkv) * D, bias=False)
        self.o = Linear(H * D, C, bias=False)
        self.mlp_norm = RMSNorm(C, config.rms_norm_eps)
        self.gate_up = Linear(C, 2 * config.intermediate_size, bias=False)
        self.down = Linear(config.intermediate_size, C, bias=False)
        inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)  # [D/2]
        if config.draft_vocab_size:
            self.register_buffer("draft_vocab", torch.arange(config.draft_vocab_size))  # [V'] token ids
        else:
            self.draft_vocab = None
        self._serving = False
        self._projection: tuple[torch.Tensor, Linear] | None = None  # (lm_head weight, its scored rows)
        self._matmul = (NEVER, 0)  # (packed_from_rows, own_kernel_rows) while serving
        self._one_call: tuple[torch.Tensor, ...] | None = None  # serving on the CPU: `_in_one_call`'s weights
        self._int8 = False  # serving with weights rounded to int8 (`prepare_for_serving`)

    def prepare_for_serving(self, packed_from_rows: int = 1, own_kernel_rows: int = 1,
                            int8: bool | None = None) -> EagleDrafter:
        """Multiply products of at least `packed_from_rows` rows through oneDNN copies of the weights,
        taken now, and of at most `own_kernel_rows` through our kernel (`runtime.llama.pack_linears`; the
        loaders pass the base model's measured answers), and score through a cached (bf16 where the CPU
        has it) copy of the scored lm_head rows.

        Serving on the CPU, in one call of our kernels: with `int8` (None: where the CPU multiplies int8
        in AMX tiles) the weights are read rounded to int8, and so is each row they multiply
        (`runtime/int8_product.cpp`, where the measurement is; `Linear.round_to_int8`)."""
        self._serving, self._projection, self._matmul = True, None, (packed_from_rows, own_kernel_rows)
        pack_linears(self, packed_from_rows, own_kernel_rows)
        linears = {self.fc: self.config.hidden_size, self.qkv: 0, self.o: 0, self.gate_up: 0, self.down: 0}
        w = self.fc.weight
        self._one_call, self._int8 = None, False
        if (w.device.type == "cpu" and w.dtype in (torch.float32, torch.bfloat16)
                and self.config.head_dim % 16 == 0 and cpu_kernels.built()):
            self._int8 = cpu_kernels.cpu_int8_products() if int8 is None else int8
            if self._int8:
                for m, group in linears.items():
                    m.round_to_int8(group)  # fc's [feature; embedding]: a scale for each
            self._one_call = tuple(m.kernel_weight() for m in linears)
        return self

    def prepare_for_training(self) -> EagleDrafter:
        self._serving, self._projection, self._one_call, self._int8 = False, None, None, False
        pack_linears(self, NEVER, 0)
        return self

    def forward(self, features: torch.Tensor, embeds: torch.Tensor, positions: torch.Tensor,
                mask: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None = None,
                at: torch.Tensor | None = None, last: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """S pairs of B rows -> (guessed next features [B, Q, C], keys, values [B, Hkv, K, D]).

        features, embeds: [B, S, C]; positions: [B, S] (RoPE); mask: [B, S, K] bool, which keys each
        pair sees. Keys: the pairs' own after `past`'s ([B, Hkv, K - S, D] each), or with `at` ([S]
        key indices) the pairs' own written into `past` there (K = past's length). Guesses: of every
        pair (Q = S), or of the `last` Q pairs only: a pair's keys and values need only `fc` and `qkv`,
        ~30% of the layer's weights, so a window's call that reads one guess skips ~70% of its products.
        """
        B, S, _ = features.shape
        H, Hkv, D = self.config.num_attention_heads, self.config.num_kv_heads, self.config.head_dim
        Q = S if last is None else last
        dtype = self.fc.weight.dtype  # the layer's own, which may differ from the base model's
        if self._one_call is not None and cpu_kernels.eager_cpu(features) and (past is None) == (at is None):
            return self._in_one_call(features.to(dtype), embeds.to(dtype), positions, mask, past, at, Q)

        x = self.fc(torch.cat([features.to(dtype), embeds.to(dtype)], dim=-1))  # [B, S, C]
        freqs = positions[..., None].float() * self.inv_freq  # [B, S, D/2]
        cos = torch.cat([freqs.cos(), freqs.cos()], dim=-1)[:, :, None].to(x.dtype)  # [B, S, 1, D]
        sin = torch.cat([-freqs.sin(), freqs.sin()], dim=-1)[:, :, None].to(x.dtype)
        qkv = self.qkv(self.attn_norm(x)).view(B, S, H + 2 * Hkv, D)
        qk = apply_rope(qkv[:, :, :H + Hkv], cos, sin)
        q = qk[:, :, :H].transpose(1, 2)  # [B, H, S, D]
        k, v = qk[:, :, H:].transpose(1, 2), qkv[:, :, H + Hkv:].transpose(1, 2)  # [B, Hkv, S, D]
        if past is not None and at is not None:
            k, v = past[0].index_copy(2, at, k), past[1].index_copy(2, at, v)
        elif past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        groups = H // Hkv  # each key-value head serves `groups` query heads
        k_all, v_all = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)  # [B, H, K, D]
        q, mask, x = q[:, :, S - Q:], mask[:, S - Q:], x[:, S - Q:]  # the pairs whose guesses are read
        out = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask[:, None])  # [B, H, Q, D]
        x = x + self.o(out.transpose(1, 2).reshape(B, Q, H * D))
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up), k, v

    def _in_one_call(self, features: torch.Tensor, embeds: torch.Tensor, positions: torch.Tensor,
                     mask: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None,
                     at: torch.Tensor | None, last: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`forward`'s lines above in one call of our kernel (`runtime/layer_ops.cpp`: `draft_layer`),
        serving on the CPU (its measurement is there). Its attention sums in float32 in its own order:
        drafts only propose, so their rounding changes which tokens are drafted, never which are accepted."""
        fc, qkv, o, gate_up, down = self._one_call
        past_k, past_v = (None, None) if past is None else (past[0].contiguous(), past[1].contiguous())
        c = self.config
        norm = self.attn_norm.weight if c.attn_norm else None
        return cpu_kernels.draft_layer(
            features.contiguous(), embeds.contiguous(), positions.contiguous(), mask.contiguous(), past_k,
            past_v, None if at is None else at.contiguous(), fc, self.fc.bias, norm, qkv, o,
            self.mlp_norm.weight, gate_up, down, self.inv_freq.float(), c.rms_norm_eps, c.num_attention_heads,
            c.num_kv_heads, last)

    def project(self, states: torch.Tensor, lm_head: nn.Linear) -> torch.Tensor:
        """Guessed features [..., C] -> logits over the scored vocabulary [..., V'] float32."""
        if self._serving:
            projection = self._scored_projection(lm_head)
            int8 = projection.int8_weight is not None  # takes the states as they are
            return projection(states if int8 else states.to(projection.weight.dtype)).float()
        weight = lm_head.weight if self.draft_vocab is None else lm_head.weight[self.draft_vocab]
        return F.linear(states, weight.to(states.dtype)).float()

    def _scored_projection(self, lm_head: nn.Linear) -> Linear:
        """Serving: the rows of `lm_head` the layer scores (`scored_projection`), copied once per lm_head."""
        weight = lm_head.weight
        self._projection = scored_projection(self._projection, weight, self.draft_vocab, *self._matmul,
                                             self._int8)
        return self._projection[1]

    def token_ids(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices into the scored vocabulary -> token ids."""
        return indices if self.draft_vocab is None else self.draft_vocab[indices]

    def kernel_operands(self, lm_head: nn.Linear) -> tuple | None:
        """What `runtime.cpu_kernels.eagle_draft` takes after the embedding, serving on the CPU: the layer's
        operands as `draft_layer` takes them, then the scored lm_head rows in our kernel's order; None where
        our kernels do not take them all (not serving on the CPU, or a projection of another dtype)."""
        if self._one_call is None:
            return None
        projection = self._scored_projection(lm_head)
        if projection.int8_weight is None and (projection.own_weight is None
                                               or projection.weight.dtype != self.fc.weight.dtype):
            return None
        rows = projection.kernel_weight()
        fc, qkv, o, gate_up, down = self._one_call
        c = self.config
        norm = self.attn_norm.weight if c.attn_norm else None
        return (fc, self.fc.bias, norm, qkv, o, self.mlp_norm.weight, gate_up, down, self.inv_freq.float(),
                c.rms_norm_eps, c.num_attention_heads, c.num_kv_heads, rows, self.draft_vocab)


def window_pairs(features: torch.Tensor, tokens: torch.Tensor, lens: torch.Tensor, roots: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A step's window as pairs: (features with the unfilled ones zeroed [B, W, C], the token after
    each [B, W], positions [B, W], filled [B, W] bool).

    features, tokens: [B, W] the last W cached positions' features and tokens, oldest first;
    lens: [B] cached tokens; roots: [B] the pending token, which follows the last cached one.
    """
    W = features.shape[1]
    positions = lens[:, None] - W + torch.arange(W, device=lens.device)  # [B, W]
    filled = positions >= 0
    after = torch.cat([tokens[:, 1:], roots[:, None]], dim=1)  # [B, W]
    return torch.where(filled[..., None], features, 0), after, positions, filled


def draft_tokens(drafter: EagleDrafter, model: Llama, features: torch.Tensor, tokens: torch.Tensor,
                 lens: torch.Tensor, roots: torch.Tensor, tree: TreeBuffers) -> torch.Tensor:
    """[B, T] the token of every tree node (the lookup branch holds the roots), with fixed shapes.

    One call of the layer on the window's W pairs guesses the root's feature (the last pair is the
    root's: its last cached feature and the root token); then one call per level on that level's
    parents, each pair attending to the window and to its ancestors' pairs, whose keys stay in a
    [B, Hkv, W + T, D] buffer (node i at W + i; the root's pair is the window's last).
    """
    f, after, positions, filled = window_pairs(features, tokens, lens, roots)
    B, W, _ = f.shape
    T, device = tree.num_nodes, f.device
    causal = torch.ones(W, W, dtype=torch.bool, device=device).tril()
    seen = causal & (filled[:, None, :] | torch.eye(W, dtype=torch.bool, device=device))  # [B, W, W]
    out_w, k, v = drafter(f, model.embed(after), positions, seen, last=1)  # [B, 1, C]: the root's guess
    Hkv, D = k.shape[1], k.shape[3]
    k = torch.cat([k, k.new_zeros(B, Hkv, T, D)], dim=2)  # [B, Hkv, W + T, D]
    v = torch.cat([v, v.new_zeros(B, Hkv, T, D)], dim=2)
    guessed = out_w.repeat(1, T, 1)  # [B, T, C]: each node's guessed feature; the root's first
    candidates = roots[:, None].repeat(1, T)  # [B, T]
    ancestors = tree.mask.clone()
    ancestors[:, 0] = False  # the root's pair is the window's last
    for level in tree.levels:
        parents = level.parent_paths[:, -1]  # [P]
        P = parents.shape[0]
        if level.parent_paths.shape[1] > 1:  # parents below the root: their pairs through the layer
            pairs = guessed[:, tree.parents[parents]]  # [B, P, C] the grandparents' guesses
            pos = lens[:, None] - 1 + tree.depths[parents]  # [B, P]
            sees = torch.cat([filled[:, None].expand(B, P, W), ancestors[parents][None].expand(B, P, T)], -1)
            out, k, v = drafter(pairs, model.embed(candidates[:, parents]), pos, sees, (k, v), W + parents)
            guessed = guessed.index_copy(1, parents, out)
        logits = drafter.project(guessed[:, parents], model.lm_head)  # [B, P, V']
        top = drafter.token_ids(logits.topk(level.topk, dim=-1).indices)  # [B, P, k]
        candidates = candidates.index_copy(1, level.nodes, top[:, level.parent_of, level.ranks])
    return candidates


def dynamic_logits(drafter: EagleDrafter, model: Llama, features: torch.Tensor, tokens: torch.Tensor,
                   lens: torch.Tensor, roots: torch.Tensor, tree: DynamicTree) -> tuple[torch.Tensor, Expand]:
    """The layer as a dynamic tree's drafter (`medusa.dynamic.grow`): the logits for the root's
    children [B, V'], and `expand`, which runs the layer on the k nodes a level expands.

    As in `draft_tokens`: the window's call guesses the root's feature; an expanded node's pair is
    (its parent's guessed feature, its token), and it attends to the window and to its expanded
    ancestors, whose keys stay in a [B, Hkv, W + E, D] buffer (E = (draft_depth - 1) k expanded nodes;
    level d's at W + (d - 1) k ..).
    """
    f, after, positions, filled = window_pairs(features, tokens, lens, roots)
    (B, W, C), k, device = f.shape, tree.topk, f.device
    causal = torch.ones(W, W, dtype=torch.bool, device=device).tril()
    seen = causal & (filled[:, None, :] | torch.eye(W, dtype=torch.bool, device=device))  # [B, W, W]
    out_w, keys, values = drafter(f, model.embed(after), positions, seen, last=1)  # [B, 1, C]
    E = (tree.draft_depth - 1) * k
    Hkv, D = keys.shape[1], keys.shape[3]
    keys = torch.cat([keys, keys.new_zeros(B, Hkv, E, D)], dim=2)  # [B, Hkv, W + E, D]
    values = torch.cat([values, values.new_zeros(B, Hkv, E, D)], dim=2)
    guessed = out_w.new_zeros(B, E, out_w.shape[-1])  # [B, E, C]: each expanded node's guessed feature
    ancestors = torch.zeros(B, E, E, dtype=torch.bool, device=device)  # expanded row sees expanded row
    row_of = torch.zeros(B, tree.num_candidates, dtype=torch.long, device=device)  # [B, M]: expanded row
    root_feature = out_w[:, 0]  # [B, C]

    def expand(d: int, nodes: torch.Tensor, node_tokens: torch.Tensor, parents: torch.Tensor) -> torch.Tensor:
        nonlocal keys, values, guessed, ancestors, row_of
        rows = torch.arange((d - 1) * k, d * k, device=device)  # [k]: this level's expanded rows
        if d == 1:  # the root's children: their parent's feature is the window's guess
            parent_feature = root_feature[:, None].expand(B, k, C)
            sees = torch.zeros(B, k, E, dtype=torch.bool, device=device)
        else:
            parent_row = row_of.gather(1, parents.gather(1, nodes))  # [B, k]
            parent_feature = guessed.gather(1, parent_row[..., None].expand(B, k, C))
            sees = ancestors.gather(1, parent_row[..., None].expand(B, k, E))
        sees = sees.scatter(2, rows.expand(B, k)[..., None], True)  # [B, k, E]: and itself
        mask = torch.cat([filled[:, None].expand(B, k, W), sees], dim=-1)  # [B, k, W + E]
        pos = (lens[:, None] - 1 + d).expand(B, k)
        out, keys, values = drafter(parent_feature, model.embed(node_tokens.gather(1, nodes)), pos, mask,
                                    (keys, values), W + rows)
        guessed = guessed.index_copy(1, rows, out)
        ancestors = ancestors.index_copy(1, rows, sees)
        row_of = row_of.scatter(1, nodes, rows.expand(B, k))
        return drafter.project(out, model.lm_head)  # [B, k, V']

    return drafter.project(root_feature, model.lm_head), expand


@torch.no_grad()
def reference_draft(drafter: EagleDrafter, model: Llama, features: torch.Tensor, tokens: torch.Tensor,
                    lens: torch.Tensor, roots: torch.Tensor, tree: TreeBuffers) -> torch.Tensor:
    """`draft_tokens` the plain way: for each row and each parent node, the layer over one explicit
    causal sequence -- the filled window's pairs, then the pairs on the path down to the node."""
    out = roots[:, None].repeat(1, tree.num_nodes)
    for b, logp_after in enumerate(reference_logp(drafter, model, features, tokens, lens, roots)):
        for level in tree.levels:
            for node, parent_row, rank in zip(level.nodes.tolist(), level.parent_of.tolist(),
                                              level.ranks.tolist(), strict=True):
                path = level.parent_paths[parent_row, 1:]  # the parent's path below the root
                logp = logp_after(out[b, path].tolist())  # [V']
                out[b, node] = drafter.token_ids(logp.topk(level.topk).indices[rank])
    return out


def reference_logp(drafter: EagleDrafter, model: Llama, features: torch.Tensor, tokens: torch.Tensor,
                   lens: torch.Tensor, roots: torch.Tensor) -> list:
    """Per row, a function from a node's path (the tokens below the root, a list) to the layer's
    log-probabilities of the node's children [V'], each from one explicit causal sequence."""
    f, after, positions, filled = window_pairs(features, tokens, lens, roots)

    def row(b: int):
        window = f[b, filled[b]], after[b, filled[b]], positions[b, filled[b]]
        return lambda path: drafter.project(_guess(drafter, model, window, path),
                                            model.lm_head).log_softmax(-1)
    return [row(b) for b in range(f.shape[0])]


def _guess(drafter: EagleDrafter, model: Llama, window: tuple, path: list[int]) -> torch.Tensor:
    """[C] the feature the layer guesses at the node reached by `path` (tokens below the root) from
    one causal sequence: the window's pairs (features, next tokens, positions), then (guess at the
    parent, token) for each node on the path."""
    feats, toks, pos = [window[0]], [window[1]], [window[2]]
    for depth, token in enumerate(path, start=1):
        feats.append(_guess(drafter, model, window, path[:depth - 1])[None])
        toks.append(window[1].new_tensor([token]))
        pos.append(window[2][-1:] + depth)
    x, t, p = torch.cat(feats)[None], torch.cat(toks)[None], torch.cat(pos)[None]
    causal = torch.ones(1, x.shape[1], x.shape[1], dtype=torch.bool).tril()
    return drafter(x, model.embed(t), p, causal)[0][0, -1]


def random_drafter(config: EagleConfig, seed: int, scale: float = 1.0) -> EagleDrafter:
    """For tests and benchmarks: a draft layer with random weights, prepared for serving."""
    drafter = EagleDrafter(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in drafter.named_parameters():
            if "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale * p.shape[-1] ** -0.5)
        if drafter.draft_vocab is not None:
            subset = torch.randperm(config.vocab_size, generator=gen)[:config.draft_vocab_size]
            drafter.draft_vocab.copy_(subset)
    return drafter.prepare_for_serving()
