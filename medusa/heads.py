"""Medusa heads: K extra decoding heads that guess the tokens after the next one.

Head i (0-based) reads the base model's last hidden state and predicts the token i + 2 positions
ahead (the base `lm_head` predicts + 1). A head is `num_layers` residual blocks
`x + SiLU(W x + b)` followed by a vocabulary projection: either its own `Linear(C, V)` (the
original Medusa release) or the base model's `lm_head` (shared; far less memory).

Two options of ours, both off in the original Medusa:
- `path_input`: head k also reads the embeddings of the k + 1 tokens between the hidden state and
  its target: the next token, which the base model has already chosen (the tree's root), and the
  drafts of heads 0..k-1 on the path to the node it extends: x = h + W_k [h; e_1; ...; e_(k+1)]
  before the blocks (as in Hydra). Medusa's heads guess token + 2 without knowing token + 1; these
  know it, so the tree is drafted level by level. Trials on 228k distilled positions, held-out
  top-1 of heads 0/1/2: Medusa heads 0.29/0.14/0.11 after 400 steps; heads that read only the
  next token 0.38/0.19/0.12 after 400 steps, 0.43/0.23/0.15 after 3,000; path input 0.43/0.36/0.35
  after 3,000.
- `draft_vocab_size`: the heads score only the most frequent tokens of the training answers (ids
  kept in `draft_vocab`), a slice of the shared `lm_head`. A draft outside it is never proposed;
  verification still uses the whole vocabulary, so the output does not change, only the cost.

Their two on-disk formats are read and written by `medusa.checkpoints`.

Legend: B batch, K Medusa heads, C hidden size, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from runtime import cpu_kernels
from runtime.config import ConfigError
from runtime.llama import NEVER, Linear, pack_linears

# heads this project trained for its embedded default model (training.fit), shipped in the package


@dataclass(frozen=True)
class MedusaConfig:
    """Shape of a set of Medusa heads (saved as medusa_config.json in our format)."""

    hidden_size: int  # C: must equal the base model's
    vocab_size: int  # V: must equal the base model's
    num_heads: int = 4  # K
    num_layers: int = 1  # residual blocks per head
    shared_lm_head: bool = True  # True: heads' hidden states go through the base model's lm_head
    path_input: bool = False  # head k also reads the embeddings of the k + 1 tokens before its target
    draft_vocab_size: int = 0  # 0: score the whole vocabulary; else only this many tokens (draft_vocab)

    def __post_init__(self) -> None:
        for name in ("hidden_size", "vocab_size", "num_heads", "num_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"MedusaConfig.{name} must be an integer >= 1, got {value!r}")
        for name in ("shared_lm_head", "path_input"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"MedusaConfig.{name} must be a bool, got {getattr(self, name)!r}")
        d = self.draft_vocab_size
        if not isinstance(d, int) or isinstance(d, bool) or not 0 <= d <= self.vocab_size:
            raise ConfigError(f"MedusaConfig.draft_vocab_size must be an integer in [0, vocab_size "
                              f"{self.vocab_size}], got {d!r}")
        if d and not self.shared_lm_head:
            raise ConfigError("MedusaConfig.draft_vocab_size needs shared_lm_head: it is a slice of the "
                              "base lm_head")

    @property
    def scored_vocab_size(self) -> int:
        """How many tokens each head scores: its top-k can be at most this large."""
        return self.draft_vocab_size or self.vocab_size

    @property
    def max_depth(self) -> int:
        """The deepest tree level the heads draft: one level per head."""
        return self.num_heads


class ResBlock(nn.Module):
    """x + SiLU(W x + b). W and b start at zero, so a new block is the identity."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))


