"""The server against its own /openapi.json (schemathesis: requests generated from the schema, valid and
invalid, none may get a 5xx, every error is OpenAI's error object), and its API key (issue 18)."""

from __future__ import annotations

import json

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from qwen3moe_jax.tools.cli import build_parser
from tests.server_process import running_server

KEY = "test-key-1234"
AUTH = {"Authorization": f"Bearer {KEY}"}
# Generated requests per operation and mode: 2 POST routes x (positive + negative) + 3 GET routes.
EXAMPLES = {("POST", GenerationMode.POSITIVE): 150, ("POST", GenerationMode.NEGATIVE): 100,
            ("GET", GenerationMode.POSITIVE): 5}


@pytest.fixture(scope="module")
def keyed_server():
    """A server with an API key from the environment and a 64-position KV cache, so that every generated
    request that runs decodes at most 63 tokens."""
    with running_server("--max-seq-len", "64", "--warmup-tokens", "64", env={"QWEN3MOE_JAX_API_KEY": KEY}) as url:
        yield url


def _is_error_object(response: httpx.Response) -> bool:
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return (set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)
            and error["message"] != "" and isinstance(error["type"], str))


def test_generated_requests_never_get_a_5xx_and_every_error_is_an_openai_error_object(keyed_server):
    schema = schemathesis.openapi.from_url(f"{keyed_server}/openapi.json")
    statuses: dict[str, list[int]] = {}
    failures: list = []

    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            budget = EXAMPLES.get((operation.method.upper(), mode))
            if budget is None:
                continue
            cases = operation.as_strategy(generation_mode=mode)
            if mode is GenerationMode.POSITIVE and operation.method.upper() == "POST":
                # Half the valid requests name the served model, so they reach the template, the tokenizer and
                # the engine instead of stopping at 404.
                cases = st.tuples(cases, st.booleans()).map(_naming_the_model)

            label = f"{operation.method.upper()} {operation.path} {mode.value}"
            statuses[label] = _statuses_of_generated(cases, budget, keyed_server, label, failures)

    summary = {label: {"requests": len(codes), "2xx": sum(c < 300 for c in codes),
                       "4xx": sum(400 <= c < 500 for c in codes)} for label, codes in statuses.items()}
    print(json.dumps(summary, indent=1))
    assert not failures, failures[:5]
    assert sum(len(codes) for codes in statuses.values()) >= 500
    assert all(c < 500 for codes in statuses.values() for c in codes)
    # The valid half reached generation now and then, and the invalid half was refused.
    assert summary[f"POST /v1/completions {GenerationMode.POSITIVE.value}"]["2xx"] > 0
    assert summary[f"POST /v1/chat/completions {GenerationMode.NEGATIVE.value}"]["4xx"] > 0


def _statuses_of_generated(cases, budget: int, url: str, label: str, failures: list) -> list[int]:
    """Send `budget` requests drawn from `cases` (derandomized: the same ones every run); their statuses.
    A 5xx, or a 4xx without an OpenAI error object, goes to `failures`."""
    statuses = []

    @given(case=cases)
    @settings(max_examples=budget, derandomize=True, database=None, deadline=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    def run(case):
        response = case.call(base_url=url, headers=AUTH, timeout=60)
        statuses.append(response.status_code)
        if response.status_code >= 500 or (response.status_code >= 400 and not _is_error_object(response)):
            failures.append((label, case.body, response.status_code, response.text[:300]))

    run()
    return statuses


def _naming_the_model(case_and_flag):
    case, name_it = case_and_flag
    if name_it and isinstance(case.body, dict):
        case.body["model"] = "tiny"
    return case


def test_v1_routes_need_the_api_key_and_the_rest_stay_open(keyed_server):
    request = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
    ports = set()
    with httpx.Client(base_url=keyed_server, timeout=60) as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                        {"Authorization": f"Basic {KEY}"}, {"Authorization": f"Bearer {KEY}x"},
                        {"Authorization": "Bearer caf\u00e9".encode()}):
            for method, path in (("POST", "/v1/completions"), ("GET", "/v1/models"), ("POST", "/v1/nowhere")):
                response = http.request(method, path, json=request, headers=headers)
                assert response.status_code == 401, (headers, path, response.text)
                assert _is_error_object(response)
                assert response.json()["error"]["code"] == "invalid_api_key"
                assert response.headers["www-authenticate"] == "Bearer"
                ports.add(response.extensions["network_stream"].get_extra_info("client_addr")[1])
        for path in ("/health", "/metrics", "/openapi.json"):
            assert http.get(path).status_code == 200
        assert http.get("/v1/models", headers={"Authorization": f"bearer {KEY}"}).status_code == 200
        good = http.post("/v1/completions", json=request, headers=AUTH)
        assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] <= 2
        ports.add(good.extensions["network_stream"].get_extra_info("client_addr")[1])
    assert len(ports) == 1  # a 401 keeps the connection


def test_the_api_key_comes_from_the_flag_or_the_environment(monkeypatch):
    monkeypatch.delenv("QWEN3MOE_JAX_API_KEY", raising=False)
    assert build_parser().parse_args(["serve"]).api_key is None
    assert build_parser().parse_args(["serve", "--api-key", "k1"]).api_key == "k1"
    monkeypatch.setenv("QWEN3MOE_JAX_API_KEY", "k2")
    assert build_parser().parse_args(["serve"]).api_key == "k2"
    assert build_parser().parse_args(["serve", "--api-key", "k1"]).api_key == "k1"
    monkeypatch.setenv("QWEN3MOE_JAX_API_KEY", "")  # set but empty: no key
    assert build_parser().parse_args(["serve"]).api_key is None
    assert build_parser().parse_args(["serve"]).max_request_bytes == 4 * 2**20
