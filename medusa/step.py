"""The device side of the engine: the KV cache, per-slot state, and the step as one function.

`DeviceStep.run` takes one host table of B rows (one per running sequence, `Row` below: its slot,
pending token, whether it speculates, sampling parameters, prompt-lookup guesses, uniforms drawn
from its generator), uploads it in one non-blocking copy, runs the whole step on the device --
heads -> drafts -> verification forward -> acceptance (greedy, typical and lossless rows in one
batch) -> KV compaction -> next pending token and hidden state -- and brings the result back in one
packed copy: the step's one host synchronisation. `_step` holds no host read, so it compiles as one
graph (`torch.compile(fullgraph=True)` fails on any); with `compile`, each batch size is padded to a
bucket (rows of the spare slot `pad_slot`, which nothing reads), so a few graphs serve every batch,
captured as CUDA graphs on a GPU.

The state a step reads and writes lives here, one tensor per fact, indexed by slot: the cache and
its lengths, the drafter's input -- `features` and `window_tokens`, the final hidden states and
tokens of each sequence's last W cached positions (W = 1 for Medusa heads, which read the last
hidden state; the EAGLE layer's window) -- `in_prompt` and `counts` (the tokens of each sequence's
prompt, and how often each is in its generated text: the penalties' view of the text, whose tokens
are those in either), `counts` kept up to date only for sequences with a penalty (a penalised row
makes each step it is in keep it) -- and each sequence's logit bias (`bias_tokens`, `bias_values`),
both set when its slot is taken. The engine owns which
request holds which slot; this class does not know requests.

Legend: B rows, T tree nodes, P = tree depth + 1, C hidden size, V vocabulary, N slots, W window,
U uniforms per row (= T of the engine's tree), L lookup-branch nodes.
"""

from __future__ import annotations

import functools
import itertools
import logging
from dataclasses import dataclass, replace

import torch

from medusa import acceptance
from medusa.draft import Drafter, draft, draft_dynamic, window_size
from medusa.dynamic import DynamicTree, RowTrees
from medusa.tree import TreeBuffers, build_tree
from runtime import grammar, sampling
from runtime.config import MAX_LOGIT_BIAS, MAX_TOP_N, SamplingParams
from runtime.llama import Llama
from runtime.sampling import MODES, ROW_PARAMS_WIDTH, LogitBias, Needs, RowParams, Text

log = logging.getLogger(__name__)

ROOT_ONLY = build_tree([])
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# A row's explicit bitmasks in a step's table with needs.mask: the mask after its lookup chain and at up
# to CHAIN_MASKS - 1 guesses on it (`Engine._row`); a depth whose token the grammar forces takes the
# one-hot of that token, built on the device. Every row of a compiled sampled step carries them, so
# they are few: a mask at each depth of the GPU tree's chain (17) took 64 rows 3.7 ms to build on the
# host, against 0.14 ms for one (AMD EPYC, Zen 4).
CHAIN_MASKS = 4
ALL = Needs(sample=True, filter=True, penalise=True, typical=True, typical_acceptance=True, top_n=True,
            bias=True, mask=True)


@dataclass(frozen=True)
class Row:
    """What one sequence brings to a step, from the host."""

    slot: int
    cached: int  # tokens in the slot's cache
    pending: int  # the token sampled last, not yet in the cache: the tree's root
    speculate: bool  # verify a tree of drafts (else the root alone)
    params: SamplingParams
    lookup: list[int]  # prompt-lookup guesses for the lookup branch (up to L of them)
    uniforms: torch.Tensor  # [U] float64 in [0, 1), from the request's generator
    # with a grammar (or EOS banned, min_tokens): the bitmasks of the tokens allowed at each depth of the
    # lookup chain ([n + 1, W] int32: before each of the n lookup guesses, then after them; a deeper node
    # takes the last), whether the masks hold along that chain alone (a grammar's: its drafts count only
    # as far as they are the chain's tokens), and how many drafts the row may keep (-1: any): a grammar's
    # row none past its chain, a row banning EOS none whose next token would come after min_tokens
    allowed: torch.Tensor | None = None
    chained: bool = False
    keep: int = -1


