"""llama.cpp runs in a child process: a crash in native code there (an illegal instruction from a build for
another CPU, a segmentation fault) fails the call with a package error naming the signal, and the caller's
process, pytest included, carries on. Needs no llama.cpp: the child is made to die by the signal itself."""

from __future__ import annotations

import operator
import os
import signal

import pytest

from qwen3moe_jax.errors import Qwen3MoeError
from qwen3moe_jax.io import llamacpp


@pytest.mark.parametrize("signum", [signal.SIGILL, signal.SIGSEGV], ids=lambda s: signal.Signals(s).name)
def test_a_child_killed_by_a_signal_is_a_clean_error_naming_it(signum):
    with llamacpp.Worker() as worker:
        assert worker.call(operator.add, 2, 3) == 5
        with pytest.raises(llamacpp.LlamaCppCrashed, match=signal.Signals(signum).name) as crash:
            worker.call(signal.raise_signal, signum)
        assert isinstance(crash.value, Qwen3MoeError)
        assert "raise_signal" in str(crash.value)
        with pytest.raises(llamacpp.LlamaCppCrashed):  # and it stays dead
            worker.call(operator.add, 2, 3)


def test_an_exception_in_the_child_comes_back_as_a_package_error():
    with llamacpp.Worker() as worker:
        with pytest.raises(Qwen3MoeError, match="ValueError"):
            worker.call(int, "not a number")
        assert worker.call(operator.mul, 6, 7) == 42  # still serving


def test_a_child_that_exits_is_reported_with_its_status():
    with llamacpp.Worker() as worker, pytest.raises(llamacpp.LlamaCppCrashed, match="exited with status 3"):
        worker.call(os._exit, 3)
