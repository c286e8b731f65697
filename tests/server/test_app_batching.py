"""Continuous batching seen from clients: requests in one batch get what each gets alone, 64
concurrent streams arrive whole and in order, and a long prompt prefilled in chunks lets running
streams flow."""

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from runtime.config import SamplingParams
from server.app import create_app
from tests.server.support import (
    ControlledEngine,
    metric_values,
    save_tiny_heads,
    serve,
    tiny_engine,
    tiny_settings,
    wait_until,
)

PROMPTS = ["Hello world!", "The quick brown fox", "What is the capital of France?", "caf\u00e9 \u2603",
           "Numbers 0 1 2 3", "Speculative decoding verifies", "Paris is", "symbols: , . ;"]

# per-request parameters that must coexist in one batch: greedy with and without speculation,
# seeded sampling under both acceptance rules, a repetition penalty, frequency and presence penalties
MIXED = [{}, {"speculate": False}, {"do_sample": True, "seed": 1},
         {"do_sample": True, "seed": 2, "acceptance": "typical", "temperature": 0.8},
         {"repetition_penalty": 1.5}, {"top_k": 20, "seed": 3},
         {"frequency_penalty": 0.4, "presence_penalty": -0.5},
         {"speculate": False, "top_p": 0.9, "seed": 4}]


def generate(url, prompt, **parameters):
    body = {"inputs": prompt, "parameters": {"details": True, **parameters}}
    response = httpx.post(url + "/generate", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def ids(result):
    return [t["id"] for t in result["details"]["tokens"]]


@pytest.mark.parametrize("with_heads", [False, True], ids=["plain", "medusa"])
def test_concurrent_requests_get_what_each_gets_alone(loaded, tmp_path, with_heads):
    heads = {"medusa_heads": save_tiny_heads(tmp_path, loaded), "tree": "cpu"} if with_heads else {}
    requests = [(prompt, {"max_new_tokens": 6 + 3 * i, **MIXED[i]}) for i, prompt in enumerate(PROMPTS)]
    with serve(create_app(tiny_settings(max_batch_size=4, **heads), loaded)) as url:
        alone = [generate(url, prompt, **parameters) for prompt, parameters in requests]
        with ThreadPoolExecutor(len(requests)) as pool:
            together = list(pool.map(lambda r: generate(url, r[0], **r[1]), requests))
        metrics = metric_values(httpx.get(url + "/metrics").text)
    assert metrics["medusa_batch_size_bucket{le=\"1.0\"}"] < metrics["medusa_batch_size_count"]  # batched
    for a, t in zip(alone, together, strict=True):
        assert ids(t) == ids(a)
        assert t["generated_text"] == a["generated_text"]
    if with_heads:  # the heads guess right some of the time: paths of different lengths in one batch
        assert sum(t["details"]["speculation"]["accepted_tokens"] for t in together) > 0


async def read_stream(client, url, prompt, max_new_tokens):
    body = {"inputs": prompt, "parameters": {"max_new_tokens": max_new_tokens, "details": True}}
    async with client.stream("POST", url + "/generate_stream", json=body) as response:
        assert response.status_code == 200
        return [json.loads(line.removeprefix("data:")) async for line in response.aiter_lines() if line]


def test_64_concurrent_streams_are_complete_and_in_order(loaded):
    settings = tiny_settings(max_batch_size=8, max_queue=64)
    jobs = [(PROMPTS[i % len(PROMPTS)], 8 + i % 3 * 4) for i in range(64)]  # 24 distinct requests

    async def all_streams(url):
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            return await asyncio.gather(*(read_stream(client, url, p, n) for p, n in jobs))

    with serve(create_app(settings, loaded)) as url:
        expected = {job: generate(url, job[0], max_new_tokens=job[1]) for job in set(jobs)}
        streams = asyncio.run(all_streams(url))
    for job, events in zip(jobs, streams, strict=True):
        whole = expected[job]
        assert [e["index"] for e in events] == list(range(1, len(events) + 1))
        assert [e["token"]["id"] for e in events] == ids(whole)  # none missing, none twice, in order
        assert [e["token"]["text"] for e in events] == [t["text"] for t in whole["details"]["tokens"]]
        assert all(e["generated_text"] is None for e in events[:-1])
        assert events[-1]["generated_text"] == whole["generated_text"]
        assert events[-1]["details"]["generated_tokens"] == len(events)
        # no character split across events: the texts add up to the decoded tokens, less the bytes
        # of a last character still incomplete (the random model emits bytes that are not UTF-8)
        text = "".join(e["token"]["text"] for e in events)
        decoded = loaded.tokenizer.decode(ids(whole))
        assert decoded.startswith(text) and set(decoded[len(text):]) <= {"\ufffd"}


class RecordingEngine(ControlledEngine):
    """The real engine, logging each prefill chunk and each step's batch."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.log: list[tuple[str, object]] = []

    def prefill(self, request_id, max_tokens):
        self.log.append(("prefill", request_id))
        return super().prefill(request_id, max_tokens)

    def step(self):
        emitted = super().step()
        self.log.append(("step", {e.request_id for e in emitted}))
        return emitted


def test_a_long_prompt_is_prefilled_in_chunks_between_steps_of_the_running_ones(loaded):
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 3
    prompt_ids = loaded.tokenizer.encode(long_prompt)
    settings = tiny_settings(max_prefill_tokens=8, max_input_tokens=100)
    engine = tiny_engine(loaded, settings, RecordingEngine)
    engine.step_delay = 0.01  # the short request runs for most of a second
    with serve(create_app(settings, loaded, engine=engine)) as url, ThreadPoolExecutor(1) as pool:
        short = pool.submit(generate, url, "Hello world!", max_new_tokens=100)
        wait_until(lambda: ("step", {0}) in engine.log)
        long = generate(url, long_prompt, max_new_tokens=10)  # request 1
        short.result()

    unchunked = tiny_engine(loaded, settings).generate([prompt_ids], SamplingParams(max_new_tokens=10))[0]
    assert ids(long) == unchunked
    chunks = [i for i, entry in enumerate(engine.log) if entry == ("prefill", 1)]
    assert len(chunks) == -(-len(prompt_ids) // 8)
    # between its first and last chunk, the running request kept getting a step per chunk
    assert engine.log[chunks[0]:chunks[-1]].count(("step", {0})) == len(chunks) - 1
