"""broker.event_records.decode_events: the fused fast path builds exactly the records the
checked slow path (decode_record) builds, for every kind, and anything mistyped is still a
ProtocolViolation naming the field."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker import event_records as R
from broker.errors import ProtocolViolation

_BY_TYPE: dict[type, st.SearchStrategy[Any]] = {
    str: st.text(max_size=12),
    int: st.integers(-(2**63), 2**63 - 1),
    bool: st.booleans(),
    bytes: st.binary(max_size=24),
    list: st.lists(st.integers(0, 9) | st.text(max_size=3), max_size=3),
    dict: st.dictionaries(st.text(max_size=4), st.integers(0, 9), max_size=3),
}


def _types(kind: int) -> list[type]:
    return [expected for _, expected in R._checks(R.RECORDS[kind])]


@st.composite
def events(draw: st.DrawFn) -> tuple[int, int, list[Any]]:
    kind = draw(st.sampled_from(sorted(R.RECORDS)))
    values = [draw(_BY_TYPE[t]) for t in _types(kind)]
    return kind, draw(st.integers(1, 2**40)), values


@given(events())
def test_fast_decoding_equals_the_checked_record(event: tuple[int, int, list[Any]]) -> None:
    kind, seq, values = event
    record = R.decode_record(kind, values)
    (decoded,) = R.decode_events(R.encode_event(seq, 7, record))
    assert decoded == R.Event(seq, 7, record)
    assert type(decoded.record) is R.RECORDS[kind]
    with pytest.raises(AttributeError):  # still frozen
        decoded.record.__setattr__(fields(R.RECORDS[kind])[0].name, None)


@given(events(), st.data())
def test_a_mistyped_field_is_a_protocol_violation(
    event: tuple[int, int, list[Any]], data: st.DataObject
) -> None:
    kind, seq, values = event
    index = data.draw(st.integers(0, len(values) - 1))
    wrong = None if _types(kind)[index] is not str else 5
    values[index] = wrong
    blob = msgpack.packb([seq, kind, 7, *values], use_bin_type=True)
    with pytest.raises(ProtocolViolation, match="field"):
        R.decode_events(blob)


@pytest.mark.parametrize("kind", sorted(R.RECORDS))
def test_a_wrong_arity_is_a_protocol_violation(kind: int) -> None:
    sample = {str: "s", int: 1, bool: True, bytes: b"b", list: [], dict: {}}
    values = [sample[t] for t in _types(kind)]
    for broken in (values[:-1], [*values, 1]):
        with pytest.raises(ProtocolViolation, match="takes"):
            R.decode_events(msgpack.packb([1, kind, 7, *broken], use_bin_type=True))
