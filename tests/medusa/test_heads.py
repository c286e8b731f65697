"""Medusa heads: the module, our format, the official format, and refusing heads of another model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from medusa.checkpoints import HeadsLoadError, load_heads, official_state_dict, save_heads, save_official
from medusa.heads import MedusaConfig, MedusaHeads, random_heads
from runtime import cpu_kernels
from runtime.config import ModelConfig
from runtime.llama import NEVER

C, V = 64, 97
BASE = ModelConfig(vocab_size=V, hidden_size=C, intermediate_size=112, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=16)


@pytest.fixture
def lm_head() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(C, V, bias=False)


@pytest.fixture
def hidden() -> torch.Tensor:
    return torch.randn(5, C, generator=torch.Generator().manual_seed(1))  # [B, C]


def assert_same_heads(a: MedusaHeads, b: MedusaHeads, hidden: torch.Tensor, lm_head: nn.Linear) -> None:
    """The same weights, and the same drafts once both multiply the same way: a loader prepares heads
    for the base model it is given (here none: MKL), `random_heads` from one row through oneDNN, and
    the two libraries sum in different orders (their bits differ on the AMD EPYC, not on the Xeon)."""
    assert a.config == b.config
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    a.prepare_for_serving()
    b.prepare_for_serving()
    assert torch.equal(a(hidden, lm_head), b(hidden, lm_head))


def test_new_heads_are_the_identity(lm_head: nn.Linear, hidden: torch.Tensor) -> None:
    heads = MedusaHeads(MedusaConfig(hidden_size=C, vocab_size=V, num_heads=3, num_layers=2))
    states = heads.hidden_states(hidden)  # [B, K, C]
    assert states.shape == (5, 3, C)
    assert torch.equal(states, hidden[:, None].expand(5, 3, C))
    logits = heads(hidden, lm_head)
    assert logits.shape == (5, 3, V) and logits.dtype == torch.float32
    assert torch.allclose(logits, lm_head(hidden)[:, None].expand(5, 3, V))


def test_every_layer_of_every_head_is_its_own_module(hidden: torch.Tensor, lm_head: nn.Linear) -> None:
    K, L = 3, 2
    heads = MedusaHeads(MedusaConfig(hidden_size=C, vocab_size=V, num_heads=K, num_layers=L))
    params = list(heads.parameters())
    assert len({p.data_ptr() for p in params}) == len(params) == K * L * 2
    assert sum(p.numel() for p in params) == K * L * (C * C + C)
    before = heads(hidden, lm_head)
    with torch.no_grad():
        heads.blocks[1][0].linear.bias.fill_(1.0)  # only head 1, only its first layer
    after = heads(hidden, lm_head)
    assert torch.equal(after[:, [0, 2]], before[:, [0, 2]])
    assert not torch.allclose(after[:, 1], before[:, 1])
    assert torch.equal(heads.blocks[1][1].linear.bias, torch.zeros(C))


def test_random_heads_guess_differently(hidden: torch.Tensor, lm_head: nn.Linear) -> None:
    config = MedusaConfig(hidden_size=C, vocab_size=V, num_heads=4)
    top = random_heads(config, seed=0)(hidden, lm_head).argmax(-1)  # [B, K]
    assert (top[:, 0] != top[:, 1]).any() and (top[:, 1] != top[:, 2]).any()
    a, b = random_heads(config, seed=3), random_heads(config, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.parametrize("shared", [True, False])
def test_our_format_round_trip(tmp_path: Path, shared: bool, hidden: torch.Tensor,
                               lm_head: nn.Linear) -> None:
    config = MedusaConfig(hidden_size=C, vocab_size=V, num_heads=3, num_layers=2, shared_lm_head=shared)
    heads = random_heads(config, seed=0)
    save_heads(heads, tmp_path)
    loaded = load_heads(tmp_path, BASE)
    assert_same_heads(loaded, heads, hidden, lm_head)


def test_official_safetensors_round_trip(tmp_path: Path, hidden: torch.Tensor, lm_head: nn.Linear) -> None:
    heads = random_heads(MedusaConfig(hidden_size=C, vocab_size=V, num_heads=3, num_layers=2,
                                      shared_lm_head=False), seed=0)
    save_official(heads, tmp_path, base_model_name_or_path="tiny/base")
    assert json.loads((tmp_path / "config.json").read_text())["medusa_num_heads"] == 3
    loaded = load_heads(tmp_path, BASE)
    assert_same_heads(loaded, heads, hidden, lm_head)


def test_official_format_of_shared_heads(tmp_path: Path, hidden: torch.Tensor, lm_head: nn.Linear,
                                         monkeypatch) -> None:
    """Loaded as served in their own dtype: where the CPU has AMX's int8 tiles they would round their
    weights to int8 (`Linear.round_to_int8`), ~1% from these exact products."""
    monkeypatch.setattr(cpu_kernels, "cpu_int8_products", lambda: False)
    heads = random_heads(MedusaConfig(hidden_size=C, vocab_size=V, num_heads=2), seed=0)
    with pytest.raises(ValueError, match="pass it"):
        save_official(heads, tmp_path)
    save_official(heads, tmp_path, lm_head=lm_head)  # each head gets a copy of lm_head
    heads.prepare_for_serving(NEVER, 0)  # as load_heads prepares float32 heads: oneDNN's copies round
    as_shared = load_heads(tmp_path, BASE, base_lm_head=lm_head)  # differently on a CPU without AVX-512
    as_own = load_heads(tmp_path, BASE)
    assert as_shared.config.shared_lm_head and not as_own.config.shared_lm_head
    assert torch.equal(as_shared(hidden, lm_head), heads(hidden, lm_head))
    exact = heads.prepare_for_training()(hidden, lm_head)  # not through the serving copy of lm_head
    assert torch.allclose(as_own(hidden, nn.Identity()), exact)  # its own projections


def test_official_pt_bf16(tmp_path: Path, hidden: torch.Tensor, lm_head: nn.Linear) -> None:
    """The published form: a pickled bf16 state dict in medusa_lm_head.pt."""
    heads = random_heads(MedusaConfig(hidden_size=C, vocab_size=V, num_heads=3, num_layers=1,
                                      shared_lm_head=False), seed=0)
    state = {k: v.to(torch.bfloat16) for k, v in official_state_dict(heads).items()}
    torch.save(state, tmp_path / "medusa_lm_head.pt")
    (tmp_path / "config.json").write_text(json.dumps({"medusa_num_heads": 3, "medusa_num_layers": 1}))
    loaded = load_heads(tmp_path, BASE)
    with torch.no_grad():  # the expectation: the same heads with weights rounded to bf16
        for p in heads.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    assert_same_heads(loaded, heads, hidden, lm_head)  # packed copies taken anew from the rounded weights


def test_pt_with_objects_is_refused(tmp_path: Path) -> None:
    torch.save({"0.0.linear.weight": Path("not a tensor")}, tmp_path / "medusa_lm_head.pt")
    with pytest.raises(HeadsLoadError, match="not a plain tensor state dict"):
        load_heads(tmp_path, BASE)


def test_head_count_comes_from_the_weights(tmp_path: Path) -> None:
    heads = random_heads(MedusaConfig(hidden_size=C, vocab_size=V, num_heads=3, shared_lm_head=False), seed=0)
    save_official(heads, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"medusa_num_heads": 5, "medusa_num_layers": 1,
                                                      "base_model_name_or_path": "tiny/base"}))
    assert load_heads(tmp_path, BASE).config.num_heads == 3


@pytest.mark.parametrize("official", [True, False])
def test_heads_of_another_model_are_refused(tmp_path: Path, official: bool) -> None:
    wrong_hidden = random_heads(MedusaConfig(hidden_size=32, vocab_size=V, shared_lm_head=False), seed=0)
    wrong_vocab = random_heads(MedusaConfig(hidden_size=C, vocab_size=50, shared_lm_head=False), seed=0)
    save = save_official if official else save_heads
    save(wrong_hidden, tmp_path / "hidden")
    save(wrong_vocab, tmp_path / "vocab")
    with pytest.raises(HeadsLoadError, match="have hidden size 32 but the base model has 64"):
        load_heads(tmp_path / "hidden", BASE)
    with pytest.raises(HeadsLoadError, match="have vocabulary size 50 but the base model has 97"):
        load_heads(tmp_path / "vocab", BASE)


def test_broken_folders_are_refused(tmp_path: Path) -> None:
    with pytest.raises(HeadsLoadError, match="no Medusa heads"):
        load_heads(tmp_path, BASE)
    with pytest.raises(HeadsLoadError, match="not a folder"):
        load_heads(tmp_path / "missing", BASE)
    heads = random_heads(MedusaConfig(hidden_size=C, vocab_size=V, num_heads=2, shared_lm_head=False), seed=0)
    state = official_state_dict(heads)
    del state["1.1.weight"]  # head 1 lost its projection
    torch.save(state, tmp_path / "medusa_lm_head.pt")
    with pytest.raises(HeadsLoadError, match="needs a projection"):
        load_heads(tmp_path, BASE)


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="num_heads"):
        MedusaConfig(hidden_size=C, vocab_size=V, num_heads=0)


def test_path_input_heads_read_exactly_the_tokens_before_their_target(hidden: torch.Tensor) -> None:
    config = MedusaConfig(hidden_size=C, vocab_size=V, num_heads=3, path_input=True)
    path = torch.randn(5, 3, C)  # embeddings of the root and the drafts after it
    assert torch.equal(MedusaHeads(config).hidden_states(hidden, path), hidden[:, None].expand(5, 3, C))
    heads = random_heads(config, seed=0)  # a new head ignores the path; a trained one does not
    states = heads.hidden_states(hidden, path)
    changed = path.clone()
    changed[:, 2] += 1.0  # the token before head 2's target: only head 2 reads it
    after = heads.hidden_states(hidden, changed)
    assert torch.equal(after[:, :2], states[:, :2]) and not torch.allclose(after[:, 2], states[:, 2])
    with pytest.raises(AssertionError, match="path_embeds"):
        heads.hidden_states(hidden)


def test_draft_vocabulary_heads_score_a_slice_and_round_trip(tmp_path: Path, hidden: torch.Tensor,
                                                             lm_head: nn.Linear) -> None:
    config = MedusaConfig(hidden_size=C, vocab_size=V, num_heads=2, path_input=True, draft_vocab_size=10)
    heads = random_heads(config, seed=0).prepare_for_serving(NEVER, 0)  # as load_heads prepares float32
    # heads: scoring through a bf16 copy where the CPU multiplies it fast
    path = torch.randn(5, 2, C)
    logits = heads(hidden, lm_head, path)  # [B, K, V']
    assert logits.shape == (5, 2, 10)
    full = lm_head(heads.hidden_states(hidden, path))  # [B, K, V]
    torch.testing.assert_close(logits, full[..., heads.draft_vocab], atol=2e-2, rtol=2e-2)
    assert torch.equal(heads.token_ids(torch.tensor([0, 9])), heads.draft_vocab[[0, 9]])
    save_heads(heads, tmp_path)
    loaded = load_heads(tmp_path, BASE)
    assert loaded.config == config and torch.equal(loaded.draft_vocab, heads.draft_vocab)
    assert torch.equal(loaded(hidden, lm_head, path), logits)
    with pytest.raises(ValueError, match="official Medusa format"):
        save_official(heads, tmp_path / "official", lm_head=lm_head)
    with pytest.raises(ValueError, match="shared_lm_head"):
        MedusaConfig(hidden_size=C, vocab_size=V, shared_lm_head=False, draft_vocab_size=10)


def test_the_preparation_not_autograd_picks_the_projection(hidden: torch.Tensor, lm_head: nn.Linear) -> None:
    """Evaluating trained heads under no_grad (training.fit) scores what training optimised, and served
    heads draft the same with autograd on or off."""
    config = MedusaConfig(hidden_size=C, vocab_size=V, num_heads=2, draft_vocab_size=10)
    heads = random_heads(config, seed=0).prepare_for_training()
    exact = lm_head(heads.hidden_states(hidden))[..., heads.draft_vocab]  # [B, K, V']
    with torch.no_grad():
        assert torch.allclose(heads(hidden, lm_head), exact, atol=1e-5)
    heads.prepare_for_serving()
    served = heads(hidden, lm_head)  # [B, K, V']
    with torch.no_grad():
        assert torch.equal(heads(hidden, lm_head), served)
    torch.testing.assert_close(served, exact, atol=2e-2, rtol=2e-2)  # a bf16 copy where the CPU has it
