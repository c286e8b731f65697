"""`python -m benchmarks.serving` against a live tiny server: it reports every request and ends
with one JSON line holding the keys the issue names."""

import json

import pytest

from benchmarks import serving
from server.app import create_app
from tests.server.support import serve, tiny_settings

KEYS = {"requests", "errors", "throughput_tok_s", "ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50", "itl_ms_p99",
        "latency_ms_p50", "latency_ms_p99"}


@pytest.fixture(scope="module")
def url(loaded):
    with serve(create_app(tiny_settings(max_queue=4), loaded)) as base_url:
        yield base_url


def run(url, capsys, *flags):
    serving.main(["--url", url, "--concurrency", "3", "--requests", "7", "--max-new-tokens", "6", "--json",
                  *flags])
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    return json.loads(lines[-1]), lines[:-1], captured.err


def test_streaming_run_reports_every_latency(url, capsys):
    result, text, _ = run(url, capsys, "--stream")
    assert KEYS <= set(result)
    assert (result["requests"], result["errors"]) == (7, 0)
    assert result["throughput_tok_s"] > 0
    assert 0 < result["ttft_ms_p50"] <= result["ttft_ms_p99"] <= result["latency_ms_p99"]
    assert 0 <= result["itl_ms_p50"] <= result["itl_ms_p99"]
    assert any(line.startswith("throughput") for line in text)


def test_whole_responses_report_latency_only(url, capsys, tmp_path):
    prompts = tmp_path / "spec_bench.jsonl"
    rows = [{"question_id": i, "category": "writing", "turns": [f"Write about the number {i}.", "More."]}
            for i in range(3)]
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
    result, _, _ = run(url, capsys, "--prompts", str(prompts), "--no-speculate")
    assert (result["requests"], result["errors"]) == (7, 0)
    assert result["ttft_ms_p50"] is result["itl_ms_p99"] is None
    assert 0 < result["latency_ms_p50"] <= result["latency_ms_p99"]
    assert result["speculate"] is False
    assert serving.read_prompts(prompts)[2] == "Write about the number 2."


def test_refused_requests_are_counted_as_errors(url, capsys):
    result, _, errors = run(url, capsys, "--max-new-tokens", "1000")  # over max_total_tokens: 422 each
    assert (result["requests"], result["errors"], result["throughput_tok_s"]) == (7, 7, 0.0)
    assert result["latency_ms_p50"] is None
    assert "error: 422: " in errors
