"""Train a small Qwen3-MoE from scratch with optax on Python source code: the bundled model's recipe.

The corpus is the Python standard library's own source (every machine with Python has it): files are split
into train and held-out by a hash of their path, a byte-level BPE with Qwen's pre-tokenizer and special
tokens is learned from the train files, and the model is the project's own `model.forward`, so what is
trained is exactly what inference runs. The loss is next-token cross-entropy plus the router
load-balancing loss (qwen3moe_jax.model.router_stats); AdamW with linear warm-up, cosine decay and gradient clipping.

Everything random comes from one seed (weights from init_params, batch b from default_rng([seed, b])), so
the same seed, corpus and machine give the same weights; a checkpoint resumes a run where it stopped.

    python scripts/train_small.py --out runs/small          # ~30 min on 2 CPU cores
    python scripts/train_small.py --out runs/small --resume # carry on from runs/small/checkpoint.npz

A trained model's context is extended by tuning it further at a longer length from its GGUF file, with its
tokenizer, and YaRN over the context it was trained at (the bundled model's 2,048 positions, from 256):

    python scripts/train_small.py --out runs/long --init model.gguf --yarn-factor 8 --seq-len 2048 --batch-size 2 \
        --mix-seq-len 256 --steps 140 --peak-lr 5e-4 --warmup-steps 10

--mix-seq-len 256 alternates steps of 2,048- and 256-token windows, so the model keeps its short context as it learns
the long one (the bundled file: 140 such steps in three resumed runs, bundled/qwen3-moe-pystdlib-context-2048.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import sysconfig
import time
import zlib
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from qwen3moe_jax.api import Model, load, save_gguf
from qwen3moe_jax.io.tokenizer import QWEN_ADDED_TOKENS, QWEN_SPECIAL_TOKENS, Tokenizer
from qwen3moe_jax.model.cache import KVCache
from qwen3moe_jax.model.config import ModelConfig, Yarn
from qwen3moe_jax.model.moe import top_k_routing
from qwen3moe_jax.model.params import Params, init_params
from qwen3moe_jax.model.router_stats import load_balancing_loss, usage_entropy
from qwen3moe_jax.model.transformer import forward, lm_logits

# The chat template the bundled tokenizer carries: Qwen3's turn format, tools and thinking switch.
CHAT_TEMPLATE_PATH = Path(__file__).parents[1] / "bundled" / "chat_template.jinja"
# Tests and installed packages are not the standard library's own code; `encodings` (a third of the text,
# mostly codec tables) and `pydoc_data` (one 700 KB string of help text) are data rather than code.
SKIPPED_DIRS = {"test", "tests", "idle_test", "site-packages", "encodings", "pydoc_data"}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 256
    peak_lr: float = 3e-3
    warmup_steps: int = 40
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    # Qwen3-MoE's config uses 0.001; a model this small balances its experts poorly with so little.
    aux_loss_coef: float = 0.01
    seed: int = 0
    # Every other step, windows of this length instead (as many tokens a step), so a model tuned to a longer
    # context keeps training at its first one.
    mix_seq_len: int | None = None

    def window(self, step: int) -> tuple[int, int]:
        """(windows, tokens in each) of the batch at `step`."""
        if self.mix_seq_len is None or step % 2 == 0:
            return self.batch_size, self.seq_len
        return self.batch_size * self.seq_len // self.mix_seq_len, self.mix_seq_len


# The bundled model's shape: Qwen3-MoE's layout (GQA, q/k norms, every layer sparse, top-k weights
# renormalised, untied output head) at 4 layers, hidden 256, 16 experts of width 128, 2 active.
DEFAULT_SHAPE = {"hidden_size": 256, "num_layers": 4, "num_experts": 16, "moe_intermediate_size": 128}


def model_config(tokenizer: Tokenizer, seq_len: int, shape: dict[str, int]) -> ModelConfig:
    eot = tokenizer.token_id("<|endoftext|>")
    return ModelConfig(
        vocab_size=tokenizer.vocab_size, num_heads=8, num_kv_heads=2, head_dim=32, num_experts_per_tok=2,
        intermediate_size=512, norm_topk_prob=True, rope_theta=1e6, max_position_embeddings=seq_len,
        bos_token_id=eot, eos_token_ids=(eot,), **{**DEFAULT_SHAPE, **shape},
    )


# ------------------------------------------------------------------------------------------------ data


def corpus_files(root: Path) -> list[tuple[str, str]]:
    """(path relative to root, text) of every .py file under root outside test folders, in path order."""
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIPPED_DIRS.intersection(rel.parts[:-1]):
            continue
        try:
            files.append((rel.as_posix(), path.read_text(encoding="utf-8")))
        except (UnicodeDecodeError, OSError):
            continue  # a few stdlib files are deliberately not UTF-8
    return files


def is_held_out(rel_path: str) -> bool:
    """One file in 20 is held out, chosen by a hash of its path so the split never depends on file order."""
    return zlib.crc32(rel_path.encode()) % 20 == 0


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> Tokenizer:
    template = CHAT_TEMPLATE_PATH.read_text()
    return Tokenizer.train(texts, vocab_size, QWEN_SPECIAL_TOKENS, QWEN_ADDED_TOKENS, chat_template=template)


def token_stream(tokenizer: Tokenizer, texts: Sequence[str]) -> np.ndarray:
    """All texts as one int32 stream, each document followed by <|endoftext|>."""
    eot = tokenizer.token_id("<|endoftext|>")
    docs = tokenizer.backend.encode_batch(list(texts), add_special_tokens=False)
    return np.fromiter((t for doc in docs for t in [*doc.ids, eot]), np.int32)


def batch_windows(stream: np.ndarray, seed: int, step: int, batch_size: int, seq_len: int) -> np.ndarray:
    """batch_size random windows of seq_len + 1 tokens; the draw depends only on (seed, step)."""
    starts = np.random.default_rng([seed, step]).integers(0, len(stream) - seq_len - 1, batch_size)
    return np.stack([stream[s : s + seq_len + 1] for s in starts])


def unigram_loss(train: np.ndarray, held_out: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats/token) on held_out of token frequencies counted on train (add-one smoothed):
    the baseline a model that ignores context can reach."""
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64) + 1.0
    return float(-np.mean(np.log(counts / counts.sum())[held_out]))


