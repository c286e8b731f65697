"""`python -m benchmarks.divergence` names the operation whose rows depend on how many rows it had."""

import torch

from benchmarks import divergence


def test_an_op_whose_rows_depend_on_the_row_count_is_named_as_the_source(tiny_llama):
    tokens = torch.arange(3, 23)[None]  # [1, 20]
    clean = divergence.compare(tiny_llama, tokens, k=4)
    assert len(clean["ops"]) == len(tiny_llama.layers) * len(divergence.OPS)
    assert "attn_norm" not in clean["sources"]  # a norm treats each row alone

    # negative control: layer 0's norm shifts each row by the number of rows in its call
    hook = tiny_llama.layers[0].attn_norm.register_forward_hook(
        lambda module, args, out: out + 1e-2 * out.shape[1])
    try:
        broken = divergence.compare(tiny_llama, tokens, k=4)
    finally:
        hook.remove()
    assert broken["sources"]["attn_norm"] == [0]
    first = next(r for r in broken["ops"] if not r["outputs_equal"])
    assert (first["layer"], first["op"], first["inputs_equal"]) == (0, "attn_norm", True)
    assert first["max_diff"] > 1e-2
    assert not broken["final_equal"]
