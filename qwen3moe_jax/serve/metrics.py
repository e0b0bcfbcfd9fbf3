"""The server's Prometheus metrics (/metrics): requests running and waiting, tokens (prompt tokens computed and
taken from the prefix cache), how requests ended, time to first token and between tokens, and with speculative
decoding the tokens drafted and accepted."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from qwen3moe_jax.runtime.generation import Event
from qwen3moe_jax.runtime.scheduler import Emit, Scheduler
from qwen3moe_jax.serve.jobs import Job


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (one per app)."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.registry = CollectorRegistry()
        running = Gauge("qwen3moe_requests_running", "Requests holding a KV-cache row", registry=self.registry)
        running.set_function(lambda: scheduler.running)
        waiting = Gauge("qwen3moe_requests_waiting", "Requests waiting for a row", registry=self.registry)
        waiting.set_function(lambda: scheduler.queued)
        self.generated = Counter("qwen3moe_generated_tokens", "Tokens generated", registry=self.registry)
        self.prompt = Counter("qwen3moe_prompt_tokens", "Prompt tokens of the requests that started",
                              registry=self.registry)
        self.computed = Counter("qwen3moe_prompt_tokens_computed", "Prompt tokens prefilled", registry=self.registry)
        self.cached = Counter("qwen3moe_prompt_tokens_cached", "Prompt tokens whose KV the prefix cache held",
                              registry=self.registry)
        self.finished = Counter("qwen3moe_requests_finished", "Requests ended, by how they ended", ["reason"],
                                registry=self.registry)
        self.ttft = Histogram("qwen3moe_time_to_first_token_seconds", "From a request's arrival to its first token",
                              buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60), registry=self.registry)
        self.itl = Histogram("qwen3moe_inter_token_latency_seconds", "Between a request's consecutive tokens",
                             buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5), registry=self.registry)
        if scheduler.speculator is not None:
            self.registry.register(SpeculationCollector(scheduler))

    def watch(self, job: Job) -> Emit:
        """The emitter of job's request: passes its events on and records them."""
        arrived, last, reason = time.perf_counter(), None, None

        def emit(item: Any) -> None:
            nonlocal last, reason
            if isinstance(item, Exception):
                reason = "error"
            elif item is None:  # the request is over: a request that ended without a last event was cancelled
                self.finished.labels(reason or "cancelled").inc()
            elif isinstance(item, Event):
                reason = item.finish_reason
                now = time.perf_counter()
                if last is None:
                    self.prompt.inc(len(job.request.prompt))
                    self.computed.inc(len(job.request.prompt) - job.request.cached)
                    self.cached.inc(job.request.cached)
                    self.ttft.observe(now - arrived)
                else:
                    self.itl.observe(now - last)
                last = now
                if item.token_id is not None:  # None: the one event of a request that generates nothing
                    self.generated.inc()
            job.put(item)

        return emit


class SpeculationCollector:
    """The speculator's counts, read at each scrape: tokens drafted, drafted tokens accepted, and their ratio."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.speculator = scheduler.speculator

    def collect(self) -> Any:
        drafted, accepted = self.speculator.drafted_tokens, self.speculator.accepted_tokens
        yield CounterMetricFamily("qwen3moe_speculative_draft_tokens", "Tokens drafted and verified", value=drafted)
        yield CounterMetricFamily("qwen3moe_speculative_accepted_tokens", "Drafted tokens the target model kept",
                                  value=accepted)
        yield GaugeMetricFamily("qwen3moe_speculative_acceptance_rate", "Accepted over drafted tokens, since start "
                                "(0 before any draft)", value=accepted / drafted if drafted else 0.0)
