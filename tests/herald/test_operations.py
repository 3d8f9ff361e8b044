"""The operation state machine: every allowed and forbidden move, terminal is final."""

from __future__ import annotations

import itertools
import re

import pytest

from herald.operations import (
    ALLOWED,
    TERMINAL,
    IllegalTransition,
    Operation,
    Status,
    new_operation_id,
    operation_topic,
    problem,
    request_cancel,
    status_event,
    transition,
)
from herald.protocol import TERMINAL_EVENT_TYPES, validate_topic

PAIRS = list(itertools.product(Status, Status))
LEGAL = [(a, b) for a, b in PAIRS if b in ALLOWED[a]]
ILLEGAL = [(a, b) for a, b in PAIRS if b not in ALLOWED[a]]


def at(status: Status) -> Operation:
    """An operation that has reached ``status``."""
    return Operation(id="op_test", type="Thing", status=status, created_at="2024-01-01T00:00:00.000Z")


def test_the_table_is_the_documented_one() -> None:
    assert TERMINAL == {Status.SUCCEEDED, Status.FAILED, Status.CANCELED}
    assert ALLOWED[Status.PENDING] == {Status.RUNNING, *TERMINAL}
    assert ALLOWED[Status.RUNNING] == {Status.RUNNING, *TERMINAL}
    for status in TERMINAL:
        assert ALLOWED[status] == frozenset()
        assert status.terminal
    assert not Status.PENDING.terminal
    assert not Status.RUNNING.terminal


@pytest.mark.parametrize(("before", "after"), LEGAL, ids=[f"{a}->{b}" for a, b in LEGAL])
def test_allowed_transitions_apply(before: Status, after: Status) -> None:
    op = at(before)
    moved = transition(op, after, now="2024-01-01T00:00:01.000Z")
    assert moved.status is after
    assert moved.version == op.version + 1
    assert moved.updated_at == "2024-01-01T00:00:01.000Z"
    assert moved.created_at == op.created_at
    assert op.status is before  # the original is untouched (immutable)


@pytest.mark.parametrize(("before", "after"), ILLEGAL, ids=[f"{a}->{b}" for a, b in ILLEGAL])
def test_forbidden_transitions_are_refused(before: Status, after: Status) -> None:
    op = at(before)
    with pytest.raises(IllegalTransition) as caught:
        transition(op, after)
    assert caught.value.current is before
    assert caught.value.wanted is after
    assert str(caught.value) == f"operation is {before.value}; it cannot become {after.value}"


def test_every_forbidden_move_is_out_of_a_terminal_status_or_back_to_pending() -> None:
    for before, after in ILLEGAL:
        assert before.terminal or after is Status.PENDING


@pytest.mark.parametrize("final", sorted(TERMINAL))
def test_terminal_never_changes(final: Status) -> None:
    op = transition(at(Status.RUNNING), final, result={"r": 1})
    for status in Status:
        with pytest.raises(IllegalTransition):
            transition(op, status)
    with pytest.raises(IllegalTransition):
        request_cancel(op)


def test_running_counts_attempts_each_time() -> None:
    op = at(Status.PENDING)
    assert op.attempts == 0
    op = transition(op, Status.RUNNING)
    assert op.attempts == 1
    op = transition(op, Status.RUNNING)  # a redelivery
    assert op.attempts == 2
    op = transition(op, Status.SUCCEEDED)
    assert op.attempts == 2


def test_succeeded_keeps_result_and_location() -> None:
    op = transition(at(Status.RUNNING), Status.SUCCEEDED, result={"id": "m1"}, location="/chats/a/messages/m1")
    assert op.result == {"id": "m1"}
    assert op.location == "/chats/a/messages/m1"
    assert op.error is None


def test_failed_has_a_problem_by_default_and_keeps_a_given_one() -> None:
    default = transition(at(Status.RUNNING), Status.FAILED)
    assert default.error == {"type": "about:blank", "title": "Operation failed", "status": 500}
    given = problem("https://x/p", "Nope", 422, "because")
    assert transition(at(Status.RUNNING), Status.FAILED, error=given).error == given


def test_canceled_says_so_in_its_problem() -> None:
    op = transition(at(Status.PENDING), Status.CANCELED)
    assert op.error is not None
    assert op.error["type"].endswith("/canceled")
    assert op.error["status"] == 409


def test_request_cancel_sets_the_flag_once() -> None:
    op = at(Status.RUNNING)
    flagged = request_cancel(op, now="2024-01-01T00:00:02.000Z")
    assert flagged.cancel_requested
    assert flagged.status is Status.RUNNING
    assert flagged.version == op.version + 1
    assert request_cancel(flagged) is flagged  # asking twice changes nothing


def test_etag_changes_with_every_change() -> None:
    op = at(Status.PENDING)
    moved = transition(op, Status.RUNNING)
    assert op.etag == '"op_test.1"'
    assert moved.etag == '"op_test.2"'
    assert request_cancel(moved).etag == '"op_test.3"'


def test_updated_at_defaults_to_created_at() -> None:
    op = Operation(id="op_x", type="T", created_at="2024-01-01T00:00:00.000Z")
    assert op.updated_at == op.created_at


def test_record_round_trip() -> None:
    op = transition(request_cancel(transition(at(Status.PENDING), Status.RUNNING)), Status.SUCCEEDED,
                    result=[1, 2], location="/x")
    assert Operation.from_record(op.to_record()) == op


def test_operation_ids_are_unguessable_and_make_legal_topics() -> None:
    ids = {new_operation_id() for _ in range(1000)}
    assert len(ids) == 1000
    for op_id in ids:
        assert re.fullmatch(r"op_[A-Za-z0-9_\-]{22}", op_id)  # 128 random bits
        assert validate_topic(operation_topic(op_id)) == f"operations/{op_id}"


def test_status_event_describes_the_operation() -> None:
    op = Operation(id="op_1", type="T", request_event_id="e_req")
    done = transition(transition(op, Status.RUNNING), Status.SUCCEEDED, result={"ok": True}, location="/r/1")
    event = status_event(done, source="herald/test")
    assert event.type == "herald.operation.succeeded"
    assert event.type in TERMINAL_EVENT_TYPES
    assert event.correlationid == "op_1"
    assert event.causationid == "e_req"
    assert event.subject == "operations/op_1"
    assert event.data == {"id": "op_1", "status": "succeeded", "result": {"ok": True}, "error": None,
                          "location": "/r/1", "attempts": 1}
    running = status_event(transition(op, Status.RUNNING), source="s", causationid="e_other")
    assert running.type == "herald.operation.running"
    assert running.type not in TERMINAL_EVENT_TYPES
    assert running.causationid == "e_other"


def test_problem_document_shape() -> None:
    assert problem("t", "T", 400) == {"type": "t", "title": "T", "status": 400}
    assert problem("t", "T", 400, "d", field="x") == {"type": "t", "title": "T", "status": 400, "detail": "d",
                                                      "field": "x"}
