"""Exceptions the package raises on bad input, so callers can catch them by kind."""


class Qwen3MoeError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(Qwen3MoeError, ValueError):
    """A model configuration is malformed or describes something this package does not run. `field` names
    the ModelConfig field at fault when there is one, so a loader can name its own key for it."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class CheckpointError(Qwen3MoeError, ValueError):
    """A checkpoint is missing, incomplete, or does not match its configuration."""


class ContextLengthError(Qwen3MoeError, ValueError):
    """A request needs more positions than the KV cache holds."""


class SamplingError(Qwen3MoeError, ValueError):
    """Sampling parameters or logits are out of range."""


class ConstraintError(SamplingError):
    """A request's json_schema, regex or grammar is malformed, or llguidance refuses it."""


class ChatTemplateError(Qwen3MoeError, ValueError):
    """Chat messages are malformed, or the chat template rejected them or could not be rendered."""
