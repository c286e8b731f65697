"""Constrained generation: a request's grammar (a JSON schema or a regular expression) as the tokens it
allows next, from llguidance, which matches a grammar against a tokenizer's tokens as they come.

A grammar travels as llguidance's grammar text (`compile_grammar`), checked once against the
tokenizer and kept compiled (`Grammars.check`). The engine holds one `Grammars` (llguidance's view of
the vocabulary, built at the first use: ~1 s for a 49k vocabulary) and gives each constrained request a
`Constraint`, which follows the tokens the request emits and gives, before each step, the bitmask
of the tokens allowed next: [W] int32, token t allowed iff bit t % 32 of word t // 32 is set, W =
ceil(V / 32). A token past the tokenizer's vocabulary (an embedding padded further) is never allowed.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable

import llguidance
import torch

KINDS = ("json", "regex")  # TGI's grammar types: a JSON schema, a regular expression
# JSON as a model usually writes it on one line ({"a": 1, "b": [2, 3]}): with whitespace free between
# tokens, a small model can spend its tokens on blank lines (SmolLM2's tiny random stand-in did)
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ValueError):
    """A grammar llguidance refuses, or a token it did not allow."""


def compile_grammar(kind: str, value: object) -> str:
    """TGI's grammar -- kind 'json' with a JSON schema (an object, or its JSON text), or 'regex' with a
    regular expression -- as llguidance's grammar text (GrammarError when malformed)."""
    if kind not in KINDS:
        raise GrammarError(f"grammar type must be one of {', '.join(KINDS)}, got {kind!r}")
    try:
        if kind == "json":
            return llguidance.LLMatcher.grammar_from_json_schema(
                value if isinstance(value, str) else json.dumps(value), defaults=JSON_LAYOUT)
        if not isinstance(value, str):
            raise GrammarError("a regex grammar's value must be a string")
        return llguidance.LLMatcher.grammar_from_regex(value)
    except (ValueError, TypeError) as e:
        raise GrammarError(str(e)) from e


def words(vocab_size: int) -> int:
    """W: the int32 words of a bitmask over the vocabulary."""
    return (vocab_size + 31) // 32


