"""The Triton kernels, run by Triton's interpreter on the CPU, equal the naive attention.

Every case reads K/V from caches that hold NaN wherever the batch may not read (other slots,
positions past a sequence's new tokens), so a missing load mask shows up as NaN.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attention import attend, plan
from attention import triton_kernels as tk
from tests.attention.conftest import SHAPES, TOLERANCE, Case, make_case, random_tree_mask


def run_triton(case: Case, num_splits: int | None = None, block_n: int | None = None) -> torch.Tensor:
    k, v = case.poisoned_caches()
    T = case.q.shape[2]
    if block_n is None:
        batch = plan(case.slots, case.cache_lens, T, case.new_mask, backend="triton", num_splits=num_splits)
        return attend(case.q, k, v, batch)
    batch = plan(case.slots, case.cache_lens, T, case.new_mask, backend="triton")
    return tk.attend(case.q, k, v, batch.slots, batch.cache_lens, batch.packed_mask, batch.max_len,
                     num_splits, block_n=block_n)


def check(case: Case, got: torch.Tensor) -> None:
    assert got.shape == case.q.shape and got.dtype == case.q.dtype
    tol = TOLERANCE[case.q.dtype]
    torch.testing.assert_close(got, case.expected(), atol=tol, rtol=tol)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_matches_naive(name):
    lens, T, H, Hkv, D, new_mask = SHAPES[name]
    check(make_case(lens, T, H, Hkv, D, new_mask), run_triton(make_case(lens, T, H, Hkv, D, new_mask)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 128])
def test_dtypes(dtype, D):
    case = make_case([0, 77], 16, 6, 2, D, random_tree_mask(16, seed=3), dtype=dtype)
    check(case, run_triton(case))


@pytest.mark.parametrize("block_n", [16, 32])
def test_small_key_tiles(block_n):
    """Many tiles, and tile edges inside the prefix and inside the new tokens."""
    case = make_case([0, 15, 16, 17, 50], 5, 4, 2, 64, random_tree_mask(5, seed=4))
    check(case, run_triton(case, block_n=block_n))


@pytest.mark.parametrize("num_splits", [2, 3, 7])
@pytest.mark.parametrize("T", [1, 7])
def test_split_kv(num_splits, T):
    """Flash-decoding: the prefix cut into splits (some of them empty for short sequences) then merged."""
    new_mask = None if T == 1 else random_tree_mask(T, seed=5)
    case = make_case([0, 70, 300], T, 6, 2, 64, new_mask)
    check(case, run_triton(case, num_splits=num_splits))


def test_split_kv_half_precision():
    case = make_case([9, 200], 4, 4, 1, 128, random_tree_mask(4, seed=6), dtype=torch.bfloat16)
    check(case, run_triton(case, num_splits=4))


def test_contiguous_slots_and_slack_max_len():
    """Slots in order, and a caller's max_len larger than needed."""
    case = make_case([12, 40], 3, 4, 2, 64, slots=[1, 2], num_slots=4)
    k, v = case.poisoned_caches()
    batch = plan(case.slots, case.cache_lens, 3, None, max_len=case.max_len + 2, backend="triton")
    check(case, attend(case.q, k, v, batch))


def test_num_splits_fill_the_gpu_only_when_needed():
    assert tk.choose_num_splits(num_programs=1024, max_cached=8192, num_sms=132) == 1  # batch fills it
    assert tk.choose_num_splits(num_programs=32, max_cached=100, num_sms=132) == 1  # too short to split
    assert tk.choose_num_splits(num_programs=32, max_cached=8192, num_sms=132) == 9
    assert tk.choose_num_splits(num_programs=1, max_cached=8192, num_sms=132) == 32  # MIN_SPLIT_LEN keys each


_BUILD_FOR_HOPPER = """
import itertools
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from attention import triton_kernels as tk

kernel = tk._attend_kernel
for split, causal, ints in itertools.product((False, True), (False, True), ("i32", "i64")):
    pointers = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "lse_ptr": "*fp32", "slots_ptr": "*i64",
                "lens_ptr": "*i64", "mask_ptr": "*i32", "out_ptr": "*fp32" if split else "*bf16"}
    constants = dict(GROUP=4, HEAD_DIM=128, BLOCK_M=16, BLOCK_N=64, CAUSAL=causal, SPLIT=split,
                     DOT_PRECISION="tf32", DOT_UPCAST=False)
    signature = {name: pointers.get(name, "constexpr" if name in constants else "fp64" if name == "qk_scale"
                                    else ints) for name in kernel.arg_names}
    constexprs = {(kernel.arg_names.index(name),): value for name, value in constants.items()}
    source = ASTSource(kernel, signature, constexprs=constexprs)
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
    print(split, causal, ints, ".entry _attend_kernel" in ptx)
"""


def test_builds_for_a_gpu_with_scalars_typed_as_torch_compile_types_them():
    """Under torch.compile, Inductor launches our kernel with a Python float typed fp64 (Triton's own
    launcher says fp32), and an int it cannot bound typed i64. An fp64 scale once turned the online
    softmax's loop-carried max fp64, and the build failed on the H200 at the first compiled step; an
    i64 count of new tokens made a loop variable change type. Triton builds for a Hopper target
    without a GPU (not under the interpreter: a process of its own), so each such signature is built
    here, for sm_90, down to PTX: split or not, causal or tree mask, ints i32 or i64."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    built = subprocess.run([sys.executable, "-c", _BUILD_FOR_HOPPER], env=env, capture_output=True, text=True,
                           cwd=Path(__file__).parents[2], timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    assert built.stdout.split("\n")[:-1] == [f"{split} {causal} {ints} True" for split in (False, True)
                                             for causal in (False, True) for ints in ("i32", "i64")]
