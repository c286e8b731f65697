"""Tree buffers from Medusa choices: a hand-worked tree, validation, built-ins, candidate tokens."""

from __future__ import annotations

import json

import pytest
import torch

from medusa.tree import (
    BUILTIN_TREES,
    MAX_TREE_NODES,
    SHIPPED_TREES,
    DynamicTree,
    TreeError,
    build_tree,
    candidates_from_topk,
    check_tree_fits,
    default_tree,
    get_tree,
    tree_names,
)
from runtime.cpu_kernels import cpu_bf16_products

# Hand-worked tree, given out of order on purpose. Sorted by (depth, path) the nodes are
#   0 root, 1 [0], 2 [1], 3 [0,0], 4 [0,1], 5 [1,0], 6 [0,0,0]
#
#            0
#         /     \
#        1       2
#       / \      |
#      3   4     5
#      |
#      6
SMALL = [[0, 0], [1], [0, 0, 0], [0], [1, 0], [0, 1]]


def test_small_tree_buffers() -> None:
    tree = build_tree(SMALL)
    assert tree.choices == ((0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0))
    assert tree.num_nodes == 7
    assert tree.depth == 3 and tree.num_heads_needed == 3
    assert tree.topk_needed == 2
    assert tree.depths.tolist() == [0, 1, 1, 2, 2, 2, 3]
    assert tree.parents.tolist() == [-1, 0, 0, 1, 1, 2, 3]
    assert tree.head_index.tolist() == [-1, 0, 0, 1, 1, 1, 2]
    assert tree.rank_index.tolist() == [-1, 0, 1, 0, 1, 0, 0]
    expected_mask = [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0, 0],
        [1, 1, 0, 1, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0],
        [1, 0, 1, 0, 0, 1, 0],
        [1, 1, 0, 1, 0, 0, 1],
    ]
    assert tree.mask.dtype == torch.bool
    assert tree.mask.int().tolist() == expected_mask
    # one row per leaf (nodes 4, 5, 6), root..leaf, -1 padded
    assert tree.retrieve.tolist() == [[0, 1, 4, -1], [0, 2, 5, -1], [0, 1, 3, 6]]
    assert tree.children == ((1, 2), (3, 4), (5,), (6,), (), (), ())


def test_candidates_from_topk_picks_rank_of_each_heads_topk() -> None:
    tree = build_tree(SMALL)
    # token = 100 * batch + 10 * head + rank, so every entry says where it came from
    topk = torch.tensor([[[100 * b + 10 * h + r for r in range(2)] for h in range(3)] for b in range(2)])
    root = torch.tensor([7, 8])
    cands = candidates_from_topk(root, topk, tree)
    assert cands.tolist() == [
        [7, 0, 1, 10, 11, 10, 20],
        [8, 100, 101, 110, 111, 110, 120],
    ]


@pytest.mark.parametrize("choices, message", [
    ([[0], [1, 0]], r"has the path \[1, 0\] but not its parent \[1\]"),
    ([[0], [0, 0, 0]], r"has the path \[0, 0, 0\] but not its parent \[0, 0\]"),
    ([[0], [1], [0]], r"lists the path \[0\] more than once"),
    ([[0], [-1]], "ranks must be integers >= 0"),
    ([[0], []], "non-empty list of ranks"),
])
def test_invalid_trees_raise(choices: list[list[int]], message: str) -> None:
    with pytest.raises(TreeError, match=message):
        build_tree(choices)


def test_a_tree_past_the_step_limit_is_refused_when_built() -> None:
    wide = [[rank] for rank in range(MAX_TREE_NODES - 1)]  # with the root: the limit itself
    assert build_tree(wide).num_nodes == MAX_TREE_NODES
    with pytest.raises(TreeError, match=f"verifies {MAX_TREE_NODES + 1} nodes per sequence"):
        build_tree(wide, lookup=1)
    with pytest.raises(TreeError, match=f"verifies {MAX_TREE_NODES + 1} nodes per sequence"):
        build_tree([*wide, [0, 0]])


