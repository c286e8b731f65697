"""Two `medusa-serve` processes on loopback behind a round-robin client, as a load balancer would front
replicas: one of them is sent SIGTERM while requests flow, and no request is lost. The drained
replica says 'draining' on /health (the client stops choosing it), finishes the requests it took,
then exits; each request ends with exactly one 200, which both replicas' JSON log lines show under
the request's id."""

from __future__ import annotations

import contextlib
import itertools
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
import transformers

from tests.server.support import wait_until
from tests.tiny_tokenizer import tiny_tokenizer

REPO = Path(__file__).resolve().parents[2]
FLOW = {"inputs": "The quick brown fox", "parameters": {"max_new_tokens": 16}}
REQUESTS = 40  # sent by CLIENTS threads at once, through the round-robin client
CLIENTS = 4
# held on the replica to be drained, so that it has a request taken when SIGTERM comes; the tiny model's
# greedy answer to "Hello" runs to max_new_tokens (tests/server/test_cli.py). Its tokens are the time the
# replica says 'draining' before it exits: with 1000 of them the health checks once missed it (1 CI run
# in 5, 2026-12-04), so nearly as many as the tiny model's 2048 positions take
HELD = {"inputs": "Hello", "parameters": {"max_new_tokens": 1900, "details": True}}
MAX_TOTAL_TOKENS = 2000


def save_tiny_model(folder: Path) -> Path:
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=112,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    transformers.LlamaForCausalLM(hf_config).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@dataclass
class Replica:
    url: str
    process: subprocess.Popen
    log: Path  # its stderr: JSON lines

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def replicas(count: int, model: Path, folder: Path) -> Iterator[list[Replica]]:
    started: list[Replica] = []
    try:
        for i in range(count):
            port = free_port()
            log = folder / f"replica-{i}.log"
            command = [sys.executable, "-m", "server.cli", "--model", str(model), "--port", str(port),
                       "--max-total-tokens", str(MAX_TOTAL_TOKENS), "--drain-timeout", "30", "--json-output"]
            with log.open("w") as err:
                process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)
            started.append(Replica(f"http://127.0.0.1:{port}", process, log))
        yield started
    finally:
        for replica in started:
            replica.process.kill()
            replica.process.wait()


def health(url: str) -> str:
    """'ok', the error_type of a 503 ('draining', 'unhealthy'), or 'down' when nothing answers."""
    try:
        response = httpx.get(url + "/health", timeout=5)
    except httpx.HTTPError:
        return "down"
    return "ok" if response.status_code == 200 else response.json()["error_type"]


class RoundRobin:
    """A client-side load balancer, as small as a test allows: replicas in turn, skipping those whose
    last health check (every 50 ms, each replica by its own thread, so that a slow answer from one does
    not hold up the checks of another) did not say ok. A request a replica refused before taking it (its
    connection refused, or a 503) goes to the next one; anything else is the request's answer."""

    def __init__(self, urls: list[str]) -> None:
        self.urls = urls
        self.in_rotation = dict.fromkeys(urls, False)
        self.seen: dict[str, set[str]] = {url: set() for url in urls}  # the health states seen
        self._turn = itertools.count()
        self._stop = threading.Event()
        self._checkers = [threading.Thread(target=self._check, args=(url,), daemon=True) for url in urls]

    def __enter__(self) -> RoundRobin:
        for checker in self._checkers:
            checker.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for checker in self._checkers:
            checker.join(10)

    def _check(self, url: str) -> None:
        while not self._stop.wait(0.05):
            state = health(url)
            self.seen[url].add(state)
            self.in_rotation[url] = state == "ok"

    def post(self, body: dict, request_id: str) -> httpx.Response:
        for _ in range(200):
            url = self._next()
            if url is None:  # none in rotation now: wait for the next health check
                time.sleep(0.05)
                continue
            try:
                response = httpx.post(url + "/generate", json=body, headers={"x-request-id": request_id},
                                      timeout=60)
            except httpx.ConnectError:  # nothing was sent
                self.in_rotation[url] = False
                continue
            if response.status_code != 503:
                return response
            self.in_rotation[url] = False
        raise AssertionError(f"no replica took {request_id}")

    def _next(self) -> str | None:
        for _ in self.urls:
            url = self.urls[next(self._turn) % len(self.urls)]
            if self.in_rotation[url]:
                return url
        return None


def test_no_request_is_lost_while_one_of_two_replicas_drains(tmp_path):
    model = save_tiny_model(tmp_path / "model")
    with replicas(2, model, tmp_path) as (drained, staying), \
            RoundRobin([drained.url, staying.url]) as balancer:
        wait_until(lambda: all(balancer.in_rotation.values()), timeout=120)
        with ThreadPoolExecutor(CLIENTS) as pool:
            flow = [pool.submit(balancer.post, FLOW, f"flow-{i}") for i in range(REQUESTS)]
            wait_until(lambda: sum(f.done() for f in flow) >= REQUESTS // 4, timeout=60)
            with httpx.stream("POST", drained.url + "/generate_stream", json=HELD,
                              headers={"x-request-id": "held"}, timeout=60) as held:
                events = held.iter_lines()
                next(events)
                drained.process.send_signal(signal.SIGTERM)
                wait_until(lambda: "draining" in balancer.seen[drained.url], timeout=30)
                held_events = [json.loads(line.removeprefix("data:")) for line in events if line]
            responses = [f.result() for f in flow]
        assert drained.process.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once drained
        assert health(drained.url) == "down" and health(staying.url) == "ok"
        staying.process.send_signal(signal.SIGTERM)
        staying.process.wait(30)

    assert held_events[-1]["details"]["generated_tokens"] == len(held_events) + 1  # the first was read above
    assert [r.status_code for r in responses] == [200] * REQUESTS
    assert [r.headers["x-request-id"] for r in responses] == [f"flow-{i}" for i in range(REQUESTS)]
    # every line of both logs is a JSON object; the access lines show where each request went
    answers: dict[str, list[tuple[int, int]]] = {}  # request id -> (replica, status) of each attempt
    for index, replica in enumerate((drained, staying)):
        for record in replica.records():
            if record["logger"] == "server.access" and record["path"] == "/generate":
                answers.setdefault(record["request_id"], []).append((index, record["status"]))
    for i in range(REQUESTS):
        statuses = [status for _, status in answers[f"flow-{i}"]]
        assert statuses.count(200) == 1 and set(statuses) <= {200, 503}
    served_by = {replica for attempts in answers.values() for replica, status in attempts if status == 200}
    assert served_by == {0, 1}  # the drained replica served its share before SIGTERM
