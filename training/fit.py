"""Train Medusa heads on the base model's own answers (`training.distill`), with the base frozen.

    python -m training fit --data runs/distill runs/distill_v2 --out medusa/weights/smollm2-135m-instruct

K heads learn from the kept hidden states: head k at position j learns token j + 2 + k (path-input
heads also read the true tokens between position j and that target), with loss weight 0.8^k,
scoring the draft vocabulary (the most frequent answer tokens), on a held-out split by answer; the
report gives per-head top-1 / top-5 accuracy and the rank distribution that
`python -m training calibrate` turns into a tree.

Legend: M training positions, K heads, C hidden size, V vocabulary.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from medusa.checkpoints import save_heads
from medusa.heads import MedusaConfig, MedusaHeads
from runtime.loading import load_model
from training.distill import answers

IGNORE = -100  # no target (past the end of the answer)
OUTSIDE = -1  # a target outside the draft vocabulary: no loss, but a miss in the accuracies
TOP_RANKS = 10  # rank distribution kept for tree calibration


def load_data(folders: list[Path], num_heads: int, held_out: float, seed: int):
    """Training and held-out (hidden [M, C] fp16, path [M, K], labels [M, K]) from distillation shards.

    The hidden state at answer position j (j = 0 is the last prompt token) feeds the heads; head k
    learns answer token j + 1 + k, i.e. the token k + 2 positions after position j. path[:, i] is
    answer token j + i: the token the base model chose at j (the tree's root), then the true
    tokens that path-input heads read (0 past the end, where the labels are IGNORE).
    """
    parts: dict[bool, tuple[list, list, list]] = {False: ([], [], []), True: ([], [], [])}
    rng = random.Random(seed)
    for h, t in answers(folders):
        n = len(t)
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
                         "`python -m training distill` first")
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


def optimiser(params, lr: float, steps: int):
    """AdamW, its learning rate warming up over the first 5% of `steps`, then decaying on a cosine."""
    optim = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    return optim, sched


def batches(n: int, batch: int, steps: int, seed: int):
    """`steps` batches of example indices out of n, in an order reshuffled when a pass runs out."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen)
    for step in range(steps):
        start = (step * batch) % n
        if start + batch > n:
            order = torch.randperm(n, generator=gen)
        yield order[start:start + batch]


def fit(data: list[Path], out: Path, num_heads: int, num_layers: int, epochs: float, lr: float, batch: int,
        model_spec: str | None, seed: int, path_input: bool = True, draft_vocab: int = 8192,
        held_out: float = 0.05) -> dict:
    torch.manual_seed(seed)
    # frozen; the heads read its embeddings and lm_head rows themselves, so no serving copies
    base = load_model(model_spec).model.requires_grad_(False).prepare_for_training()
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
    steps = max(1, int(epochs * len(x_train) / batch))
    optim, sched = optimiser(heads.parameters(), lr, steps)
    print(f"training {num_heads} heads on {len(x_train)} positions ({len(val[0])} held out), {steps} steps, "
          f"scoring {config.scored_vocab_size} tokens")
    ckpt = out / "checkpoint"
    bar = tqdm(batches(len(x_train), batch, steps, seed), desc="heads", unit="step", total=steps)
    for step, idx in enumerate(bar):
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
    ap = argparse.ArgumentParser(prog="python -m training fit", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, nargs="+", default=[Path("runs/distill")],
                    help="distillation folders (e.g. one per `distill --seed`)")
    ap.add_argument("--out", type=Path, default=Path("runs/heads"))
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--path-input", action=argparse.BooleanOptionalAction, default=True,
                    help="head k also reads the k + 1 tokens before its target (default: on; off = Medusa)")
    ap.add_argument("--draft-vocab", type=int, default=8192,
                    help="heads score only this many most frequent answer tokens (0: the whole vocabulary)")
    ap.add_argument("--model", help="base model (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    fit(args.data, args.out, args.heads, args.layers, args.epochs, args.lr, args.batch, args.model,
        args.seed, args.path_input, args.draft_vocab)
