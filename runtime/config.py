"""Typed configuration: the base model's shape and a request's sampling parameters.

Every default is written once, here. Objects are frozen and validated on construction, so a
bad value fails where it is made, with a message that names it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


class ConfigError(ValueError):
    """A model or request configuration that this server cannot use; the message says why."""


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling: 'default' (none), 'linear' or 'llama3' (Llama 3.1 style)."""

    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.kind not in ("default", "linear", "llama3"):
            raise ConfigError(
                f"rope_scaling type {self.kind!r} is not supported (supported: default, linear, llama3)"
            )


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama-family decoder (Llama, Mistral, Qwen2, SmolLM)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 (and Llama with attention_bias) add a bias to q, k, v
    o_bias: bool = False  # Llama with attention_bias also biases the output projection
    mlp_bias: bool = False
    sliding_window: int | None = None  # Mistral; attention is exact only within this window
    architecture: str = "LlamaForCausalLM"

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"architecture {self.architecture!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        if self.num_heads < 1 or self.num_kv_heads < 1:
            raise ConfigError(
                f"num_heads ({self.num_heads}) and num_kv_heads ({self.num_kv_heads}) must be at least 1"
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face `config.json` dictionary."""
        architectures = hf.get("architectures") or [_ARCH_BY_MODEL_TYPE.get(hf.get("model_type", ""), "")]
        architecture = architectures[0]
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"architecture {architecture or hf.get('model_type')!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        num_heads = hf["num_attention_heads"]
        if not hf.get("head_dim") and (num_heads < 1 or hf["hidden_size"] % num_heads):
            raise ConfigError(f"hidden_size ({hf['hidden_size']}) must be a multiple of num_attention_heads "
                              f"({num_heads}) when the config gives no head_dim")
        rope = hf.get("rope_scaling") or {}
        rope_kind = rope.get("rope_type", rope.get("type", "default"))
        scaling = RopeScaling(
            kind=rope_kind,
            factor=float(rope.get("factor", 1.0)),
            low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(rope.get("original_max_position_embeddings", 8192)),
        )
        attention_bias = bool(hf.get("attention_bias", False))
        is_qwen2 = architecture == "Qwen2ForCausalLM"
        # Mistral always applies its window (transformers ignores use_sliding_window there); Qwen2 only
        # when use_sliding_window is on, and then, counted conservatively, on every layer
        use_window = architecture == "MistralForCausalLM" or (is_qwen2 and hf.get("use_sliding_window"))
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            rope_theta=float(hf.get("rope_theta", 10000.0)),
            rope_scaling=scaling,
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=is_qwen2 or attention_bias,
            o_bias=attention_bias and not is_qwen2,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            sliding_window=hf.get("sliding_window") if use_window else None,
            architecture=architecture,
        )


_ARCH_BY_MODEL_TYPE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}


MAX_TOP_N = 20  # alternatives a token may report (OpenAI's most for top_logprobs)
MAX_ADDED_PENALTY = 2.0  # frequency and presence penalties lie in [-2, 2], as OpenAI's
MAX_LOGIT_BIAS = 300  # tokens one request may bias (OpenAI's limit)
MAX_BIAS = 100.0  # a bias lies in [-100, 100], as OpenAI's
MAX_STOP_TOKENS = 64  # stop_token_ids of one request


@dataclass(frozen=True)
class SamplingParams:
    """How one request turns logits into tokens, and when it stops.

    temperature == 0 (or do_sample False with no sampling knob set) means greedy decoding.
    Acceptance of speculated tokens: 'greedy' when not sampling; when sampling, 'lossless'
    (tree speculative sampling, keeps the model's distribution) unless 'typical' is asked for.
    """

    max_new_tokens: int = 20
    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    typical_p: float = 1.0  # 1.0 = off
    repetition_penalty: float = 1.0  # 1.0 = off; over the whole text, prompt included
    # OpenAI's: each logit less frequency_penalty x the token's count in the generated text, and
    # presence_penalty if it is there at all (the prompt does not count); 0 = off
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    # (token, bias) pairs, each bias added to its token's logit after the penalties (OpenAI's logit_bias)
    logit_bias: tuple[tuple[int, float], ...] = ()
    # llguidance's grammar text (runtime.grammar.compile_grammar): only tokens it allows are generated,
    # speculating on the tokens it forces and the prompt-lookup guesses it allows (`Engine._row`)
    grammar: str | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()  # tokens that end the text as EOS does, kept in it (vLLM's)
    # a predicted output's tokens (OpenAI's Predicted Outputs), which the lookup branch drafts from
    prediction: tuple[int, ...] = ()
    # EOS tokens and stop_token_ids are banned (their logits -inf) until this many tokens are generated
    # (vLLM's min_tokens); a step keeps no draft whose next token would come after it
    min_tokens: int = 0
    acceptance: str = "auto"  # 'auto' | 'lossless' | 'typical'
    typical_epsilon: float = 0.09
    typical_delta: float = 0.3
    speculate: bool = True
    top_n: int = 0  # the most likely tokens, with their logprobs, reported beside each token (<= MAX_TOP_N)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError("max_new_tokens must be at least 1")
        if not 0 <= self.min_tokens <= self.max_new_tokens:
            raise ConfigError("min_tokens must be in [0, max_new_tokens]")
        if not 0 <= self.temperature < math.inf:
            raise ConfigError("temperature must be a finite number >= 0")
        if self.top_k < 0:
            raise ConfigError("top_k must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ConfigError("top_p must be in (0, 1]")
        if not 0 < self.typical_p <= 1:
            raise ConfigError("typical_p must be in (0, 1]")
        if not 0 < self.repetition_penalty < math.inf:
            raise ConfigError("repetition_penalty must be a finite number > 0")
        if not all(-MAX_ADDED_PENALTY <= x <= MAX_ADDED_PENALTY for x in (self.frequency_penalty,
                                                                        self.presence_penalty)):
            raise ConfigError(f"frequency_penalty and presence_penalty must be in [-{MAX_ADDED_PENALTY}, "
                              f"{MAX_ADDED_PENALTY}]")
        if self.acceptance not in ("auto", "lossless", "typical"):
            raise ConfigError("acceptance must be 'auto', 'lossless' or 'typical'")
        if not 0 <= self.typical_epsilon <= 1 or not 0 <= self.typical_delta < math.inf:
            raise ConfigError("typical_epsilon must be in [0, 1] and typical_delta a finite number >= 0")
        tokens = [t for t, _ in self.logit_bias]
        if len(tokens) > MAX_LOGIT_BIAS or len(set(tokens)) < len(tokens):
            raise ConfigError(f"logit_bias must name at most {MAX_LOGIT_BIAS} tokens, each once")
        if not all(t >= 0 and -MAX_BIAS <= b <= MAX_BIAS for t, b in self.logit_bias):
            raise ConfigError(f"logit_bias must map token ids >= 0 to biases in [-{MAX_BIAS:g}, "
                              f"{MAX_BIAS:g}]")
        if len(self.stop_token_ids) > MAX_STOP_TOKENS or not all(t >= 0 for t in self.stop_token_ids):
            raise ConfigError(f"stop_token_ids must be at most {MAX_STOP_TOKENS} token ids >= 0")
        if not 0 <= self.top_n <= MAX_TOP_N:
            raise ConfigError(f"top_n must be in [0, {MAX_TOP_N}]")
        if not all(self.stop):
            raise ConfigError("stop sequences must not be empty (an empty one would stop at once)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def acceptance_mode(self) -> str:
        """'greedy', 'lossless' or 'typical': the rule that accepts speculated tokens."""
        if self.greedy:
            return "greedy"
        return "typical" if self.acceptance == "typical" else "lossless"
