"""docs/protocol.md's byte-by-byte examples and constants match what the code produces.

Every example frame in the document sits in a fenced block right after a
marker comment ``<!-- frame: NAME -->``; each line of the block is
``OFFSET  BYTES  MEANING`` (offset in hex, bytes as hex pairs). This test
re-encodes each example with the real encoder and compares bytes and
offsets, so the document cannot silently go stale. The meanings are free
text for humans and are not checked.

To regenerate the blocks after a protocol change, run
``python -m tests.test_protocol_doc``: it prints every block, annotated,
ready to paste (then touch up the meanings by hand where you like).
"""

from __future__ import annotations

import datetime
import hmac
import re
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import msgpack
import pytest

from passrpc import _handshake as handshake_module
from passrpc import _protocol, _streaming, _types, _wire
from passrpc._handshake import ClientHandshake, ServerHandshake, password_key
from passrpc._protocol import error_payload
from passrpc._types import TypeRegistry
from passrpc._wire import Kind, WireOptions, encode_frame

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"

#: The handshake examples' fixed inputs (real handshakes draw fresh random challenges).
PASSWORD = "secret"
CLIENT_CHALLENGE = bytes(range(0x20))
SERVER_CHALLENGE = bytes(range(0x20, 0x40))


class _Fd:
    """Stands in for an open file: the encoder only asks for ``fileno()``."""

    def fileno(self) -> int:
        return 7


def _handshake() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The three handshake payloads, made by the real steps with the fixed challenges."""
    key = password_key(PASSWORD)
    client, server = ClientHandshake(key), ServerHandshake(key)
    client._challenge = CLIENT_CHALLENGE
    server._challenge = SERVER_CHALLENGE
    hello = client.hello()
    challenge = server.challenge(hello)
    proof = client.answer(challenge)
    server.verify(proof)
    return hello, challenge, proof


@attrs.frozen
class Point:
    """The registered type of the values example: code 10 in its own registry."""

    x: int
    y: int


#: The values example's registry: what `register_type(Point, 10)` makes.
EXAMPLE_TYPES = TypeRegistry()
EXAMPLE_TYPES.register_type(Point, 10)


def _frame(kind: int, payload: Any, types: TypeRegistry | None = None) -> Callable[[], bytes]:
    def make() -> bytes:
        data, _ = encode_frame(kind, payload, WireOptions(types=types or TypeRegistry()))
        return data

    return make


def _handshake_frame(step: int) -> Callable[[], bytes]:
    def make() -> bytes:
        data, _ = encode_frame(Kind.HANDSHAKE, _handshake()[step])
        return data

    return make


#: Every documented example: its marker name and how to make its bytes.
EXAMPLES: dict[str, Callable[[], bytes]] = {
    "request": _frame(Kind.MESSAGE, ("hello", "Joe", "Dalton")),
    "reply": _frame(Kind.MESSAGE, ["Hello Joe Dalton, how are you?", 1234]),
    "call": _frame(Kind.CALL, ("hello", ("Joe",), {"last_name": "Dalton"})),
    "error": _frame(
        Kind.ERROR,
        error_payload(
            _protocol.ERROR_UNKNOWN_MESSAGE,
            "UnknownMessage",
            "the server has no handler for 'helo'; it has: ['hello']",
        ),
    ),
    "descriptor": _frame(Kind.MESSAGE, ("log_to", _Fd())),
    "describe": _frame(Kind.DESCRIBE, None),
    "status": _frame(Kind.STATUS, None),
    "status-reply": _frame(
        Kind.STATUS,
        {
            "pid": 4242,
            "uptime": 1.5,
            "protocol": 1,
            "connections": {"open": 1, "served": 3},
            "handlers": {"hi": {"calls": 2, "errors": 0, "mean": 0.25, "p99": 0.5, "timed": 2}},
        },
    ),
    "describe-types": _frame(Kind.DESCRIBE, "types"),
    "stream": _frame(Kind.STREAM, ("numbers", [5], {}, 128)),
    "item": _frame(Kind.ITEM, [0]),
    "more": _frame(Kind.MORE, 64),
    "end": _frame(Kind.END, None),
    "values": _frame(
        Kind.MESSAGE,
        ("move", Point(1, 2), datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)),
        EXAMPLE_TYPES,
    ),
    "handshake-hello": _handshake_frame(0),
    "handshake-challenge": _handshake_frame(1),
    "handshake-proof": _handshake_frame(2),
}

#: Constants listed in the document's ``<!-- constants -->`` block, and where they live.
CONSTANT_MODULES = (_wire, handshake_module, _protocol, _streaming, _types)

_MARKER = re.compile(r"<!-- frame: ([\w-]+) -->\s*\n```text\n(.*?)```", re.DOTALL)
_LINE = re.compile(r"^([0-9a-f]{4})  ([0-9a-f]{2}(?: [0-9a-f]{2})*)(?:  +.*)?$")
_CONSTANTS = re.compile(r"<!-- constants -->\s*\n```text\n(.*?)```", re.DOTALL)


def documented_frames(text: str) -> dict[str, list[tuple[int, bytes]]]:
    """Return each marked block of ``text`` as its ``(offset, bytes)`` lines."""
    blocks: dict[str, list[tuple[int, bytes]]] = {}
    for name, block in _MARKER.findall(text):
        lines = []
        for line in block.splitlines():
            match = _LINE.match(line)
            if match:
                lines.append((int(match[1], 16), bytes.fromhex(match[2])))
        blocks[name] = lines
    return blocks


@pytest.fixture(scope="module")
def doc_text() -> str:
    """The text of docs/protocol.md."""
    return DOC.read_text(encoding="utf-8")


class TestExamples:
    def test_every_example_is_documented_once(self, doc_text: str) -> None:
        """Each example appears exactly once, and the document marks no unknown example."""
        names = _MARKER.findall(doc_text)
        assert sorted(name for name, _ in names) == sorted(EXAMPLES)

    @pytest.mark.parametrize("name", sorted(EXAMPLES))
    def test_documented_bytes_match_the_encoder(self, doc_text: str, name: str) -> None:
        """The example's bytes and offsets in the document are what the encoder produces now."""
        lines = documented_frames(doc_text)[name]
        expected = EXAMPLES[name]()
        offset = 0
        for line_offset, data in lines:
            assert line_offset == offset, (
                f"{name}: line at {line_offset:04x}, expected {offset:04x}"
            )
            offset += len(data)
        documented = b"".join(data for _, data in lines)
        assert documented.hex(" ") == expected.hex(" "), f"{name}: regenerate the block"

    def test_handshake_proofs_follow_the_documented_formula(self) -> None:
        """The proofs are HMAC-SHA256 over label, NUL and both challenges, as documented."""
        _, challenge, proof = _handshake()
        key = PASSWORD.encode()
        server = hmac.digest(
            key, b"passrpc server\0" + CLIENT_CHALLENGE + SERVER_CHALLENGE, "sha256"
        )
        client = hmac.digest(
            key, b"passrpc client\0" + SERVER_CHALLENGE + CLIENT_CHALLENGE, "sha256"
        )
        assert challenge["proof"] == server
        assert proof["proof"] == client

    def test_descriptor_example_sends_its_descriptor(self) -> None:
        """The descriptor example carries one descriptor, the stand-in's number."""
        _, fds = encode_frame(Kind.MESSAGE, ("log_to", _Fd()))
        assert fds == [7]


