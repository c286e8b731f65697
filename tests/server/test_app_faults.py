"""Backpressure and faults against a real server: a full queue, a failing step, a client that leaves."""

import json
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.server.support import controlled_server, wait_until

PROMPT = "Hello world!"


def post(url, route="/generate", **parameters):
    return httpx.post(url + route, json={"inputs": PROMPT, "parameters": parameters}, timeout=30)


def test_full_queue_answers_429_and_the_queued_requests_still_complete():
    with controlled_server(max_batch_size=1, max_queue=1) as (url, engine, scheduler), \
            ThreadPoolExecutor(2) as pool:
        engine.gate.clear()  # the running request's first step waits here
        running = pool.submit(post, url, max_new_tokens=3)
        wait_until(lambda: scheduler.running == 1)
        queued = pool.submit(post, url, max_new_tokens=3)
        wait_until(lambda: scheduler.waiting == 1)

        rejected = post(url, max_new_tokens=3)
        assert rejected.status_code == 429
        assert rejected.json()["error_type"] == "overloaded"
        assert rejected.headers["retry-after"]

        engine.gate.set()
        assert running.result().status_code == 200
        assert queued.result().status_code == 200


def test_a_failing_step_fails_only_its_requests_and_the_server_keeps_serving():
    with controlled_server(max_batch_size=1) as (url, engine, scheduler), ThreadPoolExecutor(2) as pool:
        engine.gate.clear()
        in_step = pool.submit(post, url, max_new_tokens=5)
        wait_until(lambda: scheduler.running == 1)
        waiting = pool.submit(post, url, max_new_tokens=5)  # not in the failing step: no slot yet
        wait_until(lambda: scheduler.waiting == 1)
        engine.failures = 1
        engine.gate.set()

        failed = in_step.result()
        assert failed.status_code == 424
        assert failed.json()["error_type"] == "generation"
        assert "injected step failure" in failed.json()["error"]
        assert waiting.result().status_code == 200
        assert httpx.get(url + "/health").status_code == 200
        assert post(url, max_new_tokens=4).status_code == 200


def test_a_failing_prefill_fails_only_its_request():
    with controlled_server(max_batch_size=2) as (url, engine, scheduler), ThreadPoolExecutor(1) as pool:
        engine.step_delay = 0.01
        running = pool.submit(post, url, max_new_tokens=20)
        wait_until(lambda: scheduler.running == 1)
        engine.prefill_failures = 1
        failed = post(url, max_new_tokens=5)
        assert failed.status_code == 424 and "injected prefill failure" in failed.json()["error"]
        assert running.result().status_code == 200
        assert engine.free_slots == 2
        assert post(url, max_new_tokens=3).status_code == 200


def test_a_failing_step_ends_a_stream_with_an_error_event():
    with controlled_server() as (url, engine, _):
        engine.failures = 1
        body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 5}}
        response = httpx.post(url + "/generate_stream", json=body, timeout=30)
        assert response.status_code == 200  # the stream had started: the error comes as an event
        events = [json.loads(line.removeprefix("data:")) for line in response.text.split("\n\n") if line]
        assert events[0]["index"] == 1  # the first token comes from the prefill, before the failing step
        assert events[-1]["error_type"] == "generation"
        assert set(events[-1]) == {"error", "error_type"}
        assert post(url, max_new_tokens=3).status_code == 200


def test_a_client_leaving_mid_stream_frees_its_slot():
    with controlled_server(max_batch_size=2) as (url, engine, scheduler):
        engine.step_delay = 0.05  # 100 tokens would take 5 s
        body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 100}}
        with httpx.stream("POST", url + "/generate_stream", json=body, timeout=30) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data:")
        # leaving the block closed the connection mid-stream
        wait_until(lambda: scheduler.running == 0 and engine.free_slots == 2, timeout=2.0)
