"""Typed configuration: a Hugging Face config is read right for each family, and what the server
cannot use (an architecture, a RoPE type, head counts, a sampling value) fails where it is made,
with a message that names it."""

import math

import pytest

from runtime.config import ConfigError, ModelConfig, RopeScaling, SamplingParams
from tests.conftest import FAMILIES

# per family: the fields that differ from a plain Llama
EXPECTED = {
    "llama": {},
    "llama3-rope": {"rope_theta": 500000.0,
                    "rope_scaling": RopeScaling("llama3", factor=8.0, low_freq_factor=1.0,
                                                high_freq_factor=4.0, original_max_position_embeddings=64)},
    "smollm": {"tie_word_embeddings": True},
    "mistral": {"architecture": "MistralForCausalLM"},
    "qwen2": {"architecture": "Qwen2ForCausalLM", "qkv_bias": True, "tie_word_embeddings": True},
}


def hf_dict(family="llama", **changes):
    return FAMILIES[family]().to_dict() | changes


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_is_read_right(family):
    plain_llama = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=112, num_layers=2, num_heads=4,
                              num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6, max_position_embeddings=256)
    assert ModelConfig.from_hf(hf_dict(family)) == ModelConfig(**vars(plain_llama) | EXPECTED[family])


@pytest.mark.parametrize("family, changes, expected", [
    ("mistral", {"sliding_window": None}, None),  # Mistral v0.2 and later
    ("mistral", {"sliding_window": 4096}, 4096),  # Mistral v0.1
    ("mistral", {"sliding_window": 4096, "use_sliding_window": False}, 4096),  # transformers ignores it
    ("qwen2", {"sliding_window": 32}, None),  # Qwen2's window is off unless use_sliding_window
    ("qwen2", {"sliding_window": 32, "use_sliding_window": True}, 32),
    ("llama", {"sliding_window": 32, "use_sliding_window": True}, None),  # Llama has no window
])
def test_a_sliding_window_is_read_only_where_transformers_applies_it(family, changes, expected):
    assert ModelConfig.from_hf(hf_dict(family, **changes)).sliding_window == expected


def test_llama_attention_bias_biases_qkv_and_output():
    config = ModelConfig.from_hf(hf_dict(attention_bias=True, mlp_bias=True))
    assert (config.qkv_bias, config.o_bias, config.mlp_bias) == (True, True, True)


@pytest.mark.parametrize("rope, expected", [
    ({"type": "linear", "factor": 2.0}, RopeScaling("linear", 2.0)),  # the older key
    ({"rope_type": "default"}, RopeScaling()),
    (None, RopeScaling()),
])
def test_rope_scaling_kinds(rope, expected):
    assert ModelConfig.from_hf(hf_dict(rope_scaling=rope)).rope_scaling == expected


def test_the_architecture_comes_from_the_model_type_when_not_listed():
    assert ModelConfig.from_hf(hf_dict("qwen2", architectures=None)).architecture == "Qwen2ForCausalLM"
    assert ModelConfig.from_hf(hf_dict("qwen2", architectures=["Qwen2ForCausalLM"])).qkv_bias


@pytest.mark.parametrize("changes, named", [
    ({"architectures": ["GPT2LMHeadModel"]}, "'GPT2LMHeadModel' is not supported"),
    ({"architectures": None, "model_type": "gemma"}, "'gemma' is not supported"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling type 'yarn' is not supported"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling type 'dynamic' is not supported"),
    ({"num_attention_heads": 4, "num_key_value_heads": 3}, r"num_heads \(4\) must be a multiple of "
                                                           r"num_kv_heads \(3\)"),
    ({"num_attention_heads": 5, "head_dim": None}, r"hidden_size \(64\) must be a multiple of "
                                                   r"num_attention_heads \(5\)"),
    ({"num_attention_heads": 0, "head_dim": None}, r"num_attention_heads \(0\)"),
    ({"num_attention_heads": 0, "head_dim": 16}, r"num_heads \(0\).* must be at least 1"),
])
def test_what_cannot_be_served_is_refused_by_name(changes, named):
    with pytest.raises(ConfigError, match=named):
        ModelConfig.from_hf(hf_dict(**changes))


def test_model_config_refuses_an_unsupported_architecture_when_built_directly():
    with pytest.raises(ConfigError, match="'GPT2LMHeadModel'.*LlamaForCausalLM"):
        ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=1,
                    num_kv_heads=1, head_dim=8, architecture="GPT2LMHeadModel")


@pytest.mark.parametrize("changes, named", [
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": math.nan}, "temperature"),
    ({"temperature": math.inf}, "temperature"),
    ({"top_k": -1}, "top_k"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_p": math.nan}, "top_p"),
    ({"typical_p": 0.0}, "typical_p"),
    ({"typical_p": 1.01}, "typical_p"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": math.nan}, "repetition_penalty"),
    ({"repetition_penalty": math.inf}, "repetition_penalty"),
    ({"acceptance": "greedy"}, "acceptance"),
    ({"typical_epsilon": -0.1}, "typical_epsilon"),
    ({"typical_epsilon": 1.5}, "typical_epsilon"),
    ({"typical_delta": -1.0}, "typical_delta"),
    ({"typical_delta": math.nan}, "typical_delta"),
    ({"stop": ("end", "")}, "stop"),
])
def test_each_bad_sampling_value_is_refused_by_name(changes, named):
    with pytest.raises(ConfigError, match=named):
        SamplingParams(**changes)


def test_temperature_zero_is_greedy_and_accepts_greedily_whatever_was_asked():
    for acceptance in ("auto", "lossless", "typical"):
        params = SamplingParams(acceptance=acceptance)
        assert params.greedy and params.acceptance_mode == "greedy"


@pytest.mark.parametrize("acceptance, mode", [("auto", "lossless"), ("lossless", "lossless"),
                                              ("typical", "typical")])
def test_sampling_accepts_losslessly_unless_typical_is_asked_for(acceptance, mode):
    params = SamplingParams(temperature=0.7, acceptance=acceptance)
    assert not params.greedy and params.acceptance_mode == mode
