"""Self-distillation writes each answer's tokens with the hidden states of the dtype it was asked for."""

import torch

from training.distill import answers, distill


def test_distill_keeps_every_answer_token_with_its_hidden_state_in_the_dtype_asked(tmp_path):
    runs = {}
    for dtype in (None, "bfloat16"):  # None: float32 on the CPU
        out = tmp_path / str(dtype)
        distill(out, num_prompts=2, max_new_tokens=6, batch_size=2, model_spec=None, seed=0, dtype=dtype)
        runs[dtype] = list(answers([out]))
    for kept in runs.values():
        assert len(kept) == 2
        for hidden, tokens in kept:
            assert hidden.dtype == torch.float16 and hidden.shape == (len(tokens), 576)
            assert 0 < len(tokens) <= 6 and torch.isfinite(hidden).all()
    # prompt 0's answer is greedy: the same first token in either dtype, from hidden states that differ
    (fp32, tokens32), (bf16, tokens16) = runs[None][0], runs["bfloat16"][0]
    assert tokens32[0] == tokens16[0]
    assert (fp32[0].float() - bf16[0].float()).abs().max() > 1e-2
