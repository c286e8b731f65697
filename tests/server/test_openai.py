"""The OpenAI-compatible routes: the `openai` SDK against a real uvicorn server on a loopback port, and
error shapes through the test client."""

import json
import re

import openai
import pytest

from medusa.engine import Engine
from runtime.config import SamplingParams
from runtime.grammar import GrammarError, compile_grammar
from server.app import create_app
from server.openai_protocol import CompletionRequest
from server.openai_routes import StopHold, grammar_of
from server.scheduler import QueueFull
from server.service import submit_all
from tests.server.support import metric_values, serve, tiny_settings

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital?"}]
PROMPT = "The capital of France is"


def counted(usage) -> dict:
    """A usage's token counts, less how many prompt tokens the prefix cache held (a repeated request's
    differ)."""
    return usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"})


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
    assert chunks[-1].choices == [] and counted(chunks[-1].usage) == counted(whole.usage)
    # the same conversation again: its prompt's K/V came from the prefix cache, but for the last token,
    # whose hidden state the first token needs
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == whole.usage.prompt_tokens - 1


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


def test_n_choices_for_each_of_a_list_of_prompts_are_what_each_alone_gets(sdk):
    prompts = [PROMPT, "Once upon a time"]
    whole = sdk.completions.create(model="m", prompt=prompts, n=2, max_tokens=8, temperature=0)
    assert [c.index for c in whole.choices] == [0, 1, 2, 3]  # prompt i's choice j: i * n + j
    alone = [sdk.completions.create(model="m", prompt=p, max_tokens=8, temperature=0) for p in prompts]
    assert [c.text for c in whole.choices] == [a.choices[0].text for a in alone for _ in range(2)]
    # each prompt counted once, as OpenAI counts it; every choice's tokens
    assert whole.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    assert whole.usage.completion_tokens == 2 * sum(a.usage.completion_tokens for a in alone)


@pytest.mark.parametrize("route", ["chat", "completions"])
def test_penalties_reach_the_engine_and_count_the_generated_tokens(sdk, loaded, route):
    """OpenAI's frequency and presence penalties: the route's tokens are the engine's under the same
    penalties, and differ from the text without them."""
    def create(**penalties):
        if route == "chat":
            reply = sdk.chat.completions.create(model="m", messages=MESSAGES, max_tokens=24, temperature=0,
                                                **penalties)
            return reply.choices[0].message.content, reply.usage
        reply = sdk.completions.create(model="m", prompt=PROMPT, max_tokens=24, temperature=0, **penalties)
        return reply.choices[0].text, reply.usage

    penalties = {"frequency_penalty": 0.3, "presence_penalty": 1.2}
    text, usage = create(**penalties)
    tokenizer = loaded.tokenizer
    prompt = tokenizer.encode(PROMPT) if route == "completions" else tokenizer.apply_chat_template(
        MESSAGES, add_generation_prompt=True)
    assert len(prompt) == usage.prompt_tokens
    engine = Engine(loaded.model, loaded.tokenizer, loaded.eos_token_ids, max_total_tokens=256)
    expected = engine.generate([prompt], SamplingParams(max_new_tokens=24, **penalties))[0]
    assert usage.completion_tokens == len(expected)
    assert text == loaded.tokenizer.decode(expected, skip_special_tokens=True)
    assert text != create()[0]


@pytest.mark.parametrize("route", ["chat", "completions"])
def test_vllms_top_k_and_repetition_penalty_are_taken(sdk, loaded, route):
    """top_k 1 samples the argmax, so a sampled reply is the greedy one; a repetition penalty is the
    engine's, on the prompt's and the generated tokens."""
    def create(**body):  # the whole body's extras as the SDK sends vLLM's: extra_body
        if route == "chat":
            return sdk.chat.completions.create(model="m", messages=MESSAGES, max_tokens=16,
                                               extra_body=body).choices[0].message.content
        return sdk.completions.create(model="m", prompt=PROMPT, max_tokens=16,
                                      extra_body=body).choices[0].text

    greedy = create(temperature=0)
    assert create(temperature=1.0, seed=3, top_k=1) == greedy != create(temperature=1.0, seed=3, top_k=-1)
    tokenizer = loaded.tokenizer
    prompt = tokenizer.encode(PROMPT) if route == "completions" else tokenizer.apply_chat_template(
        MESSAGES, add_generation_prompt=True)
    engine = Engine(loaded.model, loaded.tokenizer, loaded.eos_token_ids, max_total_tokens=256)
    expected = engine.generate([prompt], SamplingParams(max_new_tokens=16, repetition_penalty=1.5))[0]
    penalised = create(temperature=0, repetition_penalty=1.5)
    assert penalised == tokenizer.decode(expected, skip_special_tokens=True) != greedy


