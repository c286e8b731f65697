"""Request ids and log lines: every answer carries an `x-request-id` (the client's when it looks like
one, else a new one), and the access line, text or JSON, names it."""

from __future__ import annotations

import contextvars
import io
import json
import logging
import re

import pytest
from fastapi.testclient import TestClient
from starlette.applications import Starlette
from starlette.routing import Route

from server.app import create_app
from server.logs import handler
from server.request_id import CURRENT, RequestIds
from tests.server.support import tiny_settings

GENERATE = {"inputs": "hello", "parameters": {"max_new_tokens": 2}}


@pytest.fixture
def access_lines():
    """The access log as it would be written, in JSON lines; yields a function reading the records."""
    stream = io.StringIO()
    out = handler(json_lines=True, stream=stream)
    logger = logging.getLogger("server.access")
    level = logger.level
    logger.addHandler(out)
    logger.setLevel(logging.DEBUG)
    try:
        yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    finally:
        logger.removeHandler(out)
        logger.setLevel(level)


def test_a_request_without_an_id_gets_a_new_one_each_time(client):
    first, second = (client.get("/health").headers["x-request-id"] for _ in range(2))
    assert re.fullmatch("[0-9a-f]{32}", first) and re.fullmatch("[0-9a-f]{32}", second)
    assert first != second


TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.mark.parametrize("given", ["abc-123", "a" * 128, TRACEPARENT])
def test_a_clients_id_is_echoed(client, given):
    response = client.post("/generate", json=GENERATE, headers={"x-request-id": given})
    assert response.status_code == 200
    assert response.headers["x-request-id"] == given


@pytest.mark.parametrize("given", [b"two words", b"a" * 129, b"caf\xc3\xa9", b""])
def test_an_id_that_could_forge_a_log_line_is_replaced(client, given):
    echoed = client.get("/health", headers={"x-request-id": given}).headers["x-request-id"]
    assert re.fullmatch("[0-9a-f]{32}", echoed)


def test_refusals_carry_the_id_too(loaded):
    with TestClient(create_app(tiny_settings(api_key="key"), loaded)) as guarded:
        refused = guarded.post("/generate", json=GENERATE, headers={"x-request-id": "refused-1"})
        missing = guarded.get("/nowhere", headers={"authorization": "Bearer key",
                                                   "x-request-id": "missing-1"})
    assert (refused.status_code, refused.headers["x-request-id"]) == (401, "refused-1")
    assert (missing.status_code, missing.headers["x-request-id"]) == (404, "missing-1")


def test_each_request_has_one_access_line_with_its_id(client, access_lines):
    client.post("/generate", json=GENERATE, headers={"x-request-id": "generate-1"})
    client.post("/generate", json={"inputs": ""}, headers={"x-request-id": "invalid-1"})
    client.get("/health", headers={"x-request-id": "probe-1"})
    by_id = {line["request_id"]: line for line in access_lines()}
    assert set(by_id) == {"generate-1", "invalid-1", "probe-1"}
    generate = by_id["generate-1"]
    assert (generate["level"], generate["logger"]) == ("INFO", "server.access")
    assert (generate["method"], generate["path"], generate["status"]) == ("POST", "/generate", 200)
    assert generate["seconds"] > 0 and generate["message"].startswith("POST /generate 200 ")
    assert by_id["invalid-1"]["status"] == 422
    assert by_id["probe-1"]["level"] == "DEBUG"  # probes every few seconds must not bury the requests


def test_a_route_that_raises_is_logged_as_a_500(access_lines):
    def broken(request):
        raise RuntimeError("injected")

    app = RequestIds(Starlette(routes=[Route("/broken", broken)]))
    with TestClient(app, raise_server_exceptions=False) as plain:
        assert plain.get("/broken", headers={"x-request-id": "broken-1"}).status_code == 500
    [line] = access_lines()
    assert (line["request_id"], line["status"]) == ("broken-1", 500)


def log_both_ways(json_lines: bool) -> list[str]:
    """One record outside any request and one, with a traceback, inside the request 'inside-1'."""
    stream = io.StringIO()
    logger = logging.getLogger("tests.request_id")
    logger.addHandler(handler(json_lines, stream))
    logger.propagate = False
    try:
        logger.warning("outside")

        def inside() -> None:
            CURRENT.set("inside-1")
            try:
                raise ValueError("boom")
            except ValueError:
                logger.exception("inside %s", "a request")

        contextvars.copy_context().run(inside)
    finally:
        logger.handlers.clear()
        logger.propagate = True
    return stream.getvalue().splitlines()


def test_json_lines_are_one_object_per_record_with_the_request_id():
    lines = log_both_ways(json_lines=True)
    outside, inside = (json.loads(line) for line in lines)  # the traceback stays inside its line
    assert (outside["message"], outside["level"]) == ("outside", "WARNING") and "request_id" not in outside
    assert (inside["message"], inside["request_id"]) == ("inside a request", "inside-1")
    assert "ValueError: boom" in inside["exception"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", inside["time"])


def test_text_lines_name_the_request_when_there_is_one():
    lines = log_both_ways(json_lines=False)
    assert lines[0].endswith("WARNING tests.request_id: outside")
    assert lines[1].endswith("ERROR tests.request_id: inside a request [request inside-1]")
    assert "ValueError: boom" in lines[-1]
