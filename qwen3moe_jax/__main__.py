"""`python -m qwen3moe_jax`: the `qwen3moe-jax` command."""

import sys

from qwen3moe_jax.tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