def test_a_logit_bias_moves_tokens_as_it_does_in_the_engine(sdk, loaded):
    free = sdk.completions.create(model="m", prompt=PROMPT, max_tokens=12, temperature=0, logprobs=0)
    ids = loaded.tokenizer.encode(PROMPT)
    engine = Engine(loaded.model, loaded.tokenizer, loaded.eos_token_ids, max_total_tokens=256)
    first = engine.generate([ids], SamplingParams(max_new_tokens=1))[0][0]
    bias = {str(first): -100, "17": 7.5}  # the first token banned, another favoured
    whole = sdk.completions.create(model="m", prompt=PROMPT, max_tokens=12, temperature=0, logit_bias=bias)
    params = SamplingParams(max_new_tokens=12, logit_bias=((first, -100.0), (17, 7.5)))
    expected = engine.generate([ids], params)
    assert whole.choices[0].text == loaded.tokenizer.decode(expected[0], skip_special_tokens=True)
    assert whole.choices[0].text != free.choices[0].text
    with pytest.raises(openai.BadRequestError, match="logit_bias.*outside the vocabulary"):
        sdk.completions.create(model="m", prompt=PROMPT, max_tokens=2,
                               logit_bias={str(loaded.model.config.vocab_size): 1})


SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "size": {"enum": ["S", "M", "L"]}},
          "required": ["ok", "size"], "additionalProperties": False}


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_a_response_format_gives_json_of_its_schema(sdk, temperature):
    def reply(response_format):
        return sdk.chat.completions.create(model="m", messages=MESSAGES, max_tokens=40, seed=1,
                                           temperature=temperature, response_format=response_format)

    whole = reply({"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}})
    value = json.loads(whole.choices[0].message.content)
    assert set(value) == {"ok", "size"} and isinstance(value["ok"], bool) and value["size"] in "SML"
    assert isinstance(json.loads(reply({"type": "json_object"}).choices[0].message.content), dict)
    with pytest.raises(openai.BadRequestError, match="`response_format`: .*objectx"):
        reply({"type": "json_schema", "json_schema": {"name": "answer", "schema": {"type": "objectx"}}})


def test_vllms_guided_decoding_is_followed(sdk):
    choices = ["yes", "no (x)", "a.b|c", "#1 & -2 ~ $^{3}"]  # regex syntax taken as text
    for seed in range(4):
        text = sdk.completions.create(model="m", prompt=PROMPT, max_tokens=20, temperature=1.0, seed=seed,
                                      extra_body={"guided_choice": choices}).choices[0].text
        assert text in choices
    pattern = "[0-9]{3}-[a-z]{2}"
    text = sdk.chat.completions.create(model="m", messages=MESSAGES, max_tokens=20, temperature=0,
                                       extra_body={"guided_regex": pattern}).choices[0].message.content
    assert re.fullmatch(pattern, text)
    text = sdk.completions.create(model="m", prompt=PROMPT, max_tokens=40, temperature=0,
                                  extra_body={"guided_json": SCHEMA}).choices[0].text
    assert set(json.loads(text)) == {"ok", "size"}


def test_a_guided_choice_is_its_texts_exactly(loaded):
    choices = ["no (x)", "a.b|c", "#1 & -2 ~ $^{3}", "back\\slash"]
    body = CompletionRequest.model_validate({"prompt": PROMPT, "guided_choice": choices})
    _, grammar = grammar_of(body)
    grammars = Engine(loaded.model, loaded.tokenizer, loaded.eos_token_ids, max_total_tokens=64).grammars

    def takes(text: str) -> bool:
        constraint = grammars.constraint(compile_grammar(grammar.type, grammar.value))
        try:
            constraint.consume(loaded.tokenizer.encode(text))
        except GrammarError:
            return False
        return constraint.matcher.is_accepting()

    assert all(takes(c) for c in choices)
    assert not any(takes(t) for t in ["no x", "a", "c", "abb", "#1 & -2 ~ ^{3}", "back\\\\slash"])


@pytest.mark.parametrize("body, message", [
    ({"guided_regex": "[0-9", "max_tokens": 2}, "`guided_regex`: "),
    ({"guided_json": {"type": "objectx"}, "max_tokens": 2}, "`guided_json`: "),
    ({"guided_json": SCHEMA, "guided_regex": "a"}, "guided_json and guided_regex cannot both"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_choice": "yes"}, "guided_choice"),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "cannot both"),
])
def test_malformed_or_conflicting_guided_decoding_is_400(client, body, message):
    error = error_of(client.post("/v1/chat/completions", json={"messages": MESSAGES, **body}), 400)
    assert message in error["message"]


def test_best_of_returns_the_n_candidates_of_highest_mean_logprob(sdk):
    whole = sdk.completions.create(model="m", prompt=PROMPT, max_tokens=6, temperature=1.0, seed=5, n=2,
                                   best_of=4, logprobs=0)
    alone = [sdk.completions.create(model="m", prompt=PROMPT, max_tokens=6, temperature=1.0, seed=5 + j,
                                    logprobs=0).choices[0] for j in range(4)]  # candidate j: seed + j

    def mean(choice):
        return sum(choice.logprobs.token_logprobs) / len(choice.logprobs.token_logprobs)

    ranked = sorted(alone, key=mean, reverse=True)
    assert [c.text for c in whole.choices] == [c.text for c in ranked[:2]]
    assert [c.index for c in whole.choices] == [0, 1]
    assert whole.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in alone)  # all 4 count
    with pytest.raises(openai.BadRequestError, match="best_of must be at least n"):
        sdk.completions.create(model="m", prompt=PROMPT, max_tokens=2, n=3, best_of=2)
    with pytest.raises(openai.BadRequestError, match="streaming"):
        sdk.completions.create(model="m", prompt=PROMPT, max_tokens=2, best_of=2, stream=True)


def test_a_prompt_of_token_ids_is_what_its_text_gets(sdk, loaded):
    ids = loaded.tokenizer.encode(PROMPT)
    text = sdk.completions.create(model="m", prompt=PROMPT, max_tokens=6, temperature=0).choices[0].text
    whole = sdk.completions.create(model="m", prompt=[ids, ids[1:]], max_tokens=6, temperature=0, echo=True)
    assert whole.choices[0].text == loaded.tokenizer.decode(ids) + text
    assert whole.usage.prompt_tokens == 2 * len(ids) - 1
    assert sdk.completions.create(model="m", prompt=ids, max_tokens=6, temperature=0).choices[0].text == text
    with pytest.raises(openai.BadRequestError, match="outside the vocabulary"):
        sdk.completions.create(model="m", prompt=[5, loaded.model.config.vocab_size], max_tokens=2)
    # echoed with logprobs, a prompt of ids lists every one of them, a special one too: the client
    # slices the list by its own count (lm-evaluation-harness does)
    special = [loaded.tokenizer.all_special_ids[0], *ids]
    echoed = sdk.completions.create(model="m", prompt=special, max_tokens=2, temperature=0, echo=True,
                                    logprobs=1)
    assert len(echoed.choices[0].logprobs.tokens) == len(special) + echoed.usage.completion_tokens


def test_an_echoed_completion_lists_its_prompt_tokens_first_with_their_logprobs(sdk, client):
    whole = sdk.completions.create(model="m", prompt=PROMPT, max_tokens=6, temperature=0, echo=True,
                                   logprobs=0)
    choice = whole.choices[0]
    logprobs = choice.logprobs
    tokens = logprobs.tokens
    assert choice.text.startswith(PROMPT) and "".join(tokens) == choice.text
    assert logprobs.text_offset == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    # the prompt's logprobs are those TGI's decoder_input_details gives; the first has nothing before it
    tgi = client.post("/generate", json={"inputs": PROMPT, "parameters": {
        "max_new_tokens": 1, "decoder_input_details": True}}).json()["details"]["prefill"]
    prompt = len(tokens) - whole.usage.completion_tokens
    assert prompt == whole.usage.prompt_tokens and logprobs.token_logprobs[0] is None
    assert logprobs.token_logprobs[:prompt] == [t["logprob"] for t in tgi]

    # with alternatives too (as lm-eval's loglikelihood asks: is each prompt token the most likely there?)
    top = sdk.completions.create(model="m", prompt=PROMPT, max_tokens=6, temperature=0, echo=True,
                                 logprobs=2).choices[0].logprobs
    assert top.tokens == tokens and top.token_logprobs == logprobs.token_logprobs
    assert top.top_logprobs[0] is None  # nothing before the first prompt token
    for logprob, alternatives in zip(top.token_logprobs[1:], top.top_logprobs[1:], strict=True):
        assert 1 <= len(alternatives) <= 2 and max(alternatives.values()) >= logprob

    chunks = list(sdk.completions.create(model="m", prompt=PROMPT, max_tokens=6, temperature=0, echo=True,
                                         stream=True))
    assert chunks[0].choices[0].text == PROMPT and "".join(c.choices[0].text for c in chunks) == choice.text
    with pytest.raises(openai.BadRequestError, match="not supported when streaming"):
        sdk.completions.create(model="m", prompt=PROMPT, max_tokens=2, echo=True, logprobs=0, stream=True)


def test_streamed_logprobs_give_each_token_its_offset_in_the_whole_text(sdk):
    chunks = list(sdk.completions.create(model="m", prompt=PROMPT, max_tokens=10, temperature=0, logprobs=0,
                                         stream=True))
    text = ""
    for chunk in chunks:
        logprobs = chunk.choices[0].logprobs
        if logprobs is not None:
            assert logprobs.text_offset[0] == len(text)
            text += "".join(logprobs.tokens)
    assert text == "".join(c.choices[0].text for c in chunks)


def test_top_logprobs_give_each_token_its_most_likely_tokens(sdk):
    chat = sdk.chat.completions.create(model="m", messages=MESSAGES, max_tokens=8, temperature=0,
                                       logprobs=True, top_logprobs=3)
    for entry in chat.choices[0].logprobs.content:  # greedy: the token is the most likely one
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].logprob == entry.logprob
    completion = sdk.completions.create(model="m", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=2)
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.top_logprobs) == len(logprobs.tokens)
    for logprob, top in zip(logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        assert 1 <= len(top) <= 2 and max(top.values()) == logprob
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs"):
        sdk.chat.completions.create(model="m", messages=MESSAGES, max_tokens=2, top_logprobs=2)


def test_sampled_choices_differ_and_choice_j_samples_with_seed_plus_j(sdk):
    def chat(seed: int, n: int) -> list[str]:
        reply = sdk.chat.completions.create(model="m", messages=MESSAGES, max_tokens=12, temperature=1.0,
                                            seed=seed, n=n)
        return [c.message.content for c in sorted(reply.choices, key=lambda c: c.index)]

    three = chat(7, 3)
    assert three == [chat(7 + j, 1)[0] for j in range(3)]
    assert len(set(three)) > 1


def test_streamed_choices_carry_their_index_and_add_up_to_the_whole(sdk):
    kwargs = {"model": "m", "messages": MESSAGES, "max_tokens": 10, "temperature": 1.0, "seed": 3, "n": 2}
    whole = sdk.chat.completions.create(**kwargs)
    chunks = list(sdk.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    for choice in whole.choices:
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == choice.index]
        assert mine[0].delta.role == "assistant"
        # a stream never sends half a character, but a last one cut by max_tokens ends it as U+FFFD, as
        # it ends the whole text
        assert "".join(c.delta.content or "" for c in mine) == choice.message.content
        assert [c.finish_reason for c in mine if c.finish_reason] == [choice.finish_reason]
    assert chunks[-1].choices == [] and counted(chunks[-1].usage) == counted(whole.usage)


def test_invalid_requests_raise_bad_request(sdk):
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.chat.completions.create(model="m", messages=MESSAGES, max_tokens=10, n=129)
    assert refused.value.body["param"] == "n" and refused.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match="at most 128"):
        sdk.completions.create(model="m", prompt=[PROMPT] * 65, n=2, max_tokens=4)
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


