"""Schemathesis against the broker's own OpenAPI description: every operation, with valid and
invalid (negative) bodies, parameters and tokens, gets a JSON 4xx or a success; never a 5xx.

The number of examples is bounded so the suite stays short; the agent endpoints are
exercised with the agent token, the user endpoints with a user's and an admin's token."""

from __future__ import annotations

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings

from .conftest import AGENT_TOKEN, USER_TOKEN

schema = schemathesis.pytest.from_fixture("broker_schema")
COUNTS: dict[str, int] = {}


@pytest.fixture(scope="module")
def broker_schema(broker):
    spec = requests.get(broker + "openapi.json", timeout=10).json()
    s = schemathesis.openapi.from_dict(spec)
    # Valid requests and deliberately invalid ones (wrong types, missing fields, bad ids).
    s.config.generation.update(
        modes=[schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE]
    )
    return s


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_broker_never_answers_5xx(case, broker):
    path = case.path
    who = (
        AGENT_TOKEN
        if path.startswith("/agents")
        else USER_TOKEN["root" if "usage" in path else "alice"]
    )
    response = case.call(base_url=base_url(broker), headers={"Authorization": f"token {who}"})
    key = f"{case.operation.label} -> {response.status_code}"
    COUNTS[key] = COUNTS.get(key, 0) + 1
    assert response.status_code < 500, (
        case.method,
        case.formatted_path,
        response.status_code,
        response.text[:300],
    )
    if response.status_code >= 400:
        assert "message" in response.json()


def base_url(api: str) -> str:
    return api.rstrip("/")


def test_zz_report_what_schemathesis_sent():
    """Print the (operation -> status) counts: the figures docs/reliability.md quotes."""
    total = sum(COUNTS.values())
    for key in sorted(COUNTS):
        print(f"[schemathesis] {key}: {COUNTS[key]}")
    print(f"[schemathesis] total requests: {total}")
    assert total > 0
