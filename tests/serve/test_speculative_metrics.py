"""/metrics with speculative decoding: tokens drafted and accepted, and the acceptance rate."""

from __future__ import annotations

import types

from prometheus_client import generate_latest

from qwen3moe_jax.runtime.speculative import SpeculativeConfig, Speculator
from qwen3moe_jax.serve.metrics import Metrics


def _scrape(metrics: Metrics) -> dict[str, float]:
    lines = generate_latest(metrics.registry).decode().splitlines()
    return {line.split()[0]: float(line.split()[1]) for line in lines if line and not line.startswith("#")}


class _Row:
    """A request, as the speculator keys its rows."""


def test_metrics_count_drafted_and_accepted_tokens_and_their_rate():
    speculator = Speculator(SpeculativeConfig())
    scheduler = types.SimpleNamespace(running=0, queued=0, speculator=speculator)
    metrics = Metrics(scheduler)
    assert _scrape(metrics)["qwen3moe_speculative_acceptance_rate"] == 0.0
    row = _Row()
    speculator.record(row, drafted=7, accepted=5)
    speculator.record(row, drafted=3, accepted=0)
    got = _scrape(metrics)
    assert got["qwen3moe_speculative_draft_tokens_total"] == 10
    assert got["qwen3moe_speculative_accepted_tokens_total"] == 5
    assert got["qwen3moe_speculative_acceptance_rate"] == 0.5
    # Without speculation there are no such metrics.
    plain = Metrics(types.SimpleNamespace(running=0, queued=0, speculator=None))
    assert not any(name.startswith("qwen3moe_speculative") for name in _scrape(plain))
