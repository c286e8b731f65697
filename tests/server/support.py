"""Helpers for the HTTP tests: a tiny random Llama with the tiny tokenizer, settings, a real server."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI

from medusa.config import ModelConfig
from medusa.engine import Engine
from medusa.llama import Llama
from medusa.loading import LoadedModel
from server.settings import Settings
from tests.tiny_tokenizer import tiny_tokenizer

TINY_LIMITS = dict(max_batch_size=4, max_input_tokens=64, max_total_tokens=128, max_queue=16,
                   chat_template="off")


def tiny_loaded(eos_token_ids: tuple[int, ...] | None = None) -> LoadedModel:
    """A random two-layer Llama over the tiny tokenizer; the same weights on every call."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=300, hidden_size=64, intermediate_size=112, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=16, tie_word_embeddings=True)
    model = Llama(config).eval()
    with torch.no_grad():  # weights large enough that greedy text varies from token to token
        for weight in model.parameters():
            if weight.dim() > 1:
                weight.normal_(0.0, 0.3)
    eos = (tokenizer.eos_token_id,) if eos_token_ids is None else eos_token_ids
    return LoadedModel(model=model, tokenizer=tokenizer, eos_token_ids=eos, model_id="tiny-random-llama",
                       path=Path("tiny-random-llama"))


def tiny_settings(**overrides) -> Settings:
    return Settings(**(TINY_LIMITS | overrides))


def tiny_engine(loaded: LoadedModel, settings: Settings, engine_class: type[Engine] = Engine) -> Engine:
    return engine_class(loaded.model, loaded.tokenizer, loaded.eos_token_ids,
                        max_batch_size=settings.max_batch_size, max_total_tokens=settings.max_total_tokens)


@contextlib.contextmanager
def serve(app: FastAPI) -> Iterator[str]:
    """Run `app` under a real uvicorn server on a free loopback port; yields its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


class ControlledEngine(Engine):
    """The real engine, with steps that can be held at a gate, slowed down, or made to fail."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.gate.set()
        self.step_delay = 0.0  # seconds added to every step
        self.failures = 0  # the next this-many steps raise

    def step(self):
        assert self.gate.wait(30), "the test never opened the gate"
        time.sleep(self.step_delay)
        if self.failures:
            self.failures -= 1
            raise RuntimeError("injected step failure")
        return super().step()


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.005)
