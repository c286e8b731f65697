"""What cannot be exact is refused when the engine is made, with a message that says what to do, and
`medusa-serve` reports it in one line instead of a traceback."""

import dataclasses

import pytest
import transformers

from medusa.engine import Engine
from medusa.tree import get_tree
from runtime.config import ConfigError, ModelConfig
from runtime.llama import Llama
from server.cli import main
from tests.conftest import TINY, Vocab, ours_from_hf, tiny_hf_model
from tests.medusa.test_engine_speculative import heads_for
from tests.tiny_tokenizer import tiny_tokenizer


@pytest.fixture(scope="module")
def model():
    return ours_from_hf(tiny_hf_model("llama"))  # max_position_embeddings 256


def with_config(model, **changes):
    return Llama(dataclasses.replace(model.config, **changes))


def test_heads_without_a_tree_are_refused(model):
    with pytest.raises(ConfigError, match="without a tree: pass the tree of candidates"):
        Engine(model, Vocab(), (), max_total_tokens=64, heads=heads_for(model))
    Engine(model, Vocab(), (), max_total_tokens=64, heads=heads_for(model), tree=get_tree("chain"))


def test_more_tokens_than_the_model_has_positions_are_refused(model):
    with pytest.raises(ConfigError, match=r"max_total_tokens \(257\) exceeds the model's "
                                          r"max_position_embeddings \(256\): lower --max-total-tokens "
                                          r"to at most 256"):
        Engine(model, Vocab(), (), max_total_tokens=257)
    Engine(model, Vocab(), (), max_total_tokens=256)


def test_a_sliding_window_shorter_than_max_total_tokens_is_refused(model):
    windowed = with_config(model, sliding_window=32)
    with pytest.raises(ConfigError, match=r"sliding window of 32 tokens.*max_total_tokens \(64\).*"
                                          r"lower --max-total-tokens to at most 32"):
        Engine(windowed, Vocab(), (), max_total_tokens=64)
    Engine(windowed, Vocab(), (), max_total_tokens=32)  # every token within the window: exact


def test_a_mistral_checkpoint_with_a_window_is_refused():
    config = ModelConfig.from_hf(transformers.MistralConfig(**TINY, sliding_window=48).to_dict())
    with pytest.raises(ConfigError, match="sliding window of 48"):
        Engine(Llama(config), Vocab(), (), max_total_tokens=128)


def test_medusa_serve_exits_with_the_refusal_in_one_line(tmp_path):
    hf_config = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=112,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=256)
    transformers.LlamaForCausalLM(hf_config).save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(tmp_path), "--max-input-tokens", "100", "--max-total-tokens", "512",
              "--medusa-heads", "none"])
    assert exit_info.value.code == ("medusa-serve: max_total_tokens (512) exceeds the model's "
                                    "max_position_embeddings (256): lower --max-total-tokens to at most 256")
