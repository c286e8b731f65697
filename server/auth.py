"""API keys: Bearer authentication on every route but /health, /metrics and the playground page, when
keys are set.

An ASGI middleware, so that a request without a valid key is refused before any route, body or
model work, in the error shape of the protocol it called (OpenAI's under /v1, TGI's elsewhere), with
401 and `www-authenticate: Bearer`. Keys are compared in constant time, each of them every time, so
the answer's timing tells nothing of a key or of which key came close. /health stays open for load
balancers and orchestrators, /metrics for Prometheus (a network boundary protects it, as TGI's)
unless `open_metrics` is false. The playground's page and files (`server.playground`) stay open too:
a browser loads them without a key, and the page sends the key a person types with its requests.
"""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from server.openai_protocol import protocol_error
from server.playground import is_playground


class ApiKeys:
    def __init__(self, app: ASGIApp, keys: tuple[str, ...], *, open_metrics: bool = True) -> None:
        assert keys and all(keys), "at least one non-empty key"
        self.app = app
        self.keys = tuple(key.encode() for key in keys)
        self.open_paths = frozenset({"/health", "/metrics"} if open_metrics else {"/health"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._open(scope) or self._allowed(scope):
            await self.app(scope, receive, send)
            return
        message = "Missing or invalid API key: send the header 'Authorization: Bearer <key>'"
        response = protocol_error(scope["path"], 401, message, "unauthorized",
                                  headers={"www-authenticate": "Bearer"})
        await response(scope, receive, send)

    def _open(self, scope: Scope) -> bool:
        return scope["path"] in self.open_paths or is_playground(scope)

    def _allowed(self, scope: Scope) -> bool:
        scheme, _, given = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
        matches = [hmac.compare_digest(given.strip(), key) for key in self.keys]  # every key, every time
        return scheme.lower() == b"bearer" and any(matches)
