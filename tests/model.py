"""Classes the value tests register in the default registry, at import, as an application would.

A forked test server inherits these registrations; a spawned one (tests.spawn_app
imports this module) makes them itself. Codes 10 to 19 are this module's.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
from typing import Any

import attrs

import passrpc


@passrpc.register_type(code=10)
@attrs.frozen
class Point:
    """An attrs class: travels as a map of its fields, with no code of its own."""

    x: int
    y: int


@passrpc.register_type(code=11)
@dataclasses.dataclass
class Shape:
    """A dataclass holding registered values, a list and a dict of them."""

    name: str
    corners: list[Point]
    tags: dict[str, Any] = dataclasses.field(default_factory=dict)
    when: datetime.datetime | None = None


@passrpc.register_type(code=12)
@attrs.define
class Record:
    """Five fields of five kinds, one private (its __init__ argument is ``note``)."""

    id: int
    label: str
    ratio: float
    payload: bytes
    _note: str | None = None


@passrpc.register_type(code=13)
@attrs.define
class Strict:
    """Refuses a negative value, so a peer can make its decoding fail."""

    value: int = attrs.field()

    @value.validator
    def _check(self, _: object, value: int) -> None:
        if value < 0:
            raise ValueError(f"Strict takes no negative value, got {value}")


# A class that is neither attrs nor a dataclass: it brings its own functions.
passrpc.register_type(
    decimal.Decimal, 14, encode=str, decode=decimal.Decimal
)  # fmt: skip


@passrpc.register_error
class NotFound(LookupError):
    """An application's own exception, registered: callers catch it by its class."""


class Unregistered(KeyError):
    """Never registered: callers see it typed by its nearest builtin, KeyError."""
