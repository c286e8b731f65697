"""A request-body size limit, enforced before anything reads or parses a body whole.

An ASGI middleware: a declared `content-length` over the limit is refused at once; a body sent in
chunks (or under a false length) is counted as it arrives and refused at the first byte over. Either
way the answer is 413 `{"error", "error_type": "validation"}`, and the app never sees the body.
Without it a 20 MB `inputs` was parsed and tokenized whole before the input-token limit refused it
(17.5 s and +1.8 GB resident on the embedded model, as issue 12 measured it).
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.openai_protocol import protocol_error


class BodyLimit:
    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            await self._refuse(scope, receive, send)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before its body was whole
                return
            body += message.get("body", b"")
            if len(body) > self.limit:
                await self._refuse(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(bytes(body), receive), send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"Request body too large: the limit is {self.limit} bytes"
        await protocol_error(scope["path"], 413, message, "validation")(scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that hands the app the body read already, then what the client sends next (its
    disconnect, which a non-streaming handler waits for)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay
