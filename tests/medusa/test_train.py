"""Head training data: head k at answer position j learns token j + 2 + k; prompts are ours."""

import torch

from medusa.train import IGNORE, _write_shard, evaluate, load_data
from medusa.train_prompts import training_prompts


def test_labels_are_shifted_per_head(tmp_path):
    tokens = {7: [10, 11, 12, 13, 14]}  # answer tokens t1..t5
    hidden = {7: [torch.arange(5.0)[:, None].expand(5, 3).half()]}  # position j has value j
    _write_shard(tmp_path / "shard_0000.pt", [7], tokens, hidden)
    (x, y), (x_val, _) = load_data(tmp_path, num_heads=3, held_out=0.0, seed=0)
    assert x[:, 0].tolist() == [0, 1, 2, 3, 4] and len(x_val) == 0
    # hidden at position j (j = 0: last prompt token) already predicts t(j+1) through lm_head;
    # head 0 learns t(j+2), head 1 t(j+3), head 2 t(j+4)
    assert y.tolist() == [[11, 12, 13], [12, 13, 14], [13, 14, IGNORE], [14, IGNORE, IGNORE],
                          [IGNORE, IGNORE, IGNORE]]


def test_evaluate_ranks():
    class Heads(torch.nn.Module):
        def forward(self, hidden, lm_head):  # head 0 ranks token 2 first, head 1 ranks it second
            return torch.tensor([[[0.0, 1.0, 9.0], [0.0, 9.0, 5.0]]]).expand(len(hidden), 2, 3)

    labels = torch.tensor([[2, 2], [2, IGNORE]])
    stats = evaluate(Heads(), None, torch.zeros(2, 4), labels)
    assert stats["top1"] == [1.0, 0.0]
    assert stats["rank_probs"][1][:3] == [0.0, 1.0, 0.0]


def test_training_prompts_are_distinct_and_seeded():
    prompts = training_prompts(500, seed=3)
    assert len({p for _, p in prompts}) == 500
    assert prompts == training_prompts(500, seed=3)
    assert {c for c, _ in prompts} >= {"writing", "reasoning", "math", "coding", "translation", "qa"}
