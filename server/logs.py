"""Log lines: text for a person at a terminal, or JSON lines (`--json-output`, as TGI's) for a log
collector, one object per record. Either way a record written while a request is served names the
request (`server.request_id`).

`configure` is called once, by `medusa-serve`. uvicorn's loggers reach the root handler set here
(`server.cli.make_server` gives uvicorn no logging configuration of its own), so its lines take the
same format.

A JSON line holds `time` (UTC, ISO 8601), `level`, `logger`, `message`, `request_id` when there is
one, every field a call passed in `extra` (the access line's method, path, status and seconds), and
`exception` with the traceback when there is one.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import TextIO

from server.request_id import CURRENT

TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# a LogRecord's own attributes; any other one came from a call's `extra` and becomes a JSON field.
# uvicorn adds color_message, the message again with terminal colours.
_RECORD_ATTRIBUTES = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "request_id",
                                                                    "color_message"}


def stamp_request_id(record: logging.LogRecord) -> bool:
    """A handler filter: the record keeps the id of the request being served where it was written."""
    record.request_id = CURRENT.get()
    return True


class TextLines(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(TEXT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        return line if record.request_id is None else f"{line} [request {record.request_id}]"


class JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        if record.request_id is not None:
            entry["request_id"] = record.request_id
        entry |= {key: value for key, value in vars(record).items() if key not in _RECORD_ATTRIBUTES}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)


def handler(json_lines: bool, stream: TextIO | None = None) -> logging.Handler:
    """A handler writing to `stream` (default: stderr) in the chosen format, request ids stamped."""
    out = logging.StreamHandler(stream)
    out.addFilter(stamp_request_id)
    out.setFormatter(JsonLines() if json_lines else TextLines())
    return out


def configure(json_lines: bool) -> None:
    """INFO and above from every logger, uvicorn's included, through one handler on stderr."""
    logging.basicConfig(level=logging.INFO, handlers=[handler(json_lines)], force=True)
