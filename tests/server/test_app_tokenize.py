"""POST /tokenize (TGI's): the prompt's tokens as generation feeds them to the model, with their text."""

import pytest

PROMPT = "Caf\u00e9 \u2603 costs 12.50\u20ac"  # characters of two and three UTF-8 bytes


def tokenize(client, inputs=PROMPT, **parameters):
    return client.post("/tokenize", json={"inputs": inputs, "parameters": parameters})


def prefill_ids(client, inputs=PROMPT, **parameters):
    parameters = {"max_new_tokens": 1, "decoder_input_details": True, **parameters}
    body = {"inputs": inputs, "parameters": parameters}
    response = client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    return [t["id"] for t in response.json()["details"]["prefill"]]


@pytest.mark.parametrize("truncate", [None, 5])
def test_the_tokens_are_those_generation_feeds_the_model(client, truncate):
    tokens = tokenize(client, truncate=truncate).json()
    assert [t["id"] for t in tokens] == prefill_ids(client, truncate=truncate)
    assert truncate is None or len(tokens) == truncate


def test_each_token_gives_the_text_it_adds_and_where_that_lies(client, loaded):
    tokens = tokenize(client).json()
    decoded = loaded.tokenizer.decode([t["id"] for t in tokens])
    assert "".join(t["text"] for t in tokens) == decoded
    assert all(decoded[t["start"]:t["stop"]] == t["text"] for t in tokens)
    assert [t["start"] for t in tokens[1:]] == [t["stop"] for t in tokens[:-1]]  # no gap, no overlap
    assert any(t["text"] == "" for t in tokens)  # a byte of a character whose next token completes it
    assert "\u2603" in decoded


def test_a_prompt_over_the_input_limit_is_counted_and_an_unreadable_one_refused(client):
    tokens = tokenize(client, "word " * 100).json()  # the limit is 64 tokens
    assert len(tokens) > 64
    assert client.post("/generate", json={"inputs": "word " * 100}).status_code == 422
    for body, field in [({"inputs": ""}, "inputs"), ({"inputs": 5}, "inputs"),
                        ({"inputs": "Hi", "parameters": {"truncate": 0}}, "truncate"),
                        ({"inputs": "Hi", "parameters": {"truncate": 65}}, "truncate"),
                        # certainly over max_input_tokens: refused before it is tokenized
                        ({"inputs": "x" * 10**6}, "inputs")]:
        response = client.post("/tokenize", json=body)
        assert response.status_code == 422 and field in response.json()["error"], body
