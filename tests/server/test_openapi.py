"""The OpenAPI document states what the server does.

First a regression test for each place where it once did not; then schemathesis against a live server on
the tiny model: every status and content type a response has is declared, every body conforms to its
schema, no request ends in an undeclared 5xx, and what the schema calls invalid is refused.
"""

import json

import pytest
import schemathesis
from fastapi.responses import JSONResponse
from hypothesis import settings
from pydantic import TypeAdapter, ValidationError
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from runtime.config import MAX_TOP_N
from server.app import create_app
from server.openai_protocol import ChatCompletionChunk, Completion, OpenAIErrorResponse
from server.protocol import (
    MAX_BEST_OF,
    Details,
    ErrorResponse,
    GenerateResponse,
    PrefillToken,
    StreamResponse,
    Token,
)
from server.responses import StreamEvent
from tests.server.support import serve, tiny_settings

OPENAPI = create_app(tiny_settings()).openapi()  # the model loads at startup: this builds no model
SCHEMAS = OPENAPI["components"]["schemas"]
GENERATION_ROUTES = ["/generate", "/generate_stream", "/"]


def responses(path: str, method: str = "post") -> dict:
    return OPENAPI["paths"][path][method]["responses"]


# ---------------------------------------------------------------- one test per mismatch found

def test_health_answers_json_as_declared(client):
    response = client.get("/health")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"status": "ok"}
    declared = responses("/health", "get")
    assert set(declared) == {"200", "503"}
    assert declared["200"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Health"}


def test_empty_inputs_are_refused_by_the_schema():
    assert SCHEMAS["GenerateRequest"]["properties"]["inputs"]["minLength"] == 1


def test_null_parameters_are_allowed_by_the_schema():
    # the server reads `"parameters": null` as the defaults, as TGI does
    assert {"type": "null"} in SCHEMAS["GenerateRequest"]["properties"]["parameters"]["anyOf"]


def test_penalties_declare_their_range_and_unsupported_parameters_their_only_values():
    properties = SCHEMAS["Parameters"]["properties"]

    def bounds(name: str) -> tuple:
        number = next(s for s in properties[name]["anyOf"] if s["type"] != "null")
        return number["minimum"], number["maximum"]

    assert bounds("best_of") == (1, MAX_BEST_OF)
    assert bounds("top_n_tokens") == (0, MAX_TOP_N)
    assert bounds("frequency_penalty") == (-2, 2) and bounds("presence_penalty") == (-2, 2)
    assert properties["watermark"]["const"] is False
    for name in ("watermark",):
        assert "not supported" in properties[name]["description"]


def test_streaming_routes_declare_an_event_stream():
    assert set(responses("/")["200"]["content"]) == {"application/json", "text/event-stream"}
    assert set(responses("/generate_stream")["200"]["content"]) == {"text/event-stream"}


@pytest.mark.parametrize("route", GENERATION_ROUTES)
def test_generation_routes_declare_their_errors(route):
    declared = responses(route)
    assert set(declared) == {"200", "400", "413", "422", "424", "429", "503", "504"}
    for status in set(declared) - {"200"}:
        assert declared[status]["content"] == {
            "application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}


def test_non_finite_logprobs_are_null_on_every_route():
    token = Token(id=7, text="a", logprob=float("-inf"), special=False)
    prefill = [PrefillToken(id=1, text="<s>", logprob=None),
               PrefillToken(id=5, text="b", logprob=float("nan")),
               PrefillToken(id=6, text="c", logprob=-0.5)]
    response = GenerateResponse(generated_text="a", details=Details(
        finish_reason="length", generated_tokens=1, seed=None, prefill=prefill, tokens=[token]))
    details = json.loads(JSONResponse(response.model_dump(mode="json")).body)["details"]  # as /generate
    assert details["tokens"][0]["logprob"] is None
    assert [t["logprob"] for t in details["prefill"]] == [None, None, -0.5]
    event = json.loads(StreamResponse(index=1, token=token).model_dump_json())  # as the stream writes it
    assert event["token"]["logprob"] is None


# ---------------------------------------------------------------- schemathesis against a live server

# Stream events are read whole (the default stops at 20), so the last one, with details, is checked too.
SCHEMA = schemathesis.openapi.from_dict(OPENAPI,
                                        config=schemathesis.Config.from_dict({"max-stream-events": 200}))
STREAM_EVENT = TypeAdapter(StreamResponse | ErrorResponse)
OPENAI_STREAM_EVENT = {"/v1/chat/completions": TypeAdapter(ChatCompletionChunk | OpenAIErrorResponse),
                       "/v1/completions": TypeAdapter(Completion | OpenAIErrorResponse),
                       "/v1/responses": TypeAdapter(StreamEvent)}


def asks_for_timeout(case) -> bool:
    parameters = case.body.get("parameters") if isinstance(case.body, dict) else None
    return isinstance(parameters, dict) and parameters.get("timeout") is not None


def no_server_error(ctx, response, case) -> None:
    """No 5xx but the declared 504 that a request's own `timeout` asks for: the schema allows any
    positive timeout, and schemathesis tries 5e-324 s."""
    if response.status_code == 504 and asks_for_timeout(case):
        return
    assert response.status_code < 500, f"{response.status_code}: {response.text_lossy()}"


def stream_events_conform(ctx, response, case) -> None:
    """Each event's data is a StreamResponse or an ErrorResponse (on /v1: an OpenAI chunk or error, or the
    closing [DONE]). The document says so in words only: an event stream's schema here can reference no
    model that a JSON route does not declare."""
    if response.headers.get("content-type", [""])[0].startswith("text/event-stream"):
        event = OPENAI_STREAM_EVENT.get(case.path, STREAM_EVENT)
        for line in response.text.splitlines():
            if line.startswith("data:") and line != "data: [DONE]":
                try:
                    event.validate_json(line.removeprefix("data:"), strict=True)
                except ValidationError as e:  # as a failed check, reported with the request that caused it
                    raise AssertionError(f"{line}\n{e}") from None


# The positive-data check (every request the schema allows is accepted) is left out: the server also
# refuses what no static schema can state, a prompt over max_input_tokens or prompt + max_new_tokens
# over max_total_tokens, and those are counted in tokens.
CHECKS = [no_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection, stream_events_conform]


@pytest.fixture(scope="module")
def live_url(loaded):
    with serve(create_app(tiny_settings(), loaded)) as url:
        yield url


@SCHEMA.parametrize()
@settings(max_examples=40, derandomize=True, deadline=None, database=None)
def test_server_does_what_its_schema_says(case, live_url):
    case.call_and_validate(base_url=live_url, checks=CHECKS)
