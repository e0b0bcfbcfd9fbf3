"""The C++ CPU decode kernels (cpu_kernels.py) against NumPy references written here, in float64: odd widths that
leave partial blocks and slices, rows routed to experts another device holds, several rows at once, and the
derivatives training takes through them. (The model with them is checked against transformers in
test_parity_hf.py: "auto" takes them for every float32 decode step on the CPU.)"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen3moe_jax.model import cpu_kernels
from qwen3moe_jax.model.matmul import cpu_matmul, einsum
from qwen3moe_jax.model.moe_kernels import experts_swiglu_cpu
from qwen3moe_jax.model.params import MoEParams

pytestmark = pytest.mark.skipif(cpu_kernels.build() is not None, reason="the CPU kernels could not be compiled here")


def _normal(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("M, K, N", [(1, 512, 128), (3, 200, 70), (16, 64, 1)])
def test_matmul_matches_numpy(M, K, N):
    rng = np.random.default_rng(K)
    x, w = _normal(rng, M, K), _normal(rng, K, N)
    got = np.asarray(jax.jit(cpu_kernels.matmul)(x, w))
    np.testing.assert_allclose(got, x.astype(np.float64) @ w, rtol=1e-5, atol=1e-4)


def test_a_row_gets_the_same_bits_alone_and_among_others():
    """Batch invariance: each row's sums run in the same order whatever rows run with it."""
    rng = np.random.default_rng(0)
    x, w = _normal(rng, 8, 300), _normal(rng, 300, 96)
    together = np.asarray(cpu_kernels.matmul(x, w))
    for m in (0, 5):
        np.testing.assert_array_equal(np.asarray(cpu_kernels.matmul(x[m:m + 1], w))[0], together[m])


def _swiglu_reference(x, gate, up, down, experts):
    out = np.zeros(x.shape, np.float64)
    for m, e in enumerate(experts):
        if e < gate.shape[0]:
            g, u = x[m].astype(np.float64) @ gate[e], x[m].astype(np.float64) @ up[e]
            out[m] = (g / (1 + np.exp(-g)) * u) @ down[e]
    return out


@pytest.mark.parametrize("F", [20, 300])  # one partial slice; a whole slice of 256 and a partial one
def test_experts_swiglu_matches_numpy(F):
    rng = np.random.default_rng(F)
    X, E = 5, 48
    gate, up, down = _normal(rng, X, E, F) / 7, _normal(rng, X, E, F) / 7, _normal(rng, X, F, E) / 17
    x = _normal(rng, 6, E)
    experts = np.array([4, 0, 5, 2, 4, 7], np.int32)  # ids 5 and 7: held by another device, so zero rows
    got = np.asarray(jax.jit(cpu_kernels.experts_swiglu)(gate, up, down, x, experts))
    expected = _swiglu_reference(x, gate, up, down, experts)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert not got[[2, 5]].any()


def test_gradients_are_those_of_xla_ops():
    """Training differentiates through the kernels: their derivatives are their XLA references'."""
    rng = np.random.default_rng(3)
    x, w = _normal(rng, 2, 32), _normal(rng, 32, 8)
    loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))  # noqa: E731
    ours = jax.grad(loss(cpu_matmul), argnums=(0, 1))(x, w)
    xla = jax.grad(loss(lambda x, w: jnp.dot(x, w, precision="highest")), argnums=(0, 1))(x, w)
    for a, b in zip(ours, xla, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)

    X, E, F = 3, 16, 8
    p = MoEParams(router=jnp.zeros((E, X)), gate=_normal(rng, X, E, F), up=_normal(rng, X, E, F),
                  down=_normal(rng, X, F, E))
    rows, experts = _normal(rng, 4, E), jnp.array([0, 2, 1, 2])
    grad = jax.grad(lambda p, rows: jnp.sum(experts_swiglu_cpu(p, rows, experts) ** 2), argnums=(0, 1))(p, rows)
    reference = jax.grad(lambda p, rows: jnp.sum(jnp.asarray(
        [_swiglu_jnp(p, rows[m], experts[m]) for m in range(4)]) ** 2), argnums=(0, 1))(p, rows)
    for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(reference), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def _swiglu_jnp(p: MoEParams, x: jax.Array, e: jax.Array) -> jax.Array:
    hp = jax.lax.Precision.HIGHEST
    return jnp.dot(jax.nn.silu(jnp.dot(x, p.gate[e], precision=hp)) * jnp.dot(x, p.up[e], precision=hp),
                   p.down[e], precision=hp)


