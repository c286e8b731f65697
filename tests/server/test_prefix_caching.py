"""Prefix caching through the server: a conversation's next turn reports the prompt tokens whose K/V the
cache held (OpenAI's usage.prompt_tokens_details.cached_tokens, the Responses API's
input_tokens_details, /metrics) and gets the reply a server without the cache gives."""

from fastapi.testclient import TestClient

from server.app import create_app
from tests.server.support import metric_values, tiny_settings

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital?"}]
CACHED = "medusa_prompt_tokens_cached_total"
LIMITS = {"max_input_tokens": 256, "max_total_tokens": 512}  # a conversation in a tiny vocabulary's tokens


def chat(client: TestClient, messages: list[dict]) -> dict:
    response = client.post("/v1/chat/completions",
                           json={"messages": messages, "max_tokens": 12, "temperature": 0})
    assert response.status_code == 200, response.text
    return response.json()


def two_turns(client: TestClient) -> tuple[dict, dict, float]:
    """A conversation's first and second turn, and how many prompt tokens /metrics counted as cached."""
    before = metric_values(client.get("/metrics").text).get(CACHED, 0.0)
    first = chat(client, MESSAGES)
    reply = first["choices"][0]["message"]["content"]
    turn = [{"role": "assistant", "content": reply}, {"role": "user", "content": "Why?"}]
    second = chat(client, MESSAGES + turn)
    return first, second, metric_values(client.get("/metrics").text)[CACHED] - before


def test_a_conversations_next_turn_starts_from_the_cache_with_the_same_reply(loaded):
    with TestClient(create_app(tiny_settings(**LIMITS), loaded)) as client:
        first, second, counted = two_turns(client)
        assert client.get("/info").json()["prefix_caching"] is True
    with TestClient(create_app(tiny_settings(**LIMITS, prefix_caching=False), loaded)) as client:
        _, uncached, uncounted = two_turns(client)
        assert client.get("/info").json()["prefix_caching"] is False
    assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert first["usage"]["prompt_tokens"] <= cached < second["usage"]["prompt_tokens"]
    assert counted == cached
    assert uncached["usage"]["prompt_tokens_details"]["cached_tokens"] == 0 and uncounted == 0
    assert second["choices"] == uncached["choices"]


def test_a_repeated_response_reports_its_cached_input_tokens(client):
    body = {"input": "Name a colour.", "instructions": "Be brief.", "max_output_tokens": 4, "temperature": 0}
    first, again = (client.post("/v1/responses", json=body).json()["usage"] for _ in range(2))
    assert again["input_tokens"] == first["input_tokens"]
    # all but the last token, whose hidden state the first output token needs
    assert again["input_tokens_details"]["cached_tokens"] == again["input_tokens"] - 1
