"""llama.cpp as an independent reference, through llama-cpp-python (an optional extra: `pip install
'qwen3moe-jax[llamacpp]'`). Used by the parity tests and qwen3moe_jax.tools.parity; nothing else imports it.

Two levels: `LlamaCpp` runs a GGUF file (tokenize, logits, greedy decoding) with an f32 KV cache and no
flash attention, so its numerics differ from ours only where llama.cpp's CPU kernels quantize activations
(F16/Q8 dot products against F16/quantized weights); `ggml_quantize` / `ggml_dequantize` call ggml's own
block codecs on raw arrays.

llama.cpp is native code that can die (an illegal instruction where it was built for another CPU, a
segmentation fault on a file it misreads), taking its process with it. So it never runs in ours: every call
goes to a child process (`Worker`, started with 'spawn', so it shares no threads or JAX state with us), and a
child that dies becomes a `LlamaCppCrashed` naming the signal, which fails the caller and nothing else.
"""

from __future__ import annotations

import ctypes
import faulthandler
import importlib.metadata
import importlib.util
import multiprocessing
import os
import signal
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from qwen3moe_jax.errors import Qwen3MoeError

MISSING_REASON = "llama-cpp-python is not installed (pip install 'qwen3moe-jax[llamacpp]'; it builds llama.cpp)"
GGML_TYPE_F32 = 0


class LlamaCppCrashed(Qwen3MoeError):
    """llama.cpp's process died inside a call (a signal in native code, or an abrupt exit)."""


def available() -> bool:
    # Looked up, not imported: importing loads llama.cpp's native libraries, which happens in the child only.
    return importlib.util.find_spec("llama_cpp") is not None


def version() -> str:
    _require()
    return importlib.metadata.version("llama-cpp-python")


def _require() -> None:
    if not available():
        raise Qwen3MoeError(MISSING_REASON)


class Worker:
    """A child process that runs the module-level functions sent to it, one call at a time, and keeps
    whatever state they leave in its globals (the loaded model). A death of the child, at any point of a
    call, raises LlamaCppCrashed; the worker is unusable afterwards."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child_end = context.Pipe()
        self._process = context.Process(target=_serve, args=(child_end,), daemon=True, name="llama.cpp")
        self._process.start()
        child_end.close()

    def call(self, function: Callable[..., Any], *args: Any) -> Any:
        try:
            self._conn.send((function, args))
            ok, value = self._conn.recv()
        except (EOFError, BrokenPipeError, ConnectionResetError):
            raise self._crashed(function.__name__) from None
        if not ok:
            raise value
        return value

    def _crashed(self, what: str) -> LlamaCppCrashed:
        self._process.join(timeout=10)
        code = self._process.exitcode
        if code is not None and code < 0:
            name = signal.Signals(-code).name
            cause = f"killed by {name} ({signal.strsignal(-code)})"
            if name == "SIGILL":
                cause += ": llama.cpp was compiled for instructions this CPU lacks (rebuild it with portable " \
                         "flags, as `make test` does)"
        else:
            cause = f"exited with status {code}"
        return LlamaCppCrashed(f"llama.cpp's process died during {what}: {cause}")

    def close(self) -> None:
        if self._process.is_alive():
            try:
                self._conn.send(None)
            except OSError:
                pass
            self._process.join(timeout=10)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()
        self._conn.close()

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _serve(conn: Connection) -> None:
    """The child's loop: (function, args) in, (True, result) or (False, exception) out, until None."""
    faulthandler.enable()  # a native crash prints where it happened, on the stderr the parent shows
    while (request := conn.recv()) is not None:
        function, args = request
        try:
            reply = (True, function(*args))
        except Exception as err:  # sent back to be raised in the caller
            reply = (False, err if isinstance(err, Qwen3MoeError) else Qwen3MoeError(f"llama.cpp: {err!r}"))
        conn.send(reply)


_shared: Worker | None = None


def _call(function: Callable[..., Any], *args: Any) -> Any:
    """One call on a worker shared by the stateless functions below, started on first use and again after
    a crash."""
    global _shared
    _require()
    if _shared is None:
        _shared = Worker()
    try:
        return _shared.call(function, *args)
    except LlamaCppCrashed:
        _shared.close()
        _shared = None
        raise


