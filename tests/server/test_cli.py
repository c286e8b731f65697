"""`medusa-serve` settings: flags over HOST/PORT over the defaults, and clear errors."""

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
import transformers

from server.app import build_engine
from server.cli import main, settings_from
from server.settings import Settings
from tests.server.support import tiny_loaded, wait_until
from tests.tiny_tokenizer import tiny_tokenizer


def test_defaults_bind_to_loopback():
    settings = settings_from([], {})
    assert settings == Settings()
    assert (settings.host, settings.port) == ("127.0.0.1", 8000)


def test_environment_overrides_defaults_and_flags_override_environment():
    environ = {"HOST": "0.0.0.0", "PORT": "9001"}
    assert (settings_from([], environ).host, settings_from([], environ).port) == ("0.0.0.0", 9001)
    settings = settings_from(["--port", "9002", "--max-batch-size", "2", "--dtype", "bfloat16"], environ)
    assert (settings.host, settings.port) == ("0.0.0.0", 9002)
    assert (settings.max_batch_size, settings.dtype) == (2, "bfloat16")


@pytest.mark.parametrize("argv, named", [
    (["--max-input-tokens", "4096", "--max-total-tokens", "2048"], "max_input_tokens"),
    (["--dtype", "float8"], "dtype"),
    (["--compile", "yes"], "compile"),
    (["--port", "70000"], "port"),
])
def test_bad_settings_are_usage_errors_naming_the_setting(argv, named, capsys):
    with pytest.raises(SystemExit) as exit_info:
        settings_from(argv, {})
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err


def test_a_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(tmp_path / "nowhere")])
    assert "nowhere" in str(exit_info.value.code)


def test_sigterm_drains_a_real_server_process(tmp_path):
    """`medusa-serve` in its own process: on SIGTERM, a stream in flight still ends whole."""
    torch.manual_seed(0)  # weights whose greedy answer to "Hello" runs to max_new_tokens
    hf_config = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=112,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    transformers.LlamaForCausalLM(hf_config).save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "server.cli", "--model", str(tmp_path), "--port", str(port),
               "--max-total-tokens", "1100"]
    process = subprocess.Popen(command, cwd=Path(__file__).resolve().parents[2])
    try:
        wait_until(lambda: healthy(url), timeout=120)
        body = {"inputs": "Hello", "parameters": {"max_new_tokens": 1000, "details": True}}
        with httpx.stream("POST", url + "/generate_stream", json=body, timeout=60) as response:
            lines = response.iter_lines()
            next(lines)
            process.send_signal(signal.SIGTERM)
            events = [json.loads(line.removeprefix("data:")) for line in lines if line]
        assert events[-1]["details"]["generated_tokens"] == len(events) + 1  # the first event was read above
        assert process.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once drained
    finally:
        process.kill()
        process.wait()


def healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health").status_code == 200
    except httpx.HTTPError:
        return False


def test_speculation_backs_off_in_big_cpu_batches_unless_told():
    assert settings_from([], {}).speculative_batch_limit == 3  # CPU default: the measured crossover
    assert settings_from(["--device", "cuda"], {}).speculative_batch_limit is None
    assert settings_from(["--max-speculative-batch", "8"], {}).speculative_batch_limit == 8


@pytest.mark.parametrize("model, embedded", [([], True), (["--model", "smollm2"], True),
                                             (["--model", "/models/other"], False)])
def test_the_embedded_model_gets_the_shipped_heads_and_the_chat_template(model, embedded):
    settings = settings_from(model, {})
    assert settings.embedded is embedded
    assert (settings.heads_path is not None, settings.use_chat_template) == (embedded, embedded)
    assert settings_from([*model, "--chat-template", "on", "--medusa-heads", "none"], {}).use_chat_template
    assert settings_from([*model, "--medusa-heads", "none"], {}).heads_path is None


def test_the_default_tree_is_the_one_shipped_for_the_device():
    assert settings_from([], {}).tree_name == "cpu"
    assert settings_from(["--device", "cuda:1"], {}).tree_name == "gpu"
    assert settings_from(["--device", "cuda", "--tree", "chain"], {}).tree_name == "chain"


def test_compile_comes_from_the_flag_over_medusa_compile_over_auto():
    assert settings_from([], {}).compile == "auto"
    assert settings_from([], {"MEDUSA_COMPILE": "off"}).compile == "off"
    assert settings_from(["--compile", "on"], {"MEDUSA_COMPILE": "off"}).compile == "on"


@pytest.mark.parametrize("argv, compiled", [
    ([], False),  # auto on the CPU
    (["--compile", "on"], True),
    (["--device", "cuda", "--compile", "off"], False),
    (["--device", "cuda:1"], True),  # auto on CUDA; the tiny model's weights stay on the CPU
])
def test_the_compile_setting_reaches_the_engine(argv, compiled):
    settings = settings_from([*argv, "--medusa-heads", "none", "--max-total-tokens", "128",
                              "--max-input-tokens", "64"], {})
    assert build_engine(settings, tiny_loaded()).compile is compiled


def test_dtype_defaults_to_the_devices_own_at_load():
    assert settings_from([], {}).dtype is None  # runtime.loading.torch_dtype resolves it per device
    assert settings_from(["--dtype", "auto"], {}).dtype == "auto"