class Grammars:
    """llguidance's view of one tokenizer's vocabulary; `constraint` gives a request its matcher.

    `check` (the routes call it in a worker thread) compiles a grammar into a matcher at its start and
    keeps the last PREPARED of them; `constraint` (the engine's thread) copies one: 0.03 ms where
    compiling a 30-field schema took 7.5 ms (SmolLM2's vocabulary, AMD EPYC Zen 4), which every running
    request's step would have waited.
    A grammar sent again (most clients send one schema with every request) is compiled once."""

    PREPARED = 64

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: tuple[int, ...]) -> None:
        self.tokenizer, self.vocab_size, self.eos_token_ids = tokenizer, vocab_size, list(eos_token_ids)
        self._ll: llguidance.LLTokenizer | None = None
        self._prepared: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()  # the routes check grammars while the engine's thread steps

    @property
    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._ll is None:
                backend = getattr(self.tokenizer, "backend_tokenizer", None)
                if backend is None:
                    raise GrammarError("this model's tokenizer is not a fast one: it cannot take grammars")
                self._ll = llguidance.LLTokenizer(_llguidance_view(backend), n_vocab=self.vocab_size,
                                                  eos_token=self.eos_token_ids or None)
            return self._ll

    def check(self, grammar: str) -> None:
        """GrammarError saying why, unless llguidance takes the grammar with this tokenizer; one it takes
        is kept compiled for `constraint`."""
        with self._lock:
            if grammar in self._prepared:
                self._prepared.move_to_end(grammar)
                return
        matcher = self._matcher(grammar)
        matcher.compute_bitmask()  # builds the lexer's first states, which the copies share
        with self._lock:
            self._prepared[grammar] = matcher
            while len(self._prepared) > self.PREPARED:
                self._prepared.popitem(last=False)

    def constraint(self, grammar: str) -> Constraint:
        with self._lock:
            prepared = self._prepared.get(grammar)
            matcher = prepared.deep_copy() if prepared is not None else None
        return Constraint(matcher or self._matcher(grammar), self.vocab_size,
                          frozenset(self.ll_tokenizer.eos_tokens))

    def _matcher(self, grammar: str) -> llguidance.LLMatcher:
        matcher = llguidance.LLMatcher(self.ll_tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(matcher.get_error().strip())
        return matcher


def _llguidance_view(backend) -> str:
    """A fast tokenizer's JSON as llguidance reads it: no padding or truncation, and a byte-level
    vocabulary's decoder as ByteLevel alone. llguidance tells a byte-level vocabulary by that decoder;
    the tokenizer that transformers builds from SmolLM2's GGUF file decodes through a Sequence
    (ByteFallback, Fuse, Replace, ByteLevel), read as text, where 'Ġ' was two bytes and no token a
    space: a JSON schema's ': ' then allowed only ':', which the grammar refused once emitted."""
    data = json.loads(backend.to_str())
    data["padding"] = data["truncation"] = None
    decoder = data.get("decoder") or {}
    if decoder.get("type") == "Sequence":
        byte_level = [d for d in decoder.get("decoders", []) if d.get("type") == "ByteLevel"]
        if byte_level:
            data["decoder"] = byte_level[0]
    return json.dumps(data)


class Constraint:
    """One request's grammar, following the tokens it emits."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int, eos: frozenset[int]) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.eos = eos  # the tokenizer's EOS tokens, as llguidance knows them
        self._check()

    def allowed(self) -> torch.Tensor:
        """[W] int32: the bitmask of the tokens the grammar allows next (EOS alone once it is done)."""
        self._check()
        # (llguidance.torch fills a tensor in place, but importing it imports torch.compile's machinery:
        # 2.1 s more at every start)
        # (llguidance's has a word more where V is a multiple of 32: SmolLM2's 49152 tokens, 1537 words)
        mask = torch.frombuffer(bytearray(self.matcher.compute_bitmask()), dtype=torch.int32)
        return mask[:words(self.vocab_size)]

    def chain(self, limit: int, guess: Callable[[list[int]], int | None] = lambda tokens: None,
              guesses: int = 0) -> tuple[list[int], torch.Tensor]:
        """Up to `limit` tokens that may come next, each one the grammar allows after those before it:
        where its mask allows one token alone (EOS excepted), that token, which plain decoding emits
        whatever the logits; elsewhere, up to `guesses` times, `guess(the tokens so far)`, a guess to
        verify (None: the chain ends). Returns them and the bitmasks of what the grammar allows before
        each and after the last ([n + 1, W] int32; before a forced token, `only` that token); the state
        is left as it was."""
        tokens: list[int] = []
        masks = [self.allowed()]
        while len(tokens) < limit:
            allowed = unpack(masks[-1], self.vocab_size)
            forced = int(allowed.sum()) == 1
            token = int(allowed.nonzero()[0, 0]) if forced else guess(tokens) if guesses > 0 else None
            if (token is None or not 0 <= token < self.vocab_size or not allowed[token] or token in self.eos
                    or not self.matcher.consume_token(token)):
                break
            if forced:
                masks[-1] = only(token, self.vocab_size)
            else:
                guesses -= 1
            tokens.append(token)
            masks.append(self.allowed())
        if tokens:
            self.matcher.rollback(len(tokens))
        return tokens, torch.stack(masks)

    def consume(self, tokens: list[int]) -> None:
        for token in tokens:
            if self.matcher.is_stopped():  # the grammar is done: its mask allowed EOS alone, which ends it
                return
            if not self.matcher.consume_token(token):
                raise GrammarError(f"the grammar did not allow token {token}: {self.matcher.get_error()}")

    def _check(self) -> None:
        if self.matcher.is_error():
            raise GrammarError(self.matcher.get_error())


def only(token: int, vocab_size: int) -> torch.Tensor:
    """The [W] int32 bitmask of one token."""
    mask = torch.zeros(words(vocab_size), dtype=torch.int32)
    mask[token // 32] = 1 << (token % 32) if token % 32 < 31 else -2**31  # bit 31: int32's sign
    return mask


def without(mask: torch.Tensor | None, tokens: tuple[int, ...], vocab_size: int) -> torch.Tensor:
    """A [W] int32 bitmask with `tokens` cleared (None: every token, before)."""
    mask = torch.full((words(vocab_size),), -1, dtype=torch.int32) if mask is None else mask.clone()
    for t in tokens:
        mask[t // 32] &= ~(1 << (t % 32)) if t % 32 < 31 else 2**31 - 1  # bit 31: int32's sign
    return mask


def unpack(mask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[..., W] int32 bitmasks -> [..., V] bool, on the device the masks are on."""
    bits = torch.arange(32, device=mask.device, dtype=torch.int32)
    return ((mask[..., None] >> bits) & 1).bool().flatten(-2)[..., :vocab_size]
