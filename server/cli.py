"""`medusa-serve`: start the HTTP server.

Every field of `server.settings.Settings` is a flag (`max_batch_size`: `--max-batch-size`) and an
environment variable (`server.settings.ENVIRONMENT`; an empty one counts as unset). Precedence: flags,
then the environment, then the defaults written in `Settings`. `settings_table` writes all three as the
README's table.

SIGTERM (or Ctrl-C) drains, within `drain_timeout` seconds (`DrainingServer`): the app refuses new
requests (503) and /health says 'draining' at once, while the server listens on until the requests
already taken have run to their end; then uvicorn stops accepting connections, waits for the open
responses (streams included) to be written, and the scheduler stops. A second Ctrl-C quits at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from server.logs import configure as configure_logging
from server.settings import ENVIRONMENT, Settings

if TYPE_CHECKING:
    from fastapi import FastAPI


def flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="medusa-serve", description="Serve a Llama-family model over the TGI "
                                "protocol, with Medusa speculative decoding when heads are given.")
    for name, field in Settings.model_fields.items():
        notes = [f"environment: {ENVIRONMENT[name]}"]
        if field.default is not None:
            notes.append(f"default: {field.default}")
        described = f"{field.description or name.replace('_', ' ')} ({'; '.join(notes)})".replace("%", "%%")
        # default None: a flag not given leaves the environment or the Settings default in force
        if field.annotation is bool:
            p.add_argument(flag(name), dest=name, action=argparse.BooleanOptionalAction, default=None,
                           help=described)
        else:
            kind = field.annotation if field.annotation in (int, float) else str
            p.add_argument(flag(name), dest=name, type=kind, default=None, help=described)
    return p


def settings_from(argv: list[str] | None, environ: dict[str, str]) -> Settings:
    flags = {name: value for name, value in vars(parser().parse_args(argv)).items() if value is not None}
    from_environment = {name: environ[variable] for name, variable in ENVIRONMENT.items()
                        if environ.get(variable) and name not in flags}
    try:
        return Settings(**from_environment, **flags)
    except ValidationError as e:
        parser().error("; ".join(describe_error(err, from_environment) for err in e.errors()))


def describe_error(error: ErrorDetails, from_environment: dict[str, str]) -> str:
    """One settings error, naming the environment variable when the value came from one (but not the
    value: it may be an API key, and this goes to logs)."""
    message = error["msg"].removeprefix("Value error, ")
    if not error["loc"]:  # a check across fields: name the variables among them that were set
        named = [ENVIRONMENT[name] for name in from_environment if re.search(rf"\b{name}\b", message)]
        return f"settings: {message}" + (f" (from the environment: {', '.join(named)})" if named else "")
    name = str(error["loc"][0])
    if name in from_environment:
        return f"environment variable {ENVIRONMENT[name]} ({name}): {message}"
    return f"{flag(name)} ({name}): {message}"


def settings_table() -> str:
    """The README's table of settings (tests/server/test_cli.py holds the README to it)."""
    rows = ["| Flag | Environment | Default | Meaning |", "|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = "" if field.default is None else f"`{field.default}`"
        meaning = (field.description or name.replace("_", " ")).replace("|", "\\|")
        rows.append(f"| `{flag(name)}` | `{ENVIRONMENT[name]}` | {default} | {meaning} |")
    return "\n".join(rows) + "\n"


class DrainingServer(uvicorn.Server):
    """uvicorn's server, whose exit signal drains in two phases, both within the drain timeout:

    1. the app's `draining` event is set: /health answers 503 'draining' and new requests 503, while
       the server still listens, so that a load balancer polling /health sees it and sends no more
       (a closed port would look the same as a crashed one); until `busy()` is false, the requests
       taken having run to their end;
    2. uvicorn's own shutdown: stop listening, wait for the open responses to be written, stop the app.

    Further SIGTERMs change nothing (an orchestrator may repeat its own); a second Ctrl-C quits at once.
    """

    def __init__(self, config: uvicorn.Config, draining: threading.Event, busy: Callable[[], bool]) -> None:
        super().__init__(config)
        self.draining = draining
        self.busy = busy
        self.drain_timeout = config.timeout_graceful_shutdown or 0.0
        self._exit_signal: tuple[int, FrameType | None] | None = None  # the first one, from phase 1 on
        self._drain_deadline = 0.0

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._exit_signal is None:
            self._exit_signal = (sig, frame)
            self._drain_deadline = time.monotonic() + self.drain_timeout
            self.draining.set()
        elif sig == signal.SIGINT:
            self._stop_listening()
            super().handle_exit(sig, frame)  # uvicorn's second Ctrl-C: force_exit

    async def on_tick(self, counter: int) -> bool:
        """Every 0.1 s: phase 2 begins once the requests taken have ended or the drain time is spent."""
        if self._exit_signal is not None and (not self.busy() or time.monotonic() >= self._drain_deadline):
            self._stop_listening()
        return await super().on_tick(counter)

    def _stop_listening(self) -> None:
        if not self.should_exit:
            # phase 2 gets what phase 1 left of the drain time
            self.config.timeout_graceful_shutdown = max(0.0, self._drain_deadline - time.monotonic())
            super().handle_exit(*self._exit_signal)


def make_server(app: FastAPI, host: str, port: int, drain_timeout: float, log_level: str = "info"
                ) -> DrainingServer:
    """The uvicorn server for an app made by `server.app.create_app`. uvicorn configures no logging
    of its own (`server.logs`), and writes no access lines (`server.request_id` does, with the id)."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, log_config=None,
                            access_log=False, timeout_graceful_shutdown=drain_timeout)

    def busy() -> bool:
        scheduler = app.state.service.scheduler  # set by the app's lifespan, before the server listens
        return scheduler.running + scheduler.waiting > 0

    return DrainingServer(config, app.state.draining, busy)


def main(argv: list[str] | None = None) -> None:
    settings = settings_from(argv, dict(os.environ))
    configure_logging(json_lines=settings.json_output)
    # imported here so that `medusa-serve --help` answers without loading torch
    from medusa.checkpoints import HeadsLoadError
    from medusa.tree import TreeError
    from runtime.config import ConfigError
    from runtime.loading import ModelLoadError
    from server.app import create_app, load_engine

    log = logging.getLogger(__name__)
    log.info("loading model %s on %s", settings.model or "smollm2 (embedded)", settings.device)
    try:
        loaded, engine = load_engine(settings)
        # what --dtype (auto, or the device's default when not given) chose
        log.info("weights in %s", loaded.dtype_name)
    except (ModelLoadError, HeadsLoadError, TreeError, ConfigError) as e:
        sys.exit(f"medusa-serve: {e}")
    app = create_app(settings, loaded, engine=engine)
    make_server(app, settings.host, settings.port, settings.drain_timeout).run()


if __name__ == "__main__":
    main()
