"""error_from_wire: one exception class per wire category, keeping code, hint and ref."""

from __future__ import annotations

from typing import Any

import pytest

from broker.errors import ERRORS, Code, error_body
from clients.errors import (
    AuthenticationError,
    BrokerUnavailable,
    BusError,
    ClosedError,
    DeliveryError,
    InternalError,
    NoResponders,
    PermissionDenied,
    ProtocolError,
    StorageError,
    error_from_wire,
)

BY_CATEGORY: dict[str, type[BusError]] = {
    "protocol": ProtocolError,
    "auth": AuthenticationError,
    "permission": PermissionDenied,
    "delivery": DeliveryError,
    "storage": StorageError,
    "internal": InternalError,
}


SPECIFIC = {Code.NO_RESPONDERS: NoResponders}
"""Codes with a class of their own below their category's class."""


@pytest.mark.parametrize("code", list(Code), ids=lambda c: c.name)
def test_every_broker_code_maps_to_its_class(code: Code) -> None:
    body = error_body(code, "what went wrong", {"sid": 3, "topic": "a.b"})
    error = error_from_wire(body)
    spec = ERRORS[code]
    assert type(error) is SPECIFIC.get(code, BY_CATEGORY[spec.category])
    assert isinstance(error, BY_CATEGORY[spec.category])
    assert error.category == spec.category
    assert error.code == int(code)
    assert error.hint == spec.hint
    assert error.ref == {"sid": 3, "topic": "a.b"}
    assert code.name in str(error)
    assert str(int(code)) in str(error)
    assert "what went wrong" in str(error)
    assert spec.hint in str(error)


def test_every_code_has_a_hint() -> None:
    assert set(ERRORS) == set(Code)
    for code, spec in ERRORS.items():
        assert spec.code == code
        assert spec.hint.strip()


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (100, ProtocolError),
        (199, ProtocolError),
        (250, AuthenticationError),
        (301, PermissionDenied),
        (400, DeliveryError),
        (500, StorageError),
        (600, InternalError),
    ],
)
def test_category_by_hundreds(code: int, cls: type[BusError]) -> None:
    error = error_from_wire({"code": code, "name": "X", "message": "m", "hint": "h", "ref": {}})
    assert type(error) is cls
    assert error.code == code
    assert error.hint == "h"


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"code": "300"},
        {"code": None},
        {"code": 42},
        {"code": 900},
        {"code": -1},
        {"code": 300, "ref": "not a dict"},
        {"code": 300, "hint": 5},
    ],
)
def test_malformed_bodies_still_give_a_bus_error(body: dict[str, Any]) -> None:
    error = error_from_wire(body)
    assert isinstance(error, BusError)
    assert isinstance(error.code, int)
    assert isinstance(error.hint, str)
    assert isinstance(error.ref, dict)


def test_defaults() -> None:
    error = error_from_wire({})
    assert type(error) is InternalError and error.code == 600
    assert error.ref == {}
    assert error_from_wire({"code": 300, "ref": [1]}).ref == {}
    assert error_from_wire({"code": 300, "hint": 5}).hint == "5"


def test_local_errors() -> None:
    for cls in (BrokerUnavailable, ClosedError):
        error = cls("gone")
        assert isinstance(error, BusError)
        assert error.code is None
        assert error.category == "local"
        assert error.ref == {}
        assert str(error) == "gone"
    assert str(BusError("m", 1, "do this")) == "m — do this"


def test_bus_re_exports_the_tree() -> None:
    from clients import bus

    assert bus.BusError is BusError
    assert bus.PermissionDenied is PermissionDenied
