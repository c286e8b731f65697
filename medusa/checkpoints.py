"""Drafters on disk: Medusa heads and draft layers, in our folder formats and the official ones,
read and written here.

Four on-disk formats, told apart by the files present:
- ours, heads: `medusa_config.json` (a MedusaConfig) + `medusa_heads.safetensors` (MedusaHeads' state dict);
- official Medusa: `medusa_lm_head.safetensors` or `medusa_lm_head.pt` (+ `config.json`), keys
  `{head}.{layer}.linear.weight|bias` for the blocks and `{head}.{num_layers}.weight` for the
  projection. Head and layer counts come from the weights: some published configs state them wrongly.
- ours, draft layer: `eagle_config.json` (an EagleConfig) + `eagle.safetensors`;
- official EAGLE-1/2 (SafeAILab/EAGLE, Llama-family bases): `config.json` (a Llama config of one
  layer) + `model.safetensors` or `pytorch_model.bin`, keys `fc.weight|bias` (over [embedding;
  feature], the reverse of ours), `layers.0.self_attn.{q,k,v,o}_proj.weight`,
  `layers.0.post_attention_layernorm.weight`, `layers.0.mlp.{gate,up,down}_proj.weight`, and no
  norm before attention (`EagleConfig.attn_norm` False) unless `layers.0.input_layernorm.weight`.

Either may be named by a hub id, `org/name` or `org/name@revision` (`runtime.hub`; a local folder of that
name wins), e.g. an official FasterDecoding heads repository next to its base model's id: only the heads'
files are fetched, the `.pt` only when the repository has no `.safetensors`.

The loaded heads come back prepared for serving; `SHIPPED_HEADS` are the project's own, for the
embedded SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from medusa.eagle import EagleConfig, EagleDrafter
from medusa.heads import MedusaConfig, MedusaHeads
from runtime.config import ModelConfig
from runtime.hub import HubError, HubId, hub_id, snapshot
from runtime.llama import NEVER, Linear

SHIPPED_HEADS = Path(__file__).resolve().parent / "weights" / "smollm2-135m-instruct"
SHIPPED_EAGLE = Path(__file__).resolve().parent / "weights" / "smollm2-135m-instruct-eagle"
# the same layer trained on the bf16 model's hidden states, for serving in bf16 (its model card)
SHIPPED_EAGLE_BF16 = SHIPPED_EAGLE.with_name("smollm2-135m-instruct-eagle-bf16")
EAGLE_CONFIG = "eagle_config.json"
EAGLE_WEIGHTS = "eagle.safetensors"
OUR_CONFIG = "medusa_config.json"
OUR_WEIGHTS = "medusa_heads.safetensors"
OFFICIAL_CONFIG = "config.json"
OFFICIAL_SAFETENSORS = "medusa_lm_head.safetensors"
OFFICIAL_PT = "medusa_lm_head.pt"
OFFICIAL_EAGLE_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def shipped_drafter(kind: str, dtype: str) -> Path:
    """The project's drafter of `kind` ("heads" or "eagle") for the embedded model served in `dtype`:
    a draft layer fits the hidden states it was trained on, and bf16's differ from float32's enough to
    matter (40 dev prompts, bf16, the two layers taking turns: 2.533 against 2.478 tokens a step; in
    float32 the bf16 one accepts less, 3.128 against 3.22 with issue 18's 64-node tree). The heads
    are one set for both: theirs moved by under 1% either way."""
    if kind == "heads":
        return SHIPPED_HEADS
    return SHIPPED_EAGLE_BF16 if dtype == "bfloat16" and SHIPPED_EAGLE_BF16.is_dir() else SHIPPED_EAGLE


class HeadsLoadError(Exception):
    """Medusa heads that cannot be loaded or do not fit the base model; the message says why."""


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


def save_eagle(drafter: EagleDrafter, folder: Path) -> None:
    """Write a draft layer: folder/eagle_config.json + folder/eagle.safetensors."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / EAGLE_CONFIG).write_text(json.dumps(drafter.config.as_dict(), indent=2) + "\n")
    state = {k: v.detach().contiguous().cpu() for k, v in drafter.state_dict().items()}
    save_file(state, folder / EAGLE_WEIGHTS)


def official_eagle_state_dict(drafter: EagleDrafter) -> dict[str, torch.Tensor]:
    """A draft layer's state dict in the official EAGLE-1/2 key layout."""
    if drafter.config.draft_vocab_size:
        raise ValueError("the official EAGLE-1/2 format has no place for a draft vocabulary")
    C, H, Hkv, D = (drafter.config.hidden_size, drafter.config.num_attention_heads,
                    drafter.config.num_kv_heads, drafter.config.head_dim)
    fc = drafter.fc.weight
    q, k, v = drafter.qkv.weight.split([H * D, Hkv * D, Hkv * D])
    gate, up = drafter.gate_up.weight.chunk(2)
    out = {"fc.weight": torch.cat([fc[:, C:], fc[:, :C]], dim=1), "fc.bias": drafter.fc.bias,
           "layers.0.self_attn.q_proj.weight": q, "layers.0.self_attn.k_proj.weight": k,
           "layers.0.self_attn.v_proj.weight": v, "layers.0.self_attn.o_proj.weight": drafter.o.weight,
           "layers.0.post_attention_layernorm.weight": drafter.mlp_norm.weight,
           "layers.0.mlp.gate_proj.weight": gate, "layers.0.mlp.up_proj.weight": up,
           "layers.0.mlp.down_proj.weight": drafter.down.weight}
    if drafter.config.attn_norm:
        out["layers.0.input_layernorm.weight"] = drafter.attn_norm.weight
    return {k: v.detach().contiguous().cpu().clone() for k, v in out.items()}


def save_official_eagle(drafter: EagleDrafter, folder: Path) -> None:
    """Write the official EAGLE-1/2 format: config.json + model.safetensors."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    c = drafter.config
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": c.hidden_size,
              "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_kv_heads,
              "intermediate_size": c.intermediate_size, "rms_norm_eps": c.rms_norm_eps,
              "rope_theta": c.rope_theta, "vocab_size": c.vocab_size, "num_hidden_layers": 1,
              "hidden_act": "silu", "bias": True}
    (folder / OFFICIAL_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    save_file(official_eagle_state_dict(drafter), folder / OFFICIAL_EAGLE_WEIGHTS[0])


def is_official_eagle(folder: Path) -> bool:
    """An official EAGLE checkpoint: a Llama config beside model weights (official Medusa heads
    name theirs medusa_lm_head.*)."""
    weights = any((folder / f).is_file() for f in OFFICIAL_EAGLE_WEIGHTS)
    return (folder / OFFICIAL_CONFIG).is_file() and weights


def load_drafter(path: str | Path, base_config: ModelConfig, base_lm_head: nn.Linear | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
                 ) -> MedusaHeads | EagleDrafter:
    """A draft layer where the folder holds eagle_config.json (ours) or an official EAGLE-1/2
    checkpoint, else Medusa heads (`load_heads`). A hub id is resolved first (`resolve_heads`)."""
    folder = resolve_heads(path)
    if (folder / EAGLE_CONFIG).is_file():
        try:
            config = EagleConfig(**json.loads((folder / EAGLE_CONFIG).read_text()))
        except (json.JSONDecodeError, TypeError, ValueError) as e:
            raise HeadsLoadError(f"{str(folder / EAGLE_CONFIG)!r} is not a valid draft layer config: "
                                 f"{e}") from e
        state = load_file(folder / EAGLE_WEIGHTS)
    elif is_official_eagle(folder):
        config, state = _read_official_eagle(folder)
    else:
        return load_heads(folder, base_config, base_lm_head, device, dtype)
    if (config.hidden_size, config.vocab_size) != (base_config.hidden_size, base_config.vocab_size):
        raise HeadsLoadError(f"the draft layer in {str(folder)!r} has hidden size {config.hidden_size} and "
                             f"vocabulary {config.vocab_size}, the base model {base_config.hidden_size} and "
                             f"{base_config.vocab_size}; use a draft layer trained for this base model")
    drafter = EagleDrafter(config)
    missing, unexpected = drafter.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise HeadsLoadError(f"the draft layer in {str(folder)!r} does not match its config: "
                             f"missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    drafter = scored_on(drafter.to(device=device, dtype=dtype).eval(), device)
    return drafter.prepare_for_serving(*_matmul_choice(base_lm_head))


# On the CPU a drafter scores only the first 2048 tokens of its draft vocabulary, which training lists
# most frequent first (`training.fit.draft_vocabulary`): each tree level's projection reads a quarter
# of the lm_head rows. Drafts only propose, so the output stays; fewer of them are right. SmolLM2 with
# the shipped drafters and their CPU trees, AMD EPYC (Zen 5), 20 dev prompts, engines taking turns,
# 8192 / 4096 / 2048 tokens: bf16 heads 233.7 / 239.0 / 242.9 tok/s (2.312 / 2.297 / 2.274 tokens a
# step), bf16 layer 191.0 / 195.9 / 197.8 (2.617 / 2.605 / 2.550); fp32 heads 8192 / 2048: 116.1 / 119.4;
# 1024 was no faster than 2048. A GPU scores them all: there the rows cost next to nothing.
CPU_SCORED_VOCAB = 2048


def scored_on(drafter: MedusaHeads | EagleDrafter, device: torch.device | str) -> MedusaHeads | EagleDrafter:
    """The drafter, scoring on `device` what `CPU_SCORED_VOCAB` says (before it is prepared for serving,
    which copies the scored rows of the lm_head)."""
    n = CPU_SCORED_VOCAB
    if torch.device(device).type != "cpu" or not 0 < n < drafter.config.draft_vocab_size:
        return drafter
    drafter.draft_vocab = drafter.draft_vocab[:n].clone()
    drafter.config = dataclasses.replace(drafter.config, draft_vocab_size=n)
    return drafter


def _matmul_choice(base_lm_head: nn.Linear | None) -> tuple[int, int]:
    """(packed_from_rows, own_kernel_rows) for a drafter's products: the base model's, measured at its
    load (`runtime.llama.measure_matmul`), in either dtype (a bf16 copy of a float32 projection
    multiplies as `medusa.heads.scored_projection` says). In bf16 our kernel up to the base model's
    rows, not one: the heads' drafting (`dynamic-cpu-bf16`, a tree's forward between drafts, as in a
    step), AMD EPYC (Zen 5), 2.43 -> 2.07 ms, the same drafts. In float32 the drafters went through MKL
    until this was measured on an AVX2 CPU (AMD EPYC, Zen 3), 10 dev prompts, the two ways taking
    turns, the same outputs: heads 37.99 -> 39.13 and 41.34 -> 42.92 tok/s, the draft layer 37.18 ->
    38.06. On the AMX Xeon the draft layer's float32 products had been as fast either way (10.24 ms a
    step through oneDNN from 4 rows, 10.06 through MKL)."""
    if not isinstance(base_lm_head, Linear):
        return NEVER, 0
    return base_lm_head.packed_from_rows, base_lm_head.own_kernel_rows


def resolve_heads(spec: str | Path) -> Path:
    """The folder of the drafter `spec` names: itself, or for a hub id the snapshot of the files of any
    of the four formats (a pickled .pt / .bin only where the repository has no safetensors)."""
    repo = hub_id(spec)
    if repo is None:
        return Path(spec)
    what = "Medusa heads or draft layer"
    safe = [OUR_WEIGHTS, OFFICIAL_SAFETENSORS, EAGLE_WEIGHTS, OFFICIAL_EAGLE_WEIGHTS[0]]
    try:
        folder = snapshot(repo, [OUR_CONFIG, OFFICIAL_CONFIG, EAGLE_CONFIG, *safe], what)
        if not any((folder / name).is_file() for name in safe):
            # from the very commit the first files came from (its folder's name)
            pickled = [OFFICIAL_PT, OFFICIAL_EAGLE_WEIGHTS[1]]
            folder = snapshot(HubId(repo.repo_id, folder.name), pickled, what)
    except HubError as err:
        raise HeadsLoadError(str(err)) from err
    return folder


def load_heads(path: str | Path, base_config: ModelConfig, base_lm_head: nn.Linear | None = None,
               device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> MedusaHeads:
    """Load heads from a folder (or hub id: `resolve_heads`) in our format or the official one, checked
    against the base model, prepared for serving (`prepare_for_training` before training them further).

    With `base_lm_head`, official heads whose every projection equals it are loaded as sharing it.
    """
    folder = resolve_heads(path)
    if not folder.is_dir():
        raise HeadsLoadError(f"Medusa heads path {str(folder)!r} is not a folder; give the folder that "
                             f"holds {OUR_WEIGHTS} (this server's format) or {OFFICIAL_SAFETENSORS} / "
                             f"{OFFICIAL_PT}, or a hub id org/name[@revision] of such a repository")
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
    heads = scored_on(heads.to(device=device, dtype=dtype).eval(), device)
    return heads.prepare_for_serving(*_matmul_choice(base_lm_head))


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


_EAGLE_LAYER = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                "o": "self_attn.o_proj", "mlp_norm": "post_attention_layernorm", "gate": "mlp.gate_proj",
                "up": "mlp.up_proj", "down": "mlp.down_proj"}


def _read_official_eagle(folder: Path) -> tuple[EagleConfig, dict[str, torch.Tensor]]:
    """Official EAGLE-1/2 checkpoint -> (our config, our state dict)."""
    try:
        official = json.loads((folder / OFFICIAL_CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise HeadsLoadError(f"{str(folder / OFFICIAL_CONFIG)!r} is not valid JSON: {e}") from e
    where = f"the EAGLE checkpoint in {str(folder)!r}"
    if not isinstance(official, dict) or official.get("num_hidden_layers", 1) != 1:
        raise HeadsLoadError(f"{where}: config.json must describe one decoder layer (num_hidden_layers 1)")
    if official.get("rope_scaling") or official.get("attention_bias") or official.get("mlp_bias"):
        raise HeadsLoadError(f"{where} uses rope_scaling or biases in its layer, which this server's draft "
                             "layer does not have; use an EAGLE-1/2 checkpoint of a plain Llama-shaped layer")
    weights = next(folder / f for f in OFFICIAL_EAGLE_WEIGHTS if (folder / f).is_file())
    try:
        raw = load_file(weights) if weights.suffix == ".safetensors" else torch.load(
            weights, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise HeadsLoadError(f"{str(weights)!r} is not a plain tensor state dict: {e}") from e
    attn_norm = "layers.0.input_layernorm.weight" in raw
    expected = {"fc.weight", *(f"layers.0.{name}.weight" for name in _EAGLE_LAYER.values())}
    known = expected | {"fc.bias", "layers.0.input_layernorm.weight", "embed_tokens.weight"}
    if not expected <= set(raw) or not set(raw) <= known:
        raise HeadsLoadError(f"{where} is not an EAGLE-1/2 layer: missing {sorted(expected - set(raw))}, "
                             f"unexpected {sorted(set(raw) - known)}")
    try:
        heads = official["num_attention_heads"]
        config = EagleConfig(hidden_size=official["hidden_size"], vocab_size=official["vocab_size"],
                             num_attention_heads=heads,
                             num_kv_heads=official.get("num_key_value_heads", heads),
                             intermediate_size=official["intermediate_size"],
                             rms_norm_eps=official.get("rms_norm_eps", 1e-6),
                             rope_theta=official.get("rope_theta", 10000.0), attn_norm=attn_norm)
    except (KeyError, TypeError, ValueError) as e:
        raise HeadsLoadError(f"{where}: config.json lacks or mis-states a Llama shape: {e}") from e
    layer = {ours: raw[f"layers.0.{theirs}.weight"] for ours, theirs in _EAGLE_LAYER.items()}
    C = config.hidden_size
    fc = raw["fc.weight"]  # [C, 2C] over [embedding; feature]
    state = {"fc.weight": torch.cat([fc[:, C:], fc[:, :C]], dim=1),
             "fc.bias": raw.get("fc.bias", torch.zeros(C, dtype=fc.dtype)),
             "qkv.weight": torch.cat([layer["q"], layer["k"], layer["v"]]), "o.weight": layer["o"],
             "mlp_norm.weight": layer["mlp_norm"], "gate_up.weight": torch.cat([layer["gate"], layer["up"]]),
             "down.weight": layer["down"]}
    if attn_norm:
        state["attn_norm.weight"] = raw["layers.0.input_layernorm.weight"]
    return config, state
