"""Tree calibration: nodes are added by the probability that their whole path is accepted."""

import json

import pytest

from medusa.checkpoints import SHIPPED_EAGLE, SHIPPED_HEADS
from medusa.tree import DynamicTree, build_tree, get_tree
from training.calibrate import greedy_tree, main

RANK_PROBS = [[0.6, 0.1, 0.05], [0.4, 0.1, 0.05], [0.3, 0.1, 0.05]]


def test_greedy_tree_by_path_probability():
    choices, probs = greedy_tree(RANK_PROBS, 6)
    # (0,)=.6, (0,0)=.6*.4=.24, (1,)=.1, (0,0,0)=.24*.3=.072, (0,1)=.6*.1=.06, (2,)=.05 (ties: shorter first)
    assert choices == [(0,), (0, 0), (1,), (0, 0, 0), (0, 1), (2,)]
    assert [round(p, 4) for p in probs] == [0.6, 0.24, 0.1, 0.072, 0.06, 0.05]
    build_tree(choices)  # every parent came before its children


def test_budget_larger_than_the_space_stops_at_the_full_tree():
    choices, _ = greedy_tree([[0.5, 0.5]], 10)
    assert choices == [(0,), (1,)]


def test_a_budget_with_a_lookup_branch_writes_a_tree_the_server_reads(tmp_path):
    heads = tmp_path / "heads"
    heads.mkdir()
    (heads / "training.json").write_text(json.dumps({"held_out": {"rank_probs": RANK_PROBS}}))
    out = tmp_path / "gpu.json"
    main(["--heads", str(heads), "--budget", "8", "--lookup", "3", "--out", str(out)])
    tree = get_tree(str(out))
    assert tree.num_nodes == 8 and tree.lookup == 3
    assert tree.choices == ((0,), (1,), (0, 0), (0, 0, 0))  # the 4 best paths


@pytest.mark.slow
def test_measured_calibration_picks_the_size_that_generated_fastest(tmp_path, capsys):
    """With --prompts the size is chosen by greedy generation through the engine (the shipped heads
    and the embedded model), not by the forward-only estimate."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"category": "writing", "turns": [text]}) + "\n"
                               for text in ("Write a haiku about rain.", "Name three colours.")))
    out = tmp_path / "measured.json"
    main(["--heads", str(SHIPPED_HEADS), "--max-nodes", "8", "--lookup", "4", "--prompts", str(prompts),
          "--max-new-tokens", "8", "--out", str(out)])
    record = json.loads(out.with_suffix(".calibration.json").read_text())
    rows = record["measurements"]
    assert [r["nodes"] for r in rows] == [6, 8]
    assert all(r["tokens_per_s"] > 0 and r["tokens_per_step"] >= 1 for r in rows)
    best = max(rows, key=lambda r: r["tokens_per_s"])
    tree = get_tree(str(out))
    assert tree.num_nodes == best["nodes"] and tree.lookup == 4
    assert "<- best" in capsys.readouterr().out


def test_a_dynamic_budget_writes_a_tree_the_server_reads(tmp_path):
    out = tmp_path / "dynamic.json"
    main(["--heads", str(SHIPPED_HEADS), "--dynamic", "--budget", "24", "--lookup", "4", "--topk", "6",
          "--depth", "3", "--out", str(out)])
    tree = get_tree(str(out))
    assert isinstance(tree, DynamicTree) and (tree.budget, tree.topk, tree.lookup) == (20, 6, 4)
    assert tree.draft_depth == 3
    assert tree.num_nodes == 24


@pytest.mark.slow
def test_measured_dynamic_calibration_picks_the_budget_that_generated_fastest(tmp_path, capsys):
    """The shipped draft layer and the embedded model, each budget measured through the engine."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"category": "writing", "turns": ["Name three colours."]}) + "\n")
    out = tmp_path / "measured.json"
    main(["--heads", str(SHIPPED_EAGLE), "--dynamic", "--max-nodes", "6", "--lookup", "2", "3", "--prompts",
          str(prompts), "--max-new-tokens", "8", "--min-p", "0", "0.05", "--out", str(out)])
    rows = json.loads(out.with_suffix(".calibration.json").read_text())["measurements"]
    # every size up to 8 that leaves a drafted node, with each lookup branch and each min_p
    assert [(r["lookup"], r["nodes"], r.get("min_p", 0)) for r in rows] == [
        (2, 4, 0), (2, 4, 0.05), (2, 5, 0), (2, 5, 0.05), (2, 6, 0), (2, 6, 0.05),
        (3, 5, 0), (3, 5, 0.05), (3, 6, 0), (3, 6, 0.05)]
    best = max(rows, key=lambda r: r["tokens_per_s"])
    tree = get_tree(str(out))
    assert isinstance(tree, DynamicTree) and tree.num_nodes == best["nodes"] and tree.lookup == best["lookup"]
    assert tree.budget == best["nodes"] - best["lookup"] and tree.min_p == best.get("min_p", 0)
    assert "<- best" in capsys.readouterr().out


def test_min_p_is_refused_where_nothing_is_measured_or_out_of_range(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--heads", str(SHIPPED_HEADS), "--dynamic", "--budget", "8", "--min-p", "0.05"])
    with pytest.raises(SystemExit):  # checked before the prompts are read
        main(["--heads", str(SHIPPED_HEADS), "--dynamic", "--prompts", str(tmp_path / "none.jsonl"),
              "--min-p", "1.5"])
    assert capsys.readouterr().err.count("--min-p takes numbers in [0, 1)") == 2


def test_several_lookups_are_refused_where_nothing_is_measured(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--heads", str(SHIPPED_HEADS), "--dynamic", "--budget", "16", "--lookup", "4", "8"])
    with pytest.raises(SystemExit):
        main(["--heads", str(SHIPPED_HEADS), "--max-nodes", "16", "--lookup", "4", "8"])
    with pytest.raises(SystemExit):  # each one must leave room for the root
        main(["--heads", str(SHIPPED_HEADS), "--dynamic", "--max-nodes", "8", "--lookup", "4", "8",
              "--prompts", str(tmp_path / "none.jsonl")])
    err = capsys.readouterr().err
    assert err.count("--lookup takes several sizes only with --dynamic and --prompts") == 2
    assert "--lookup must be >= 0 and leave room for the root" in err
