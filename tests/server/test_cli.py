"""`medusa-serve` settings: every one a flag and an environment variable, flags over the environment over
the defaults, clear errors, and the README's table of them."""

import itertools
import json
import signal
import socket
import subprocess
import sys
import types
import typing
from pathlib import Path

import httpx
import pytest
import torch
import transformers

from medusa.checkpoints import SHIPPED_EAGLE, SHIPPED_EAGLE_BF16, SHIPPED_HEADS
from runtime import cpu_kernels
from server.app import build_engine
from server.cli import flag, main, parser, settings_from, settings_table
from server.settings import ENVIRONMENT, TGI_VARIABLES, Settings
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
    assert settings_from([], {}).speculative_batch_limit == 2  # CPU defaults: the measured crossovers
    assert settings_from(["--drafter", "eagle"], {}).speculative_batch_limit == 1
    assert settings_from(["--device", "cuda"], {}).speculative_batch_limit is None
    assert settings_from(["--max-speculative-batch", "8"], {}).speculative_batch_limit == 8


@pytest.mark.parametrize("model, embedded", [([], True), (["--model", "smollm2"], True),
                                             (["--model", "/models/other"], False)])
def test_the_embedded_model_gets_the_shipped_heads_and_the_chat_template(model, embedded):
    settings = settings_from(model, {})
    assert settings.embedded is embedded
    has_heads = settings.heads_path_for("float32") is not None
    assert (has_heads, settings.use_chat_template) == (embedded, embedded)
    assert settings_from([*model, "--chat-template", "on", "--medusa-heads", "none"], {}).use_chat_template
    assert settings_from([*model, "--medusa-heads", "none"], {}).heads_path_for("float32") is None


def test_the_draft_layer_shipped_is_the_one_trained_in_the_dtype_served():
    heads, eagle = settings_from([], {}), settings_from(["--drafter", "eagle"], {})
    assert heads.heads_path_for("bfloat16") == heads.heads_path_for("float32") == str(SHIPPED_HEADS)
    assert eagle.heads_path_for("float32") == str(SHIPPED_EAGLE)
    assert eagle.heads_path_for("bfloat16") == str(SHIPPED_EAGLE_BF16)
    assert SHIPPED_EAGLE_BF16.is_dir()
    assert settings_from(["--drafter", "eagle", "--medusa-heads", "/my/layer"], {}).heads_path_for(
        "bfloat16") == "/my/layer"


def test_the_default_tree_is_the_one_shipped_for_the_device(monkeypatch):
    assert settings_from([], {}).tree_for("float32") == "dynamic-cpu"
    for products, tree in (("amx", "dynamic-cpu-bf16-amx"), ("avx512", "dynamic-cpu-bf16"),
                           ("emulated", "dynamic-cpu-bf16-emulated")):
        monkeypatch.setattr(cpu_kernels, "cpu_bf16_products", lambda products=products: products)
        assert settings_from([], {}).tree_for("bfloat16") == tree
    assert settings_from(["--device", "cuda:1"], {}).tree_for("bfloat16") == "gpu"
    assert settings_from(["--device", "cuda", "--tree", "chain"], {}).tree_for("bfloat16") == "chain"


def test_compile_comes_from_the_flag_over_medusa_compile_over_auto():
    assert settings_from([], {}).compile == "auto"
    assert settings_from([], {"MEDUSA_COMPILE": "off"}).compile == "off"
    assert settings_from(["--compile", "on"], {"MEDUSA_COMPILE": "off"}).compile == "on"


@pytest.mark.parametrize("argv, compiled, eager_if_compile_fails", [
    ([], False, True),  # auto on the CPU
    (["--compile", "on"], True, False),  # asked for: a failed build stops the start-up
    (["--device", "cuda", "--compile", "off"], False, False),
    (["--device", "cuda:1"], True, True),  # auto on CUDA; the tiny model's weights stay on the CPU
])
def test_the_compile_setting_reaches_the_engine(argv, compiled, eager_if_compile_fails):
    settings = settings_from([*argv, "--medusa-heads", "none", "--max-total-tokens", "128",
                              "--max-input-tokens", "64"], {})
    engine = build_engine(settings, tiny_loaded())
    assert (engine.compile, engine.eager_if_compile_fails) == (compiled, eager_if_compile_fails)


