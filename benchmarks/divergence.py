"""Where verification and plain decoding part ways, operation by operation.

    python -m benchmarks.divergence [--model PATH] [--dtype bfloat16] [--tokens 8] [--json]

Greedy speculation is token-exact only when one forward over k new tokens computes, for each of them,
bit for bit what k one-token forwards compute: a verified token's K/V stay in the cache and every later
token reads them. This prefills a prompt, then runs its next k tokens both ways (k forwards of one
token; one forward of k tokens under the causal mask, as a chain tree is verified) and compares the
outputs of every operation of every layer. An operation is a *source* where its inputs were equal both
ways and its outputs are not: its kernel's result for a row depends on how many rows (or keys) the call
had. Downstream operations then differ only because their inputs do.

Measured (Intel Xeon with AMX, SmolLM2-135M, 8 tokens): in bfloat16 the first difference is layer 0's
`attend` (6e-5; SDPA's result for a query depends on how many queries and keys the call has), while
every bfloat16 linear layer gives equal rows for 1 and for 8 rows; in float32 it is layer 0's `qkv`
(2e-6: MKL multiplies one row, oneDNN's packed weights 8), too small to flip a greedy token in 40
prompts, where bfloat16's 1-ulp differences grow through the layers to 0.9 in the logits.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from contextlib import contextmanager

import torch

import attention
from runtime.loading import load_model

OPS = ("attn_norm", "qkv", "attend", "o", "mlp_norm", "gate_up", "down")
PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time, in a small village by the sea"


@contextmanager
def recording(model: torch.nn.Module) -> Iterator[list[dict[str, tuple[torch.Tensor, torch.Tensor]]]]:
    """Per forward call, per layer: {op: (input, output)} of every op in OPS (a list of layer dicts
    appended to as the model runs)."""
    calls: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []
    current = {"layer": 0}
    hooks = []
    for i, block in enumerate(model.layers):
        def start(module, args, i=i):
            current["layer"] = i
            calls.append({})

        hooks.append(block.register_forward_pre_hook(start))
        for name in OPS:
            if name != "attend":
                hooks.append(getattr(block, name).register_forward_hook(
                    lambda module, args, out, name=name: calls[-1].__setitem__(name, (args[0], out))))
    attend = attention.attend

    def recorded_attend(q, k_cache, v_cache, batch):
        out = attend(q, k_cache, v_cache, batch)
        calls[-1]["attend"] = (q, out)
        return out

    attention.attend = recorded_attend
    try:
        yield calls
    finally:
        attention.attend = attend
        for hook in hooks:
            hook.remove()


def run(model, tokens: torch.Tensor, prefix: int, chunks: list[int]):
    """Prefill `prefix` tokens, then the rest in `chunks`; returns the per-layer records of the chunks
    (new tokens only, concatenated along the token dimension) and their final hidden states."""
    cache = model.new_cache(1, tokens.shape[1] + 1)
    slots = torch.tensor([0])
    model(tokens[:, :prefix], torch.arange(prefix)[None], cache, slots)
    cache.advance(slots, prefix)
    position, hidden = prefix, []
    with recording(model) as calls:
        for n in chunks:
            hidden.append(model(tokens[:, position:position + n], torch.arange(position, position + n)[None],
                                cache, slots, one_call_layers=False))  # step by step, for the hooks
            cache.advance(slots, n)
            position += n
    L = len(model.layers)
    layers = []
    for i in range(L):
        per_call = calls[i::L]
        layers.append({op: tuple(torch.cat([c[op][j] for c in per_call], dim=2 if op == "attend" else 1)
                                 for j in (0, 1)) for op in OPS})
    return layers, torch.cat(hidden, 1)


@torch.inference_mode()
def compare(model, tokens: torch.Tensor, k: int) -> dict:
    prefix = tokens.shape[1] - k
    one_by_one, h1 = run(model, tokens, prefix, [1] * k)
    together, hk = run(model, tokens, prefix, [k])
    rows, sources = [], {}
    for i, (a, b) in enumerate(zip(one_by_one, together, strict=True)):
        for op in OPS:
            (in_a, out_a), (in_b, out_b) = a[op], b[op]
            equal_in, equal_out = torch.equal(in_a, in_b), torch.equal(out_a, out_b)
            if equal_in and not equal_out:
                sources.setdefault(op, []).append(i)
            rows.append({"layer": i, "op": op, "inputs_equal": equal_in, "outputs_equal": equal_out,
                         "max_diff": (out_a.float() - out_b.float()).abs().max().item()})
    logits1, logitsk = model.logits(h1), model.logits(hk)
    return {"dtype": str(model.embed.weight.dtype).removeprefix("torch."), "tokens": k, "sources": sources,
            "final_equal": torch.equal(h1, hk), "logits_max_diff": (logits1 - logitsk).abs().max().item(),
            "argmax_agree": int((logits1.argmax(-1) == logitsk.argmax(-1)).sum()), "ops": rows}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.divergence", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model folder or GGUF file (default: the embedded SmolLM2-135M)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tokens", type=int, default=8, help="tokens verified together (k)")
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--json", action="store_true", help="print one JSON line")
    args = ap.parse_args(argv)
    loaded = load_model(args.model, device="cpu", dtype=args.dtype)
    tokens = loaded.tokenizer(args.prompt, return_tensors="pt").input_ids
    if tokens.shape[1] <= args.tokens:
        ap.error(f"the prompt has {tokens.shape[1]} tokens: give one longer than --tokens")
    result = compare(loaded.model, tokens, args.tokens)
    if args.json:
        print(json.dumps({key: value for key, value in result.items() if key != "ops"}))
        return result
    first = next((r for r in result["ops"] if not r["outputs_equal"]), None)
    print(f"{result['dtype']}, {args.tokens} tokens one by one vs together:")
    print("  first difference:", "none" if first is None else
          f"layer {first['layer']} {first['op']} (max |diff| {first['max_diff']:.3g})")
    for op, layers in result["sources"].items():
        print(f"  source {op}: inputs equal, outputs not, in layers {layers}")
    print(f"  final hidden states equal: {result['final_equal']}; logits max |diff| "
          f"{result['logits_max_diff']:.3g}; argmax agrees for {result['argmax_agree']} of {args.tokens}")
    return result


if __name__ == "__main__":
    main()