@pytest.mark.parametrize("spec, x_shape, w_shape, form", [
    ("bte,ehd->bthd", (1, 1, 64), (64, 4, 16), (1, 64, 64)),    # q/k/v projections
    ("bthd,hde->bte", (2, 1, 4, 16), (4, 16, 64), (2, 64, 64)),  # the output projection
    ("...e,ev->...v", (3, 64), (64, 100), (3, 64, 100)),         # lm_head
    ("ne,ex->nx", (4, 64), (64, 8), (4, 64, 8)),                 # the router
    ("me,mef->mf", (4, 64), (4, 64, 8), None),                   # per-row weights: not one matrix
    ("btkgd,bksd->bkgts", (1, 1, 2, 2, 8), (1, 2, 16, 8), None),  # attention scores: w's contracted axis is last
    ("bte,ehd->bthd", (1, 17, 64), (64, 4, 16), None),           # 17 rows: a prefill, XLA's GEMM
    ("...e,ev->...v", (1, 1024), (1024, 1025), None),            # over MATMUL_MAX_WEIGHT_BYTES: XLA's dot
])
def test_which_products_take_the_matmul_kernel(spec, x_shape, w_shape, form):
    x, w = jnp.zeros(x_shape), jnp.zeros(w_shape)
    assert cpu_kernels.matmul_form(spec, x, w) == form
    if form is not None:  # and model.einsum gives the same numbers through it as jnp.einsum
        rng = np.random.default_rng(1)
        x, w = _normal(rng, *x_shape), _normal(rng, *w_shape)
        np.testing.assert_allclose(einsum(spec, x, w), np.einsum(spec, x.astype(np.float64), w), rtol=1e-5,
                                   atol=1e-4)
    assert cpu_kernels.matmul_form(spec, jnp.zeros(x_shape, jnp.bfloat16), jnp.zeros(w_shape, jnp.bfloat16)) is None


class _Recorder:
    """A host step that records the tokens it is handed and answers with them plus one, and a mask of their row."""

    def __init__(self, fail: bool = False):
        self.seen: list[list[int]] = []
        self.fail = fail

    def fill(self, tokens: np.ndarray, forced: np.ndarray, masks: np.ndarray) -> None:
        if self.fail:
            raise ValueError("the grammar broke")
        self.seen.append(tokens.tolist())
        forced[:] = tokens + 1
        masks[:] = np.arange(masks.shape[0])[:, None]


def test_host_step_calls_python_from_inside_a_jit_step_in_order():
    recorder = _Recorder()
    number = cpu_kernels.register_host_step(recorder.fill)

    @jax.jit
    def chain(tokens):
        for _ in range(3):  # each call takes the answer of the one before
            tokens, masks = cpu_kernels.host_step(number, tokens, 5)
        return tokens, masks

    tokens, masks = chain(jnp.array([10, 20], jnp.int32))
    assert recorder.seen == [[10, 20], [11, 21], [12, 22]]
    np.testing.assert_array_equal(tokens, [13, 23])
    np.testing.assert_array_equal(masks, [[0] * 5, [1] * 5])
    chain(jnp.array([0, 0], jnp.int32))  # compiled once, called again: the function runs again
    assert recorder.seen[-1] == [2, 2]


def test_a_host_step_that_fails_fails_its_jit_step_with_a_pointer_to_the_log(caplog):
    recorder = _Recorder(fail=True)
    number = cpu_kernels.register_host_step(recorder.fill)
    with pytest.raises(Exception, match="the grammar of a decode step failed"):
        jax.block_until_ready(jax.jit(lambda t: cpu_kernels.host_step(number, t, 3))(jnp.zeros(2, jnp.int32)))
    assert "the grammar broke" in caplog.text


def test_host_step_is_safe_whatever_thread_calls_it():
    """The host step runs on whichever thread XLA runs the step on, with the GIL held there or not: Python threads
    calling the step at once (and this one between them) each get their own answers, and none hangs."""
    recorder = _Recorder()
    number = cpu_kernels.register_host_step(recorder.fill)
    step = jax.jit(lambda t: cpu_kernels.host_step(number, t, 4))
    failures: list[str] = []

    def run(start: int) -> None:
        for i in range(25):
            tokens = np.array([start + i, start - i], np.int32)
            forced, _ = step(jnp.asarray(tokens))
            if not np.array_equal(np.asarray(forced), tokens + 1):
                failures.append(f"thread {start}, call {i}: {np.asarray(forced)}")

    threads = [threading.Thread(target=run, args=(1000 * k,)) for k in range(1, 5)]
    for thread in threads:
        thread.start()
    run(0)
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "a host step hung"
    assert not failures, failures


def test_host_step_refuses_masks_of_another_row_count():
    number = cpu_kernels.register_host_step(_Recorder().fill)
    call = jax.ffi.ffi_call("qwen3moe_cpu_host_step", (jax.ShapeDtypeStruct((2,), jnp.int32),
                                                       jax.ShapeDtypeStruct((3, 4), jnp.int32)))
    with pytest.raises(Exception, match="one row each"):
        jax.block_until_ready(jax.jit(lambda t: call(t, grammar=np.int64(number)))(jnp.zeros(2, jnp.int32)))


def test_asking_whether_the_kernels_are_available_compiles_nothing(tmp_path):
    """available() and the "auto" kernel choice only ask: in a fresh process with an empty kernel cache, neither
    compiles the C++ source nor registers anything (build() does, called by the Engine on the CPU backend)."""
    script = (
        "import jax.numpy as jnp\n"
        "from qwen3moe_jax.model import cpu_kernels\n"
        "from qwen3moe_jax.model.moe import choose_moe_kernel\n"
        "assert not cpu_kernels.available()\n"
        "assert choose_moe_kernel('auto', 8, 128, jnp.zeros((128, 4, 4), jnp.float32)) == 'gather'\n"
        "assert cpu_kernels.matmul_form('bte,ehd->bthd', jnp.zeros((1, 1, 64)), jnp.zeros((64, 2, 32))) is None\n"
        "assert not cpu_kernels.available()\n"
    )
    env = os.environ | {"XDG_CACHE_HOME": str(tmp_path), "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=120)
    assert not list(tmp_path.rglob("*.so")), "asking compiled the kernels"
