"""`bench` warms up exactly what its timed runs use: at default settings (prompt lengths, decode tokens, batch
sizes) nothing compiles after warm-up, for the KV cache length of every preset and of the bundled model."""

from __future__ import annotations

import pytest

import qwen3moe_jax as qj
from qwen3moe_jax.api import DEFAULT_MAX_SEQ_LEN
from qwen3moe_jax.model.config import preset, preset_names
from qwen3moe_jax.tools.bench import run_bench

# What decides which shapes compile is the cache length (prompt buckets that fit, attention windows the decode
# crosses), not the layer widths: each preset's default cache length, on one layer of the tiny shape.
CACHE_LENGTHS = sorted({min(preset(name).max_position_embeddings, DEFAULT_MAX_SEQ_LEN) for name in preset_names()}
                       | {qj.load(progress=False).max_seq_len})


@pytest.mark.parametrize("cache_len", CACHE_LENGTHS)
def test_no_recompilation_after_warm_up_at_default_settings(cache_len):
    model = qj.random_model(qj.preset("tiny").replace(num_layers=1), max_seq_len=cache_len, std=0.2)
    result = run_bench(model, "tiny", repeats=1)  # the default prompt lengths, decode tokens and batch sizes
    # The default decode (256 tokens after a 128-token prompt) crosses from the 256-slot window into the 512 one
    # wherever the cache allows it: the case the warm-up used to miss.
    assert result.decode_tokens == min(256, cache_len - 128)
    assert result.recompilations == 0
