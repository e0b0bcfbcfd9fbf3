"""The runtime: what runs the model on requests.

engine.py (the jit-compiled prefill-chunk and decode-block steps over the KV-cache rows), scheduler.py (the request
loop: continuous batching over those rows), sampling.py (penalty, temperature, top-k/top-p, seeded draws, on the
device), constraints.py (json_schema / regex / grammar via llguidance), generation.py (a request's tokens as
Events: text, stops, usage), text_stream.py (text held back while a stop string may be cut across tokens),
multihost.py (a leader's steps replayed by follower processes), compile_cache.py (JAX's persistent cache).
"""
