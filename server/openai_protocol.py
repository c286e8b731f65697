"""The OpenAI wire protocol: request and response bodies of /v1/chat/completions, /v1/completions and
/v1/models, and OpenAI's error shape.

Fields follow OpenAI's API, so that the `openai` SDK works unchanged; unknown fields are ignored.
Parameters this server does not implement accept only their no-op values (no `functions`, the
deprecated form of `tools`, no `suffix`); any other value is a 400 saying it is not supported, so that
a client never takes an answer that ignored what it asked for. A chat's `tools` and `tool_choice`
are `server.tools`'. `presence_penalty` and `frequency_penalty` (-2
to 2) count the generated tokens, as OpenAI's (the prompt's do not count); `logit_bias` maps up to
MAX_LOGIT_BIAS token ids to biases added to their logits; a chat's `response_format` (json_object,
json_schema) becomes a grammar. A chat's `top_logprobs` (up to 20, with `logprobs`) and a
completion's `logprobs` (up to 5) give each generated token's most likely tokens (an echoed
prompt's tokens too, under the model's raw distribution; the first has none). Semantics are
OpenAI's: `temperature` defaults to 1 (sampling) and 0 decodes greedily; a stop sequence ends the
text and is not part of it; `n` choices per prompt, and a completion's `prompt` may be a list of
prompts (choice i * n + j: prompt i's j-th), each choice a request of its own to the engine (with a
`seed`, choice j of a prompt samples with seed + j), at most MAX_CHOICES in all; a completion's
`best_of` generates that many for each prompt and returns the n of highest mean logprob (all of
them count in usage); a completion's prompt may also be token ids (a list of them, or a list of
such lists), taken as they are.

Extensions: vLLM's `ignore_eos`, `min_tokens`, `stop_token_ids`, `top_k`, `repetition_penalty`
(TGI's, on every token of the text, prompt included) and `guided_json`, `guided_regex`,
`guided_choice` (grammars, as `response_format`); a `medusa` entry on each response (the last stream
chunk's too), the request's speculation figures (null when the server has no heads).

Errors on these routes are `{"error": {"message", "type", "param", "code"}}`; a refused request is a
400 (`invalid_request_error`), which the SDK raises as `openai.BadRequestError`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from runtime.config import MAX_ADDED_PENALTY, MAX_BIAS, MAX_LOGIT_BIAS, MAX_STOP_TOKENS, MAX_TOP_N
from server.protocol import (
    MAX_STOP_SEQUENCES,
    ErrorResponse,
    Logprob,
    Speculation,
    Text,
    described_when_invalid,
    valid_unicode_throughout,
)

OPENAI_PREFIX = "/v1/"
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
MAX_CHOICES = 128  # choices (prompts x n) of one request; OpenAI's most for n
MAX_TOOLS = 128  # OpenAI's most tools in one request
FINISH_REASONS = {"eos_token": "stop", "stop_sequence": "stop", "length": "length"}  # TGI's -> OpenAI's

# A TGI error_type -> OpenAI's error type and code on the /v1 routes; the status is the TGI route's, but
# 400 for a refused request, as OpenAI answers (and the SDK raises openai.BadRequestError)
ERRORS = {
    "validation": ("invalid_request_error", None),
    "overloaded": ("rate_limit_error", "rate_limit_exceeded"),
    "generation": ("server_error", "generation_failed"),
    "timeout": ("timeout_error", "timeout"),
    "unhealthy": ("server_error", "unavailable"),
    "unauthorized": ("invalid_request_error", "invalid_api_key"),
}


# ---------------------------------------------------------------- errors

class OpenAIError(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorResponse(BaseModel):
    error: OpenAIError


def openai_error(status: int, message: str, error_type: str, *, param: str | None = None,
                 headers: dict[str, str] | None = None) -> JSONResponse:
    """An error in OpenAI's shape; error_type is the TGI one ('validation', ...)."""
    if error_type == "validation" and status == 422:  # OpenAI's status for a request it cannot take
        status = 400
    kind, code = ERRORS.get(error_type, ("invalid_request_error" if status < 500 else "server_error", None))
    body = OpenAIErrorResponse(error=OpenAIError(message=message, type=kind, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def protocol_error(path: str, status: int, message: str, error_type: str, *, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """The error in the protocol of the route at `path`: OpenAI's shape under /v1/ (`param`: the
    field), TGI's `{"error", "error_type"}` elsewhere."""
    if path.startswith(OPENAI_PREFIX):
        return openai_error(status, message, error_type, param=param, headers=headers)
    return JSONResponse(ErrorResponse(error=message, error_type=error_type).model_dump(), status_code=status,
                        headers=headers)


# ---------------------------------------------------------------- requests

class Body(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False)

    _valid_unicode = model_validator(mode="after")(valid_unicode_throughout)


def _only(value: object, what: str):
    """A field whose only accepted value is `value` (with null); the description is the 400's message."""
    return Field(default=None, ge=value, le=value, description=f"only {value} or null: {what}")


class StreamOptions(Body):
    include_usage: bool = False


Stop = Text | Annotated[list[Text], Field(max_length=MAX_STOP_SEQUENCES)]
TokenIdList = Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=MAX_STOP_TOKENS)]


Empty = Annotated[list, Field(max_length=0)]  # a list a request may send only empty


def refused(what: str):
    """A field with only no-op values, whose description (`what`) is the 400's message otherwise."""
    return Field(default=None, description=f"{what} not supported by this server")


class _Request(Body):
    model: str | None = None  # any name: this server serves one model, named in the response
    max_tokens: int | None = Field(default=None, gt=0)
    temperature: float | None = Field(default=None, ge=0, le=2)  # null: 1; 0: greedy
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = Field(default=None, ge=0, lt=2**64)
    stop: Stop | None = None
    n: int | None = Field(default=None, ge=1, le=MAX_CHOICES)  # choices per prompt; null: 1
    presence_penalty: float | None = Field(default=None, ge=-MAX_ADDED_PENALTY, le=MAX_ADDED_PENALTY)
    frequency_penalty: float | None = Field(default=None, ge=-MAX_ADDED_PENALTY, le=MAX_ADDED_PENALTY)
    logit_bias: dict[Annotated[str, Field(pattern=r"^(0|[1-9][0-9]{0,11})$")],
                     Annotated[float, Field(ge=-MAX_BIAS, le=MAX_BIAS)]] | None = Field(
        default=None, max_length=MAX_LOGIT_BIAS,
        description=f"a map of at most {MAX_LOGIT_BIAS} token ids (decimal strings) to biases from "
                    f"{-MAX_BIAS:g} to {MAX_BIAS:g}, each added to its token's logit")
    # vLLM's extensions, which its clients send beside OpenAI's fields (the SDK's extra_body)
    ignore_eos: bool | None = None  # run to max_tokens past an EOS token
    min_tokens: int | None = Field(default=None, ge=0)  # EOS banned until this many tokens
    stop_token_ids: TokenIdList | None = None  # tokens that end the text as EOS does, kept in it
    top_k: int | None = Field(default=None, ge=-1)  # sample among the k likeliest; 0 or -1: all
    repetition_penalty: float | None = Field(default=None, gt=0)  # 1: none
    guided_json: dict | str | None = None  # a JSON schema the text follows (an object, or its JSON text)
    guided_regex: str | None = None  # a regular expression the text matches
    guided_choice: Annotated[list[str], Field(min_length=1)] | None = None  # the text is one of these
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    _described = described_when_invalid("logit_bias")

    @model_validator(mode="after")
    def _one_grammar(self):
        given = [name for name in ("guided_json", "guided_regex", "guided_choice")
                 if getattr(self, name) is not None]
        if isinstance(self, ChatCompletionRequest):
            if self.tools and self.tool_choice != "none":
                given.append("tools")
            if self.response_format is not None and not isinstance(self.response_format, TextFormat):
                given.append("response_format")
        if len(given) > 1:
            raise ValueError(f"{' and '.join(given)} cannot both shape the reply: give one")
        return self

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompts, each answered by n choices (each request kind says what they are)."""
        raise NotImplementedError

    @property
    def candidates(self) -> int:
        """The choices generated for each prompt, of which n are returned."""
        return self.n or 1

    @model_validator(mode="after")
    def _few_enough_choices(self):
        if len(self.prompts) * self.candidates > MAX_CHOICES:
            raise ValueError(f"prompts x n (x best_of) must be at most {MAX_CHOICES}, the choices of one "
                             "request")
        return self

    @model_validator(mode="after")
    def _min_tokens_within_max(self):
        most = self.max_tokens or getattr(self, "max_completion_tokens", None)
        if most is None and isinstance(self, CompletionRequest):
            most = DEFAULT_COMPLETION_TOKENS
        if self.min_tokens is not None and most is not None and self.min_tokens > most:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be at most max_tokens ({most})")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class TextPart(Body):
    type: Literal["text"]
    text: str


class FunctionCall(Body):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(Body):
    """A call an assistant made: in a conversation's earlier turns, and in a reply."""

    id: str
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None  # null only for an assistant's turn of tool calls
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's
    tool_call_id: str | None = None  # a tool's result: the call it answers

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(p.text for p in self.content)

    @model_validator(mode="after")
    def _content_or_calls(self):
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only an assistant's message has tool_calls")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("a message needs content (an assistant's may have tool_calls instead)")
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        return self


