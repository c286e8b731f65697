"""`medusa-serve`: start the HTTP server.

Precedence: command-line flags, then the environment variables in ENVIRONMENT (HOST, PORT,
MEDUSA_COMPILE), then the defaults written in `server.settings.Settings`.

SIGTERM (or Ctrl-C) drains: the app refuses new requests (503) at once, uvicorn stops accepting
connections and waits up to `drain_timeout` seconds for the open ones (the requests already taken,
streams included) to finish, then the scheduler stops. A second Ctrl-C quits at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn
from pydantic import ValidationError

from server.settings import Settings

if TYPE_CHECKING:
    from fastapi import FastAPI

FLAGS = ("model", "host", "port", "device", "dtype", "max_batch_size", "max_input_tokens", "max_total_tokens",
         "max_queue", "payload_limit", "max_prefill_tokens", "request_timeout", "drain_timeout",
         "medusa_heads", "tree", "max_speculative_batch", "chat_template", "compile", "api_key",
         "cors_allow_origins")
# HOST and PORT as TGI reads them; MEDUSA_COMPILE so that a container can turn compilation off without
# changing its command line
# API_KEY as TGI reads it, and so that a key need not appear in a process list
ENVIRONMENT = {"host": "HOST", "port": "PORT", "compile": "MEDUSA_COMPILE", "api_key": "API_KEY"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="medusa-serve", description="Serve a Llama-family model over the TGI "
                                "protocol, with Medusa speculative decoding when heads are given.")
    for name in FLAGS:
        field = Settings.model_fields[name]
        kind = field.annotation if field.annotation in (int, float) else str
        notes = [f"environment: {ENVIRONMENT[name]}"] if name in ENVIRONMENT else []
        if field.default is not None:
            notes.append(f"default: {field.default}")
        described = field.description or name.replace("_", " ")
        # default None: a flag not given leaves the environment or the Settings default in force
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=None,
                       help=f"{described} ({'; '.join(notes)})" if notes else described)
    return p


def settings_from(argv: list[str] | None, environ: dict[str, str]) -> Settings:
    args = parser().parse_args(argv)
    values: dict[str, object] = {name: environ[var] for name, var in ENVIRONMENT.items() if environ.get(var)}
    values |= {name: value for name, value in vars(args).items() if value is not None}
    try:
        return Settings(**values)
    except ValidationError as e:
        parser().error("; ".join(f"{'.'.join(map(str, err['loc'])) or 'settings'}: {err['msg']}"
                                 for err in e.errors()))


class DrainingServer(uvicorn.Server):
    """uvicorn's server, whose exit signal first sets the app's `draining` event."""

    def __init__(self, config: uvicorn.Config, draining: threading.Event) -> None:
        super().__init__(config)
        self.draining = draining

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.draining.set()
        super().handle_exit(sig, frame)


def make_server(app: FastAPI, host: str, port: int, drain_timeout: float, log_level: str = "info"
                ) -> DrainingServer:
    """The uvicorn server for an app made by `server.app.create_app`."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=drain_timeout)
    return DrainingServer(config, app.state.draining)


def main(argv: list[str] | None = None) -> None:
    settings = settings_from(argv, dict(os.environ))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # imported here so that `medusa-serve --help` answers without loading torch
    from medusa.checkpoints import HeadsLoadError
    from medusa.tree import TreeError
    from runtime.config import ConfigError
    from runtime.loading import ModelLoadError, load_model
    from server.app import build_engine, create_app

    log = logging.getLogger(__name__)
    log.info("loading model %s on %s", settings.model or "smollm2 (embedded)", settings.device)
    try:
        loaded = load_model(settings.model, settings.device, settings.dtype)
        # what --dtype (auto, or the device's default when not given) chose
        log.info("weights in %s", loaded.dtype_name)
        engine = build_engine(settings, loaded)
    except (ModelLoadError, HeadsLoadError, TreeError, ConfigError) as e:
        sys.exit(f"medusa-serve: {e}")
    app = create_app(settings, loaded, engine=engine)
    make_server(app, settings.host, settings.port, settings.drain_timeout).run()


if __name__ == "__main__":
    main()