def test_dtype_defaults_to_the_devices_own_at_load():
    assert settings_from([], {}).dtype is None  # runtime.loading.torch_dtype resolves it per device
    assert settings_from(["--dtype", "auto"], {}).dtype == "auto"


# ---------------------------------------------------------------- every setting from the environment

README = Path(__file__).resolve().parents[2] / "README.md"


def value_kind(name: str) -> object:
    """The setting's type without its None: `int | None` -> int, `Literal[...] | None` -> Literal[...]."""
    annotation = Settings.model_fields[name].annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        (kind,) = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return kind
    return annotation


def other_value(name: str, nth: int) -> tuple[str, object]:
    """A valid value of a setting other than its default (the nth such), as text and as Settings holds it."""
    default, kind = Settings.model_fields[name].default, value_kind(name)
    if kind is bool:
        value = not default if nth == 0 else default
        return str(value).lower(), value
    if typing.get_origin(kind) is typing.Literal:
        value = [*(option for option in typing.get_args(kind) if option != default), default][nth]
        return value, value
    if kind in (int, float):
        value = kind((default or 0) + 1 + nth)  # keeps max_input_tokens under max_total_tokens
        return str(value), value
    assert kind is str, f"{name}: a setting of a type this test does not know"
    return f"{name}-{nth}", f"{name}-{nth}"


def as_flags(name: str, nth: int) -> list[str]:
    text, value = other_value(name, nth)
    if value_kind(name) is bool:
        return [flag(name) if value else "--no-" + flag(name).removeprefix("--")]
    return [flag(name), text]


def test_every_setting_comes_from_its_environment_variable():
    environ = {ENVIRONMENT[name]: other_value(name, 0)[0] for name in Settings.model_fields}
    settings = settings_from([], environ)
    for name in Settings.model_fields:
        assert getattr(settings, name) == other_value(name, 0)[1], ENVIRONMENT[name]


def test_every_flag_overrides_its_environment_variable():
    environ = {ENVIRONMENT[name]: other_value(name, 0)[0] for name in Settings.model_fields}
    argv = list(itertools.chain.from_iterable(as_flags(name, 1) for name in Settings.model_fields))
    settings = settings_from(argv, environ)
    for name in Settings.model_fields:
        assert getattr(settings, name) == other_value(name, 1)[1], flag(name)


def test_an_empty_variable_counts_as_unset():
    assert settings_from([], {variable: "" for variable in ENVIRONMENT.values()}) == Settings()


def test_variables_follow_one_rule_and_keep_their_old_names():
    for name, variable in ENVIRONMENT.items():
        assert variable == TGI_VARIABLES.get(name, "MEDUSA_" + name.upper().removeprefix("MEDUSA_"))
    assert len(set(ENVIRONMENT.values())) == len(ENVIRONMENT)
    old = {"host": "HOST", "port": "PORT", "compile": "MEDUSA_COMPILE", "api_key": "API_KEY"}
    assert old.items() <= ENVIRONMENT.items()


def test_help_names_every_flag_and_variable():
    shown = " ".join(parser().format_help().split())  # argparse wraps lines
    for name, variable in ENVIRONMENT.items():
        assert flag(name) in shown and f"environment: {variable}" in shown


@pytest.mark.parametrize("name", [name for name in Settings.model_fields if value_kind(name) is not str])
def test_a_bad_variable_is_a_usage_error_naming_it_but_not_its_value(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        settings_from([], {ENVIRONMENT[name]: "not-a-value"})
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert f"environment variable {ENVIRONMENT[name]} ({name})" in error and "not-a-value" not in error


def test_a_conflict_between_settings_names_the_variables_involved(capsys):
    with pytest.raises(SystemExit):
        settings_from(["--max-total-tokens", "2048"], {"MAX_INPUT_TOKENS": "4096", "PORT": "9000"})
    error = capsys.readouterr().err.splitlines()[-1]  # after the usage lines
    assert "max_input_tokens (4096) must be less than" in error
    assert error.endswith("(from the environment: MAX_INPUT_TOKENS)")


def test_the_readme_table_is_the_settings():
    """README.md, `## Running`, `### Settings`: regenerate with
    python -c 'from server.cli import settings_table; print(settings_table(), end="")'"""
    section = README.read_text().split("\n### Settings\n", 1)[1].splitlines()
    table = itertools.takewhile(lambda line: line.startswith("|"),
                                itertools.dropwhile(lambda line: not line.startswith("|"), section))
    assert "\n".join(table) + "\n" == settings_table()

