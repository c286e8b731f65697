"""Deadlines (a settings default, or `parameters.timeout`) and draining on SIGTERM."""

import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from server.app import create_app
from tests.server.support import (
    ControlledEngine,
    controlled_server,
    serving,
    tiny_engine,
    tiny_loaded,
    tiny_settings,
    wait_until,
)

PROMPT = "Hello world!"


def post(url, **parameters):
    return httpx.post(url + "/generate", json={"inputs": PROMPT, "parameters": parameters}, timeout=30)


def stream_events(url, **parameters):
    body = {"inputs": PROMPT, "parameters": parameters}
    with httpx.stream("POST", url + "/generate_stream", json=body, timeout=30) as response:
        assert response.status_code == 200
        return [json.loads(line.removeprefix("data:")) for line in response.iter_lines() if line]


def test_a_request_past_its_deadline_fails_with_504_and_frees_its_slot():
    with controlled_server(max_batch_size=2) as (url, engine, scheduler):
        engine.step_delay = 0.02  # 100 tokens would take 2 s
        response = post(url, max_new_tokens=100, timeout=0.3)
        assert response.status_code == 504
        assert response.json()["error_type"] == "timeout"
        assert "deadline of 0.3 s" in response.json()["error"]
        wait_until(lambda: scheduler.running == 0 and engine.free_slots == 2)
        assert post(url, max_new_tokens=3).status_code == 200


def test_a_stream_past_its_deadline_ends_with_a_timeout_event():
    with controlled_server() as (url, engine, _):
        engine.step_delay = 0.02
        events = stream_events(url, max_new_tokens=100, timeout=0.3)
    assert 1 <= len(events) - 1 < 100
    assert [e["index"] for e in events[:-1]] == list(range(1, len(events)))
    assert events[-1]["error_type"] == "timeout"


def test_the_settings_default_applies_and_a_longer_timeout_is_refused():
    # a default of 2 s, not 0.3: in two fresh-clone CI runs of the full suite the 3-token request took
    # ~1 s (never when this file ran alone; cause not found), and this test is not about speed
    with controlled_server(request_timeout=2.0) as (url, engine, _):
        engine.step_delay = 0.05  # 100 tokens would take 5 s
        assert post(url, max_new_tokens=100).status_code == 504
        refused = post(url, max_new_tokens=3, timeout=3.0)
        assert refused.status_code == 422 and "`timeout`" in refused.json()["error"]
        assert post(url, max_new_tokens=3, timeout=2.0).status_code == 200


def test_a_request_waiting_past_its_deadline_fails_in_the_queue():
    with controlled_server(max_batch_size=1) as (url, engine, scheduler), ThreadPoolExecutor(2) as pool:
        engine.gate.clear()
        running = pool.submit(post, url, max_new_tokens=3)
        wait_until(lambda: scheduler.running == 1)
        queued = pool.submit(post, url, max_new_tokens=3, timeout=0.1)
        wait_until(lambda: scheduler.waiting == 1)
        time.sleep(0.2)
        engine.gate.set()  # the deadline is checked at the next step boundary
        assert queued.result().status_code == 504
        assert "in the queue" in queued.result().json()["error"]
        assert running.result().status_code == 200


def draining_server(loaded):
    settings = tiny_settings(max_batch_size=1)
    engine = tiny_engine(loaded, settings, ControlledEngine)
    engine.step_delay = 0.02
    app = create_app(settings, loaded, engine=engine)
    return app, serving(app)


def one_running_one_queued(pool, url, scheduler):
    """A 20-token stream running and a 5-token request waiting behind it (the only slot is taken)."""
    running = pool.submit(stream_events, url, max_new_tokens=20)
    wait_until(lambda: scheduler.running == 1)
    queued = pool.submit(post, url, max_new_tokens=5)
    wait_until(lambda: scheduler.waiting == 1)
    return running, queued


def test_draining_refuses_new_requests_and_finishes_those_taken():
    app, server = draining_server(tiny_loaded())
    with server as (url, _, _), ThreadPoolExecutor(2) as pool:
        running, queued = one_running_one_queued(pool, url, app.state.service.scheduler)
        app.state.draining.set()  # what SIGTERM does first

        refused = post(url, max_new_tokens=3)
        assert refused.status_code == 503 and refused.json()["error_type"] == "unhealthy"
        assert httpx.get(url + "/health").status_code == 503
        events = running.result()
        assert [e["index"] for e in events] == list(range(1, 21)) and events[-1]["generated_text"] is not None
        assert queued.result().status_code == 200


def test_sigterm_exits_once_the_requests_taken_have_finished():
    app, server = draining_server(tiny_loaded())
    with server as (url, uvicorn_server, thread), ThreadPoolExecutor(2) as pool:
        scheduler = app.state.service.scheduler
        running, queued = one_running_one_queued(pool, url, scheduler)
        uvicorn_server.handle_exit(signal.SIGTERM, None)  # what the signal handler calls

        assert app.state.draining.is_set()
        assert len(running.result()) == 20
        assert queued.result().status_code == 200
        thread.join(10)
        assert not thread.is_alive()
        assert not scheduler.healthy  # stopped after the last request
