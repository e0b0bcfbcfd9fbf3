#!/usr/bin/env python
"""The benchmark, as `qwen3moe-jax bench` runs it (see qwen3moe_jax/tools/bench.py and `--help`):

    python scripts/bench.py --prompt-lengths 16,64,128 --decode-tokens 128 --compare hf   # the bundled model
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 python scripts/bench.py --preset qwen3-30b-a3b --dtype bfloat16
"""

import sys

from qwen3moe_jax.tools.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
