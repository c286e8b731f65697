"""Shared fixtures: tiny random models of each supported family, built in memory."""

from __future__ import annotations

import os

# Triton kernels run under Triton's interpreter in the tests. The interpreter is chosen when a kernel
# is decorated, so this is set before anything imports torch (or Triton through it), whatever test
# module pytest collects first.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from runtime.config import ModelConfig  # noqa: E402
from runtime.llama import Llama, from_hf_state_dict  # noqa: E402
from runtime.loading import LoadedModel, load_model  # noqa: E402

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)

FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(**TINY, tie_word_embeddings=False),
    "llama3-rope": lambda: transformers.LlamaConfig(
        **TINY, rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                   "original_max_position_embeddings": 64}),
    "smollm": lambda: transformers.LlamaConfig(**TINY, tie_word_embeddings=True),
    "mistral": lambda: transformers.MistralConfig(**TINY, sliding_window=None),
    "qwen2": lambda: transformers.Qwen2Config(**TINY, tie_word_embeddings=True),
}


class Vocab:
    """Decodes token id i as the letter chr(97 + i % 26): enough to test stop strings."""

    def decode(self, ids):
        return "".join(chr(97 + i % 26) for i in ids)


def tiny_hf_model(family: str, seed: int = 0) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    hf_config = FAMILIES[family]()
    model = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager")
    with torch.no_grad():  # random biases, so that Qwen2's QKV bias is really exercised
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def ours_from_hf(hf_model: transformers.PreTrainedModel) -> Llama:
    config = ModelConfig.from_hf(hf_model.config.to_dict())
    model = Llama(config)
    model.load_state_dict(from_hf_state_dict(config, hf_model.state_dict()), strict=False)
    return model.eval()


class GraphRecorder:
    """A torch.compile backend that keeps each graph it is given and runs it as traced (nothing is
    built): `graphs` says how many graphs a function compiled into, and what they call."""

    def __init__(self) -> None:
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs) -> object:
        self.graphs.append(gm)
        return gm.forward


@pytest.fixture(scope="session")
def tiny_llama() -> Llama:
    return ours_from_hf(tiny_hf_model("smollm"))


@pytest.fixture(scope="session")
def real_model() -> LoadedModel:
    """SmolLM2-135M-Instruct on the CPU in float32 (converted into the cache by `make model`)."""
    return load_model(device="cpu", dtype="float32")
