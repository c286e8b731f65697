"""Function calling on /v1/chat/completions: the `openai` SDK against a real server on a loopback port
(tiny random model), bodies the SDK would not send through the test client."""

import json

import jsonschema
import openai
import pytest
from fastapi.testclient import TestClient
from huggingface_hub import InferenceClient

from runtime.grammar import GrammarError, compile_grammar
from server.app import create_app
from server.openai_protocol import ChatCompletionRequest, ChatMessage
from server.tools import CALL_PROMPT, PARALLEL_PROMPT, Tools, conversation
from tests.server.support import save_tiny_heads, serve, tiny_settings
from tests.server.test_openai import error_of

WEATHER = {"type": "function", "function": {
    "name": "weather", "description": "The weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "days"],
                   "properties": {"city": {"enum": ["Paris", "Rome"]},
                                  "days": {"type": "integer", "minimum": 1, "maximum": 9}}}}}
CLOCK = {"type": "function", "function": {"name": "clock"}}  # no parameters: no arguments
TOOLS = [WEATHER, CLOCK]
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


LIMITS = {"max_input_tokens": 960, "max_total_tokens": 1024}  # the tools' list, tokens of a tiny vocabulary


@pytest.fixture(scope="module")
def url(loaded, tmp_path_factory):
    """A server speculating with the tiny heads: a call's forced tokens (keys, punctuation, its name
    once begun) are its drafts."""
    heads = save_tiny_heads(tmp_path_factory.mktemp("heads"), loaded)
    with serve(create_app(tiny_settings(**LIMITS, medusa_heads=heads, tree="cpu"), loaded)) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def sdk(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def client(loaded):
    with TestClient(create_app(tiny_settings(**LIMITS), loaded)) as test_client:
        yield test_client


def arguments_follow_their_tools_schema(call) -> None:
    tool = next(t["function"] for t in TOOLS if t["function"]["name"] == call.function.name)
    schema = tool.get("parameters", {"type": "object", "additionalProperties": False})
    jsonschema.validate(json.loads(call.function.arguments), schema)


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_a_named_tool_choice_calls_that_tool_with_arguments_of_its_schema(sdk, temperature):
    for seed in range(3):
        choice = sdk.chat.completions.create(
            model="m", messages=MESSAGES, tools=TOOLS, max_tokens=60, temperature=temperature, seed=seed,
            tool_choice={"type": "function", "function": {"name": "weather"}}).choices[0]
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.function.name == "weather" and call.id.startswith("call_")
        arguments_follow_their_tools_schema(call)
        assert choice.message.content is None and choice.finish_reason == "stop"  # OpenAI's, named


def test_required_calls_one_of_the_tools(sdk):
    for seed in range(3):
        choice = sdk.chat.completions.create(model="m", messages=MESSAGES, tools=TOOLS, max_tokens=60,
                                             tool_choice="required", temperature=1.0, seed=seed,
                                             parallel_tool_calls=False).choices[0]
        (call,) = choice.message.tool_calls
        arguments_follow_their_tools_schema(call)
        assert choice.finish_reason == "tool_calls"


def test_auto_lets_the_model_answer_or_call(sdk, loaded):
    """Under "auto" the model's choice of a function's name decides: `answer` gives the message's
    content, a tool's name a call. A bias toward tokens beginning with one letter or the other decides
    it here (and one toward a closing quote, at `quote`, ends the answer's text where the grammar
    lets it). A streamed answer comes as it is written; one cut by max_tokens is its text so far."""
    def reply(letter: str, quote: float = 50, **kwargs):
        bias = {str(t): 30 for t in range(loaded.model.config.vocab_size)
                if loaded.tokenizer.decode([t]).startswith(letter)}
        bias[str(loaded.tokenizer.convert_tokens_to_ids('"'))] = quote
        kwargs = {"max_tokens": 60, "parallel_tool_calls": False, **kwargs}
        return sdk.chat.completions.create(model="m", messages=MESSAGES, tools=TOOLS, temperature=0,
                                           logit_bias=bias, **kwargs)  # auto, the default

    answer = reply("a").choices[0]
    assert answer.message.tool_calls is None and answer.finish_reason == "stop"
    assert isinstance(answer.message.content, str) and not answer.message.content.startswith("{")
    call = reply("w").choices[0]
    assert call.finish_reason == "tool_calls" and call.message.content is None
    assert call.message.tool_calls[0].function.name == "weather"
    arguments_follow_their_tools_schema(call.message.tool_calls[0])

    long = reply("a", quote=0, max_tokens=120).choices[0]  # an answer the quote's bias does not end
    chunks = [c.choices[0] for c in reply("a", quote=0, max_tokens=120, stream=True)]
    content = [c.delta.content for c in chunks if c.delta.content]
    assert "".join(content) == long.message.content and len(content) >= 5
    assert chunks[-1].finish_reason == long.finish_reason
    cut = reply("a", quote=0, max_tokens=60).choices[0]
    assert cut.finish_reason == "length" and long.message.content.startswith(cut.message.content)
    assert cut.message.content and not cut.message.content.startswith("{")


@pytest.mark.parametrize("ensure_ascii", [True, False])
def test_an_answer_so_far_is_a_prefix_of_the_whole(ensure_ascii):
    text = 'Say "hi"\\\n\tthen caf\u00e9, \U0001f600 and \u2603 / done'
    whole = json.dumps({"name": "answer", "arguments": {"content": text}}, ensure_ascii=ensure_ascii)
    tools = Tools.of(ChatCompletionRequest.model_validate({"messages": MESSAGES, "tools": TOOLS}))
    seen = []
    for end in range(len(whole) + 1):
        so_far = tools.answer_so_far(whole[:end])
        if so_far is not None:
            so_far.encode("utf-8")  # no lone surrogate, which cannot be encoded
            assert text.startswith(so_far)
            seen.append(so_far)
    assert seen[-1] == text and len(set(seen)) > len(text) // 2
    assert tools.answer_so_far('{"name": "weather", "arguments": {"city": "') is None
    assert tools.answer_so_far('{"name": "answer", "argu') == ""  # an answer, none of it written yet


def test_the_answer_function_takes_a_name_no_tool_has(loaded):
    tools = [{"type": "function", "function": {"name": name}} for name in ("answer", "answer_")]
    body = ChatCompletionRequest.model_validate({"messages": MESSAGES, "tools": tools})
    assert Tools.of(body).answer == "answer__"
    assert [f.name for f in Tools.of(body).functions] == ["answer", "answer_", "answer__"]


def test_tool_choice_none_and_no_tools_give_text(sdk):
    plain = sdk.chat.completions.create(model="m", messages=MESSAGES, max_tokens=8, temperature=0)
    none = sdk.chat.completions.create(model="m", messages=MESSAGES, max_tokens=8, temperature=0, tools=TOOLS,
                                       tool_choice="none")
    assert none.choices[0].message.tool_calls is None
    assert none.choices[0].message.content == plain.choices[0].message.content  # the tools are not listed


def test_a_streamed_call_comes_whole_in_the_last_chunk(sdk):
    kwargs = {"model": "m", "messages": MESSAGES, "tools": TOOLS, "max_tokens": 60, "temperature": 0,
              "tool_choice": "required", "logprobs": True, "parallel_tool_calls": False}
    whole = sdk.chat.completions.create(**kwargs).choices[0]
    chunks = [c.choices[0] for c in sdk.chat.completions.create(**kwargs, stream=True)]
    assert chunks[0].delta.role == "assistant"
    assert all(c.delta.tool_calls is None and not c.delta.content for c in chunks[:-1])
    (call,) = chunks[-1].delta.tool_calls
    assert call.index == 0 and call.function.name == whole.message.tool_calls[0].function.name
    assert call.function.arguments == whole.message.tool_calls[0].function.arguments
    assert chunks[-1].finish_reason == "tool_calls"
    streamed = [t.logprob for c in chunks if c.logprobs for t in c.logprobs.content]
    # the call's tokens, step by step (the stream's prompt came from the prefix cache, and this tiny
    # model, not prepared for serving, prefills through the libraries: not bit for bit)
    assert streamed == pytest.approx([t.logprob for t in whole.logprobs.content], abs=1e-5)


def test_huggingface_hubs_client_reads_the_call(url):
    reply = InferenceClient(base_url=f"{url}/v1", timeout=30).chat_completion(
        MESSAGES, tools=TOOLS, tool_choice="required", max_tokens=60, temperature=0)
    call = reply.choices[0].message.tool_calls[0]
    assert call.function.name in ("weather", "clock")
    assert isinstance(json.loads(call.function.arguments), dict)
    assert reply.medusa["steps"] < reply.usage.completion_tokens  # the forced tokens were drafted


def test_a_call_cut_by_max_tokens_is_returned_as_its_text(sdk):
    choice = sdk.chat.completions.create(model="m", messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                         max_tokens=3, temperature=0).choices[0]
    assert choice.finish_reason == "length" and choice.message.tool_calls is None
    assert choice.message.content.startswith("{")


def test_an_agents_loop_replays_the_call_and_its_result(client, loaded):
    """The assistant's call in the model's own JSON, the tool's result as a `tool` message, and the
    tools' instructions in the system message, joined to the conversation's own."""
    call = {"id": "call_1", "type": "function", "function": {"name": "weather",
                                                             "arguments": '{"city": "Paris", "days": 1}'}}
    messages = [{"role": "system", "content": "Be brief."}, *MESSAGES,
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"}]
    body = {"messages": messages, "tools": TOOLS, "max_tokens": 2}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    tools = Tools.of(ChatCompletionRequest.model_validate({"messages": messages, "tools": TOOLS}))
    expected = [{"role": "system", "content": f"{tools.instructions()}\n\nBe brief."}, MESSAGES[0],
                {"role": "assistant",
                 "content": '{"name": "weather", "arguments": {"city": "Paris", "days": 1}}'},
                {"role": "tool", "content": "Sunny, 21 C"}]
    assert conversation([ChatMessage.model_validate(m) for m in messages], tools) == expected
    rendered = loaded.tokenizer.apply_chat_template(expected, tokenize=False, add_generation_prompt=True)
    prompt_tokens = len(loaded.tokenizer.encode(rendered, add_special_tokens=False))
    assert response.json()["usage"]["prompt_tokens"] == prompt_tokens
    listed = tools.instructions()
    assert '"name": "clock"' in listed and "weather in a city" in listed and '"name": "answer"' in listed
    own = Tools.of(ChatCompletionRequest.model_validate({"messages": messages, "tools": TOOLS,
                                                         "tool_prompt": "Call one of these:"}))
    assert own.instructions() == listed.replace(PARALLEL_PROMPT, "Call one of these:")  # TGI's tool_prompt
    one = Tools.of(ChatCompletionRequest.model_validate({"messages": messages, "tools": TOOLS,
                                                         "parallel_tool_calls": False}))
    assert one.instructions() == listed.replace(PARALLEL_PROMPT, CALL_PROMPT)  # no word of an array


def test_the_grammar_takes_exactly_the_replies_a_choice_allows(loaded):
    grammars = tiny_engine_grammars(loaded)

    def takes(choice, text: str, **options) -> bool:
        body = ChatCompletionRequest.model_validate({"messages": MESSAGES, "tools": TOOLS,
                                                     "tool_choice": choice, **options})
        constraint = grammars.constraint(compile_grammar("json", Tools.of(body).schema()))
        try:
            constraint.consume(loaded.tokenizer.encode(text, add_special_tokens=False))
        except GrammarError:
            return False
        return constraint.matcher.is_accepting()

    call = '{"name": "weather", "arguments": {"city": "Rome", "days": 3}}'
    answer = '{"name": "answer", "arguments": {"content": "It is sunny."}}'
    assert takes("auto", call) and takes("auto", answer)
    assert takes("auto", '{"name": "clock", "arguments": {}}')
    assert takes("required", call) and not takes("required", answer)
    named = {"type": "function", "function": {"name": "clock"}}
    assert not takes(named, call) and takes(named, '{"name": "clock", "arguments": {}}')
    assert not takes("auto", '{"name": "weather", "arguments": {"city": "Oslo", "days": 3}}')
    assert not takes("auto", '{"name": "clock", "arguments": {"x": 1}}')
    assert not takes("auto", '{"name": "weather", "arguments": {"city": "Rome", "days": 3, "hours": 2}}')
    assert not takes("auto", '{"content": "It is sunny."}')

    clock = '{"name": "clock", "arguments": {}}'
    assert takes("auto", f"[{call}, {clock}]") and takes("required", f"[{clock}, {clock}, {call}]")
    assert not takes("auto", f"[{call}]")  # one call is written as itself
    assert not takes("auto", f"[{call}, {answer}]")  # an answer is no call
    assert not takes(named, f"[{clock}, {clock}]")  # a named choice calls its tool once
    assert not takes("auto", f"[{call}, {clock}]", parallel_tool_calls=False)
    assert takes("auto", call, parallel_tool_calls=False)


def tiny_engine_grammars(loaded):
    from tests.medusa.test_grammar import engine
    return engine(loaded).grammars


@pytest.mark.parametrize("change, message", [
    ({"tool_choice": {"type": "function", "function": {"name": "nowhere"}}}, "no tool is named 'nowhere'"),
    ({"tools": None, "tool_choice": "required"}, "needs tools"),
    ({"tools": [WEATHER, WEATHER]}, "a name of its own"),
    ({"tools": [{"type": "function", "function": {"name": "two words"}}]}, "pattern"),
    ({"tools": [{"type": "retrieval", "function": {"name": "x"}}]}, "function"),
    ({"tools": [{"type": "function", "function": {"name": "x", "parameters": {"type": "string"}}}]},
     "schema of an object"),
    ({"tools": [{"type": "function", "function": {"name": "x", "parameters": {
        "type": "object", "properties": {"y": {"type": "objectx"}}}}}]}, "`tools`: "),
    ({"tool_choice": "sometimes"}, "'required'"),
    ({"response_format": {"type": "json_object"}}, "tools and response_format cannot both"),
    ({"messages": [{"role": "tool", "content": "21 C"}]}, "tool_call_id"),
    ({"messages": [{"role": "user", "content": None}]}, "needs content"),
    ({"messages": [{"role": "user", "content": "hi", "tool_calls": []}]}, "only an assistant's"),
    ({"functions": [WEATHER["function"]]}, "deprecated"),
])
def test_malformed_tools_are_400(client, change, message):
    body = {"messages": MESSAGES, "tools": TOOLS, "max_tokens": 2, **change}
    error = error_of(client.post("/v1/chat/completions", json=body), 400)
    assert message in error["message"]
    assert client.get("/health").status_code == 200


def test_parallel_calls_come_as_a_list_whole_and_streamed(sdk, loaded):
    """A bias toward `[` makes the tiny model open an array of calls (the grammar allows it unless
    parallel_tool_calls is false): two or more calls, each of its tool's schema, with ids of their own,
    in the message and, streamed, in the last chunk with their indices."""
    bracket = loaded.tokenizer.convert_tokens_to_ids("[")
    kwargs = {"model": "m", "messages": MESSAGES, "tools": TOOLS, "max_tokens": 200, "temperature": 0,
              "tool_choice": "required", "logit_bias": {str(bracket): 100}}
    choice = sdk.chat.completions.create(**kwargs).choices[0]
    calls = choice.message.tool_calls
    assert choice.finish_reason == "tool_calls" and len(calls) >= 2
    for call in calls:
        arguments_follow_their_tools_schema(call)
    assert len({call.id for call in calls}) == len(calls)
    streamed = [c.choices[0] for c in sdk.chat.completions.create(**kwargs, stream=True)][-1]
    assert [c.index for c in streamed.delta.tool_calls] == list(range(len(calls)))
    assert [(c.function.name, c.function.arguments) for c in streamed.delta.tool_calls] == \
        [(c.function.name, c.function.arguments) for c in calls]
    single = sdk.chat.completions.create(**kwargs, parallel_tool_calls=False).choices[0]
    assert len(single.message.tool_calls) == 1


def test_calls_made_together_are_replayed_as_the_array_the_model_writes():
    calls = [{"id": f"call_{i}", "type": "function", "function": {"name": "weather", "arguments": arguments}}
             for i, arguments in enumerate(['{"city": "Paris", "days": 1}', '{"city": "Oslo", "days": 2}'])]
    messages = [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": calls}]
    rendered = conversation([ChatMessage.model_validate(m) for m in messages], None)
    assert json.loads(rendered[-1]["content"]) == [
        {"name": "weather", "arguments": {"city": "Paris", "days": 1}},
        {"name": "weather", "arguments": {"city": "Oslo", "days": 2}}]
