"""Issue 12's reproductions against a real server: each gets a clean 4xx or a result, and the server
goes on generating with no slot held by a request that is gone."""

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from runtime.config import SamplingParams
from tests.server.support import controlled_server, metric_values, wait_until

PROMPT = "Hello world!"


def post(url, route="/generate", timeout=30, **parameters):
    return httpx.post(url + route, json={"inputs": PROMPT, "parameters": parameters}, timeout=timeout)


def slots_and_running(url) -> tuple[float, float]:
    metrics = metric_values(httpx.get(url + "/metrics").text)
    return metrics["medusa_kv_cache_slots_used"], metrics["medusa_num_requests_running"]


def test_vanishing_top_p_requests_are_answered_and_leave_no_slot_behind():
    with controlled_server() as (url, engine, scheduler):
        for _ in range(8):  # twice the slots: each one used to leak its slot with a 424
            response = post(url, max_new_tokens=8, do_sample=True, top_p=1e-300)
            assert response.status_code == 200, response.text
        assert slots_and_running(url) == (0, 0)
        assert post(url, timeout=15, max_new_tokens=4).status_code == 200
        assert httpx.get(url + "/health").json() == {"status": "ok"}


def test_failing_prefills_free_their_slots_and_later_requests_run():
    with controlled_server(max_batch_size=2) as (url, engine, scheduler):
        engine.prefill_failures = 4
        for _ in range(4):
            failed = post(url, max_new_tokens=5)
            assert failed.status_code == 424 and "injected prefill failure" in failed.json()["error"]
        assert slots_and_running(url) == (0, 0)
        assert post(url, max_new_tokens=3).status_code == 200
        assert httpx.get(url + "/health").status_code == 200


def test_a_non_streaming_client_that_leaves_frees_its_slot():
    with controlled_server(max_batch_size=2) as (url, engine, scheduler):
        engine.step_delay = 0.05  # 100 tokens would take 5 s
        with pytest.raises(httpx.ReadTimeout):
            post(url, timeout=0.5, max_new_tokens=100)
        wait_until(lambda: scheduler.running == 0 and engine.free_slots == 2, timeout=2.0)
        failures = metric_values(httpx.get(url + "/metrics").text)
        assert failures['medusa_request_failure_total{reason="cancelled"}'] == 1
        assert post(url, max_new_tokens=3).status_code == 200


@pytest.mark.parametrize("route", ["/generate", "/generate_stream"])
def test_a_queued_request_whose_client_left_leaves_the_queue(route):
    with controlled_server(max_batch_size=1) as (url, engine, scheduler), ThreadPoolExecutor(1) as pool:
        engine.step_delay = 0.05  # the one slot is taken for 60 steps, 3 s
        running = pool.submit(post, url, max_new_tokens=60)
        wait_until(lambda: scheduler.running == 1)
        with pytest.raises(httpx.ReadTimeout):
            post(url, route, timeout=0.5, max_new_tokens=3)
        wait_until(lambda: scheduler.waiting == 0, timeout=1.0)
        assert not running.done()  # it left the queue, not waited its turn
        assert running.result().status_code == 200


def test_a_body_over_the_payload_limit_is_413_before_it_is_read():
    with controlled_server(payload_limit=1000) as (url, engine, scheduler):
        big = json.dumps({"inputs": "word " * 400})
        for content in (big, (big[i:i + 100].encode() for i in range(0, len(big), 100))):  # declared, chunked
            response = httpx.post(url + "/generate", content=content, timeout=30,
                                  headers={"content-type": "application/json"})
            assert response.status_code == 413
            assert response.json()["error_type"] == "validation" and "1000 bytes" in response.json()["error"]
        assert post(url, max_new_tokens=3).status_code == 200


def test_a_huge_input_is_refused_by_its_length_without_tokenizing_it():
    with controlled_server(payload_limit=10**8) as (url, engine, scheduler):
        refused = httpx.post(url + "/generate", json={"inputs": "a" * 5_000_000}, timeout=30)
        assert refused.status_code == 422
        assert "characters" in refused.json()["error"] and "inputs" in refused.json()["error"]
        # with truncate, only the tail that can hold the kept tokens is tokenized
        body = {"inputs": "a" * 5_000_000, "parameters": {"truncate": 8, "max_new_tokens": 2}}
        kept = httpx.post(url + "/generate", json=body, timeout=30)
        assert kept.status_code == 200, kept.text


def test_a_leaked_slot_marks_the_server_unhealthy_and_the_scheduler_sleeps():
    """A slot held by a request the scheduler does not serve is a bug: /health says so (it said 200
    while every later request waited), and the scheduler does not spin on the queue it cannot serve."""
    with controlled_server(max_batch_size=1) as (url, engine, scheduler):
        checks = []
        check = engine.check
        engine.check = lambda: (checks.append(time.monotonic()), check())[1]
        engine.start("leaked", [1, 2, 3], SamplingParams(max_new_tokens=4))  # while the scheduler sleeps
        body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 3, "timeout": 1}}  # 504 after 1 s
        queued = threading.Thread(target=httpx.post, args=(url + "/generate",),
                                  kwargs=dict(json=body, timeout=5))
        queued.start()
        wait_until(lambda: httpx.get(url + "/health").status_code == 503)
        assert "invariant" in httpx.get(url + "/health").json()["error"]
        before = len(checks)
        time.sleep(0.5)
        assert len(checks) - before <= 3  # woken by the deadline, not spinning
        queued.join()


@pytest.mark.parametrize(("method", "route", "allowed"), [("OPTIONS", "/", "GET, POST"),
                                                          ("DELETE", "/generate", "POST"),
                                                          ("PUT", "/v1/models", "GET")])
def test_a_wrong_method_gets_405_naming_every_method_the_path_takes(method, route, allowed):
    """GET / (the playground) and POST / (TGI's client) are two routes on one path: Starlette's 405
    named only the first one's method (schemathesis' ST205)."""
    with controlled_server() as (url, engine, scheduler):
        response = httpx.request(method, url + route)
        assert response.status_code == 405
        assert response.headers["allow"] == allowed
