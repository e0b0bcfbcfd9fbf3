"""The model: Qwen3-MoE as pure functions over a params pytree.

config.py (ModelConfig, presets) -> params.py (the pytree, its specs and logical axes) -> transformer.py (forward:
attention, dense MLP) and moe.py (router, MoE block, kernel choice) over matmul.py (the one einsum); the expert
kernels in moe_kernels.py, pallas_moe.py (over pallas_matmul.py, which int4 matmuls on a GPU use too) and
cpu_kernels.py (+ .cc); quant.py (int8/int4 weights), cache.py (the KV cache), sharding.py (logical axes -> mesh
axes), router_stats.py (routing analysis).
"""
