#!/usr/bin/env python
"""Run the same greedy and seeded requests N times in this process and once in each of M fresh processes,
and report whether every run gave the same tokens (exit status 1 if not). See qwen3moe_jax/tools/determinism.py.

    python scripts/determinism.py --preset tiny --runs 3 --processes 2
    python scripts/determinism.py --model FILE.gguf --dtype bfloat16
"""

import sys

from qwen3moe_jax.tools.determinism import main

if __name__ == "__main__":
    sys.exit(main())
