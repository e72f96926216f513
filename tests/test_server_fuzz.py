"""Schemathesis over the server's own OpenAPI document: every operation, bodies that fit the
declared schemas (positive) and bodies that break them (negative), and no answer may be a 5xx,
an undocumented status or an undocumented content type.

Half of the generated bodies that name a model name the served one, so that the fuzzer gets
past the 404 into validation, the engine and the streams. Examples are derandomized (the same
cases every run) and bounded, so that this stays a few minutes on two cores.
"""

from __future__ import annotations

from collections import Counter

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from registry_server import Registry
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, status_code_conformance

from pagedserve.bench.server_process import ServerProcess

pytestmark = pytest.mark.slow

MODEL = "tiny"
EXAMPLES = 40  # per operation and mode
ARGS = ["--served-model-name", MODEL, "--dtype", "float32", "--kv-cache-memory", "2MiB",
        "--max-model-len", "96", "--max-num-seqs", "8", "--max-n", "4", "--max-queue", "32"]
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance]


@pytest.fixture(scope="module")
def server(tiny_llama_tokenized_dir):
    # /api/pull asks an empty registry on 127.0.0.1, never the network: a name is a 404
    with Registry() as registry, pytest.MonkeyPatch.context() as env:
        env.setenv("PAGEDSERVE_REGISTRY", registry.url)
        with ServerProcess(str(tiny_llama_tokenized_dir), ARGS) as proc:
            yield proc


def test_no_generated_request_gets_a_server_error(server):
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")

    @schema.hook("flatmap_body")
    def served_model_half_the_time(context, body):
        if isinstance(body, dict) and "model" in body:
            return st.sampled_from([{**body, "model": MODEL}, body])
        return st.just(body)

    statuses: dict[str, Counter] = {}
    failures: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        modes = [GenerationMode.POSITIVE]
        if len(operation.body):  # nothing to negate in an operation without a body
            modes.append(GenerationMode.NEGATIVE)
        for mode in modes:
            seen = statuses.setdefault(f"{operation.label} {mode.value}", Counter())
            try:
                fuzz(operation, mode, seen)
            except Exception as exc:  # noqa: BLE001 - collected, reported together below
                failures.append(f"{operation.label} ({mode.value}): {exc}")
    print("\n".join(f"{name}: {dict(counts)}" for name, counts in statuses.items()))
    assert not failures, "\n\n".join(failures)
    # the fuzzer got through to the engine, not only to the validation
    assert statuses["POST /v1/completions positive"][200] > 0, statuses
    assert statuses["POST /v1/chat/completions positive"][200] > 0, statuses
    assert statuses["POST /api/generate positive"][200] > 0, statuses
    assert statuses["POST /api/embed positive"][200] > 0, statuses
    assert statuses["POST /v1/embeddings positive"][200] > 0, statuses
    assert httpx.get(f"{server.url}/health").status_code == 200


def fuzz(operation, mode: GenerationMode, seen: Counter) -> None:
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck), print_blob=True)
    def check(case):
        response = case.call(timeout=60)
        seen[response.status_code] += 1
        case.validate_response(response, checks=CHECKS)

    check()
