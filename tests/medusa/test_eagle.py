"""The EAGLE-style draft layer: its fixed-shape drafting equals the plain one, the step keeps each
sequence's window of features and tokens right, and it saves and loads."""

import json

import pytest
import torch
from safetensors.torch import save_file

from medusa.checkpoints import (
    CPU_SCORED_VOCAB,
    HeadsLoadError,
    load_drafter,
    official_eagle_state_dict,
    save_eagle,
    save_heads,
    save_official_eagle,
    scored_on,
)
from medusa.eagle import EagleConfig, EagleDrafter, draft_tokens, random_drafter, reference_draft
from medusa.engine import Engine
from medusa.heads import MedusaConfig, random_heads
from medusa.tree import build_tree, get_tree
from runtime import cpu_kernels
from runtime.config import ModelConfig, SamplingParams
from runtime.llama import Linear
from tests.conftest import Vocab, ours_from_hf, tiny_hf_model


@pytest.fixture(scope="module")
def model():
    return ours_from_hf(tiny_hf_model("llama"))


def drafter_for(model, window=8, seed=0, **options):
    return random_drafter(EagleConfig.for_base(model.config, window=window, **options), seed=seed)


@pytest.mark.parametrize("tree", [get_tree("mc_sim_7b_63"), build_tree(get_tree("cpu").choices, lookup=3),
                                  get_tree("chain")], ids=["mc_sim_7b_63", "cpu+lookup", "chain"])
@pytest.mark.parametrize("draft_vocab_size", [0, 40])
def test_fixed_shape_drafting_equals_one_sequence_per_node(model, tree, draft_vocab_size):
    """Rows with a full window and with a partly filled one (3 cached tokens of 8)."""
    drafter = drafter_for(model, draft_vocab_size=draft_vocab_size)
    gen = torch.Generator().manual_seed(0)
    C, V = model.config.hidden_size, model.config.vocab_size
    features = torch.randn(2, 8, C, generator=gen)
    tokens = torch.randint(0, V, (2, 8), generator=gen)
    lens, roots = torch.tensor([20, 3]), torch.tensor([5, 9])
    with torch.no_grad():
        fast = draft_tokens(drafter, model, features, tokens, lens, roots, tree)
    slow = reference_draft(drafter, model, features, tokens, lens, roots, tree)
    assert fast[:, 0].tolist() == [5, 9]
    assert torch.equal(fast, slow)
    assert len(set(fast[0, 1:].tolist())) > 3  # the drafts do differ from node to node