TOOL = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}


@pytest.mark.parametrize("field, value", [
    ("n", 129), ("top_logprobs", 21), ("presence_penalty", 2.5), ("frequency_penalty", -3),
    ("temperature", 2.5), ("max_tokens", 0), ("top_k", -2), ("top_k", 1.5), ("repetition_penalty", 0),
    # what this server cannot do is refused, not ignored: an answer without the call or the JSON the
    # client asked for would look like one that honoured it
    ("functions", [TOOL["function"]]), ("function_call", {"name": "weather"}),
    ("response_format", {"type": "xml"}), ("tool_choice", "sometimes"),
    # a logit bias: token ids as decimal strings, biases in [-100, 100], at most 300 of them
    ("logit_bias", {"50": 101}), ("logit_bias", {"x": 1}), ("logit_bias", {"05": 1}),
    ("logit_bias", {"5": "1"}), ("logit_bias", {str(t): 1 for t in range(301)}), ("logit_bias", [1])])
def test_unsupported_or_out_of_range_parameters_are_400(client, field, value):
    body = {"model": "m", "messages": MESSAGES, field: value}
    error = error_of(client.post("/v1/chat/completions", json=body), 400)
    assert error["param"] == field and error["type"] == "invalid_request_error"
    assert field in error["message"]


