"""The engine: prefill new requests into cache slots, then advance all of them one batched step at a time.

Each running sequence holds a *pending* token: sampled from the base model but not yet in the
cache. A step feeds every sequence's pending token -- alone (plain decoding) or as the root of a
tree of Medusa candidates (speculation) -- through ONE forward of the base model, accepts a path
of that tree per sequence, keeps the accepted nodes' K/V, and samples the next pending token at
the last accepted node. Plain decoding is the one-node tree, so both share this code.

A prompt goes into the cache with `add` (whole), or with `start` and then `prefill` one chunk at a
time, so that a server can run steps for the other sequences between the chunks of a long prompt.

Prefix caching: a slot keeps its K/V after its request ends, and a new prompt that begins with
tokens some slot holds (a conversation's next turn, a shared system prompt) starts from them -- in
that slot, or copied from it -- and prefills the rest only. Only K/V with the bits a prefill of the
same tokens writes are reused: the prompt's, and a reply's where every step that wrote it went
through row-invariant kernels (`DeviceStep.invariant`); so the output is a fresh prefill's, bit for
bit where prefills are chunk-invariant (`DeviceStep.prefill`).

The engine works on the host: requests, their slots, their generators and prompt-lookup indexes,
stop conditions. Everything a step computes runs on the device in `medusa.step.DeviceStep`, which
owns the KV cache and the per-slot device state, as one function with one upload and one download
(compiled with `compile`).

The engine is the one owner of each request's state (prefilling, then running) and of its cache
slot. A slot is freed in one place, `_release`: when the request finishes, is cancelled, or fails.
A call that raises releases the requests it was serving before the exception leaves the engine, and
a failure that belongs to one row of a step (its sampling) fails that request only, as an `Emitted`
with `error` set. `check` verifies that every slot is free or held by exactly one live request.

Legend: B running sequences, T tree nodes, K Medusa heads, C hidden size, V vocabulary.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Hashable, Iterable, Iterator
from dataclasses import dataclass, field

import torch

from medusa.draft import window_size
from medusa.heads import MedusaHeads
from medusa.lookup import NgramIndex
from medusa.step import CHAIN_MASKS, ROOT_ONLY, DeviceStep, Row
from medusa.tree import DynamicTree, TreeBuffers, check_tree_fits
from runtime.config import ConfigError, ModelConfig, SamplingParams
from runtime.grammar import Constraint, GrammarError, Grammars, without
from runtime.kv_cache import KVCache
from runtime.llama import Llama


class EngineError(Exception):
    """A request the engine cannot take (no free slot, prompt too long for the cache)."""


class InvariantError(AssertionError):
    """The engine's slots and requests disagree: a bug, never a user's doing."""


@dataclass(frozen=True)
class Emitted:
    """What one `add` or `step` produced for one request: a record of this call only."""

    request_id: Hashable
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str | None  # None while running; 'length' | 'eos_token' | 'stop_sequence'
    error: str | None = None  # the request failed (its slot is already free); no tokens
    cached_tokens: int = 0  # the first token's: prompt tokens whose K/V came from the prefix cache
    speculated: bool = False  # this step verified a tree of drafts for the request
    accepted: int = 0  # drafted tokens this step accepted and emitted (<= len(token_ids))
    prefill_logprobs: list[float | None] | None = None
    # with prefill_logprobs and params.top_n: each prompt token's most likely tokens (None for the first)
    prefill_top_tokens: list[list[tuple[int, float]] | None] | None = None
    # with params.top_n: each token's most likely tokens there, (id, logprob), most likely first
    top_tokens: list[list[tuple[int, float]]] | None = None
    # [n, C] with keep_hidden: final hidden states of the tokens this call put in the cache (the
    # last prompt token for `add`, the accepted path for `step`): self-distillation data for heads
    hidden: torch.Tensor | None = None


@dataclass
class _Sequence:
    request_id: Hashable
    slot: int
    params: SamplingParams
    prompt: list[int]
    generator: torch.Generator  # on the host: draws the uniforms of the request's steps
    generated: list[int] = field(default_factory=list)  # includes the pending token (last)
    lookup: NgramIndex | None = None  # prompt + generated, for a tree with a lookup branch
    constraint: Constraint | None = None  # with params.grammar: what it allows next
    exact: int = 0  # leading cached tokens whose K/V are what a prefill of them writes (the prefix cache's)

    @property
    def pending(self) -> int:
        return self.generated[-1]

    @property
    def cached(self) -> int:
        return len(self.prompt) + len(self.generated) - 1  # all but the pending token

    @property
    def reusable(self) -> list[int]:
        """The leading tokens whose K/V the prefix cache may reuse."""
        return (self.prompt + self.generated)[:self.exact]


@dataclass
class _Prefill:
    """A started request whose prompt is going into the cache chunk by chunk (not yet in `step`)."""

    request_id: Hashable
    slot: int
    params: SamplingParams
    prompt: list[int]
    prompt_logprobs: bool
    constraint: Constraint | None
    cached: int = 0  # prompt tokens whose K/V came from the prefix cache
    done: int = 0  # prompt tokens already in the cache (cached ones included)
    logprobs: list[float | None] = field(default_factory=lambda: [None])  # per prompt token scored so far
    # with params.top_n: each prompt token's most likely tokens where it stands (none for the first)
    top: list[list[tuple[int, float]] | None] = field(default_factory=lambda: [None])

    @property
    def reusable(self) -> list[int]:
        return self.prompt[:self.done]


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    """How many leading tokens a and b share, up to limit."""
    n = max(0, min(len(a), len(b), limit))
    return next((i for i in range(n) if a[i] != b[i]), n)


def _check_max_total_tokens(config: ModelConfig, max_total_tokens: int) -> None:
    """Refuse a length the model cannot attend over exactly: past its trained positions, or past a
    sliding window, which our attention does not apply."""
    if max_total_tokens > config.max_position_embeddings:
        raise ConfigError(f"max_total_tokens ({max_total_tokens}) exceeds the model's "
                          f"max_position_embeddings ({config.max_position_embeddings}): lower "
                          f"--max-total-tokens to at most {config.max_position_embeddings}")
    window = config.sliding_window
    if window is not None and window < max_total_tokens:
        raise ConfigError(f"the model attends within a sliding window of {window} tokens, which this server "
                          f"does not enforce, so tokens past it would come out wrong with max_total_tokens "
                          f"({max_total_tokens}): lower --max-total-tokens to at most {window}")


def use_compile(mode: str, device: str) -> bool:
    """--compile auto|on|off -> whether the engine compiles its step. auto: on for CUDA, off on the CPU."""
    if mode not in ("auto", "on", "off"):
        raise ConfigError(f"compile must be auto, on or off, got {mode!r}")
    return mode == "on" or (mode == "auto" and device.startswith("cuda"))


class Engine:
    def __init__(self, model: Llama, tokenizer, eos_token_ids: Iterable[int], *, max_batch_size: int = 8,
                 max_total_tokens: int = 2048, heads: MedusaHeads | None = None,
                 tree: TreeBuffers | DynamicTree | None = None, keep_hidden: bool = False,
                 max_speculative_batch: int | None = None, compile: bool = False,
                 eager_if_compile_fails: bool = False, prefix_caching: bool = True) -> None:
        """max_speculative_batch: a step with more running sequences than this, all of those that
        speculate greedy, decodes plainly (None: no limit). A tree multiplies the rows of a step; once
        the batch alone fills the machine (a CPU), extra rows cost more than the drafts they accept.
        Greedy output is the same either way; sampled rows keep speculating, so that a seeded
        request's random stream, and so its output, does not depend on the load.

        compile: run the step's device work through torch.compile (`use_compile` decides the default);
        `warm_up` builds its graphs before serving. eager_if_compile_fails: should that fail, warm-up
        logs why and the engine steps eagerly (`compile` turns False; --compile auto), instead of
        raising (--compile on).

        prefix_caching: a prompt starts from the K/V of the longest prefix of it that a slot holds
        (module docstring).

        Raises ConfigError for what could not be exact: heads without a tree, or max_total_tokens past
        the model's positions or sliding window."""
        if heads is not None and tree is None:
            raise ConfigError("Medusa heads were given without a tree: pass the tree of candidates they "
                              "draft (e.g. medusa.tree.get_tree('cpu')), or no heads for plain decoding")
        _check_max_total_tokens(model.config, max_total_tokens)
        self.model = model
        self.max_speculative_batch = max_speculative_batch
        self.keep_hidden = keep_hidden
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.grammars = Grammars(tokenizer, model.config.vocab_size, tuple(eos_token_ids))
        self.heads = heads
        self.device = model.embed.weight.device
        tree = tree if heads is not None else ROOT_ONLY
        if isinstance(tree, DynamicTree):
            tree = tree.for_drafter(heads.config.max_depth)
        if heads is not None:
            check_tree_fits(tree, heads.config.max_depth, heads.config.scored_vocab_size)
        self.max_total_tokens = max_total_tokens
        self.num_slots = max_batch_size
        # room for a whole tree of scratch entries after the longest allowed sequence
        self.device_step = DeviceStep(model, heads, tree, max_batch_size, max_total_tokens + tree.num_nodes,
                                      compile)
        self.eager_if_compile_fails = eager_if_compile_fails
        self._free = list(range(max_batch_size - 1, -1, -1))
        self.prefix_caching = prefix_caching
        # free slot -> the leading tokens whose K/V it still holds for reuse, the longest unused first
        self._kept: dict[int, list[int]] = {}
        self._running: dict[Hashable, _Sequence] = {}
        self._prefilling: dict[Hashable, _Prefill] = {}

    @torch.inference_mode()  # as `step`: a graph built with autograd on would not serve it
    def warm_up(self) -> None:
        """Build every compiled graph and kernel variant a step can need, so that none is built
        while serving (a no-op without `compile`); where that fails, see `eager_if_compile_fails`."""
        self.device_step.warm_up(self.num_slots, self.heads is not None, self.eager_if_compile_fails)

    @property
    def cache(self) -> KVCache:
        return self.device_step.cache

    @property
    def tree(self) -> TreeBuffers | DynamicTree:
        """The tree a speculative step verifies (the root alone without heads), on the device."""
        return self.device_step.tree

    @property
    def compile(self) -> bool:
        return self.device_step.compile

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def request_ids(self) -> frozenset[Hashable]:
        """The requests holding a slot: prefilling or running."""
        return frozenset(self._prefilling) | frozenset(self._running)

    @property
    def prefilling(self) -> dict[Hashable, int]:
        """Started requests whose prompt is not all in the cache, in start order: id -> tokens left."""
        return {i: len(pre.prompt) - pre.done for i, pre in self._prefilling.items()}

    def check(self) -> None:
        """Raise InvariantError unless every slot is free or held by exactly one live request, and only
        free slots keep K/V for the prefix cache (a held slot's are its request's)."""
        held = [pre.slot for pre in self._prefilling.values()] + [seq.slot for seq in self._running.values()]
        both = self._prefilling.keys() & self._running.keys()
        if sorted(held + self._free) != list(range(self.num_slots)) or both:
            raise InvariantError(f"cache slots and requests disagree: free {sorted(self._free)}, prefilling "
                                 f"{[pre.slot for pre in self._prefilling.values()]}, running "
                                 f"{[seq.slot for seq in self._running.values()]}, in both {sorted(both)}")
        if not self._kept.keys() <= set(self._free):
            raise InvariantError(f"slots {sorted(self._kept.keys() - set(self._free))} are held but kept for "
                                 f"the prefix cache")

    # ---------------------------------------------------------------- admission

    @torch.inference_mode()
    def add(self, request_id: Hashable, prompt_ids: list[int], params: SamplingParams,
            prompt_logprobs: bool = False) -> Emitted:
        """Prefill a prompt into a free slot and sample its first token."""
        self.start(request_id, prompt_ids, params, prompt_logprobs)
        emitted = self.prefill(request_id, len(prompt_ids))
        assert emitted is not None
        return emitted

    def start(self, request_id: Hashable, prompt_ids: list[int], params: SamplingParams,
              prompt_logprobs: bool = False) -> None:
        """Take a free slot for a prompt that `prefill` then puts in the cache, one chunk per call.

        The request joins `step`'s batch once its whole prompt is in; `cancel` frees the slot before.
        """
        n = len(prompt_ids)
        if n == 0:
            raise EngineError("the prompt is empty")
        if n + params.max_new_tokens > self.max_total_tokens:
            raise EngineError(f"prompt ({n} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds "
                              f"max_total_tokens ({self.max_total_tokens})")
        V = self.model.config.vocab_size
        for name, ids in (("logit_bias", [t for t, _ in params.logit_bias]),
                          ("stop_token_ids", params.stop_token_ids)):
            if outside := [t for t in ids if t >= V]:
                raise EngineError(f"{name}: token id {outside[0]} is outside the vocabulary (0 to {V - 1})")
        if request_id in self._running or request_id in self._prefilling:
            raise EngineError(f"request {request_id!r} is already running")
        if not self._free:
            raise EngineError("no free cache slot")
        try:
            constraint = None if params.grammar is None else self.grammars.constraint(params.grammar)
        except GrammarError as e:
            raise EngineError(f"grammar: {e}") from e
        source, cached = self._longest_prefix(prompt_ids, prompt_logprobs)
        slot = self._take_slot(source)
        self.device_step.start(slot, prompt_ids, params.logit_bias, source, cached)
        self._prefilling[request_id] = _Prefill(request_id, slot, params, list(prompt_ids), prompt_logprobs,
                                                constraint, cached=cached, done=cached)

    @property
    def _window(self) -> int:
        """Prompt tokens a prefill must compute itself: the drafter's window (at least the last one)."""
        return window_size(self.heads)

    def _longest_prefix(self, prompt: list[int], prompt_logprobs: bool) -> tuple[int, int]:
        """The slot holding the longest prefix of the prompt whose K/V may be reused -- a free slot's
        kept tokens or a busy one's (`reusable`) -- and its length; (-1, 0) for none. A free slot wins
        a tie: nothing to copy. The prompt's last W tokens are left to compute (the drafter's window, at
        least the token the first one is sampled after), and all of it where its logprobs are asked."""
        held = {pre.slot: pre.reusable for pre in self._prefilling.values()}
        held |= {seq.slot: seq.reusable for seq in self._running.values()} | self._kept
        limit = 0 if prompt_logprobs or not self.prefix_caching else len(prompt) - self._window
        best, source = 0, -1
        for slot, tokens in held.items():
            n = _common_prefix(tokens, prompt, limit)
            if n > best or (n == best > 0 and slot in self._kept):
                best, source = n, slot
        return source, best

    def _take_slot(self, source: int) -> int:
        """A free slot: `source` where it is a free one (it holds the prefix), else one holding nothing,
        else the one unused longest."""
        if source in self._kept:
            slot = source
        else:
            empty = [s for s in self._free if s not in self._kept]
            slot = empty[-1] if empty else next(iter(self._kept))
        self._free.remove(slot)
        self._kept.pop(slot, None)
        return slot

    @torch.inference_mode()
    def prefill(self, request_id: Hashable, max_tokens: int) -> Emitted | None:
        """Put up to `max_tokens` more prompt tokens of a started request in the cache.

        Returns None while some of the prompt is left. With the last chunk, samples the first token
        and returns it; the request then runs in `step`. A chunk attends to the chunks cached before
        it, so chunking gives the same result as one whole-prompt prefill.
        """
        assert max_tokens > 0
        with self._released_on_error([request_id]):
            return self._prefill(self._prefilling[request_id], max_tokens)

    def _prefill(self, pre: _Prefill, max_tokens: int) -> Emitted | None:
        if pre.done == pre.cached:  # before the first chunk: requests admitted together share a prefix
            source, n = self._longest_prefix(pre.prompt, pre.prompt_logprobs)  # that one prefilled since
            if n > pre.done:
                self.cache.reuse(pre.slot, source, n)
                pre.cached = pre.done = n
        begin = pre.done
        if begin == pre.cached > 0:  # the drafter's window comes from this chunk, not the cached tokens
            max_tokens = max(max_tokens, self._window)
        end = min(begin + max_tokens, len(pre.prompt))
        hidden = self.device_step.prefill(pre.slot, pre.prompt[begin:end], begin)  # [n, C]
        pre.done = end
        if pre.prompt_logprobs:  # the hidden state of prompt token i scores prompt token i + 1
            targets = torch.tensor(pre.prompt[begin + 1:end + 1], device=self.device)  # [n] or [n-1]
            logp = self.model.logits(hidden[:len(targets)]).log_softmax(-1)  # [n or n-1, V]
            pre.logprobs += logp.gather(-1, targets[:, None])[:, 0].tolist()
            if pre.params.top_n:
                values, ids = logp.topk(pre.params.top_n, dim=-1)  # [n or n-1, top_n] each
                pre.top += [list(zip(i, v, strict=True))
                            for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
        if end < len(pre.prompt):
            return None

        params = pre.params
        generator = torch.Generator()
        generator.manual_seed(params.seed if params.seed is not None else random.randrange(2**63))
        lookup = NgramIndex(pre.prompt, prediction=params.prediction) if self.tree.lookup else None
        seq = _Sequence(pre.request_id, pre.slot, params, pre.prompt, generator, lookup=lookup,
                        constraint=pre.constraint, exact=len(pre.prompt))
        allowed = None if seq.constraint is None else seq.constraint.allowed()
        if params.min_tokens > 0:
            allowed = self._without_eos(allowed, params)
        token, logprob, top = self.device_step.first_token(pre.slot, hidden[-1], params, self._uniforms(seq),
                                                           allowed)
        del self._prefilling[pre.request_id]
        self._running[pre.request_id] = seq
        prefill_logprobs = pre.logprobs if pre.prompt_logprobs else None
        prefill_top = pre.top if pre.prompt_logprobs and params.top_n else None
        return self._emit(seq, [token], [logprob], prefill_logprobs=prefill_logprobs,
                          prefill_top=prefill_top, cached_tokens=pre.cached,
                          hidden=hidden[-1:] if self.keep_hidden else None,
                          top=None if top is None else [top])

    def cancel(self, request_id: Hashable) -> None:
        """Drop a running or prefilling request and free its slot (no-op for an unknown id)."""
        self._release(request_id)

    def _release(self, request_id: Hashable, keep: bool = True) -> None:
        """The one place a slot is freed: a request finished, was cancelled or failed. With keep, the
        slot keeps the K/V the prefix cache may reuse (`reusable`; a request that failed keeps none)."""
        held = self._running.pop(request_id, None) or self._prefilling.pop(request_id, None)
        if held is not None:
            self._free.append(held.slot)
            if keep and self.prefix_caching and held.reusable:
                self._kept[held.slot] = held.reusable

    @contextlib.contextmanager
    def _released_on_error(self, request_ids: Iterable[Hashable]) -> Iterator[None]:
        """Whatever a call raises, the requests it was serving do not keep their slots."""
        try:
            yield
        except BaseException:
            for request_id in request_ids:
                self._release(request_id, keep=False)
            raise

    # ---------------------------------------------------------------- one step

    @torch.inference_mode()
    def step(self) -> list[Emitted]:
        """One batched forward for every running sequence; returns what each one produced."""
        seqs = list(self._running.values())
        if not seqs:
            return []
        with self._released_on_error([s.request_id for s in seqs]):
            return self._step(seqs)

    def _step(self, seqs: list[_Sequence]) -> list[Emitted]:
        speculate = [s.params.speculate and self.heads is not None for s in seqs]
        limit = self.max_speculative_batch
        over = limit is not None and len(seqs) > limit
        if over and all(s.params.greedy for s, on in zip(seqs, speculate, strict=True) if on):
            speculate = [False] * len(seqs)  # greedy rows: the same tokens from a plain step, less work
        out: list[Emitted] = []
        rows, stepping = [], []
        for seq, on in zip(seqs, speculate, strict=True):  # a row's host work fails that row only
            try:
                rows.append(self._row(seq, on))
                stepping.append(seq)
            except Exception as e:
                out.append(self._fail(seq, f"preparing its step failed: {e}"))
        if not rows:
            return out
        results, hidden = self.device_step.run(rows, self.keep_hidden)
        invariant = self.device_step.invariant(rows)
        for b, (seq, row, result) in enumerate(zip(stepping, rows, results, strict=True)):
            if invariant and seq.exact == seq.cached:  # the K/V this step keeps extend the exact ones
                seq.exact += result.accepted_len
            try:
                out.append(self._emit(seq, result.tokens, result.logprobs, speculated=row.speculate,
                                      drafted=result.accepted_len - 1,
                                      hidden=None if hidden is None else hidden[b, :result.accepted_len],
                                      top=result.top))
            except Exception as e:
                out.append(self._fail(seq, f"emitting its tokens failed: {e}"))
        return out

    def _row(self, seq: _Sequence, speculate: bool) -> Row:
        """What a sequence brings to a step: slot, lengths, parameters, lookup guesses, uniforms; with a
        grammar, a chain of tokens it allows as the lookup guesses -- those it forces, and between them
        prompt-lookup guesses it allows -- with its masks along the chain (speculating on the chain alone:
        other nodes' masks would depend on their drafts)."""
        L = self.tree.lookup
        cached = seq.cached
        # tokens the step may emit before the one whose index is min_tokens (from which EOS is allowed)
        banned = seq.params.min_tokens - len(seq.generated)
        if seq.constraint is None:
            guess = seq.lookup.propose(L) if L else []  # up to L tokens; the step knows what to do with fewer
            if banned <= 0:
                return Row(seq.slot, cached, seq.pending, speculate, seq.params, guess, self._uniforms(seq))
            # EOS banned at every node; no draft kept whose next token would come after min_tokens
            return Row(seq.slot, cached, seq.pending, speculate, seq.params, guess, self._uniforms(seq),
                       self._without_eos(None, seq.params)[None], keep=banned - 1)
        room = seq.params.max_new_tokens - len(seq.generated) - 1  # the step's next token comes after them
        if banned > 0:  # the token after the chain too comes before min_tokens
            room = min(room, banned - 1)

        def guess(chain: list[int]) -> int | None:  # what followed the text and the chain so far
            return next(iter(seq.lookup.propose(1, after=chain)), None) if seq.lookup is not None else None

        chain, allowed = seq.constraint.chain(min(L, room) if speculate else 0, guess, CHAIN_MASKS - 1)
        if banned > 0:
            allowed = torch.stack([self._without_eos(mask, seq.params) for mask in allowed])
        return Row(seq.slot, cached, seq.pending, bool(chain), seq.params, chain, self._uniforms(seq),
                   allowed, chained=True, keep=len(chain))

    def _without_eos(self, allowed: torch.Tensor | None, params: SamplingParams) -> torch.Tensor:
        """The [W] bitmask `allowed` (None: every token) less the tokens that would end the text (EOS,
        the request's stop_token_ids), before min_tokens; unless a grammar allows nothing else there (it
        is done): then it ends the text, as banning EOS had let tokens it refuses through."""
        V = self.model.config.vocab_size
        ending = tuple(t for t in self.eos_token_ids | set(params.stop_token_ids) if t < V)
        banned = without(allowed, ending, V)
        return banned if allowed is None or bool(banned.any()) else allowed

    def _uniforms(self, seq: _Sequence) -> torch.Tensor:
        """[U] uniforms for one step of a sampled request, from its generator: the same number every
        step, so a seeded request's tokens do not depend on its batch (greedy: unused)."""
        if seq.params.greedy:
            return torch.zeros(self.device_step.num_uniforms, dtype=torch.float64)
        return torch.rand(self.device_step.num_uniforms, generator=seq.generator, dtype=torch.float64)

    def _fail(self, seq: _Sequence, error: str) -> Emitted:
        self._release(seq.request_id, keep=False)
        return Emitted(seq.request_id, [], [], None, error=error)

    # ---------------------------------------------------------------- finishing

    def _emit(self, seq: _Sequence, tokens: list[int], logprobs: list[float], *, speculated: bool = False,
              drafted: int = 0, prefill_logprobs: list[float | None] | None = None,
              prefill_top: list[list[tuple[int, float]] | None] | None = None,
              hidden: torch.Tensor | None = None, top: list[list[tuple[int, float]]] | None = None,
              cached_tokens: int = 0) -> Emitted:
        """Append tokens one by one; stop exactly at EOS, a stop sequence or max_new_tokens.

        tokens: `drafted` accepted drafts, then the token sampled after them; a stop inside the drafts
        leaves the rest unemitted, and only emitted drafts count as accepted.
        """
        reason = None
        kept = 0
        for token in tokens:
            seq.generated.append(token)
            kept += 1
            reason = self._finish_reason(seq, token)
            if reason:
                break
        if seq.lookup is not None:
            seq.lookup.extend(tokens[:kept])
        if seq.constraint is not None:
            seq.constraint.consume(tokens[:kept])
        if reason:
            self._release(seq.request_id)
        return Emitted(seq.request_id, tokens[:kept], logprobs[:kept], reason, speculated=speculated,
                       accepted=min(drafted, kept), prefill_logprobs=prefill_logprobs,
                       prefill_top_tokens=prefill_top,
                       hidden=hidden, top_tokens=None if top is None else top[:kept],
                       cached_tokens=cached_tokens)

    def _finish_reason(self, seq: _Sequence, token: int) -> str | None:
        params = seq.params
        if (token in self.eos_token_ids and not params.ignore_eos) or token in params.stop_token_ids:
            return "eos_token"
        if params.stop:  # only the tail can hold a stop string that ends at this token
            # a stop string of L characters spans at most L tokens, and up to 3 more hold the rest of a
            # multi-byte character cut at the start of the tail
            tail = max(map(len, params.stop)) + 4
            text = self.tokenizer.decode(seq.generated[-tail:])
            if any(stop in text for stop in params.stop):
                return "stop_sequence"
        if len(seq.generated) >= params.max_new_tokens:
            return "length"
        return None

    # ---------------------------------------------------------------- convenience

    def run(self, requests: Iterable[tuple[Hashable, list[int], SamplingParams]]) -> Iterator[Emitted]:
        """Run (request_id, prompt, params) to completion, admitted in order as slots free up;
        yields every Emitted as it comes. The driver loop of the offline callers (generate,
        distillation, the benchmarks); the server's scheduler interleaves chunked prefills instead."""
        waiting = iter(requests)
        pending = next(waiting, None)
        while pending is not None or self._running:
            while pending is not None and self._free:
                yield self.add(*pending)
                pending = next(waiting, None)
            yield from self.step()

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
                 ) -> list[list[int]]:
        """Run prompts to completion, batched as slots allow; returns each prompt's generated tokens."""
        all_params = params if isinstance(params, list) else [params] * len(prompts)
        results: list[list[int]] = [[] for _ in prompts]
        for e in self.run(zip(range(len(prompts)), prompts, all_params, strict=True)):
            results[e.request_id] += e.token_ids
        return results
