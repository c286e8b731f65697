"""Medusa candidate trees: a list of top-k rank paths ("choices") -> the buffers one step needs.

A tree is given by its choices, e.g. [[0], [1], [0, 0], [0, 1], [0, 0, 0]]. Node 0 is the root:
the token already sampled from the base model. A node at depth d (1-based) with path
(r1, ..., rd) holds the token ranked rd in head (d-1)'s top-k, and is the child of the node with
path (r1, ..., r(d-1)). All the sequences of a batch share one tree; only the tokens differ.

A tree may also end with a *lookup branch*: a chain of `lookup` nodes below the root whose tokens
come from prompt lookup (`medusa.lookup`) instead of the heads. Its nodes come after all the head
nodes, so ancestors still have smaller indices than their descendants.

`build_tree` is a pure function from choices to `TreeBuffers` (CPU tensors, built once;
`TreeBuffers.to` gives a copy on another device). `get_tree` finds a tree by name: a built-in one
(`BUILTIN_TREES`), one shipped in `medusa/trees/` (calibrated for the shipped heads), a JSON file,
or `dynamic:N`: a `DynamicTree`, which each step grows per sequence from the drafter's confidence
instead of one fixed shape (`medusa.dynamic`).

Legend: B batch, T tree nodes (root included), K Medusa heads, k top-k per head,
P root-to-leaf paths.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from runtime import cpu_kernels


class TreeError(ValueError):
    """A tree that cannot be used: malformed choices, an unknown name, or too big for the heads."""


# Verifying T nodes holds B x T x V float32 logits, and the sampling rules a few copies of them:
# 256 nodes of a 49k (SmolLM2) or 128k (Llama 3) vocabulary take 50 or 130 MB per sequence per copy.
# The largest published trees have 60-128 nodes; past this, a tree only fails the first step, so a
# bigger one is refused where it is given.
MAX_TREE_NODES = 256


def _check_size(name: str, num_nodes: int) -> None:
    if num_nodes > MAX_TREE_NODES:
        raise TreeError(f"tree {name!r} verifies {num_nodes} nodes per sequence, more than the "
                        f"{MAX_TREE_NODES} a step allows; use a smaller tree (e.g. dynamic:64)")


@dataclass(frozen=True)
class TreeLevel:
    """The nodes at one depth d >= 1, for heads that draft level by level from their parents' paths."""

    nodes: torch.Tensor  # [N] long: the nodes at depth d
    parent_paths: torch.Tensor  # [P, d] long: root..parent node indices of each distinct parent
    parent_of: torch.Tensor  # [N] long: row in parent_paths of each node's parent
    ranks: torch.Tensor  # [N] long: each node's rank among its parent's top-k
    topk: int  # max rank + 1 at this depth

    def to(self, device: torch.device | str) -> TreeLevel:
        return dataclasses.replace(self, **_tensors_on(self, device))


def _tensors_on(buffers, device: torch.device | str) -> dict[str, torch.Tensor]:
    """The tensor fields of a dataclass, moved to `device`."""
    return {f.name: getattr(buffers, f.name).to(device) for f in dataclasses.fields(buffers)
            if isinstance(getattr(buffers, f.name), torch.Tensor)}


@dataclass(frozen=True)
class TreeBuffers:
    """Everything about a tree that does not depend on the tokens. Node i + 1 is choices[i];
    nodes len(choices) + 1 .. T - 1 are the lookup branch, a chain from the root."""

    choices: tuple[tuple[int, ...], ...]  # sorted by (depth, path)
    mask: torch.Tensor  # [T, T] bool: node i sees node j (j is i or an ancestor of i, root included)
    depths: torch.Tensor  # [T] long: 0 for the root; position id = prefix length + depth
    parents: torch.Tensor  # [T] long: -1 for the root
    head_index: torch.Tensor  # [T] long: the head whose top-k gives the node's token (depth - 1); -1 root
    rank_index: torch.Tensor  # [T] long: the rank in that head's top-k (last element of path); -1 root
    # (head_index and rank_index are -1 on the lookup branch too)
    retrieve: torch.Tensor  # [P, depth + 1] long: node indices root..leaf per leaf, padded with -1
    children: tuple[tuple[int, ...], ...]  # children of each node in rank order
    child_table: torch.Tensor  # [T, max children] long: `children` padded with -1 (at least 1 column)
    num_nodes: int  # T
    depth: int  # longest path (0 for a root-only tree)
    num_heads_needed: int  # depth of the head nodes
    topk_needed: int  # max rank + 1 (0 for a root-only tree)
    levels: tuple[TreeLevel, ...] = ()  # head nodes at depth 1, 2, ...
    lookup: int = 0  # nodes on the lookup branch
    name: str = "custom"  # for messages

    @property
    def lookup_nodes(self) -> range:
        """Indices of the lookup branch's nodes, root's child first."""
        return range(self.num_nodes - self.lookup, self.num_nodes)

    def to(self, device: torch.device | str) -> TreeBuffers:
        """The same tree with its tensors on `device`."""
        return dataclasses.replace(self, **_tensors_on(self, device),
                                   levels=tuple(level.to(device) for level in self.levels))