@pytest.mark.skipif(not cpu_kernels.built(), reason="no C++ compiler to build our CPU kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("int8", [False, True], ids=["own-dtype", "int8"])
def test_the_layer_in_one_call_computes_its_pytorch_lines(model, dtype, int8):
    """Serving on the CPU the draft layer is one call of our kernel; its PyTorch lines are the
    reference, within rounding (its attention sums in another order): a window's call, then a call
    that writes its keys among earlier ones under a mask that hides some of them; a query that sees
    no key gets no attention (both give the residual alone). With int8 weights both round the same
    way (the tiny model's down product, K = 112, stays in the layer's dtype: the two kinds mix)."""
    drafter = drafter_for(model).to(dtype).prepare_for_serving(int8=int8)
    assert drafter._one_call is not None
    assert [w.dtype == torch.int8 for w in drafter._one_call] == [int8] * 4 + [False]
    gen = torch.Generator().manual_seed(4)
    B, W, S, C = 2, 6, 3, model.config.hidden_size
    features, embeds = torch.randn(B, W + S, C, generator=gen), torch.randn(B, W + S, C, generator=gen)
    positions = torch.arange(W + S).expand(B, W + S).contiguous()
    causal = torch.ones(W, W, dtype=torch.bool).tril().expand(B, W, W).contiguous()
    later = torch.rand(B, S, W + S, generator=gen) < 0.6
    later[:, :, W:] = torch.eye(S, dtype=torch.bool)  # each new pair sees itself and some of the window
    later[1, 2] = False  # and one sees nothing: zeros, not NaN
    at = torch.arange(W, W + S)

    def run():
        out_w, k, v = drafter(features[:, :W], embeds[:, :W], positions[:, :W], causal)
        past = tuple(torch.cat([t, torch.zeros_like(t[:, :, :S])], 2) for t in (k, v))
        return (out_w, k, v, *drafter(features[:, W:], embeds[:, W:], positions[:, W:], later, past, at))

    with torch.no_grad():
        ours = run()
        one_call, drafter._one_call = drafter._one_call, None
        reference = run()
        drafter._one_call = one_call
    tolerance = {"atol": 2e-5, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 0.05, "rtol": 0.02}
    for a, b in zip(ours, reference, strict=True):
        assert a.dtype == b.dtype == dtype and not a.isnan().any()
        torch.testing.assert_close(a, b, **tolerance)

    # a window's call that reads the last two guesses: their bits, and every key and value, as before
    with torch.no_grad():
        last = drafter(features[:, :W], embeds[:, :W], positions[:, :W], causal, last=2)
        drafter._one_call = None
        last_reference = drafter(features[:, :W], embeds[:, :W], positions[:, :W], causal, last=2)
        drafter._one_call = one_call
    assert last[0].shape == (B, 2, C)
    assert torch.equal(last[0], ours[0][:, -2:])
    assert torch.equal(last[1], ours[1]) and torch.equal(last[2], ours[2])
    torch.testing.assert_close(last_reference[0], reference[0][:, -2:], **tolerance)
    assert torch.equal(last_reference[1], reference[1]) and torch.equal(last_reference[2], reference[2])


def test_unfilled_window_positions_are_not_read(model):
    """A row with 3 cached tokens drafts the same whatever its 5 unfilled window entries hold."""
    drafter = drafter_for(model)
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(1, 8, model.config.hidden_size, generator=gen)
    tokens = torch.randint(0, model.config.vocab_size, (1, 8), generator=gen)
    poisoned = features.clone()
    poisoned[:, :5] = float("nan")
    args = (torch.tensor([3]), torch.tensor([4]), get_tree("mc_sim_7b_63"))
    with torch.no_grad():
        assert torch.equal(draft_tokens(drafter, model, features, tokens, *args),
                           draft_tokens(drafter, model, poisoned, tokens, *args))


def test_the_step_keeps_each_window_equal_to_the_last_features_and_tokens(model):
    """After prefill and after steps that accept several tokens, each slot's window holds the final
    hidden states and tokens of its last W cached positions, as one forward over the whole text gives."""
    W, prompts = 8, [[5, 6, 7], [11, 3, 9, 2, 40, 41, 42, 1, 17, 20, 21, 22]]
    engine = Engine(model, Vocab(), (), max_batch_size=2, max_total_tokens=64, heads=drafter_for(model, W),
                    tree=build_tree(get_tree("mc_sim_7b_63").choices, lookup=6))
    texts = {}
    for i, prompt in enumerate(prompts):
        texts[i] = prompt + engine.add(i, prompt, SamplingParams(max_new_tokens=30)).token_ids
    steps = 0
    while steps < 6:
        for e in engine.step():
            texts[e.request_id] += e.token_ids
        steps += 1
        step = engine.device_step
        for i in range(2):
            slot = engine._running[i].slot
            cached = texts[i][:-1]  # the last token is pending
            assert int(step.cache.lens[slot]) == len(cached)
            full = model(torch.tensor([cached]), torch.arange(len(cached))[None], model.new_cache(1, 64),
                         torch.tensor([0]))[0]
            n = min(W, len(cached))
            assert step.window_tokens[slot, W - n:].tolist() == cached[-n:]
            torch.testing.assert_close(step.features[slot, W - n:], full[-n:], atol=1e-4, rtol=1e-4)


def test_saved_draft_layer_loads_equal_and_a_mismatch_is_refused(model, tmp_path):
    drafter = drafter_for(model, draft_vocab_size=40)
    save_eagle(drafter, tmp_path / "eagle")
    loaded = load_drafter(tmp_path / "eagle", model.config, model.lm_head)
    assert isinstance(loaded, EagleDrafter) and loaded.config == drafter.config
    for (name, a), (_, b) in zip(drafter.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    other = EagleConfig.for_base(model.config).__class__(**{**drafter.config.as_dict(), "hidden_size": 16,
                                                            "num_attention_heads": 2, "num_kv_heads": 1})
    save_eagle(EagleDrafter(other), tmp_path / "other")
    with pytest.raises(HeadsLoadError, match="hidden size 16"):
        load_drafter(tmp_path / "other", model.config, model.lm_head)


@pytest.mark.parametrize("attn_norm", [False, True], ids=["eagle-1/2 layout", "with input norm"])
@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_an_official_eagle_checkpoint_loads_and_drafts_as_the_layer_it_was_written_from(
        model, tmp_path, attn_norm, weights):
    """The official layout puts the token embedding first in fc's input, splits q/k/v and
    gate/up, and has no norm before attention: read back, the layer drafts the same tokens."""
    drafter = random_drafter(EagleConfig.for_base(model.config, attn_norm=attn_norm), seed=3)
    save_official_eagle(drafter, tmp_path)
    if weights == "pytorch_model.bin":
        (tmp_path / "model.safetensors").unlink()
        torch.save(official_eagle_state_dict(drafter), tmp_path / weights)
    loaded = load_drafter(tmp_path, model.config, model.lm_head)
    assert isinstance(loaded, EagleDrafter) and loaded.config.attn_norm == attn_norm
    gen = torch.Generator().manual_seed(2)
    features = torch.randn(2, 32, model.config.hidden_size, generator=gen)
    tokens = torch.randint(0, model.config.vocab_size, (2, 32), generator=gen)
    args = (features, tokens, torch.tensor([40, 5]), torch.tensor([3, 4]), get_tree("mc_sim_7b_63"))
    with torch.no_grad():
        assert torch.equal(draft_tokens(loaded, model, *args), draft_tokens(drafter, model, *args))
        # a reader that kept fc's halves in place would draft otherwise
        swapped = official_eagle_state_dict(drafter)
        C = model.config.hidden_size
        swapped["fc.weight"] = torch.cat([swapped["fc.weight"][:, C:], swapped["fc.weight"][:, :C]], 1)
        save_official_eagle(drafter, tmp_path / "swapped")
        save_file(swapped, tmp_path / "swapped" / "model.safetensors")
        wrong = load_drafter(tmp_path / "swapped", model.config, model.lm_head)
        assert not torch.equal(draft_tokens(wrong, model, *args), draft_tokens(drafter, model, *args))


def test_an_official_eagle_checkpoint_of_another_shape_is_refused(model, tmp_path):
    save_official_eagle(random_drafter(EagleConfig.for_base(model.config, attn_norm=False), seed=0), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 2}))
    with pytest.raises(HeadsLoadError, match="one decoder layer"):
        load_drafter(tmp_path, model.config, model.lm_head)
    (tmp_path / "config.json").write_text(json.dumps(config))
    state = official_eagle_state_dict(random_drafter(EagleConfig.for_base(model.config), seed=0))
    del state["layers.0.mlp.up_proj.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(HeadsLoadError, match="missing .'layers.0.mlp.up_proj.weight'"):
        load_drafter(tmp_path, model.config, model.lm_head)


@pytest.mark.parametrize("kind", ["eagle", "heads"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_loaded_drafter_multiplies_like_its_base_model(model, tmp_path, dtype, kind, monkeypatch):
    """Drafter products, its projection's too, follow the base model's measured answers in either dtype:
    through oneDNN's packed copies from its rows, through our kernel up to its rows (the copies, taken at
    load, give what the weights give). On a CPU without AMX's int8 tiles, that is: there the drafters
    round their weights to int8 (`Linear.round_to_int8`)."""
    monkeypatch.setattr(cpu_kernels, "cpu_int8_products", lambda: False)
    base = ours_from_hf(tiny_hf_model("llama")).to(dtype).prepare_for_serving(1, own_kernel_rows=3)
    if not base.lm_head.packable:
        pytest.skip(f"this CPU does not multiply {dtype} through oneDNN")
    C, V = base.config.hidden_size, base.config.vocab_size
    if kind == "eagle":
        save_eagle(drafter_for(model), tmp_path)
    else:
        save_heads(random_heads(MedusaConfig(C, V, path_input=True, draft_vocab_size=40), seed=0), tmp_path)
    drafter = load_drafter(tmp_path, base.config, base.lm_head, dtype=dtype)
    own_rows = base.lm_head.own_kernel_rows  # 0 where ours is not built
    linears = [m for m in drafter.modules() if isinstance(m, Linear)]
    assert all(m.packed_weight is not None for m in linears)
    assert all(m.own_kernel_rows == own_rows for m in linears)
    drafter.project(torch.randn(1, C).to(dtype), base.lm_head)
    if dtype == torch.bfloat16:
        assert drafter._projection[1].own_kernel_rows == own_rows
    inputs = [torch.randn(3, m.in_features).to(dtype) for m in linears]
    with torch.no_grad():
        packed = [m(x) for m, x in zip(linears, inputs, strict=True)]
        drafter.prepare_for_training()
        assert all(m.packed_weight is None and m.own_weight is None for m in linears)
        for m, x, out in zip(linears, inputs, packed, strict=True):
            torch.testing.assert_close(out, m(x), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("kind", ["heads", "eagle"])
def test_on_the_cpu_a_drafter_scores_the_first_tokens_of_its_draft_vocabulary(tmp_path, kind):
    """The most frequent ones, as training lists them (`CPU_SCORED_VOCAB`); on another device it
    scores them all, and a draft vocabulary no larger stays as it is."""
    n = CPU_SCORED_VOCAB
    base = ModelConfig(vocab_size=n + 500, hidden_size=64, intermediate_size=112, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=16)
    for size in (n + 300, n):
        if kind == "eagle":
            drafter = random_drafter(EagleConfig.for_base(base, window=8, draft_vocab_size=size), seed=0)
            save_eagle(drafter, tmp_path)
        else:
            config = MedusaConfig(64, base.vocab_size, path_input=True, draft_vocab_size=size)
            drafter = random_heads(config, seed=0)
            save_heads(drafter, tmp_path)
        loaded = load_drafter(tmp_path, base)
        assert loaded.config.draft_vocab_size == n == loaded.draft_vocab.numel()
        assert torch.equal(loaded.draft_vocab, drafter.draft_vocab[:n])
    assert scored_on(drafter, "cuda") is drafter and drafter.config.draft_vocab_size == n  # untouched
    wide = random_heads(MedusaConfig(64, base.vocab_size, path_input=True, draft_vocab_size=n + 300), seed=1)
    assert scored_on(wide, "cuda").draft_vocab.numel() == n + 300