class MedusaHeads(nn.Module):
    """K heads; head i maps the base model's last hidden state to logits for the token at + i + 2.

    New heads are prepared for training: a shared projection multiplies by the lm_head rows in
    full precision, so gradients flow and an evaluation scores what training optimised.
    `prepare_for_serving` (done by `load_heads`) switches to a cached, possibly bf16, copy.
    """

    def __init__(self, config: MedusaConfig) -> None:
        super().__init__()
        self.config = config
        C, V, K = config.hidden_size, config.vocab_size, config.num_heads
        # one comprehension per level: every layer of every head is its own module
        self.blocks = nn.ModuleList(
            nn.Sequential(*(ResBlock(C) for _ in range(config.num_layers))) for _ in range(K))
        self.projections = None if config.shared_lm_head else nn.ModuleList(
            Linear(C, V, bias=False) for _ in range(K))
        self.fuse = None
        if config.path_input:  # zero-initialised: a new head ignores the path at first
            self.fuse = nn.ModuleList(Linear((k + 2) * C, C) for k in range(K))
            for linear in self.fuse:
                nn.init.zeros_(linear.weight)
                nn.init.zeros_(linear.bias)
        if config.draft_vocab_size:
            self.register_buffer("draft_vocab", torch.arange(config.draft_vocab_size))  # [V'] token ids
        else:
            self.draft_vocab = None
        self._serving = False  # set by prepare_for_serving / prepare_for_training only
        self._projection: tuple[torch.Tensor, Linear] | None = None  # (lm_head weight, its scored rows)
        self._matmul = (NEVER, 0)  # (packed_from_rows, own_kernel_rows) while serving
        self._int8 = False  # serving with weights rounded to int8 (`prepare_for_serving`)

    def prepare_for_serving(self, packed_from_rows: int = 1, own_kernel_rows: int = 1,
                            int8: bool | None = None) -> MedusaHeads:
        """Inference from now on, with or without autograd enabled: products of at least
        `packed_from_rows` rows multiply through oneDNN copies of the weights, taken now, and of at
        most `own_kernel_rows` through our kernel (`runtime.llama.pack_linears`; the loaders pass the
        base model's measured answers), and a shared projection scores through `_draft_projection`'s
        copy of the lm_head rows. Drafts only propose, so the output of a speculative step does not
        change, only its cost. With `int8` (None: where the CPU multiplies int8 in AMX tiles) every product
        reads its weights rounded to int8, and rounds each row it multiplies (`Linear.round_to_int8`)."""
        self._serving, self._projection, self._matmul = True, None, (packed_from_rows, own_kernel_rows)
        pack_linears(self, packed_from_rows, own_kernel_rows)
        self._int8 = cpu_kernels.cpu_int8_products() if int8 is None else int8
        if self._int8:
            fuse = set(self.fuse or ())  # [h; path embeddings]: a scale for each
            for m in self.modules():
                if isinstance(m, Linear):
                    m.round_to_int8(self.config.hidden_size if m in fuse else 0)
        return self

    def prepare_for_training(self) -> MedusaHeads:
        """Autograd from now on: the heads multiply by their weights, and a shared projection by the
        lm_head rows themselves."""
        self._serving, self._projection, self._int8 = False, None, False
        pack_linears(self, NEVER, 0)
        return self

    def hidden_states(self, hidden: torch.Tensor, path_embeds: torch.Tensor | None = None,
                      num_heads: int | None = None) -> torch.Tensor:
        """[B, C] -> [B, K, C]: the residual-block outputs of the first `num_heads` heads (default all).

        path_embeds: [B, >= K, C] embeddings of the tokens after the hidden state's position (the
        true ones in training); needed iff path_input.
        """
        K = num_heads or self.config.num_heads
        return torch.stack([self.head_state(k, hidden, path_embeds) for k in range(K)], dim=1)

    def head_state(self, k: int, hidden: torch.Tensor, path_embeds: torch.Tensor | None = None
                   ) -> torch.Tensor:
        """[N, C] -> [N, C]: head k's residual-block output; path_embeds [N, >= k + 1, C] iff path_input."""
        assert hidden.dim() == 2 and hidden.shape[1] == self.config.hidden_size, tuple(hidden.shape)
        assert (path_embeds is not None) == self.config.path_input, "path_embeds iff path_input"
        x = hidden
        if self.fuse is not None:
            x = x + self.fuse[k](torch.cat([hidden, path_embeds[:, :k + 1].flatten(1).to(hidden.dtype)], -1))
        return self.blocks[k](x)

    def forward(self, hidden: torch.Tensor, lm_head: nn.Linear, path_embeds: torch.Tensor | None = None,
                num_heads: int | None = None) -> torch.Tensor:
        """hidden: [B, C] (the base model's last hidden state) -> logits [B, K, V'] float32.

        V' is the draft vocabulary (`token_ids` maps its indices to token ids) or the whole one.
        `lm_head` is the base model's projection; used only when the heads share it.
        """
        return self.project(self.hidden_states(hidden, path_embeds, num_heads), lm_head)

    def project(self, states: torch.Tensor, lm_head: nn.Linear) -> torch.Tensor:
        """Head states [B, K, C] -> logits [B, K, V'] float32 (head i's projection on states[:, i])."""
        if self.projections is not None:
            projections = self.projections[:states.shape[1]]
            return torch.stack([proj(states[:, i]) for i, proj in enumerate(projections)], dim=1).float()
        if self._serving:
            projection = self._draft_projection(lm_head.weight)
            int8 = projection.int8_weight is not None  # takes the states as they are
            return projection(states if int8 else states.to(projection.weight.dtype)).float()  # [B, K, V']
        # gradients flow to the states through a fresh slice of the lm_head rows
        weight = lm_head.weight if self.draft_vocab is None else lm_head.weight[self.draft_vocab]
        return F.linear(states, weight.to(states.dtype)).float()  # [B, K, V']

    def kernel_operands(self, lm_head: nn.Linear) -> tuple | None:
        """What `runtime.cpu_kernels.heads_draft` multiplies by, serving path-input heads on the CPU: each
        head's fuse weight and bias, its blocks' weights and biases (head-major), and the scored lm_head
        rows, the weights in our kernel's order; None where our kernel does not take them all (not
        serving, no path input, own projections, or dtypes that differ)."""
        if not self._serving or self.fuse is None or self.projections is not None:
            return None
        projection = self._draft_projection(lm_head.weight)
        blocks = [block.linear for head in self.blocks for block in head]
        dtype = self.fuse[0].weight.dtype
        for m in (*self.fuse, *blocks, projection):  # int8 copies take any dtype; ours, the heads'
            if m.int8_weight is None and (m.own_weight is None or m.weight.dtype != dtype):
                return None
        return ([m.kernel_weight() for m in self.fuse], [m.bias for m in self.fuse],
                [m.kernel_weight() for m in blocks], [m.bias for m in blocks], projection.kernel_weight())

    def token_ids(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices into the scored vocabulary (what `forward`'s logits index) -> token ids."""
        return indices if self.draft_vocab is None else self.draft_vocab[indices]

    def _draft_projection(self, lm_weight: torch.Tensor) -> Linear:
        """The rows of `lm_head` the heads score (`scored_projection`), copied once per lm_head."""
        self._projection = scored_projection(self._projection, lm_weight, self.draft_vocab, *self._matmul,
                                             self._int8)
        return self._projection[1]


def scored_rows(lm_weight: torch.Tensor, draft_vocab: torch.Tensor | None) -> torch.Tensor:
    """A drafter's copy of the lm_head rows it scores ([V', C]: the draft vocabulary's, or all), in
    bf16 where the CPU multiplies it fast. Measured here for 4 rows: the whole fp32 lm_head (49k
    words) 7.4 ms, a bf16 slice of 8k words 0.42 ms. Drafts only propose tokens, so their precision
    never changes the output."""
    weight = lm_weight.detach()
    if draft_vocab is not None:
        weight = weight[draft_vocab]  # [V', C]
    if weight.device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        weight = weight.to(torch.bfloat16)
    return weight


def scored_projection(cached: tuple[torch.Tensor, Linear] | None, lm_weight: torch.Tensor,
                      draft_vocab: torch.Tensor | None, packed_from_rows: int, own_kernel_rows: int,
                      int8: bool = False) -> tuple[torch.Tensor, Linear]:
    """A serving drafter's (lm_head weight, projection over the rows it scores): `cached` if it was made
    from this very lm_head weight, else a new one -- `scored_rows` as a bias-free `Linear`, multiplying
    through our kernel up to `own_kernel_rows` rows and oneDNN's packed copy from `packed_from_rows`;
    for a bf16 copy of fp32 weights, ours for one row and oneDNN's from one: oneDNN's bf16 products
    beat MKL's at every size measured on the AMX Xeon (`runtime.llama.Linear`), and the copy is bf16
    only where the CPU has them (with the drafters' own products: `medusa.checkpoints._matmul_choice`);
    with `int8`, rounded to int8 (`Linear.round_to_int8`)."""
    if cached is not None and cached[0] is lm_weight:
        return cached
    weight = scored_rows(lm_weight, draft_vocab)
    projection = Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    projection.weight = nn.Parameter(weight, requires_grad=False)
    if weight.dtype != lm_weight.dtype:
        packed_from_rows, own_kernel_rows = 1, 1
    projection.pack(packed_from_rows, own_kernel_rows)
    if int8:
        projection.round_to_int8()
    return lm_weight, projection


def random_heads(config: MedusaConfig, seed: int, scale: float = 1.0) -> MedusaHeads:
    """For tests and benchmarks: heads whose blocks are not the identity, so each head guesses
    differently; prepared for serving, as `load_heads` returns them.

    Block weights and biases are drawn from N(0, (scale / sqrt(C))^2); own projections (if any)
    from N(0, 1 / C).
    """
    heads = MedusaHeads(config)
    gen = torch.Generator().manual_seed(seed)
    std = config.hidden_size ** -0.5
    with torch.no_grad():
        for name, p in heads.named_parameters():
            p_std = std if name.startswith("projections") else std * scale
            p.copy_(torch.randn(p.shape, generator=gen) * p_std)
        if heads.draft_vocab is not None:  # a random subset of the vocabulary, in random order
            subset = torch.randperm(config.vocab_size, generator=gen)[:config.draft_vocab_size]
            heads.draft_vocab.copy_(subset)
    return heads.prepare_for_serving()
