"""Draft-layer training: the unrolled passes compute what drafting computes, segments and targets
line up with the distilled answers, and a short run learns."""

import torch

from medusa.eagle import EagleConfig, random_drafter
from tests.conftest import ours_from_hf, tiny_hf_model
from training.distill import _write_shard
from training.eagle import IGNORE, load_segments, pass_masks, targets, unrolled


def test_pass_d_at_pair_j_is_drafting_d_levels_below_the_root_pair_j_minus_d():
    """Pass d's output at pair j equals the layer over one explicit causal sequence: the true pairs
    of the window ending at pair j - d, then d pairs of its own guesses with the true tokens."""
    model = ours_from_hf(tiny_hf_model("llama"))
    W, S, D = 4, 12, 3
    drafter = random_drafter(EagleConfig.for_base(model.config, window=W), seed=0).prepare_for_training()
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, S, model.config.hidden_size, generator=gen)
    tokens = torch.randint(0, model.config.vocab_size, (1, S), generator=gen)
    with torch.no_grad():
        outs = unrolled(drafter, model, hidden, tokens, pass_masks(S, W, D))

        def explicit(j: int, d: int) -> torch.Tensor:  # d levels below the root pair r = j - d
            r = j - d
            first = max(0, r - W + 1)
            feats, toks = [hidden[0, first:r + 1]], [tokens[0, first:r + 1]]
            guess = None
            for e in range(d + 1):
                if e:
                    feats.append(guess[None])
                    toks.append(tokens[0, r + e:r + e + 1])
                x, t = torch.cat(feats)[None], torch.cat(toks)[None]
                n = x.shape[1]
                causal = torch.ones(1, n, n, dtype=torch.bool).tril()
                guess = drafter(x, model.embed(t), torch.arange(first, first + n)[None], causal)[0][0, -1]
            return guess

        for d in range(D):
            for j in (d, d + 2, S - 1):
                torch.testing.assert_close(outs[d][0, j], explicit(j, d), atol=1e-5, rtol=1e-5)


def test_segments_and_targets_follow_the_answers(tmp_path):
    tokens = {3: [10, 11, 12, 13, 14]}
    hidden = {3: [torch.arange(5.0)[:, None].expand(5, 2).half()]}
    _write_shard(tmp_path / "shard_0000.pt", [3], tokens, hidden)
    (h, t, n), val = load_segments([tmp_path], length=3, held_out=0.0, seed=0)
    assert val is None
    assert t.tolist() == [[10, 11, 12], [13, 14, 0]] and n.tolist() == [3, 2]
    assert h[:, :, 0].tolist() == [[0, 1, 2], [3, 4, 0]]
    index = torch.arange(20)
    # pair j (hidden j, token j) guesses the token j + 1; pass d has no root pair before j = d
    assert targets(t, n, 0, index).tolist() == [[11, 12, IGNORE], [14, IGNORE, IGNORE]]
    assert targets(t, n, 1, index).tolist() == [[IGNORE, 12, IGNORE], [IGNORE, IGNORE, IGNORE]]


def test_training_masks_see_only_the_window_and_the_path():
    (m0, m1) = pass_masks(S=5, W=2, D=2)
    assert m0.int().tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 1, 1, 0],
                                 [0, 0, 0, 1, 1]]
    # pass 1 at pair j: true pairs j - 2 < i <= j - 1, then its own guessed pair j
    assert m1[:, :5].int().tolist() == [[0] * 5, [1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 1, 1, 0, 0],
                                        [0, 0, 1, 1, 0]]
    assert torch.equal(m1[:, 5:], torch.eye(5, dtype=torch.bool))


def test_a_short_run_learns_a_pattern(tmp_path, monkeypatch):
    """Answers that count up by one: after 60 steps the layer guesses depth 1 and 2 far above chance."""
    from training import eagle

    model = ours_from_hf(tiny_hf_model("llama"))
    V = model.config.vocab_size
    with torch.no_grad():
        for i in range(40):
            start = (7 * i) % (V - 30)
            seq = torch.arange(start, start + 24)
            h = model(seq[None], torch.arange(24)[None], model.new_cache(1, 24), torch.tensor([0]))[0]
            _write_shard(tmp_path / f"shard_{i:04d}.pt", [i], {i: seq.tolist()}, {i: [h.half()]})
    monkeypatch.setattr(eagle, "load_model", lambda spec: type("Loaded", (), {"model": model})())
    report = eagle.fit_eagle([tmp_path], tmp_path / "out", window=8, depths=2, segment=16, epochs=30, lr=3e-3,
                             batch=8, model_spec=None, seed=0, draft_vocab=0, held_out=0.0)
    top1 = report["train_sample"]["top1"]
    assert top1[0] > 0.5 and top1[1] > 0.3, top1
    assert (tmp_path / "out" / "eagle_config.json").is_file()
