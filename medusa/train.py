"""Train Medusa heads on the base model's own answers (self-distillation), with the base frozen.

    python -m medusa.train distill --prompts 2000 --out runs/distill    # answers + hidden states
    python -m medusa.train distill --prompt-set varied --passages runs/distill --out runs/distill_v2
    python -m medusa.train fit --data runs/distill runs/distill_v2 --out medusa/weights/smollm2-135m-instruct

`distill` answers the project's own instructions (medusa.train_prompts) with our batched engine,
half greedy and half sampled, and keeps the final hidden state of every answer token as the
engine computes it, so the base model never runs twice on the same tokens. `fit` trains K heads
on those hidden states: head k at position j learns token j + 2 + k (path-input heads also read
the true tokens between position j and that target), with loss weight 0.8^k, scoring the draft
vocabulary (the most frequent answer tokens), on a held-out split by answer, and reports per-head
top-1 / top-5 accuracy and the rank distribution that `python -m medusa.tree calibrate` turns
into a tree.

Legend: M training positions, K heads, C hidden size, V vocabulary.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from medusa.config import SamplingParams
from medusa.engine import Engine
from medusa.heads import MedusaConfig, MedusaHeads, save_heads
from medusa.loading import load_model
from medusa.train_prompts import training_prompts, varied_prompts

IGNORE = -100  # no target (past the end of the answer)
OUTSIDE = -1  # a target outside the draft vocabulary: no loss, but a miss in the accuracies
TOP_RANKS = 10  # rank distribution kept for tree calibration


# ---------------------------------------------------------------- self-distillation


def distill(out: Path, num_prompts: int, max_new_tokens: int, batch_size: int, model_spec: str | None,
            seed: int, shard_size: int = 200, prompt_set: str = "templates",
            passage_folders: list[Path] = ()) -> None:
    """Answer `num_prompts` instructions; write shards of (hidden fp16 [n, C], tokens [n]) per answer.

    `prompt_set` "templates" is training_prompts, "varied" is varied_prompts, whose passage tasks
    run over earlier answers read from `passage_folders`.
    """
    out.mkdir(parents=True, exist_ok=True)
    done = {i for shard in out.glob("shard_*.pt") for i in torch.load(shard, weights_only=True)["prompt_ids"]}
    loaded = load_model(model_spec)
    tok = loaded.tokenizer
    if prompt_set == "templates":
        prompts = training_prompts(num_prompts, seed)
    else:
        prompts = varied_prompts(num_prompts, seed, passages(passage_folders, tok))
    todo = [i for i in range(num_prompts) if i not in done]
    encoded = {i: tok.apply_chat_template([{"role": "user", "content": prompts[i][1]}],
                                          add_generation_prompt=True, tokenize=True) for i in todo}
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

    def take(e) -> None:
        tokens[e.request_id] += e.token_ids
        hidden[e.request_id].append(e.hidden.to(torch.float16))
        if e.finish_reason:
            finished.append(e.request_id)
            bar.update(1)

    waiting = list(todo)
    while waiting or engine.running:
        while waiting and engine.free_slots:
            i = waiting.pop(0)
            sampled = i % 2 == 1  # half greedy, half sampled answers
            params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.7 if sampled else 0.0,
                                    top_p=0.95 if sampled else 1.0, seed=seed * 100003 + i)
            tokens[i], hidden[i] = [], []
            take(engine.add(i, encoded[i], params))
        for e in engine.step():
            take(e)
        if len(finished) >= shard_size or (not waiting and not engine.running and finished):
            total_tokens += _write_shard(out / f"shard_{shard_index:04d}.pt", finished, tokens, hidden)
            shard_index += 1
            bar.set_postfix(tok_s=f"{total_tokens / (time.perf_counter() - start):.0f}")
            finished = []
    bar.close()
    print(f"distilled {total_tokens} answer tokens in {time.perf_counter() - start:.0f} s into {out}")


def passages(folders: list[Path], tokenizer, min_chars: int = 300, max_chars: int = 1200) -> list[str]:
    """Earlier distilled answers, as text, that are long enough to extract from and short enough to read."""
    texts = []
    for shard in sorted(shard for folder in folders for shard in folder.glob("shard_*.pt")):
        data = torch.load(shard, weights_only=True)
        for answer in data["tokens"].split(data["lengths"]):
            text = tokenizer.decode(answer.tolist(), skip_special_tokens=True).strip()
            if min_chars <= len(text) <= max_chars:
                texts.append(text)
    return texts


def _write_shard(path: Path, ids: list[int], tokens: dict, hidden: dict) -> int:
    seqs = [(torch.cat(hidden.pop(i))[: len(tokens[i])], torch.tensor(tokens.pop(i))) for i in ids]
    torch.save({"prompt_ids": list(ids), "hidden": torch.cat([h for h, _ in seqs]),
                "tokens": torch.cat([t for _, t in seqs]), "lengths": [len(t) for _, t in seqs]}, path)
    return sum(len(t) for _, t in seqs)


# ---------------------------------------------------------------- head training


def load_data(folders: list[Path], num_heads: int, held_out: float, seed: int):
    """Training and held-out (hidden [M, C] fp16, path [M, K], labels [M, K]) from distillation shards.

    The hidden state at answer position j (j = 0 is the last prompt token) feeds the heads; head k
    learns answer token j + 1 + k, i.e. the token k + 2 positions after position j. path[:, i] is
    answer token j + i: the token the base model chose at j (the tree's root), then the true
    tokens that path-input heads read (0 past the end, where the labels are IGNORE).
    """
    parts: dict[bool, tuple[list, list, list]] = {False: ([], [], []), True: ([], [], [])}
    rng = random.Random(seed)
    for shard in sorted(shard for folder in folders for shard in folder.glob("shard_*.pt")):
        data = torch.load(shard, weights_only=True)
        offset = 0
        for n in data["lengths"]:
            h, t = data["hidden"][offset:offset + n], data["tokens"][offset:offset + n]
            offset += n
            labels = torch.full((n, num_heads), IGNORE, dtype=torch.long)
            path = torch.zeros(n, num_heads, dtype=torch.long)
            for k in range(num_heads):
                labels[: max(0, n - 1 - k), k] = t[1 + k:]
                path[: max(0, n - k), k] = t[k:]
            split = parts[rng.random() < held_out]
            for part, x in zip(split, (h, path, labels), strict=True):
                part.append(x)
    if not parts[False][0]:
        raise SystemExit(f"no distillation shards in {', '.join(map(str, folders))}: run "
                         "`python -m medusa.train distill` first")
    h, t, y = parts[False]
    empty = (h[0][:0], t[0][:0], y[0][:0])
    return [tuple(torch.cat(x) for x in parts[s]) if parts[s][0] else empty for s in (False, True)]


def draft_vocabulary(tokens: torch.Tensor, vocab_size: int, size: int) -> torch.Tensor:
    """The `size` most frequent token ids in `tokens` (ties by id), most frequent first."""
    counts = torch.bincount(tokens, minlength=vocab_size).double()
    counts -= torch.arange(vocab_size, dtype=torch.double) / (2 * vocab_size)  # stable order for ties
    return counts.argsort(descending=True)[:size]


def to_draft_indices(labels: torch.Tensor, heads: MedusaHeads) -> torch.Tensor:
    """Token-id labels -> indices into the heads' scored vocabulary; OUTSIDE where it lacks the token."""
    if heads.draft_vocab is None:
        return labels
    index = torch.full((heads.config.vocab_size,), OUTSIDE, dtype=torch.long)
    index[heads.draft_vocab] = torch.arange(len(heads.draft_vocab))
    return torch.where(labels == IGNORE, IGNORE, index[labels.clamp(min=0)])


def head_logits(heads: MedusaHeads, base, hidden: torch.Tensor, path: torch.Tensor) -> torch.Tensor:
    """[M, C], [M, K] -> [M, K, V']; the frozen base lm_head maps head states to (draft) words."""
    path_embeds = base.embed(path) if heads.config.path_input else None
    return heads(hidden, base.lm_head, path_embeds)


@torch.no_grad()
def evaluate(heads: MedusaHeads, base, data: tuple, batch: int = 512) -> dict:
    """Per head: top-1 / top-5 accuracy and the probability that the target is at rank r < 10.

    `data` holds draft-vocabulary labels; a target outside that vocabulary counts as rank >= 10.
    """
    hidden, path, labels = data
    K = labels.shape[1]
    ranks = torch.zeros(K, TOP_RANKS + 1)
    for i in range(0, len(hidden), batch):
        logits = head_logits(heads, base, hidden[i:i + batch].float(), path[i:i + batch])  # [b, K, V']
        y = labels[i:i + batch]
        valid = y != IGNORE
        target = logits.gather(-1, y.clamp(min=0)[..., None])  # [b, K, 1]
        rank = (logits > target).sum(-1).masked_fill(y == OUTSIDE, TOP_RANKS).clamp(max=TOP_RANKS)  # [b, K]
        for k in range(K):
            ranks[k] += torch.bincount(rank[valid[:, k], k], minlength=TOP_RANKS + 1).float()
    dist = ranks / ranks.sum(-1, keepdim=True).clamp(min=1)  # [K, 11]: last = rank >= 10
    return {"top1": dist[:, 0].tolist(), "top5": dist[:, :5].sum(-1).tolist(),
            "rank_probs": dist[:, :TOP_RANKS].tolist(), "positions": int((labels[:, 0] != IGNORE).sum())}


def fit(data: list[Path], out: Path, num_heads: int, num_layers: int, epochs: float, lr: float, batch: int,
        model_spec: str | None, seed: int, path_input: bool = True, draft_vocab: int = 8192,
        held_out: float = 0.05) -> dict:
    torch.manual_seed(seed)
    base = load_model(model_spec).model.requires_grad_(False)
    train, val = load_data(data, num_heads, held_out, seed)
    V = base.config.vocab_size
    config = MedusaConfig(hidden_size=base.config.hidden_size, vocab_size=V, num_heads=num_heads,
                          num_layers=num_layers, path_input=path_input,
                          draft_vocab_size=min(draft_vocab, V))
    heads = MedusaHeads(config)
    if heads.draft_vocab is not None:
        heads.draft_vocab.copy_(draft_vocabulary(train[1][:, 0], V, config.draft_vocab_size))
    train, val = [(h, t, to_draft_indices(y, heads)) for h, t, y in (train, val)]
    x_train, t_train, y_train = train
    weights = torch.tensor([0.8 ** k for k in range(num_heads)])
    optim = torch.optim.AdamW(heads.parameters(), lr=lr, weight_decay=0.0)
    steps = max(1, int(epochs * len(x_train) / batch))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    print(f"training {num_heads} heads on {len(x_train)} positions ({len(val[0])} held out), {steps} steps, "
          f"scoring {config.scored_vocab_size} tokens")
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x_train), generator=gen)
    ckpt = out / "checkpoint"
    bar = tqdm(range(steps), desc="heads", unit="step")
    for step in bar:
        start = (step * batch) % len(x_train)
        if start + batch > len(x_train):
            order = torch.randperm(len(x_train), generator=gen)
        idx = order[start:start + batch]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = head_logits(heads, base, x_train[idx].float(), t_train[idx])  # [b, K, V']
        y = y_train[idx].masked_fill(y_train[idx] == OUTSIDE, IGNORE)
        losses = torch.stack([F.cross_entropy(logits[:, k].float(), y[:, k], ignore_index=IGNORE)
                              for k in range(num_heads)])
        loss = (weights * losses.nan_to_num()).sum()
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", head0=f"{losses[0].item():.3f}")
        if (step + 1) % 1000 == 0:
            save_heads(heads, ckpt)
    heads.eval()
    train_stats = evaluate(heads, base, tuple(x[:4000] for x in train))
    val_stats = evaluate(heads, base, val)
    report = {"held_out": val_stats, "train_sample": {k: train_stats[k] for k in ("top1", "top5")},
              "steps": steps, "batch": batch, "lr": lr, "epochs": epochs, "seed": seed,
              "train_positions": len(x_train), "held_out_positions": len(val[0]),
              "num_heads": num_heads, "num_layers": num_layers, "path_input": path_input,
              "draft_vocab_size": config.draft_vocab_size}
    save_heads(heads.to(torch.bfloat16), out)  # bf16 halves the file; drafts need no more precision
    (out / "training.json").write_text(json.dumps(report, indent=1))
    for k in range(num_heads):
        print(f"head {k}: held-out top-1 {val_stats['top1'][k]:.3f} top-5 {val_stats['top5'][k]:.3f} "
              f"(train top-1 {train_stats['top1'][k]:.3f})")
    return report


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    d = sub.add_parser("distill", help="self-distillation: the base model answers our instructions")
    d.add_argument("--prompts", type=int, default=2000)
    d.add_argument("--max-new-tokens", type=int, default=256)
    d.add_argument("--batch-size", type=int, default=32)
    d.add_argument("--out", type=Path, default=Path("runs/distill"))
    d.add_argument("--prompt-set", choices=["templates", "varied"], default="templates",
                   help="templates: topic x template instructions; varied: the broader set, "
                   "with passage tasks")
    d.add_argument("--passages", type=Path, nargs="*", default=[],
                   help="distillation folders whose answers become the varied set's passages")
    f = sub.add_parser("fit", help="train heads on distilled hidden states")
    f.add_argument("--data", type=Path, nargs="+", default=[Path("runs/distill")],
                   help="distillation folders (e.g. one per `distill --seed`)")
    f.add_argument("--out", type=Path, default=Path("runs/heads"))
    f.add_argument("--heads", type=int, default=4)
    f.add_argument("--layers", type=int, default=1)
    f.add_argument("--epochs", type=float, default=2.0)
    f.add_argument("--lr", type=float, default=1e-3)
    f.add_argument("--batch", type=int, default=256)
    f.add_argument("--path-input", action=argparse.BooleanOptionalAction, default=True,
                   help="head k also reads the k + 1 tokens before its target (default: on; off = Medusa)")
    f.add_argument("--draft-vocab", type=int, default=8192,
                   help="heads score only this many most frequent answer tokens (0: the whole vocabulary)")
    for p in (d, f):
        p.add_argument("--model", help="base model (default: the embedded SmolLM2-135M-Instruct)")
        p.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_grad_enabled(args.command == "fit")
    if args.command == "distill":
        distill(args.out, args.prompts, args.max_new_tokens, args.batch_size, args.model, args.seed,
                prompt_set=args.prompt_set, passage_folders=args.passages)
    else:
        fit(args.data, args.out, args.heads, args.layers, args.epochs, args.lr, args.batch, args.model,
            args.seed, args.path_input, args.draft_vocab)


if __name__ == "__main__":
    main()
