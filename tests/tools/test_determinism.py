"""SAM-1 and SAM-2 across processes: scripts/determinism.py's check, run on the tiny preset."""

from __future__ import annotations

import subprocess
import sys

from qwen3moe_jax.tools.determinism import REQUESTS, check


def test_greedy_and_seeded_requests_repeat_in_process_and_across_processes():
    report = check(["--preset", "tiny", "--max-seq-len", "48"], runs=2, processes=1, new_tokens=8)
    assert report["in_process_match"] == dict.fromkeys(REQUESTS, True)
    assert report["cross_process_match"] == dict.fromkeys(REQUESTS, True)
    # The seeded requests really draw: they leave the greedy path.
    tokens = report["tokens"]
    assert tokens["seeded"] != tokens["greedy"] and tokens["seeded, penalty"] != tokens["greedy"]


def test_the_script_has_help():
    out = subprocess.run([sys.executable, "scripts/determinism.py", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert "--processes" in out
