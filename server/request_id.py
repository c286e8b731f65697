"""Request ids: every HTTP exchange carries one in `x-request-id`, and the log lines written while it is
served name it.

A client's or load balancer's id is kept when it looks like one (1 to 128 printable ASCII characters,
no spaces: it goes into log lines and a response header as it is, so nothing may forge a line);
otherwise the server makes one (32 hex digits). The response echoes it. The id lives in a context
variable of the request's task, which `asyncio.to_thread` copies, so the records written by a route
and by the work it hands to threads carry it (`server.logs` writes it); the scheduler's thread serves
many requests at once and writes none.

An ASGI middleware, the outermost, so that every answer has the header, refusals (401, 413, CORS
preflights) included, and writes one access line per request (method, path, status, seconds).
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from contextvars import ContextVar

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = "x-request-id"
CURRENT: ContextVar[str | None] = ContextVar("request_id", default=None)  # None outside a request
_ACCEPTED = re.compile(r"[\x21-\x7e]{1,128}")
# orchestrators probe /health and Prometheus scrapes /metrics every few seconds: their lines would bury
# the requests', so they go out at DEBUG
QUIET_PATHS = frozenset({"/health", "/metrics"})

access_log = logging.getLogger("server.access")


def request_id(given: bytes | None) -> str:
    """The id of a request whose `x-request-id` header was `given` (None: no header)."""
    text = (given or b"").decode("latin-1")
    return text if _ACCEPTED.fullmatch(text) else uuid.uuid4().hex


class RequestIds:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id(dict(scope["headers"]).get(HEADER.encode()))
        token = CURRENT.set(rid)
        status: int | None = None
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                MutableHeaders(scope=message).append(HEADER, rid)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            status = status or 500  # what Starlette's outermost error middleware answers
            raise
        finally:
            seconds = time.perf_counter() - started
            level = logging.DEBUG if scope["path"] in QUIET_PATHS else logging.INFO
            access_log.log(level, "%s %s %s %.3f s", scope["method"], scope["path"], status, seconds,
                           extra={"method": scope["method"], "path": scope["path"], "status": status,
                                  "seconds": round(seconds, 6)})
            CURRENT.reset(token)