DEFAULT_TOPK = 8
MAX_DRAFT_DEPTH = 6  # EAGLE-2's depth for 60-token trees: as deep as the drafter goes, up to this


@dataclass(frozen=True)
class DynamicTree:
    """How a dynamic tree grows: `dynamic:N[,topk=k][,depth=D][,lookup=L][,min_p=p]` on the command
    line (depth sets draft_depth). draft_depth 0 means as deep as the drafter drafts, up to
    MAX_DRAFT_DEPTH (`for_drafter`). With min_p, a step verifies only the drafted nodes whose score
    (the drafter's probability of the path) is at least min_p, up to the budget (`medusa.dynamic.
    verified_nodes`): where the step runs eagerly on the CPU, which reads that count on the host; a
    compiled or GPU step verifies the whole budget."""

    budget: int  # N: the root and the drafted nodes verified per sequence (at most, with min_p)
    topk: int = DEFAULT_TOPK  # k: children proposed per expanded node, and nodes expanded per level
    draft_depth: int = 0  # D: the depth the drafter grows the tree to
    lookup: int = 0  # L: nodes more, for a prompt-lookup chain; drafts fill those a row's guesses leave
    min_p: float = 0.0  # drafted nodes below this path probability are not verified (CPU, eager)
    name: str = "dynamic"

    def __post_init__(self) -> None:
        for field in ("budget", "topk", "draft_depth", "lookup"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise TreeError(f"tree {self.name!r}: {field} must be an integer >= 0, got {value!r}")
        if isinstance(self.min_p, bool) or not isinstance(self.min_p, int | float) or not 0 <= self.min_p < 1:
            raise TreeError(f"tree {self.name!r}: min_p must be a number in [0, 1), got {self.min_p!r}")
        if self.budget < 2 or self.topk < 1:
            raise TreeError(f"tree {self.name!r}: the budget must be >= 2 nodes (the root and one draft) "
                            "and topk >= 1")
        if self.draft_depth and self.budget - 1 > self.num_candidates:
            raise TreeError(f"tree {self.name!r}: {self.draft_depth} levels of top-{self.topk} grow only "
                            f"{self.num_candidates} candidates, fewer than the budget's {self.budget - 1}; "
                            "raise topk or depth")
        _check_size(self.name, self.num_nodes)

    @property
    def num_candidates(self) -> int:
        """M: the candidates grown, of which the budget keeps N - 1."""
        return self.topk + (self.draft_depth - 1) * self.topk ** 2

    @property
    def num_nodes(self) -> int:
        return self.budget + self.lookup

    @property
    def num_heads_needed(self) -> int:
        """The deepest drafted level (what `medusa.tree.check_tree_fits` checks against the drafter)."""
        return self.draft_depth

    @property
    def topk_needed(self) -> int:
        return self.topk

    @property
    def depth(self) -> int:
        """The longest path below the root: a drafted one (drafts may fill the lookup's nodes) or the
        lookup chain."""
        return max(min(self.draft_depth, self.num_nodes - 1), self.lookup)

    def for_drafter(self, max_depth: int) -> DynamicTree:
        """The tree with its draft depth resolved for a drafter that drafts `max_depth` levels."""
        if self.draft_depth:
            return self
        return dataclasses.replace(self, draft_depth=min(max_depth, MAX_DRAFT_DEPTH))

    def to(self, device: torch.device | str) -> DynamicTree:
        return self  # no tensors: each step builds its rows' trees on the device (`medusa.dynamic`)


def parse_dynamic(spec: str) -> DynamicTree | None:
    """`dynamic:N[,topk=k][,depth=D][,lookup=L][,min_p=p]` -> DynamicTree; None for any other tree name."""
    if not spec.startswith("dynamic:"):
        return None
    match = re.fullmatch(r"dynamic:(\d+)((?:,(?:(?:topk|depth|lookup)=\d+|min_p=0?\.\d+))*)", spec)
    if match is None:
        raise TreeError(f"tree {spec!r}: write a dynamic tree as dynamic:N with N the nodes verified per "
                        "sequence, then optionally ,topk=K ,depth=D ,lookup=L ,min_p=P "
                        "(e.g. dynamic:32,topk=6,min_p=0.05)")
    options = dict(item.split("=") for item in match.group(2).split(",")[1:])
    fields = {"depth": "draft_depth"}
    return DynamicTree(int(match.group(1)), name=spec,
                       **{fields.get(k, k): float(v) if k == "min_p" else int(v) for k, v in options.items()})


def build_tree(choices: Sequence[Sequence[int]], name: str = "custom", lookup: int = 0) -> TreeBuffers:
    """Validate choices and build the tree's buffers, with a lookup branch of `lookup` nodes.
    Raises TreeError on a malformed tree."""
    if isinstance(lookup, bool) or not isinstance(lookup, int) or lookup < 0:
        raise TreeError(f"tree {name!r}: lookup must be an integer >= 0, got {lookup!r}")
    paths = [_as_path(c, name) for c in choices]
    if len(set(paths)) != len(paths):
        dup = next(p for p in paths if paths.count(p) > 1)
        raise TreeError(f"tree {name!r} lists the path {list(dup)} more than once")
    known = set(paths)
    for p in paths:
        if len(p) > 1 and p[:-1] not in known:
            raise TreeError(f"tree {name!r} has the path {list(p)} but not its parent {list(p[:-1])}; "
                            "every prefix of a path must be in the tree")
    ordered = sorted(paths, key=lambda p: (len(p), p))
    drafted = len(ordered) + 1  # the root and the head nodes
    T = drafted + lookup
    _check_size(name, T)
    index = {(): 0} | {p: i + 1 for i, p in enumerate(ordered)}

    lookup_parents = [drafted + i - 1 if i else 0 for i in range(lookup)]  # a chain from the root
    parents = [-1] + [index[p[:-1]] for p in ordered] + lookup_parents
    depths = [0] + [len(p) for p in ordered] + list(range(1, lookup + 1))
    children: list[list[int]] = [[] for _ in range(T)]
    for i in range(1, T):
        children[parents[i]].append(i)  # nodes are sorted by path, so siblings come in rank order

    mask = torch.zeros(T, T, dtype=torch.bool)  # [T, T]
    for i in range(T):
        j = i
        while j >= 0:
            mask[i, j] = True
            j = parents[j]

    depth = max(depths)
    head_depth = max(depths[:drafted])
    leaves = [i for i in range(T) if not children[i]]
    retrieve = torch.full((len(leaves), depth + 1), -1, dtype=torch.long)  # [P, depth + 1]
    def root_to(node: int) -> torch.Tensor:  # ancestors have smaller indices: root..node in order
        return mask[node].nonzero().flatten()

    for row, leaf in enumerate(leaves):
        chain = root_to(leaf)
        retrieve[row, :len(chain)] = chain

    levels = []
    for d in range(1, head_depth + 1):
        nodes = [i for i in range(drafted) if depths[i] == d]
        parent_nodes = sorted({parents[i] for i in nodes})
        parent_paths = torch.stack([root_to(j) for j in parent_nodes])  # [P, d] root..parent
        levels.append(TreeLevel(
            nodes=torch.tensor(nodes), parent_paths=parent_paths,
            parent_of=torch.tensor([parent_nodes.index(parents[i]) for i in nodes]),
            ranks=torch.tensor([ordered[i - 1][-1] for i in nodes]),
            topk=max(ordered[i - 1][-1] for i in nodes) + 1))

    return TreeBuffers(
        choices=tuple(ordered),
        mask=mask,
        depths=torch.tensor(depths, dtype=torch.long),
        parents=torch.tensor(parents, dtype=torch.long),
        head_index=torch.tensor([-1] + [len(p) - 1 for p in ordered] + [-1] * lookup, dtype=torch.long),
        rank_index=torch.tensor([-1] + [p[-1] for p in ordered] + [-1] * lookup, dtype=torch.long),
        retrieve=retrieve,
        children=tuple(tuple(c) for c in children),
        child_table=torch.tensor([c + [-1] * (max(map(len, children)) + 1 - len(c)) for c in children],
                                 dtype=torch.long),
        num_nodes=T,
        depth=depth,
        num_heads_needed=head_depth,
        topk_needed=max((p[-1] + 1 for p in ordered), default=0),
        levels=tuple(levels),
        lookup=lookup,
        name=name,
    )


def _as_path(choice: Sequence[int], name: str) -> tuple[int, ...]:
    if isinstance(choice, str | bytes) or not isinstance(choice, Sequence) or not choice:
        raise TreeError(f"tree {name!r}: each choice must be a non-empty list of ranks, got {choice!r}")
    if not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in choice):
        raise TreeError(f"tree {name!r}: ranks must be integers >= 0, got {list(choice)!r}")
    return tuple(choice)


