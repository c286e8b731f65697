"""`medusa-serve` settings: flags over HOST/PORT over the defaults, and clear errors."""

import pytest

from server.cli import main, settings_from
from server.settings import Settings


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
