"""Property-based requests generated from the service's own OpenAPI schema (schemathesis): no request may get a
5xx answer. About 200 requests against a real `koala serve`."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from tests.helpers import Factory

EXAMPLES_PER_OPERATION = 30  # x 11 operations, fewer where the input space is small


def test_no_server_errors(server_factory: Factory) -> None:
    server = server_factory(run_scheduler="false")  # submitted jobs stay queued: this checks the API, not training
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 11
    calls = 0
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,  # the same requests on every run
            database=None,
        )
        def check(case: schemathesis.Case) -> None:
            nonlocal calls
            calls += 1
            case.call_and_validate(base_url=server.url, checks=[not_a_server_error], timeout=30)

        check()
    assert calls >= 180
