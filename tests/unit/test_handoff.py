"""security.handoff: bytes from a parent over an inherited pipe, and the credential read."""

from __future__ import annotations

import os

import pytest

from security.handoff import (
    MAX_HANDOFF_BYTES,
    HandoffError,
    credential_from_environment,
    handoff_pipe,
    read_fd_variable,
)


def test_the_bytes_arrive_and_the_descriptor_is_closed() -> None:
    fd = handoff_pipe(b"\x00settings\xff")
    assert read_fd_variable("X_FD", {"X_FD": str(fd)}) == b"\x00settings\xff"
    with pytest.raises(OSError):
        os.fstat(fd)
    assert read_fd_variable("X_FD", {}) is None


def test_the_credential_is_read_once_and_kept() -> None:
    fd = handoff_pipe(b"secret-token\n")
    env = {"PLEXUS_CREDENTIAL_FD": str(fd)}
    assert credential_from_environment(env) == "secret-token"
    assert credential_from_environment(env) == "secret-token"  # a second Bus of the app
    assert credential_from_environment({"PLEXUS_TOKEN": "t"}) == "t"


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({}, "neither PLEXUS_CREDENTIAL_FD nor PLEXUS_TOKEN is set"),
        ({"PLEXUS_CREDENTIAL_FD": "three"}, "is not a descriptor number"),
        ({"PLEXUS_CREDENTIAL_FD": "987654"}, "cannot read PLEXUS_CREDENTIAL_FD"),
    ],
)
def test_a_missing_or_bad_credential_says_what_to_do(env: dict[str, str], needle: str) -> None:
    with pytest.raises(HandoffError, match=needle):
        credential_from_environment(env)


def test_more_than_a_pipe_holds_is_refused() -> None:
    with pytest.raises(HandoffError, match="do not fit a pipe"):
        handoff_pipe(b"x" * (MAX_HANDOFF_BYTES + 1))
