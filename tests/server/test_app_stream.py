"""POST /generate_stream (and POST / with stream): one SSE event per token, in TGI's shape."""

import json

import pytest

PROMPT = "Hello world!"


def events(client, route="/generate_stream", **parameters):
    """The `data:` payloads of one streamed request, parsed, after checking the SSE framing."""
    body = {"inputs": PROMPT, "parameters": parameters}
    if route == "/":
        body["stream"] = True
    with client.stream("POST", route, json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    chunks = raw.split("\n\n")
    assert chunks[-1] == ""  # every event ends with a blank line
    assert all(chunk.startswith("data:{") and "\n" not in chunk for chunk in chunks[:-1])
    return [json.loads(chunk.removeprefix("data:")) for chunk in chunks[:-1]]


@pytest.mark.parametrize("route", ["/generate_stream", "/"])
def test_one_event_per_token_then_text_and_details(client, route):
    stream = events(client, route, max_new_tokens=7, details=True)
    assert len(stream) == 7
    assert [e["index"] for e in stream] == list(range(1, 8))
    for event in stream[:-1]:
        assert list(event) == ["index", "token", "generated_text", "details", "step"]  # TGI's, then ours
        assert event["generated_text"] is None and event["details"] is None
        assert set(event["token"]) == {"id", "text", "logprob", "special"}
    last = stream[-1]
    assert last["details"] == {"finish_reason": "length", "generated_tokens": 7, "seed": None,
                               "input_length": last["details"]["input_length"], "speculation": None}
    assert last["generated_text"] == "".join(e["token"]["text"] for e in stream if not e["token"]["special"])


def test_stream_equals_generate(client):
    parameters = {"max_new_tokens": 9, "do_sample": True, "seed": 3, "details": True}
    whole = client.post("/generate", json={"inputs": PROMPT, "parameters": parameters}).json()
    stream = events(client, **parameters)
    assert [e["token"] for e in stream] == whole["details"]["tokens"]
    assert stream[-1]["generated_text"] == whole["generated_text"]
    assert stream[-1]["details"]["seed"] == 3


def test_details_are_left_out_unless_asked(client):
    stream = events(client, max_new_tokens=3)
    assert stream[-1]["details"] is None
    assert stream[-1]["generated_text"] is not None


def test_a_one_token_request_streams_one_final_event(client):
    (only,) = events(client, max_new_tokens=1, details=True)
    assert only["index"] == 1 and only["details"]["generated_tokens"] == 1


def test_validation_errors_are_statuses_before_the_stream(client):
    response = client.post("/generate_stream", json={"inputs": PROMPT, "parameters": {"top_k": 0}})
    assert response.status_code == 422
    assert response.json()["error_type"] == "validation"
    response = client.post("/generate_stream", json={"inputs": PROMPT,
                                                     "parameters": {"decoder_input_details": True}})
    assert response.status_code == 422
    assert "decoder_input_details" in response.json()["error"]
