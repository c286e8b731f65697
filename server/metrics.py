"""Prometheus metrics of one server (`GET /metrics`), in a registry of its own.

Each app has its own `Metrics`, so several apps in one process (the tests) never share counts.
Names follow vLLM's and TGI's, prefixed `medusa_`. Speculation terms, as vLLM uses them:

- a *draft* is one speculative step of one sequence: a tree of guesses verified by one forward;
- *draft tokens* are the guesses verified (the tree's nodes after the root, per draft);
- *accepted tokens* are the guesses kept; a draft that keeps `a` of them accepted positions 1..a
  (position k is the k-th token of the accepted path: head k's guess);
- mean accepted length = 1 + accepted tokens / drafts: tokens gained per step of a sequence.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

FINISH_REASONS = ("length", "eos_token", "stop_sequence")
# the error_type of the response, plus 'cancelled' for a client that went away
FAILURE_REASONS = ("validation", "overloaded", "generation", "timeout", "unhealthy", "cancelled")

REQUEST_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
TOKEN_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("medusa_requests", "Generation requests received", registry=r)
        self.successes = Counter("medusa_request_success", "Requests finished, by finish reason",
                                 ["finish_reason"], registry=r)
        self.failures = Counter("medusa_request_failure", "Requests failed, by reason", ["reason"],
                                registry=r)
        for reason in FINISH_REASONS:
            self.successes.labels(reason)
        for reason in FAILURE_REASONS:
            self.failures.labels(reason)
        self.prompt_tokens = Counter("medusa_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.prompt_tokens_cached = Counter(
            "medusa_prompt_tokens_cached", "Prompt tokens whose K/V the prefix cache held (of "
            "medusa_prompt_tokens, not prefilled again)", registry=r)
        self.generation_tokens = Counter("medusa_generation_tokens", "Tokens generated", registry=r)

        self.queue_time = Histogram("medusa_request_queue_time_seconds", "Time from arrival to a KV slot",
                                    buckets=REQUEST_SECONDS, registry=r)
        self.time_to_first_token = Histogram("medusa_time_to_first_token_seconds",
                                             "Time from arrival to the first generated token",
                                             buckets=REQUEST_SECONDS, registry=r)
        self.inter_token_latency = Histogram(
            "medusa_inter_token_latency_seconds", "Time per generated token after the first: the time "
            "since the request's previous tokens, shared among the tokens a step accepted",
            buckets=TOKEN_SECONDS, registry=r)
        self.e2e_latency = Histogram("medusa_e2e_request_latency_seconds",
                                     "Time from arrival to the last token of a finished request",
                                     buckets=REQUEST_SECONDS, registry=r)

        self.running = Gauge("medusa_num_requests_running", "Requests holding a KV slot (prefilling or "
                             "decoding)", registry=r)
        self.waiting = Gauge("medusa_num_requests_waiting", "Requests queued for a KV slot", registry=r)
        self.kv_slots_used = Gauge("medusa_kv_cache_slots_used", "KV-cache slots in use", registry=r)
        self.kv_slots = Gauge("medusa_kv_cache_slots", "KV-cache slots (the max batch size)", registry=r)
        self.batch_size = Histogram("medusa_batch_size", "Sequences in each engine step (its count: steps)",
                                    buckets=BATCH_SIZES, registry=r)

        self.drafts = Counter("medusa_spec_decode_num_drafts", "Speculative steps, counted per sequence",
                              registry=r)
        self.draft_tokens = Counter("medusa_spec_decode_num_draft_tokens",
                                    "Draft tokens verified: tree nodes after the root, per draft", registry=r)
        self.accepted_tokens = Counter("medusa_spec_decode_num_accepted_tokens", "Draft tokens accepted",
                                       registry=r)
        self.accepted_per_position = Counter(
            "medusa_spec_decode_num_accepted_tokens_per_pos",
            "Draft tokens accepted at each position of the accepted path (1: the first head's guess)",
            ["position"], registry=r)
        self.mean_accepted_length = Gauge("medusa_spec_decode_mean_accepted_length",
                                          "1 + accepted tokens / drafts, since the server started",
                                          registry=r)
        self.mean_accepted_length.set(1.0)
        self._drafts_seen = 0
        self._accepted_seen = 0

    def watch(self, *, running: Callable[[], float], waiting: Callable[[], float],
              kv_slots_used: Callable[[], float], kv_slots: int, head_positions: int) -> None:
        """Read the gauges from the scheduler at each scrape; list the speculation positions."""
        self.running.set_function(running)
        self.waiting.set_function(waiting)
        self.kv_slots_used.set_function(kv_slots_used)
        self.kv_slots.set(kv_slots)
        for position in range(1, head_positions + 1):
            self.accepted_per_position.labels(str(position))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    # ---------------------------------------------------------------- one request

    def failed(self, reason: str) -> None:
        self.failures.labels(reason).inc()

    def admitted(self, queue_seconds: float, prompt_tokens: int) -> None:
        self.queue_time.observe(queue_seconds)
        self.prompt_tokens.inc(prompt_tokens)

    def first_token(self, seconds_since_arrival: float, cached_tokens: int = 0) -> None:
        self.time_to_first_token.observe(seconds_since_arrival)
        self.prompt_tokens_cached.inc(cached_tokens)
        self.generation_tokens.inc()

    def next_tokens(self, seconds_since_previous: float, count: int) -> None:
        for _ in range(count):
            self.inter_token_latency.observe(seconds_since_previous / count)
        self.generation_tokens.inc(count)

    def finished(self, finish_reason: str, seconds_since_arrival: float) -> None:
        self.successes.labels(finish_reason).inc()
        self.e2e_latency.observe(seconds_since_arrival)

    # ---------------------------------------------------------------- one engine step

    def step(self, batch_size: int, accepted: list[int], draft_tokens_per_draft: int) -> None:
        """`accepted`: draft tokens accepted by each sequence of the step that speculated."""
        self.batch_size.observe(batch_size)
        if not accepted:
            return
        self.drafts.inc(len(accepted))
        self.draft_tokens.inc(len(accepted) * draft_tokens_per_draft)
        self.accepted_tokens.inc(sum(accepted))
        for count in accepted:
            for position in range(1, count + 1):
                self.accepted_per_position.labels(str(position)).inc()
        self._drafts_seen += len(accepted)
        self._accepted_seen += sum(accepted)
        self.mean_accepted_length.set(1.0 + self._accepted_seen / self._drafts_seen)
