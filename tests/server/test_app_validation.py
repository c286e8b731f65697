"""Bad requests get 422 {"error", "error_type": "validation"} with a message that names the field."""

import pytest

PROMPT = "Hello world!"


def params(**parameters):
    return {"inputs": PROMPT, "parameters": parameters}


CASES = {
    "malformed JSON": ('{"inputs": "Hello", ', "JSON"),
    "inputs missing": ({"parameters": {}}, "inputs"),
    "inputs empty": ({"inputs": ""}, "inputs"),
    "inputs not a string": ({"inputs": 3}, "inputs"),
    "parameters not an object": ({"inputs": PROMPT, "parameters": [1]}, "parameters"),
    "max_new_tokens zero": (params(max_new_tokens=0), "max_new_tokens"),
    "max_new_tokens a string": (params(max_new_tokens="5"), "max_new_tokens"),
    "temperature zero": (params(temperature=0.0), "temperature"),
    "temperature negative": (params(temperature=-1), "temperature"),
    "top_k zero": (params(top_k=0), "top_k"),
    "top_p one": (params(top_p=1.0), "top_p"),
    "top_p zero": (params(top_p=0), "top_p"),
    "typical_p above one": (params(typical_p=1.5), "typical_p"),
    "repetition_penalty zero": (params(repetition_penalty=0), "repetition_penalty"),
    "five stop sequences": (params(stop=["a", "b", "c", "d", "e"]), "stop"),
    "stop not a list": (params(stop="a"), "stop"),
    "negative seed": (params(seed=-1), "seed"),
    "do_sample not a bool": (params(do_sample="yes"), "do_sample"),
    "best_of above one": (params(best_of=2, do_sample=True), "best_of"),
    "truncate zero": (params(truncate=0), "truncate"),
    "truncate above max_input_tokens": (params(truncate=1000), "truncate"),
    "top_n_tokens": (params(top_n_tokens=3), "top_n_tokens"),
    "unknown acceptance": (params(acceptance="greedy"), "acceptance"),
    "prompt too long": ({"inputs": "word " * 100}, "inputs"),
    "prompt + max_new_tokens too long": (params(max_new_tokens=120), "max_new_tokens"),
}


@pytest.mark.parametrize("route", ["/generate", "/generate_stream", "/"])
@pytest.mark.parametrize("case", CASES)
def test_bad_request_is_422_naming_the_field(client, case, route):
    body, field = CASES[case]
    if isinstance(body, str):
        response = client.post(route, content=body, headers={"content-type": "application/json"})
    else:
        response = client.post(route, json=body)
    assert response.status_code == 422, response.text
    error = response.json()
    assert set(error) == {"error", "error_type"}
    assert error["error_type"] == "validation"
    assert field in error["error"]


def test_unknown_route_answers_error_json(client):
    response = client.get("/nowhere")
    assert response.status_code == 404
    assert set(response.json()) == {"error", "error_type"}
