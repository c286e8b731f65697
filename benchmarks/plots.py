"""The benchmarks' charts (`--plot FILE.png`), drawn from the summaries they print as JSON.

Imported only when --plot is given, so the benchmarks run where matplotlib is not installed (it is
in the extras "plots" and "test"). Figures are drawn on Agg canvases of their own, not through pyplot,
so no display is needed and no process-wide backend or figure list is touched.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

PERCENTILES = (50, 90, 99)


def grouped_bars(ax, groups: list[str], bars: dict[str, list[float | None]]) -> None:
    """One cluster per group, one bar per key of `bars` (its values per group; None leaves a gap)."""
    x = np.arange(len(groups))
    width = 0.8 / max(1, len(bars))
    for i, (label, values) in enumerate(bars.items()):
        heights = [np.nan if v is None else v for v in values]
        drawn = ax.bar(x + (i - (len(bars) - 1) / 2) * width, heights, width, label=label)
        ax.bar_label(drawn, ["" if v is None else f"{v:.0f}" for v in values], fontsize=7, padding=1)
    ax.set_xticks(x, groups)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def speculative_chart(summary: dict, path: Path, title: str) -> None:
    """tok/s per Spec-Bench category (and overall), a bar per mode; under a category's name, each
    drafter's mean accepted tokens per step there, which is what its speed-up follows."""
    per_category = summary["per_category"]
    modes = list(next(iter(per_category.values()))["tok_s"])
    accepted = {"medusa": "mean_accepted_tokens", "eagle": "eagle_mean_accepted_tokens"}
    accepted = {mode: key for mode, key in accepted.items() if key in summary}
    rows = [*per_category.items(), ("overall", {"tok_s": {m: summary[f"{m}_tok_s"] for m in modes}}
                                    | {key: summary[key] for key in accepted.values()})]
    def label(name: str, row: dict) -> str:
        figures = " / ".join(f"{row[key]:.2f}" for key in accepted.values())
        return f"{name}\n{figures}" if accepted else name

    groups = [label(name, row) for name, row in rows]
    fig = Figure(figsize=(max(6.0, 1.3 * len(groups)), 4.5))
    ax = fig.subplots()
    grouped_bars(ax, groups, {mode: [row["tok_s"][mode] for _, row in rows] for mode in modes})
    ax.set_ylabel("generated tokens / s (batch 1)")
    if accepted:
        drafters = " / ".join(accepted)
        ax.set_xlabel(f"Spec-Bench category (under it: mean accepted tokens per step, {drafters})")
    ax.set_title(title, fontsize=9)
    save(fig, path)


def serving_chart(summaries: list[dict], path: Path, title: str) -> None:
    """Latency percentiles per concurrency level: end-to-end latency, and time to first token beside it
    when the run streamed; under each level, the throughput it reached."""
    metrics = [("latency", "end-to-end latency")]
    if any(s["ttft_ms_p50"] is not None for s in summaries):
        metrics.append(("ttft", "time to first token"))
    groups = [f"{s['concurrency']}\n{s['throughput_tok_s']:.0f} tok/s" for s in summaries]
    fig = Figure(figsize=(max(6.0, 1.2 * len(groups)) * len(metrics), 4.5))
    axes = fig.subplots(1, len(metrics), squeeze=False)
    for ax, (key, name) in zip(axes[0], metrics, strict=True):
        grouped_bars(ax, groups, {f"p{q}": [s[f"{key}_ms_p{q}"] for s in summaries] for q in PERCENTILES})
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("concurrent clients (throughput)")
        ax.set_ylabel("ms")
    fig.suptitle(title, fontsize=9)
    save(fig, path)


def save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)  # the figure renders through this canvas
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)  # docs/charts/ in a fresh clone
    fig.savefig(path, dpi=120)
