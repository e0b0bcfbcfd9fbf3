"""Parity against independent implementations, built on one idea: a greedy baseline.

A baseline holds, per prompt, its token ids, the greedy continuation of N tokens one implementation
produced (EOS ignored), and that implementation's float32 logits along its own greedy path: the N rows
[N, vocab] that chose each greedy token. It comes from us, from Hugging Face transformers'
Qwen3MoeForCausalLM (Qwen3ForCausalLM for a dense Qwen3) or from llama.cpp, can be saved and loaded back, and
`check_against_baseline` measures a model against it. torch/transformers and llama-cpp-python are imported only
when asked for.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qwen3moe_jax.api import DTYPES, Model, load
from qwen3moe_jax.errors import CheckpointError, ConfigError, Qwen3MoeError
from qwen3moe_jax.io.gguf_file import GGUFTensors, is_gguf_file, read_gguf_config
from qwen3moe_jax.io.hf import hf_tensors, is_hf_dir, read_hf_config, read_hf_tokenizer
from qwen3moe_jax.io.tokenizer import Tokenizer
from qwen3moe_jax.model.params import named_leaves

SOURCES = ("ours", "transformers", "llama.cpp")
FORMAT = "qwen3moe_jax greedy baseline v1"

# Code, CJK, a chat turn with special tokens, plain English: the tokenizer and model paths real use takes.
DEFAULT_PROMPTS = (
    "def fibonacci(n):\n    ",
    "混合专家模型把每个词元发送给",
    "<|im_start|>user\nWrite a haiku about experts.<|im_end|>\n<|im_start|>assistant\n",
    "The capital of France is",
)


def require_transformers() -> None:
    """Raise a clear error when torch or transformers (the `hf` extra) is missing."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as err:
        raise Qwen3MoeError(f"transformers as a reference needs torch and transformers ({err}): "
                            "pip install 'qwen3moe-jax[hf]' (or -e '.[hf]' in a checkout)") from None


def hf_logits(model, ids: list[int]) -> np.ndarray:
    """Logits [len(ids), vocab] of a transformers Qwen3MoeForCausalLM (or dense Qwen3ForCausalLM)."""
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def hf_greedy(model, ids: list[int], new_tokens: int) -> list[int]:
    import torch

    # An explicit all-ones mask: without one, generate() treats prompt tokens equal to pad_token_id as padding.
    prompt = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, eos_token_id=None, pad_token_id=0,
        )
    return out[0, len(ids):].tolist()


def transformers_model(model: Model, device: str = "cpu"):
    """A transformers Qwen3MoeForCausalLM (Qwen3ForCausalLM without experts), eval mode, holding `model`'s weights
    in its dtype, built in memory: each param is mapped to its published HF names (io.hf.hf_tensors) and
    transformers fuses the experts into its own layout as it does when loading a checkpoint. Built on the CPU, then
    moved to `device`."""
    require_transformers()
    import torch
    import transformers

    state = {}
    for name, leaf in named_leaves(model.params).items():  # one param on the host at a time, beside the state
        for hf_name, array in hf_tensors(name, np.asarray(leaf), model.config):
            state[hf_name] = _torch_tensor(array)
    dense = not model.config.num_experts  # a dense Qwen3 (a draft model)
    config_class = transformers.Qwen3Config if dense else transformers.Qwen3MoeConfig
    model_class = transformers.Qwen3ForCausalLM if dense else transformers.Qwen3MoeForCausalLM
    config = config_class.from_dict(model.config.to_hf_dict())
    dtype = getattr(torch, model.params.embed.dtype.name)
    hf = model_class.from_pretrained(None, config=config, state_dict=state, dtype=dtype)
    return hf.to(device).eval()


def _torch_tensor(array: np.ndarray):
    import torch

    array = np.array(array, order="C")  # a writable contiguous copy: the HF layouts are transposed views
    if array.dtype.name == "bfloat16":  # numpy has no bfloat16 of its own (ml_dtypes'): hand torch the bits
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token, or None when the sequences are equal."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


@dataclass
class BaselinePrompt:
    text: str | None  # None for a prompt given as token ids
    ids: list[int]
    greedy: list[int]
    path_logits: np.ndarray  # float32 [len(greedy), vocab]: row i is the one that chose greedy[i]


