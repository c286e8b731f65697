"""Head training data: distilled shards; head k at answer position j learns token j + 2 + k."""

from types import SimpleNamespace

import pytest
import torch

from medusa.heads import MedusaConfig, MedusaHeads
from training.distill import _write_shard, passages
from training.fit import IGNORE, OUTSIDE, draft_vocabulary, evaluate, load_data, to_draft_indices
from training.prompts import training_prompts, varied_prompts


def test_labels_are_shifted_per_head(tmp_path):
    tokens = {7: [10, 11, 12, 13, 14]}  # answer tokens t1..t5
    hidden = {7: [torch.arange(5.0)[:, None].expand(5, 3).half()]}  # position j has value j
    _write_shard(tmp_path / "shard_0000.pt", [7], tokens, hidden)
    (x, path, y), (x_val, _, _) = load_data([tmp_path], num_heads=3, held_out=0.0, seed=0)
    assert x[:, 0].tolist() == [0, 1, 2, 3, 4] and len(x_val) == 0
    # path: the token chosen at position j (the tree's root), then the true tokens head k reads
    assert path.tolist() == [[10, 11, 12], [11, 12, 13], [12, 13, 14], [13, 14, 0], [14, 0, 0]]
    # hidden at position j (j = 0: last prompt token) already predicts t(j+1) through lm_head;
    # head 0 learns t(j+2), head 1 t(j+3), head 2 t(j+4)
    assert y.tolist() == [[11, 12, 13], [12, 13, 14], [13, 14, IGNORE], [14, IGNORE, IGNORE],
                          [IGNORE, IGNORE, IGNORE]]


def test_evaluate_ranks():
    class Heads(torch.nn.Module):
        config = MedusaConfig(hidden_size=4, vocab_size=3, num_heads=2)

        def forward(self, hidden, lm_head, path_embeds):  # head 0 ranks token 2 first, head 1 second
            return torch.tensor([[[0.0, 1.0, 9.0], [0.0, 9.0, 5.0]]]).expand(len(hidden), 2, 3)

    labels = torch.tensor([[2, 2], [2, IGNORE], [OUTSIDE, 2]])
    base = SimpleNamespace(lm_head=None)
    stats = evaluate(Heads(), base, (torch.zeros(3, 4), torch.zeros(3, 2, dtype=torch.long), labels))
    assert stats["top1"] == pytest.approx([2 / 3, 0.0])  # a target outside the draft vocabulary is a miss
    assert stats["rank_probs"][1][:3] == [0.0, 1.0, 0.0]


def test_draft_vocabulary_is_the_most_frequent_tokens_and_labels_map_into_it():
    tokens = torch.tensor([5, 5, 5, 2, 2, 9, 7])
    vocab = draft_vocabulary(tokens, vocab_size=10, size=3)
    assert vocab.tolist() == [5, 2, 7]  # 7 and 9 tie: the lower id first
    heads = MedusaHeads(MedusaConfig(hidden_size=4, vocab_size=10, num_heads=1, draft_vocab_size=3))
    heads.draft_vocab.copy_(vocab)
    labels = torch.tensor([[5], [7], [9], [IGNORE]])
    assert to_draft_indices(labels, heads).tolist() == [[0], [2], [OUTSIDE], [IGNORE]]
    assert heads.token_ids(torch.tensor([2, 0])).tolist() == [7, 5]


def test_training_prompts_are_distinct_and_seeded():
    prompts = training_prompts(500, seed=3)
    assert len({p for _, p in prompts}) == 500
    assert prompts == training_prompts(500, seed=3)
    assert {c for c, _ in prompts} >= {"writing", "reasoning", "math", "coding", "translation", "qa"}


def test_varied_prompts_are_distinct_seeded_and_use_the_passages():
    passage = "Honeybees live in colonies of many thousands. Each colony has a single queen. Workers fly."
    prompts = varied_prompts(400, seed=5, passages=[passage])
    assert len({p for _, p in prompts}) == 400
    assert prompts == varied_prompts(400, seed=5, passages=[passage])
    assert prompts != varied_prompts(400, seed=6, passages=[passage])
    assert {c for c, _ in prompts} >= {"writing", "roleplay", "reasoning", "math", "coding", "stem",
                                       "humanities", "translation", "qa", "passage"}
    assert any(passage in p for c, p in prompts if c == "passage")
    assert "passage" not in {c for c, _ in varied_prompts(100, seed=5)}  # no passages, no passage tasks


def test_passages_are_earlier_answers_as_text(tmp_path):
    class Tok:
        def decode(self, ids, skip_special_tokens):
            return "x" * len(ids)

    tokens = {1: list(range(5)), 2: list(range(50)), 3: list(range(500))}
    hidden = {i: [torch.zeros(len(t), 2).half()] for i, t in tokens.items()}
    _write_shard(tmp_path / "shard_0000.pt", [1, 2, 3], tokens, hidden)
    assert passages([tmp_path], Tok(), min_chars=10, max_chars=100) == ["x" * 50]  # too short, kept, too long
