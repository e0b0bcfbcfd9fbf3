"""Every script runs on the base install or says which extra to install: run here with the extras' packages
made unimportable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import qwen3moe_jax as qj
from qwen3moe_jax.tools.parity import make_baseline

SCRIPTS = sorted((Path(__file__).parent.parent / "scripts").glob("*.py"))
# What the extras add beyond the base dependencies (pyproject.toml).
EXTRA_MODULES = ["torch", "transformers", "httpx", "openai", "llama_cpp", "matplotlib", "nbclient", "pytest"]
# Scripts that cannot start without an extra, and the extra they must name.
NEEDS = {"sse_latency": "client", "load_test": "client", "bench_prefix_cache": "client"}


def _without_extras(*argv: str) -> subprocess.CompletedProcess:
    block = f"import sys; sys.modules.update(dict.fromkeys({EXTRA_MODULES!r}))"  # None: ImportError on import
    run = f"import runpy; sys.argv = {list(argv)!r}; runpy.run_path(sys.argv[0], run_name='__main__')"
    return subprocess.run([sys.executable, "-c", f"{block}; {run}"], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_help_on_the_base_install(script):
    done = _without_extras(str(script), "--help")
    if script.stem in NEEDS:
        assert done.returncode != 0 and "Traceback" not in done.stderr
        assert f"pip install 'qwen3moe-jax[{NEEDS[script.stem]}]'" in done.stderr
    else:
        assert done.returncode == 0, done.stderr
        assert "usage:" in done.stdout


def test_transformers_reference_names_its_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(qj.Qwen3MoeError, match=r"pip install 'qwen3moe-jax\[hf\]'"):
        make_baseline("transformers", tmp_path, ["def f():"], 4)
