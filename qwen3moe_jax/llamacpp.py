"""llama.cpp as an independent reference, through llama-cpp-python (an optional extra: `pip install
'qwen3moe-jax[llamacpp]'`). Used by the parity tests and qwen3moe_jax.parity; nothing else imports it.

Two levels: `LlamaCpp` runs a GGUF file (tokenize, logits, greedy decoding) with an f32 KV cache and no
flash attention, so its numerics differ from ours only where llama.cpp's CPU kernels quantize activations
(F16/Q8 dot products against F16/quantized weights); `ggml_quantize` / `ggml_dequantize` call ggml's own
block codecs on raw arrays.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from qwen3moe_jax.errors import Qwen3MoeError

try:
    import llama_cpp
except ImportError:  # the optional extra is not installed
    llama_cpp = None

MISSING_REASON = "llama-cpp-python is not installed (pip install 'qwen3moe-jax[llamacpp]'; it builds llama.cpp)"
GGML_TYPE_F32 = 0


def available() -> bool:
    return llama_cpp is not None


def _require() -> None:
    if llama_cpp is None:
        raise Qwen3MoeError(MISSING_REASON)


class LlamaCpp:
    """One GGUF file loaded by llama.cpp on the CPU, all positions' logits kept."""

    def __init__(self, path: str | Path, n_ctx: int = 512, vocab_only: bool = False):
        _require()
        self.llm = llama_cpp.Llama(
            str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True, vocab_only=vocab_only,
            type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, flash_attn=False, n_threads=os.cpu_count() or 1,
            verbose=False,
        )

    def __enter__(self) -> LlamaCpp:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.llm.close()

    def tokenize(self, text: str) -> list[int]:
        """As llama.cpp tokenizes a prompt with special tokens parsed and no BOS added."""
        return self.llm.tokenize(text.encode(), add_bos=False, special=True)

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """float32 [len(ids), vocab] from one evaluation of `ids` on a fresh cache."""
        self.llm.reset()
        self.llm.eval(list(ids))
        return np.array(self.llm.scores[: len(ids)], np.float32)

    def greedy(self, ids: Sequence[int], max_new_tokens: int) -> list[int]:
        """Argmax decoding, one token per step through llama.cpp's KV cache (no stop tokens)."""
        self.llm.reset()
        self.llm.eval(list(ids))
        out: list[int] = []
        for _ in range(max_new_tokens):
            token = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            out.append(token)
            self.llm.eval([token])
        return out


def chat_apply_template(template: str, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """llama.cpp's built-in chat formatting (llama_chat_apply_template): it recognises a template's family
    (ChatML for Qwen) by its markers and formats in C++, without a Jinja engine."""
    _require()
    chat = (llama_cpp.llama_chat_message * len(messages))(
        *[llama_cpp.llama_chat_message(role=m["role"].encode(), content=m["content"].encode()) for m in messages]
    )
    size = 4096
    while True:
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_chat_apply_template(template.encode(), chat, len(messages), add_generation_prompt,
                                                buf, size)
        if n < 0:
            raise Qwen3MoeError("llama.cpp does not recognise this chat template")
        if n <= size:
            return buf.raw[:n].decode()
        size = n


def quantize_file(src: str | Path, dst: str | Path, ftype: str) -> None:
    """llama.cpp's own quantizer (llama-quantize) on a GGUF file: ftype is a preset such as "Q4_K_M",
    "Q5_K_M", "Q6_K", "Q4_0", which mixes types per tensor as llama.cpp decides."""
    _require()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = os.cpu_count() or 1
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise Qwen3MoeError(f"llama.cpp could not quantize {src} to {ftype}")


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


class _TypeTraits(ctypes.Structure):  # ggml.h `struct ggml_type_traits`
    _fields_ = [
        ("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64), ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t), ("is_quantized", ctypes.c_bool), ("to_float", _TO_FLOAT),
        ("from_float_ref", ctypes.c_void_p),
    ]


def _ggml() -> ctypes.CDLL:
    _require()
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    return lib


def ggml_quantize(x: np.ndarray, qtype: int) -> np.ndarray:
    """ggml's quantization of a float32 [rows, cols] array: uint8 [rows, bytes per row]."""
    lib = _ggml()
    traits = lib.ggml_get_type_traits(int(qtype)).contents
    x = np.ascontiguousarray(x, np.float32)
    rows, cols = x.shape
    out = np.zeros((rows, cols // traits.blck_size * traits.type_size), np.uint8)
    lib.ggml_quantize_chunk(int(qtype), x.ctypes.data, out.ctypes.data, 0, rows, cols, None)
    return out


def ggml_dequantize(blocks: np.ndarray, qtype: int, shape: tuple[int, ...]) -> np.ndarray:
    """ggml's own `to_float` for a type, on raw blocks: float32 of `shape`."""
    if int(qtype) == GGML_TYPE_F32:  # ggml has no converter for its native type
        return np.array(blocks, np.float32).reshape(shape)
    traits = _ggml().ggml_get_type_traits(int(qtype)).contents
    blocks = np.ascontiguousarray(blocks)
    out = np.zeros(shape, np.float32)
    traits.to_float(blocks.ctypes.data, out.ctypes.data, out.size)
    return out
