"""Helpers for the HTTP tests: a tiny random Llama with the tiny tokenizer, settings, a real server."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from medusa.checkpoints import save_heads
from medusa.engine import Engine
from medusa.heads import MedusaConfig, random_heads
from runtime.config import ModelConfig
from runtime.llama import Llama
from runtime.loading import LoadedModel
from server.app import create_app
from server.cli import DrainingServer, make_server
from server.scheduler import Scheduler
from server.settings import Settings
from tests.tiny_tokenizer import tiny_tokenizer

TINY_LIMITS = dict(max_batch_size=4, max_input_tokens=64, max_total_tokens=128, max_queue=16,
                   chat_template="off", medusa_heads="none")


def tiny_loaded(eos_token_ids: tuple[int, ...] | None = None, vocab_size: int = 300) -> LoadedModel:
    """A random two-layer Llama over the tiny tokenizer (its embedding padded past the tokenizer's 300
    tokens where vocab_size says so); the same weights on every call."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=112, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=True)
    model = Llama(config).eval()
    with torch.no_grad():  # weights large enough that greedy text varies from token to token
        for weight in model.parameters():
            if weight.dim() > 1:
                weight.normal_(0.0, 0.3)
    eos = (tokenizer.eos_token_id,) if eos_token_ids is None else eos_token_ids
    return LoadedModel(model=model, tokenizer=tokenizer, eos_token_ids=eos, model_id="tiny-random-llama",
                       path=Path("tiny-random-llama"))


def save_tiny_heads(folder: Path, loaded: LoadedModel) -> str:
    """Random Medusa heads for the tiny model, written to `folder`: they guess right only some of the
    time, so sequences in one batch accept paths of different lengths."""
    config = loaded.model.config
    heads = random_heads(MedusaConfig(hidden_size=config.hidden_size, vocab_size=config.vocab_size), seed=0,
                         scale=0.3)
    save_heads(heads, folder)
    return str(folder)


def tiny_settings(**overrides) -> Settings:
    return Settings(**(TINY_LIMITS | overrides))


def tiny_engine(loaded: LoadedModel, settings: Settings, engine_class: type[Engine] = Engine) -> Engine:
    return engine_class(loaded.model, loaded.tokenizer, loaded.eos_token_ids,
                        max_batch_size=settings.max_batch_size, max_total_tokens=settings.max_total_tokens)


@contextlib.contextmanager
def serve(app: FastAPI, drain_timeout: float = 10.0) -> Iterator[str]:
    """Run `app` under the real server on a free loopback port; yields its base URL."""
    with serving(app, drain_timeout) as (url, _, _):
        yield url


@contextlib.contextmanager
def serving(app: FastAPI, drain_timeout: float = 10.0
            ) -> Iterator[tuple[str, DrainingServer, threading.Thread]]:
    """`serve`, also yielding the server (whose handle_exit is what SIGTERM calls) and its thread."""
    server = make_server(app, "127.0.0.1", 0, drain_timeout, log_level="warning")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", server, thread
    finally:
        server.should_exit = True
        thread.join(10)


class ControlledEngine(Engine):
    """The real engine, with steps that can be held at a gate, slowed down, or made to fail, and
    prefill chunks that can be made to fail."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.gate.set()
        self.step_delay = 0.0  # seconds added to every step
        self.failures = 0  # the next this-many steps raise
        self.prefill_failures = 0  # the next this-many prefill chunks raise

    # failures are injected inside the engine's calls, where a model or sampling error would arise
    def _prefill(self, pre, max_tokens):
        if self.prefill_failures:
            self.prefill_failures -= 1
            raise RuntimeError("injected prefill failure")
        return super()._prefill(pre, max_tokens)

    def _step(self, seqs):
        if self.failures:
            self.failures -= 1
            raise RuntimeError("injected step failure")
        return super()._step(seqs)

    def step(self):
        assert self.gate.wait(30), "the test never opened the gate"
        time.sleep(self.step_delay)
        return super().step()


class WarmingEngine(Engine):
    """The real engine, whose warm-up records the thread it ran in, says when it began, and holds at a
    gate until the test opens it (or raises, when `warm_up_error` is set)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.warming = threading.Event()  # set when warm-up begins
        self.gate = threading.Event()
        self.warmed_in: list[str] = []  # the name of the thread of each warm-up
        self.warm_up_error: Exception | None = None

    def warm_up(self) -> None:
        self.warmed_in.append(threading.current_thread().name)
        self.warming.set()
        if self.warm_up_error is not None:
            raise self.warm_up_error
        assert self.gate.wait(30), "the test never opened the gate"
        super().warm_up()


@contextlib.contextmanager
def controlled_server(**settings) -> Iterator[tuple[str, ControlledEngine, Scheduler]]:
    """A real server over a ControlledEngine; yields (base URL, engine, scheduler)."""
    settings = tiny_settings(**settings)
    loaded = tiny_loaded()
    engine = tiny_engine(loaded, settings, ControlledEngine)
    app = create_app(settings, loaded, engine=engine)
    with serve(app) as url:
        yield url, engine, app.state.service.scheduler


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.005)


def metric_values(text: str) -> dict[str, float]:
    """A Prometheus page as {'name{label="value",...}': value}, e.g. 'medusa_requests_total'."""
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values