# ----------------------------------------------------------------------------------------------- model


def losses(params: Params, windows: jax.Array, config: ModelConfig) -> tuple[jax.Array, jax.Array, list]:
    """(mean next-token cross-entropy, load-balancing loss, router logits) of windows [B, T + 1]."""
    inputs, targets = windows[:, :-1], windows[:, 1:]
    B, T = inputs.shape
    cache = KVCache.init(config, B, T, params.embed.dtype)  # scratch: training attends within the window
    hidden, _, router_logits = forward(params, inputs, jnp.zeros(B, jnp.int32), cache, config)
    ce = optax.softmax_cross_entropy_with_integer_labels(lm_logits(params, hidden), targets).mean()
    aux = load_balancing_loss(router_logits, config.num_experts, config.num_experts_per_tok)
    return ce, aux, router_logits


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, tc.peak_lr, tc.warmup_steps, tc.steps, end_value=tc.peak_lr * tc.final_lr_fraction
    )
    # Norm weights are not decayed: decay would pull them toward zero, not toward the identity they start at.
    decay_mask = lambda params: jax.tree.map(lambda w: w.ndim > 1, params)  # noqa: E731
    return optax.chain(
        optax.clip_by_global_norm(tc.clip_norm),
        optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=tc.weight_decay, mask=decay_mask),
    )


