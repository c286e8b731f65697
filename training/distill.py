"""Self-distillation: the base model answers the project's own instructions with the batched engine.

    python -m training distill --prompts 2000 --out runs/distill    # answers + hidden states
    python -m training distill --prompt-set varied --passages runs/distill --out runs/distill_v2

Half the answers greedy and half sampled; the final hidden state of every answer token is kept as
the engine computes it, so the base model never runs twice on the same tokens (`training.fit`
trains the heads on them).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from tqdm import tqdm

from medusa.engine import Engine
from runtime.config import SamplingParams
from runtime.loading import DTYPES, load_model
from runtime.prompt import Prompter
from training.prompts import training_prompts, varied_prompts


def distill(out: Path, num_prompts: int, max_new_tokens: int, batch_size: int, model_spec: str | None,
            seed: int, shard_size: int = 200, prompt_set: str = "templates",
            passage_folders: list[Path] = (), dtype: str | None = None) -> None:
    """Answer `num_prompts` instructions; write shards of (hidden fp16 [n, C], tokens [n]) per answer.

    `prompt_set` "templates" is training_prompts, "varied" is varied_prompts, whose passage tasks
    run over earlier answers read from `passage_folders`. `dtype` is the base model's (see
    `runtime.loading.torch_dtype`; None, float32 on the CPU).
    """
    out.mkdir(parents=True, exist_ok=True)
    done = {i for shard in out.glob("shard_*.pt") for i in torch.load(shard, weights_only=True)["prompt_ids"]}
    loaded = load_model(model_spec, dtype=dtype)
    tok = loaded.tokenizer
    if prompt_set == "templates":
        prompts = training_prompts(num_prompts, seed)
    else:
        prompts = varied_prompts(num_prompts, seed, passages(passage_folders, tok))
    todo = [i for i in range(num_prompts) if i not in done]
    prompter = Prompter(tok, chat_template=True)
    encoded = {i: prompter.encode(prompts[i][1]) for i in todo}
    max_prompt = max((len(e) for e in encoded.values()), default=0)
    engine = Engine(loaded.model, tok, loaded.eos_token_ids, max_batch_size=batch_size,
                    max_total_tokens=max_prompt + max_new_tokens, keep_hidden=True)
    tokens: dict[int, list[int]] = {}
    hidden: dict[int, list[torch.Tensor]] = {}
    finished: list[int] = []
    shard_index = len(list(out.glob("shard_*.pt")))
    bar = tqdm(total=len(todo), desc="answers", unit="answer")
    start = time.perf_counter()
    total_tokens = 0

    def requests():
        for i in todo:
            sampled = i % 2 == 1  # half greedy, half sampled answers
            tokens[i], hidden[i] = [], []
            params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.7 if sampled else 0.0,
                                    top_p=0.95 if sampled else 1.0, seed=seed * 100003 + i)
            yield i, encoded[i], params

    def write_finished() -> None:
        nonlocal shard_index, total_tokens, finished
        total_tokens += _write_shard(out / f"shard_{shard_index:04d}.pt", finished, tokens, hidden)
        shard_index += 1
        bar.set_postfix(tok_s=f"{total_tokens / (time.perf_counter() - start):.0f}")
        finished = []

    for e in engine.run(requests()):
        tokens[e.request_id] += e.token_ids
        hidden[e.request_id].append(e.hidden.to(torch.float16))
        if e.finish_reason:
            finished.append(e.request_id)
            bar.update(1)
            if len(finished) >= shard_size:
                write_finished()
    if finished:
        write_finished()
    bar.close()
    print(f"distilled {total_tokens} answer tokens in {time.perf_counter() - start:.0f} s into {out}")


def answers(folders: list[Path]):
    """Every distilled answer in the folders' shards, in order: (hidden fp16 [n, C], tokens [n])."""
    for shard in sorted(shard for folder in folders for shard in folder.glob("shard_*.pt")):
        data = torch.load(shard, weights_only=True)
        lengths = data["lengths"]
        yield from zip(data["hidden"].split(lengths), data["tokens"].split(lengths), strict=True)


def passages(folders: list[Path], tokenizer, min_chars: int = 300, max_chars: int = 1200) -> list[str]:
    """Earlier distilled answers, as text, that are long enough to extract from and short enough to read."""
    texts = []
    for _, answer in answers(folders):
        text = tokenizer.decode(answer.tolist(), skip_special_tokens=True).strip()
        if min_chars <= len(text) <= max_chars:
            texts.append(text)
    return texts


def _write_shard(path: Path, ids: list[int], tokens: dict, hidden: dict) -> int:
    seqs = [(torch.cat(hidden.pop(i))[: len(tokens[i])], torch.tensor(tokens.pop(i))) for i in ids]
    torch.save({"prompt_ids": list(ids), "hidden": torch.cat([h for h, _ in seqs]),
                "tokens": torch.cat([t for _, t in seqs]), "lengths": [len(t) for _, t in seqs]}, path)
    return sum(len(t) for _, t in seqs)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m training distill", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=2000)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path("runs/distill"))
    ap.add_argument("--prompt-set", choices=["templates", "varied"], default="templates",
                    help="templates: topic x template instructions; varied: the broader set, "
                    "with passage tasks")
    ap.add_argument("--passages", type=Path, nargs="*", default=[],
                    help="distillation folders whose answers become the varied set's passages")
    ap.add_argument("--model", help="base model (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=[*DTYPES, "auto"],
                    help="the base model's dtype (default: float32 on the CPU); auto: bfloat16 where the "
                    "CPU multiplies it natively")
    args = ap.parse_args(argv)
    with torch.inference_mode():
        distill(args.out, args.prompts, args.max_new_tokens, args.batch_size, args.model, args.seed,
                prompt_set=args.prompt_set, passage_folders=args.passages, dtype=args.dtype)