@dataclass
class Baseline:
    source: str  # one of SOURCES
    model: str  # what produced it: implementation, version, dtype, checkpoint name
    new_tokens: int
    prompts: list[BaselinePrompt]

    @property
    def max_positions(self) -> int:
        """Positions a model needs to be checked against this baseline."""
        return max(len(p.ids) + len(p.greedy) for p in self.prompts)

    @staticmethod
    def logits_file(path: str | Path) -> Path:
        return Path(path).with_suffix(".npz")

    def save(self, path: str | Path) -> Path:
        """Write `path` (JSON, all but the logits) and the logits as an .npz of the same stem, returned."""
        path = Path(path)
        record = {
            "format": FORMAT, "source": self.source, "model": self.model, "new_tokens": self.new_tokens,
            "prompts": [{"text": p.text, "ids": p.ids, "greedy": p.greedy} for p in self.prompts],
        }
        path.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
        # Every prompt has exactly new_tokens path rows, so the logits stack into one [prompts, N, vocab] array.
        np.savez(self.logits_file(path), path_logits=np.stack([p.path_logits for p in self.prompts]))
        return self.logits_file(path)

    @classmethod
    def load(cls, path: str | Path) -> Baseline:
        path, npz = Path(path), cls.logits_file(path)
        try:
            record = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"cannot read the baseline {path}: {err}") from err
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            raise CheckpointError(f"{path} is not a greedy baseline (write one with scripts/greedy_baseline.py)")
        if not npz.is_file():
            raise CheckpointError(f"the baseline {path} has no logits file {npz.name} beside it")
        try:
            with np.load(npz) as arrays:
                logits = arrays["path_logits"]
            prompts = [BaselinePrompt(p["text"], [int(t) for t in p["ids"]], [int(t) for t in p["greedy"]],
                                      np.asarray(rows, np.float32))
                       for p, rows in zip(record["prompts"], logits, strict=True)]
            baseline = cls(str(record["source"]), str(record["model"]), int(record["new_tokens"]), prompts)
        except (OSError, EOFError, zipfile.BadZipFile, ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"the baseline {path} (with {npz.name}) is malformed: {err!r}") from err
        n = baseline.new_tokens
        if not prompts or any(not p.ids or len(p.greedy) != n or len(p.path_logits) != n for p in prompts):
            raise CheckpointError(f"the baseline {path} is malformed: it needs prompts, each with ids, "
                                  f"{n} greedy tokens and as many logit rows")
        return baseline


def add_prompt_args(parser) -> None:
    """The scripts' prompt flags, read by choose_prompts: --prompt, --random-prompts, --prompt-len, --new-tokens."""
    parser.add_argument("--prompt", action="append", default=[], help="a prompt text (repeatable; default: "
                        "four built in)")
    parser.add_argument("--random-prompts", type=int, default=0, metavar="N",
                        help="also N random token-id prompts (for checkpoints without a tokenizer)")
    parser.add_argument("--prompt-len", type=int, default=24, help="length of each random prompt")
    parser.add_argument("--new-tokens", type=int, default=32)


def random_prompts(vocab_size: int, count: int, length: int, seed: int = 0) -> list[list[int]]:
    """Token-id prompts for checkpoints without a tokenizer."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab_size, length).tolist() for _ in range(count)]


def choose_prompts(
    path: str | Path, texts: Sequence[str] = (), random_count: int = 0, length: int = 24
) -> list[str | list[int]]:
    """The texts, then random_count random id prompts of `length` drawn from the vocabulary of the
    checkpoint at `path`; DEFAULT_PROMPTS when there are neither."""
    prompts: list[str | list[int]] = list(texts)
    if random_count:
        path = Path(path)
        if is_gguf_file(path):
            vocab_size = read_gguf_config(GGUFTensors(path)).vocab_size
        elif is_hf_dir(path):
            vocab_size = read_hf_config(path).vocab_size
        else:
            raise CheckpointError(f"{path} is neither a GGUF file nor a checkpoint directory with a config.json")
        prompts += random_prompts(vocab_size, random_count, length)
    return prompts or list(DEFAULT_PROMPTS)


def make_baseline(
    source: str, path: str | Path, prompts: Sequence[str | Sequence[int]], new_tokens: int = 32,
    dtype: str = "float32", progress: bool = False,
) -> Baseline:
    """Run `source` (ours, transformers or llama.cpp) on the checkpoint at `path` for each prompt (text or
    token ids): greedy for exactly new_tokens tokens, then the logits along that path in one forward pass.
    dtype is what ours and transformers compute in; llama.cpp runs the file's own types."""
    if source not in SOURCES:
        raise ConfigError(f"source must be one of {', '.join(SOURCES)}, got {source!r}")
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if source == "transformers" and dtype in ("int8", "int4"):  # our weight-only quantization
        raise ConfigError(f"transformers runs float dtypes only; check an {dtype} model against a float32 "
                             "baseline")
    if new_tokens < 1 or not prompts or not all(len(p) for p in prompts):
        raise ConfigError("a baseline needs at least one prompt, none of them empty, and one new token")
    path = Path(path)
    make = {"ours": _ours_baseline, "transformers": _transformers_baseline, "llama.cpp": _llamacpp_baseline}[source]
    model, records = make(path, prompts, new_tokens, dtype, progress)
    return Baseline(source, model, new_tokens, records)


