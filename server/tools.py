"""Function calling on /v1/chat/completions: a request's tools become a system message that lists them
and a JSON grammar that lets the model answer only with a call to one of them, and the JSON it writes
comes back as OpenAI's `tool_calls`.

The model writes one JSON object, `{"name": <a tool's name>, "arguments": <its parameters' schema>}`,
so a call is never a guess parsed out of free text: its name is one of the tools' and its arguments
follow their schema. Where `tool_choice` is "auto" one more function is listed, `answer`
(`{"content": <text>}`), whose call is an answer without a call, returned as the message's content.
(ANSWER_PARAMETERS says why a function.) "required" lets the model call any of the tools, a named choice
that one alone (listed alone). Unless `parallel_tool_calls` is false (OpenAI's default is true) or the
choice is named, the model may also make several calls at once, as a JSON array of two or more calls
(of the tools, not `answer`).

Earlier turns of an agent's loop are rendered as the model wrote them: an assistant's calls as their
JSON, a tool's result as a `tool` message. The chat template is given no `tools` variable (SmolLM2's
has none); the system message does the same for every template.
"""

from __future__ import annotations

import functools
import json
import uuid
from dataclasses import dataclass

from server.openai_protocol import (
    ChatCompletionRequest,
    ChatMessage,
    ChatMessageOut,
    FunctionCall,
    FunctionDefinition,
    NamedToolChoice,
    ToolCall,
)

CALL_PROMPT = ('To call a function, reply with only a JSON object: {"name": <the function\'s name>, '
               '"arguments": <its arguments as a JSON object>}. The functions:')
# with parallel calls, before the list of functions
PARALLEL_PROMPT = CALL_PROMPT.replace(" The functions:", " To call several at once, reply with a JSON array "
                                                         "of such objects. The functions:")
NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}  # `parameters` omitted


# An answer as a shape of its own beside the calls, {"content": ...}, was never chosen by SmolLM2 over
# {"name": ...}: greedy, with a weather tool and a sum tool, it called one for all 8 questions tried. As
# a function with a description it answered 2 of the 5 that needed no tool (a haiku; "Italy" for the
# capital of Italy) and called the right tool with the right arguments for the 3 that did.
ANSWER_PARAMETERS = {"type": "object", "properties": {"content": {"type": "string"}}, "required": ["content"]}


def _answer(name: str) -> FunctionDefinition:
    """Under tool_choice "auto", the function that stands for an answer without a call."""
    return FunctionDefinition(name=name, parameters=ANSWER_PARAMETERS,
                              description="Answer the user directly, when no other function is needed")


