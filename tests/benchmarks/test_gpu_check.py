"""`benchmarks/gpu_check.sh --device cpu --tiny`, the dry run of the GPU session: every part runs at tiny
shapes and prints its numbers; a failing case is reported without ending its part; the real-model
part says "skipped" when its files are missing."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import engine as engine_benchmark

GPU_CHECK = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.sh"
TINY = ["--device", "cpu", "--tiny", "--json"]


def gpu_check(env: dict[str, str] | None = None, timeout: int = 300) -> tuple[int, list[dict]]:
    """The dry run; nothing carried unless env says (not a .carry/ prepared in this checkout)."""
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_CARRY": "/nonexistent-carry", **(env or {})}
    result = subprocess.run(["bash", str(GPU_CHECK), "--device", "cpu", "--tiny"], capture_output=True,
                            text=True, env=env, timeout=timeout)
    return result.returncode, [json.loads(line) for line in result.stdout.splitlines()]


def positive(row: dict, *keys: str) -> bool:
    return all(isinstance(row.get(key), int | float) and row[key] > 0 for key in keys)


@pytest.mark.slow
def test_the_dry_run_gives_every_reading():
    every_part = ("env check bench decode-llama2-7b decode-llama3-8b speculative speculative-compiled "
                  "speculative-dynamic speculative-float32 conversation grammar step")
    status, rows = gpu_check({"GPU_CHECK_PARTS": every_part})
    assert [row for row in rows if "error" in row] == []
    assert status == 0
    parts = {row.get("part") for row in rows}
    assert {"env", "decode", "decode_ratio", "verify", "syncs", "speculative", "summary"} <= parts
    assert rows[-1]["failed_parts"] == []
    assert {row["check"] for row in rows if "check" in row} == {"pass"}  # the kernel check ran

    for shape in ("llama2-7b", "llama3-8b"):
        for batch in (1, 2):
            by_impl = {row["impl"]: row for row in rows
                       if row.get("part") == "decode" and row["shape"] == shape and row.get("batch") == batch}
            assert set(by_impl) == {"hf", "ours", "hf_compiled"}  # the CPU measures our engine uncompiled
            assert all(positive(row, "tok_s", "new_tokens") for row in by_impl.values())
            [ratio] = [row for row in rows if row.get("part") == "decode_ratio" and row["shape"] == shape
                       and row["batch"] == batch]
            assert positive(ratio, "ours_vs_hf", "ours_vs_hf_compiled")

    verify = [row for row in rows if row.get("part") == "verify" and "ms" in row]
    assert sorted((row["level"], row["T"]) for row in verify) == [
        ("forward", 1), ("forward", 16), ("forward", 64), ("step", 1), ("step", 16), ("step", 64)]
    assert all(positive(row, "ms", "vs_T1") for row in verify)
    syncs = [row for row in rows if row.get("part") == "syncs"]
    assert sorted(row["T"] for row in syncs) == [1, 16, 64]
    assert {row["syncs_per_step"] for row in syncs} == {"n/a"}  # counted on CUDA only

    assert {"part": "speculative-compiled", "skipped": "CUDA only"} in rows
    [speculative] = [row for row in rows if row.get("part") == "speculative"]
    assert "skipped" in speculative or positive(speculative, "hf_tok_s", "plain_tok_s", "medusa_tok_s")
    if "skipped" not in speculative:  # the same drafters with a dynamic tree
        [dynamic] = [row for row in rows if row.get("part") == "speculative-dynamic"]
        assert positive(dynamic, "medusa_tok_s", "eagle_tok_s")
        [float32] = [row for row in rows if row.get("part") == "speculative-float32"]
        assert float32["dtype"] == "float32" and float32["prompts"] == 3  # the part's own --limit
        assert "exact_match" in float32 and "eagle_exact_match" in float32
        [conversation] = [row for row in rows if row.get("part") == "conversation"]
        assert conversation["same_output"] == 1.0 and positive(conversation, "cached_share")
        [grammar] = [row for row in rows if row.get("part") == "grammar"]
        assert grammar["same_output"] is True and grammar["prompts"] == 2  # --tiny's --limit
        assert positive(grammar, "grammar_tok_s", "grammar_plain_tok_s")


def test_the_real_model_part_is_skipped_without_its_prompts():
    status, rows = gpu_check({"GPU_CHECK_PARTS": "speculative", "SPEC_BENCH_PROMPTS": "/nonexistent.jsonl"})
    assert status == 0
    assert rows[:-1] == [{"part": "speculative",
                          "skipped": "no Spec-Bench prompts at /nonexistent.jsonl: set SPEC_BENCH_PROMPTS"}]
    assert rows[-1]["failed_parts"] == []


def test_the_real_model_part_is_skipped_without_its_gguf_file(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"question_id": 0, "category": "writing", "turns": ["Hello?"]}\n')
    status, rows = gpu_check({"GPU_CHECK_PARTS": "speculative", "SPEC_BENCH_PROMPTS": str(prompts),
                              "SMOLLM2_GGUF": str(tmp_path / "missing.gguf")})
    assert status == 0
    missing = tmp_path / "missing.gguf"
    assert rows[:-1] == [{"part": "speculative", "skipped": f"SMOLLM2_GGUF={missing} is not a file"}]


def test_a_failing_case_is_reported_and_the_part_goes_on(monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(engine_benchmark, "ours_tok_s", broken)
    assert engine_benchmark.main(["--parts", "decode", "--shapes", "llama2-7b", *TINY]) == 1
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    decode = {(row["impl"], row["batch"]): row for row in rows if row["part"] == "decode" and "batch" in row}
    assert {key: row["error"] for key, row in decode.items() if "error" in row} == {
        ("ours", 1): "RuntimeError: out of memory", ("ours", 2): "RuntimeError: out of memory"}
    assert all(positive(decode[impl, batch], "tok_s") for impl in ("hf", "hf_compiled") for batch in (1, 2))
    assert [row for row in rows if row["part"] == "decode_ratio"] == [  # no ratio without ours
        {"part": "decode_ratio", "shape": "llama2-7b", "batch": 1},
        {"part": "decode_ratio", "shape": "llama2-7b", "batch": 2}]


def test_the_model_travels_in_three_parts_and_is_joined_once_all_came(tmp_path):
    """`gpu_carry.sh prepare` splits the GGUF for three device runs; each run's gpu_check.sh stores the
    part it carried, and the third joins them, checks the sha256 and uses the file. A damaged part is
    a failed "carry" row, not a model; prepare refuses to replace a folder it did not write."""
    gguf, prompts = tmp_path / "model.gguf", tmp_path / "prompts.jsonl"
    gguf.write_bytes(os.urandom(10_001))
    prompts.write_text('{"question_id": 0, "category": "writing", "turns": ["Hello?"]}\n')
    prepared = tmp_path / "prepared"
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_CARRY": str(prepared), "GPU_CARRY_WHEELS": "0",
           "SMOLLM2_GGUF": str(gguf), "SPEC_BENCH_PROMPTS": str(prompts)}

    def prepare(**settings: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(GPU_CHECK.with_name("gpu_carry.sh")), "prepare"],
                              capture_output=True, text=True, timeout=60, env={**env, **settings})

    result = prepare()
    assert result.returncode == 0, result.stderr
    assert "model3" in result.stdout
    assert (prepared / "data" / "prompts.jsonl").read_text() == prompts.read_text()
    assert prepare().returncode == 0  # again, over the folder it wrote
    other = tmp_path / "other"  # a folder it did not write is never removed
    other.mkdir()
    (other / "keep").write_text("not ours")
    refused = prepare(GPU_CHECK_CARRY=str(other))
    assert refused.returncode == 1 and "not a carry folder" in refused.stderr
    assert (other / "keep").read_text() == "not ours"

    store = tmp_path / "store"
    for i in (1, 2, 3):  # each run carries one part, as the device runs do
        carried = tmp_path / f"run{i}"
        carried.mkdir()
        shutil.copytree(prepared / "data", carried / "data")
        shutil.copytree(prepared / f"model{i}", carried / f"model{i}")
        status, rows = gpu_check({"GPU_CHECK_PARTS": "none", "GPU_CHECK_CARRY": str(carried),
                                  "GPU_CHECK_STORE": str(store)})
        assert status == 0
        joined = str(store / "model.gguf") if i == 3 else None
        assert rows[0] == {"part": "carry", "model_parts": i, "of": 3, "model": joined}
    assert (store / "model.gguf").read_bytes() == gguf.read_bytes()
    status, rows = gpu_check({"GPU_CHECK_PARTS": "speculative", "GPU_CHECK_CARRY": str(carried),
                              "GPU_CHECK_STORE": str(store), "SMOLLM2_GGUF": "/nonexistent.gguf"})
    assert rows[1] == {"part": "speculative",  # past the prompts' check: the carried ones were found
                       "skipped": "SMOLLM2_GGUF=/nonexistent.gguf is not a file"}

    damaged = bytearray((store / "model2.part").read_bytes())
    damaged[0] ^= 1
    (store / "model2.part").write_bytes(bytes(damaged))
    status, rows = gpu_check({"GPU_CHECK_PARTS": "none", "GPU_CHECK_CARRY": str(tmp_path / "run3"),
                              "GPU_CHECK_STORE": str(store)})
    assert status == 1
    assert rows[0]["part"] == "carry" and "error" in rows[0]
    assert rows[-1]["failed_parts"] == ["carry"]
