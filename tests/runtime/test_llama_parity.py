"""Our runtime's logits equal transformers' own model's, for each supported family."""

import pytest
import torch

from tests.conftest import FAMILIES, ours_from_hf, tiny_hf_model


@pytest.mark.parametrize("packed", [False, True], ids=["mkl", "onednn"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_prefill_logits_match_transformers(family, packed):
    hf = tiny_hf_model(family)
    ours = ours_from_hf(hf)
    if packed:
        ours.pack()
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
    hf = tiny_hf_model(family)
    ours = ours_from_hf(hf)
    if packed:
        ours.pack()
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