def candidates_from_topk(root: torch.Tensor, topk_tokens: torch.Tensor, tree: TreeBuffers) -> torch.Tensor:
    """The token of every tree node for every sequence (the lookup branch, if any, holds the root).

    root: [B] the already-sampled next token; topk_tokens: [B, K, k] each head's top-k tokens,
    best first. Returns [B, T] long.
    """
    B, K, k = topk_tokens.shape
    assert root.shape == (B,), f"root must be [B={B}], got {tuple(root.shape)}"
    assert K >= tree.num_heads_needed and k >= tree.topk_needed, "call check_tree_fits first"
    device = topk_tokens.device
    drafted = tree.lookup_nodes.start  # the root and the head nodes
    heads = tree.head_index[1:drafted].to(device)  # [T-1-lookup]
    ranks = tree.rank_index[1:drafted].to(device)  # [T-1-lookup]
    nodes = topk_tokens[:, heads, ranks]  # [B, T-1-lookup]
    root = root[:, None].to(nodes.dtype)  # [B, 1]
    return torch.cat([root, nodes, root.expand(B, tree.lookup)], dim=1)  # [B, T]


def check_tree_fits(tree: TreeBuffers | DynamicTree, num_heads: int, topk: int) -> None:
    """Raise TreeError unless `num_heads` heads with top-`topk` candidates can fill the tree."""
    if tree.num_heads_needed > num_heads:
        raise TreeError(f"tree {tree.name!r} is {tree.depth} deep but only {num_heads} Medusa heads are "
                        f"loaded; use a tree at most {num_heads} deep (e.g. 'chain' or 'cpu') or heads "
                        "with more heads")
    if tree.topk_needed > topk:
        raise TreeError(f"tree {tree.name!r} uses rank {tree.topk_needed - 1} (needs top-{tree.topk_needed} "
                        f"candidates per head) but only top-{topk} are available")


