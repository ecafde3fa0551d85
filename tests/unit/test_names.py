"""Session names as keys: the rule (broker.names), HELLO, the durable-state keys, recovery.

Issue 12, threat 7. The rule is checked against a reference written out by hand; HELLO
with any name either decodes or is refused with a code (Hypothesis); a stored key with any
name reads back into the same fields, and a name that only starts like another's never
mixes their rows; recovery skips and counts a row with a refused name.
"""

from __future__ import annotations

import struct
import tempfile
import unicodedata
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker import protocol as P
from broker.errors import Code, ProtocolViolation, WireError
from broker.names import MAX_SESSION_NAME, session_name_problem, validate_session_name
from broker.recovery import RecoveryReport, apply_restore
from broker.wire import EvRestore, Hello, dead_letter_row
from persistence.state import StateStore
from tests.unit.test_recovery import FakeRouter, delivery_row

_U32 = struct.Struct(">I")


def reference_ok(name: str) -> bool:
    """Slow and obvious: 1-64 characters, none of Unicode's "other" (control, format,
    surrogate, private use, unassigned) or "separator" (space, line, paragraph) classes,
    which hold every NUL, control character and whitespace, except the plain space."""
    return 1 <= len(name) <= 64 and all(
        c == " " or unicodedata.category(c)[0] not in "CZ" for c in name
    )


@pytest.mark.parametrize(
    "name",
    [
        "main",
        "desk-1",
        "cli-4242",
        "t1700000000",
        "é",
        "日本",
        "a.b_c:d/e",
        "my desk",
        "raw-[1, 2]",
        "x" * 64,
    ],
)
def test_names_clients_use_are_valid(name: str) -> None:
    assert session_name_problem(name) is None
    assert validate_session_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        *("", "x" * 65, "a\x00b", "\x00", "a\u3000b", "a\tb", "a\nb", "a\rb", "\x7f", "\x1b[31m"),
        *("\u2028", "\u200b", "\ufeff", "a\u00a0b", "\ud800"),
    ],
    ids=repr,
)
def test_bad_names_are_refused_with_bad_session_name(name: str) -> None:
    assert session_name_problem(name) is not None
    with pytest.raises(ProtocolViolation) as refused:
        validate_session_name(name)
    assert refused.value.code == Code.BAD_SESSION_NAME
    assert int(refused.value.code) == 112
    assert "printable" in refused.value.hint


@pytest.mark.parametrize("value", [None, 5, b"main", ["main"], {"a": 1}, True])
def test_a_name_that_is_not_a_string_is_refused(value: Any) -> None:
    assert "must be a string" in (session_name_problem(value) or "")


@given(st.text(max_size=MAX_SESSION_NAME + 2))
def test_the_rule_agrees_with_the_reference(name: str) -> None:
    assert (session_name_problem(name) is None) == reference_ok(name)


any_session = (
    st.text(max_size=80)
    | st.sampled_from(["a\x00b", "\x00", "", "x" * 65])
    | st.binary(max_size=8)
    | st.integers(-(2**63), 2**63 - 1)
    | st.none()
    | st.lists(st.integers(0, 9), max_size=2)
)


@settings(max_examples=500)
@given(session=any_session, versions=st.lists(st.integers(0, 3), max_size=3))
def test_hello_with_any_session_decodes_or_is_refused_with_a_code(
    session: Any, versions: list[int]
) -> None:
    frames = [P.HELLO, msgpack.packb({"v": versions, "session": session}, use_bin_type=True)]
    try:
        hello = Hello.decode(frames)
    except WireError as exc:
        assert exc.code == Code.BAD_SESSION_NAME
        assert session_name_problem(session) is not None
        return
    assert session_name_problem(hello.session) is None
    assert hello.session == session


def test_a_refused_hello_names_the_problem() -> None:
    with pytest.raises(ProtocolViolation) as refused:
        Hello.decode(Hello(session="a\x00b").frames())
    assert refused.value.code == Code.BAD_SESSION_NAME
    assert "session" in refused.value.detail and "NUL" in refused.value.detail


# -- the durable-state keys ------------------------------------------------------------------


@settings(max_examples=50)
@given(
    sessions=st.lists(
        st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=8),
        min_size=1,
        max_size=4,
        unique=True,
    )
)
def test_stored_keys_read_back_whatever_the_names_hold(sessions: list[str]) -> None:
    """Names with NULs included (an older broker wrote some): each key reads back into its
    own fields, and `a`'s rows are never `a NUL b`'s."""
    with tempfile.TemporaryDirectory() as directory:
        check_keys_read_back(Path(directory) / "state.mdb", sessions)


