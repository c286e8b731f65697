"""The one dispatch: the PyTorch path equals the naive attention, and the model's logits do not
depend on the backend (the Triton kernels run by the interpreter on the CPU)."""

import pytest
import torch

from attention import attend, plan
from tests.attention.conftest import SHAPES, TOLERANCE, make_case, random_tree_mask


@pytest.mark.parametrize("fold", [False, True], ids=["mask-per-layer", "mask-folded-in-plan"])
@pytest.mark.parametrize("slots", ["scattered", "consecutive"])
@pytest.mark.parametrize("name", sorted(SHAPES))
def test_torch_backend_matches_naive(name, slots, fold):
    lens, T, H, Hkv, D, new_mask = SHAPES[name]
    order = None if slots == "scattered" else list(range(1, 1 + len(lens)))
    case = make_case(lens, T, H, Hkv, D, new_mask, slots=order)
    batch = plan(case.slots, case.cache_lens, T, new_mask, groups=H // Hkv if fold else 1)
    assert batch.backend == "torch"
    one_call = slots == "consecutive" or len(lens) == 1  # else one SDPA call per sequence
    assert (batch.first_slot is not None) == one_call and (batch.seq_views is None) == one_call
    # SDPA reads every key up to max_len and hides some with -inf scores (NaN * 0 would be NaN):
    # poison what no sequence may see with large finite values instead
    k, v = (c.nan_to_num(1e4) for c in case.poisoned_caches())
    torch.testing.assert_close(attend(case.q, k, v, batch), case.expected(), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_torch_backend_half_precision(dtype):
    case = make_case([0, 77], 16, 6, 2, 64, random_tree_mask(16, seed=3), dtype=dtype)
    batch = plan(case.slots, case.cache_lens, 16, case.new_mask, dtype=dtype, groups=3)
    assert batch.bias.dtype == dtype and batch.bias.shape[2] == 3 * 16
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(attend(case.q, case.k_cache, case.v_cache, batch), case.expected(),
                               atol=tol, rtol=tol)


@pytest.mark.parametrize("slots", ["scattered", "consecutive"])
@pytest.mark.parametrize("name", ["decode", "decode-gqa3"])
def test_one_query_a_sequence_in_a_compiled_step_matches_naive(name, slots):
    """Compiled on the CPU, one new token attends through sums inductor fuses, not SDPA."""
    from torch._inductor.utils import run_and_get_code

    lens, T, H, Hkv, D, _ = SHAPES[name]
    case = make_case(lens, T, H, Hkv, D, None, slots=None if slots == "scattered" else list(range(len(lens))))
    max_len = max(lens) + 1
    step = torch.compile(lambda q, k, v, slots, cache_lens: attend(q, k, v, plan(slots, cache_lens, 1,
                                                                                     max_len=max_len)))
    k, v = (c.nan_to_num(1e4) for c in case.poisoned_caches())  # as above: hidden keys are masked
    out, code = run_and_get_code(step, case.q, k, v, case.slots, case.cache_lens)
    torch.testing.assert_close(out, case.expected(), atol=2e-5, rtol=2e-5)
    assert "scaled_dot_product" not in "".join(code)


def test_scattered_slots_decode_needs_no_mask():
    case = make_case([0, 33, 9], 1, 9, 3, 64)
    batch = plan(case.slots, case.cache_lens, 1)
    assert batch.seq_views is not None and batch.bias is None
    k, v = case.poisoned_caches()  # each sequence reads exactly its own keys
    torch.testing.assert_close(attend(case.q, k, v, batch), case.expected(), atol=2e-5, rtol=2e-5)


def test_single_sequence_decode_needs_no_mask():
    case = make_case([40], 1, 9, 3, 64, slots=[2], num_slots=3)
    exact = plan(case.slots, case.cache_lens, 1, max_len=41)
    assert exact.bias is None and exact.first_slot == 2
    slack = plan(case.slots, case.cache_lens, 1, max_len=43)  # keys 41, 42 must stay hidden
    assert slack.bias is not None
    for batch in (exact, slack):
        torch.testing.assert_close(attend(case.q, case.k_cache, case.v_cache, batch), case.expected(),
                                   atol=2e-5, rtol=2e-5)


def test_model_logits_equal_across_backends(tiny_llama):
    """Prefill two prompts into scattered slots, verify a 7-node tree for both, then decode a token."""
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 97, (n,), generator=gen) for n in (5, 19)]
    tree = random_tree_mask(7, seed=7)
    depth = tree.sum(-1) - 1  # [T]
    candidates = torch.randint(0, 97, (2, 7), generator=gen)
    slots = torch.tensor([2, 0])
    logits = {}
    for backend in ("torch", "triton"):
        cache = tiny_llama.new_cache(num_slots=3, max_len=48)
        outs = []
        with torch.no_grad():
            for slot, prompt in zip(slots.tolist(), prompts, strict=True):
                s = torch.tensor([slot])
                n = len(prompt)
                outs.append(tiny_llama(prompt[None], torch.arange(n)[None], cache, s,
                                       attention_backend=backend)[0])
                cache.advance(s, n)
            lens = cache.lens[slots]
            outs.extend(tiny_llama(candidates, lens[:, None] + depth, cache, slots, tree,
                                   attention_backend=backend))
            outs.extend(tiny_llama(candidates[:, :1], lens[:, None], cache, slots,
                                   attention_backend=backend))
        logits[backend] = tiny_llama.logits(torch.cat(outs))
    torch.testing.assert_close(logits["triton"], logits["torch"], atol=1e-4, rtol=0)
