"""Names a client chooses that become keys: the rule for session names, in one place.

A session name is one part of the session's key, (app id, session name), in the broker's
dicts and, with persistence on, in the durable-state LMDB keys `app NUL session NUL ...`
(persistence.state). So, like a topic (broker.topics), it is 1 to 64 characters, each
printable (`str.isprintable`: no NUL, no control character, no line break, tab or other
whitespace but the plain space, no format or unassigned character; docs/protocol.md
§3.2). A NUL once split a stored key into the wrong fields at recovery and crash-looped
the platform. The plain space is allowed (unlike in topics, where it would be ambiguous
on a command line): it separates nothing in a key, and clients name sessions with it.

The broker checks it at HELLO (`validate_session_name`, 112 `BAD_SESSION_NAME`);
recovery and persistence check stored rows with `session_name_problem` and skip, never
crash on, a row that fails it.
"""

from __future__ import annotations

from typing import Any, Final

from broker.errors import Code, ProtocolViolation

MAX_SESSION_NAME: Final = 64
"""Most characters of a session name."""


def session_name_problem(name: Any) -> str | None:
    """What is wrong with `name` as a session name, or None when it is a valid one."""
    if not isinstance(name, str):
        return f"must be a string, got {type(name).__name__}"
    if not 0 < len(name) <= MAX_SESSION_NAME:
        return f"must be 1-{MAX_SESSION_NAME} characters, got {len(name)}"
    if not name.isprintable():
        return f"{name!r} contains a NUL, control, line-break or other non-printable character"
    return None


def validate_session_name(name: Any) -> str:
    """`name` when it is a valid session name; ProtocolViolation(BAD_SESSION_NAME) else."""
    problem = session_name_problem(name)
    if problem is not None:
        raise ProtocolViolation(Code.BAD_SESSION_NAME, f"HELLO field 'session' {problem}")
    return str(name)
