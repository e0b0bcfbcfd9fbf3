"""C++ kernels for the float32 matrix-vector products of a decode step on the CPU backend (cpu_kernels.cc), called
through XLA's FFI: `matmul`, a few rows times a weight matrix (matmul.einsum takes it for decode-sized products),
and `experts_swiglu`, the "cpu" MoE kernel (MOE_KERNELS in moe.py; "auto" takes it for float32 decode steps). Also
`host_step`, a call from inside a jit step to a Python function (the grammar of a constrained decode step,
runtime/engine.decode_block), at a tenth of the cost of jax.pure_callback / io_callback on 2 cores.

XLA:CPU copies gathered expert weights before multiplying them, and streams a small weight matrix through its
products at about a third of memory speed; on 2 cores the expert copies alone were 36-43% of a decode step. These
kernels read each weight once, in place, on the threads of XLA's intra-op pool.

The source is compiled with the machine's C++ compiler ($CXX, else c++) against the FFI headers jaxlib
ships, with portable flags only (-O3, no -march), into a cache folder keyed by the source, jax's version and the
compiler, so it is built once per machine, when `build()` is called (by the Engine, on the CPU backend). Where it
cannot be built (no compiler), `build()` says why and the model keeps XLA's own ops.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import weakref
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from qwen3moe_jax.errors import ConfigError
from qwen3moe_jax.model import backend

SOURCE = Path(__file__).with_name("cpu_kernels.cc")
TARGETS = ("qwen3moe_cpu_matmul", "qwen3moe_cpu_experts_swiglu", "qwen3moe_cpu_host_step")
# `matmul` takes products of at most this many rows (a decode step's: more rows are a GEMM, which XLA does well) by
# weights of at most this many bytes. XLA's dot streams a large matrix well (lm_head, 16 MB: 22-35 GB/s on 2 cores)
# but a small one poorly (attention's 0.25-1 MB: 11-15 GB/s, ~1.5x slower than this kernel).
MATMUL_MAX_ROWS, MATMUL_MAX_WEIGHT_BYTES = 16, 4 << 20
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-w")  # portable: no -march, the library runs on any CPU of its kind

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "qwen3moe-jax" / "kernels"


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")


def _build(compiler: str) -> Path:
    """The compiled library, built now unless the cache already holds this exact build."""
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), jax.__version__.encode(), compiler.encode(),
                                     " ".join(FLAGS).encode(), sys.platform.encode()])).hexdigest()[:16]
    library = cache_dir() / f"cpu_kernels-{key}.so"
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    print(f"Compiling the CPU decode kernels ({SOURCE.name}), once for this machine...", file=sys.stderr,
          flush=True)
    # Built under a scratch name and renamed when complete: a concurrent or interrupted build is never loaded.
    with tempfile.TemporaryDirectory(dir=library.parent) as scratch:
        built = Path(scratch) / library.name
        subprocess.run([compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(built)],
                       check=True, capture_output=True, text=True)
        os.replace(built, library)
    return library


_NOT_BUILT = "they are not built in this process yet (cpu_kernels.build)"
_status: str | None = _NOT_BUILT  # None once built and registered; else why not


def build(quiet: bool = False) -> str | None:
    """Compile the kernels (once per machine: the library is kept in cache_dir()) and register them with XLA for
    the CPU, unless done already; None when they run in this process, else why they cannot (logged once, with
    the news that XLA's own ops run instead, unless `quiet`). The Engine builds them on the CPU backend, and a
    direct call of a kernel does; `available()` only asks."""
    global _status
    if _status == _NOT_BUILT:
        _status = _build_and_register()
    if _status is not None and not quiet:
        _warn_once(_status)
    return _status


def available() -> bool:
    """Whether the kernels are built and registered in this process. A question only: it never compiles."""
    return _status is None


def _build_and_register() -> str | None:
    compiler = _compiler()
    if compiler is None:
        return "no C++ compiler found (set CXX)"
    try:
        library = ctypes.cdll.LoadLibrary(str(_build(compiler)))
    except subprocess.CalledProcessError as e:
        errors = [line for line in e.stderr.splitlines() if "error" in line] or e.stderr.splitlines()[-5:]
        return f"compiling {SOURCE.name} failed: " + "\n".join(errors[:10])
    except OSError as e:
        return f"building or loading {SOURCE.name} failed: {e}"
    for target in TARGETS:
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, target)), platform="cpu")
    library.qwen3moe_set_host_step.argtypes = [_HostStep, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    python = [ctypes.cast(getattr(ctypes.pythonapi, name), ctypes.c_void_p)
              for name in ("PyGILState_GetThisThreadState", "PyGILState_Ensure", "PyEval_SaveThread")]
    library.qwen3moe_set_host_step(_HOST_STEP, *python)
    return None


@functools.cache
def _warn_once(reason: str) -> None:
    log.warning("The CPU decode kernels are not available, XLA's own ops run instead: %s", reason)


def with_gradient_of(reference: Callable) -> Callable:
    """Decorator: the kernel's values with reference's derivatives. These kernels have no derivatives of their own;
    reference computes the same thing with XLA's ops, so training can differentiate through a decode step."""
    def wrap(kernel: Callable) -> Callable:
        differentiable = jax.custom_vjp(kernel)
        differentiable.defvjp(lambda *args: (kernel(*args), args),
                              lambda args, grad: jax.vjp(reference, *args)[1](grad))
        return differentiable
    return wrap


def _call(target: str, out_shape: tuple[int, ...], *args: jax.Array) -> jax.Array:
    reason = build(quiet=True)
    if reason is not None:
        raise ConfigError(f"the CPU decode kernels cannot run here: {reason}")
    if any(a.dtype not in (jnp.float32, jnp.int32) for a in args):
        raise ConfigError("the CPU decode kernels multiply float32 weights: use XLA's ops (moe_kernel 'gather') "
                          "for other dtypes")
    return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(out_shape, jnp.float32))(*args)


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [M, K] @ w [K, N] in float32, each weight read once for all M rows. CPU backend only."""
    return _call("qwen3moe_cpu_matmul", (x.shape[0], w.shape[1]), x, w)


def matmul_form(spec: str, x: jax.Array, w: jax.Array) -> tuple[int, int, int] | None:
    """(M, K, N) when einsum(spec, x, w) is x [M, K] @ w [K, N] up to reshapes (x's trailing axes contracted with
    w's leading ones, in order) and `matmul` should run it here: float32 operands, at most MATMUL_MAX_ROWS rows and
    MATMUL_MAX_WEIGHT_BYTES of weights, the CPU backend and the kernels available. None otherwise."""
    if backend.platform() != "cpu" or x.dtype != jnp.float32 or w.dtype != jnp.float32:
        return None
    inputs, out = spec.split("->")
    lhs, rhs = inputs.split(",")
    if "..." in lhs:  # leading batch axes: name them with letters no spec here uses
        batch = "ABCDEFGH"[: x.ndim - len(lhs) + 3]
        lhs, out = lhs.replace("...", batch), out.replace("...", batch)
    contracted = "".join(c for c in lhs if c in rhs and c not in out)
    n = len(contracted)
    if not n or not lhs.endswith(contracted) or not rhs.startswith(contracted) or out != lhs[:-n] + rhs[n:]:
        return None
    M, K, N = math.prod(x.shape[:-n]), math.prod(x.shape[-n:]), math.prod(w.shape[n:])
    small = M <= MATMUL_MAX_ROWS and K * N * 4 <= MATMUL_MAX_WEIGHT_BYTES
    return (M, K, N) if small and available() else None


def experts_swiglu(gate: jax.Array, up: jax.Array, down: jax.Array, rows: jax.Array,
                   row_expert: jax.Array) -> jax.Array:
    """SwiGLU of each row [M, E] by its own expert's float32 weights (gate / up [X, E, F], down [X, F, E]),
    row_expert [M] in any order; rows whose expert id is X or more come out zero. CPU backend only."""
    return _call("qwen3moe_cpu_experts_swiglu", rows.shape, rows, row_expert.astype(jnp.int32), gate, up, down)


# host_step: the C side calls _run_host_step (a ctypes callback: it takes the GIL itself, from XLA's threads), which
# runs the function registered under the call's number on NumPy views of the call's buffers.
_HostStep = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                             ctypes.c_void_p, ctypes.c_void_p)
HostFill = Callable[[np.ndarray, np.ndarray, np.ndarray], None]
_host_steps: dict[int, weakref.WeakMethod] = {}


def register_host_step(fill: HostFill) -> int:
    """Number a bound method fill(tokens [B], forced [B], masks [B, W]) (int32 arrays; it writes forced and masks)
    for `host_step`; it is held weakly, so registering does not keep its object alive."""
    number = len(_host_steps)
    _host_steps[number] = weakref.WeakMethod(fill)
    return number


def host_step(number: int, tokens: jax.Array, words: int) -> tuple[jax.Array, jax.Array]:
    """Inside a jit step on the CPU backend: (forced [B], masks [B, words]) as the function registered under
    `number` fills them from tokens [B]. A failure there fails the step.

    The call changes host state, but is not marked as having a side effect: that would make JAX dispatch the
    whole step by its slow path (~2.5 ms more per decode block here). XLA could then merge two calls with the
    same operands or drop one whose results go unused; a decode block's calls each take a different step's tokens
    and their results are used, so neither happens."""
    B = tokens.shape[0]
    return jax.ffi.ffi_call("qwen3moe_cpu_host_step", (jax.ShapeDtypeStruct((B,), jnp.int32),
                                                       jax.ShapeDtypeStruct((B, words), jnp.int32)))(
        tokens.astype(jnp.int32), grammar=np.int64(number))


def _run_host_step(number: int, rows: int, words: int, tokens: int, forced: int, masks: int) -> int:
    def view(address: int, shape: tuple[int, ...]) -> np.ndarray:
        return np.frombuffer((ctypes.c_int32 * math.prod(shape)).from_address(address), np.int32).reshape(shape)

    try:
        fill = _host_steps[number]()
        if fill is None:
            raise RuntimeError(f"host step {number} belongs to an object that is gone")
        fill(view(tokens, (rows,)), view(forced, (rows,)), view(masks, (rows, words)))
        return 0
    except Exception:  # nothing may propagate into C: log it, and the C side fails the step
        log.exception("the host step of a decode step failed")
        return 1


_HOST_STEP = _HostStep(_run_host_step)  # kept alive here: the library holds its address
