"""Weights and KV cache on a device mesh (sharding.py): the 8 CPU devices conftest.py asks XLA for.

The checkpoint is hf_tiny (6 experts, 4 heads, 2 kv heads): on the meshes below the experts split over 1 or 2
devices but not 4 or 8, the heads over up to 4, the kv heads over up to 2, so every mesh mixes split and
replicated dimensions. Each sharded run is compared with the same checkpoint on one device.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import qwen3moe_jax as qj
from qwen3moe_jax.model.params import named_leaves, param_specs
from qwen3moe_jax.model.sharding import logical_spec
from qwen3moe_jax.tools.bench import CompileLog

MESHES = [(1, 8), (2, 4), (4, 2), (8, 1)]  # expert x tensor
SEEDED = qj.SamplingParams(temperature=0.9, top_k=40, top_p=0.95, repeat_penalty=1.1, seed=11)


@pytest.fixture(scope="module")
def single(hf_tiny):
    return qj.load(hf_tiny[0], max_seq_len=64, progress=False)


@pytest.fixture(scope="module", params=MESHES, ids=[f"expert{e}xtensor{t}" for e, t in MESHES])
def sharded(request, hf_tiny):
    expert, tensor = request.param
    return qj.load(hf_tiny[0], max_seq_len=64, progress=False, mesh=qj.make_mesh(expert=expert, tensor=tensor))


def spec(a: jax.Array) -> P:
    """An array's PartitionSpec with every dimension spelled out (jax drops trailing Nones)."""
    return P(*a.sharding.spec, *(None,) * (a.ndim - len(a.sharding.spec)))


def test_sharded_logits_equal_single_device_logits(single, sharded):
    ids = np.random.default_rng(0).integers(0, single.config.vocab_size, 29).tolist()
    want, got = single.logits(ids), sharded.logits(ids)
    error = np.abs(got - want).max()
    print(f"mesh {dict(sharded.mesh.shape)}: max |logit difference| {error:.2e} (logits span "
          f"{want.min():.2f}..{want.max():.2f})")
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)


def test_sharded_greedy_and_seeded_sampling_give_identical_tokens(single, sharded):
    prompt = [5, 17, 99, 3, 250, 42, 7]
    for sampling in (qj.SamplingParams(), SEEDED):
        want = single.generate(prompt, 20, sampling, stop_token_ids=[])
        assert sharded.generate(prompt, 20, sampling, stop_token_ids=[]) == want


def test_every_param_is_sharded_as_the_rules_say(sharded):
    sizes = dict(sharded.mesh.shape)
    specs = named_leaves(param_specs(sharded.config))
    for name, array in named_leaves(sharded.params).items():
        assert spec(array) == logical_spec(specs[name].axes, array.shape, sizes), name
    # The same rules, spelled out for one mesh: experts on expert, heads and FFN width on tensor, the rest whole.
    if (sizes["expert"], sizes["tensor"]) == (2, 4):
        layer = sharded.params.layers[0]
        assert spec(layer.mlp.gate) == P("expert", None, "tensor")  # 6 experts / 2, FFN 24 / 4
        assert spec(layer.mlp.down) == P("expert", "tensor", None)
        assert spec(layer.mlp.router) == P(None, None)  # every device scores every expert
        assert spec(layer.attn.q) == P(None, "tensor", None)  # 4 heads / 4
        assert spec(layer.attn.k) == P(None, None, None)  # 2 kv heads do not split 4 ways
        assert spec(layer.attn.o) == P("tensor", None, None)
        assert spec(sharded.params.layers[1].mlp.gate) == P(None, "tensor")  # the dense layer
        assert spec(sharded.params.embed) == P(None, None)