# Medusa's default sparse tree for Vicuna-7B (63 nodes below the root, depth 4, ranks < 10), as
# published in FasterDecoding/Medusa, medusa/model/medusa_choices.py (`mc_sim_7b_63`).
MC_SIM_7B_63 = (
    (0,), (0, 0), (1,), (0, 1), (2,), (0, 0, 0), (1, 0), (0, 2), (3,), (0, 3), (4,), (0, 4), (2, 0),
    (0, 5), (0, 0, 1), (5,), (0, 6), (6,), (0, 7), (0, 1, 0), (1, 1), (7,), (0, 8), (0, 0, 2), (3, 0),
    (0, 9), (8,), (9,), (1, 0, 0), (0, 2, 0), (1, 2), (0, 0, 3), (4, 0), (2, 1), (0, 0, 4), (0, 0, 5),
    (0, 0, 0, 0), (0, 1, 1), (0, 0, 6), (0, 3, 0), (5, 0), (1, 3), (0, 0, 7), (0, 0, 8), (0, 0, 9),
    (6, 0), (0, 4, 0), (1, 4), (7, 0), (0, 1, 2), (2, 0, 0), (3, 1), (2, 2), (8, 0), (0, 5, 0), (1, 5),
    (1, 0, 1), (0, 2, 1), (9, 0), (0, 6, 0), (0, 0, 0, 1), (1, 6), (0, 7, 0),
)

