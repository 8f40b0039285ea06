"""A frozen copy of the v0.1 client, run against today's server on every test run.

DO NOT "update" this file to follow the library: it is the old client. It
was written by hand from the bytes docs/protocol.md describes for protocol
version 1 (frames, the handshake with HMAC-SHA256, MESSAGE, CALL, DESCRIBE,
ERROR, descriptors with SCM_RIGHTS), with nothing from passrpc's own
encoder, decoder or handshake, so that a later change to passrpc cannot
quietly change both ends at once. If a test here fails, the change broke
clients that are already deployed: fix the change (or bump
PROTOCOL_VERSION, which this client must then be refused with), not this
file. Only the server side (the handlers below) may grow.
"""

from __future__ import annotations

import array
import hmac
import os
import secrets
import socket
import struct
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest

import passrpc

from .helpers import WAIT

# --- The v0.1 client, frozen ------------------------------------------------

_MESSAGE, _ERROR, _HANDSHAKE, _CALL, _DESCRIBE = 0, 1, 2, 3, 4
_FD_EXT = 1
_MAX_FDS = 64


class OldError(Exception):
    """An ERROR frame, as the v0.1 client reports it: its four fields."""

    def __init__(self, payload: dict[str, str]) -> None:
        super().__init__(f"{payload['code']}: {payload['type']}: {payload['message']}")
        self.code = payload["code"]
        self.type = payload["type"]
        self.message = payload["message"]
        self.traceback = payload["traceback"]


class Fd:
    """A descriptor to send: becomes an ext-1 placeholder and rides SCM_RIGHTS."""

    def __init__(self, fd: int) -> None:
        self.fd = fd


class _Index:
    """A placeholder just unpacked: the descriptor's index in its frame."""

    def __init__(self, index: int) -> None:
        self.index = index


def _ext_hook(code: int, data: bytes) -> Any:
    if code == _FD_EXT:
        return _Index(int.from_bytes(data, "big"))
    return msgpack.ExtType(code, data)


def _resolve(value: Any, fds: list[int]) -> Any:
    """Replace placeholders with the received descriptor numbers."""
    if isinstance(value, _Index):
        return fds[value.index]
    if isinstance(value, list):
        return [_resolve(v, fds) for v in value]
    if isinstance(value, dict):
        return {k: _resolve(v, fds) for k, v in value.items()}
    return value


