"""Bad requests get 422 {"error", "error_type": "validation"} with a message that names the field; a body
that is not JSON gets 400."""

import pytest

PROMPT = "Hello world!"


def params(**parameters):
    return {"inputs": PROMPT, "parameters": parameters}


ROUTES = ["/generate", "/generate_stream", "/"]

CASES = {
    "inputs missing": ({"parameters": {}}, "inputs"),
    "inputs empty": ({"inputs": ""}, "inputs"),
    "inputs not a string": ({"inputs": 3}, "inputs"),
    "inputs a lone surrogate": ('{"inputs": "Hi \\ud800"}', "inputs"),
    "parameters not an object": ({"inputs": PROMPT, "parameters": [1]}, "parameters"),
    "max_new_tokens zero": (params(max_new_tokens=0), "max_new_tokens"),
    "max_new_tokens a string": (params(max_new_tokens="5"), "max_new_tokens"),
    "temperature zero": (params(temperature=0.0), "temperature"),
    "temperature negative": (params(temperature=-1), "temperature"),
    "temperature NaN": ('{"inputs": "Hi", "parameters": {"temperature": NaN}}', "temperature"),
    "temperature Infinity": ('{"inputs": "Hi", "parameters": {"temperature": Infinity}}', "temperature"),
    "top_k zero": (params(top_k=0), "top_k"),
    "top_p one": (params(top_p=1.0), "top_p"),
    "top_p zero": (params(top_p=0), "top_p"),
    "typical_p above one": (params(typical_p=1.5), "typical_p"),
    "repetition_penalty zero": (params(repetition_penalty=0), "repetition_penalty"),
    "five stop sequences": (params(stop=["a", "b", "c", "d", "e"]), "stop"),
    "stop not a list": (params(stop="a"), "stop"),
    "stop empty": (params(stop=["a", ""]), "stop"),
    "stop a lone surrogate": ('{"inputs": "Hi", "parameters": {"stop": ["\\udc00"]}}', "stop"),
    "negative seed": (params(seed=-1), "seed"),
    "do_sample not a bool": (params(do_sample="yes"), "do_sample"),
    "best_of above its limit": (params(best_of=9, do_sample=True), "best_of"),
    "best_of greedy": (params(best_of=2), "best_of"),
    "best_of with a seed": (params(best_of=2, do_sample=True, seed=1), "best_of"),
    "truncate zero": (params(truncate=0), "truncate"),
    "truncate above max_input_tokens": (params(truncate=1000), "truncate"),
    "top_n_tokens above 20": (params(top_n_tokens=21), "top_n_tokens"),
    "frequency_penalty above 2": (params(frequency_penalty=2.5), "frequency_penalty"),
    "presence_penalty below -2": (params(presence_penalty=-2.5), "presence_penalty"),
    "presence_penalty a string": (params(presence_penalty="0.5"), "presence_penalty"),
    "watermark": (params(watermark=True), "watermark"),
    "watermark 0 for false": (params(watermark=0), "watermark"),
    "grammar of an unknown type": (params(grammar={"type": "yaml", "value": "a: b"}), "grammar"),
    "grammar a broken regex": (params(grammar={"type": "regex", "value": "[0-9"}), "grammar"),
    "grammar a broken schema": (params(grammar={"type": "json", "value": {"type": "objectx"}}), "grammar"),
    "grammar a regex not a string": (params(grammar={"type": "regex", "value": 5}), "grammar"),
    "unknown acceptance": (params(acceptance="greedy"), "acceptance"),
    "prediction a lone surrogate": ('{"inputs": "Hi", "parameters": {"prediction": "\\ud800"}}',
                                    "prediction"),
    "min_new_tokens above max_new_tokens": (params(max_new_tokens=4, min_new_tokens=5), "min_new_tokens"),
    "stop_token_ids past the vocabulary": (params(stop_token_ids=[300]), "stop_token_ids"),
    "prompt too long": ({"inputs": "word " * 100}, "inputs"),
    "prompt + max_new_tokens too long": (params(max_new_tokens=120), "max_new_tokens"),
}


UNSUPPORTED = {"watermark", "watermark 0 for false"}


def post(client, route, body):
    """`body` as JSON, or a str or bytes sent as they are (what json.dumps would not write)."""
    if isinstance(body, str | bytes):
        return client.post(route, content=body, headers={"content-type": "application/json"})
    return client.post(route, json=body)


def validation_error(response, status: int) -> str:
    assert response.status_code == status, response.text
    error = response.json()
    assert set(error) == {"error", "error_type"}
    assert error["error_type"] == "validation"
    return error["error"]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("case", CASES)
def test_bad_request_is_422_naming_the_field(client, case, route):
    body, field = CASES[case]
    message = validation_error(post(client, route, body), 422)
    assert field in message
    if case in UNSUPPORTED:
        assert "not supported" in message


MALFORMED = {"cut short": '{"inputs": "Hello", ', "not UTF-8": b'{"inputs": "\xff"}'}


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_json_is_400(client, case, route):
    message = validation_error(post(client, route, MALFORMED[case]), 400)
    assert "malformed JSON" in message


@pytest.mark.parametrize("route", ROUTES)
def test_no_op_values_of_unsupported_parameters_are_accepted(client, route):
    body = params(max_new_tokens=2, best_of=1, top_n_tokens=0, watermark=False, grammar=None)
    assert client.post(route, json=body).status_code == 200


def test_unknown_route_answers_error_json(client):
    response = client.get("/nowhere")
    assert response.status_code == 404
    assert set(response.json()) == {"error", "error_type"}
