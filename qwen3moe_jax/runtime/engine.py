"""The engine: jit-compiled steps over `max_batch` KV-cache rows that live on the device, and nothing else.

Every row of the cache belongs to at most one request at a time (the scheduler, scheduler.py, decides
which); the device state of all rows together is a `Slots` pytree, handed from step to step by donation.
- `prefill_chunk` writes one chunk of one row's prompt into the cache at the chunk's positions, each chunk
  attending to the slots filled so far, and samples the row's first token after its last chunk. Chunks
  start at positions 0, C, 2C, ... (C = Engine.chunk_size: load's prefill_chunk), set by the request
  alone: the shapes a request sees never depend on what else runs. A first chunk shorter than C is padded
  to a power of two (at least MIN_BUCKET), later chunks to C, so a new prompt length never compiles anew.
  With rows=None the same step prefills every row at once (a whole batch of prompts, as a benchmark does).
- `decode_block` runs `steps` decode steps of every row in one device call (unrolled, with sampling
  inside, and with a constrained row the call to its grammar after each step); rows marked inactive are
  parked at position S (the cache length), where their writes to the cache and history are dropped, so a
  free row or one part-way through its prompt is left as it was.
- `copy_row` copies one row's cache and history into another (a prompt prefix the scheduler reuses).
Prefill and decode read only a window of the cache, a little more than the filled length (`attention_window`),
so a short request in a long cache does not pay for all of it, and each window compiles once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.experimental import io_callback

from qwen3moe_jax.errors import ContextLengthError, Qwen3MoeError, SamplingError
from qwen3moe_jax.model import backend, cpu_kernels
from qwen3moe_jax.model.cache import CACHE_AXES, KVCache, check_kv_dtype
from qwen3moe_jax.model.config import ModelConfig
from qwen3moe_jax.model.params import Params
from qwen3moe_jax.model.quant import QuantizedWeight
from qwen3moe_jax.model.sharding import constrain, replicate, use_mesh
from qwen3moe_jax.model.transformer import attention_window, forward, lm_logits
from qwen3moe_jax.runtime.constraints import BlockGrammar, unconstrained_mask
from qwen3moe_jax.runtime.sampling import SamplerState, SamplingParams, sample, token_logprobs, unpack_mask
from qwen3moe_jax.runtime.scoring import chunk_logprobs, full_logits  # noqa: F401 (full_logits: re-exported)

MIN_BUCKET = 16
# Defaults chosen by measurement on 2 CPU cores with scripts/bench_engine.py (README, "Batched generation"):
# chunks of 64-128 gave the fastest prefill of 250- and 1000-token prompts (bundled model, small preset), and
# 4 decode steps per call 1.3-2x the tokens/s of 1 (bundled model, the issue-19 shape). On a GPU, larger
# chunks (512+) likely pay: measure with --prefill-chunk.
DEFAULT_PREFILL_CHUNK = 128
DEFAULT_DECODE_STEPS = 4
# The most alternatives a request may ask logprobs for (OpenAI's top_logprobs limit); computed on the device.
LOGPROBS_MAX = 20


def bucket_length(n: int, max_len: int, minimum: int = MIN_BUCKET) -> int:
    """Smallest power of two >= n (at least `minimum`), capped at max_len."""
    return min(max(minimum, 1 << (n - 1).bit_length()), max_len)


@struct.dataclass
class Slots:
    """The device state of every row: the KV cache, each row's token ids so far (prompt and generated, for
    the repetition penalty) and the token each row feeds to its next decode step."""

    cache: KVCache
    history: jax.Array  # [B, S] int32
    next_token: jax.Array  # [B] int32


class StepTokens(NamedTuple):
    """What a step hands the host, [steps, rows]: the tokens (-1 where the logits held NaN) and, when asked
    for, their logprobs under the model and the LOGPROBS_MAX most likely tokens (else zeros)."""

    token: jax.Array
    logprob: jax.Array
    top_ids: jax.Array
    top_logprob: jax.Array


# XLA:GPU's DotMerger joins dots sharing an input (q, k, v) into one over their weights concatenated, writing int8
# weights out as bfloat16 first (`aot`: 1.1 GB at 32 rows of 30B-A3B): quantized params compile steps without it.
WITHOUT_DOT_MERGER = {"xla_gpu_dot_merger_threshold_mb": 0}


def step_program(*static: str) -> Callable[[Callable], Any]:
    """jax.jit of a step that donates its slots, with `.for_quantized`: the same step compiled without DotMerger."""
    def jit(step: Callable) -> Any:
        program = jax.jit(step, static_argnames=static, donate_argnames="slots")
        program.for_quantized = jax.jit(step, static_argnames=static, donate_argnames="slots",
                                        compiler_options=WITHOUT_DOT_MERGER)
        return program
    return jit


def _sample_step(logits: jax.Array, sampler: SamplerState, history: jax.Array, length: jax.Array,
                 logprobs: jax.Array, allowed: jax.Array | None, forced: jax.Array | None = None) -> StepTokens:
    # NaN logits cannot raise inside jit: mark the row with -1 and let the host raise.
    allowed = None if allowed is None else unpack_mask(allowed, logits.shape[-1])
    token = jnp.where(jnp.isnan(logits).any(-1), -1, sample(logits, sampler, history, length, allowed))
    if forced is not None:  # a token the row's grammar forces: taken as is (its logprobs are still the model's)
        token = jnp.where(forced >= 0, forced, token)
    n = min(LOGPROBS_MAX, logits.shape[-1])

    def with_logprobs(_: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
        return token_logprobs(logits, jnp.maximum(token, 0), n)

    def without(_: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
        B = logits.shape[0]
        return jnp.zeros(B, jnp.float32), jnp.zeros((B, n), jnp.int32), jnp.zeros((B, n), jnp.float32)

    chosen, top_ids, top_logp = jax.lax.cond(logprobs, with_logprobs, without, None)
    # On a mesh, every device (and so every process) holds the whole result: the host reads it.
    return StepTokens(*(constrain(a, (None,) * a.ndim) for a in (token, chosen, top_ids.astype(jnp.int32),
                                                                 top_logp)))


@step_program("config", "window")
def prefill_chunk(
    params: Params, slots: Slots, sampler: SamplerState, tokens: jax.Array, row: jax.Array | None,
    start: jax.Array, length: jax.Array, logprobs: jax.Array, allowed: jax.Array, config: ModelConfig, window: int,
    targets: jax.Array | None = None,
) -> tuple[StepTokens | tuple[StepTokens, StepTokens], Slots]:
    """Write the chunk tokens [R, C] (right-padded) of prompts of `length` [R] tokens at positions start[r] ..
    into cache row `row` (R = 1; None: every row, R = B), attending to the row's slots before start.
    Where a prompt ends inside its chunk, its first new token is sampled (among the tokens `allowed` [R, W],
    a bitmask) and becomes the row's next_token.
    Returns the sampled tokens ([1, R], meaningful only where the prompt ended) and the state; with `targets` [R, C]
    (a scoring chunk, a program of its own), also each position's logprobs of its target (scoring.py)."""
    cache, history = slots.cache, slots.history
    if row is not None:  # one row: run the model on a [1, ...] view, written back in place
        view = lambda a: jax.lax.dynamic_slice_in_dim(a, row, 1, axis=0)  # noqa: E731
        cache, history = jax.tree.map(view, cache), view(history)
        sampler = jax.tree.map(view, sampler)
    R, C = tokens.shape
    rows = jnp.arange(R)
    history = history.at[rows[:, None], start[:, None] + jnp.arange(C)].set(tokens, mode="drop")
    hidden, cache, _ = forward(params, tokens, start, cache, config, window)
    last = jnp.clip(length - 1 - start, 0, C - 1)
    logits = constrain(lm_logits(params, hidden[rows, last]), (None, None))
    out = _sample_step(logits, sampler, history, length, logprobs, allowed)
    ends_here = length <= start + C
    tokens_out = StepTokens(*(a[None] for a in out))
    if targets is not None:
        tokens_out = (tokens_out, StepTokens(targets, *chunk_logprobs(params, hidden, targets, LOGPROBS_MAX)))
    if row is None:
        next_token = jnp.where(ends_here, jnp.maximum(out.token, 0), slots.next_token)
        return tokens_out, Slots(cache, history, next_token)
    put = lambda a, b: jax.lax.dynamic_update_slice_in_dim(a, b, row, axis=0)  # noqa: E731
    cache = jax.tree.map(put, slots.cache, cache)
    mine = jax.lax.dynamic_index_in_dim(slots.next_token, row, keepdims=False)
    next_token = slots.next_token.at[row].set(jnp.where(ends_here[0], jnp.maximum(out.token[0], 0), mine))
    return tokens_out, Slots(cache, put(slots.history, history), next_token)


def _grammar_step(grammar: BlockGrammar, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(forced [B], masks [B, W]) of the next step from the host's grammar, which first takes the tokens [B]."""
    if grammar.host_step is not None:  # the CPU backend: our FFI call, a fraction of JAX's host callbacks' cost
        return cpu_kernels.host_step(grammar.host_step, tokens, grammar.words)
    B = tokens.shape[0]
    shapes = (jax.ShapeDtypeStruct((B,), jnp.int32), jax.ShapeDtypeStruct((B, grammar.words), jnp.int32))
    return io_callback(grammar, shapes, tokens, sharding=grammar.sharding)


@step_program("config", "window", "steps", "grammar")
def decode_block(
    params: Params, slots: Slots, sampler: SamplerState, positions: jax.Array, active: jax.Array,
    logprobs: jax.Array, allowed: jax.Array, forced: jax.Array, config: ModelConfig, window: int, steps: int,
    grammar: BlockGrammar | None = None,
) -> tuple[StepTokens, Slots, Any]:
    """`steps` decode steps of every row: row b feeds its next_token at positions[b], positions[b] + 1, ...
    (all below `window` for the steps whose results are used). Rows not `active` are parked at the cache
    length S: their cache, history and next_token stay as they were. The first step samples among the tokens
    `allowed` [B, W] (a bitmask), except where forced [B] holds a token (>= 0), which is taken instead of a draw
    (a token a row's grammar forces). With a `grammar` (constraints.BlockGrammar: the constrained rows, on the
    host), each step's tokens go to it as soon as they are sampled, and it gives the next step's masks and forced
    tokens, while the device runs the next step's forward pass, which does not need them; without one, the later
    steps sample unconstrained. Returns StepTokens [steps, B], the state, and the grammar's answer after the last
    step (None without one): the host keeps that answer itself, for the next block; returning it keeps XLA
    from dropping the call."""
    S = slots.history.shape[1]
    rows = jnp.arange(positions.shape[0])
    outs = []
    # A Python loop, unrolled: XLA:CPU ran a rolled lax.scan body at half the speed of the same step (measured).
    for i in range(steps):
        pos = jnp.where(active, positions + i, S)
        history = slots.history.at[rows, pos].set(slots.next_token, mode="drop")
        hidden, cache, _ = forward(params, slots.next_token[:, None], pos, slots.cache, config, window)
        logits = constrain(lm_logits(params, hidden[:, 0]), (None, None))
        out = _sample_step(logits, sampler, history, pos + 1, logprobs, allowed, forced)
        forced, allowed = _grammar_step(grammar, out.token) if grammar else (None, None)
        next_token = jnp.where(active, jnp.maximum(out.token, 0), slots.next_token)
        slots = Slots(cache, history, next_token)
        outs.append(out)
    return StepTokens(*(jnp.stack(a) for a in zip(*outs, strict=True))), slots, grammar and (forced, allowed)


@step_program()
def row_copy(slots: Slots, src: jax.Array, dst: jax.Array) -> tuple[None, Slots]:
    """Row src's keys, values and history written over row dst's (the whole row: one compiled shape)."""
    def copy(a: jax.Array) -> jax.Array:
        return jax.lax.dynamic_update_slice_in_dim(a, jax.lax.dynamic_slice_in_dim(a, src, 1, axis=0), dst, axis=0)

    cache = jax.tree.map(lambda a: constrain(copy(a), CACHE_AXES[: a.ndim]), slots.cache)  # int8 scales: 3 axes
    return None, Slots(cache, copy(slots.history), slots.next_token)


class Engine:
    """Owns the params and the device state of `batch_size` rows, and runs the jit steps on them.

    The state is allocated once (lazily) and handed from step to step by donation. The engine keeps no
    request state: which row holds what, and where, is the caller's (the scheduler's) business. Every
    method takes plain Python values, so a multi-host leader can send a call to its followers as is
    (`call`).

    With a compile-only `device` (jax.experimental.topologies: a GPU's, say, on a CPU host) the engine holds
    abstract params (jax.ShapeDtypeStruct leaves on that device) and state: nothing is allocated, and its steps
    can only be traced (`trace`), exactly as they would run there (tools/aot.py compiles them).
    """

    STEPS = ("set_sampling", "prefill", "decode", "copy_row")  # what `call` runs (speculative.py adds "verify")

    def __init__(self, params: Params, config: ModelConfig, max_seq_len: int, batch_size: int = 1, mesh: Any = None,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK, decode_steps: int = DEFAULT_DECODE_STEPS,
                 device: jax.Device | None = None, kv_dtype: str = "model"):
        if prefill_chunk < 1 or prefill_chunk & (prefill_chunk - 1):
            raise Qwen3MoeError(f"prefill_chunk must be a power of two >= 1, got {prefill_chunk}")
        if decode_steps < 1:
            raise Qwen3MoeError(f"decode_steps must be >= 1, got {decode_steps}")
        if batch_size < 1:
            raise Qwen3MoeError(f"max_batch must be >= 1, got {batch_size}")
        self.params = params
        self.quantized = any(isinstance(leaf, QuantizedWeight) for leaf in
                             jax.tree.leaves(params, is_leaf=lambda a: isinstance(a, QuantizedWeight)))
        self.config = config
        self.max_seq_len = max_seq_len
        self.batch_size = batch_size
        self.mesh = mesh  # a jax.sharding.Mesh the params are sharded over (sharding.py), or None
        self.chunk_size = min(prefill_chunk, bucket_length(max_seq_len, 1 << 30))
        self.decode_steps = decode_steps
        self.kv_dtype = check_kv_dtype(kv_dtype)  # cache.KV_DTYPES: the model's dtype, or int8 with scales
        self._slots: Slots | None = None
        self._sampler: SamplerState | None = None
        self._constants: dict[tuple, jax.Array] = {}
        self.device = device
        self._tracing = False
        # Steps run on the state (and resets): the scheduler trusts what it knows of the rows' contents only while
        # every step since was its own (a warm-up or a benchmark may run steps on the engine directly).
        self.steps_run = 0
        # The constrained rows' grammar, which a decode block calls after each step. An io_callback runs on one
        # device: on a multi-process mesh, one of process 0's, which holds the requests.
        host = None if mesh is None else next(d for d in mesh.devices.flat if d.process_index == 0)
        self.grammar = BlockGrammar(batch_size, config.vocab_size, host and jax.sharding.SingleDeviceSharding(host))
        # The CPU backend's decode kernels (and the grammar's host call) are built here, once per machine.
        if self.platform == "cpu" and cpu_kernels.build() is None and mesh is None:
            self.grammar.host_step = cpu_kernels.register_host_step(self.grammar.fill)

    @property
    def dtype(self) -> Any:
        return self.params.embed.dtype

    @property
    def platform(self) -> str:
        """The platform the steps run (or, with a compile-only device, are traced) for."""
        return self.device.platform if self.device is not None else jax.default_backend()

    def _put(self, host: Any) -> Any:
        """Host values (a pytree) as the steps take them: on the device (replicated over the mesh), or as abstract
        values on the compile-only device."""
        if self.device is None:
            return replicate(host, self.mesh)
        on_device = jax.sharding.SingleDeviceSharding(self.device)
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a), sharding=on_device),
                            host)

    @property
    def cache(self) -> KVCache:
        """The KV cache of all rows (allocated on first use)."""
        return self._state().cache

    def _state(self) -> Slots:
        if self._slots is None:
            B, S = self.batch_size, self.max_seq_len
            if self.device is not None:
                cache = self._put(jax.eval_shape(lambda: KVCache.init(self.config, B, S, self.dtype,
                                                                       kv_dtype=self.kv_dtype)))
            else:
                cache = KVCache.init(self.config, B, S, self.dtype, self.mesh, self.kv_dtype)
            self._slots = Slots(cache, *self._put((np.zeros((B, S), np.int32), np.zeros(B, np.int32))))
        return self._slots

    def _take_state(self) -> Slots:
        # Taken out while a step runs: if it fails after donating the buffers, the next step allocates
        # fresh ones rather than touching deleted arrays. A step only traced leaves it in place.
        if self._tracing:
            return self._state()
        slots, self._slots = self._state(), None
        return slots

    def _run(self, step: Any, *args: Any) -> Any:
        """Run a jit step on the state (or, while tracing, trace it: see `trace`) and keep the state it returns."""
        if self.quantized:
            step = step.for_quantized
        with use_mesh(self.mesh):
            if self._tracing:
                return step.trace(*args)
            self.steps_run += 1
            out, self._slots, *_ = step(*args)
        return out

    def trace(self, op: str, **kwargs: Any) -> jax.stages.Traced:
        """The step `call(op, **kwargs)` would run ("prefill" or "decode"), traced for this engine's platform and
        not run: `.lower().compile()` compiles it ahead of time, on a compile-only device too."""
        if op not in ("prefill", "decode"):
            raise Qwen3MoeError(f"only the prefill and decode steps are traced, not {op!r}")
        self._tracing = True
        try:
            with backend.tracing_for(self.platform):
                return getattr(self, op)(**kwargs)
        finally:
            self._tracing = False

    def reset(self) -> None:
        """Drop the device state (after a failed step): the next call starts from empty rows."""
        self._slots = None
        self.steps_run += 1

    def call(self, op: str, **kwargs: Any) -> StepTokens:
        """Run the step named op (one of STEPS: "set_sampling", "prefill", "decode", "copy_row") with plain-value
        arguments."""
        if op not in self.STEPS:
            raise Qwen3MoeError(f"unknown engine step {op!r}")
        return getattr(self, op)(**kwargs)

    def set_sampling(self, rows: Sequence[dict | None]) -> None:
        """Each row's sampling settings (SamplingParams fields the device reads; None: a free row)."""
        params = [SamplingParams(**fields) if fields else SamplingParams() for fields in rows]
        self._sampler = self._put(SamplerState.from_params(params))

    def sampler(self) -> SamplerState:
        if self._sampler is None:
            self.set_sampling([None] * self.batch_size)
        return self._sampler

    def chunk_shape(self, start: int, remaining: int) -> tuple[int, int]:
        """(chunk length, attention window) of the chunk at `start` with `remaining` prompt tokens from it."""
        C = self.chunk_size
        size = bucket_length(remaining, C, min(MIN_BUCKET, C)) if start == 0 else C
        return size, attention_window(start + size, self.max_seq_len)

    def token_mask(self, rows: Sequence[Sequence[int] | None]) -> np.ndarray:
        """The bitmask [len(rows), W] of the tokens each row may sample: a row's constraint words
        (constraints.Constraint.mask), or None where anything goes."""
        mask = unconstrained_mask(len(rows), self.config.vocab_size)
        for r, words in enumerate(rows):
            if words is not None:
                mask[r] = words
        return mask

    def prefill(self, row: int | None, tokens: Sequence[int] | Sequence[Sequence[int]], start: int | Sequence[int],
                length: int | Sequence[int], logprobs: bool = False,
                allowed: Sequence[int] | Sequence[Sequence[int] | None] | None = None,
                targets: Sequence[int] | None = None) -> StepTokens | tuple[StepTokens, StepTokens]:
        """One prompt chunk into `row` (tokens: that chunk's ids, at most chunk_size; start a multiple of
        it; length the whole prompt's), or with row=None one chunk of every row (lists of B of each).
        allowed: the constraint words of the first token's choice (per row for row=None; None: anything).
        targets (one row): the prompt token after each of the chunk's, to score them (see prefill_chunk)."""
        rows = [tokens] if row is not None else tokens
        starts = np.atleast_1d(np.asarray(start, np.int32))
        lengths = np.atleast_1d(np.asarray(length, np.int32))
        size, window = self.chunk_shape(int(starts.max()), int((lengths - starts).max()))
        padded = np.zeros((len(rows) + 1, size), np.int32)  # and a last row: the targets, if any
        for r, ids in enumerate([*rows, targets or []]):
            padded[r, : len(ids)] = ids
        args = self._put((padded[:-1], starts, lengths, np.bool_(logprobs), padded[-1:], np.int32(row or 0)))
        if allowed is None:
            mask = self._constant("mask", len(rows))
        else:
            mask = self._put(self.token_mask([allowed] if row is not None else allowed))
        return self._run(prefill_chunk, self.params, self._take_state(), self.sampler(), args[0],
                         None if row is None else args[5], args[1], args[2], args[3], mask, self.config, window,
                         None if targets is None else args[4])

    def copy_row(self, src: int, dst: int) -> None:
        """Copy row src's cache and history into row dst, whose own are overwritten (src is left as it was)."""
        args = self._put((np.int32(src), np.int32(dst)))
        self._run(row_copy, self._take_state(), *args)

    def decode_window(self, top_position: int) -> int:
        """The attention window of a decode block whose highest active row starts at top_position."""
        return attention_window(top_position + self.decode_steps, self.max_seq_len)

    def decode(self, positions: Sequence[int], active: Sequence[bool], logprobs: bool = False,
               window: int | None = None, allowed: Sequence[Sequence[int] | None] | None = None,
               forced: Sequence[int] | None = None, constrained: bool = False) -> StepTokens:
        """decode_steps steps of every row from `positions` (ignored where not `active`); the attention window is
        the one the highest active row needs, unless given. allowed: per row, the constraint words its first step
        samples under (None: anything); forced: per row, the token its first step takes instead of a draw (-1:
        none). constrained: some row has a grammar, which `self.grammar` (the rows' Constraints, set by the caller
        on process 0) applies to the later steps: a program of its own, compiled on first use."""
        positions = np.asarray(positions, np.int32)
        active = np.asarray(active, bool)
        if window is None:
            window = self.decode_window(int(positions[active].max()) if active.any() else 0)
        args = self._put_step([positions, active, np.bool_(logprobs)], allowed, forced)
        return self._run(decode_block, self.params, self._take_state(), self.sampler(), *args, self.config, window,
                         self.decode_steps, self.grammar if constrained else None)

    def _put_step(self, host: list, allowed: Sequence[Sequence[int] | None] | None,
                  forced: Sequence[int] | None) -> list:
        """A decode or verify step's inputs on the device, in one transfer of all that changes from step to step:
        `host`, then the first step's token masks from `allowed` and its `forced` tokens (where not given, the
        constants that ask for nothing)."""
        B = self.batch_size
        extra = ([self.token_mask(allowed)] if allowed is not None else []) + (
            [np.asarray(forced, np.int32)] if forced is not None else [])
        args = self._put(host + extra)
        n = len(host)
        mask = args[n] if allowed is not None else self._constant("mask", B)
        tokens = args[-1] if forced is not None else self._constant("forced", B)
        return [*args[:n], mask, tokens]

    def _constant(self, name: str, rows: int) -> jax.Array:
        """An input that asks for nothing, kept on the device (most steps have no constraint): "mask" (every
        token allowed) [rows, W], "forced" (no token) [rows]."""
        key = (name, rows)
        if key not in self._constants:
            value = {"mask": lambda: unconstrained_mask(rows, self.config.vocab_size),
                     "forced": lambda: np.full(rows, -1, np.int32)}[name]()
            self._constants[key] = self._put(value)
        return self._constants[key]

    def check_request(self, prompt_len: int, max_new_tokens: int | None, logprobs: int | None = None) -> None:
        """KV-3: refuse up front a request the cache cannot hold (max_new_tokens None: fill the cache)."""
        if prompt_len < 1:
            raise Qwen3MoeError("the prompt is empty: give at least one token")
        wanted = 1 if max_new_tokens is None else max_new_tokens
        if prompt_len + wanted > self.max_seq_len:
            raise ContextLengthError(
                f"prompt ({prompt_len} tokens) + max_new_tokens ({wanted}) = {prompt_len + wanted} exceeds "
                f"the KV cache length {self.max_seq_len}; shorten the prompt, lower max_new_tokens, or load "
                f"with a larger max_seq_len (the model has {self.config.max_position_embeddings} positions)"
            )
        if logprobs is not None and logprobs > LOGPROBS_MAX:
            raise SamplingError(f"logprobs takes at most {LOGPROBS_MAX} alternatives, got {logprobs}")

    def check_tokens(self, ids: Sequence[int]) -> None:
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise Qwen3MoeError(f"token ids {bad[:5]} are outside the vocabulary 0..{self.config.vocab_size - 1}")

    def chunk_starts(self, prompt_len: int, all_buckets: bool = False) -> dict[tuple[int, int], tuple[int, int]]:
        """{(chunk length, window): (start, prompt length) of a chunk with that shape} for the chunks of a
        prompt of prompt_len tokens; with all_buckets, of every prompt up to that length."""
        lengths = [prompt_len]
        while all_buckets and lengths[-1] > MIN_BUCKET:
            lengths.append(lengths[-1] // 2)
        shapes: dict[tuple[int, int], tuple[int, int]] = {}
        for n in lengths:
            for start in range(0, n, self.chunk_size):
                shapes.setdefault(self.chunk_shape(start, n - start), (start, n))
        return shapes

    def decode_windows(self, first: int, last: int) -> list[int]:
        """The decode windows of blocks starting at positions first .. last."""
        windows = [self.decode_window(first)]
        while windows[-1] < self.decode_window(last):
            windows.append(attention_window(windows[-1] + 1, self.max_seq_len))
        return windows

    def warmup(self, prompt_len: int, max_new_tokens: int | None = None, all_buckets: bool = False) -> None:
        """Compile what a request of prompt_len tokens (all_buckets: of up to prompt_len tokens) and
        max_new_tokens new ones (None: up to the cache length) runs (see warmup_steps)."""
        for _, compile_step in self.warmup_steps(prompt_len, max_new_tokens, all_buckets):
            compile_step()

    def warmup_steps(self, prompt_len: int, max_new_tokens: int | None = None,
                     all_buckets: bool = False) -> list[tuple[str, Callable[[], None]]]:
        """(what, run it) for each program warmup compiles (see warmup_programs). Run them only while no request
        holds a row: they leave row 0 holding dummy tokens."""
        return [(what, partial(self.call, op, **kwargs))
                for what, op, kwargs in self.warmup_programs(prompt_len, max_new_tokens, all_buckets)]

    def warmup_programs(self, prompt_len: int, max_new_tokens: int | None = None,
                        all_buckets: bool = False) -> list[tuple[str, str, dict[str, Any]]]:
        """(what, op, keyword arguments of `call`) for each program a request of prompt_len tokens (all_buckets:
        of up to prompt_len tokens) and max_new_tokens new ones (None: up to the cache length) runs: the prefill
        chunk shapes of the request (into one row) and the decode windows it can reach, on row 0 with every row
        inactive."""
        prompt_len = min(prompt_len, self.max_seq_len - 1)
        programs: list[tuple[str, str, dict[str, Any]]] = []
        for (length, window), (start, n) in self.chunk_starts(prompt_len, all_buckets).items():
            programs.append((f"prefill chunk {length} (window {window})", "prefill",
                             dict(row=0, tokens=[0] * min(n - start, self.chunk_size), start=start, length=n)))
        end = self.max_seq_len if max_new_tokens is None else min(prompt_len + max_new_tokens, self.max_seq_len)
        for window in self.decode_windows(1 if all_buckets else prompt_len, max(prompt_len, end - 1)):
            programs.append((f"decode window {window}", "decode",
                             dict(positions=[0] * self.batch_size, active=[False] * self.batch_size, window=window)))
        return programs
