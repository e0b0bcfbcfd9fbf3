"""Tools over the package: cli.py (the `qwen3moe-jax` command), bench.py and gpu_suite.py (benchmarks), parity.py
(against transformers and llama.cpp), determinism.py, plan.py (memory plans), training.py (the bundled model)."""
