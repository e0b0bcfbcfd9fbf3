"""lm-evaluation-harness (the `eval` extra: `pip install 'qwen3moe-jax[eval]'`) over the batched engine: `Qwen3MoeLM`,
a model of lm-eval's Python API, and `evaluate`, which runs tasks on it offline.

lm-eval hands the model three kinds of request, each answered through the model's scheduler, many at a time:
- loglikelihood (multiple choice): Model.score_batch over the (context, continuation) pairs lm-eval tokenized,
  contexts they share computed once (runtime/evaluation.py);
- loglikelihood_rolling (perplexity tasks): lm-eval's own disjoint rolling windows of the cache's length, scored so;
- generate_until: Model.complete_batch, greedy unless the task samples, stopping at the task's strings.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from qwen3moe_jax.api import Model, load
from qwen3moe_jax.errors import Qwen3MoeError
from qwen3moe_jax.runtime.sampling import SamplingParams

# Local task files only: lm-eval and the datasets library are told not to reach the network (set before they load).
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

try:
    import lm_eval.models  # noqa: F401 (lm-eval's own models register first: it loads them only into an empty registry)
    from lm_eval import utils as lm_eval_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as err:
    raise Qwen3MoeError("lm-evaluation-harness is not installed: pip install 'qwen3moe-jax[eval]' (or "
                        "pip install -e '.[eval]' in a checkout)") from err


@register_model("qwen3moe-jax")
class Qwen3MoeLM(TemplateLM):
    """A Model as lm-eval's LM. Give a loaded `model`, or `pretrained` (a checkpoint path; None: the bundled model)
    with load's keywords (lm-eval's --model_args: pretrained=PATH,dtype=bfloat16,max_batch=8)."""

    def __init__(self, model: Model | None = None, pretrained: str | None = None, **load_kwargs: Any) -> None:
        super().__init__()
        if model is None:
            load_kwargs.setdefault("max_batch", 8)
            load_kwargs = {k: int(v) if k in ("max_batch", "max_seq_len") else v for k, v in load_kwargs.items()}
            model = load(pretrained, **load_kwargs)
        if model.tokenizer is None:
            raise Qwen3MoeError("lm-eval's tasks are text: the model needs a tokenizer")
        self.model = model

    @property
    def eot_token_id(self) -> int:
        return self.model.config.eos_token_ids[0]

    @property
    def max_length(self) -> int:
        return self.model.max_seq_len

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.model.encode(string)  # Qwen3 adds no BOS

    def tok_decode(self, tokens: list[int]) -> str:
        return self.model.tokenizer.decode(tokens)

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple]:
        """(log-likelihood, greedy) of each (key, context ids, continuation ids); a context longer than the cache
        holds beside its continuation loses its first tokens, as lm-eval's own models do."""
        pairs = []
        for _, context, continuation in requests:
            whole = (context + continuation)[-self.max_length:]
            if len(whole) <= len(continuation):
                raise Qwen3MoeError(f"a continuation of {len(continuation)} tokens leaves no room for context in "
                                    f"the KV cache of {self.max_length}: load with a larger max_seq_len")
            pairs.append((whole[: len(whole) - len(continuation)], continuation))
        scores = self.model.score_batch(pairs, progress=not disable_tqdm)
        answers = [(s.logprob, s.greedy) for s in scores]
        for (key, _, _), answer in zip(requests, answers, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return answers

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of each whole text, in lm-eval's disjoint windows of the cache's length (each window
        conditioned on the tokens before it in the window; the first on the end-of-text token)."""
        windows, owner = [], []
        for i, (text,) in enumerate(request.args for request in requests):
            rolling = lm_eval_utils.get_rolling_token_windows(self.tok_encode(text), self.prefix_token_id,
                                                              self.max_length - 1, context_len=1)
            for context, continuation in map(lm_eval_utils.make_disjoint_window, rolling):
                windows.append((None, context, continuation))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm), strict=True):
            totals[i] += logprob
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Each context's completion up to the first of its `until` strings (left out), greedy unless the task asks
        for sampling; the context loses its first tokens where it and max_gen_toks do not fit the cache."""
        prompts, settings = [], []
        for context, kwargs in (request.args for request in requests):
            kwargs = dict(kwargs)
            until = kwargs.pop("until", None) or []
            max_new = min(int(kwargs.pop("max_gen_toks", 256)), self.max_length - 1)
            temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", False) else 0.0
            ids = self.tok_encode(context)[-(self.max_length - max_new):]
            prompts.append(ids)
            settings.append(SamplingParams(max_new_tokens=max_new, temperature=temperature,
                                           stop=tuple([until] if isinstance(until, str) else until)))
        texts = [c.text for c in self.model.complete_batch(prompts, settings)]
        for request, text in zip(requests, texts, strict=True):
            self.cache_hook.add_partial("generate_until", request.args, text)
        return texts


def evaluate(model: Model, tasks: list[str], include_path: str | Path | None = None, limit: int | None = None,
             num_fewshot: int | None = None, log_samples: bool = False) -> dict[str, Any]:
    """lm-eval's results of `tasks` on the model: the task files under include_path, or without one lm-eval's own
    tasks (indexing those takes lm-eval seconds to tens of seconds). Offline: a task's data must be local (e.g.
    `dataset_path: json` with `dataset_kwargs: {data_files: ...}`), or in the datasets cache already."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include_path), include_defaults=False) if include_path is not None \
        else TaskManager()
    results = simple_evaluate(model=Qwen3MoeLM(model), tasks=tasks, task_manager=manager, limit=limit,
                              num_fewshot=num_fewshot, log_samples=log_samples, bootstrap_iters=0)
    if results is None:
        raise Qwen3MoeError("lm-eval returned no results")
    return results


def format_results(results: dict[str, Any]) -> str:
    """lm-eval's table of the results."""
    return lm_eval_utils.make_table(results)


def results_json(results: dict[str, Any]) -> str:
    """The results as lm-eval writes them (what JSON cannot hold, as text)."""
    import json

    kept = {key: results[key] for key in ("results", "versions", "n-shot", "configs") if key in results}
    return json.dumps(kept, indent=1, default=lm_eval_utils.handle_non_serializable) + "\n"