@dataclass(frozen=True)
class Tools:
    """The functions a chat's reply may call: the request's tools (all, or the one a named choice
    names) and, under "auto", an answer without a call, written as a call of `answer` (a function
    named so that no tool has its name), returned as the message's content."""

    functions: list[FunctionDefinition]
    answer: str | None  # the answer function's name, under "auto"
    named: bool  # a named choice: OpenAI's finish_reason is then "stop", not "tool_calls"
    prompt: str = CALL_PROMPT  # what the list of functions follows in the system message
    parallel: bool = False  # several calls at once may be written, as a JSON array of two or more

    @classmethod
    def of(cls, body: ChatCompletionRequest) -> Tools | None:
        """None where the reply is plain text: no tools, or tool_choice "none"."""
        choice = body.tool_choice or ("auto" if body.tools else "none")
        if not body.tools or choice == "none":
            return None
        tools = [t.function for t in body.tools]
        if isinstance(choice, NamedToolChoice):
            named = [f for f in tools if f.name == choice.function.name]
            return cls(functions=named, answer=None, named=True, prompt=body.tool_prompt or CALL_PROMPT)
        parallel = body.parallel_tool_calls is not False
        prompt = body.tool_prompt or (PARALLEL_PROMPT if parallel else CALL_PROMPT)
        if choice == "required":
            return cls(functions=tools, answer=None, named=False, prompt=prompt, parallel=parallel)
        answer = "answer"
        while answer in {f.name for f in tools}:
            answer += "_"
        return cls(functions=[*tools, _answer(answer)], answer=answer, named=False, prompt=prompt,
                   parallel=parallel)

    def schema(self) -> dict:
        """The JSON schema of every reply the model may write."""
        calls = {f.name: {"type": "object",
                          "properties": {"name": {"const": f.name}, "arguments": _closed(f.parameters)},
                          "required": ["name", "arguments"], "additionalProperties": False}
                 for f in self.functions}
        one = _any_of(list(calls.values()))
        if not self.parallel:
            return one
        several = {"type": "array", "items": _any_of([c for name, c in calls.items() if name != self.answer]),
                   "minItems": 2}
        return {"anyOf": [one, several]}

    def instructions(self) -> str:
        listed = [json.dumps(f.model_dump(exclude_none=True, exclude={"strict"})) for f in self.functions]
        return "\n".join([self.prompt, *listed])

    def reply(self, text: str) -> tuple[ChatMessageOut, str | None] | None:
        """The message of a reply written under the grammar, and its OpenAI finish_reason (None: the
        text was cut, by max_tokens or a stop sequence, and the cut says why). An answer cut short is
        its content so far; None for any other text that is no whole reply: it is returned as it is."""
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            content = self.answer_so_far(text)
            return None if content is None else (ChatMessageOut(content=content), None)
        calls = value if isinstance(value, list) and self.parallel else [value]
        if not calls or not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in calls):
            return None
        if calls[0]["name"] == self.answer and len(calls) == 1:
            arguments = calls[0].get("arguments")
            content = arguments.get("content") if isinstance(arguments, dict) else None
            return (ChatMessageOut(content=content), "stop") if isinstance(content, str) else None
        made = [ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", type="function", function=FunctionCall(
            name=c["name"], arguments=json.dumps(c.get("arguments", {}), ensure_ascii=False))) for c in calls]
        return ChatMessageOut(content=None, tool_calls=made), "stop" if self.named else "tool_calls"

    def answer_so_far(self, text: str) -> str | None:
        """Under "auto", an answer's content as far as the text has written it (its JSON escapes decoded
        where they are whole), so that a stream sends it as it comes; None until the text is known to
        be an answer, and for a call. The grammar lays the JSON out as json.dumps does."""
        if self.answer is None or not text.startswith(self._answer_openings[0]):
            return None
        opening = self._answer_openings[1]
        return _string_so_far(text[len(opening):]) if text.startswith(opening) else ""

    @functools.cached_property
    def _answer_openings(self) -> tuple[str, str]:
        """How an answer's JSON begins: once it is known to be one, and up to its content's first
        character (a stream asks at every step)."""
        return (json.dumps({"name": self.answer})[:-1] + ",",
                json.dumps({"name": self.answer, "arguments": {"content": ""}})[:-3])  # less '"}}'


def _any_of(schemas: list[dict]) -> dict:
    return schemas[0] if len(schemas) == 1 else {"anyOf": schemas}


def _string_so_far(body: str) -> str:
    """The JSON string whose text after its opening quote begins with `body`, decoded up to its closing
    quote or the last escape that is whole (a surrogate pair's first half waits for its second)."""
    i = 0
    while i < len(body) and body[i] != '"':
        i += 2 if body[i] == "\\" else 1
    body = body[:i]
    for cut in range(len(body), max(len(body) - 12, -1), -1):  # an escape is at most 12 characters
        try:
            decoded = json.loads(f'"{body[:cut]}"')
        except json.JSONDecodeError:
            continue
        return decoded[:-1] if decoded and "\ud800" <= decoded[-1] <= "\udbff" else decoded
    return ""


def _closed(parameters: dict | None) -> dict:
    """The arguments' schema, taking only the properties it names unless it says otherwise (as OpenAI's
    strict mode does): left open, SmolLM2 went on past a weather tool's "city" with made-up keys until
    max_tokens cut the call. Every call the narrower schema allows, the tool's own allows too."""
    if not parameters:
        return NO_ARGUMENTS
    if parameters.get("type") == "object" and "additionalProperties" not in parameters:
        return {**parameters, "additionalProperties": False}
    return parameters


def conversation(messages: list[ChatMessage], tools: Tools | None) -> list[dict[str, str]]:
    """The messages as the chat template takes them: the tools' instructions first in the system
    message (joined to the conversation's own), earlier calls as the JSON the model writes."""
    rendered = [{"role": m.role, "content": _text(m)} for m in messages]
    if tools is not None:
        if rendered[0]["role"] in ("system", "developer"):
            rendered[0]["content"] = f"{tools.instructions()}\n\n{rendered[0]['content']}"
        else:
            rendered.insert(0, {"role": "system", "content": tools.instructions()})
    return rendered


def _text(message: ChatMessage) -> str:
    """A message's text; an assistant's calls as the model writes them (several: a JSON array)."""
    calls = [{"name": c.function.name, "arguments": _arguments(c.function.arguments)}
             for c in message.tool_calls or []]
    written = [json.dumps(calls[0] if len(calls) == 1 else calls, ensure_ascii=False)] if calls else []
    return "\n".join(([message.text()] if message.text() else []) + written)


def _arguments(arguments: str) -> object:
    """A call's arguments as the JSON value they hold (the text itself where it is no JSON)."""
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments
