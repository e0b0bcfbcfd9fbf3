"""The public entry points: `load` a checkpoint (or `random_model` from a preset) into a `Model`, whose methods
(stream, complete, generate, chat, complete_batch, score, score_batch, perplexity, logits, router_stats) run requests
through its scheduler."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

from qwen3moe_jax.errors import ConfigError, ContextLengthError, Qwen3MoeError, SamplingError
from qwen3moe_jax.io.checkpoint import float32_arrays, read_checkpoint
from qwen3moe_jax.io.gguf_write import write_gguf
from qwen3moe_jax.io.hf import write_hf
from qwen3moe_jax.io.tokenizer import Tokenizer
from qwen3moe_jax.model.cache import check_cache_fits, check_kv_dtype
from qwen3moe_jax.model.config import ModelConfig, preset
from qwen3moe_jax.model.moe import check_moe_kernel
from qwen3moe_jax.model.params import Params, init_params
from qwen3moe_jax.model.router_stats import RouterStats, router_stats
from qwen3moe_jax.model.sharding import replicate, use_mesh
from qwen3moe_jax.runtime.constraints import Constraint, Grammars, grammar_of
from qwen3moe_jax.runtime.draft_model import DraftEngine, ModelDrafter, check_draft_vocabulary
from qwen3moe_jax.runtime.engine import DEFAULT_DECODE_STEPS, DEFAULT_PREFILL_CHUNK, Engine, bucket_length, full_logits
from qwen3moe_jax.runtime.evaluation import Perplexity, Score, perplexity_windows, run_sharing_prefixes
from qwen3moe_jax.runtime.generation import Completion, Event, OnToken, RequestEvents, collect
from qwen3moe_jax.runtime.sampling import SamplingParams
from qwen3moe_jax.runtime.scheduler import Request, Scheduler
from qwen3moe_jax.runtime.speculative import (
    DEFAULT_NGRAM,
    SpeculativeConfig,
    SpeculativeEngine,
    Speculator,
)

log = logging.getLogger(__name__)
# The cache length when none is given, for a model of more positions: 4,096 tokens of the 30B-A3B shape take 0.4 GB
# per row in bfloat16. A 262,144-token model is loaded for long contexts with max_seq_len (and kv_dtype="int8").
DEFAULT_MAX_SEQ_LEN = 4096
# The small model this project trained itself (scripts/train_small.py), loaded when no path is given.
BUNDLED_MODEL = Path(__file__).parent / "bundled" / "qwen3-moe-pystdlib-Q8_0.gguf"
# "int8": attention, expert, dense MLP and lm_head matrices stored as int8 with per-channel scales,
# everything else and all computation in bfloat16; "int4": the same matrices in 4 bits with a scale (and
# offset) per group of 32 (see quant.py).
DTYPES = ("float32", "bfloat16", "float16", "int8", "int4")


class Model:
    """A loaded model: config, params pytree, tokenizer (or None), the engine that runs them over max_batch
    KV-cache rows, and the scheduler that runs requests on the engine (every generation method goes
    through it). With `speculative` settings, decoding drafts tokens and verifies them (speculative.py); method
    "draft_model" drafts with the Model `draft` (draft_model.py)."""

    def __init__(
        self, config: ModelConfig, params: Params, tokenizer: Tokenizer | None, max_seq_len: int | None = None,
        mesh: Mesh | None = None, max_batch: int = 1, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        decode_steps: int = DEFAULT_DECODE_STEPS, prefix_cache: bool = True,
        speculative: SpeculativeConfig | None = None, draft: Model | None = None, kv_dtype: str = "model",
    ):
        self.config = config
        self.params = params  # the params pytree (model.Params); sharded over `mesh` when there is one
        self.tokenizer = tokenizer
        self.mesh = mesh
        self.speculative = speculative
        if (draft is not None) != (speculative is not None and speculative.method == "draft_model"):
            raise ConfigError("a draft model goes with speculative method 'draft_model', and that method with one")
        if draft is not None:
            check_draft_vocabulary((config, tokenizer), (draft.config, draft.tokenizer))
        self.draft = draft
        self.prefix_cache = prefix_cache
        if max_seq_len is None:
            max_seq_len = min(config.max_position_embeddings, DEFAULT_MAX_SEQ_LEN)
        check_max_seq_len(config, params, max_seq_len, max_batch, kv_dtype, mesh)
        self.kv_dtype = kv_dtype
        self._build_engine(max_seq_len, max_batch, prefill_chunk, decode_steps)
        self._grammars: Grammars | None = None

    def _build_engine(self, max_seq_len: int, max_batch: int, prefill_chunk: int, decode_steps: int) -> None:
        args = (self.params, self.config, max_seq_len, max_batch, self.mesh, prefill_chunk, decode_steps)
        if self.speculative is None:
            self.engine = Engine(*args, kv_dtype=self.kv_dtype)
            self.scheduler = Scheduler(self.engine, prefix_cache=self.prefix_cache)
        else:
            k = self.speculative.draft_tokens
            drafter = None if self.draft is None else ModelDrafter(DraftEngine(
                self.draft.params, self.draft.config, max_seq_len, max_batch, self.mesh, prefill_chunk, draft_tokens=k))
            self.engine = SpeculativeEngine(*args, draft_tokens=k, kv_dtype=self.kv_dtype,
                                            draft_engine=drafter and drafter.engine)
            self.scheduler = Scheduler(self.engine, prefix_cache=self.prefix_cache,
                                       speculator=Speculator(self.speculative, drafter))

    @property
    def max_seq_len(self) -> int:
        return self.engine.max_seq_len

    @property
    def max_batch(self) -> int:
        return self.engine.batch_size

    def set_max_batch(self, max_batch: int) -> None:
        """Run on max_batch KV-cache rows from now on (a new cache; decode compiles for the new shape)."""
        if max_batch != self.max_batch:
            if self.scheduler.running or self.scheduler.queued:
                raise Qwen3MoeError("max_batch cannot change while requests run")
            self.prefix_cache = self.scheduler.prefix_cache.enabled  # as switched since
            self._build_engine(self.engine.max_seq_len, max_batch, self.engine.chunk_size, self.engine.decode_steps)

    def _require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise Qwen3MoeError("this model has no tokenizer: pass token ids instead of text")
        return self.tokenizer

    def encode(self, ids: str | Sequence[int]) -> list[int]:
        """Token ids of `ids`: a string goes through the tokenizer, a sequence is taken as ids."""
        if isinstance(ids, str):
            return self._require_tokenizer().encode(ids)
        return [int(t) for t in ids]

    def logits(self, ids: str | Sequence[int]) -> np.ndarray:
        """float32 logits [len(ids), vocab] from one full forward pass (no cache carried over)."""
        padded, n = self._padded(ids)
        with use_mesh(self.mesh):
            logits = full_logits(self.params, replicate(padded, self.mesh), self.config)
        return np.asarray(logits)[0, :n]

    def router_stats(self, ids: str | Sequence[int]) -> RouterStats:
        """Per-layer routing of `ids` (text or token ids) in one forward pass: chosen experts, their weights,
        the router's full distribution, expert counts and entropies (see qwen3moe_jax.model.router_stats). For a
        generation, pass the prompt and completion ids together: every position routes as it did then."""
        padded, n = self._padded(ids)
        with use_mesh(self.mesh):
            return router_stats(self.params, self.config, padded, n)

    def _padded(self, ids: str | Sequence[int]) -> tuple[np.ndarray, int]:
        """ids as a [1, T] batch padded to a prefill bucket, so each new length does not compile anew
        (causal attention keeps the padding from touching the real positions), and their count."""
        ids = self.encode(ids)
        if not ids:
            raise Qwen3MoeError("the prompt is empty: give at least one token")
        self.engine.check_tokens(ids)
        n = len(ids)
        padded = np.zeros((1, bucket_length(n, max(n, self.max_seq_len))), np.int32)
        padded[0, :n] = ids
        return padded, n

    def stream(
        self,
        ids: str | Sequence[int],
        max_new_tokens: int | None = None,
        sampling: SamplingParams | None = None,
        *,
        on_token: OnToken | None = None,
        **overrides: Any,
    ) -> Iterator[Event]:
        """Generate from `ids` (text or token ids), yielding an Event per new token (see generation.py).

        `sampling` holds the request's settings (default: greedy, 32 tokens, the model's EOS ids as
        stops); max_new_tokens and any other SamplingParams field given as a keyword override it
        (to generate until the cache is full, give SamplingParams(max_new_tokens=None)).
        `on_token(token_id)` is called for every new token before the stop checks; returning False ends
        generation there, as does closing the iterator. Bad requests raise here, before anything runs.
        """
        if max_new_tokens is not None:
            overrides["max_new_tokens"] = max_new_tokens
        return self.scheduler.events(self.request(ids, _with_overrides(sampling or SamplingParams(), overrides),
                                                  on_token))

    def request(self, ids: str | Sequence[int], sampling: SamplingParams, on_token: OnToken | None = None,
                score_from: int = 1) -> Request:
        """A checked request for the scheduler (bad requests raise here, a Qwen3MoeError). With
        sampling.prompt_logprobs, its prompt tokens from position score_from on are scored."""
        prompt = self.encode(ids)
        self.engine.check_tokens(prompt)
        self.engine.check_request(len(prompt), sampling.max_new_tokens, sampling.logprobs)
        if sampling.prompt_logprobs is not None:
            self.engine.check_request(len(prompt), sampling.max_new_tokens, sampling.prompt_logprobs)
            if not 1 <= score_from < len(prompt):
                raise Qwen3MoeError(f"the first scored position must be in 1..{len(prompt) - 1}, got {score_from}")
        if sampling.stop and self.tokenizer is None:
            raise SamplingError("stop strings need a model with a tokenizer; give stop_token_ids instead")
        eos = self.config.eos_token_ids
        stops = eos if sampling.stop_token_ids is None else sampling.stop_token_ids
        limit = self.max_seq_len - len(prompt) if sampling.max_new_tokens is None else sampling.max_new_tokens
        constraint = self.constraint(sampling)
        events = RequestEvents(self.tokenizer, len(prompt), sampling, limit, stops, eos, on_token)
        return Request(prompt, sampling, events, constraint=constraint, score_from=score_from)

    def score(self, context: str | Sequence[int], continuation: str | Sequence[int]) -> Score:
        """The log-likelihood of `continuation` given `context` (texts or token ids): its total log-probability,
        each token's, and whether it is what greedy decoding writes (evaluation.Score). Two texts are tokenized
        together and split where the context's own tokens end, its trailing whitespace moved to the continuation,
        as lm-evaluation-harness does."""
        return self.score_batch([(context, continuation)])[0]

    def score_batch(self, pairs: Sequence[tuple[str | Sequence[int], str | Sequence[int]]],
                    progress: bool = False) -> list[Score]:
        """`score` of many (context, continuation) pairs, in their order, run together on the model's rows; a
        context that several pairs share is computed once, in whole prefill chunks (runtime/evaluation.py)."""
        requests = [self._scoring_request(*self._pair(context, continuation)) for context, continuation in pairs]
        with tqdm(total=len(requests), desc="scoring", unit="pair", disable=not progress) as bar:
            events = run_sharing_prefixes(self.scheduler, requests, lambda i, _: bar.update(1))
        return [Score.of(r.prompt, r.score_from, e[0].prompt_logprobs) for r, e in zip(requests, events, strict=True)]

    def _pair(self, context: str | Sequence[int], continuation: str | Sequence[int]) -> tuple[list[int], int]:
        """The prompt of a (context, continuation) pair, and where the continuation starts in it."""
        texts = isinstance(context, str) and isinstance(continuation, str)
        if texts and (spaces := len(context) - len(context.rstrip())):  # they join the continuation's tokens
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        n = len(self.encode(context))
        ids = self.encode(context + continuation) if texts else self.encode(context) + self.encode(continuation)
        if n == 0 or n >= len(ids):
            raise Qwen3MoeError(f"a scored pair needs a context and a continuation of at least one token each, got "
                                f"{n} and {len(ids) - n} tokens")
        return ids, n

    def _scoring_request(self, ids: Sequence[int], first: int, top: int = 1) -> Request:
        return self.request(ids, SamplingParams(max_new_tokens=0, prompt_logprobs=top), score_from=first)

    def perplexity(self, text: str | Sequence[int], context: int, stride: int | None = None, add_bos: bool = False,
                   progress: bool = False) -> Perplexity:
        """The perplexity of `text` (or token ids) as llama.cpp's llama-perplexity computes it, over windows of
        `context` tokens: consecutive windows scored from their middle on, or with a `stride`, windows every
        `stride` tokens scoring their last `stride` (evaluation.perplexity_windows). add_bos: the vocabulary adds a
        BOS token (Qwen3's do not), which then starts the text and, without a stride, each window. progress: a bar
        with the perplexity so far."""
        ids = self.encode(text)
        if add_bos:
            if self.config.bos_token_id is None:
                raise Qwen3MoeError("add_bos: this model has no BOS token")
            ids = [self.config.bos_token_id] + ids
        if context > self.max_seq_len:
            raise ContextLengthError(f"the perplexity context ({context} tokens) exceeds the KV cache length "
                                     f"{self.max_seq_len}; load with a larger max_seq_len or lower the context")
        windows = perplexity_windows(len(ids), context, stride)
        requests = []
        for start, first in windows:
            window = ids[start: start + context]
            if add_bos and stride is None:
                window = [self.config.bos_token_id] + window[1:]
            requests.append(self._scoring_request(window, first, top=0))
        nlls: list[float] = []  # in the order the windows finish: Perplexity.of's exact sums do not depend on it

        def done(i: int, events: list[Event]) -> None:
            nlls.extend(-s.logprob for s in events[0].prompt_logprobs[requests[i].score_from:])
            bar.update(1)
            bar.set_postfix(ppl=f"{math.exp(math.fsum(nlls) / len(nlls)):.4f}")

        with tqdm(total=len(requests), desc="perplexity", unit="window", disable=not progress) as bar:
            run_sharing_prefixes(self.scheduler, requests, done)
        return Perplexity.of(nlls, len(windows), context, stride)

    def constraint(self, sampling: SamplingParams) -> Constraint | None:
        """A fresh matcher for sampling's json_schema / regex / grammar (None without one); an invalid one
        raises ConstraintError with llguidance's reason."""
        grammar = grammar_of(sampling.json_schema, sampling.regex, sampling.grammar)
        if grammar is None:
            return None
        if self._grammars is None:
            tokenizer = self._require_tokenizer()
            self._grammars = Grammars(tokenizer, self.config.vocab_size, tuple(self.chat_stop_ids()))
        return self._grammars.constraint(grammar)

    def complete_batch(self, prompts: Sequence[str | Sequence[int]],
                       sampling: SamplingParams | Sequence[SamplingParams] | None = None,
                       max_batch: int | None = None) -> list[Completion]:
        """Completions of many prompts (text or token ids), in their order, generated together: up to
        max_batch at a time share each decode step (continuous batching; None: the model's max_batch, set
        by load; another value resizes the model's engine). `sampling` is one SamplingParams for all or one
        per prompt. Each completion is exactly what the prompt gets alone (scheduler.py)."""
        if sampling is None or isinstance(sampling, SamplingParams):
            sampling = [sampling or SamplingParams()] * len(prompts)
        if len(sampling) != len(prompts):
            raise SamplingError(f"{len(prompts)} prompts but {len(sampling)} SamplingParams: give one or one each")
        requests = [self.request(p, s) for p, s in zip(prompts, sampling, strict=True)]
        if max_batch is not None:
            self.set_max_batch(max_batch)
        return [collect(iter(events)) for events in self.scheduler.run_all(requests)]

    def complete(self, ids: str | Sequence[int], max_new_tokens: int | None = None,
                 sampling: SamplingParams | None = None, *, on_token: OnToken | None = None,
                 **overrides: Any) -> Completion:
        """`stream` run to the end: token ids, text, finish reason, usage and logprobs together."""
        return collect(self.stream(ids, max_new_tokens, sampling, on_token=on_token, **overrides))

    def generate(self, ids: str | Sequence[int], max_new_tokens: int | None = None,
                 sampling: SamplingParams | None = None, *, on_token: OnToken | None = None,
                 **overrides: Any) -> list[int]:
        """The new token ids of `stream` (a stop token that ended generation is included)."""
        return self.complete(ids, max_new_tokens, sampling, on_token=on_token, **overrides).token_ids

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        max_new_tokens: int | None = None,
        sampling: SamplingParams | None = None,
        **template_kwargs: Any,
    ) -> str:
        """The assistant's reply to `messages` ([{"role": "user", "content": ...}, ...]), prompted through
        the chat template (see prepare_chat)."""
        prompt, sampling = self.prepare_chat(messages, sampling, **template_kwargs)
        return self.complete(prompt, max_new_tokens, sampling).text

    def prepare_chat(self, messages: Sequence[Mapping[str, Any]], sampling: SamplingParams | None = None,
                     **template_kwargs: Any) -> tuple[str, SamplingParams]:
        """The prompt text for `messages` through the chat template (template_kwargs, e.g.
        enable_thinking=False or tools=[...], reach the template), and `sampling` set to stop where an
        assistant turn ends, at an EOS token or <|im_end|>, unless it names stop ids of its own."""
        prompt = self._require_tokenizer().apply_chat_template(messages, add_generation_prompt=True,
                                                               **template_kwargs)
        sampling = sampling or SamplingParams()
        if sampling.stop_token_ids is None:
            sampling = dataclasses.replace(sampling, stop_token_ids=self.chat_stop_ids())
        return prompt, sampling

    def chat_stop_ids(self) -> list[int]:
        """Tokens that end an assistant turn: the EOS ids and <|im_end|>."""
        stops = set(self.config.eos_token_ids)
        if self.tokenizer is not None and (im_end := self.tokenizer.token_id("<|im_end|>")) is not None:
            stops.add(im_end)
        return sorted(stops)


def check_max_seq_len(config: ModelConfig, params: Params, max_seq_len: Any, max_batch: int, kv_dtype: str,
                      mesh: Mesh | None) -> None:
    """A cache length that is a positive integer and, on a device that reports its memory (GPUs, TPUs), one whose
    cache fits beside the weights (the error says how many tokens per row do); past the positions the model was
    trained for (max_position_embeddings), a warning, as llama.cpp gives."""
    if not isinstance(max_seq_len, int) or isinstance(max_seq_len, bool) or max_seq_len < 1:
        raise ConfigError(f"max_seq_len must be a positive integer, got {max_seq_len!r}", "max_seq_len")
    if max_seq_len > config.max_position_embeddings:
        log.warning("max_seq_len %d is past the %d positions this model was trained for (max_position_embeddings): "
                    "positions beyond them may give poor text", max_seq_len, config.max_position_embeddings)
    stats = params.embed.devices().pop().memory_stats() if mesh is None and hasattr(params.embed, "devices") else None
    if stats and "bytes_limit" in stats:  # the weights are on the device already: what is left is the cache's
        free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
        check_cache_fits(config, max_batch, max_seq_len, params.embed.dtype, kv_dtype, free)


def _with_overrides(sampling: SamplingParams, overrides: dict[str, Any]) -> SamplingParams:
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(SamplingParams)})
    if unknown:
        raise SamplingError(f"unknown sampling parameters {unknown}; see qwen3moe_jax.SamplingParams")
    return dataclasses.replace(sampling, **overrides)


def _resolve_dtype(dtype: Any) -> Any:
    if isinstance(dtype, str) and dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return jnp.dtype(dtype)


def load(
    path: str | Path | None = None,
    dtype: Any = "float32",
    max_seq_len: int | None = None,
    progress: bool = True,
    mesh: Mesh | None = None,
    max_batch: int = 1,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    decode_steps: int = DEFAULT_DECODE_STEPS,
    moe_kernel: str = "auto",
    prefix_cache: bool = True,
    speculative: str | None = None,
    draft_tokens: int | None = None,
    ngram: int = DEFAULT_NGRAM,
    draft_model: str | Path | Model | None = None,
    kv_dtype: str = "model",
) -> Model:
    """Load a checkpoint into a Model: a GGUF file (llama.cpp `qwen3moe`, or dense `qwen3`) or a Hugging Face
    directory (config.json + *.safetensors of a Qwen3-MoE or a dense Qwen3); with no path, the bundled small model
    (BUNDLED_MODEL).

    dtype is one of DTYPES. "int8" means int8 weights with bfloat16 compute: each matrix of attention,
    the experts, the dense MLPs and lm_head is quantized on the host as it is read (symmetric, one float32
    scale per output channel; from a GGUF file, after dequantizing its blocks), and the embedding table,
    norms, routers, activations and KV cache are bfloat16. "int4" stores the same matrices in 4 bits, one
    float16 scale (and offset) per group of 32 along the input axis: a GGUF file's Q4_0 and Q4_K tensors
    keep their numbers, other tensors are quantized from their float values (ggml's Q4_0 rounding).

    With a mesh (`make_mesh`), every tensor is placed straight into its shards as it is read, and the model
    runs sharded over the mesh (see sharding.py).

    max_batch: the KV-cache rows, so the requests that can share a decode step (scheduler.py).
    prefill_chunk: prompts are prefilled in chunks of this many tokens (a power of two), each attending to
    the cache filled so far, so prefill's temporary memory grows with the chunk (and attention's with chunk x
    context), not with the prompt's square.
    decode_steps: decode steps per device call (tokens still reach the caller one by one; a stop wastes at
    most decode_steps - 1 steps of compute).
    moe_kernel: how the MoE blocks run, one of model.moe.MOE_KERNELS; "auto" reads only the chosen experts'
    weights at decode and runs prefill in whole blocks per expert (ragged_dot on TPU), see model/moe.py.
    prefix_cache: a request reuses the keys and values of the prompt prefix a KV-cache row holds from an earlier
    request, in whole prefill chunks, and prefills only the rest; its tokens and logprobs are those it gets without
    (runtime/prefix_cache.py).
    speculative: "ngram" drafts up to draft_tokens tokens per step (default 31) by prompt lookup (a match of `ngram`
    tokens, default 4) and verifies them in one step, with the same tokens as without (runtime/speculative.py); None:
    off. draft_model: a checkpoint path (read in `dtype`) or a Model of the same tokenizer that drafts draft_tokens
    tokens (default 7) per step greedily, on a KV cache of its own (runtime/draft_model.py); speculative is then
    "draft_model" (or None).
    kv_dtype: the KV cache's, one of model.cache.KV_DTYPES: "model" (the compute dtype) or "int8" (int8 keys and
    values with a float16 scale per token and head: half the bytes of bfloat16; see model/cache.py)."""
    path = Path(BUNDLED_MODEL if path is None else path)
    dtype = _resolve_dtype(dtype)
    check_moe_kernel(moe_kernel, dtype)  # a bad name fails before the read
    check_kv_dtype(kv_dtype)
    spec = _speculative(speculative, draft_tokens, ngram, draft_model)
    draft = _draft(draft_model, dtype, progress, mesh)
    config, params, tokenizer = read_checkpoint(path, dtype, progress, mesh, moe_kernel)
    return Model(config, params, tokenizer, max_seq_len, mesh, max_batch, prefill_chunk, decode_steps, prefix_cache,
                 spec, draft, kv_dtype)


def _speculative(method: str | None, draft_tokens: int | None, ngram: int,
                 draft_model: str | Path | Model | None) -> SpeculativeConfig | None:
    if draft_model is not None:
        if method not in (None, "draft_model"):
            raise ConfigError(f"speculative={method!r} and a draft model: choose one way of drafting")
        method = "draft_model"
    elif method == "draft_model":
        raise ConfigError("speculative='draft_model' needs a draft_model (a checkpoint path or a Model)")
    return None if method is None else SpeculativeConfig(method, draft_tokens, ngram)


def _draft(draft_model: str | Path | Model | None, dtype: Any, progress: bool, mesh: Mesh | None) -> Model | None:
    """The draft model: a Model as given, or a checkpoint read as load reads one."""
    if draft_model is None or isinstance(draft_model, Model):
        return draft_model
    if jax.process_count() > 1:
        raise ConfigError("a draft model runs on one process: multi-host serving does not support it")
    config, params, tokenizer = read_checkpoint(Path(draft_model), dtype, progress, mesh, "auto")
    return Model(config, params, tokenizer, mesh=mesh)


def save_gguf(model: Model, path: str | Path, qtype: str = "F32", with_tokenizer: bool = True) -> None:
    """Export the model as a llama.cpp `qwen3moe` GGUF file (F32, F16, BF16, Q8_0 or Q4_0): weights, config
    and, when the model has one and with_tokenizer is set, the tokenizer with its chat template. The weights
    of an int8 or int4 model are written dequantized and then stored in qtype."""
    write_gguf(path, model.config, float32_arrays(model.params), qtype, model.tokenizer if with_tokenizer else None)


def save_hf(model: Model, directory: str | Path) -> None:
    """Export the model as a Hugging Face checkpoint directory (config.json, model.safetensors in float32,
    and the tokenizer with its chat template when the model has one), loadable by transformers. The
    weights of an int8 or int4 model are written dequantized."""
    write_hf(directory, model.config, float32_arrays(model.params), model.tokenizer)


def random_model(
    config: ModelConfig | str,
    dtype: Any = "float32",
    seed: int = 0,
    max_seq_len: int | None = None,
    std: float = 0.02,
    mesh: Mesh | None = None,
    max_batch: int = 1,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    decode_steps: int = DEFAULT_DECODE_STEPS,
    moe_kernel: str | None = None,
    prefix_cache: bool = True,
    speculative: str | None = None,
    draft_tokens: int | None = None,
    ngram: int = DEFAULT_NGRAM,
    draft_model: str | Path | Model | None = None,
    kv_dtype: str = "model",
) -> Model:
    """A Model with random weights from a preset name or a config, with a byte-level tokenizer
    when the vocabulary fits one (256 bytes + Qwen specials); sharded over `mesh` when one is given. dtype,
    max_batch, prefill_chunk, decode_steps, moe_kernel, prefix_cache, speculation and kv_dtype as for `load` ("int8"
    and "int4" included; moe_kernel None: the config's)."""
    if isinstance(config, str):
        config = preset(config)
    dtype = _resolve_dtype(dtype)
    if moe_kernel is not None:
        config = config.replace(moe_kernel=check_moe_kernel(moe_kernel))
    check_moe_kernel(config.moe_kernel, dtype)
    params = init_params(config, seed, dtype, std, mesh)
    byte_tokenizer = Tokenizer.byte_level()
    tokenizer = byte_tokenizer if byte_tokenizer.vocab_size == config.vocab_size else None
    return Model(config, params, tokenizer, max_seq_len, mesh, max_batch, prefill_chunk, decode_steps, prefix_cache,
                 _speculative(speculative, draft_tokens, ngram, draft_model), _draft(draft_model, dtype, False, mesh),
                 check_kv_dtype(kv_dtype))