BUILTIN_TREES: dict[str, tuple[tuple[int, ...], ...]] = {
    "mc_sim_7b_63": MC_SIM_7B_63,
    # one guess per head: the cheapest verification, for heads that are rarely wrong at rank 0
    "chain": ((0,), (0, 0), (0, 0, 0), (0, 0, 0, 0)),
}

# NAME.json: trees calibrated for the shipped heads by `python -m training calibrate`, which writes
# its measurements beside each one in NAME.calibration.json
SHIPPED_TREES = Path(__file__).resolve().parent / "trees"


# The shipped tree each drafter uses by default, per device and dtype; on the CPU bf16 by how the CPU
# multiplies it (`cpu_kernels.cpu_bf16_products`): AMX tiles, AVX-512 BF16 pairs, or emulated (widened
# to float32 in registers). `default_tree` has why.
DEFAULT_TREES = {
    "heads": {"cuda": "gpu", "float32": "dynamic-cpu", "bf16 amx": "dynamic-cpu-bf16-amx",
              "bf16 avx512": "dynamic-cpu-bf16", "bf16 emulated": "dynamic-cpu-bf16-emulated"},
    "eagle": {"cuda": "eagle-gpu", "float32": "eagle-dynamic-cpu-float32", "bf16 amx": "eagle-dynamic-cpu",
              "bf16 avx512": "eagle-dynamic-cpu-bf16-avx512",
              "bf16 emulated": "eagle-dynamic-cpu-bf16-emulated"},
}


def default_tree(device: str, dtype: str = "float32", drafter: str = "heads", bf16_products: str | None = None
                 ) -> str:
    """The shipped tree calibrated for a drafter ('heads' or the 'eagle' layer), a device and the
    weights' dtype (`DEFAULT_TREES`); bf16 on the CPU by how it multiplies bf16 (`bf16_products`:
    "amx", "avx512" or "emulated"; None: ask /proc/cpuinfo). Each was calibrated in its dtype, the CPU
    trees by measured generation (`training calibrate --dynamic`; NAME.calibration.json).

    Native bf16 and float32: on the AMX Xeon, generating in bf16, static trees of 8 nodes gave 68.9
    tok/s, 12 68.4, 16 62.9, 32 54.3. The heads' dynamic tree of 8 nodes, grown 2 levels deep,
    accepts more than the static 'cpu-bf16' at the same cost of verification (2.29 against 2.13
    tokens per step): AMD EPYC (Zen 5), bf16, 10 prompts, calibrations taking turns three times,
    163.1 / 161.1 / 151.7 tok/s against 149.9 / 157.9 / 144.6. In float32 on Zen 3 it won against
    the static 'cpu', the engines taking turns prompt by prompt: 1.612x plain against 1.539x on 40
    prompts. The draft layer's 'eagle-dynamic-cpu' (12 nodes, 4 levels; AMX Xeon, bf16): 63.4 tok/s
    in its calibration against 59.9 for the best static tree. In float32 on Zen 3 its own, 8 nodes
    grown 3 levels deep: 1.427x plain against 1.319x for 'eagle-dynamic-cpu' (20 prompts, taking turns).
    Calibrated again on the AMX Xeon once our products used its tiles (1c96c75; 10 prompts, bf16, 6 / 8 /
    12 / 16 nodes): heads 144.9 / 150.8 / 148.1 / 140.7 tok/s, the layer (4 levels) 128.1 / 137.5 /
    137.5 / 133.3; the shipped trees stay. The heads' AMX tree then took `min_p` (f0a3821+): up to 12
    nodes, only those the heads give >= 0.08, so a confident step verifies more and an unsure one fewer
    (issue 18's command, heads only, taking turns twice: 1.797x / 1.807x plain -> 1.833x / 1.835x; the
    draft layer's 12 nodes gained nothing from it, 1.957x -> 1.955x on 20 prompts). Both then took a
    prompt-lookup branch of 8, not 4, once calibration measured the branch too (`--lookup 4 8`; 20 dev
    prompts, bf16, the trees taking turns): heads 12 nodes (4 lookup, min_p 0.08) 140.3 tok/s -> 16 (8
    lookup, min_p 0.05) 145.6, 2.27 -> 2.45 tokens a step; the layer 12 nodes (4 lookup) 152.0 -> 16 (8
    lookup, min_p 0.05) 160.2, 2.67 -> 2.81 (`NAME.calibration.json`). A copied passage runs on past 4
    tokens, and min_p leaves the unsure drafts unverified.

    Emulated bf16: products on AVX2 go in tiles of at most 6 rows, and a row more costs much: on AMD
    EPYC (Zen 3) the 30 layers and lm_head took 1.43x one row's time on 6 rows, 1.90x on 7, 2.17x on
    8. So both trees have 5 nodes (calibrated there: heads 4 nodes 91.4 tok/s, 5 94.4, 6 90.6, 7
    82.1); 20 dev prompts, taking turns: heads 1.549x plain against 1.267x for 'dynamic-cpu-bf16', the
    draft layer 1.282x against 0.961x for 'eagle-dynamic-cpu'.

    AVX-512 BF16 (AMD EPYC): a tree's rows cost more than on AMX, and the draft layer's 12 nodes were
    slower than plain decoding on Zen 4 (0.985x, 40 dev prompts). Calibrated there, 3 levels deep: 6
    nodes 151.8 tok/s, 7 154.9, 8 146.6, 12 118.0 ('eagle-dynamic-cpu-bf16-avx512', 7 nodes); on Zen 5
    a smaller tree also paid (10 prompts, taking turns: 4 drafted nodes 1.45x plain, 'eagle-dynamic-cpu'
    1.30x). The heads' 8 nodes were Zen 4's best too (6 / 8 / 12 nodes 125.2 / 128.1 / 115.8 tok/s)."""
    if device.startswith("cuda"):
        kind = "cuda"
    elif dtype != "bfloat16":
        kind = "float32"
    else:
        kind = f"bf16 {cpu_kernels.cpu_bf16_products() if bf16_products is None else bf16_products}"
    return DEFAULT_TREES[drafter][kind]


