"""The model shape: one frozen dataclass, built from a Hugging Face config.json or a named preset.

A dense Qwen3 (`Qwen3ForCausalLM`, model_type "qwen3", e.g. Qwen3-0.6B, the usual draft model for speculative
decoding) is the same model with no experts: every layer takes the dense MLP path (num_experts = 0)."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from pathlib import Path
from typing import Any

from qwen3moe_jax.errors import ConfigError

# Presets are Hugging Face config.json files, so a preset and a real checkpoint are read the same way.
# They live in the repository's configs/ folder; wheels carry a copy inside the package.
_PACKAGE = Path(__file__).parents[1]
_PRESET_DIRS = (_PACKAGE / "configs", _PACKAGE.parent / "configs")  # in a wheel, in a checkout
MODEL_TYPES = ("qwen3_moe", "qwen3")  # Hugging Face's names of Qwen3-MoE and dense Qwen3


@dataclasses.dataclass(frozen=True)
class Yarn:
    """YaRN rope scaling (rope_type "yarn"), with transformers' parameter names and defaults: rotary frequencies
    above beta_fast rotations over the original context are kept, those below beta_slow divided by `factor`, a
    linear ramp between; cos and sin are multiplied by the attention factor (None: YaRN's 0.1 ln(factor) + 1)."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None

    def __post_init__(self) -> None:
        for name in ("factor", "beta_fast", "beta_slow"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0 < value < math.inf:
                raise ConfigError(f"rope scaling {name} must be a positive finite number, got {value!r}", name)
        value = self.attention_factor
        if value is not None and (not isinstance(value, numbers.Real) or isinstance(value, bool)
                                  or not 0 < value < math.inf):
            raise ConfigError(f"rope scaling attention_factor must be a positive finite number, got {value!r}",
                              "attention_factor")
        if not _index(self.original_max_position_embeddings, None) or self.original_max_position_embeddings < 1:
            raise ConfigError("rope scaling original_max_position_embeddings must be a positive integer, got "
                              f"{self.original_max_position_embeddings!r}", "original_max_position_embeddings")

    @property
    def mscale(self) -> float:
        """YaRN's own attention factor for `factor` (the paper's eq. 21; llama.cpp multiplies its attn_factor by it)."""
        return 1.0 if self.factor <= 1 else 0.1 * math.log(self.factor) + 1.0

    @property
    def scale(self) -> float:
        """What cos and sin are multiplied by."""
        return self.mscale if self.attention_factor is None else self.attention_factor

    def to_hf_dict(self) -> dict[str, Any]:
        fields = dataclasses.asdict(self)
        return {"rope_type": "yarn"} | {k: v for k, v in fields.items() if v is not None}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and hyper-parameters of a Qwen3-MoE model. Hashable, so it can be a static jit argument."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    intermediate_size: int  # width of the dense MLP layers, if any
    norm_topk_prob: bool = True
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    rope_scaling: Yarn | None = None  # None: the default rotary
    mlp_only_layers: tuple[int, ...] = ()
    decoder_sparse_step: int = 1
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # How the MoE block runs, not part of the checkpoint: a name of moe.MOE_KERNELS. A static field, so the jit
    # steps that take the config compile the chosen kernel in (once per model, never per request).
    moe_kernel: str = "auto"

    def __post_init__(self) -> None:
        """Every field's type and range, and the relations between fields: the one check of a shape, whichever
        loader read it, so nothing later divides by zero or allocates for an absurd size."""
        def integer(name: str, low: int) -> None:
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool):
                raise ConfigError(f"{name} must be an integer, got {value!r}", name)
            if value < low:
                raise ConfigError(f"{name} must be {'positive' if low else 'non-negative'}, got {value}", name)

        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "max_position_embeddings", "decoder_sparse_step"):
            integer(name, 1)
        for name in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "intermediate_size"):
            integer(name, 0)
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0 < value < math.inf:
                raise ConfigError(f"{name} must be a positive finite number, got {value!r}", name)
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, Yarn):
            raise ConfigError(f"rope_scaling must be a Yarn or None, got {self.rope_scaling!r}", "rope_scaling")
        for name in ("norm_topk_prob", "tie_word_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}", name)
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})", "num_kv_heads"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}", "head_dim")
        if self.num_experts and not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ConfigError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) must be in 1..num_experts ({self.num_experts})",
                "num_experts_per_tok",
            )
        if self.num_experts and not self.moe_intermediate_size:
            raise ConfigError("moe_intermediate_size must be positive in a model with experts", "moe_intermediate_size")
        for name, bound in (("mlp_only_layers", None), ("eos_token_ids", self.vocab_size)):
            ids = getattr(self, name)
            if not isinstance(ids, tuple) or not all(_index(i, bound) for i in ids):
                below = "" if bound is None else f" below {bound}"
                raise ConfigError(f"{name} must be a tuple of non-negative integers{below}, got {ids!r}", name)
        if self.bos_token_id is not None and not _index(self.bos_token_id, self.vocab_size):
            raise ConfigError(f"bos_token_id must be in 0..{self.vocab_size - 1}, got {self.bos_token_id!r}",
                              "bos_token_id")
        # Layer 0 is dense whenever decoder_sparse_step > 1 (transformers' rule, see is_moe_layer).
        has_dense = not self.num_experts or self.mlp_only_layers or self.decoder_sparse_step > 1
        if has_dense and not self.intermediate_size:
            raise ConfigError("intermediate_size must be positive in a model with dense layers", "intermediate_size")

    def is_moe_layer(self, layer: int) -> bool:
        """Whether `layer` uses the sparse MoE block; the rule is transformers' Qwen3MoeDecoderLayer's."""
        return (
            layer not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer + 1) % self.decoder_sparse_step == 0
        )

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> ModelConfig:
        """Build from the fields of a Hugging Face Qwen3-MoE or dense Qwen3 config.json (transformers 4 or 5
        layout). Values are passed on as they are, so __post_init__ judges their types and ranges."""
        if not isinstance(hf, dict):
            raise ConfigError(f"a config must be a JSON object, got {type(hf).__name__}")
        model_type = hf.get("model_type", "qwen3_moe")
        if model_type not in MODEL_TYPES:
            raise ConfigError(f"expected model_type 'qwen3_moe' or 'qwen3', got {model_type!r}", "model_type")
        if any(kind != "full_attention" for kind in hf.get("layer_types") or ()):
            raise ConfigError("layer_types other than full_attention (sliding windows) are not supported",
                              "layer_types")
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"only hidden_act 'silu' is supported, got {hf['hidden_act']!r}", "hidden_act")
        if hf.get("attention_bias", False):
            raise ConfigError("attention_bias=true is not a Qwen3-MoE layout and is not supported", "attention_bias")
        if hf.get("use_sliding_window", False):
            raise ConfigError("use_sliding_window=true is not supported (Qwen3-MoE checkpoints do not use it)",
                              "use_sliding_window")

        # transformers 5 moved rope_theta into rope_parameters; 4.x kept it top level beside rope_scaling.
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise ConfigError(f"rope_parameters must be an object, got {rope!r}", "rope_parameters")
        rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        rope_scaling = _yarn_from_hf(rope, hf.get("max_position_embeddings", 32768))

        def listed(value: Any) -> Any:  # JSON lists -> the tuples a frozen config holds
            return tuple(value) if isinstance(value, list) else value

        eos = hf.get("eos_token_id")
        try:
            hidden, num_heads = hf["hidden_size"], hf["num_attention_heads"]
            derived_head_dim = hidden // num_heads if _index(hidden, None) and _index(num_heads, None) and num_heads \
                else 0  # left to __post_init__ to name the field at fault
            return cls(
                vocab_size=hf["vocab_size"],
                hidden_size=hidden,
                num_layers=hf["num_hidden_layers"],
                num_heads=num_heads,
                num_kv_heads=num_heads if hf.get("num_key_value_heads") is None else hf["num_key_value_heads"],
                head_dim=hf.get("head_dim") or derived_head_dim,
                num_experts=0 if model_type == "qwen3" else hf.get("num_experts", hf.get("num_local_experts", 0)),
                num_experts_per_tok=hf.get("num_experts_per_tok", 1),
                moe_intermediate_size=hf.get("moe_intermediate_size", 0),
                intermediate_size=hf.get("intermediate_size", 0),
                norm_topk_prob=hf.get("norm_topk_prob", False),
                rms_norm_eps=_real(hf.get("rms_norm_eps", 1e-6)),
                rope_theta=_real(rope_theta),
                tie_word_embeddings=hf.get("tie_word_embeddings", False),
                max_position_embeddings=hf.get("max_position_embeddings", 32768),
                rope_scaling=rope_scaling,
                mlp_only_layers=listed(hf.get("mlp_only_layers") or ()),
                decoder_sparse_step=hf.get("decoder_sparse_step", 1),
                bos_token_id=hf.get("bos_token_id"),
                eos_token_ids=() if eos is None else listed(eos) if isinstance(eos, list) else (eos,),
            )
        except KeyError as missing:
            raise ConfigError(f"config.json lacks the required field {missing}", str(missing).strip("'")) from None

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json fields of this shape (transformers 5 layout): a dense Qwen3's when it has no experts;
        from_hf_dict reads them back."""
        if not self.num_experts:
            return {
                "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_act": "silu",
                "attention_bias": False, "use_sliding_window": False, "vocab_size": self.vocab_size,
                "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
                "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
                "num_key_value_heads": self.num_kv_heads, "head_dim": self.head_dim,
                "rms_norm_eps": self.rms_norm_eps,
                "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
                "tie_word_embeddings": self.tie_word_embeddings,
                "max_position_embeddings": self.max_position_embeddings, "bos_token_id": self.bos_token_id,
                "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0],
            }
        return {
            "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_act": "silu",
            "attention_bias": False, "use_sliding_window": False,
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "num_experts": self.num_experts,
            "num_experts_per_tok": self.num_experts_per_tok, "moe_intermediate_size": self.moe_intermediate_size,
            "intermediate_size": self.intermediate_size, "norm_topk_prob": self.norm_topk_prob,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": (self.rope_scaling.to_hf_dict() if self.rope_scaling else {"rope_type": "default"})
            | {"rope_theta": self.rope_theta},
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings, "mlp_only_layers": list(self.mlp_only_layers),
            "decoder_sparse_step": self.decoder_sparse_step, "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0],
        }

    @classmethod
    def from_json_file(cls, path: str | Path) -> ModelConfig:
        """A config.json; every error names the file."""
        try:
            hf = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ConfigError(f"{path} is not a readable JSON file: {err}") from None
        try:
            return cls.from_hf_dict(hf)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}", err.field) from None

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


# YaRN's fields in a config.json's rope_parameters (transformers 5) or rope_scaling (4.x); other keys are refused,
# so that nothing that changes the frequencies is silently ignored.
_YARN_KEYS = {"rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings", "beta_fast",
              "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate"}


def _yarn_from_hf(rope: dict[str, Any], max_positions: Any) -> Yarn | None:
    """The rope scaling of a config.json's rope fields: None for the default rotary, a Yarn as transformers'
    `_compute_yarn_parameters` reads it; any other rope type is a ConfigError naming it."""
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type != "yarn":
        raise ConfigError(f"rope_type {rope_type!r} is not supported; only the default rotary and 'yarn' are",
                          "rope_type")
    if unknown := sorted(set(rope) - _YARN_KEYS):
        raise ConfigError(f"yarn rope scaling: unsupported fields {unknown}", "rope_scaling")
    if rope.get("truncate", True) is not True:
        raise ConfigError("yarn rope scaling with truncate=false is not supported (llama.cpp always truncates)",
                          "truncate")
    original = rope.get("original_max_position_embeddings")
    if original is None:
        raise ConfigError("yarn rope scaling needs original_max_position_embeddings",
                          "original_max_position_embeddings")
    factor = rope.get("factor")
    if factor is None and _index(max_positions, None) and _index(original, None) and original:
        factor = max_positions / original  # transformers' rule when the factor is left out
    attention_factor = rope.get("attention_factor")
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
    if attention_factor is None and mscale and mscale_all_dim:  # DeepSeek's form, folded into one number
        yarn = Yarn(_real(factor), original)  # checks the factor first
        attention_factor = _mscale(yarn.factor, mscale) / _mscale(yarn.factor, mscale_all_dim)
    return Yarn(_real(factor), original, _real(rope.get("beta_fast") or 32.0), _real(rope.get("beta_slow") or 1.0),
                _real(attention_factor) if attention_factor is not None else None)


def _mscale(factor: float, mscale: Any) -> float:
    if not isinstance(mscale, numbers.Real) or isinstance(mscale, bool):
        raise ConfigError(f"yarn rope scaling mscale values must be numbers, got {mscale!r}", "mscale")
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _real(value: Any) -> Any:
    """A JSON number as a float; anything else as it is, for __post_init__ to refuse by name."""
    return float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else value


def _index(value: Any, bound: int | None) -> bool:
    """Whether value is an integer in 0..bound-1 (any non-negative integer without a bound)."""
    integral = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    return integral and 0 <= value and (bound is None or value < bound)


def preset_names() -> list[str]:
    return sorted({p.stem for d in _PRESET_DIRS if d.is_dir() for p in d.glob("*.json")})


def preset(name: str) -> ModelConfig:
    """A named shape from configs/, e.g. 'qwen3-30b-a3b' or 'tiny'."""
    for directory in _PRESET_DIRS:
        path = directory / f"{name}.json"
        if path.is_file():
            return ModelConfig.from_json_file(path)
    raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(preset_names())}")