def test_check_tree_fits_messages() -> None:
    deep = build_tree([[0], [0, 0], [0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0, 0]], name="x")
    with pytest.raises(TreeError, match="tree 'x' is 5 deep but only 4 Medusa heads are loaded"):
        check_tree_fits(deep, num_heads=4, topk=10)
    wide = get_tree("mc_sim_7b_63")
    with pytest.raises(TreeError, match=r"needs top-10 candidates per head\) but only top-5"):
        check_tree_fits(wide, num_heads=4, topk=5)
    check_tree_fits(wide, num_heads=4, topk=10)
    check_tree_fits(deep, num_heads=5, topk=1)


def test_mc_sim_7b_63() -> None:
    tree = get_tree("mc_sim_7b_63")
    assert len(tree.choices) == 63 and tree.num_nodes == 64
    assert tree.depth == 4
    assert tree.topk_needed == 10
    gpu = get_tree("gpu")  # shipped: calibrated for the shipped heads, a 64-node budget
    assert gpu.num_nodes <= 64 and gpu.num_heads_needed <= 4
    # every node sees exactly its depth + 1 nodes (itself and its ancestors)
    assert torch.equal(tree.mask.sum(dim=1), tree.depths + 1)


def test_builtins() -> None:
    for name in BUILTIN_TREES:
        assert get_tree(name).name == name
    assert get_tree("chain").choices == ((0,), (0, 0), (0, 0, 0), (0, 0, 0, 0))
    cpu = get_tree("cpu")
    assert 2 <= cpu.num_nodes <= 33 and cpu.num_heads_needed <= 4  # shipped: calibrated on a CPU


def test_names_are_the_builtins_then_the_shipped_trees_each_from_its_file() -> None:
    static = ["cpu", "cpu-bf16", "eagle-cpu", "eagle-gpu", "gpu"]
    dynamic = ["dynamic-cpu", "dynamic-cpu-bf16", "dynamic-cpu-bf16-amx", "dynamic-cpu-bf16-emulated",
               "eagle-dynamic-cpu",
               "eagle-dynamic-cpu-bf16-avx512", "eagle-dynamic-cpu-bf16-emulated",
               "eagle-dynamic-cpu-float32"]
    assert tree_names() == [*BUILTIN_TREES, *sorted(static + dynamic)]  # not the *.calibration.json records
    for name in static + dynamic:
        spec = json.loads((SHIPPED_TREES / f"{name}.json").read_text())
        tree = get_tree(name)
        assert (tree.name, tree.lookup) == (name, spec.get("lookup", 0))
        if name in dynamic:
            assert isinstance(tree, DynamicTree)
            expected = (spec["dynamic"], spec["topk"], spec.get("min_p", 0))
            assert (tree.budget, tree.topk, tree.min_p) == expected
        else:
            assert set(tree.choices) == {tuple(c) for c in spec["choices"]}
    assert default_tree("cuda:0", "bfloat16") == "gpu" and default_tree("cpu") == "dynamic-cpu"
    assert default_tree("cpu", "bfloat16", bf16_products="amx") == "dynamic-cpu-bf16-amx"
    assert default_tree("cpu", "bfloat16", bf16_products="avx512") == "dynamic-cpu-bf16"
    assert default_tree("cpu", "bfloat16", bf16_products="emulated") == "dynamic-cpu-bf16-emulated"
    here = cpu_bf16_products()
    assert default_tree("cpu", "bfloat16") == default_tree("cpu", "bfloat16", bf16_products=here)
    assert default_tree("cpu", "float32", "eagle") == "eagle-dynamic-cpu-float32"
    for products, tree in (("amx", ""), ("avx512", "-bf16-avx512"), ("emulated", "-bf16-emulated")):
        assert default_tree("cpu", "bfloat16", "eagle", bf16_products=products) == f"eagle-dynamic-cpu{tree}"
    assert default_tree("cuda", "bfloat16", "eagle") == "eagle-gpu"


