import time, qwen3moe_jax as qj
from tests.runtime.test_draft_model import PROMPTS
plain = qj.load(progress=False, max_batch=3)
for k in (3, 3):
    spec = qj.load(progress=False, max_batch=3, decode_steps=1, draft_model=plain, draft_tokens=k)
    s = qj.SamplingParams(max_new_tokens=24)
    t = time.time(); a = [c.token_ids for c in spec.complete_batch(PROMPTS[:3], s)]; t1 = time.time() - t
    t = time.time(); b = [c.token_ids for c in plain.complete_batch(PROMPTS[:3], s)]; t2 = time.time() - t
    sp = spec.scheduler.speculator
    print(k, a == b, round(t1, 1), round(t2, 1), sp.drafted_tokens, sp.accepted_tokens)