def _require_tokenizer(path: Path, tokenizer: Tokenizer | None, prompts: Sequence[str | Sequence[int]]) -> None:
    if tokenizer is None and any(isinstance(p, str) for p in prompts):
        raise CheckpointError(f"{path} has no tokenizer: give token-id prompts instead of text "
                              "(the scripts' --random-prompts N)")


def _text_or_none(prompt: str | Sequence[int]) -> str | None:
    return prompt if isinstance(prompt, str) else None


def _ours_baseline(path, prompts, new_tokens, dtype, progress):
    model = load(path, dtype=dtype, progress=progress)
    _require_tokenizer(path, model.tokenizer, prompts)
    records = []
    for prompt in prompts:
        ids = model.encode(prompt)
        greedy = model.generate(ids, new_tokens, stop_token_ids=[])
        records.append(BaselinePrompt(_text_or_none(prompt), ids, greedy,
                                      model.logits(ids + greedy)[len(ids) - 1: -1]))
    return f"qwen3moe_jax {dtype} on {path.name}", records


def _transformers_baseline(path, prompts, new_tokens, dtype, progress):
    require_transformers()
    import torch
    import transformers

    if not is_hf_dir(path):
        raise CheckpointError(f"transformers needs a Hugging Face checkpoint directory; {path} is not one")
    tokenizer = read_hf_tokenizer(path)
    _require_tokenizer(path, tokenizer, prompts)
    # Qwen3MoeForCausalLM, or Qwen3ForCausalLM for a dense Qwen3, as the config says
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype)).eval()
    records = []
    for prompt in prompts:
        ids = tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        greedy = hf_greedy(model, ids, new_tokens)
        records.append(BaselinePrompt(_text_or_none(prompt), ids, greedy,
                                      hf_logits(model, ids + greedy)[len(ids) - 1: -1]))
    return f"transformers {transformers.__version__} {dtype} on {path.name}", records


def _llamacpp_baseline(path, prompts, new_tokens, dtype, progress):
    from qwen3moe_jax.io import llamacpp

    if not is_gguf_file(path):
        raise CheckpointError(f"llama.cpp needs a GGUF file; {path} is not one")
    # llama.cpp tokenizes the text itself; the vocabulary alone is enough, and tells the context size to ask for.
    with llamacpp.LlamaCpp(path, vocab_only=True) as vocab:
        encoded = [vocab.tokenize(p) if isinstance(p, str) else [int(t) for t in p] for p in prompts]
    records = []
    with llamacpp.LlamaCpp(path, n_ctx=max(map(len, encoded)) + new_tokens) as model:
        for prompt, ids in zip(prompts, encoded, strict=True):
            greedy = model.greedy(ids, new_tokens)
            records.append(BaselinePrompt(_text_or_none(prompt), ids, greedy,
                                          model.logits(ids + greedy)[len(ids) - 1: -1]))
    return f"llama.cpp (llama-cpp-python {llamacpp.version()}) on {path.name}", records


def check_against_baseline(model: Model, baseline: Baseline) -> list[dict[str, Any]]:
    """Per baseline prompt: whether we tokenize its text to the same ids, where our free-running greedy
    continuation first leaves the baseline's (None: never), and along the baseline's greedy path the max
    and mean |logit error| over the full vocabulary and the share of steps our argmax takes its token.
    Everything runs on the baseline's ids, so a tokenizer mismatch shows without spoiling the rest."""
    rows = []
    for p in baseline.prompts:
        n = len(p.ids)
        ours = model.logits(p.ids + p.greedy)[n - 1: -1]
        if ours.shape != p.path_logits.shape:
            raise CheckpointError(f"the baseline's logits are {p.path_logits.shape}, this model's {ours.shape}: "
                                  "is it the same checkpoint?")
        err = np.abs(ours - p.path_logits)
        same_ids = None if p.text is None or model.tokenizer is None else model.encode(p.text) == p.ids
        rows.append({
            "prompt": p.text if p.text is not None else f"{n} ids: {' '.join(map(str, p.ids[:3]))} ...",
            "prompt_tokens": n,
            "same_ids": same_ids,
            "greedy_first_divergence": first_divergence(model.generate(p.ids, len(p.greedy), stop_token_ids=[]),
                                                        p.greedy),
            "max_abs_logit_error": float(err.max()),
            "mean_abs_logit_error": float(err.mean()),
            "argmax_agreement": float(np.mean(ours.argmax(-1) == np.array(p.greedy))),
        })
    return rows