def test_each_device_holds_its_share_of_the_expert_weights():
    """On expert=8 with 8 experts (the tiny preset), a device holds 1/8 of each expert tensor's bytes."""
    model = qj.random_model("tiny", mesh=qj.make_mesh(expert=8), max_seq_len=32)
    for layer in model.params.layers:
        if hasattr(layer.mlp, "router"):
            for w in (layer.mlp.gate, layer.mlp.up, layer.mlp.down):
                assert {shard.data.nbytes for shard in w.addressable_shards} == {w.nbytes // 8}
                assert len({shard.device for shard in w.addressable_shards}) == 8


def test_decode_keeps_the_cache_sharded_in_place_and_does_not_recompile(hf_tiny):
    mesh = qj.make_mesh(expert=2, tensor=2)
    model = qj.load(hf_tiny[0], max_seq_len=48, progress=False, mesh=mesh)  # a cache length no other test uses
    with CompileLog() as log:
        model.engine.warmup(7, 20)
        assert log.compiles() > 0, "the counter saw warm-up's compilations"
        mark = len(log.events)
        cache = model.engine.cache
        assert spec(cache.k[0]) == P(None, "tensor", None, None)  # 2 kv heads over tensor=2
        pointers = [[s.data.unsafe_buffer_pointer() for s in a.addressable_shards] for a in cache.k + cache.v]
        model.generate([5, 17, 99, 3, 250, 42, 7], 20, SEEDED, stop_token_ids=[])
        assert log.compiles(mark) == 0  # XLA compiled nothing after warm-up
    cache = model.engine.cache
    assert all(spec(a) == P(None, "tensor", None, None) for a in cache.k + cache.v)
    assert [[s.data.unsafe_buffer_pointer() for s in a.addressable_shards] for a in cache.k + cache.v] == pointers


def test_a_data_axis_runs_a_batch_of_two_prompts_as_one_device_does(single, hf_tiny):
    """data=2: the two rows of the cache and of each step live on different devices; each row's greedy tokens
    and logprobs are those of one device running it alone."""
    mesh = qj.make_mesh(data=2, expert=2, tensor=2)
    model = qj.load(hf_tiny[0], max_seq_len=64, progress=False, mesh=mesh, max_batch=2, decode_steps=2)
    assert spec(model.engine.cache.k[0]) == P("data", "tensor", None, None)
    rng = np.random.default_rng(7)
    prompts = [rng.integers(0, 300, 5).tolist(), rng.integers(0, 300, 12).tolist()]
    sampling = qj.SamplingParams(max_new_tokens=5, logprobs=5, stop_token_ids=())
    batched = model.complete_batch(prompts, sampling)
    assert spec(model.engine.cache.k[0]) == P("data", "tensor", None, None)
    for prompt, result in zip(prompts, batched, strict=True):
        alone = single.complete(prompt, sampling=sampling)
        assert result.token_ids == alone.token_ids
        for ours, ref in zip(result.logprobs, alone.logprobs, strict=True):
            assert [t for t, _ in ours.top] == [t for t, _ in ref.top]
            np.testing.assert_allclose([p for _, p in ours.top], [p for _, p in ref.top], atol=2e-5, rtol=0)


def test_the_server_streams_from_a_sharded_model():
    from fastapi.testclient import TestClient

    from qwen3moe_jax.serve.app import create_app

    model = qj.load(mesh=qj.make_mesh(expert=2, tensor=4), progress=False)
    want = qj.load(progress=False).complete("def fibonacci(n):\n", 16, stop_token_ids=[]).text
    with TestClient(create_app(model, "bundled")) as client:
        body = {"model": "bundled", "prompt": "def fibonacci(n):\n", "max_tokens": 16, "stream": True,
                "temperature": 0}
        with client.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            lines = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(line) for line in lines[:-1]]
    assert len(chunks) > 2  # streamed, not one piece
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == want


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_of_four_devices_generate_what_one_process_does():
    """Multi-host on one machine: 2 processes x 4 CPU devices joined by jax.distributed (gloo), one mesh of
    expert=2 x tensor=4 over all 8; process 0 prints, and prints what a single process prints."""
    argv = [sys.executable, "-m", "qwen3moe_jax", "generate", "--prompt", "def fibonacci(n):\n",
            "--max-new-tokens", "24", "--temperature", "0.8", "--top-p", "0.9", "--seed", "3"]
    single = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    coordinator = f"127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen(argv + ["--mesh", "expert=2,tensor=4", "--coordinator", coordinator,
                                      "--num-processes", "2", "--process-id", str(k)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err
    assert "over a mesh of {'data': 1, 'expert': 2, 'tensor': 4}" in outputs[0][1]
    # gloo's C++ side reports its connections on stdout in every process, before anything is generated,
    # from several threads (so its lines may come interleaved): compare from the prompt on.
    prompt = "def fibonacci(n):\n"
    assert outputs[0][0][outputs[0][0].index(prompt):] == single.stdout and len(single.stdout) > len(prompt)
    assert prompt not in outputs[1][0]  # only process 0 prints
    print(single.stdout)