class TestConstants:
    def test_documented_constants_match_the_code(self, doc_text: str) -> None:
        """Every ``NAME = value`` line of the constants block equals the code's value."""
        (block,) = _CONSTANTS.findall(doc_text)
        seen = 0
        for line in block.splitlines():
            name, sep, value = line.partition(" = ")
            if not sep:
                continue
            name, value = name.strip(), value.split("#")[0].strip()
            actual = _lookup(name)
            assert repr(actual) == value or str(actual) == value, f"{name} is {actual!r}"
            seen += 1
        assert seen >= 10

    def test_kind_values_are_documented(self, doc_text: str) -> None:
        """Every Kind member is in the constants block."""
        (block,) = _CONSTANTS.findall(doc_text)
        for kind in Kind:
            assert f"Kind.{kind.name} = {int(kind)}" in block


def _lookup(name: str) -> Any:
    if name.startswith("Kind."):
        return int(Kind[name.removeprefix("Kind.")])
    for module in CONSTANT_MODULES:
        if hasattr(module, name):
            return getattr(module, name)
    raise AssertionError(f"the document names {name}, which the code does not have")


# Regenerating the blocks ------------------------------------------------------

_WIDTH = 8  # bytes per line


def annotate(frame: bytes) -> list[str]:
    """Disassemble one frame into ``OFFSET  BYTES  MEANING`` lines."""
    lines: list[str] = []

    def emit(start: int, end: int, meaning: str) -> None:
        for at in range(start, max(end, start + 1), _WIDTH):
            chunk = frame[at : min(at + _WIDTH, end)]
            text = meaning if at == start else "  ..."
            lines.append(f"{at:04x}  {chunk.hex(' '):<{_WIDTH * 3 - 1}}  {text}")

    (length,) = struct.unpack_from(">I", frame)
    emit(0, 4, f"header: the body is {length} bytes (big-endian uint32)")
    _walk(frame, 4, "body", emit, top=True)
    return lines