class OldClient:
    """The v0.1 client code path: connect, handshake, one request and its reply at a time."""

    def __init__(self, path: str, password: str, timeout: float) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.buffer = b""
        self.fifo: list[int] = []  # received descriptors, in arrival order
        try:
            self.sock.connect(path)
            _, uid, _ = struct.unpack(
                "3i", self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            )
            if uid not in (os.getuid(), 0):
                raise PermissionError(f"the server runs as uid {uid}")
            self._handshake(password.encode())
        except BaseException:
            self.close()
            raise

    def _handshake(self, key: bytes) -> None:
        ours = secrets.token_bytes(32)
        self.send(_HANDSHAKE, {"step": "hello", "version": 1, "challenge": ours})
        kind, payload = self.receive()
        if kind == _ERROR:
            raise OldError(payload)
        if kind != _HANDSHAKE or payload.get("step") != "challenge":
            raise ValueError(f"not a challenge: {kind} {payload!r}")
        theirs, proof = payload["challenge"], payload["proof"]
        if len(theirs) != 32 or len(proof) != 32:
            raise ValueError("the challenge and the proof are 32 bytes each")
        expected = hmac.digest(key, b"passrpc server\x00" + ours + theirs, "sha256")
        if not hmac.compare_digest(proof, expected):
            raise PermissionError("the server does not know the password")
        mine = hmac.digest(key, b"passrpc client\x00" + theirs + ours, "sha256")
        self.send(_HANDSHAKE, {"step": "proof", "proof": mine})

    def send(self, kind: int, payload: Any) -> None:
        fds: list[int] = []

        def mark(value: Any) -> Any:
            """Replace each Fd with its placeholder: its index among the frame's descriptors."""
            if isinstance(value, Fd):
                fds.append(value.fd)
                return msgpack.ExtType(_FD_EXT, bytes([len(fds) - 1]))
            if isinstance(value, (list, tuple)):
                return [mark(v) for v in value]
            if isinstance(value, dict):
                return {k: mark(v) for k, v in value.items()}
            return value

        payload = mark(payload)
        body = msgpack.packb([kind, len(fds), payload], use_bin_type=True)
        data = struct.pack(">I", len(body)) + body
        if fds:
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
            sent = self.sock.sendmsg([data], rights)  # the descriptors go with the first bytes
            self.sock.sendall(data[sent:])
        else:
            self.sock.sendall(data)

    def _fill(self) -> None:
        data, ancillary, _, _ = self.sock.recvmsg(
            65536, socket.CMSG_SPACE(_MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC
        )
        for level, kind, fd_bytes in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(fd_bytes) - len(fd_bytes) % 4
                self.fifo.extend(array.array("i", fd_bytes[:usable]))
        if not data:
            raise ConnectionError("the server closed the connection")
        self.buffer += data

    def receive(self) -> tuple[int, Any]:
        while len(self.buffer) < 4:
            self._fill()
        (size,) = struct.unpack(">I", self.buffer[:4])
        while len(self.buffer) < 4 + size:
            self._fill()
        body, self.buffer = self.buffer[4 : 4 + size], self.buffer[4 + size :]
        kind, nfds, payload = msgpack.unpackb(
            body, raw=False, strict_map_key=False, ext_hook=_ext_hook
        )
        fds, self.fifo = self.fifo[:nfds], self.fifo[nfds:]
        return kind, _resolve(payload, fds)

    def _reply(self) -> list[Any]:
        kind, payload = self.receive()
        if kind == _ERROR:
            raise OldError(payload)
        assert kind == _MESSAGE, f"a reply is a MESSAGE, got kind {kind}"
        return payload  # type: ignore[no-any-return]

    def call(self, name: str, *args: Any, **kwargs: Any) -> list[Any]:
        """A request: MESSAGE without keyword arguments, CALL with them; the reply's values."""
        if kwargs:
            self.send(_CALL, [name, list(args), kwargs])
        else:
            self.send(_MESSAGE, [name, *args])
        return self._reply()

    def describe(self) -> list[dict[str, Any]]:
        self.send(_DESCRIBE, None)
        kind, payload = self.receive()
        assert kind == _DESCRIBE, f"a description is a DESCRIBE, got kind {kind}"
        return payload  # type: ignore[no-any-return]

    def close(self) -> None:
        for fd in self.fifo:
            os.close(fd)
        self.fifo = []
        self.sock.close()


# --- Today's server ----------------------------------------------------------

PASSWORD = "compat"


def make_server() -> passrpc.Server:
    server = passrpc.Server(password=PASSWORD)

    @server.handler("hello")
    def hello(first_name: str, last_name: str = "Dalton") -> tuple[str, int]:
        """Greet someone."""
        return f"Hello {first_name} {last_name}, how are you?", 1234

    @server.handler()
    def echo(value: Any) -> Any:
        return value

    @server.handler()
    def nothing() -> None:
        return None

    @server.handler()
    def fail(message: str) -> None:
        raise ValueError(message)

    @server.handler()
    def make_pipe(text: str) -> passrpc.FileDescriptor:
        r, w = os.pipe()
        os.write(w, text.encode())
        os.close(w)
        return passrpc.FileDescriptor(r)

    @server.handler()
    def read_from(fd: passrpc.FileDescriptor) -> bytes:
        with fd.open("rb") as f:
            return f.read()

    @server.handler("sum", raw=True)
    def total(channel: passrpc.Channel) -> None:
        running = 0
        while (number := channel.read()[0]) is not None:
            running += number
            channel.write(running)

    return server


@pytest.fixture(scope="module")
def server() -> Iterator[passrpc.Server]:
    server = make_server()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def old(server: passrpc.Server) -> Iterator[OldClient]:
    client = OldClient(server.socket_path, PASSWORD, WAIT)
    try:
        yield client
    finally:
        client.close()


# --- The old client against today's server -------------------------------------


def test_message_request_and_reply(old: OldClient) -> None:
    """A MESSAGE request gets a MESSAGE reply of the returned tuple's values."""
    assert old.call("hello", "Joe", "Dalton") == ["Hello Joe Dalton, how are you?", 1234]
    assert old.call("nothing") == [None]  # one value, even None


def test_call_with_keyword_arguments(old: OldClient) -> None:
    """A CALL [name, args, kwargs] reaches the handler with its keyword arguments."""
    assert old.call("hello", "Joe", last_name="Bloggs") == ["Hello Joe Bloggs, how are you?", 1234]
    assert old.call("hello", first_name="Jack") == ["Hello Jack Dalton, how are you?", 1234]


def test_values_travel_as_documented(old: OldClient) -> None:
    """str and bytes stay apart, ints span 64 bits, int map keys pass, tuples come back as lists."""
    value = {
        "str": "é",
        "bin": b"\x00\xff",
        "ints": [-(2**63), 2**64 - 1],
        "float": 0.5,
        1: [None, True, False],
        "tuple": (1, 2),
    }
    [back] = old.call("echo", value)
    assert back == {**value, "tuple": [1, 2]}
    assert type(back["str"]) is str
    assert type(back["bin"]) is bytes


def test_describe(old: OldClient) -> None:
    """DESCRIBE answers with one map per handler: name, params, signature, doc, raw."""
    described = {entry["name"]: entry for entry in old.describe()}
    assert described["hello"] == {
        "name": "hello",
        "params": [
            {"name": "first_name", "kind": 1},
            {"name": "last_name", "kind": 1, "default": "'Dalton'"},
        ],
        "signature": "(first_name: str, last_name: str = 'Dalton')",
        "doc": "Greet someone.",
        "raw": False,
    }
    assert described["sum"]["raw"] is True
    assert described["sum"]["params"] == []  # the channel is not the caller's to pass


def test_unknown_handler_name(old: OldClient) -> None:
    """An unknown name gets ERROR "unknown_message" naming it; the connection goes on."""
    with pytest.raises(OldError) as info:
        old.call("helo")
    assert info.value.code == "unknown_message"
    assert info.value.type == "UnknownMessage"
    assert info.value.message.startswith("the server has no handler for 'helo'; it has: [")
    assert "'hello'" in info.value.message
    assert info.value.traceback == ""
    assert old.call("hello", "A", "B")[1] == 1234


def test_handler_error(old: OldClient) -> None:
    """A raising handler gets ERROR "remote" with type, message and traceback; the connection goes on."""
    with pytest.raises(OldError) as info:
        old.call("fail", "broken")
    assert (info.value.code, info.value.type, info.value.message) == (
        "remote",
        "ValueError",
        "broken",
    )
    assert "ValueError: broken" in info.value.traceback
    assert old.call("nothing") == [None]


def test_reply_carrying_a_descriptor(old: OldClient) -> None:
    """A returned descriptor arrives by SCM_RIGHTS, its place marked by ext type 1."""
    [fd] = old.call("make_pipe", "through a pipe")
    assert isinstance(fd, int)
    try:
        assert os.read(fd, 100) == b"through a pipe"
    finally:
        os.close(fd)


def test_sending_a_descriptor(old: OldClient) -> None:
    """A descriptor sent with SCM_RIGHTS and an ext-1 placeholder reaches the handler."""
    r, w = os.pipe()
    os.write(w, b"from the old client")
    os.close(w)
    try:
        assert old.call("read_from", Fd(r)) == [b"from the old client"]
    finally:
        os.close(r)


def test_raw_conversation(old: OldClient) -> None:
    """A raw handler converses in MESSAGE frames; afterwards the connection takes requests again."""
    old.send(_MESSAGE, ["sum"])
    for number, running in ((1, 1), (2, 3), (39, 42)):
        old.send(_MESSAGE, [number])
        assert old._reply() == [running]
    old.send(_MESSAGE, [None])
    assert old.call("hello", "Joe", "Dalton")[1] == 1234


def test_wrong_password_is_caught_by_the_old_client(server: passrpc.Server) -> None:
    """The server's proof does not check out under another password."""
    with pytest.raises(PermissionError, match="does not know the password"):
        OldClient(server.socket_path, "not the password", WAIT)