def tree_names() -> list[str]:
    """The names `get_tree` knows: the built-in trees, then the shipped ones."""
    shipped = (file.name.removesuffix(".json") for file in SHIPPED_TREES.glob("*.json"))
    return [*BUILTIN_TREES, *sorted(name for name in shipped if not name.endswith(".calibration"))]


def get_tree(name_or_path: str) -> TreeBuffers | DynamicTree:
    """A tree by name (`tree_names`), a dynamic tree (`dynamic:N...`, `parse_dynamic`), or a JSON
    file: a list of choices (lists of ranks), or an object {"choices": [...], "lookup": L} for a tree
    with a lookup branch of L nodes."""
    dynamic = parse_dynamic(name_or_path)
    if dynamic is not None:
        return dynamic
    if name_or_path in BUILTIN_TREES:
        return build_tree(BUILTIN_TREES[name_or_path], name=name_or_path)
    if name_or_path in tree_names():
        return _tree_from_json(json.loads((SHIPPED_TREES / f"{name_or_path}.json").read_text()), name_or_path)
    path = Path(name_or_path)
    if not path.is_file():
        raise TreeError(f"unknown tree {name_or_path!r}: give one of {', '.join(tree_names())} "
                        "or the path of a JSON file with a list of choices such as [[0], [1], [0, 0]]")
    try:
        spec = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TreeError(f"tree file {str(path)!r} is not valid JSON: {e}") from e
    return _tree_from_json(spec, str(path))


def _tree_from_json(spec, name: str) -> TreeBuffers | DynamicTree:
    if isinstance(spec, dict) and "dynamic" in spec:  # written by `training calibrate --dynamic`
        if not set(spec) <= {"dynamic", "topk", "depth", "lookup", "min_p"}:
            raise TreeError(f"tree file {name!r}: a dynamic tree takes the keys dynamic, topk, depth, "
                            f"lookup, min_p; got {sorted(spec)}")
        return DynamicTree(spec["dynamic"], topk=spec.get("topk", DEFAULT_TOPK),
                           draft_depth=spec.get("depth", 0), lookup=spec.get("lookup", 0),
                           min_p=spec.get("min_p", 0.0), name=name)
    choices = spec.get("choices") if isinstance(spec, dict) else None
    if isinstance(choices, list) and set(spec) <= {"choices", "lookup"}:
        return build_tree(choices, name=name, lookup=spec.get("lookup", 0))
    if not isinstance(spec, list):
        raise TreeError(f"tree file {name!r} must hold a JSON list of choices such as [[0], [1], [0, 0]], "
                        'or an object {"choices": [...], "lookup": 8}')
    return build_tree(spec, name=name)

