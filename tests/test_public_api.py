"""The public surface: farm.__all__ and the error tree's stable codes."""

from __future__ import annotations

import farm
from farm import errors


def test_all_names_exist_and_are_exported() -> None:
    for name in farm.__all__:
        assert hasattr(farm, name), name
    assert {"Farm", "Job", "Batch", "FarmError", "Settings", "NoWorkerWarning"} <= set(farm.__all__)


def test_every_error_has_a_stable_unique_code() -> None:
    classes = [
        c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.FarmError)
    ]
    codes = [c.code for c in classes]
    assert len(codes) == len(set(codes))
    assert all(code.isupper() for code in codes)


def test_transient_errors_are_retryable_and_input_errors_are_not() -> None:
    assert errors.StorageError("x").retryable
    assert errors.DatabaseError("x").retryable
    assert not errors.InvalidImage("x").retryable


def test_refusals_are_never_caught_as_transient() -> None:
    refusals = (errors.StorageAuthError, errors.BucketMissing, errors.StorageRejected)
    logins = (errors.DatabaseAuthError, errors.RedisAuthError, errors.BrokerAuthError)
    for refused in (*refusals, *logins):
        assert not issubclass(refused, errors.TransientError)
        assert not refused("x").retryable
    retryable = {c for c in vars(errors).values() if isinstance(c, type) and c.retryable}
    assert all(issubclass(c, errors.TransientError) for c in retryable)
    assert str(errors.InvalidImage("bad", code="INPUT_CORRUPT")) == "INPUT_CORRUPT: bad"