def _walk(
    data: bytes, at: int, label: str, emit: Callable[[int, int, str], None], top: bool = False
) -> int:
    b = data[at]
    if b <= 0x7F or b >= 0xE0:
        value = b if b <= 0x7F else b - 0x100
        if label == "kind":
            emit(at, at + 1, f"kind: fixint {value} = {Kind(value).name}")
        elif label == "nfds":
            emit(at, at + 1, f"nfds: fixint {value}, descriptors sent with this frame")
        else:
            emit(at, at + 1, f"{label}: fixint {value}")
        return at + 1
    if 0x90 <= b <= 0x9F or b in (0xDC, 0xDD):
        count, head = (b & 0x0F, 1) if b <= 0x9F else _count(data, at)
        what = "[kind, nfds, payload]" if top else f"{count} item(s)"
        emit(at, at + head, f"{label}: {_format(b, 0x90, 0x9F)} of {count}: {what}")
        at += head
        names = ["kind", "nfds", "payload"] if top else [f"{label}[{i}]" for i in range(count)]
        for i in range(count):
            at = _walk(data, at, names[i], emit)
        return at
    if 0x80 <= b <= 0x8F or b in (0xDE, 0xDF):
        count, head = (b & 0x0F, 1) if b <= 0x8F else _count(data, at)
        emit(at, at + head, f"{label}: {_format(b, 0x80, 0x8F)} of {count} pair(s)")
        at += head
        for _ in range(count):
            key_at = at
            at = _walk(data, at, "  key", emit)
            key = _unpack_one(data, key_at, at)
            at = _walk(data, at, f"  [{key!r}]", emit)
        return at
    if 0xA0 <= b <= 0xBF or b in (0xD9, 0xDA, 0xDB):
        size, head = (b & 0x1F, 1) if b <= 0xBF else _sized(data, at, {0xD9: 1, 0xDA: 2, 0xDB: 4})
        text = data[at + head : at + head + size].decode()
        emit(at, at + head + size, f"{label}: {_format(b, 0xA0, 0xBF)} of {size}, {text!r}")
        return at + head + size
    if b in (0xC4, 0xC5, 0xC6):
        size, head = _sized(data, at, {0xC4: 1, 0xC5: 2, 0xC6: 4})
        emit(at, at + head, f"{label}: {_FORMAT[b]} of {size} bytes, which follow")
        emit(at + head, at + head + size, "  (the bytes)")
        return at + head + size
    if 0xD4 <= b <= 0xD8 or b in (0xC7, 0xC8, 0xC9):
        size, head = (1 << (b - 0xD4), 1) if b >= 0xD4 else _sized(data, at, _EXT_WIDTHS)
        code = int.from_bytes(data[at + head : at + head + 1], "big", signed=True)
        start, end = at + head + 1, at + head + 1 + size
        if code not in (-1, _wire.FD_EXT_CODE):  # a registered type: its data is msgpack
            emit(at, start, f"{label}: {_FORMAT[b]} of {size} bytes, ext type {code}, data:")
            _walk(data, start, "  data", emit)
            return end
        meaning = f"type {code}, data {data[start:end].hex()}"
        if code == _wire.FD_EXT_CODE:
            meaning += f": descriptor {int.from_bytes(data[start:end], 'big')} of this frame"
        else:
            when = msgpack.unpackb(data[at:end], timestamp=3)
            meaning = f"type -1 = Timestamp, {size} bytes of data: {when.isoformat()}"
        emit(at, end, f"{label}: {_FORMAT[b]}, {meaning}")
        return end
    size = _FIXED_SIZE[b]
    value = _unpack_one(data, at, at + 1 + size)
    emit(at, at + 1 + size, f"{label}: {_FORMAT[b]} {value!r}")
    return at + 1 + size


_FORMAT = {0x80: "fixmap", 0x90: "fixarray", 0xA0: "fixstr", 0xC0: "nil", 0xC2: "false",
           0xC3: "true", 0xC4: "bin 8", 0xC5: "bin 16", 0xC6: "bin 32", 0xCB: "float 64",
           0xCC: "uint 8", 0xCD: "uint 16", 0xCE: "uint 32", 0xCF: "uint 64", 0xD0: "int 8",
           0xD1: "int 16", 0xD2: "int 32", 0xD3: "int 64", 0xD4: "fixext 1", 0xD5: "fixext 2",
           0xD6: "fixext 4", 0xD7: "fixext 8", 0xD8: "fixext 16", 0xD9: "str 8", 0xDA: "str 16",
           0xDB: "str 32", 0xDC: "array 16", 0xDD: "array 32", 0xDE: "map 16", 0xDF: "map 32",
           0xC7: "ext 8", 0xC8: "ext 16", 0xC9: "ext 32"}  # fmt: skip
_EXT_WIDTHS = {0xC7: 1, 0xC8: 2, 0xC9: 4}
_FIXED_SIZE = {0xC0: 0, 0xC2: 0, 0xC3: 0, 0xCB: 8, 0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8,
               0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8}  # fmt: skip


def _format(b: int, fix_low: int, fix_high: int) -> str:
    return _FORMAT[fix_low if fix_low <= b <= fix_high else b]


def _count(data: bytes, at: int) -> tuple[int, int]:
    width = 2 if data[at] in (0xDC, 0xDE) else 4
    return int.from_bytes(data[at + 1 : at + 1 + width], "big"), 1 + width


def _sized(data: bytes, at: int, widths: dict[int, int]) -> tuple[int, int]:
    width = widths[data[at]]
    return int.from_bytes(data[at + 1 : at + 1 + width], "big"), 1 + width


def _unpack_one(data: bytes, start: int, end: int) -> Any:
    return msgpack.unpackb(data[start:end], raw=False)


if __name__ == "__main__":
    for example, make in EXAMPLES.items():
        sys.stdout.write(f"<!-- frame: {example} -->\n```text\n")
        sys.stdout.write("\n".join(annotate(make())) + "\n```\n\n")
