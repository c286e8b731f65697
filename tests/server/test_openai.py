"""The OpenAI-compatible routes: the `openai` SDK against a real uvicorn server on a loopback port, and
error shapes through the test client."""

import openai
import pytest

from server.app import create_app
from server.openai_routes import StopHold
from tests.server.support import metric_values, serve, tiny_settings

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital?"}]
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def sdk(loaded):
    with serve(create_app(tiny_settings(), loaded)) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)


def test_models_lists_the_served_model(sdk):
    assert [m.id for m in sdk.models.list()] == ["tiny-random-llama"]


def test_chat_whole_and_streamed_agree(sdk):
    whole = sdk.chat.completions.create(model="m", messages=MESSAGES, max_tokens=10, temperature=0,
                                        logprobs=True)
    choice = whole.choices[0]
    assert whole.object == "chat.completion" and whole.model == "tiny-random-llama"
    assert choice.message.role == "assistant" and choice.finish_reason in ("length", "stop")
    assert whole.usage.completion_tokens == 10 or choice.finish_reason == "stop"
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    assert whole.usage.prompt_tokens > len(MESSAGES)  # the chat template's tokens around the messages
    assert all(t.logprob is None or t.logprob <= 0 for t in choice.logprobs.content)

    chunks = list(sdk.chat.completions.create(model="m", messages=MESSAGES, max_tokens=10, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    finished = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finished == [choice.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_completion_whole_and_streamed_agree(sdk):
    whole = sdk.completions.create(model="m", prompt=PROMPT, max_tokens=12, temperature=0)
    assert whole.object == "text_completion" and whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 12
    chunks = list(sdk.completions.create(model="m", prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                         stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == 12


def test_a_stop_sequence_ends_the_text_and_is_left_out(sdk):
    text = sdk.completions.create(model="m", prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
    stop = next(c for c in text[3:] if c.strip())  # a character the greedy text reaches after a few tokens
    expected = text[:text.index(stop)]

    whole = sdk.completions.create(model="m", prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop])
    assert whole.choices[0].text == expected and whole.choices[0].finish_reason == "stop"
    chunks = list(sdk.completions.create(model="m", prompt=PROMPT, max_tokens=12, temperature=0, stop=stop,
                                         stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_seeded_sampling_repeats(sdk):
    def sample(seed: int) -> str:
        return sdk.chat.completions.create(model="m", messages=MESSAGES, max_tokens=12, temperature=1.0,
                                           top_p=0.9, seed=seed).choices[0].message.content

    assert sample(7) == sample(7) != sample(8)


def test_invalid_requests_raise_bad_request(sdk):
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.chat.completions.create(model="m", messages=MESSAGES, max_tokens=10, n=2)
    assert refused.value.body["param"] == "n" and refused.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match="max_total_tokens|must be"):
        sdk.completions.create(model="m", prompt=PROMPT, max_tokens=1000)


def test_streamed_text_holds_back_what_may_begin_a_stop_sequence():
    hold = StopHold(["END", "\n\n"])
    released = [hold.push(piece) for piece in ["Hello E", "N", "ough\n", "said E", "ND tail"]]
    assert released == ["Hello ", "", "ENough", "\nsaid ", ""]
    assert hold.finish() == ""  # the stop and what followed it in the same step are cut
    hold = StopHold(["END"])
    assert hold.push("an E") == "an " and hold.finish() == "E"  # finished by length: nothing is lost


# ---------------------------------------------------------------- error shapes, through the test client

def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize("field, value", [("n", 3), ("top_logprobs", 2), ("presence_penalty", 0.5),
                                          ("temperature", 2.5), ("max_tokens", 0)])
def test_unsupported_or_out_of_range_parameters_are_400(client, field, value):
    body = {"model": "m", "messages": MESSAGES, field: value}
    error = error_of(client.post("/v1/chat/completions", json=body), 400)
    assert error["param"] == field and error["type"] == "invalid_request_error"
    assert field in error["message"]


def test_malformed_json_and_missing_fields_are_400(client):
    error = error_of(client.post("/v1/completions", content=b"{not json",
                                 headers={"content-type": "application/json"}), 400)
    assert "malformed JSON" in error["message"]
    assert error_of(client.post("/v1/chat/completions", json={"model": "m"}), 400)["param"] == "messages"


def test_a_prompt_over_the_limits_is_400_in_openai_shape(client):
    error = error_of(client.post("/v1/completions", json={"prompt": "word " * 500, "max_tokens": 4}), 400)
    assert "tokens" in error["message"]


def test_tgi_routes_keep_their_error_shape(client):
    response = client.post("/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 0}})
    assert response.status_code == 422 and set(response.json()) == {"error", "error_type"}


def test_openai_requests_count_in_the_same_metrics(client):
    names = ("medusa_requests_total", 'medusa_request_success_total{finish_reason="length"}',
             'medusa_request_failure_total{reason="validation"}')

    def counts() -> list[float]:
        values = metric_values(client.get("/metrics").text)
        return [values.get(name, 0.0) for name in names]

    before = counts()
    greedy = {"prompt": PROMPT, "max_tokens": 2, "temperature": 0}  # sampled, it might end at EOS
    assert client.post("/v1/completions", json=greedy).status_code == 200
    assert client.post("/v1/completions", json={"prompt": PROMPT * 80}).status_code == 400  # too long
    after = counts()
    assert [a - b for a, b in zip(after, before, strict=True)] == [2, 1, 1]
