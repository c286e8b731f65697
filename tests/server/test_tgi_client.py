"""TGI's own Python client (`text-generation`) against a real uvicorn server on a loopback port."""

import pytest
from text_generation import Client
from text_generation.errors import ValidationError

from server.app import create_app
from tests.server.support import serve, tiny_settings

PROMPT = "What is the capital of France?"

# text-generation 0.7.0 calls pydantic's deprecated `.dict()`: its problem, not the server's
pytestmark = pytest.mark.filterwarnings("ignore:The `dict` method is deprecated")


@pytest.fixture(scope="module")
def tgi_client(loaded):
    with serve(create_app(tiny_settings(), loaded)) as url:
        yield Client(url, timeout=30)


def test_generate_and_generate_stream_agree(tgi_client):
    response = tgi_client.generate(PROMPT, max_new_tokens=10, decoder_input_details=True)
    details = response.details
    assert details.finish_reason == "length"
    assert details.generated_tokens == 10 == len(details.tokens)
    assert details.seed is None
    assert len(details.prefill) > 0 and details.prefill[0].logprob is None

    streamed = list(tgi_client.generate_stream(PROMPT, max_new_tokens=10))
    assert len(streamed) == 10
    assert [s.token.id for s in streamed] == [t.id for t in details.tokens]
    assert all(s.generated_text is None for s in streamed[:-1])
    assert streamed[-1].generated_text == response.generated_text
    assert streamed[-1].details.generated_tokens == 10


def test_seeded_sampling_through_the_client(tgi_client):
    runs = [tgi_client.generate(PROMPT, do_sample=True, seed=11, max_new_tokens=8, stop_sequences=["\n"])
            for _ in range(2)]
    assert runs[0].generated_text == runs[1].generated_text
    assert runs[0].details.seed == 11


def test_best_of_through_the_client(tgi_client):
    response = tgi_client.generate(PROMPT, do_sample=True, best_of=3, max_new_tokens=6)
    others = response.details.best_of_sequences
    assert len(others) == 2 and all(o.generated_tokens == len(o.tokens) for o in others)


def test_server_validation_errors_reach_the_client(tgi_client):
    with pytest.raises(ValidationError, match="max_new_tokens"):
        tgi_client.generate(PROMPT, max_new_tokens=1000)