@dataclass(frozen=True)
class StepResult:
    """One row's result, on the host."""

    accepted_len: int  # tree nodes kept, root included (>= 1)
    tokens: list[int]  # accepted drafts, then the next pending token (accepted_len tokens)
    logprobs: list[float]  # of each token, under the request's processed distribution
    top: list[list[tuple[int, float]]] | None = None  # with params.top_n: each token's most likely tokens


def most_likely(target: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """The MAX_TOP_N most likely tokens of each of P distributions, as the step packs them:
    target [B, P, V] (processed logits), lse [B, P] (their logsumexp) -> [B, P * 2K] float64, each
    position's K token ids then their K logprobs, most likely first."""
    values, ids = target.topk(MAX_TOP_N, dim=-1)  # [B, P, K] each
    return torch.cat([ids.double(), (values - lse[..., None]).double()], dim=-1).flatten(1)


def top_of(packed: list[float], n: int, top_n: int) -> list[list[tuple[int, float]]]:
    """The first n positions' top_n (token id, logprob) pairs, from `most_likely`'s row on the host."""
    K = MAX_TOP_N
    return [[(int(packed[2 * K * p + k]), packed[2 * K * p + K + k]) for k in range(top_n)] for p in range(n)]


def chain_masks(masks: torch.Tensor, chain: list[int], L: int, vocab_size: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """A row's bitmasks at the depths of its lookup chain (masks [n + 1, W], `Row.allowed`) as a step's
    table holds them: [L + 1] the mask at each depth 0..L, -1 where it is the one-hot of the chain's token
    there (`grammar.only`), else an index into [CHAIN_MASKS, W] (a deeper node takes depth n's)."""
    codes, explicit = [], []
    for depth, mask in enumerate(masks):
        if depth < len(chain) and torch.equal(mask, grammar.only(chain[depth], vocab_size)):
            codes.append(-1)
        else:
            codes.append(len(explicit))
            explicit.append(mask)
    assert len(explicit) <= CHAIN_MASKS, "a chain with more guesses than a step's table holds masks for"
    codes += codes[-1:] * (L + 1 - len(codes))
    return torch.tensor(codes[:L + 1]), torch.stack(explicit + explicit[-1:] * (CHAIN_MASKS - len(explicit)))


def _batch_bucket(n: int) -> int:
    """The padded batch size of n rows: the smallest bucket that holds them (n past the last)."""
    return next((b for b in BATCH_BUCKETS if b >= n), n)


class DeviceStep:
    def __init__(self, model: Llama, heads: Drafter | None, tree: TreeBuffers | DynamicTree, num_slots: int,
                 max_len: int, compile: bool = False) -> None:
        """num_slots: sequences the cache holds (one more, `pad_slot`, takes padding rows);
        max_len: cached tokens per slot, scratch included."""
        self.model, self.heads = model, heads
        device = model.embed.weight.device
        self.device = device
        self.tree = tree.to(device)  # moved once, not per step
        self.root_only = ROOT_ONLY.to(device)
        self._chain_trees: dict[int, TreeBuffers] = {}  # `_chain_tree`
        self.cache = model.new_cache(num_slots + 1, max_len)
        self.pad_slot = num_slots
        C, V = model.config.hidden_size, model.config.vocab_size
        W = window_size(heads)
        dtype = model.embed.weight.dtype
        # the drafter's window, kept only where a drafter reads it (without one: ~0.1 ms of ops a step)
        self.keeps_window = heads is not None
        self.features = torch.zeros(num_slots + 1, W, C, dtype=dtype, device=device)  # [N+1, W, C]
        self.window_tokens = torch.zeros(num_slots + 1, W, dtype=torch.long, device=device)  # [N+1, W]
        self.in_prompt = torch.zeros(num_slots + 1, V, dtype=torch.bool, device=device)  # [N+1, V]
        # [N+1, V+1]; column V takes the writes of tokens past a row's accepted ones
        self.counts = torch.zeros(num_slots + 1, V + 1, dtype=torch.float32, device=device)
        # [N+1, K] each: a slot's logit bias as (token, bias) pairs, (0, 0.0) past its last
        self.bias_tokens = torch.zeros(num_slots + 1, MAX_LOGIT_BIAS, dtype=torch.long, device=device)
        self.bias_values = torch.zeros(num_slots + 1, MAX_LOGIT_BIAS, dtype=torch.float32, device=device)
        self.compile = compile
        self._fn = self._step
        if compile:
            # the state a step writes keeps its address: CUDA graphs replay on it instead of
            # skipping graphs with mutated inputs
            for t in (*self.cache.k, *self.cache.v, self.cache.lens, self.features, self.window_tokens,
                      self.in_prompt, self.counts, self.bias_tokens, self.bias_values):
                torch._dynamo.mark_static_address(t)
            if device.type == "cuda":
                self._fn = torch.compile(self._step, fullgraph=True, mode="reduce-overhead")  # CUDA graphs
            else:
                # A C++ wrapper calls the graph's kernels and our product kernel (runtime.cpu_kernels)
                # one after another, no Python between them. SmolLM2 bf16, Intel Xeon with AMX (2
                # cores), 8 dev prompts, engines taking turns: plain decoding 48.7 tok/s with Python's
                # wrapper, 69.1 with C++ (warm-up 111 -> 145 s); Medusa (`cpu-bf16`) 70.9 -> 74.1, but
                # its bigger graph took 254 -> 670 s to build, so drafting steps keep Python's.
                self._fn = torch.compile(self._step, fullgraph=True, options={"cpp_wrapper": heads is None})
        if compile and heads is not None:  # the heads cache their projection here, not inside a graph
            heads.project(torch.zeros(1, 1, C, dtype=self.features.dtype, device=device), model.lm_head)

    @property
    def num_uniforms(self) -> int:
        return self.tree.num_nodes

    # ---------------------------------------------------------------- prefill (eager)

    def start(self, slot: int, prompt: list[int], logit_bias: tuple[tuple[int, float], ...] = (),
              source: int = -1, cached: int = 0) -> None:
        """Empty a slot for a new prompt, with its logit bias; with `cached`, the slot starts from the
        K/V of that many leading tokens of slot `source` (the prompt's, which the caller matched)."""
        self.cache.free(slot)
        if cached:
            self.cache.reuse(slot, source, cached)
        self.in_prompt[slot] = False
        self.in_prompt[slot, torch.tensor(prompt, device=self.device)] = True
        self.counts[slot] = 0
        pairs = torch.tensor(logit_bias, dtype=torch.float64).view(-1, 2)  # [n, 2]; ids exact in float64
        self.bias_tokens[slot], self.bias_values[slot] = 0, 0.0
        self.bias_tokens[slot, :len(pairs)] = pairs[:, 0].long().to(self.device)
        self.bias_values[slot, :len(pairs)] = pairs[:, 1].float().to(self.device)

    def prefill(self, slot: int, tokens: list[int], begin: int) -> torch.Tensor:
        """Put prompt tokens begin .. begin + n of a slot in the cache, and the last W of them with their
        hidden states in its window; their hidden states, [n, C].

        Where the model has row-invariant kernels (`Llama.invariant_rows`), the tokens go through them in
        pieces, so that a prompt's K/V do not depend on how it was chunked: the prefix cache reuses K/V
        that a prompt chunked elsewhere wrote, and the scheduler's chunks follow the load. (A 600-token
        prompt, SmolLM2 bf16, AMD EPYC Zen 4: 0.575 s in pieces of 24 against 0.538 s in one oneDNN
        forward, whose rows' bits depend on the chunk's size.)"""
        piece = self.model.invariant_rows or len(tokens)
        slots = torch.tensor([slot], device=self.device)  # [1]
        hidden = []
        for start in range(begin, begin + len(tokens), piece):
            chunk = tokens[start - begin:start - begin + piece]
            end = start + len(chunk)
            positions = torch.arange(start, end, device=self.device)[None]  # [1, n]
            hidden.append(self.model(torch.tensor([chunk], device=self.device), positions, self.cache, slots,
                                     max_len=end)[0])  # [n, C]
            self.cache.advance(slots, end - start)
        hidden = torch.cat(hidden)  # [n, C]
        if self.keeps_window:
            W = self.features.shape[1]
            self.features[slot] = torch.cat([self.features[slot], hidden])[-W:]
            self.window_tokens[slot] = torch.cat([self.window_tokens[slot], slots.new_tensor(tokens)])[-W:]
        return hidden

    def first_token(self, slot: int, hidden_last: torch.Tensor, params: SamplingParams,
                    uniforms: torch.Tensor, allowed: torch.Tensor | None = None
                    ) -> tuple[int, float, list[tuple[int, float]] | None]:
        """Sample the token after a whole prompt from its last hidden state [C]: (token, logprob, and
        with params.top_n the most likely tokens there). allowed: [W] int32, with a grammar or EOS banned."""
        rows = RowParams.of([params], self.device)
        needs = replace(Needs.of([params]), mask=allowed is not None)
        text = self._text([slot], torch.zeros(1, 1, 1, device=self.device)) if needs.penalise else None
        logits = self.model.logits(hidden_last[None, None])  # [1, 1, V]
        bias = self._bias([slot]) if needs.bias else None
        if needs.mask:
            allowed = grammar.unpack(allowed.to(self.device), self.model.config.vocab_size)[None, None]
        target = sampling.process(logits, rows, text, needs, bias, allowed)  # [1, 1, V]
        best = sampling.argmax(target[:, 0])  # [1]
        lse = sampling.logsumexp_at(target, best.new_zeros(1, 1))  # [1, 1]
        token = sampling.next_tokens(target[:, 0], best, rows, uniforms[:1].to(self.device), needs)  # [1]
        if needs.penalise:
            self.counts[slot, token] += 1
        top = top_of(most_likely(target, lse)[0].tolist(), 1, params.top_n)[0] if params.top_n else None
        return int(token), float(target[0, 0, token] - lse[0, 0]), top

    # ---------------------------------------------------------------- one step

    def run(self, rows: list[Row], keep_hidden: bool = False
            ) -> tuple[list[StepResult], torch.Tensor | None]:
        """One step for these rows: their results, and with keep_hidden the hidden states of each
        row's accepted nodes ([B, P, C], 0 past accepted_len)."""
        speculate = any(r.speculate for r in rows)
        chain = self._chain(rows)
        tree = self._chain_tree(chain) if chain else self.tree if speculate else self.root_only
        needs = replace(Needs.of([r.params for r in rows]), mask=any(r.allowed is not None for r in rows))
        B = len(rows)
        max_len = max(r.cached for r in rows) + tree.num_nodes  # keys of the longest row
        if self.compile:
            needs = ALL if needs != Needs() else needs  # two graphs per shape: greedy, and any other
            rows = rows + [self._pad_row()] * (_batch_bucket(B) - B)
            max_len = self._len_bucket(max_len)
        packed, hidden = self._call(self._table(rows, needs), speculate, needs, max_len, chain)
        host = packed[:B].cpu().tolist()  # the step's one host synchronisation
        P = tree.depth + 1
        results = []
        for row, values in zip(rows[:B], host, strict=True):
            n = int(values[0])
            top = top_of(values[1 + 2 * P:], n, row.params.top_n) if row.params.top_n else None
            results.append(StepResult(n, [int(t) for t in values[1:1 + n]], values[1 + P:1 + P + n], top))
        return results, hidden[:B].clone() if keep_hidden else None  # (a CUDA graph's output is reused)

    def invariant(self, rows: list[Row]) -> bool:
        """Whether `run` on these rows went through kernels that give each row the bits it has alone
        (`Llama.invariant_rows`): the K/V it kept are then those a prefill of the same tokens writes."""
        chain = self._chain(rows)
        T = chain + 1 if chain else self.tree.num_nodes if any(r.speculate for r in rows) else 1
        limit = self.model.invariant_rows
        return not self.compile and limit is not None and len(rows) * T <= limit

    def warm_up(self, max_batch: int, speculative: bool, eager_if_compile_fails: bool = False) -> None:
        """Run every graph `run` can use -- batch buckets up to max_batch's, any attention length,
        plain and speculative trees, greedy and sampling -- on padding rows, so that none is
        compiled while serving (no-op without compile).

        eager_if_compile_fails: where building a graph raises, log why and run the step eagerly from
        now on (`compile` turns False), instead of raising. The first GPU session met three such
        failures, in torch's code generation for a GPU that no test here can reach: a server left to
        choose (--compile auto) should serve slower rather than not at all."""
        if self.device.type == "cuda":
            self.warm_up_prefill()
        if not self.compile:
            return
        batches = sorted({_batch_bucket(b) for b in range(1, max_batch + 1)})
        # two lengths: Dynamo compiles the second one for any length
        lengths = {self._len_bucket(self.tree.num_nodes + n) for n in (1, 2)}
        try:
            for B, max_len, speculate, needs in itertools.product(batches, sorted(lengths),
                                                                  {False, speculative}, (Needs(), ALL)):
                self._call(self._table([self._pad_row()] * B, needs), speculate, needs, max_len)
        except Exception:
            if not eager_if_compile_fails:
                raise
            log.warning("building the compiled step failed; serving with the eager step instead "
                        "(--compile on makes this an error)", exc_info=True)
            self.compile, self._fn = False, self._step

    def warm_up_prefill(self) -> None:
        """Prefill chunks of 1, 2, 4, ..., 128 tokens into the padding slot, after an empty cache and
        after half of one: every tile size of the attention kernel, with and without split-KV, so
        that no Triton variant compiles while a request waits (a tile holds at most 128 rows)."""
        pad = self.pad_slot
        for begin in (0, self.cache.max_len // 2):
            for n in (1 << k for k in range(8)):
                if begin + n <= self.cache.max_len:
                    self.cache.lens[pad] = begin
                    self.prefill(pad, [0] * n, begin)
        self.cache.free(pad)

    def _chain(self, rows: list[Row]) -> int:
        """Where every row that speculates is a grammar's (eager steps), the longest of their lookup chains,
        the only drafts they keep: the step verifies those chains alone (`_chain_tree`), not the whole
        tree, whose other nodes they cannot keep; else 0."""
        speculating = [r for r in rows if r.speculate]
        if self.compile or not speculating or not all(r.chained for r in speculating):
            return 0
        return max(len(r.lookup) for r in speculating)

    def _chain_tree(self, n: int) -> TreeBuffers:
        """A root and a lookup branch of n nodes (built once for each n, up to L)."""
        if n not in self._chain_trees:
            self._chain_trees[n] = build_tree([], "chain-only", lookup=n).to(self.device)
        return self._chain_trees[n]

    def _call(self, table: torch.Tensor, speculate: bool, needs: Needs, max_len: int, chain: int = 0
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Upload a host table (one non-blocking copy) and run the step on it."""
        if self.device.type == "cuda":
            table = table.pin_memory()
        table = table.to(self.device, non_blocking=True)
        if self.compile:  # Dynamo's settings are per thread: set in the thread that steps
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            torch._dynamo.maybe_mark_dynamic(table, 0)  # one graph for every batch bucket, if it can
        return self._fn(table, speculate, needs, max_len, chain)

    def _len_bucket(self, max_len: int) -> int:
        """The attention length a compiled step runs with. On a GPU the whole cache: the kernel
        reads each sequence's own length on the device, and one CUDA graph serves every length. On
        the CPU the length itself, a symbolic size of one graph: attention there reads every key up
        to it."""
        return self.cache.max_len if self.device.type == "cuda" else max_len

    def _pad_row(self) -> Row:
        return Row(self.pad_slot, 0, 0, False, SamplingParams(), [],
                   torch.full((self.num_uniforms,), 0.5, dtype=torch.float64))

    def _table(self, rows: list[Row], needs: Needs) -> torch.Tensor:
        """[B, 3 + R + L + U (+ 3 + L + CHAIN_MASKS W)] float64 on the host: slot, pending, speculate,
        RowParams' columns, lookup guesses (-1 past a row's last), uniforms, and with needs.mask whether
        each row's masks hold along its lookup chain alone, the drafts it may keep (-1: any), which mask
        holds at each depth 0..L of the chain (-1: the one-hot of its chain token) and the masks (-1: all)
        (`chain_masks`; every integer here is exact in float64)."""
        L = self.tree.lookup
        head = torch.tensor([[r.slot, r.pending, float(r.speculate), *RowParams.columns(r.params), *r.lookup,
                              *[-1] * (L - len(r.lookup))] for r in rows], dtype=torch.float64)
        columns = [head, torch.stack([r.uniforms for r in rows])]
        if needs.mask:
            columns.append(torch.tensor([[float(r.chained), r.keep] for r in rows], dtype=torch.float64))
            columns.append(torch.stack([self._masks_of(r.allowed, r.lookup) if r.allowed is not None
                                        else self._free_masks for r in rows]))
        return torch.cat(columns, dim=1)

    def _masks_of(self, allowed: torch.Tensor, chain: list[int]) -> torch.Tensor:
        """A row's `chain_masks` (`Row.allowed`, `Row.lookup`), codes then masks, as
        [L + 1 + CHAIN_MASKS W] float64."""
        codes, masks = chain_masks(allowed, chain, self.tree.lookup, self.model.config.vocab_size)
        return torch.cat([codes, masks.flatten()]).double()

    @functools.cached_property
    def _free_masks(self) -> torch.Tensor:
        """`_masks_of` a row that allows every token: the same for all of them, so built once. Every row of
        a compiled sampled step carries masks: the table of 64 such rows (GPU tree, 49152 tokens) took
        2.0 ms to build with each row's built anew, 0.51 ms with this (AMD EPYC, Zen 4)."""
        every = torch.full((1, grammar.words(self.model.config.vocab_size)), -1, dtype=torch.int32)
        return self._masks_of(every, [])

    def _step(self, table: torch.Tensor, speculate: bool, needs: Needs, max_len: int, chain: int = 0
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """The device work of one step, without a host read. table: [B, F] (`_table`); chain: verify a
        lookup chain of that many nodes alone (`_chain`). Returns packed [B, 1 + 2P] float64
        (accepted_len, P tokens, P logprobs) and the hidden states of the accepted nodes [B, P, C]."""
        tree = self._chain_tree(chain) if chain else self.tree if speculate else self.root_only
        R, L = ROW_PARAMS_WIDTH, self.tree.lookup
        slots, roots, speculates = table[:, 0].long(), table[:, 1].long(), table[:, 2] > 0  # [B] each
        rows = RowParams.from_columns(table[:, 3:3 + R])
        U, V = self.num_uniforms, self.model.config.vocab_size
        lookup = table[:, 3 + R:3 + R + L].long()  # [B, L] (-1: none)
        uniforms = table[:, 3 + R + L:3 + R + L + U]  # [B, U]
        if needs.mask:  # [B], [B] (-1: any), [B, L + 1] (-1: one-hot), [B, CHAIN_MASKS, V]
            chained, keep = table[:, 3 + R + L + U] > 0, table[:, 4 + R + L + U].long()
            codes = table[:, 5 + R + L + U:6 + R + 2 * L + U].long()
            masks = grammar.unpack(table[:, 6 + R + 2 * L + U:].int().view(len(table), CHAIN_MASKS, -1), V)
        B, T = slots.shape[0], tree.num_nodes

        mask = None
        candidates = roots[:, None]  # [B, 1]
        if T > 1:
            drafter_input = (self.heads, self.model, self.features[slots], self.window_tokens[slots],
                             self.cache.lens[slots], roots)
            if isinstance(tree, DynamicTree):  # each row grows its own tree, its lookup guesses first
                candidates, tree = draft_dynamic(*drafter_input, lookup, tree)  # [B, T], RowTrees
                T = candidates.shape[1]  # fewer than the tree's nodes where its min_p leaves out some
                uniforms = uniforms[:, :T]
            else:  # a fixed lookup branch; a missing guess holds the root (a valid, wasted draft)
                candidates = draft(*drafter_input, tree)  # [B, T]
                if tree.lookup:
                    guesses = torch.where(lookup >= 0, lookup, roots[:, None])[:, :tree.lookup]
                    candidates = torch.cat([candidates[:, :T - tree.lookup], guesses], dim=1)
            mask = tree.mask  # [T, T], or [B, T, T] for a dynamic tree
        positions = self.cache.lens[slots][:, None] + tree.depths  # [B, T]
        hidden = self.model(candidates, positions, self.cache, slots, mask, max_len)  # [B, T, C]
        text = self._text_at_nodes(slots, candidates, tree) if needs.penalise else None
        bias = self._bias(slots) if needs.bias else None
        allowed = self._allowed_at_nodes(lookup, codes, masks, tree, B) if needs.mask else None
        target = sampling.process(self.model.logits(hidden), rows, text, needs, bias, allowed)  # [B, T, V]
        best = sampling.argmax(target)  # [B, T]: the argmax after each node

        accepted_len = torch.ones_like(slots)  # [B]
        path = torch.zeros(B, tree.depth + 1, dtype=torch.long, device=slots.device)  # [B, P]
        # [B]: plain rows' next token
        next_token = sampling.next_tokens(target[:, 0], best[:, 0], rows, uniforms[:, 0], needs)
        if T > 1:
            decision = acceptance.accept_greedy(candidates, best, tree)
            if needs.sample:
                probs = sampling.probabilities(target)  # [B, T, V]
                rules = {"lossless": lambda: acceptance.accept_lossless(candidates, probs, tree, uniforms)}
                if needs.typical_acceptance:  # its entropies over [B, T, V]: 0.7 ms a step of 8 on the CPU
                    rules["typical"] = lambda: acceptance.accept_typical(
                        candidates, probs, tree, rows.typical_epsilon, rows.typical_delta, uniforms)
                for mode, rule in rules.items():
                    chosen = rows.mode == MODES.index(mode)
                    decision = tuple(torch.where(chosen.view(-1, *[1] * (d.dim() - 1)), r, d)
                                     for r, d in zip(rule(), decision, strict=True))
            accepted_len = torch.where(speculates, decision[0], accepted_len)
            path = torch.where(speculates[:, None], decision[1], path)
            next_token = torch.where(speculates, decision[2], next_token)

        P = path.shape[1]
        if needs.mask and T > 1:
            # a row keeps at most `keep` drafts, and a grammar's only those that are its chain's tokens (its
            # masks are the grammar's along the chain alone): the node accepted after them is its next
            # token there, drawn or chosen as the next token would be (lossless: the token after a node,
            # accepted child or residual draw, follows the node's target)
            m = min(P - 1, L)
            drafted = candidates.gather(1, path[:, 1:1 + m])  # [B, m]: the accepted drafts' tokens, and more
            on_chain = (drafted == lookup[:, :m]).long().cumprod(1).sum(1)  # [B]: how many follow the chain
            keep = torch.where(chained, torch.minimum(keep, on_chain), keep)
            over = (keep >= 0) & (accepted_len > keep + 1)  # [B]
            after_kept = path.gather(1, (keep + 1).clamp(0, P - 1)[:, None])  # [B, 1]: a node
            next_token = torch.where(over, candidates.gather(1, after_kept)[:, 0], next_token)
            accepted_len = torch.where(over, keep + 1, accepted_len)
            path = torch.where(torch.arange(P, device=slots.device) < accepted_len[:, None], path, 0)
        on_path = torch.arange(P, device=slots.device) < accepted_len[:, None]  # [B, P]
        tokens = torch.cat([candidates.gather(1, path[:, 1:]), path[:, :1]], dim=1)  # [B, P]
        tokens = tokens.scatter(1, (accepted_len - 1)[:, None], next_token[:, None])  # then the next token
        logit = target.reshape(B, T * V).gather(1, path * V + tokens)  # [B, P]: each token's, at its node
        lse = sampling.logsumexp_at(target, path)  # [B, P]: the logsumexp at each kept node
        logprobs = logit - lse  # [B, P]
        top = most_likely(target.gather(1, path[..., None].expand(B, P, V)), lse) \
            if needs.top_n else None  # [B, P * 2K]

        # keep the accepted nodes: K/V, their hidden states and tokens in the window; the emitted tokens
        # count as generated
        kept = torch.where(slots == self.pad_slot, 0, accepted_len)  # padding rows keep nothing
        if T > 1:
            self.cache.commit(slots, path, kept)
        else:
            self.cache.advance(slots, kept)
        C = hidden.shape[-1]
        path_hidden = hidden.gather(1, path[..., None].expand(B, P, C))  # [B, P, C]
        if self.keeps_window:
            W = self.features.shape[1]
            shift = kept[:, None] + torch.arange(W, device=slots.device)  # [B, W]: the window after `kept`
            self.features[slots] = torch.cat([self.features[slots], path_hidden], 1).gather(
                1, shift[..., None].expand(B, W, C))
            path_tokens = candidates.gather(1, path)  # [B, P]: root first
            tokens_then = torch.cat([self.window_tokens[slots], path_tokens], 1)  # [B, W + P]
            self.window_tokens[slots] = tokens_then.gather(1, shift)
        if needs.penalise:  # only what a penalty reads: every batch with a penalised row keeps it
            emitted = torch.where(on_path, tokens, V)  # [B, P]: a token, or the spare column
            self.counts.index_put_((slots[:, None].expand(B, P), emitted), self.counts.new_ones(B, P),
                                   accumulate=True)  # a token emitted twice in a step counts twice

        packed = torch.cat([accepted_len[:, None].double(), tokens.double(), logprobs.double(),
                            *([top] if top is not None else [])], dim=1)
        return packed, torch.where(on_path[..., None], path_hidden, 0)

    def _allowed_at_nodes(self, lookup: torch.Tensor, codes: torch.Tensor, masks: torch.Tensor,
                          tree: TreeBuffers | RowTrees, B: int) -> torch.Tensor:
        """[B, T, V] bool: what each node's grammar allows after it: the mask at its depth of its row's
        lookup chain (`chain_masks`: codes [B, L + 1], -1 where it is the one-hot of the chain token at
        that depth, else an index into masks [B, CHAIN_MASKS, V]). A row without a grammar allows
        everything at every depth; one banning EOS, all else. In a grammar's row these are the grammar's
        own masks for the nodes whose tokens are the chain's, the only drafts it keeps (`_step`)."""
        V, L = masks.shape[2], lookup.shape[1]
        chain = torch.cat([lookup, lookup.new_full((B, 1), -1)], dim=1)  # [B, L + 1]: the token after depth d
        one_hot = torch.arange(V, device=masks.device) == chain[..., None]  # [B, L + 1, V]
        at_depth = torch.where(codes[..., None] < 0, one_hot,
                               masks.gather(1, codes.clamp(min=0)[..., None].expand(B, L + 1, V)))
        depths = tree.depths.expand(B, -1).clamp(max=L)  # [B, T]
        return at_depth.gather(1, depths[..., None].expand(*depths.shape, V))

    def _bias(self, slots: torch.Tensor | list[int]) -> LogitBias:
        return LogitBias(self.bias_tokens[slots], self.bias_values[slots])  # [B, K] each

    def _text_at_nodes(self, slots: torch.Tensor, candidates: torch.Tensor, tree: TreeBuffers | RowTrees
                       ) -> Text:
        """What each tree node's text holds ([B, T, V] each): its sequence's tokens (prompt, generated,
        pending) and the drafts on its path, the node's own included."""
        B, T = candidates.shape
        V = self.in_prompt.shape[1]
        ancestors = tree.mask.clone()  # [T, T] or [B, T, T]
        ancestors[..., 0] = False  # the root is the pending token, already in `counts`
        drafts = torch.where(ancestors, candidates[:, None, :], V)  # [B, T, T]: token or the spare column
        on_path = torch.zeros(B, T, V + 1, device=slots.device).scatter_add_(
            2, drafts, torch.ones(B, T, T, device=slots.device))  # [B, T, V + 1]: a draft's count on the path
        return self._text(slots, on_path)

    def _text(self, slots: torch.Tensor | list[int], drafted: torch.Tensor) -> Text:
        """The text of each of B rows' N positions, [B, N, V] each: the slot's prompt and generated
        tokens, with `drafted` ([B, N, V + 1] counts, or broadcastable) more."""
        V = self.in_prompt.shape[1]
        counts = (self.counts[slots][:, None] + drafted)[..., :V]
        return Text(seen=self.in_prompt[slots][:, None] | (counts > 0), counts=counts)
