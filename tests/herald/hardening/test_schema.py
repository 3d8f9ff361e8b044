"""The API against its own description: schemathesis generates requests from ``/openapi.json``.

Every generated request goes to a real gateway; no answer may be a 5xx, and every answer must
match the document: a declared status, the declared content type, a body that validates
against the declared schema, and the declared headers. Positive and negative (schema-violating)
inputs, a bounded number of examples per operation.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.support.server import HeraldServer

pytestmark = pytest.mark.e2e

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance]
EXAMPLES = 20


@pytest.fixture(scope="module")
def api_schema() -> Iterator[schemathesis.BaseSchema]:
    """The schema served by a fresh gateway (``Prefer: wait`` capped at 1 s, so no case waits long)."""
    with HeraldServer({"HERALD_MAX_WAIT": "1"}) as server:
        yield schemathesis.openapi.from_url(server.url + "/openapi.json")


def operations(schema: schemathesis.BaseSchema) -> list[schemathesis.APIOperation]:
    """Every operation of the document."""
    return [result.ok() for result in schema.get_all_operations()]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_every_answer_conforms_to_the_openapi_document(api_schema: schemathesis.BaseSchema,
                                                       mode: GenerationMode) -> None:
    found = operations(api_schema)
    assert len(found) >= 10
    for operation in found:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        def check(case: schemathesis.Case) -> None:
            case.call_and_validate(checks=CHECKS, timeout=10)

        try:
            check()
        except Unsatisfiable:
            # an operation without parameters or body (e.g. /healthz) has no invalid input to send
            assert mode is GenerationMode.NEGATIVE, operation.label
