"""`--plot FILE.png` of the speculative and serving benchmarks: the chart functions on small made-up
summaries, each benchmark's command end to end on a tiny model, the per-category table the speculative
chart is drawn from, and the benchmarks still running where matplotlib is not installed."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from benchmarks import plots, serving, speculative
from benchmarks.spec_bench import Question
from server.app import create_app
from tests.runtime.test_loading import write_tiny_gguf
from tests.server.support import serve, tiny_loaded, tiny_settings

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    with Image.open(path) as image:
        image.verify()  # the whole file decodes, not only its header
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 0 and image.height > 0


def serving_summary(concurrency: int, streamed: bool, failed: bool = False) -> dict:
    """What serving.summarize gives, with made-up figures; `failed`: every request of the level failed."""
    ms = {f"{name}_ms_p{q}": None if failed or (name != "latency" and not streamed) else 10.0 * q
          for name in ("ttft", "itl", "latency") for q in serving.PERCENTILES}
    return ms | {"requests": 8, "errors": 8 if failed else 0, "throughput_tok_s": 0.0 if failed else 50.0,
                 "generated_tokens": 0 if failed else 64, "wall_s": 1.3, "concurrency": concurrency,
                 "stream": streamed, "speculate": True}


def test_speculative_chart_is_a_png(tmp_path):
    summary = {"plain_tok_s": 20.0, "medusa_tok_s": 41.5, "mean_accepted_tokens": 2.1,
               "per_category": {"coding": {"prompts": 2, "tok_s": {"plain": 21.0, "medusa": 50.0},
                                           "mean_accepted_tokens": 2.5},
                                "math": {"prompts": 1, "tok_s": {"plain": 19.0, "medusa": 30.0},
                                         "mean_accepted_tokens": 1.6}}}
    plots.speculative_chart(summary, tmp_path / "speculative.png", "tiny, float32, a CPU")
    assert_png(tmp_path / "speculative.png")

    without_medusa = {"hf_tok_s": 9.0, "per_category": {"qa": {"prompts": 1, "tok_s": {"hf": 9.0}}}}
    plots.speculative_chart(without_medusa, tmp_path / "hf.png", "tiny")
    assert_png(tmp_path / "hf.png")


@pytest.mark.parametrize("streamed", [True, False])
def test_serving_chart_is_a_png_with_or_without_ttft_and_with_a_failed_level(tmp_path, streamed):
    summaries = [serving_summary(1, streamed), serving_summary(4, streamed),
                 serving_summary(16, streamed, failed=True)]
    plots.serving_chart(summaries, tmp_path / "serving.png", "tiny, float32 on cpu")
    assert_png(tmp_path / "serving.png")


def test_speculative_report_keeps_tok_s_and_acceptance_per_category():
    questions = [Question("qa", "a"), Question("writing", "b"), Question("qa", "c")]
    results = {"plain": speculative.ModeResult(outputs=[[1, 2], [3], [4, 5, 6, 7]], seconds=[1.0, 1.0, 2.0],
                                               steps=[1, 0, 3]),
               "medusa": speculative.ModeResult(outputs=[[1, 2], [3], [4, 5, 6, 7]], seconds=[0.5, 0.5, 0.5],
                                                steps=[1, 0, 1])}
    per_category = speculative.report(questions, results, {})["per_category"]
    assert per_category == {
        "qa": {"prompts": 2, "tok_s": {"plain": 2.0, "medusa": 6.0}, "mean_accepted_tokens": 2.0},
        "writing": {"prompts": 1, "tok_s": {"plain": 1.0, "medusa": 2.0}, "mean_accepted_tokens": 0.0},
    }


@pytest.fixture(scope="module")
def tiny_gguf_run(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A tiny float32 GGUF model, three Spec-Bench questions in two categories, and a cache folder."""
    folder = tmp_path_factory.mktemp("plots")
    prompts = folder / "spec_bench.jsonl"
    rows = [("coding", "Write a loop."), ("math", "What is 2 + 2?"), ("coding", "Sort a list.")]
    prompts.write_text("".join(json.dumps({"question_id": i, "category": category, "turns": [text]}) + "\n"
                               for i, (category, text) in enumerate(rows)))
    return write_tiny_gguf(folder / "tiny.F32.gguf"), prompts, folder / "cache"


def run_speculative(tiny_gguf_run, monkeypatch, modes: str, chart: Path) -> dict:
    gguf, prompts, cache = tiny_gguf_run
    monkeypatch.setenv("MEDUSA_CACHE_DIR", str(cache))
    return speculative.main(["--prompts", str(prompts), "--model", str(gguf), "--modes", modes,
                             "--max-new-tokens", "4", "--json", "--plot", str(chart)])


def test_speculative_command_draws_its_chart(tiny_gguf_run, monkeypatch, tmp_path, capsys):
    summary = run_speculative(tiny_gguf_run, monkeypatch, "plain,medusa", tmp_path / "speculative.png")
    assert_png(tmp_path / "speculative.png")
    assert list(summary["per_category"]) == ["coding", "math"]
    assert [row["prompts"] for row in summary["per_category"].values()] == [2, 1]
    assert all(set(row["tok_s"]) == {"plain", "medusa"} and min(row["tok_s"].values()) > 0
               and row["mean_accepted_tokens"] >= 0 for row in summary["per_category"].values())
    assert summary["dtype"] == "float32" and summary["max_new_tokens"] == 4
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == summary  # the JSON line stays last


def test_speculative_command_says_why_no_chart_when_no_mode_ran(tiny_gguf_run, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # mode "llamacpp" alone, skipped
    run_speculative(tiny_gguf_run, monkeypatch, "llamacpp", tmp_path / "none.png")
    assert f"no chart written to {tmp_path / 'none.png'}: no mode ran" in capsys.readouterr().out
    assert not (tmp_path / "none.png").exists()


def test_serving_command_runs_each_concurrency_level_and_draws_their_percentiles(tmp_path, capsys):
    chart = tmp_path / "docs" / "charts" / "serving.png"  # folders made as needed
    with serve(create_app(tiny_settings(), tiny_loaded())) as url:
        summaries = serving.main(["--url", url, "--concurrency", "1,2", "--requests", "3", "--max-new-tokens",
                                  "4", "--stream", "--json", "--plot", str(chart)])
    assert_png(chart)
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert lines == summaries and [s["concurrency"] for s in summaries] == [1, 2]
    for s in summaries:
        assert (s["requests"], s["errors"]) == (3, 0)
        assert 0 < s["ttft_ms_p50"] <= s["ttft_ms_p90"] <= s["ttft_ms_p99"] <= s["latency_ms_p99"]
        assert s["latency_ms_p50"] <= s["latency_ms_p90"] <= s["latency_ms_p99"]


@pytest.mark.parametrize("levels", ["0", "1,0", "two", "1,,2"])
def test_serving_refuses_a_bad_concurrency_before_sending_anything(levels, capsys):
    with pytest.raises(SystemExit):
        serving.main(["--url", "http://127.0.0.1:9", "--concurrency", levels, "--requests", "1"])
    assert "--concurrency" in capsys.readouterr().err


def test_benchmarks_import_without_matplotlib():
    blocked = ("import sys; sys.modules['matplotlib'] = None  # what importing a missing package does\n"
               "import benchmarks.serving, benchmarks.speculative")
    result = subprocess.run([sys.executable, "-c", blocked], cwd=Path(__file__).parents[2],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