def test_tree_from_json_file_and_unknown_name(tmp_path) -> None:
    path = tmp_path / "tree.json"
    path.write_text(json.dumps([[0], [1], [0, 0]]))
    assert get_tree(str(path)).choices == ((0,), (1,), (0, 0))
    with pytest.raises(TreeError, match="mc_sim_7b_63, chain, cpu, cpu-bf16, dynamic-cpu, dynamic-cpu-bf16, "
                                        "dynamic-cpu-bf16-amx, dynamic-cpu-bf16-emulated, "
                                        "eagle-cpu, eagle-dynamic-cpu, eagle-dynamic-cpu-bf16-avx512, "
                                        "eagle-dynamic-cpu-bf16-emulated, "
                                        "eagle-dynamic-cpu-float32, eagle-gpu, gpu"):
        get_tree("no-such-tree")
    path.write_text("{not json")
    with pytest.raises(TreeError, match="not valid JSON"):
        get_tree(str(path))


def test_root_only_tree() -> None:
    tree = build_tree([])
    assert tree.num_nodes == 1 and tree.depth == 0 and tree.topk_needed == 0
    assert tree.retrieve.tolist() == [[0]]
    topk = torch.zeros(1, 4, 2, dtype=torch.long)
    assert candidates_from_topk(torch.tensor([5]), topk, tree).tolist() == [[5]]



def test_lookup_branch_is_a_chain_from_the_root_after_the_head_nodes() -> None:
    tree = build_tree([[0], [1], [0, 0]], lookup=3)  # heads: 1 [0], 2 [1], 3 [0,0]; lookup: 4 -> 5 -> 6
    assert tree.num_nodes == 7 and list(tree.lookup_nodes) == [4, 5, 6]
    assert tree.parents.tolist() == [-1, 0, 0, 1, 0, 4, 5]
    assert tree.depths.tolist() == [0, 1, 1, 2, 1, 2, 3]
    assert tree.depth == 3 and tree.num_heads_needed == 2 and tree.topk_needed == 2
    assert tree.head_index.tolist() == [-1, 0, 0, 1, -1, -1, -1]
    assert tree.retrieve.tolist() == [[0, 2, -1, -1], [0, 1, 3, -1], [0, 4, 5, 6]]
    assert tree.children[0] == (1, 2, 4)  # the lookup branch is the root's last child
    assert torch.equal(tree.mask.sum(dim=1), tree.depths + 1)
    assert [level.nodes.tolist() for level in tree.levels] == [[1, 2], [3]]  # heads draft only theirs
    topk = torch.tensor([[[10, 11], [12, 13]]])  # [B=1, K=2, k=2]
    assert candidates_from_topk(torch.tensor([5]), topk, tree).tolist() == [[5, 10, 11, 12, 5, 5, 5]]
    with pytest.raises(TreeError, match="lookup must be an integer >= 0"):
        build_tree([[0]], lookup=-1)


def test_tree_file_with_a_lookup_branch(tmp_path) -> None:
    path = tmp_path / "tree.json"
    path.write_text(json.dumps({"choices": [[0], [0, 0]], "lookup": 4}))
    tree = get_tree(str(path))
    assert tree.choices == ((0,), (0, 0)) and tree.lookup == 4 and tree.num_nodes == 7
    path.write_text(json.dumps({"nodes": [[0]]}))
    with pytest.raises(TreeError, match='"lookup": 8'):
        get_tree(str(path))

def test_to_moves_tensors_only() -> None:
    tree = build_tree(SMALL)
    moved = tree.to("meta")
    assert moved.mask.device.type == "meta" and moved.retrieve.device.type == "meta"
    assert moved.children == tree.children and tree.mask.device.type == "cpu"
