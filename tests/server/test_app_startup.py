"""Start-up: the engine is warmed up (every compiled graph built) in the scheduler's thread before the
server listens, and a failed warm-up stops the start-up instead of serving."""

from __future__ import annotations

import threading

import httpx
import pytest
from fastapi.testclient import TestClient

from runtime.loading import LoadedModel
from server.app import create_app
from server.cli import make_server
from server.scheduler import SchedulerUnavailable
from tests.server.support import WarmingEngine, tiny_engine, tiny_settings, wait_until


def test_the_server_listens_only_once_warm_up_is_done(loaded: LoadedModel) -> None:
    settings = tiny_settings()
    engine = tiny_engine(loaded, settings, WarmingEngine)
    server = make_server(create_app(settings, loaded, engine=engine), "127.0.0.1", 0, drain_timeout=10,
                         log_level="warning")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        assert engine.warming.wait(30)
        assert not server.started  # uvicorn binds its socket once lifespan start-up has ended
        engine.gate.set()
        wait_until(lambda: server.started, timeout=30)
        port = server.servers[0].sockets[0].getsockname()[1]
        health = httpx.get(f"http://127.0.0.1:{port}/health")
        assert (health.status_code, health.json()) == (200, {"status": "ok"})
        assert engine.warmed_in == ["medusa-scheduler"]
    finally:
        engine.gate.set()
        server.should_exit = True
        thread.join(10)


def test_a_failed_warm_up_stops_the_start_up(loaded: LoadedModel) -> None:
    settings = tiny_settings()
    engine = tiny_engine(loaded, settings, WarmingEngine)
    engine.warm_up_error = RuntimeError("injected warm-up failure")
    with pytest.raises(SchedulerUnavailable, match="injected warm-up failure"):
        with TestClient(create_app(settings, loaded, engine=engine)):
            pass