@partial(jax.jit, static_argnames=("config", "optimizer", "aux_loss_coef"), donate_argnames=("params", "opt_state"))
def train_step(params: Params, opt_state: Any, windows: jax.Array, config: ModelConfig,
               optimizer: optax.GradientTransformation, aux_loss_coef: float) -> tuple[Params, Any, dict]:
    def objective(p: Params) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        ce, aux, _ = losses(p, windows, config)
        return ce + aux_loss_coef * aux, (ce, aux)

    (_, (ce, aux)), grads = jax.value_and_grad(objective, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, {"loss": ce, "aux": aux,
                                                             "grad_norm": optax.tree.norm(grads)}


@partial(jax.jit, static_argnames="config")
def eval_step(params: Params, windows: jax.Array, config: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """(summed cross-entropy over the batch, expert counts [MoE layers, experts])."""
    ce, _, router_logits = losses(params, windows, config)
    counts = [jax.nn.one_hot(top_k_routing(g, config)[1], config.num_experts).sum((0, 1, 2))
              for g in router_logits if g is not None]
    return ce * windows.shape[0] * (windows.shape[1] - 1), jnp.stack(counts)


def evaluate(params: Params, config: ModelConfig, stream: np.ndarray, seq_len: int, batch_size: int,
             max_windows: int | None = None) -> tuple[float, np.ndarray]:
    """Mean cross-entropy (nats/token) over consecutive, non-overlapping windows of stream, and the
    expert counts [MoE layers, experts] on them."""
    n = (len(stream) - 1) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    n -= n % batch_size
    total, counts = 0.0, 0
    for b in range(0, n, batch_size):
        windows = np.stack([stream[i * seq_len : (i + 1) * seq_len + 1] for i in range(b, b + batch_size)])
        ce, c = eval_step(params, jnp.asarray(windows), config)
        total, counts = total + float(ce), counts + np.asarray(c)
    return total / (n * seq_len), counts


def usage_balance(counts: np.ndarray) -> dict[str, list[float]]:
    """Per MoE layer: entropy of the expert shares (1.0 = perfectly even) and the busiest expert's share
    relative to an even share."""
    share = counts / counts.sum(axis=-1, keepdims=True)
    return {"normalised_entropy": [round(float(e), 4) for e in usage_entropy(counts)],
            "max_over_even": [round(float(m), 3) for m in share.max(axis=-1) * share.shape[-1]]}


# ---------------------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, step: int, params: Params, opt_state: Any, history: list[dict]) -> None:
    """Weights, optimizer state and the loss history so far (as JSON text, so a resumed run's metrics
    cover the whole run), in one .npz file."""
    leaves = jax.tree.leaves((params, opt_state))
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, step=step, history=json.dumps(history),
             **{f"leaf{i}": np.asarray(leaf) for i, leaf in enumerate(leaves)})
    tmp.replace(path)  # a run killed mid-write keeps its previous checkpoint


def load_checkpoint(path: Path, params: Params, opt_state: Any) -> tuple[int, Params, Any, list[dict]]:
    """The step, state and history saved at path, the state shaped like (params, opt_state)."""
    treedef = jax.tree.structure((params, opt_state))
    with np.load(path) as data:
        leaves = [jnp.asarray(data[f"leaf{i}"]) for i in range(treedef.num_leaves)]
        step, history = int(data["step"]), json.loads(str(data["history"]))
    params, opt_state = jax.tree.unflatten(treedef, leaves)
    return step, params, opt_state, history


# ------------------------------------------------------------------------------------------------ main


def train(corpus: Path, out: Path, tc: TrainConfig, vocab_size: int, shape: dict[str, int], resume: bool = False,
          export: Path | None = None, qtype: str = "Q8_0", checkpoint_every: int = 100,
          eval_every: int = 100, stop_after: int | None = None, init: Path | None = None,
          yarn_factor: float | None = None) -> dict[str, Any] | None:
    """Run the whole recipe; returns the figures it also writes to out/metrics.json. With stop_after, the
    run checkpoints after that step and returns None, to be continued with resume=True. With `init` (a GGUF
    file), training starts from that model's weights and tokenizer (vocab_size and shape unused), its context set
    to tc.seq_len, with YaRN of `yarn_factor` over the context it had when given."""
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    files = corpus_files(corpus)
    train_texts = [text for rel, text in files if not is_held_out(rel)]
    held_texts = [text for rel, text in files if is_held_out(rel)]
    if not train_texts or not held_texts:
        raise SystemExit(f"{corpus}: need .py files both in the train and the held-out split")
    base = load(init, progress=False) if init is not None else None
    tokenizer = base.tokenizer if base is not None else train_tokenizer(train_texts, vocab_size)
    train_ids, held_ids = token_stream(tokenizer, train_texts), token_stream(tokenizer, held_texts)
    _log(f"corpus: {len(train_texts)} train files ({len(train_ids):,} tokens), {len(held_texts)} held-out "
         f"({len(held_ids):,} tokens); tokenizer of {tokenizer.vocab_size} tokens")

    if base is None:
        config = model_config(tokenizer, tc.seq_len, shape)
        params = init_params(config, tc.seed)
    else:
        yarn = Yarn(yarn_factor, base.config.max_position_embeddings) if yarn_factor else base.config.rope_scaling
        config, params = base.config.replace(max_position_embeddings=tc.seq_len, rope_scaling=yarn), base.params
    optimizer = make_optimizer(tc)
    opt_state = optimizer.init(params)
    first_step, history = 0, []
    checkpoint = out / "checkpoint.npz"
    if resume and checkpoint.exists():
        first_step, params, opt_state, history = load_checkpoint(checkpoint, params, opt_state)
        _log(f"resumed from {checkpoint} at step {first_step}")

    bar = tqdm(range(first_step, tc.steps), initial=first_step, total=tc.steps, desc="training", unit="step",
               file=sys.stderr)
    for step in bar:
        windows = jnp.asarray(batch_windows(train_ids, tc.seed, step, *tc.window(step)))
        params, opt_state, stats = train_step(params, opt_state, windows, config, optimizer, tc.aux_loss_coef)
        evaluating = (step + 1) % eval_every == 0
        if (step + 1) % 10 == 0 or step + 1 == tc.steps or evaluating:  # reading stats waits for the step
            row = {"step": step + 1, **{k: round(float(v), 4) for k, v in stats.items()}}
            history.append(row)
            bar.set_postfix(loss=f"{row['loss']:.3f}", aux=f"{row['aux']:.3f}")
        if evaluating:
            sample = max(tc.batch_size, 32 * 256 // tc.seq_len)  # about 8k tokens, whatever the length
            held, _ = evaluate(params, config, held_ids, tc.seq_len, tc.batch_size, max_windows=sample)
            row["held_out_loss_sample"] = round(held, 4)
            bar.write(f"step {step + 1}: train loss {row['loss']:.3f}, held-out loss {held:.3f}")
        if (step + 1) % checkpoint_every == 0 or step + 1 in (tc.steps, stop_after):
            save_checkpoint(checkpoint, step + 1, params, opt_state, history)
        if step + 1 == stop_after:
            _log(f"stopped after step {stop_after}; continue with --resume")
            return None
    train_seconds = time.perf_counter() - started

    held_loss, counts = evaluate(params, config, held_ids, tc.seq_len, tc.batch_size)
    # Every held-out token also in windows of 256, the length the bundled model was first trained and measured at.
    held_256 = held_loss if tc.seq_len == 256 else evaluate(params, config, held_ids, 256, 16)[0]
    metrics = {
        "config": dataclasses.asdict(config),
        "train_config": dataclasses.asdict(tc),
        "corpus": f"Python {sys.version.split()[0]} standard library source",
        "train_files": len(train_texts), "held_out_files": len(held_texts),
        "train_tokens": int(len(train_ids)), "held_out_tokens": int(len(held_ids)),
        "tokens_seen": tc.steps * tc.batch_size * tc.seq_len,
        "final_train_loss": float(np.mean([r["loss"] for r in history[-5:]])) if history else None,
        "held_out_loss": round(held_loss, 4),
        "held_out_loss_256": round(held_256, 4),
        "init": None if init is None else Path(init).name,
        "held_out_perplexity": round(math.exp(held_loss), 2),
        "unigram_held_out_loss": round(unigram_loss(train_ids, held_ids, config.vocab_size), 4),
        "expert_usage_held_out": usage_balance(counts),
        "seconds": round(train_seconds, 1),  # this invocation's wall time: a resumed run counts from its resume
        "backend": jax.default_backend(),
        "history": history,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    _log(f"held-out loss {held_loss:.3f} nats/token (perplexity {math.exp(held_loss):.1f}); "
         f"unigram baseline {metrics['unigram_held_out_loss']:.3f}; {train_seconds / 60:.1f} min")
    _log(f"expert usage, normalised entropy per layer: {metrics['expert_usage_held_out']['normalised_entropy']}")
    model = Model(config, params, tokenizer)
    save_gguf(model, out / "model-F32.gguf")  # lossless, for later conversions
    if export is not None:
        save_gguf(model, export, qtype)
        _log(f"wrote {export} ({export.stat().st_size / 1e6:.1f} MB, {qtype})")
    return metrics


def _log(message: str) -> None:
    print(f"[{message}]", file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", type=Path, default=Path(sysconfig.get_paths()["stdlib"]),
                   help="folder of .py files (default: this Python's standard library)")
    p.add_argument("--out", type=Path, required=True, help="folder for the checkpoint and metrics.json")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.npz if it exists")
    p.add_argument("--export", type=Path, help="write the trained model here as a GGUF file")
    p.add_argument("--qtype", default="Q8_0", choices=["F32", "BF16", "Q8_0"])
    p.add_argument("--vocab-size", type=int, default=4096)
    for name, value in DEFAULT_SHAPE.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=value)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--peak-lr", type=float, default=d.peak_lr)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--aux-loss-coef", type=float, default=d.aux_loss_coef)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--mix-seq-len", type=int, help="every other step, windows of this length (as many tokens)")
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--stop-after", type=int, help="checkpoint and stop after this step (continue with --resume)")
    p.add_argument("--init", type=Path, help="start from this GGUF model's weights and tokenizer (a longer context: "
                                             "with --seq-len and --yarn-factor)")
    p.add_argument("--yarn-factor", type=float, help="with --init: YaRN of this factor over the model's context")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0 <= args.warmup_steps < args.steps:
        parser.error(f"--warmup-steps ({args.warmup_steps}) must be below --steps ({args.steps})")
    tc = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, peak_lr=args.peak_lr,
                     warmup_steps=args.warmup_steps, aux_loss_coef=args.aux_loss_coef, seed=args.seed,
                     mix_seq_len=args.mix_seq_len)
    shape = {name: getattr(args, name) for name in DEFAULT_SHAPE}
    train(args.corpus, args.out, tc, args.vocab_size, shape, args.resume, args.export, args.qtype,
          args.checkpoint_every, args.eval_every, args.stop_after, args.init, args.yarn_factor)
    return 0
