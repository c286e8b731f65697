"""Validation that needs the tokenized prompt and the server's limits, and TGI's parameter semantics.

The body's types and ranges are checked by `server.protocol`; what is left is checked here, each
failure an `InputError` (422) whose message names the field, worded as TGI words it: first what can
be refused before tokenizing (`check_before_tokenizing`), then what needs the prompt's tokens
(`validate`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from runtime.config import ConfigError, SamplingParams
from runtime.grammar import GrammarError, compile_grammar
from server.protocol import GenerateRequest
from server.settings import Settings


class InputError(Exception):
    """A request the server's limits refuse (422); the message names the field (`param`, where one
    field is to blame: OpenAI's error names it)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class GrammarRefused(InputError):
    """A grammar llguidance refuses; `reason` is its word (the /v1 routes name their own field)."""

    def __init__(self, reason: object) -> None:
        super().__init__(f"`grammar`: {reason}", param="grammar")
        self.reason = str(reason)


@dataclass(frozen=True)
class Job:
    """A validated request, ready for the scheduler."""

    inputs: str
    prompt_ids: list[int]  # after truncation
    params: SamplingParams
    details: bool  # details or decoder_input_details was asked
    prefill_details: bool  # decoder_input_details
    return_full_text: bool
    timeout: float  # seconds from arrival to the last token
    best_of: int = 1  # samples to draw, the best returned (TGI's best_of)

    @property
    def seed(self) -> int | None:
        """The seed to report: the sampling seed, or None when decoding greedily."""
        return None if self.params.greedy else self.params.seed


def check_before_tokenizing(request: GenerateRequest, max_token_chars: int, limits: Settings, *,
                            stream: bool) -> None:
    """Refuse what needs no tokens to refuse. A text longer than max_input_tokens * max_token_chars
    characters has more than max_input_tokens tokens (no token spans more characters), so it is refused
    without tokenizing it; with `truncate`, the prompter tokenizes only the text's tail."""
    p = request.parameters
    if stream and p.decoder_input_details:
        raise InputError("`decoder_input_details` == true is not supported when streaming tokens")
    if stream and (p.best_of or 1) > 1:
        raise InputError("`best_of` != 1 is not supported when streaming tokens")
    if p.truncate is not None and p.truncate > limits.max_input_tokens:
        raise InputError(f"`truncate` must be at most max_input_tokens ({limits.max_input_tokens}). "
                         f"Given: {p.truncate}")
    if p.truncate is None and len(request.inputs) > limits.max_input_tokens * max_token_chars:
        raise InputError(f"`inputs` must have at most {limits.max_input_tokens} tokens. Given: "
                         f"{len(request.inputs)} characters, more than that many tokens")


def validate(request: GenerateRequest, prompt_ids: list[int], limits: Settings) -> Job:
    """prompt_ids: the request's prompt, already truncated when `truncate` asks for it."""
    p = request.parameters
    n = len(prompt_ids)
    if n == 0:
        raise InputError("`inputs` encodes to no tokens")
    if n > limits.max_input_tokens:
        raise InputError(f"`inputs` must have at most {limits.max_input_tokens} tokens. Given: {n}")
    if p.timeout is not None and p.timeout > limits.request_timeout:
        raise InputError(f"`timeout` must be at most {limits.request_timeout:g} seconds (the server's "
                         f"request_timeout). Given: {p.timeout:g}")
    if n + p.max_new_tokens > limits.max_total_tokens:
        raise InputError(f"`inputs` tokens + `max_new_tokens` must be <= {limits.max_total_tokens}. "
                         f"Given: {n} `inputs` tokens and {p.max_new_tokens} `max_new_tokens`")
    return Job(request.inputs, prompt_ids, sampling_params(request),
               details=p.details or p.decoder_input_details, prefill_details=p.decoder_input_details,
               return_full_text=p.return_full_text, timeout=p.timeout or limits.request_timeout,
               best_of=p.best_of or 1)


def sampling_params(request: GenerateRequest) -> SamplingParams:
    """TGI's semantics: greedy unless do_sample or a sampling knob is set; do_sample alone samples at
    temperature 1. A sampled request without a seed gets a random one, reported in details.seed."""
    p = request.parameters
    sampling = p.do_sample or any(k is not None for k in (p.temperature, p.top_k, p.top_p, p.typical_p))
    if (p.best_of or 1) > 1 and not sampling:  # TGI's rules: greedy samples would all be one
        raise InputError("you must use sampling when `best_of` is > 1")
    if (p.best_of or 1) > 1 and p.seed is not None:
        raise InputError("`seed` must not be set when `best_of` > 1")
    if (p.min_new_tokens or 0) > p.max_new_tokens:
        raise InputError(f"`min_new_tokens` must be at most max_new_tokens ({p.max_new_tokens}). Given: "
                         f"{p.min_new_tokens}", param="min_new_tokens")
    try:
        return SamplingParams(
            max_new_tokens=p.max_new_tokens,
            temperature=(p.temperature or 1.0) if sampling else 0.0,
            top_k=p.top_k or 0,
            top_p=p.top_p or 1.0,
            typical_p=p.typical_p or 1.0,
            repetition_penalty=p.repetition_penalty or 1.0,
            frequency_penalty=p.frequency_penalty or 0.0,
            presence_penalty=p.presence_penalty or 0.0,
            seed=(p.seed if p.seed is not None else random.randrange(2**63)) if sampling else None,
            stop=tuple(p.stop),
            ignore_eos=p.ignore_eos,
            min_tokens=p.min_new_tokens or 0,
            stop_token_ids=tuple(p.stop_token_ids),
            acceptance=p.acceptance or "auto",
            speculate=p.speculate,
            top_n=p.top_n_tokens or 0,
            grammar=None if p.grammar is None else compile_grammar(p.grammar.type, p.grammar.value),
        )
    except GrammarError as e:
        raise GrammarRefused(e) from e
    except ConfigError as e:
        raise InputError(str(e)) from e