def check_keys_read_back(path: Path, sessions: list[str]) -> None:
    state = StateStore(path, readonly=False)
    try:
        with state.env.begin(write=True) as txn:
            for number, session in enumerate(sessions, 1):
                prefix = b"sub\0" + session.encode() + b"\0"
                txn.put(prefix + _U32.pack(number), b"t.>", db=state.subs)
                pending = prefix + number.to_bytes(8, "big")
                txn.put(pending, msgpack.packb([number]), db=state.pending)
        assert state.subscriptions() == {
            ("sub", session): {number: "t.>"} for number, session in enumerate(sessions, 1)
        }
        for number, session in enumerate(sessions, 1):
            assert state.pending_of("sub", session) == [(number, [number])]
        assert state.skipped == 0
    finally:
        state.close()


def test_rows_that_do_not_parse_are_skipped_and_counted(tmp_path: Path) -> None:
    state = StateStore(tmp_path / "state.mdb", readonly=False)
    try:
        with state.env.begin(write=True) as txn:
            txn.put(b"nonul", b"t.>", db=state.subs)
            txn.put(b"\0lead\0" + _U32.pack(1), b"t.>", db=state.subs)
            txn.put(b"sub\0s\0\x01", b"t.>", db=state.subs)
            txn.put(b"sub\0s\0" + _U32.pack(2), b"\xff", db=state.subs)
            txn.put(b"sub\0\xff\0" + _U32.pack(3), b"t.>", db=state.subs)
            txn.put(b"sub\0s\0" + _U32.pack(4), b"t.>", db=state.subs)
            txn.put(b"sub\0s\0" + (9).to_bytes(8, "big"), b"\xc1", db=state.pending)
            txn.put(b"sub\0s\0" + (10).to_bytes(8, "big"), msgpack.packb(["x"]), db=state.pending)
            txn.put(b"sub\0s\0" + (11).to_bytes(8, "big"), msgpack.packb([4]), db=state.pending)
            txn.put(b"sub\0s\0\x07", msgpack.packb([4]), db=state.pending)
            txn.put(b"short", msgpack.packb({}), db=state.dlq)
            txn.put((1).to_bytes(8, "big"), b"\xc1", db=state.dlq)
            txn.put((2).to_bytes(8, "big"), msgpack.packb([1]), db=state.dlq)
            txn.put((3).to_bytes(8, "big"), msgpack.packb({"reason": "x"}), db=state.dlq)
            txn.put(b"watermark", b"\x01", db=state.meta)
        assert state.subscriptions() == {("sub", "s"): {4: "t.>"}}
        assert state.pending_of("sub", "s") == [(11, [4])]
        assert [record.entry_id for record in state.dead_letters()] == [3]
        assert state.watermark() == 0
        assert state.skipped == 12
    finally:
        state.close()


def test_writers_refuse_names_that_would_make_ambiguous_keys(tmp_path: Path) -> None:
    state = StateStore(tmp_path / "state.mdb", readonly=False)
    try:
        with state.env.begin(write=True) as txn:
            state.put_subscription(txn, "sub", "a\x00b", 1, "t.>")
            state.put_pending(txn, "sub", "a\x00b", 5, msgpack.packb([1]))
            state.put_subscription(txn, "s\x00b", "main", 1, "t.>")
            state.put_subscription(txn, "sub", "a", 1, "t.>")
        assert state.subscriptions() == {("sub", "a"): {1: "t.>"}}
        assert state.pending_count() == 0
    finally:
        state.close()


# -- recovery --------------------------------------------------------------------------------


def test_recovery_skips_and_counts_rows_with_refused_names_or_bad_subscriptions() -> None:
    router = FakeRouter({"sub"})
    report = RecoveryReport()
    page = EvRestore(
        3,
        sessions=(
            ("sub", "a\x00b", {1: "t.>"}),
            ("sub", "bell\x07", {1: "t.>"}),
            ("sub", "pat", {1: "t..x", 2: "t.a"}),
            ("sub", "nosid", {0: "t.>"}),
            ("sub", "ok", {1: "t.>"}),
        ),
        deliveries=(
            delivery_row("sub", "a\x00b", 1),
            delivery_row("sub", "a\x00b", 2),
            delivery_row("sub", "ok", 3),
            delivery_row("sub", "nosid", 4),
        ),
        done=True,
    )
    apply_restore(router, EvRestore.decode(page.frames()), 0, report)
    assert set(router.sessions) == {("sub", "pat"), ("sub", "ok")}
    assert router.sessions["sub", "pat"][0] == {2: "t.a"}
    assert [d.stored_seq for d in router.sessions["sub", "ok"][1]] == [3]
    # 2 refused names + their 2 deliveries, 2 bad subscriptions, nosid's orphan delivery
    assert report.skipped == 7
    assert (report.sessions, report.subscriptions, report.deliveries) == (2, 2, 1)


def test_a_dead_letter_row_of_wrong_types_is_refused_before_it_is_sent() -> None:
    good: tuple[Any, ...] = (1, "nacked", "sub", "s", 9, 1, "boom", 0, "pub", 1, "t.a")
    good += (b"i" * 16, b"h", b"p", False, [1])
    assert dead_letter_row(good) == good
    with pytest.raises(ProtocolViolation):
        dead_letter_row((good[0], 5, *good[2:]))  # a reason that is not a string
