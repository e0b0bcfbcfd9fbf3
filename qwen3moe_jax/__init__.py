"""qwen3moe-jax: a JAX reference implementation of Qwen3-MoE inference."""

from qwen3moe_jax.api import Model, load, random_model, save_gguf, save_hf
from qwen3moe_jax.errors import (
    CheckpointError,
    ConfigError,
    ConstraintError,
    ContextLengthError,
    Qwen3MoeError,
    SamplingError,
)
from qwen3moe_jax.model.cache import KVCache
from qwen3moe_jax.model.config import ModelConfig, Yarn, preset, preset_names
from qwen3moe_jax.model.sharding import make_mesh
from qwen3moe_jax.runtime.evaluation import Perplexity, Score
from qwen3moe_jax.runtime.sampling import SamplingParams

__all__ = [
    "CheckpointError",
    "ConfigError",
    "ConstraintError",
    "ContextLengthError",
    "KVCache",
    "Model",
    "ModelConfig",
    "Perplexity",
    "Yarn",
    "Qwen3MoeError",
    "SamplingError",
    "SamplingParams",
    "Score",
    "load",
    "make_mesh",
    "preset",
    "preset_names",
    "random_model",
    "save_gguf",
    "save_hf",
]
