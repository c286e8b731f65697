"""`huggingface_hub.InferenceClient` against a real uvicorn server on a loopback port, serving with Medusa
heads: TGI's text generation (`POST /` with `stream` in the body), the OpenAI chat routes under /v1, and
the endpoint calls (`/info`, `/health`). `text-generation`'s Client is tested in test_tgi_client.py.

How this client version (0.36) addresses a custom server: `base_url=URL` sends text_generation to `URL`
itself and chat_completion to `URL/v1/chat/completions` (it appends `/v1` when the URL lacks it), so
`base_url=URL + "/v1"` reaches the same chat route; get_endpoint_info and health_check need
`model=URL, provider="hf-inference"`.
"""

import json
import re

import pytest
from huggingface_hub import InferenceClient
from huggingface_hub.errors import BadRequestError, ValidationError

from server.app import create_app
from tests.server.support import save_tiny_heads, serve, tiny_settings

PROMPT = "What is the capital of France?"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital?"}]


@pytest.fixture(scope="module")
def url(loaded, tmp_path_factory):
    heads = save_tiny_heads(tmp_path_factory.mktemp("heads"), loaded)
    with serve(create_app(tiny_settings(medusa_heads=heads, tree="cpu"), loaded)) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def tgi(url):
    return InferenceClient(base_url=url, timeout=30)


@pytest.fixture(scope="module")
def chat(url):
    return InferenceClient(base_url=f"{url}/v1", timeout=30)


def test_text_generation_whole_and_streamed_agree(tgi):
    whole = tgi.text_generation(PROMPT, max_new_tokens=10, details=True, decoder_input_details=True)
    details = whole.details
    assert details.finish_reason == "length" and details.seed is None
    assert details.generated_tokens == 10 == len(details.tokens)
    assert "".join(t.text for t in details.tokens) == whole.generated_text
    assert all(t.logprob is None or t.logprob <= 0 for t in details.tokens)
    assert details.prefill[0].logprob is None  # nothing precedes the first prompt token

    streamed = list(tgi.text_generation(PROMPT, max_new_tokens=10, details=True, stream=True))
    assert [s.index for s in streamed] == list(range(1, 11))
    assert [(s.token.id, s.token.text) for s in streamed] == [(t.id, t.text) for t in details.tokens]
    assert [s.token.logprob for s in streamed] == pytest.approx([t.logprob for t in details.tokens], abs=1e-5)
    assert all(s.generated_text is None and s.details is None for s in streamed[:-1])
    last = streamed[-1]
    assert last.generated_text == whole.generated_text
    assert (last.details.finish_reason, last.details.generated_tokens) == ("length", 10)
    assert last.details.input_length == len(details.prefill)


def test_text_generation_without_details_is_the_same_text(tgi):
    text = tgi.text_generation(PROMPT, max_new_tokens=6)
    assert text == tgi.text_generation(PROMPT, max_new_tokens=6, details=True).generated_text
    assert "".join(tgi.text_generation(PROMPT, max_new_tokens=6, stream=True)) == text
    assert tgi.text_generation(PROMPT, max_new_tokens=6, return_full_text=True) == PROMPT + text


def test_a_stop_sequence_ends_both_ways(tgi):
    text = tgi.text_generation(PROMPT, max_new_tokens=12)
    stop = next(c for c in text[3:] if c.strip())  # a character the greedy text reaches after a few tokens
    whole = tgi.text_generation(PROMPT, max_new_tokens=12, details=True, stop=[stop])
    tokens = whole.details.tokens
    # TGI's text keeps the stop sequence: generation ends with the first token whose text holds it
    assert whole.details.finish_reason == "stop_sequence" and text.startswith(whole.generated_text)
    assert stop in tokens[-1].text and stop not in "".join(t.text for t in tokens[:-1])

    streamed = list(tgi.text_generation(PROMPT, max_new_tokens=12, details=True, stream=True, stop=[stop]))
    assert streamed[-1].details.finish_reason == "stop_sequence"
    assert streamed[-1].generated_text == whole.generated_text
    assert streamed[-1].details.generated_tokens == whole.details.generated_tokens == len(streamed)


def test_seeded_sampling_repeats_and_reports_its_seed(tgi):
    def sample(seed: int):
        return tgi.text_generation(PROMPT, max_new_tokens=8, details=True, do_sample=True, temperature=0.9,
                                   top_k=50, top_p=0.95, seed=seed)

    first, again, other = sample(11), sample(11), sample(12)
    assert first.details.seed == 11
    assert [t.id for t in first.details.tokens] == [t.id for t in again.details.tokens]
    assert [t.id for t in first.details.tokens] != [t.id for t in other.details.tokens]


