"""`python -m benchmarks.attention --check` and `benchmarks/gpu_check.sh` fail, by their exit status,
when a kernel's result is out of tolerance: the GPU check is a check that can fail."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from benchmarks import attention as attention_benchmark
from runtime import cpu_kernels

CHECK = ["--check", "--tiny", "--device", "cpu", "--json"]  # the PyTorch path: seconds on the CPU
GPU_CHECK = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.sh"


def check_rows(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_check_exits_0_when_every_result_matches(capsys):
    assert attention_benchmark.main(CHECK) == 0
    rows = check_rows(capsys)
    assert rows and {row["check"] for row in rows} == {"pass"}


def test_check_runs_our_cpu_kernel_in_its_dtypes(capsys):
    """`--backend cpu`: our CPU kernel itself (what serving on a CPU attends with), in float32 and
    bfloat16, the dtypes it takes."""
    if not cpu_kernels.built():
        pytest.skip("no C++ compiler to build our CPU kernels")
    assert attention_benchmark.main([*CHECK, "--backend", "cpu"]) == 0
    rows = check_rows(capsys)
    assert {row["backend"] for row in rows} == {"cpu"} and {row["check"] for row in rows} == {"pass"}
    assert {row["dtype"] for row in rows} == {"float32", "bfloat16"}


def test_check_exits_1_when_a_result_is_off(monkeypatch, capsys):
    exact = attention_benchmark.attend
    # 1% off: within bfloat16's tolerance, outside float32's
    monkeypatch.setattr(attention_benchmark, "attend", lambda *args: exact(*args) * 1.01)
    assert attention_benchmark.main(CHECK) == 1
    rows = check_rows(capsys)
    assert {row["check"] for row in rows if row["dtype"] == "bfloat16"} == {"pass"}
    assert {row["check"] for row in rows if row["dtype"] == "float32"} == {"FAIL"}


def fake_python(tmp_path: Path, check_status: int) -> Path:
    """A stand-in for Python: exits `check_status` for `-m benchmarks.attention --check`, else 0."""
    script = tmp_path / "python"
    script.write_text(f'#!/bin/sh\ncase " $* " in *" --check "*) exit {check_status};; esac\necho "$*"\n')
    script.chmod(0o755)
    return script


def run_gpu_check(tmp_path: Path, check_status: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": str(fake_python(tmp_path, check_status)),
           "GPU_CHECK_CARRY": "/nonexistent"}  # nothing carried: not a .carry/ prepared in this checkout
    return subprocess.run(["bash", str(GPU_CHECK), "--device", "cpu", "--tiny"], capture_output=True,
                          text=True, env=env)


def test_gpu_check_exits_1_when_the_check_fails_and_still_runs_the_benchmark(tmp_path):
    result = run_gpu_check(tmp_path, check_status=1)
    assert result.returncode == 1
    assert '"part": "check", "error": "exit status 1' in result.stdout
    assert "-m benchmarks.attention --json --device cpu --tiny" in result.stdout  # the benchmark ran


def test_gpu_check_exits_0_when_every_part_does(tmp_path):
    result = run_gpu_check(tmp_path, check_status=0)
    assert (result.returncode, result.stderr) == (0, "")
    assert "error" not in result.stdout
