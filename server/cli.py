"""`medusa-serve`: start the HTTP server.

Precedence: command-line flags, then the HOST and PORT environment variables, then the defaults
written in `server.settings.Settings`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import uvicorn
from pydantic import ValidationError

from server.settings import Settings

FLAGS = ("model", "host", "port", "device", "dtype", "max_batch_size", "max_input_tokens", "max_total_tokens",
         "max_queue", "medusa_heads", "tree", "chat_template")
ENVIRONMENT = {"host": "HOST", "port": "PORT"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="medusa-serve", description="Serve a Llama-family model over the TGI "
                                "protocol, with Medusa speculative decoding when heads are given.")
    for name in FLAGS:
        field = Settings.model_fields[name]
        kind = int if field.annotation is int else str
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


def main(argv: list[str] | None = None) -> None:
    settings = settings_from(argv, dict(os.environ))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # imported here so that `medusa-serve --help` answers without loading torch
    from medusa.heads import HeadsLoadError
    from medusa.loading import ModelLoadError, load_model
    from medusa.tree import TreeError
    from server.app import build_engine, create_app

    logging.getLogger(__name__).info("loading model %s on %s (%s)", settings.model or "smollm2 (embedded)",
                                     settings.device, settings.dtype)
    try:
        loaded = load_model(settings.model, settings.device, settings.dtype)
        engine = build_engine(settings, loaded)
    except (ModelLoadError, HeadsLoadError, TreeError) as e:
        sys.exit(f"medusa-serve: {e}")
    uvicorn.run(create_app(settings, loaded, engine=engine), host=settings.host, port=settings.port,
                log_level="info")


if __name__ == "__main__":
    main()
