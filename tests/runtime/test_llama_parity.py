"""Our runtime's logits equal transformers' own model's, for each supported family, prepared for
serving (oneDNN) or for training (MKL); and the preparation, not autograd, picks the path."""

import pytest
import torch
import torch.nn.functional as F

from runtime.llama import MEASURED_ROWS, NEVER, Linear, measure_packed_from_rows
from tests.conftest import FAMILIES, ours_from_hf, tiny_hf_model


def models(family: str, packed: bool):
    """transformers' tiny model of `family` and ours with its weights, packed for serving or not."""
    hf = tiny_hf_model(family)
    ours = ours_from_hf(hf)
    return hf, ours.prepare_for_serving() if packed else ours


@pytest.mark.parametrize("packed", [False, True], ids=["mkl", "onednn"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_prefill_logits_match_transformers(family, packed):
    hf, ours = models(family, packed)
    tokens = torch.randint(0, 97, (1, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens).logits
        cache = ours.new_cache(num_slots=2, max_len=64)
        slots = torch.tensor([1])
        hidden = ours(tokens, torch.arange(23)[None], cache, slots)
        got = ours.logits(hidden)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("packed", [False, True], ids=["mkl", "onednn"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_batched_decode_logits_match_transformers(family, packed):
    """Two sequences of different lengths prefilled separately, then decoded together."""
    hf, ours = models(family, packed)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 97, (n,), generator=gen) for n in (5, 17)]
    nxt = torch.randint(0, 97, (2, 3), generator=gen)
    cache = ours.new_cache(num_slots=3, max_len=64)
    slots = torch.tensor([2, 0])
    with torch.no_grad():
        for slot, p in zip(slots.tolist(), prompts, strict=True):
            s = torch.tensor([slot])
            ours(p[None], torch.arange(len(p))[None], cache, s)
            cache.advance(s, len(p))
        lens = torch.tensor([len(p) for p in prompts])
        positions = lens[:, None] + torch.arange(3)
        got = ours.logits(ours(nxt, positions, cache, slots))
        for b, p in enumerate(prompts):
            expected = hf(torch.cat([p, nxt[b]])[None]).logits[0, -3:]
            torch.testing.assert_close(got[b], expected, atol=1e-4, rtol=0)


def test_serving_path_does_not_depend_on_autograd():
    """Evaluating under no_grad must score what serving serves, and training what training trains: the
    two GEMM libraries sum in different orders (about 1e-6 apart at this width; 0 at the tiny models')."""
    torch.manual_seed(0)
    linear = Linear(576, 1536)
    x = torch.randn(3, 576)  # [rows, C]
    linear.pack()
    with torch.no_grad():
        served = linear(x)
    assert torch.equal(linear(x), served)
    linear.unpack()
    torch.testing.assert_close(linear(x), served, atol=1e-5, rtol=0)
    with torch.no_grad():
        assert torch.equal(linear(x), F.linear(x, linear.weight, linear.bias))


def test_a_model_prepared_for_training_after_serving_is_a_fresh_one():
    ours = ours_from_hf(tiny_hf_model("llama"))
    tokens = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(3))

    def hidden():
        cache = ours.new_cache(num_slots=1, max_len=16)
        with torch.no_grad():
            return ours(tokens, torch.arange(9)[None], cache, torch.tensor([0]))  # [1, 9, C]

    fresh = hidden()
    ours.prepare_for_serving().prepare_for_training()
    assert torch.equal(hidden(), fresh)
    ours.logits(fresh).logsumexp(-1).sum().backward()  # what training the heads back-propagates through
    assert ours.lm_head.weight.grad is not None


def test_products_below_the_measured_size_keep_mkl_and_larger_ones_use_the_packed_copy():
    torch.manual_seed(0)
    linear = Linear(576, 1536)
    linear.pack(from_rows=4)
    with torch.no_grad():
        few, many = torch.randn(3, 576), torch.randn(2, 2, 576)  # 3 rows; 4 rows as [B, T, C]
        assert torch.equal(linear(few), F.linear(few, linear.weight, linear.bias))
        packed = torch.ops.mkldnn._linear_pointwise(many, linear.packed_weight, linear.bias, "none", [], "")
        assert torch.equal(linear(many), packed)


def test_the_packed_size_is_measured_on_the_model_and_never_for_what_onednn_cannot_pack():
    ours = ours_from_hf(tiny_hf_model("llama"))
    assert measure_packed_from_rows(ours) in (*MEASURED_ROWS, NEVER)
    assert measure_packed_from_rows(ours.half()) == NEVER  # oneDNN has no fp16 products on these CPUs
    ours.half().prepare_for_serving()
    assert ours.lm_head.packed_weight is None


def test_the_rope_table_holds_each_positions_rotation_and_follows_the_cache_and_dtype():
    """A step looks its positions' cos and signed sin up (`Llama.rope_table`): the bits that computing
    them at those positions gives, for a longer cache after a shorter one, and in the weights' dtype."""
    ours = ours_from_hf(tiny_hf_model("llama"))

    def computed(positions: torch.Tensor) -> torch.Tensor:
        freqs = positions[:, None].float() * ours.inv_freq
        cos, sin = freqs.cos(), freqs.sin()
        both = torch.stack([torch.cat([cos, cos], -1), torch.cat([-sin, sin], -1)])
        return both.to(ours.embed.weight.dtype)

    short = ours.rope_table(40)
    assert short.shape[1] >= 40 and torch.equal(short[:, :40], computed(torch.arange(40)))
    ours.new_cache(num_slots=1, max_len=100)  # a longer cache: the table grows with it
    longer = ours._rope_table
    assert longer.shape[1] >= 100 and torch.equal(longer[:, [0, 39, 99]], computed(torch.tensor([0, 39, 99])))
    ours.to(torch.bfloat16)
    table = ours.rope_table(10)
    assert table.dtype == torch.bfloat16 and torch.equal(table[:, :10], computed(torch.arange(10)))
