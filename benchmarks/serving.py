"""Serving benchmark: a closed-loop load generator against a running server (TGI protocol).

    python -m benchmarks.serving --url http://127.0.0.1:8000 --concurrency 8 --requests 64 --stream --json

C clients each send a request, wait for its whole answer and send the next, until N requests have
been sent. `--concurrency 1,2,4,8` runs one such load per level, N requests each, one after another.
Prompts are the first turns of a Spec-Bench jsonl (`--prompts`), else a built-in list, taken in turn;
requests decode greedily, with speculation unless `--no-speculate`.

Prints, per level, the throughput (generated tokens per second of wall time), the errors, and
p50/p90/p99 of
- TTFT: time from sending a request to its first token event (needs --stream),
- ITL: time between two token events of one stream (needs --stream; tokens that one speculative
  step accepted arrive together, so ITL is bimodal under speculation),
- latency: time from sending a request to its last byte.
`--json` ends each level's report with one JSON line; without --stream its TTFT and ITL values are null.
`--plot FILE.png` draws the latency and TTFT percentiles per level (`benchmarks.plots`, matplotlib: the
extra "plots"), titled with the model the server's /info names.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np

from benchmarks.spec_bench import read_questions

BUILT_IN_PROMPTS = (
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain in three sentences how a bicycle stays upright.",
    "Give me a recipe for pancakes.",
    "Translate 'good morning, how are you?' into French and Spanish.",
    "List five uses of a paperclip.",
    "Why is the sky blue? Answer briefly.",
    "Summarise the plot of Romeo and Juliet.",
)


@dataclass
class Result:
    ok: bool
    latency: float  # seconds from sending to the last byte
    generated_tokens: int = 0
    ttft: float | None = None  # seconds to the first token event (streams only)
    itls: list[float] = field(default_factory=list)  # seconds between token events (streams only)
    error: str | None = None


def read_prompts(path: Path | None) -> list[str]:
    """The questions of a Spec-Bench jsonl, or the built-in list."""
    if path is None:
        return list(BUILT_IN_PROMPTS)
    return [question.text for question in read_questions(path)]


def request_body(prompt: str, max_new_tokens: int, speculate: bool) -> dict:
    return {"inputs": prompt,
            "parameters": {"max_new_tokens": max_new_tokens, "details": True, "speculate": speculate}}


async def generate(client: httpx.AsyncClient, url: str, body: dict) -> Result:
    start = time.perf_counter()
    response = await client.post(url + "/generate", json=body)
    latency = time.perf_counter() - start
    if response.status_code != 200:
        return Result(False, latency, error=f"{response.status_code}: {response.text[:200]}")
    return Result(True, latency, response.json()["details"]["generated_tokens"])


async def generate_stream(client: httpx.AsyncClient, url: str, body: dict) -> Result:
    start = time.perf_counter()
    times = []  # arrival of each token event
    async with client.stream("POST", url + "/generate_stream", json=body) as response:
        if response.status_code != 200:
            text = (await response.aread()).decode(errors="replace")
            return Result(False, time.perf_counter() - start, error=f"{response.status_code}: {text[:200]}")
        finished = False
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            event = json.loads(line.removeprefix("data:"))
            if "error" in event:
                return Result(False, time.perf_counter() - start, error=f"stream: {event['error']}")
            times.append(time.perf_counter())
            finished = event["generated_text"] is not None
    latency = time.perf_counter() - start
    if not finished:
        return Result(False, latency, error="the stream ended before its last event")
    return Result(True, latency, len(times), ttft=times[0] - start, itls=np.diff(times).tolist())


async def one_request(client: httpx.AsyncClient, url: str, body: dict, stream: bool) -> Result:
    start = time.perf_counter()
    try:
        return await (generate_stream if stream else generate)(client, url, body)
    except httpx.HTTPError as e:
        return Result(False, time.perf_counter() - start, error=f"{type(e).__name__}: {e}")


async def run_load(url: str, prompts: list[str], *, concurrency: int, requests: int, max_new_tokens: int,
                   stream: bool, speculate: bool, timeout: float) -> tuple[list[Result], float]:
    """Closed loop: `concurrency` clients, each sending its next request once the last one ended."""
    url = url.rstrip("/")
    numbers = itertools.count()
    results: list[Result] = []

    async def client_loop(client: httpx.AsyncClient) -> None:
        while (i := next(numbers)) < requests:
            body = request_body(prompts[i % len(prompts)], max_new_tokens, speculate)
            results.append(await one_request(client, url, body, stream))

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return results, wall


def percentile_ms(seconds: list[float], q: float) -> float | None:
    return round(float(np.percentile(seconds, q)) * 1000, 2) if seconds else None


PERCENTILES = (50, 90, 99)


def summarize(results: list[Result], wall: float) -> dict:
    ok = [r for r in results if r.ok]
    generated = sum(r.generated_tokens for r in ok)
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    itls = [itl for r in ok for itl in r.itls]
    latencies = [r.latency for r in ok]
    return {
        "requests": len(results),
        "errors": len(results) - len(ok),
        "throughput_tok_s": round(generated / wall, 2) if wall > 0 else 0.0,
        **{f"{name}_ms_p{q}": percentile_ms(values, q)
           for name, values in (("ttft", ttfts), ("itl", itls), ("latency", latencies)) for q in PERCENTILES},
        "generated_tokens": generated,
        "wall_s": round(wall, 3),
    }


def report(summary: dict) -> str:
    def pair(name: str) -> str:
        if summary[f"{name}_ms_p50"] is None:
            return "n/a" if summary["stream"] or name == "latency" else "n/a (needs --stream)"
        return "  ".join(f"p{q} {summary[f'{name}_ms_p{q}']:.1f}" for q in PERCENTILES)

    return "\n".join([
        f"{summary['requests']} requests, {summary['errors']} errors, concurrency {summary['concurrency']}, "
        f"stream {'on' if summary['stream'] else 'off'}, "
        f"parameters.speculate {str(summary['speculate']).lower()}",
        f"throughput  {summary['throughput_tok_s']:.1f} generated tok/s "
        f"({summary['generated_tokens']} tokens in {summary['wall_s']:.1f} s)",
        f"TTFT ms     {pair('ttft')}",
        f"ITL ms      {pair('itl')}",
        f"latency ms  {pair('latency')}",
    ])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serving", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    p.add_argument("--concurrency", type=concurrency_levels, required=True,
                   help="clients sending at the same time, or a list of such levels to run in turn: 1,2,4,8")
    p.add_argument("--requests", type=int, required=True, help="requests in all (per level)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--prompts", type=Path, help="Spec-Bench jsonl; default: a built-in list")
    p.add_argument("--stream", action="store_true", help="use /generate_stream (measures TTFT and ITL)")
    p.add_argument("--no-speculate", action="store_true", help="send parameters.speculate = false")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--json", action="store_true", help="end each level's report with one JSON line")
    p.add_argument("--plot", type=Path, help="write a chart of the latency percentiles per level to this PNG")
    return p


def concurrency_levels(text: str) -> list[int]:
    try:
        levels = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or a list of them: 1,2,4,8") from None
    if min(levels) < 1:
        raise argparse.ArgumentTypeError("concurrency levels must be at least 1")
    return levels


def chart_title(args: argparse.Namespace, cpu_name: str) -> str:
    """The served model, from /info, and the load; the CPU's name too when the server is on this machine."""
    info = httpx.get(args.url.rstrip("/") + "/info", timeout=args.timeout).raise_for_status().json()
    served = f"{info['model_id']}, {info['model_dtype']} on {info['model_device_type']}"
    on_this_machine = urlparse(args.url).hostname in ("localhost", "127.0.0.1", "::1")
    if info["model_device_type"] == "cpu" and on_this_machine:
        served += f" ({cpu_name})"
    speculation = "on" if info["speculation"]["enabled"] and not args.no_speculate else "off"
    return (f"{served}\nspeculation {speculation}, {args.requests} requests per level, "
            f"up to {args.max_new_tokens} new tokens each, greedy")


def main(argv: list[str] | None = None) -> list[dict]:
    """The summary of each concurrency level, in the order given."""
    args = parser().parse_args(argv)
    if args.requests < 1:
        parser().error("--requests must be at least 1")
    if args.plot:  # before the load: a missing matplotlib or a server without /info stops it now
        from benchmarks import plots
        from runtime.loading import cpu_name  # torch comes with it: only for a chart

        title = chart_title(args, cpu_name())
    prompts = read_prompts(args.prompts)
    summaries = []
    for concurrency in args.concurrency:
        results, wall = asyncio.run(run_load(
            args.url, prompts, concurrency=concurrency, requests=args.requests,
            max_new_tokens=args.max_new_tokens, stream=args.stream, speculate=not args.no_speculate,
            timeout=args.timeout))
        for error in sorted({r.error for r in results if r.error})[:5]:
            print(f"error: {error}", file=sys.stderr)
        summary = summarize(results, wall) | {"concurrency": concurrency, "stream": args.stream,
                                              "speculate": not args.no_speculate}
        print(report(summary))
        if args.json:
            print(json.dumps(summary))
        summaries.append(summary)
    if args.plot:
        plots.serving_chart(summaries, args.plot, title)
    return summaries


if __name__ == "__main__":
    main()
