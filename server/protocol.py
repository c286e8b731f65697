"""The Text Generation Inference (TGI) wire protocol: request and response bodies.

Field names, defaults, ranges and JSON shapes follow TGI's router, so that TGI's own clients
(`text-generation`, `huggingface_hub.InferenceClient`) work unchanged. Extensions, all optional:
`parameters.speculate` (turn Medusa speculation off for one request), `parameters.acceptance` (the
rule that accepts speculated tokens when sampling), `parameters.timeout` (seconds before the request
fails with error_type 'timeout'), `parameters.presence_penalty` (OpenAI's), `parameters.ignore_eos`
(vLLM's), a `speculation` entry in `details` (the stream's too) and in `/info`, and a `step` on
each streamed token.

`frequency_penalty` follows OpenAI's definition (each logit less the penalty times its token's count
in the generated text), not TGI's, which divides that count by the length of the whole text.
`grammar` (a JSON schema or a regular expression) is followed by llguidance; such a request
speculates on the tokens its grammar forces and on the prompt-lookup guesses it allows. `best_of`
(up to MAX_BEST_OF) samples that many and returns the one of highest mean logprob, the others in
`details.best_of_sequences`, as TGI does. `watermark`, which this server does not implement, accepts
only false; the schema states so, and true is a 422 saying it is not supported. `top_n_tokens` goes
up to MAX_TOP_N (TGI's own default limit is 5).

Validation that needs only the body lives here (types, ranges, valid Unicode text, finite numbers: a
422 naming the field); validation that needs the tokenizer or the server's limits lives in
`server.validation`.

A logprob that is not finite (-inf for a token the sampling filters had excluded, NaN from a broken
model) is null in responses: JSON has no such numbers, and every route writes null the same way.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from runtime.config import MAX_ADDED_PENALTY, MAX_STOP_TOKENS, MAX_TOP_N

FinishReason = Literal["length", "eos_token", "stop_sequence"]

MAX_STOP_SEQUENCES = 4
MAX_BEST_OF = 8  # samples one request may ask for, the one of highest mean logprob returned


def _valid_unicode(text: object) -> object:
    # JSON's "\ud800" decodes to a lone surrogate, which no tokenizer can encode. Checked before pydantic's
    # own str validation, whose message ("unable to parse raw data") does not say what is wrong.
    if isinstance(text, str):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"must be valid Unicode text: {e.reason} at character {e.start}") from None
    return text


Text = Annotated[str, Field(min_length=1), BeforeValidator(_valid_unicode)]  # non-empty, encodable


def valid_unicode_throughout(body: BaseModel) -> BaseModel:
    """Every text in the body's fields (in lists and objects too: messages, schemas, tool descriptions)
    encodable: a lone surrogate anywhere had reached the tokenizer, the chat template or the JSON
    encoder, and failed there as a 500. (Nested bodies check their own fields.)"""
    def check(value: object, where: str) -> None:
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(f"{where}: must be valid Unicode text: {e.reason} at character {e.start}") \
                    from None
        elif isinstance(value, dict):
            for key, item in value.items():
                check(key, where)
                check(item, f"{where}.{key}")
        elif isinstance(value, list | tuple):
            for i, item in enumerate(value):
                check(item, f"{where}.{i}")

    for name in type(body).model_fields:
        check(getattr(body, name), name)
    return body


def strict_bool(value: object) -> object:
    # `Literal[False]` alone takes 0 and 0.0 for false (they compare equal); strict like a bool, it does not
    if not isinstance(value, bool):
        raise ValueError("must be a boolean")
    return value


def described_when_invalid(*fields: str):
    """A validator for fields whose invalid values fail with the field's description as the message:
    those that accept only their no-op values, and those of several shapes, where pydantic's message
    would name one shape's first complaint."""

    def check(cls, value: object, handler: ValidatorFunctionWrapHandler, info: ValidationInfo) -> object:
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError("unsupported", cls.model_fields[info.field_name].description) from None

    return field_validator(*fields, mode="wrap")(classmethod(check))


