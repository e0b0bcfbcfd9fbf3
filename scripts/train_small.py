#!/usr/bin/env python
"""Train the bundled small Qwen3-MoE on the Python standard library's source (see qwen3moe_jax/tools/training.py).

    python scripts/train_small.py --out runs/small --export qwen3moe_jax/bundled/qwen3-moe-pystdlib-Q8_0.gguf
"""

import sys

from qwen3moe_jax.tools.training import main

if __name__ == "__main__":
    sys.exit(main())