@pytest.mark.parametrize("route, field, value", [
    ("chat", "tools", []), ("chat", "tool_choice", "auto"), ("chat", "tool_choice", "none"),
    ("chat", "response_format", {"type": "text"}), ("chat", "logit_bias", {}), ("chat", "n", 1),
    ("completions", "best_of", 1), ("completions", "suffix", "")])
def test_the_no_op_values_of_unsupported_parameters_are_taken(client, route, field, value):
    body = {"messages": MESSAGES} if route == "chat" else {"prompt": PROMPT}
    response = client.post(f"/v1/{route}/completions" if route == "chat" else "/v1/completions",
                           json={**body, "max_tokens": 2, field: value})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("field, value", [("best_of", 129), ("best_of", 0), ("suffix", " the end"),
                                          ("logprobs", 6)])
def test_unsupported_completion_parameters_are_400(client, field, value):
    error = error_of(client.post("/v1/completions", json={"prompt": PROMPT, field: value}), 400)
    assert error["param"] == field and field in error["message"]


@pytest.mark.parametrize("route, body, field", [
    ("chat/completions", {"messages": [{"role": "user", "content": "\ud800"}]}, "content"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tool_prompt": "\udc00",
                          "tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_prompt"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": [
        {"type": "function", "function": {"name": "f", "description": "\ud800"}}]}, "description"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                          "prediction": {"type": "content", "content": "\ud800"}}, "content"),
    ("responses", {"input": "hi", "instructions": "\ud800"}, "instructions"),
])
def test_a_lone_surrogate_anywhere_is_400(client, route, body, field):
    """JSON's "\ud800" is no UTF-8 text; in a message, a tool, a prediction or instructions it had
    reached the chat template or the tokenizer and failed there as a 500."""
    headers = {"content-type": "application/json"}
    error = error_of(client.post(f"/v1/{route}", content=json.dumps(body), headers=headers), 400)
    assert "must be valid Unicode text" in error["message"] and field in error["message"]


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
    # each choice is a request that succeeds (or fails) on its own
    choices = {"prompt": [PROMPT, PROMPT[:9]], "n": 2, "max_tokens": 2, "temperature": 0}
    assert client.post("/v1/completions", json=choices).status_code == 200
    assert [a - b for a, b in zip(counts(), after, strict=True)] == [4, 4, 0]


def test_a_requests_choices_are_queued_all_or_none():
    class Stream:
        cancelled = False

        def cancel(self) -> None:
            self.cancelled = True

    class Service:  # its queue takes two requests
        streams: list[Stream] = []

        def submit(self, job) -> Stream:
            if len(self.streams) == 2:
                raise QueueFull("Model is overloaded")
            self.streams.append(Stream())
            return self.streams[-1]

    service = Service()
    with pytest.raises(QueueFull):
        submit_all(service, [None] * 4)
    assert len(service.streams) == 2 and all(s.cancelled for s in service.streams)


MALFORMED_PROMPTS = {"empty list": [], "empty ids": [[]], "empty text": [""], "negative id": [-1, 5],
                     "fractional id": [1.5, 5], "mixed": [5, "a"], "mixed lists": [[5], "a"],
                     "129 prompts": ["a"] * 129, "object": {"a": 1}}


@pytest.mark.parametrize("prompt", MALFORMED_PROMPTS.values(), ids=MALFORMED_PROMPTS.keys())
def test_a_malformed_prompt_is_400_saying_what_a_prompt_may_be(client, prompt):
    error = error_of(client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2}), 400)
    assert error["param"] == "prompt" and "token ids (integers >= 0)" in error["message"]
