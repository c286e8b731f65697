"""/health's states and the two phases of a drain: after SIGTERM the server says 'draining' and refuses
new requests while it still listens, until the requests it took have ended (or the drain time is
spent); then it stops listening and exits."""

from __future__ import annotations

import json
import signal
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from server.app import create_app
from tests.server.support import (
    ControlledEngine,
    serving,
    tiny_engine,
    tiny_loaded,
    tiny_settings,
    wait_until,
)


def post(url: str) -> httpx.Response:
    return httpx.post(url + "/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 3}},
                      timeout=30)


def stream_events(url: str, max_new_tokens: int) -> list[dict]:
    body = {"inputs": "Hello world!", "parameters": {"max_new_tokens": max_new_tokens}}
    with httpx.stream("POST", url + "/generate_stream", json=body, timeout=30) as response:
        return [json.loads(line.removeprefix("data:")) for line in response.iter_lines() if line]


def health(url: str) -> tuple[int, str]:
    response = httpx.get(url + "/health")
    body = response.json()
    return response.status_code, body.get("status") or body["error_type"]


@pytest.fixture
def one_slot():
    """An app with one slot over a ControlledEngine; yields (app, engine, a function of the drain timeout
    that serves the app, a thread pool). The engine's gate is open when the test ends, whatever happened:
    the scheduler stops after its current step."""
    settings = tiny_settings(max_batch_size=1)
    loaded = tiny_loaded()
    engine = tiny_engine(loaded, settings, ControlledEngine)
    app = create_app(settings, loaded, engine=engine)
    with ThreadPoolExecutor(1) as pool:
        try:
            yield app, engine, lambda drain_timeout: serving(app, drain_timeout), pool
        finally:
            engine.gate.set()


def hold_a_request(app, url, pool, max_new_tokens=20):
    running = pool.submit(stream_events, url, max_new_tokens)
    wait_until(lambda: app.state.service.scheduler.running == 1)
    return running


def test_health_says_ok_then_draining_once_draining(one_slot):
    app, _, server, _ = one_slot
    with server(10) as (url, _, _):
        assert health(url) == (200, "ok")
        app.state.draining.set()
        assert health(url) == (503, "draining")


def test_sigterm_listens_on_while_a_request_runs_then_stops_listening(one_slot):
    app, engine, server, pool = one_slot
    with server(30) as (url, uvicorn_server, thread):
        engine.gate.clear()  # the request taken stays in its slot until the gate opens
        running = hold_a_request(app, url, pool)
        uvicorn_server.handle_exit(signal.SIGTERM, None)
        uvicorn_server.handle_exit(signal.SIGTERM, None)  # an orchestrator's repeat changes nothing

        assert health(url) == (503, "draining")  # a new connection: still listening
        refused = post(url)
        assert refused.status_code == 503 and refused.json()["error_type"] == "unhealthy"
        assert thread.is_alive()

        engine.gate.set()
        events = running.result()
        assert [e["index"] for e in events] == list(range(1, 21)) and events[-1]["generated_text"] is not None
        thread.join(10)
        assert not thread.is_alive()
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health")


def test_the_drain_timeout_bounds_both_phases(one_slot):
    app, engine, server, pool = one_slot
    engine.step_delay = 0.2  # 100 tokens take 20 s, longer than the join below waits
    with server(0.5) as (url, uvicorn_server, thread):
        running = hold_a_request(app, url, pool, max_new_tokens=100)
        uvicorn_server.handle_exit(signal.SIGTERM, None)
        thread.join(10)
        assert not thread.is_alive()
    with pytest.raises(httpx.HTTPError):
        running.result()


def test_a_second_ctrl_c_quits_at_once(one_slot):
    app, engine, server, pool = one_slot
    engine.step_delay = 0.2
    with server(30) as (url, uvicorn_server, thread):
        running = hold_a_request(app, url, pool, max_new_tokens=100)
        uvicorn_server.handle_exit(signal.SIGINT, None)
        assert health(url) == (503, "draining")
        uvicorn_server.handle_exit(signal.SIGINT, None)
        thread.join(10)
        assert not thread.is_alive()
    with pytest.raises(httpx.HTTPError):
        running.result()