class FunctionDefinition(Body):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict | None = None  # the arguments' JSON schema, of an object; null: no arguments
    strict: bool | None = None  # the arguments always follow `parameters`

    @model_validator(mode="after")
    def _arguments_are_an_object(self):
        if self.parameters and self.parameters.get("type", "object") != "object":
            raise ValueError("parameters must be the JSON schema of an object (the arguments by name)")
        return self


class Tool(Body):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(Body):
    name: str


class NamedToolChoice(Body):
    type: Literal["function"]
    function: FunctionName


class TextFormat(Body):
    type: Literal["text"]


class JsonObjectFormat(Body):
    type: Literal["json_object"]  # any JSON object


class JsonSchema(Body):
    name: str
    description: str | None = None
    schema_: dict = Field(default_factory=dict, alias="schema")  # {}: any JSON value
    strict: bool | None = None  # the schema is always followed


class JsonSchemaFormat(Body):
    type: Literal["json_schema"]
    json_schema: JsonSchema


class Prediction(Body):
    """OpenAI's Predicted Outputs: text the reply is expected to repeat for the most part."""

    type: Literal["content"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class GrammarFormat(Body):
    """TGI's own response format on its chat route (huggingface_hub's documented use): TGI's grammar."""

    type: Literal["json", "regex"]
    value: dict | str  # a JSON schema (or its JSON text), or a regular expression


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat | GrammarFormat,
                           Field(discriminator="type")]


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, gt=0)  # OpenAI's newer name for max_tokens
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_N)  # with logprobs
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        default=None, description="'none', 'auto', 'required' or {\"type\": \"function\", \"function\": "
                                  "{\"name\": <a tool's name>}}")
    parallel_tool_calls: bool | None = None  # None: true, as OpenAI's (server/tools.py)
    tool_prompt: str | None = None  # TGI's: what the list of tools follows (server.tools.CALL_PROMPT)
    prediction: Prediction | None = None  # drafted from by the lookup branch
    functions: Empty | None = refused("only null or []: functions (the deprecated form of tools) are")
    function_call: Literal["none", "auto"] | None = refused("only null, 'none' or 'auto': function_call "
                                                            "(the deprecated form of tool_choice) is")
    response_format: ResponseFormat | None = None

    _unsupported_chat = described_when_invalid("tool_choice", "functions", "function_call")

    @model_validator(mode="after")
    def _tools_as_chosen(self):
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) < len(names):
            raise ValueError("tools: each function needs a name of its own")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise ValueError(f"tool_choice: no tool is named {self.tool_choice.function.name!r}")
        if self.tool_choice == "required" and not names:
            raise ValueError("tool_choice 'required' needs tools")
        return self

    @model_validator(mode="after")
    def _top_logprobs_with_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @property
    def top_n(self) -> int:
        return self.top_logprobs or 0

    @property
    def prompts(self) -> list[str]:
        """The one conversation, as its text (`prepare` renders it through the chat template)."""
        tools = [t.function.model_dump_json() for t in self.tools or []]
        return ["\n".join([m.text() for m in self.messages] + tools)]


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(_Request):
    prompt: (Text | TokenIds | Annotated[list[Text], Field(min_length=1, max_length=MAX_CHOICES)]
             | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_CHOICES)]) = Field(
        description=f"must be a non-empty text, token ids (integers >= 0), or a list of 1 to {MAX_CHOICES} "
                    f"non-empty texts or of 1 to {MAX_CHOICES} lists of token ids")
    logprobs: int | None = Field(default=None, ge=0, le=5)  # each token's most likely tokens, as OpenAI's
    echo: bool | None = False
    # generate this many for each prompt, return the n of highest mean logprob (not streamed)
    best_of: int | None = Field(default=None, ge=1, le=MAX_CHOICES)
    suffix: Literal[""] | None = refused("only null or '': a suffix is")

    _unsupported_completion = described_when_invalid("prompt", "suffix")

    @property
    def candidates(self) -> int:
        return max(self.best_of or 1, self.n or 1)

    @property
    def top_n(self) -> int:
        return self.logprobs or 0

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompt(s), text or token ids."""
        one = isinstance(self.prompt, str) or isinstance(self.prompt[0], int)
        return [self.prompt] if one else self.prompt

    @model_validator(mode="after")
    def _echoed_logprobs_whole(self):
        if self.stream and self.echo and self.logprobs is not None:
            raise ValueError("echo with logprobs (the prompt's logprobs) is not supported when streaming")
        return self

    @model_validator(mode="after")
    def _best_of_whole(self):
        if self.best_of is not None and self.best_of < (self.n or 1):
            raise ValueError("best_of must be at least n")
        if self.stream and (self.best_of or 1) > 1:
            raise ValueError("best_of > 1 is not supported when streaming")
        return self


# ---------------------------------------------------------------- responses

class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = PromptTokensDetails()


class TopLogprob(BaseModel):
    token: str
    logprob: Logprob
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []  # with top_logprobs: the most likely tokens there


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[Logprob]
    top_logprobs: list[dict[str, Logprob] | None] | None = None  # with logprobs > 0: text -> logprob
    text_offset: list[int]


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None  # null where the reply is a tool call
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"]


class _Reply(BaseModel):
    """What every response body and stream chunk carries. `medusa`: the request's speculation figures
    (extension; on the last stream chunk, null on the others and when the server has no heads)."""

    id: str
    created: int
    model: str
    usage: Usage | None = None  # on a whole response; on the usage chunk of a stream
    medusa: Speculation | None = None


class ChatCompletion(_Reply):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class ToolCallDelta(ToolCall):
    index: int = 0  # the call's place among the choice's calls


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None  # a call comes whole, in the choice's last chunk


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None


class ChatCompletionChunk(_Reply):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None  # null on stream chunks before the last


class Completion(_Reply):
    """A whole completion, and also each stream chunk, as OpenAI's legacy API has it."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "medusa-serve"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]
