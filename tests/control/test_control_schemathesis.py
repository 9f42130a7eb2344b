"""Property-based API testing with schemathesis: coord's admin and agent API and the key
registry's HTTP surface (health, readiness, metrics), from their own OpenAPI schemas, against
real processes. Whatever schemathesis generates (valid and invalid), no answer is a 5xx."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fixtures_services import ControlPlane, _planes
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

pytestmark = pytest.mark.timeout(600)
EXAMPLES = 25


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    with _planes(Path(tmp_path_factory.mktemp("schemathesis"))) as make:
        plane = make(coord_args=["--api-docs", "--agent-rate-limit", "0"])
        plane.keys.stop()  # the registry again, with its schema served
        plane.keys.args.append("--api-docs")
        plane.keys.start()
        plane.admin("POST", "/authkeys", {"user": "alice"})  # something for the list endpoints to show
        yield plane


def fuzz_api(schema_url: str, headers: dict[str, str]) -> dict[str, int]:
    """Run every operation of the schema with generated cases, valid and invalid; a 5xx fails.
    Returns the number of cases sent per operation."""
    schema = schemathesis.openapi.from_url(schema_url)
    sent: dict[str, int] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        run_cases(
            operation.as_strategy(generation_mode=GenerationMode.POSITIVE), operation.label, headers, sent
        )
        with contextlib.suppress(Unsatisfiable):  # nothing in it can be made invalid (no parameters)
            run_cases(
                operation.as_strategy(generation_mode=GenerationMode.NEGATIVE), operation.label, headers, sent
            )
    return sent


def run_cases(strategy: Any, label: str, headers: dict[str, str], sent: dict[str, int]) -> None:
    sent.setdefault(label, 0)

    @given(case=strategy)
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def run(case: Any) -> None:
        sent[label] += 1
        case.call_and_validate(headers=headers, checks=[not_a_server_error])

    run()


def test_coord_answers_no_input_with_a_server_error(plane: ControlPlane) -> None:
    sent = fuzz_api(f"{plane.url}/openapi.json", {"Authorization": f"Bearer {plane.admin_key}"})
    assert len(sent) >= 15 and all(sent.values()), sent
    print(f"schemathesis coord (admin key): {sum(sent.values())} cases over {len(sent)} operations")


def test_coord_answers_unauthenticated_input_without_a_server_error(plane: ControlPlane) -> None:
    sent = fuzz_api(f"{plane.url}/openapi.json", {})
    print(f"schemathesis coord (no key): {sum(sent.values())} cases over {len(sent)} operations")


def test_the_key_registry_answers_no_input_with_a_server_error(plane: ControlPlane) -> None:
    sent = fuzz_api(f"{plane.keys.url}/openapi.json", {})
    assert all(sent.values()), sent
    print(f"schemathesis keys: {sum(sent.values())} cases over {len(sent)} operations")