def test_mesh_errors_are_specific():
    with pytest.raises(qj.ConfigError, match="needs 16 devices"):
        qj.make_mesh(expert=16)
    from qwen3moe_jax.model.sharding import parse_mesh

    assert parse_mesh("expert=2,tensor=4") == {"expert": 2, "tensor": 4}
    with pytest.raises(qj.ConfigError, match="bad mesh"):
        parse_mesh("experts=2")
    assert len(jax.devices()) == 8


def test_a_two_process_server_answers_as_one_process_and_shuts_down_cleanly():
    """serve across 2 processes x 4 devices: process 0 serves HTTP, process 1 follows its steps (multihost.py);
    a stream the client leaves early does not desynchronise them; a JSON-schema answer (its grammar runs on
    process 0 between the steps of each decode block) validates; SIGTERM to process 0 ends both."""
    import httpx
    import jsonschema

    procs, url, name = _start_two_process_server()
    try:
        local = qj.load(progress=False)
        body = {"model": name, "prompt": "def fibonacci(n):\n", "max_tokens": 16, "temperature": 0}
        with httpx.stream("POST", f"{url}/v1/completions", json=dict(body, stream=True), timeout=60) as r:
            next(r.iter_lines())  # leave after the first chunk
        schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10}, "n": {
            "type": "integer", "minimum": 0, "maximum": 99}}, "required": ["name", "n"], "additionalProperties": False}
        chat = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
            "model": name, "messages": [{"role": "user", "content": "Name one."}], "max_tokens": 40, "temperature": 1,
            "seed": 2, "chat_template_kwargs": {"enable_thinking": False},
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}).json()
        assert chat["choices"][0]["finish_reason"] == "stop", chat
        jsonschema.validate(json.loads(chat["choices"][0]["message"]["content"]), schema)
        for _ in range(2):
            reply = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()
            assert reply["choices"][0]["text"] == local.complete(body["prompt"], 16, stop_token_ids=[]).text
    finally:
        procs[0].terminate()
        codes = [p.wait(timeout=60) for p in procs]
    assert codes[1] == 0, procs[1].stderr.read()


def test_a_follower_that_dies_mid_request_ends_the_request_with_an_error_and_the_leader_exits():
    """Issue 20.7: process 1 of a two-process server is killed while process 0 streams a reply. The client
    gets an error in the stream (not a hang), and process 0 stops serving and exits (it cannot run a step
    without its follower) within seconds."""
    import signal

    import httpx

    procs, url, name = _start_two_process_server("--decode-steps", "1")
    try:
        body = {"model": name, "prompt": "def fibonacci(n):\n", "max_tokens": 100, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
            lines = (line for line in response.iter_lines() if line)
            assert "error" not in next(lines)
            procs[1].send_signal(signal.SIGKILL)
            rest = list(lines)
        assert rest[-1] == "data: [DONE]"
        error = json.loads(rest[-2].removeprefix("data: "))["error"]
        assert error["type"] == "server_error" and "generation failed" in error["message"]
        assert procs[0].wait(timeout=60) == -signal.SIGTERM  # uvicorn's graceful stop, then the signal's exit
        assert "stopping: a follower process is gone" in procs[0].stderr.read()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def _start_two_process_server(*flags: str) -> tuple[list[subprocess.Popen], str, str]:
    """`serve` on the bundled model as 2 processes x 4 CPU devices (expert=2, tensor=4) with `flags`, once it
    answers /health: (the processes, the URL, the served model name)."""
    import httpx

    port, coordinator = _free_port(), f"127.0.0.1:{_free_port()}"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, "-m", "qwen3moe_jax", "serve", "--port", str(port),
                               "--max-seq-len", "128", "--warmup-tokens", "16", "--mesh", "expert=2,tensor=4", *flags,
                               "--coordinator", coordinator, "--num-processes", "2", "--process-id", str(k)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for k in range(2)]
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            return procs, url, httpx.get(f"{url}/health").json()["model"]
        except httpx.TransportError:
            if not all(p.poll() is None for p in procs):
                for p in procs:
                    p.kill()
                raise AssertionError(procs[0].stderr.read()) from None
            time.sleep(0.5)
    for p in procs:
        p.kill()
    raise AssertionError("the two-process server did not answer /health within 120 s")
