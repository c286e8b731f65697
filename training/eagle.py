"""Train the EAGLE-style draft layer (`medusa.eagle`) on the base model's own answers, base frozen.

    python -m training eagle --data runs/distill --out medusa/weights/smollm2-135m-instruct-eagle

The distilled answers (`training.distill`) keep the final hidden state of every answer position,
so pair j of an answer is (hidden j, token j): the feature that chose token j, then token j; its
output should be hidden j + 1, which chooses token j + 1.

Training runs the layer as it drafts (a "training-time test", as EAGLE-3): pass 0 reads the true
features, in a window of W pairs; pass d reads, at pair j, the guess pass d - 1 made at pair j - 1,
and sees the true pairs up to j - d and its own guessed pairs j - d + 1 .. j -- exactly what a node
d levels below the root sees when drafting. Pass d thus learns tree depth d + 1. Loss per pass
(weight 0.8^d): cross-entropy of the next token over the draft vocabulary, plus `feature_weight`
x smooth-L1 to the true next feature (EAGLE's regression). The report gives held-out top-1 / top-5
and rank distributions per depth, in the format `python -m training calibrate` reads.

Legend: B segments, S pairs per segment, W window, D passes (depths), C hidden size, V' draft vocabulary.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from medusa.checkpoints import save_eagle
from medusa.eagle import EagleConfig, EagleDrafter
from runtime.loading import load_model
from training.distill import answers
from training.fit import IGNORE, TOP_RANKS, batches, draft_vocabulary, optimiser


def load_segments(folders: list[Path], length: int, held_out: float, seed: int):
    """(training, held-out) segments of answers: (hidden fp16 [M, S, C], tokens [M, S], lengths [M]);
    an answer longer than S is cut into segments, the last one padded. Split by answer."""
    parts = {False: ([], [], []), True: ([], [], [])}
    rng = random.Random(seed)
    for h, t in answers(folders):
        n = len(t)
        part = parts[rng.random() < held_out]
        for s in range(0, n - 1, length):
            m = min(length, n - s)
            part[0].append(F.pad(h[s:s + m], (0, 0, 0, length - m)))
            part[1].append(F.pad(t[s:s + m], (0, length - m)))
            part[2].append(m)
    if not parts[False][0]:
        raise SystemExit(f"no distillation shards in {', '.join(map(str, folders))}: run "
                         "`python -m training distill` first")
    return [(torch.stack(h), torch.stack(t), torch.tensor(n)) if h else None
            for h, t, n in (parts[False], parts[True])]


def pass_masks(S: int, W: int, D: int) -> list[torch.Tensor]:
    """For each pass d: [S, (d + 1) S] bool, which keys pair j sees: the true pairs j - d - W < i <= j - d
    (pass 0's), and the guessed pair j - d + e of each pass e = 1..d (its path below the root)."""
    j = torch.arange(S)[:, None]
    i = torch.arange(S)[None, :]
    masks = []
    for d in range(D):
        parts = [(i <= j - d) & (i > j - d - W)] + [i == j - d + e for e in range(1, d + 1)]
        masks.append(torch.cat(parts, dim=1))
    return masks


def unrolled(drafter: EagleDrafter, base, hidden: torch.Tensor, tokens: torch.Tensor,
             masks: list[torch.Tensor], noise: float = 0.0) -> list[torch.Tensor]:
    """The guessed next features of every pass, [B, S, C] each (pass d's output at pair j guesses
    hidden j + 1 having drafted d levels from the root pair j - d). `noise`: the true features read
    with uniform noise in [-noise, noise] added (EAGLE's regularisation)."""
    B, S, C = hidden.shape
    embeds = base.embed(tokens)  # [B, S, C]
    positions = torch.arange(S).expand(B, S)
    outs, keys, values = [], None, None
    features = hidden + noise * (2 * torch.rand_like(hidden) - 1) if noise else hidden
    for mask in masks:
        past = None if keys is None else (keys, values)
        out, keys, values = drafter(features, embeds, positions, mask.expand(B, *mask.shape), past)
        outs.append(out)
        features = F.pad(out[:, :-1], (0, 0, 1, 0))  # pair j reads the guess made at pair j - 1
    return outs


def targets(tokens: torch.Tensor, lengths: torch.Tensor, d: int, index: torch.Tensor) -> torch.Tensor:
    """[B, S] pass d's target: the draft-vocabulary index of token j + 1, IGNORE where there is none
    (past the answer, or before pair d: no root pair), -1 for a token outside the draft vocabulary."""
    B, S = tokens.shape
    j = torch.arange(S)
    valid = (j[None] + 1 < lengths[:, None]) & (j[None] >= d)
    nxt = index[F.pad(tokens[:, 1:], (0, 1))]
    return torch.where(valid, nxt, IGNORE)


@torch.no_grad()
def evaluate(drafter: EagleDrafter, base, data, masks, index, batch: int = 32) -> dict:
    """Per depth: top-1 / top-5 and the probability that the next token is at rank r < 10."""
    hidden, tokens, lengths = data
    D = len(masks)
    ranks = torch.zeros(D, TOP_RANKS + 1)
    for s in range(0, len(hidden), batch):
        h, t, n = hidden[s:s + batch].float(), tokens[s:s + batch], lengths[s:s + batch]
        for d, out in enumerate(unrolled(drafter, base, h, t, masks)):
            y = targets(t, n, d, index)
            logits = drafter.project(out, base.lm_head)  # [B, S, V']
            target = logits.gather(-1, y.clamp(min=0)[..., None])[..., 0]
            rank = (logits > target[..., None]).sum(-1).masked_fill(y == -1, TOP_RANKS).clamp(max=TOP_RANKS)
            ranks[d] += torch.bincount(rank[y != IGNORE], minlength=TOP_RANKS + 1).float()
    dist = ranks / ranks.sum(-1, keepdim=True).clamp(min=1)
    return {"top1": dist[:, 0].tolist(), "top5": dist[:, :5].sum(-1).tolist(),
            "rank_probs": dist[:, :TOP_RANKS].tolist(), "positions": int(ranks[0].sum())}


def fit_eagle(data: list[Path], out: Path, window: int, depths: int, segment: int, epochs: float, lr: float,
              batch: int, model_spec: str | None, seed: int, draft_vocab: int = 8192,
              feature_weight: float = 0.2, held_out: float = 0.05, noise: float = 0.0,
              from_last_layer: bool = False) -> dict:
    torch.manual_seed(seed)
    started = time.perf_counter()
    base = load_model(model_spec).model.requires_grad_(False).prepare_for_training()
    train, val = load_segments(data, segment, held_out, seed)
    V = base.config.vocab_size
    config = EagleConfig.for_base(base.config, window=window, draft_vocab_size=min(draft_vocab, V))
    drafter = EagleDrafter(config)
    if from_last_layer:  # the base's own last layer as the starting point
        drafter.load_state_dict(base.layers[-1].state_dict(), strict=False)
    index = torch.arange(V)  # token id -> draft-vocabulary index (-1 outside it)
    if drafter.draft_vocab is not None:
        answer_tokens = train[1][torch.arange(segment)[None] < train[2][:, None]]
        drafter.draft_vocab.copy_(draft_vocabulary(answer_tokens, V, config.draft_vocab_size))
        index = torch.full((V,), -1, dtype=torch.long)
        index[drafter.draft_vocab] = torch.arange(config.draft_vocab_size)
    masks = pass_masks(segment, window, depths)
    weights = [0.8 ** d for d in range(depths)]
    steps = max(1, int(epochs * len(train[0]) / batch))
    optim, sched = optimiser(drafter.parameters(), lr, steps)
    print(f"training a draft layer on {int(train[2].sum())} positions in {len(train[0])} segments of "
          f"{segment} ({0 if val is None else int(val[2].sum())} held out), window {window}, "
          f"{depths} depths, {steps} steps")
    bar = tqdm(batches(len(train[0]), batch, steps, seed), desc="eagle", unit="step", total=steps)
    for step, idx in enumerate(bar):
        h, t, n = train[0][idx].float(), train[1][idx], train[2][idx]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs = unrolled(drafter, base, h, t, masks, noise)
        loss, first = 0.0, None
        for d, guess in enumerate(outs):
            y = targets(t, n, d, index)
            logits = drafter.project(guess, base.lm_head)
            labels = y.masked_fill(y == -1, IGNORE).flatten()  # outside the draft vocabulary: no loss
            ce = F.cross_entropy(logits.flatten(0, 1), labels, ignore_index=IGNORE)
            has = (y != IGNORE)[..., None]
            true_next = F.pad(h[:, 1:], (0, 0, 0, 1))  # [B, S, C]
            reg = (F.smooth_l1_loss(guess.float(), true_next, reduction="none") * has).sum()
            reg = reg / has.sum().clamp(min=1) / h.shape[-1]
            term = ce.nan_to_num() + feature_weight * reg
            loss = loss + weights[d] * term
            first = term if first is None else first
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        sched.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", depth1=f"{first.item():.3f}")
    drafter.eval()
    train_stats = evaluate(drafter, base, tuple(x[:200] for x in train), masks, index)
    val_stats = evaluate(drafter, base, val, masks, index) if val is not None else None
    minutes = (time.perf_counter() - started) / 60
    report = {"held_out": val_stats, "train_sample": {k: train_stats[k] for k in ("top1", "top5")},
              "kind": "eagle", "steps": steps, "batch": batch, "segment": segment, "lr": lr, "epochs": epochs,
              "seed": seed, "window": window, "depths": depths, "feature_weight": feature_weight,
              "noise": noise, "from_last_layer": from_last_layer,
              "train_positions": int(train[2].sum()),
              "held_out_positions": val_stats and val_stats["positions"],
              "draft_vocab_size": config.draft_vocab_size, "minutes": round(minutes, 1)}
    save_eagle(drafter.to(torch.bfloat16), out)  # drafts need no more precision
    (out / "training.json").write_text(json.dumps(report, indent=1))
    shown = val_stats or train_stats
    for d in range(depths):
        print(f"depth {d + 1}: held-out top-1 {shown['top1'][d]:.3f} top-5 {shown['top5'][d]:.3f} "
              f"(train top-1 {train_stats['top1'][d]:.3f})")
    print(f"trained in {minutes:.1f} minutes")
    return report


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m training eagle", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, nargs="+", default=[Path("runs/distill")])
    ap.add_argument("--out", type=Path, default=Path("runs/eagle"))
    ap.add_argument("--window", type=int, default=32, help="pairs of (feature, token) the layer attends to")
    ap.add_argument("--depths", type=int, default=4, help="tree depths trained (passes unrolled)")
    ap.add_argument("--segment", type=int, default=64, help="pairs per training segment")
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=16, help="segments per step")
    ap.add_argument("--draft-vocab", type=int, default=8192)
    ap.add_argument("--feature-weight", type=float, default=0.2)
    ap.add_argument("--noise", type=float, default=0.0, help="uniform noise on the true features read")
    ap.add_argument("--from-last-layer", action="store_true", help="start from the base's last layer")
    ap.add_argument("--model", help="base model (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    fit_eagle(args.data, args.out, args.window, args.depths, args.segment, args.epochs, args.lr, args.batch,
              args.model, args.seed, args.draft_vocab, args.feature_weight, noise=args.noise,
              from_last_layer=args.from_last_layer)
