#!/usr/bin/env bash
# The one-command GPU check of issue 19 (one H100, about 8 minutes): random Qwen3-30B-A3B weights drawn on the
# device; every MoE kernel at decode and prefill sizes; bfloat16 and each quantized dtype: prefill of 1k and 8k
# tokens and decode at batch 1, decode at batch 8 and 32, a 32 x 1k prefill; transformers at 16 layers for a
# ratio when torch has CUDA. Writes benchmarks/<gpu>-<date>.json and .md (see qwen3moe_jax/tools/gpu_suite.py).
#
#   scripts/gpu_check.sh                       # the H100 run
#   scripts/gpu_check.sh --preset tiny --prompt-lengths 16,32 --batch-sizes 2 --decode-tokens 8 --hf-layers 1 \
#       --prefill-chunk 16 --out-dir /some/folder   # the CPU dry run (later arguments override the ones below)
set -euo pipefail
cd "$(dirname "$0")/.."
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
exec "${PYTHON:-python}" -m qwen3moe_jax bench --suite gpu --preset qwen3-30b-a3b \
    --prompt-lengths 1024,8192 --batch-sizes 8,32 --decode-tokens 64 --repeats 2 --hf-layers 16 \
    --prefill-chunk 1024 --out-dir benchmarks "$@"
