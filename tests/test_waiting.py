"""Patience: how a client rides out an outage (no servers needed: the calls fail on cue)."""

from __future__ import annotations

import pytest

from farm.errors import DatabaseError, MetadataError, StageFailed
from farm.waiting import Outage, Patience


def failing(*errors: Exception):
    """A call that raises ``errors`` in turn, then answers "ok"."""
    pending = list(errors)

    def call() -> str:
        if pending:
            raise pending.pop(0)
        return "ok"

    return call


def test_a_call_goes_through_once_its_service_is_back_and_says_so() -> None:
    heard: list[Outage] = []
    patience = Patience(600, heard.append)
    down = DatabaseError("Postgres is unreachable (OperationalError); will retry")
    call = failing(down, down)
    assert patience.try_call(call, None) is None
    assert patience.try_call(call, None) is None
    assert patience.try_call(call, None) == "ok"
    assert [(o.service, o.phase) for o in heard] == [
        ("Postgres", "began"),
        ("Postgres", "lasts"),
        ("Postgres", "over"),
    ]
    assert str(heard[0]) == f"waiting for Postgres: {down.message}"
    assert str(heard[-1]).startswith("Postgres is back after ")
    assert patience.outage is None


def test_another_service_failing_begins_another_outage() -> None:
    heard: list[Outage] = []
    patience = Patience(600, heard.append)
    call = failing(DatabaseError("down"), MetadataError("down"))
    assert patience.call(call) == "ok"
    assert [(o.service, o.phase) for o in heard] == [
        ("Postgres", "began"),
        ("Redis", "began"),
        ("Redis", "over"),
    ]


def test_an_outage_longer_than_the_limit_raises_its_error() -> None:
    patience = Patience(-1, lambda outage: None)  # any outage is longer than that
    with pytest.raises(DatabaseError, match="down"):
        patience.call(failing(DatabaseError("down")))


def test_a_permanent_error_is_never_retried() -> None:
    patience = Patience(600, lambda outage: None)
    with pytest.raises(StageFailed):
        patience.try_call(failing(StageFailed("broken")), None)