class LlamaCpp:
    """One GGUF file loaded by llama.cpp on the CPU in a child process of its own, all positions' logits kept."""

    def __init__(self, path: str | Path, n_ctx: int = 512, vocab_only: bool = False):
        _require()
        self._worker = Worker()
        try:
            self._worker.call(_load, str(path), n_ctx, vocab_only)
        except BaseException:
            self._worker.close()
            raise

    def __enter__(self) -> LlamaCpp:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._worker.close()

    def tokenize(self, text: str) -> list[int]:
        """As llama.cpp tokenizes a prompt with special tokens parsed and no BOS added."""
        return self._worker.call(_tokenize, text)

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """float32 [len(ids), vocab] from one evaluation of `ids` on a fresh cache."""
        return self._worker.call(_logits, [int(i) for i in ids])

    def greedy(self, ids: Sequence[int], max_new_tokens: int) -> list[int]:
        """Argmax decoding, one token per step through llama.cpp's KV cache (no stop tokens)."""
        return self._worker.call(_greedy, [int(i) for i in ids], max_new_tokens)

    def metadata(self) -> dict[str, str]:
        """The GGUF metadata as llama.cpp read it (values as strings)."""
        return self._worker.call(_metadata)


# What runs in the child. The loaded model lives in this module's globals there.
_llm: Any = None


def _llama_cpp() -> Any:
    import llama_cpp

    return llama_cpp


def _load(path: str, n_ctx: int, vocab_only: bool) -> None:
    global _llm
    _llm = _llama_cpp().Llama(
        path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True, vocab_only=vocab_only,
        type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, flash_attn=False, n_threads=os.cpu_count() or 1,
        verbose=False,
    )


def _tokenize(text: str) -> list[int]:
    return _llm.tokenize(text.encode(), add_bos=False, special=True)


def _logits(ids: list[int]) -> np.ndarray:
    _llm.reset()
    _llm.eval(ids)
    return np.array(_llm.scores[: len(ids)], np.float32)


def _greedy(ids: list[int], max_new_tokens: int) -> list[int]:
    _llm.reset()
    _llm.eval(ids)
    out: list[int] = []
    for _ in range(max_new_tokens):
        token = int(np.argmax(_llm.scores[_llm.n_tokens - 1]))
        out.append(token)
        _llm.eval([token])
    return out


def _metadata() -> dict[str, str]:
    return dict(_llm.metadata)


def chat_apply_template(template: str, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """llama.cpp's built-in chat formatting (llama_chat_apply_template): it recognises a template's family
    (ChatML for Qwen) by its markers and formats in C++, without a Jinja engine."""
    return _call(_chat_apply_template, template, [dict(m) for m in messages], add_generation_prompt)


def quantize_file(src: str | Path, dst: str | Path, ftype: str) -> None:
    """llama.cpp's own quantizer (llama-quantize) on a GGUF file: ftype is a preset such as "Q4_K_M",
    "Q5_K_M", "Q6_K", "Q4_0", which mixes types per tensor as llama.cpp decides."""
    _call(_quantize_file, str(src), str(dst), ftype)


def ggml_quantize(x: np.ndarray, qtype: int) -> np.ndarray:
    """ggml's quantization of a float32 [rows, cols] array: uint8 [rows, bytes per row]."""
    return _call(_ggml_quantize, np.ascontiguousarray(x, np.float32), int(qtype))


def ggml_dequantize(blocks: np.ndarray, qtype: int, shape: tuple[int, ...]) -> np.ndarray:
    """ggml's own `to_float` for a type, on raw blocks: float32 of `shape`."""
    if int(qtype) == GGML_TYPE_F32:  # ggml has no converter for its native type
        return np.array(blocks, np.float32).reshape(shape)
    return _call(_ggml_dequantize, np.ascontiguousarray(blocks), int(qtype), tuple(shape))


def _chat_apply_template(template: str, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    llama_cpp = _llama_cpp()
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


def _quantize_file(src: str, dst: str, ftype: str) -> None:
    llama_cpp = _llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = os.cpu_count() or 1
    if llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params)) != 0:
        raise Qwen3MoeError(f"llama.cpp could not quantize {src} to {ftype}")


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


class _TypeTraits(ctypes.Structure):  # ggml.h `struct ggml_type_traits`
    _fields_ = [
        ("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64), ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t), ("is_quantized", ctypes.c_bool), ("to_float", _TO_FLOAT),
        ("from_float_ref", ctypes.c_void_p),
    ]


def _ggml() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(Path(_llama_cpp().__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    return lib


def _ggml_quantize(x: np.ndarray, qtype: int) -> np.ndarray:
    lib = _ggml()
    traits = lib.ggml_get_type_traits(qtype).contents
    rows, cols = x.shape
    out = np.zeros((rows, cols // traits.blck_size * traits.type_size), np.uint8)
    lib.ggml_quantize_chunk(qtype, x.ctypes.data, out.ctypes.data, 0, rows, cols, None)
    return out


def _ggml_dequantize(blocks: np.ndarray, qtype: int, shape: tuple[int, ...]) -> np.ndarray:
    traits = _ggml().ggml_get_type_traits(qtype).contents
    out = np.zeros(shape, np.float32)
    traits.to_float(blocks.ctypes.data, out.ctypes.data, out.size)
    return out