class _Body(BaseModel):
    # Strict like TGI's serde: "5" is not an integer and 1.5 is not a bool. Unknown fields are ignored.
    # Python's json reads NaN and Infinity, which are not JSON: refuse them as TGI does.
    model_config = ConfigDict(strict=True, allow_inf_nan=False)

    _valid_unicode = model_validator(mode="after")(valid_unicode_throughout)


class Grammar(_Body):
    """TGI's grammar: a JSON schema (`value` an object, or its JSON text) or a regular expression."""

    type: Literal["json", "regex"]
    value: dict | str


class Parameters(_Body):
    do_sample: bool = False
    max_new_tokens: int = Field(default=100, gt=0)
    temperature: float | None = Field(default=None, gt=0)
    top_k: int | None = Field(default=None, gt=0)
    top_p: float | None = Field(default=None, gt=0, lt=1)
    typical_p: float | None = Field(default=None, gt=0, lt=1)
    repetition_penalty: float | None = Field(default=None, gt=0)
    stop: list[Text] = Field(default_factory=list, max_length=MAX_STOP_SEQUENCES)
    seed: int | None = Field(default=None, ge=0, lt=2**64)
    details: bool = False
    decoder_input_details: bool = False
    return_full_text: bool = False
    truncate: int | None = Field(default=None, gt=0)
    # not implemented: only the no-op values; the description is the 422 message for any other
    # sample this many (requests of their own to the engine), return the one of highest mean logprob
    best_of: int | None = Field(default=None, ge=1, le=MAX_BEST_OF)
    # the most likely tokens and their logprobs beside each token (details.top_tokens, a stream event's)
    top_n_tokens: int | None = Field(default=None, ge=0, le=MAX_TOP_N)
    # OpenAI's definition, not TGI's (which divides the count by the text's length): each logit less
    # frequency_penalty times its token's count in the generated text
    frequency_penalty: float | None = Field(default=None, ge=-MAX_ADDED_PENALTY, le=MAX_ADDED_PENALTY)
    watermark: Annotated[Literal[False], BeforeValidator(strict_bool)] = Field(
        default=False, description="only false: watermark is not supported by this server")
    # only what the grammar allows is generated (speculating on the tokens it forces and on lookup guesses)
    grammar: Grammar | None = None
    # extensions
    ignore_eos: bool = False  # run to max_new_tokens past an EOS token (vLLM's; load tests use it)
    # tokens that end the text as EOS does (vLLM's), kept in it (finish_reason eos_token)
    stop_token_ids: list[Annotated[int, Field(ge=0)]] = Field(default_factory=list,
                                                              max_length=MAX_STOP_TOKENS)
    # EOS banned until this many tokens are out (transformers' name; vLLM's min_tokens)
    # the text expected, or most of it (OpenAI's Predicted Outputs): the lookup branch drafts from it
    prediction: str | None = None
    min_new_tokens: int | None = Field(default=None, ge=0)
    # OpenAI's: each logit less presence_penalty where its token is in the generated text
    presence_penalty: float | None = Field(default=None, ge=-MAX_ADDED_PENALTY, le=MAX_ADDED_PENALTY)
    speculate: bool = True
    acceptance: Literal["lossless", "typical"] | None = None
    timeout: float | None = Field(default=None, gt=0)  # seconds; at most the server's request_timeout

    _unsupported = described_when_invalid("watermark")


class GenerateRequest(_Body):
    inputs: Text
    parameters: Parameters = Field(default_factory=Parameters)
    stream: bool = False  # read by the root route `POST /` only, as in TGI

    @field_validator("parameters", mode="before", json_schema_input_type=Parameters | None)
    @classmethod
    def _null_parameters(cls, value: object) -> object:
        return {} if value is None else value


def _finite_or_none(logprob: float | None) -> float | None:
    return logprob if logprob is None or math.isfinite(logprob) else None


# Not finite (-inf, NaN) becomes None, written null: JSON has no such numbers, and left as they are,
# /generate's JSONResponse would refuse them (a 500) while the stream's `model_dump_json()` writes null.
Logprob = Annotated[float | None, AfterValidator(_finite_or_none)]