def test_speculation_figures_reach_the_client(tgi, chat):
    """The `speculation` (TGI) and `medusa` (OpenAI) extensions: the client keeps fields it does not know."""
    whole = tgi.text_generation(PROMPT, max_new_tokens=10, details=True)
    speculation = whole.details.speculation
    steps, accepted = speculation["steps"], speculation["accepted_tokens"]
    assert steps >= 1 and speculation["mean_accepted_len"] == pytest.approx(1 + accepted / steps)
    last = list(tgi.text_generation(PROMPT, max_new_tokens=10, details=True, stream=True))[-1]
    assert last.details.speculation == speculation  # greedy: the same steps, whole or streamed

    reply = chat.chat_completion(MESSAGES, max_tokens=8, temperature=0)
    assert reply.medusa["steps"] >= 1


def test_the_clients_grammar_is_followed(tgi):
    pattern = "[0-9]{3}-[a-z]{2}"
    text = tgi.text_generation(PROMPT, max_new_tokens=12, grammar={"type": "regex", "value": pattern})
    assert re.fullmatch(pattern, text), text


def test_chat_takes_tgis_response_format(chat):
    """The client's documented way to ask TGI's chat route for JSON: `{"type": "json", "value": schema}`
    (and "regex"), TGI's grammar."""
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    reply = chat.chat_completion(MESSAGES, max_tokens=20, temperature=0,
                                 response_format={"type": "json", "value": schema})
    assert set(json.loads(reply.choices[0].message.content)) == {"ok"}
    reply = chat.chat_completion(MESSAGES, max_tokens=20, temperature=0,
                                 response_format={"type": "regex", "value": "[0-9]{3}-[a-z]{2}"})
    assert re.fullmatch("[0-9]{3}-[a-z]{2}", reply.choices[0].message.content)


def test_server_refusals_reach_the_client_as_its_errors(tgi, chat):
    with pytest.raises(ValidationError, match="max_new_tokens"):
        tgi.text_generation(PROMPT, max_new_tokens=1000)
    with pytest.raises(ValidationError, match="top_n_tokens"):
        tgi.text_generation(PROMPT, max_new_tokens=4, details=True, top_n_tokens=21)
    with pytest.raises(BadRequestError, match="'param': 'presence_penalty'"):
        chat.chat_completion(MESSAGES, max_tokens=4, presence_penalty=2.5)


def test_chat_completion_whole_and_streamed_agree(chat):
    whole = chat.chat_completion(MESSAGES, max_tokens=10, temperature=0, logprobs=True)
    choice = whole.choices[0]
    assert whole.object == "chat.completion" and whole.model == "tiny-random-llama"
    assert choice.message.role == "assistant" and choice.finish_reason in ("length", "stop")
    assert whole.usage.completion_tokens == len(choice.logprobs.content)
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    assert "".join(t.token for t in choice.logprobs.content) == choice.message.content

    chunks = list(chat.chat_completion(MESSAGES, max_tokens=10, temperature=0, stream=True,
                                       stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    finished = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finished == [choice.finish_reason]
    usage = chunks[-1].usage  # the client's stream usage type differs from its whole one: compare fields
    assert chunks[-1].choices == []
    assert (usage.prompt_tokens, usage.completion_tokens) == (whole.usage.prompt_tokens,
                                                              whole.usage.completion_tokens)


def test_chat_base_url_with_or_without_v1_reaches_the_same_route(url, chat):
    without_v1 = InferenceClient(base_url=url, timeout=30)
    replies = [client.chat_completion(MESSAGES, max_tokens=6, temperature=0) for client in (chat, without_v1)]
    assert replies[0].choices[0].message.content == replies[1].choices[0].message.content


def test_chat_seeded_sampling_and_stop(chat):
    def sample(seed: int) -> str:
        return chat.chat_completion(MESSAGES, max_tokens=10, temperature=1.0, top_p=0.9,
                                    seed=seed).choices[0].message.content

    assert sample(7) == sample(7) != sample(8)

    text = chat.chat_completion(MESSAGES, max_tokens=12, temperature=0).choices[0].message.content
    stop = next(c for c in text[3:] if c.strip())
    stopped = chat.chat_completion(MESSAGES, max_tokens=12, temperature=0, stop=[stop]).choices[0]
    assert stopped.finish_reason == "stop" and stopped.message.content == text[:text.index(stop)]


def test_endpoint_info_and_health(url):
    endpoint = InferenceClient(model=url, provider="hf-inference", timeout=30)
    info = endpoint.get_endpoint_info()
    assert info["model_id"] == "tiny-random-llama" and info["max_total_tokens"] == 128
    assert info["speculation"]["enabled"] and info["speculation"]["num_heads"] > 0
    assert endpoint.health_check()
