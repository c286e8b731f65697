"""The Text Generation Inference (TGI) wire protocol: request and response bodies.

Field names, defaults, ranges and JSON shapes follow TGI's router, so that TGI's own clients
(`text-generation`, `huggingface_hub.InferenceClient`) work unchanged. Two extensions, both
optional: `parameters.speculate` (turn Medusa speculation off for one request),
`parameters.acceptance` (the rule that accepts speculated tokens when sampling) and
`parameters.timeout` (seconds before the request fails with error_type 'timeout'), and a
`speculation` entry in `details`.

Validation that needs only the body lives here (types and ranges: a 422 naming the field);
validation that needs the tokenizer or the server's limits lives in `server.validation`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

FinishReason = Literal["length", "eos_token", "stop_sequence"]

MAX_STOP_SEQUENCES = 4
MAX_BEST_OF = 1  # best_of > 1 (several samples, best returned) is not implemented


class _Body(BaseModel):
    # Strict like TGI's serde: "5" is not an integer and 1.5 is not a bool. Unknown fields are ignored.
    model_config = ConfigDict(strict=True)


class Parameters(_Body):
    do_sample: bool = False
    max_new_tokens: int = Field(default=100, gt=0)
    temperature: float | None = Field(default=None, gt=0)
    top_k: int | None = Field(default=None, gt=0)
    top_p: float | None = Field(default=None, gt=0, lt=1)
    typical_p: float | None = Field(default=None, gt=0, lt=1)
    repetition_penalty: float | None = Field(default=None, gt=0)
    frequency_penalty: float | None = None
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOP_SEQUENCES)
    seed: int | None = Field(default=None, ge=0, lt=2**64)
    details: bool = False
    decoder_input_details: bool = False
    return_full_text: bool = False
    truncate: int | None = Field(default=None, gt=0)
    top_n_tokens: int | None = Field(default=None, ge=0)
    best_of: int | None = Field(default=None, gt=0)
    watermark: bool = False
    grammar: dict | None = None
    # extensions
    speculate: bool = True
    acceptance: Literal["lossless", "typical"] | None = None
    timeout: float | None = Field(default=None, gt=0)  # seconds; at most the server's request_timeout

    @field_validator("stop")
    @classmethod
    def _stop_not_empty(cls, stop: list[str]) -> list[str]:
        if any(s == "" for s in stop):
            raise ValueError("stop sequences cannot be empty strings")
        return stop

    @field_validator("best_of")
    @classmethod
    def _one_sequence(cls, best_of: int | None) -> int | None:
        if best_of is not None and best_of > MAX_BEST_OF:
            raise ValueError(f"best_of > {MAX_BEST_OF} is not supported by this server")
        return best_of

    @field_validator("top_n_tokens")
    @classmethod
    def _no_top_tokens(cls, top_n_tokens: int | None) -> int | None:
        if top_n_tokens:
            raise ValueError("top_n_tokens is not supported: this server does not report alternative tokens")
        return top_n_tokens

    @field_validator("frequency_penalty")
    @classmethod
    def _no_frequency_penalty(cls, penalty: float | None) -> float | None:
        if penalty is not None:
            raise ValueError("frequency_penalty is not supported; use repetition_penalty")
        return penalty

    @field_validator("watermark")
    @classmethod
    def _no_watermark(cls, watermark: bool) -> bool:
        if watermark:
            raise ValueError("watermark is not supported by this server")
        return watermark

    @field_validator("grammar")
    @classmethod
    def _no_grammar(cls, grammar: dict | None) -> dict | None:
        if grammar is not None:
            raise ValueError("grammar-constrained generation is not supported by this server")
        return grammar


class GenerateRequest(_Body):
    inputs: str
    parameters: Parameters = Field(default_factory=Parameters)
    stream: bool = False  # read by the root route `POST /` only, as in TGI

    @field_validator("inputs")
    @classmethod
    def _inputs_not_empty(cls, inputs: str) -> str:
        if not inputs:
            raise ValueError("inputs cannot be empty")
        return inputs

    @field_validator("parameters", mode="before")
    @classmethod
    def _null_parameters(cls, value: object) -> object:
        return {} if value is None else value


class PrefillToken(BaseModel):
    id: int
    text: str
    logprob: float | None  # None for the first prompt token: nothing precedes it


class Token(BaseModel):
    id: int
    text: str
    logprob: float | None
    special: bool


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


class ErrorResponse(BaseModel):
    error: str
    error_type: str  # 'validation' | 'overloaded' | 'generation' | 'timeout' | 'unhealthy' | ...


class SpeculationInfo(BaseModel):
    enabled: bool
    num_heads: int  # 0 without heads
    tree: str | None  # name of the candidate tree
    tree_nodes: int  # verified tokens per step, root included


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
    speculation: SpeculationInfo