class PrefillToken(BaseModel):
    id: int
    text: str
    logprob: Logprob  # None for the first prompt token (nothing precedes it) and when not finite


class Token(BaseModel):
    id: int
    text: str
    logprob: Logprob  # None when not finite
    special: bool


class SimpleToken(BaseModel):
    """A prompt token of /tokenize: its text, and where that text lies in the prompt's (characters)."""

    id: int
    text: str
    start: int
    stop: int


class Speculation(BaseModel):
    """Medusa speculation for one request (extension; null when the server has no heads)."""

    steps: int  # speculative steps the request took part in
    accepted_tokens: int  # draft tokens accepted over those steps
    mean_accepted_len: float  # tokens per step: 1 + accepted_tokens / steps


class Details(BaseModel):
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None  # the sampling seed; null when decoding greedily
    prefill: list[PrefillToken]  # empty unless decoder_input_details
    tokens: list[Token]
    speculation: Speculation | None = None
    top_tokens: list[list[Token]] | None = None  # with top_n_tokens: each token's (left out otherwise)
    best_of_sequences: list[BestOfSequence] | None = None  # with best_of > 1 (left out otherwise)


class BestOfSequence(BaseModel):
    """One of best_of's other samples, as TGI lists them in details.best_of_sequences."""

    generated_text: str
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None
    prefill: list[PrefillToken]
    tokens: list[Token]
    top_tokens: list[list[Token]] | None = None


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details | None = None  # present when details or decoder_input_details was asked


class StreamDetails(BaseModel):
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None
    input_length: int
    speculation: Speculation | None = None


class StreamResponse(BaseModel):
    index: int  # 1 for the first generated token
    token: Token
    generated_text: str | None = None  # on the last event only
    details: StreamDetails | None = None  # on the last event only, when details was asked
    # extension, after TGI's fields: the engine call that emitted the token, 1 for the prefill's token;
    # the tokens one speculative step accepted share it, so a client can show how many each step gave
    step: int | None = None
    top_tokens: list[Token] | None = None  # with top_n_tokens (left out otherwise)


class ErrorResponse(BaseModel):
    error: str
    error_type: str  # 'validation' | 'overloaded' | 'generation' | 'timeout' | 'unhealthy' | ...


class SpeculationInfo(BaseModel):
    enabled: bool
    drafter: str | None = None  # 'heads' or 'eagle' (the draft layer); None without speculation
    num_heads: int  # Medusa heads; 0 without heads (and for the draft layer)
    tree: str | None  # name of the candidate tree
    tree_nodes: int  # verified tokens per step, root included
    # with more running requests than this, all greedy, steps decode plainly; None: no limit
    max_speculative_batch: int | None = None


class Info(BaseModel):
    model_id: str
    model_sha: str | None = None
    model_dtype: str
    model_device_type: str
    model_pipeline_tag: str = "text-generation"
    max_concurrent_requests: int
    max_best_of: int = MAX_BEST_OF
    max_stop_sequences: int = MAX_STOP_SEQUENCES
    max_input_tokens: int
    max_input_length: int  # TGI's older name for max_input_tokens
    max_total_tokens: int
    max_batch_size: int
    max_queue: int
    version: str
    sha: str | None = None
    docker_label: str | None = None
    # the decoding step runs through torch.compile (--compile; false where auto's build failed)
    compiled: bool
    # a prompt reuses the K/V of the longest prefix of it that a slot holds (--prefix-caching)
    prefix_caching: bool = True
    speculation: SpeculationInfo


class Health(BaseModel):
    status: Literal["ok"] = "ok"  # the model can serve; otherwise /health answers 503 with an ErrorResponse


def event_stream(description: str) -> dict:
    """The OpenAPI response of a streamed 200: Server-Sent Events, each event's data a JSON text."""
    return {"description": description, "content": {"text/event-stream": {"schema": {
        "type": "object", "required": ["data"],
        "properties": {"data": {"type": "string", "contentMediaType": "application/json"}}}}}}
