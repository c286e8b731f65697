"""Start-up: the engine is warmed up (every compiled graph built) in the scheduler's thread before the
server listens, and a failed warm-up stops the start-up instead of serving -- except a compiled step
that fails to build under --compile auto, which is served eagerly instead."""

from __future__ import annotations

import logging
import threading

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from medusa.engine import Engine
from runtime.config import SamplingParams
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


def test_the_model_and_engine_are_built_in_a_thread_that_has_ended(loaded: LoadedModel, monkeypatch) -> None:
    """A thread that ran torch's parallel regions keeps libgomp workers as long as it lives, and with
    more of them than CPUs the scheduler's steps sleep between operations: half speed, measured
    (`server.app.load_engine`). So nothing that lives on may do the loading."""
    import server.app as app_module

    built_in: list[threading.Thread] = []
    build_engine = app_module.build_engine

    def recording_build(settings, model):
        built_in.append(threading.current_thread())
        return build_engine(settings, model)

    monkeypatch.setattr(app_module, "build_engine", recording_build)
    monkeypatch.setattr(app_module, "load_model", lambda *args: (built_in.append(threading.current_thread()),
                                                                  loaded)[1])
    model, engine = app_module.load_engine(tiny_settings())
    assert model is loaded and engine.model is loaded.model
    assert len(built_in) == 2 and built_in[0] is built_in[1]
    assert built_in[0] is not threading.current_thread() and not built_in[0].is_alive()

    with TestClient(create_app(tiny_settings())) as client:  # the lifespan's path: loads by settings
        assert client.get("/health").status_code == 200
    assert len(built_in) == 4 and built_in[2] is built_in[3] and not built_in[2].is_alive()
    assert built_in[2] is not threading.main_thread()


def failing_to_compile(engine: Engine) -> Engine:
    """`engine` with its step compiled by a backend that fails as inductor failed on the H200 (the first
    GPU session: a reduction it could not generate), so that warm-up's first graph raises."""
    def backend(gm, example_inputs):
        raise NotImplementedError("NYI: TritonSplitDimKernel reductions")

    torch._dynamo.reset()
    step = engine.device_step
    step._fn = torch.compile(step._step, fullgraph=True, backend=backend)
    return engine


@pytest.mark.parametrize("compile_setting", ["auto", "on"])
def test_a_step_that_fails_to_compile_is_served_eagerly_only_where_compile_was_left_to_choose(
        loaded: LoadedModel, compile_setting: str, caplog) -> None:
    settings = tiny_settings(compile=compile_setting)
    engine = failing_to_compile(Engine(loaded.model, loaded.tokenizer, loaded.eos_token_ids,
                                       max_batch_size=settings.max_batch_size,
                                       max_total_tokens=settings.max_total_tokens, compile=True,
                                       eager_if_compile_fails=compile_setting == "auto"))
    app = create_app(settings, loaded, engine=engine)
    if compile_setting == "on":
        with pytest.raises(SchedulerUnavailable, match="TritonSplitDimKernel"):
            with TestClient(app):
                pass
        return
    with caplog.at_level(logging.WARNING, logger="medusa.step"), TestClient(app) as client:
        assert client.get("/health").status_code == 200
        assert client.get("/info").json()["compiled"] is False
        body = {"inputs": "hello there", "parameters": {"max_new_tokens": 6, "decoder_input_details": False}}
        text = client.post("/generate", json=body).json()["generated_text"]
    assert "building the compiled step failed; serving with the eager step" in caplog.text
    assert "TritonSplitDimKernel" in caplog.text  # the cause, for whoever reads the log
    eager = tiny_engine(loaded, settings)
    tokens = eager.generate([loaded.tokenizer.encode("hello there")], SamplingParams(max_new_tokens=6))[0]
    assert text == loaded.tokenizer.decode(tokens)
