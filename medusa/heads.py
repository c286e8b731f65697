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

Two on-disk formats, told apart by the files present:
- ours: `medusa_config.json` (a MedusaConfig) + `medusa_heads.safetensors` (this module's state dict);
- official Medusa: `medusa_lm_head.safetensors` or `medusa_lm_head.pt` (+ `config.json`), keys
  `{head}.{layer}.linear.weight|bias` for the blocks and `{head}.{num_layers}.weight` for the
  projection. Head and layer counts come from the weights: some published configs state them wrongly.

Legend: B batch, K Medusa heads, C hidden size, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from runtime.config import ConfigError, ModelConfig

# heads this project trained for its embedded default model (training.fit), shipped in the package
SHIPPED_HEADS = Path(__file__).resolve().parent / "weights" / "smollm2-135m-instruct"
OUR_CONFIG = "medusa_config.json"
OUR_WEIGHTS = "medusa_heads.safetensors"
OFFICIAL_CONFIG = "config.json"
OFFICIAL_SAFETENSORS = "medusa_lm_head.safetensors"
OFFICIAL_PT = "medusa_lm_head.pt"


class HeadsLoadError(Exception):
    """Medusa heads that cannot be loaded or do not fit the base model; the message says why."""


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


class ResBlock(nn.Module):
    """x + SiLU(W x + b). W and b start at zero, so a new block is the identity."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
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
            nn.Linear(C, V, bias=False) for _ in range(K))
        self.fuse = None
        if config.path_input:  # zero-initialised: a new head ignores the path at first
            self.fuse = nn.ModuleList(nn.Linear((k + 2) * C, C) for k in range(K))
            for linear in self.fuse:
                nn.init.zeros_(linear.weight)
                nn.init.zeros_(linear.bias)
        if config.draft_vocab_size:
            self.register_buffer("draft_vocab", torch.arange(config.draft_vocab_size))  # [V'] token ids
        else:
            self.draft_vocab = None
        self._serving = False  # set by prepare_for_serving / prepare_for_training only
        self._projection: tuple[torch.Tensor, torch.Tensor] | None = None  # (lm_head weight, draft copy)

    def prepare_for_serving(self) -> MedusaHeads:
        """Inference from now on: a shared projection scores through `_draft_projection`'s copy of the
        lm_head rows, with or without autograd enabled. Drafts only propose, so the output of a
        speculative step does not change, only its cost."""
        self._serving = True
        return self

    def prepare_for_training(self) -> MedusaHeads:
        """Autograd from now on: a shared projection multiplies by the lm_head rows themselves."""
        self._serving = False
        self._projection = None
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
            weight = self._draft_projection(lm_head.weight)
            return F.linear(states.to(weight.dtype), weight).float()  # [B, K, V']
        # gradients flow to the states through a fresh slice of the lm_head rows
        weight = lm_head.weight if self.draft_vocab is None else lm_head.weight[self.draft_vocab]
        return F.linear(states, weight.to(states.dtype)).float()  # [B, K, V']

    def token_ids(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices into the scored vocabulary (what `forward`'s logits index) -> token ids."""
        return indices if self.draft_vocab is None else self.draft_vocab[indices]

    def _draft_projection(self, lm_weight: torch.Tensor) -> torch.Tensor:
        """The rows of `lm_head` the heads score (copied once, if a draft vocabulary slices them), in
        bf16 where the CPU multiplies it fast. Measured here for 4 rows: the whole fp32 lm_head
        (49k words) 7.4 ms, a bf16 slice of 8k words 0.42 ms. Drafts only propose tokens, so their
        precision never changes the output.
        """
        if self._projection is None or self._projection[0] is not lm_weight:
            weight = lm_weight.detach()
            if self.draft_vocab is not None:
                weight = weight[self.draft_vocab]  # [V', C]
            if weight.device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported():
                weight = weight.to(torch.bfloat16)
            self._projection = (lm_weight, weight)
        return self._projection[1]


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


def save_heads(heads: MedusaHeads, folder: Path) -> None:
    """Write our format: folder/medusa_config.json + folder/medusa_heads.safetensors."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / OUR_CONFIG).write_text(json.dumps(dataclasses.asdict(heads.config), indent=2) + "\n")
    save_file({k: v.detach().contiguous().cpu() for k, v in heads.state_dict().items()}, folder / OUR_WEIGHTS)


def official_state_dict(heads: MedusaHeads, lm_head: nn.Linear | None = None) -> dict[str, torch.Tensor]:
    """The state dict in the official key layout. Shared heads need `lm_head`: the official format
    has a projection per head, so each gets a copy of it."""
    K, L = heads.config.num_heads, heads.config.num_layers
    if heads.config.path_input or heads.config.draft_vocab_size:
        raise ValueError("the official Medusa format has no place for path_input or a draft vocabulary")
    if heads.projections is None and lm_head is None:
        raise ValueError("these heads share the base lm_head; pass it to write the official format")
    out: dict[str, torch.Tensor] = {}
    for h in range(K):
        for layer in range(L):
            block = heads.blocks[h][layer]
            out[f"{h}.{layer}.linear.weight"] = block.linear.weight
            out[f"{h}.{layer}.linear.bias"] = block.linear.bias
        proj = lm_head if heads.projections is None else heads.projections[h]
        out[f"{h}.{L}.weight"] = proj.weight
    return {k: v.detach().contiguous().cpu().clone() for k, v in out.items()}


def save_official(heads: MedusaHeads, folder: Path, lm_head: nn.Linear | None = None,
                  base_model_name_or_path: str = "") -> None:
    """Write the official format (safetensors variant): config.json + medusa_lm_head.safetensors."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"medusa_num_heads": heads.config.num_heads, "medusa_num_layers": heads.config.num_layers,
              "base_model_name_or_path": base_model_name_or_path}
    (folder / OFFICIAL_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    save_file(official_state_dict(heads, lm_head), folder / OFFICIAL_SAFETENSORS)


def load_heads(path: Path, base_config: ModelConfig, base_lm_head: nn.Linear | None = None,
               device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> MedusaHeads:
    """Load heads from a folder in our format or the official one, checked against the base model,
    prepared for serving (`prepare_for_training` before training them further).

    With `base_lm_head`, official heads whose every projection equals it are loaded as sharing it.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise HeadsLoadError(f"Medusa heads path {str(folder)!r} is not a folder; give the folder that "
                             f"holds {OUR_WEIGHTS} (this server's format) or {OFFICIAL_SAFETENSORS} / "
                             f"{OFFICIAL_PT}")
    if (folder / OUR_WEIGHTS).is_file():
        config, state = _read_ours(folder)
        origin = ""
    elif (folder / OFFICIAL_SAFETENSORS).is_file() or (folder / OFFICIAL_PT).is_file():
        config, state, origin = _read_official(folder, base_lm_head)
    else:
        raise HeadsLoadError(f"no Medusa heads in {str(folder)!r}: expected {OUR_CONFIG} + {OUR_WEIGHTS} or "
                             f"{OFFICIAL_SAFETENSORS} / {OFFICIAL_PT} (+ {OFFICIAL_CONFIG})")
    trained_for = f" (trained for {origin})" if origin else ""
    if config.hidden_size != base_config.hidden_size:
        raise HeadsLoadError(f"heads{trained_for} have hidden size {config.hidden_size} but the base "
                             f"model has {base_config.hidden_size}; use heads trained for this base model")
    if config.vocab_size != base_config.vocab_size:
        raise HeadsLoadError(f"heads{trained_for} have vocabulary size {config.vocab_size} but the base "
                             f"model has {base_config.vocab_size}; use heads trained for this base model")
    heads = MedusaHeads(config)
    missing, unexpected = heads.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise HeadsLoadError(f"Medusa heads in {str(folder)!r} do not match their config: "
                             f"missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    return heads.to(device=device, dtype=dtype).eval().prepare_for_serving()


def _read_ours(folder: Path) -> tuple[MedusaConfig, dict[str, torch.Tensor]]:
    config_path = folder / OUR_CONFIG
    if not config_path.is_file():
        raise HeadsLoadError(f"{str(folder / OUR_WEIGHTS)!r} has no {OUR_CONFIG} next to it")
    try:
        config = MedusaConfig(**json.loads(config_path.read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise HeadsLoadError(f"{str(config_path)!r} is not a valid Medusa heads config: {e}") from e
    return config, load_file(folder / OUR_WEIGHTS)


_BLOCK_KEY = re.compile(r"(\d+)\.(\d+)\.linear\.(weight|bias)")
_PROJ_KEY = re.compile(r"(\d+)\.(\d+)\.weight")


def _read_official(folder: Path, base_lm_head: nn.Linear | None
                   ) -> tuple[MedusaConfig, dict[str, torch.Tensor], str]:
    """Official checkpoint -> (config inferred from the weights, our state dict, base model name)."""
    if (folder / OFFICIAL_SAFETENSORS).is_file():
        raw = load_file(folder / OFFICIAL_SAFETENSORS)
    else:
        pt = folder / OFFICIAL_PT
        try:
            raw = torch.load(pt, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise HeadsLoadError(f"{str(pt)!r} is not a plain tensor state dict: {e}") from e
        if not isinstance(raw, dict):
            raise HeadsLoadError(f"{str(pt)!r} holds a {type(raw).__name__}, not a state dict")
    origin = ""  # the base model named by config.json, for messages; its head count is not trusted
    if (folder / OFFICIAL_CONFIG).is_file():
        try:
            official = json.loads((folder / OFFICIAL_CONFIG).read_text())
        except json.JSONDecodeError as e:
            raise HeadsLoadError(f"{str(folder / OFFICIAL_CONFIG)!r} is not valid JSON: {e}") from e
        origin = str(official.get("base_model_name_or_path") or "") if isinstance(official, dict) else ""

    blocks: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    projs: dict[tuple[int, int], torch.Tensor] = {}
    for key, value in raw.items():
        if m := _BLOCK_KEY.fullmatch(key):
            blocks.setdefault((int(m[1]), int(m[2])), {})[m[3]] = value
        elif m := _PROJ_KEY.fullmatch(key):
            projs[(int(m[1]), int(m[2]))] = value
        else:
            raise HeadsLoadError(f"unexpected key {key!r} in the Medusa checkpoint in {str(folder)!r}")
    if not blocks:
        raise HeadsLoadError(f"the Medusa checkpoint in {str(folder)!r} has no residual blocks")
    K = max(h for h, _ in blocks) + 1
    L = max(layer for _, layer in blocks) + 1
    expected_blocks = {(h, layer) for h in range(K) for layer in range(L)}
    if set(blocks) != expected_blocks or any(set(b) != {"weight", "bias"} for b in blocks.values()):
        raise HeadsLoadError(f"the Medusa checkpoint in {str(folder)!r} is incomplete: every one of its {K} "
                             f"heads needs {L} blocks with a linear weight and bias")
    if set(projs) != {(h, L) for h in range(K)}:
        found = sorted(f"{h}.{x}.weight" for h, x in projs)
        raise HeadsLoadError(f"the Medusa checkpoint in {str(folder)!r} needs a projection "
                             f"'{{head}}.{L}.weight' for each of its {K} heads, found {found}")

    C = blocks[(0, 0)]["weight"].shape[1]
    V = projs[(0, L)].shape[0]
    for (h, layer), b in blocks.items():
        if b["weight"].shape != (C, C) or b["bias"].shape != (C,):
            raise HeadsLoadError(f"block {h}.{layer} in {str(folder)!r} has shape "
                                 f"{tuple(b['weight'].shape)}, expected ({C}, {C})")
    for (h, _), w in projs.items():
        if w.shape != (V, C):
            raise HeadsLoadError(f"projection of head {h} in {str(folder)!r} has shape {tuple(w.shape)}, "
                                 f"expected ({V}, {C})")

    shared = base_lm_head is not None and all(
        w.shape == base_lm_head.weight.shape
        and torch.equal(w.to(base_lm_head.weight.dtype), base_lm_head.weight.detach().cpu())
        for w in projs.values())
    state = {f"blocks.{h}.{layer}.linear.{p}": t for (h, layer), b in blocks.items() for p, t in b.items()}
    if not shared:
        state |= {f"projections.{h}.weight": w for (h, _), w in projs.items()}
    config = MedusaConfig(hidden_size=C, vocab_size=V, num_heads=K, num_layers=L, shared_lm_head=shared)
    return config, state, origin
