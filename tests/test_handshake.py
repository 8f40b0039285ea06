"""The handshake spoken by hand, byte for byte as docs/protocol.md section 8 says, on both sides.

The server side: a real server gets hellos and proofs of another version,
of the wrong shape, of the wrong kind, or plain garbage, over a raw
AF_UNIX socket; it must answer as documented and keep serving. The client
side: passrpc's clients (sync and asyncio) meet a stand-in server that
answers their hello wrongly, and must raise the documented error without
ever sending a proof of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import secrets
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

import passrpc
from passrpc import AuthenticationError, ConnectionClosed, FrameTooLarge, ProtocolError, Server

from .helpers import (
    CALL,
    DESCRIBE,
    ERROR,
    HANDSHAKE,
    MESSAGE,
    WAIT,
    frame,
    read_frame,
    read_until_closed,
    server_log,
    wait_for,
)

PASSWORD = "handshake-test"
KEY = PASSWORD.encode()
SERVER_LABEL = b"passrpc server\x00"
CLIENT_LABEL = b"passrpc client\x00"


def mac(label: bytes, first: bytes, second: bytes) -> bytes:
    """HMAC-SHA256 under the test password, over a direction label and two challenges."""
    return hmac.digest(KEY, label + first + second, "sha256")


def hello(challenge: bytes, version: int = 1) -> dict[str, Any]:
    """Step 1's payload."""
    return {"step": "hello", "version": version, "challenge": challenge}


@pytest.fixture
def server(sockdir: Path) -> Iterator[tuple[Server, Path]]:
    """A started server with the test password and an ``ok`` handler; yields it and its log."""
    log = sockdir / "server.log"
    server = Server(password=PASSWORD)
    server.add_handler("ok", lambda: "ok")
    with server_log(log), server:
        yield server, log


@contextlib.contextmanager
def raw(server: Server) -> Iterator[socket.socket]:
    """A plain socket connected to ``server``, every read bounded."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(WAIT)
        sock.connect(server.socket_path)
        yield sock


def start_handshake(sock: socket.socket) -> tuple[bytes, bytes]:
    """Send a good hello, check the server's answer; return both challenges ``(C, S)``."""
    ours = secrets.token_bytes(32)
    sock.sendall(frame(HANDSHAKE, 0, hello(ours)))
    kind, nfds, answer = read_frame(sock)
    assert (kind, nfds) == (HANDSHAKE, 0)
    assert set(answer) == {"step", "version", "challenge", "proof"}
    assert (answer["step"], answer["version"]) == ("challenge", 1)
    theirs = answer["challenge"]
    assert isinstance(theirs, bytes)
    assert len(theirs) == 32
    assert hmac.compare_digest(answer["proof"], mac(SERVER_LABEL, ours, theirs))
    return ours, theirs


def still_serves(server: Server) -> None:
    """A good client is served."""
    with passrpc.connect(server.socket_path, password=PASSWORD, timeout=WAIT) as proxy:
        assert proxy.ok() == "ok"


def refusal_logged(log: Path) -> None:
    """The server logged the refusal as a warning (docs/protocol.md section 8)."""
    wait_for(lambda: "WARNING refused a connection" in log.read_text(), what="the refusal's log")


class TestServerSide:
    def test_a_hand_made_handshake_is_served(self, server: tuple[Server, Path]) -> None:
        """The documented handshake, made by hand, is accepted and a request behind it is answered."""
        srv, _ = server
        with raw(srv) as sock:
            ours, theirs = start_handshake(sock)
            proof = {"step": "proof", "proof": mac(CLIENT_LABEL, theirs, ours)}
            # The request may follow the proof at once: the server sends nothing for step 3.
            sock.sendall(frame(HANDSHAKE, 0, proof) + frame(MESSAGE, 0, ["ok"]))
            assert read_frame(sock) == (MESSAGE, 0, ["ok"])

    def test_another_version_gets_an_authentication_error(
        self, server: tuple[Server, Path]
    ) -> None:
        """A hello of version 2 gets an ERROR "authentication" naming both versions, then a close."""
        srv, log = server
        with raw(srv) as sock:
            sock.sendall(frame(HANDSHAKE, 0, hello(bytes(32), version=2)))
            kind, nfds, error = read_frame(sock)
            assert (kind, nfds) == (ERROR, 0)
            assert set(error) == {"code", "type", "message", "traceback"}
            assert error["code"] == "authentication"
            assert error["type"] == "AuthenticationError"
            assert "version 2" in error["message"]
            assert "this server 1" in error["message"]
            assert "use the same passrpc version on both sides" in error["message"]
            assert error["traceback"] == ""
            assert read_until_closed(sock) == b""
        refusal_logged(log)
        still_serves(srv)

    @pytest.mark.parametrize(
        "first",
        [
            pytest.param(frame(HANDSHAKE, 0, ["hello", 1, bytes(32)]), id="hello-not-a-map"),
            pytest.param(frame(HANDSHAKE, 0, None), id="hello-nil"),
            pytest.param(frame(HANDSHAKE, 0, {"step": "hello", "version": 1}), id="no-challenge"),
            pytest.param(frame(HANDSHAKE, 0, hello(b"12345")), id="5-byte-challenge"),
            pytest.param(frame(HANDSHAKE, 0, hello(bytes(33))), id="33-byte-challenge"),
            # True and 1.0 equal 1 in Python, but are no protocol version.
            pytest.param(
                frame(HANDSHAKE, 0, {**hello(bytes(32)), "version": True}), id="bool-version"
            ),
            pytest.param(
                frame(HANDSHAKE, 0, {**hello(bytes(32)), "version": 1.0}), id="float-version"
            ),
            pytest.param(
                frame(HANDSHAKE, 0, {"step": "hello", "challenge": bytes(32)}), id="no-version"
            ),
            pytest.param(
                frame(HANDSHAKE, 0, {"step": "hello", "version": 1, "challenge": "x" * 32}),
                id="str-challenge",
            ),
            pytest.param(
                frame(HANDSHAKE, 0, {**hello(bytes(32)), "step": "proof"}), id="wrong-step"
            ),
            pytest.param(frame(MESSAGE, 0, ["ok"]), id="request-before-handshake"),
            pytest.param(frame(CALL, 0, ["ok", [], {}]), id="call-before-handshake"),
            pytest.param(frame(DESCRIBE, 0, None), id="describe-before-handshake"),
            pytest.param(
                frame(
                    ERROR, 0, {"code": "authentication", "type": "", "message": "", "traceback": ""}
                ),
                id="error-from-the-client",
            ),
            pytest.param(frame(9, 0, hello(bytes(32))), id="unknown-kind"),
            pytest.param(frame(HANDSHAKE, 1, hello(bytes(32))), id="descriptor-count-without-any"),
            pytest.param(struct.pack(">I", 2) + msgpack.packb([2, 0]), id="body-not-three-items"),
            pytest.param(b"\x00\x00\x00\x05\xc1\xc1\xc1\xc1\xc1", id="garbage-body"),
            pytest.param(b"\x00\x00\x00\x00", id="empty-body"),
            pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", id="http"),
        ],
    )
    def test_malformed_first_step_is_closed_without_an_answer(
        self, server: tuple[Server, Path], first: bytes
    ) -> None:
        """A first frame that is not a well-formed hello gets no byte back, a close, and a log line."""
        srv, log = server
        with raw(srv) as sock:
            sock.sendall(first)
            assert read_until_closed(sock) == b""
        refusal_logged(log)
        still_serves(srv)

    @pytest.mark.parametrize(
        "third",
        [
            pytest.param(
                lambda proof: frame(HANDSHAKE, 0, {"step": "prooof", "proof": proof}),
                id="wrong-step-name",
            ),
            pytest.param(
                lambda proof: frame(HANDSHAKE, 0, {"step": "hello", "proof": proof}),
                id="hello-again",
            ),
            pytest.param(lambda proof: frame(HANDSHAKE, 0, {"step": "proof"}), id="no-proof"),
            pytest.param(
                lambda proof: frame(HANDSHAKE, 0, {"step": "proof", "proof": proof[:31]}),
                id="31-byte-proof",
            ),
            pytest.param(lambda proof: frame(HANDSHAKE, 0, [proof]), id="proof-not-a-map"),
            pytest.param(lambda proof: frame(MESSAGE, 0, ["ok"]), id="request-instead-of-proof"),
        ],
    )
    def test_malformed_proof_step_is_closed_without_an_answer(
        self, server: tuple[Server, Path], third: Callable[[bytes], bytes]
    ) -> None:
        """A malformed step 3, even with the right proof inside, is closed without an error frame."""
        srv, log = server
        with raw(srv) as sock:
            ours, theirs = start_handshake(sock)
            sock.sendall(third(mac(CLIENT_LABEL, theirs, ours)))
            assert read_until_closed(sock) == b""
        refusal_logged(log)
        still_serves(srv)

    def test_wrong_proof_gets_an_authentication_error(self, server: tuple[Server, Path]) -> None:
        """A well-formed proof computed with another password gets ERROR "authentication", then a close."""
        srv, log = server
        with raw(srv) as sock:
            ours, theirs = start_handshake(sock)
            wrong = hmac.digest(b"another password", CLIENT_LABEL + theirs + ours, "sha256")
            sock.sendall(frame(HANDSHAKE, 0, {"step": "proof", "proof": wrong}))
            kind, _, error = read_frame(sock)
            assert (kind, error["code"], error["type"]) == (
                ERROR,
                "authentication",
                "AuthenticationError",
            )
            assert read_until_closed(sock) == b""
        refusal_logged(log)
        still_serves(srv)


# The client side ------------------------------------------------------------


class StandIn:
    """A one-connection stand-in for a server: reads the client's hello, sends ``answer(C)``.

    An answer of None closes the connection instead.

    It then reads whatever else the client sends until the client hangs up,
    so a test can check the client sent no proof to a server that did not
    prove itself.
    """

    def __init__(self, path: str, answer: Callable[[bytes], bytes | None]) -> None:
        self.answer = answer
        self.hello: Any = None
        self.after_hello: bytes | None = None
        self.error: BaseException | None = None
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(1)
        self.listener.settimeout(WAIT)
        self.thread = threading.Thread(target=self._serve)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
            with conn:
                conn.settimeout(WAIT)
                kind, _, self.hello = read_frame(conn)
                assert kind == HANDSHAKE
                answer = self.answer(self.hello["challenge"])
                if answer is None:
                    conn.shutdown(socket.SHUT_WR)
                else:
                    conn.sendall(answer)
                self.after_hello = read_until_closed(conn)
        except BaseException as exc:  # reported by close()
            self.error = exc

    def close(self) -> None:
        """Wait for the conversation to end; re-raise what went wrong in it."""
        self.thread.join(WAIT)
        self.listener.close()
        assert not self.thread.is_alive(), "the stand-in server is still talking"
        if self.error is not None:
            raise self.error


def proving(client_challenge: bytes, /, **changes: Any) -> bytes:
    """A step-2 frame with the right proof for ``client_challenge``, then ``changes`` applied (None drops a key)."""
    theirs = secrets.token_bytes(32)
    payload = {
        "step": "challenge",
        "version": 1,
        "challenge": theirs,
        "proof": mac(SERVER_LABEL, client_challenge, theirs),
    }
    payload.update(changes)
    return frame(HANDSHAKE, 0, {k: v for k, v in payload.items() if v is not None})


def connect_sync(path: str) -> None:
    passrpc.connect(path, password=PASSWORD, timeout=WAIT).close()


def connect_async(path: str) -> None:
    async def main() -> None:
        proxy = await passrpc.aio.connect(path, password=PASSWORD, timeout=WAIT)
        await proxy.aclose()

    asyncio.run(main())


CLIENT_CASES = [
    pytest.param(
        lambda c: proving(c, step="hello"),
        ProtocolError,
        "expected step 'challenge'",
        id="wrong-step",
    ),
    pytest.param(
        lambda c: frame(HANDSHAKE, 0, ["challenge", 1, bytes(32), bytes(32)]),
        ProtocolError,
        "expected step 'challenge'",
        id="not-a-map",
    ),
    pytest.param(
        lambda c: proving(c, proof=b"12345"), ProtocolError, "32-byte 'proof'", id="5-byte-proof"
    ),
    pytest.param(
        lambda c: proving(c, challenge=None),
        ProtocolError,
        "32-byte 'challenge'",
        id="no-challenge",
    ),
    pytest.param(
        lambda c: proving(c, proof=bytes(32)),
        AuthenticationError,
        "the server's proof of the password did not match this client's password: "
        "check the password",
        id="wrong-proof",
    ),
    pytest.param(
        lambda c: frame(
            ERROR,
            0,
            {
                "code": "authentication",
                "type": "AuthenticationError",
                "message": "go away",
                "traceback": "",
            },
        ),
        AuthenticationError,
        "go away",
        id="error-frame",
    ),
    pytest.param(
        lambda c: frame(MESSAGE, 0, ["hi"]), ProtocolError, "handshake frame", id="message-frame"
    ),
    pytest.param(
        lambda c: b"\x00\x00\x00\x05\xc1\xc1\xc1\xc1\xc1", ProtocolError, None, id="garbage"
    ),
    pytest.param(lambda c: None, ConnectionClosed, None, id="closed-after-hello"),
]


@pytest.mark.usefixtures("no_fd_leak")
@pytest.mark.parametrize("connect", [connect_sync, connect_async], ids=["sync", "asyncio"])
@pytest.mark.parametrize(("answer", "error", "match"), CLIENT_CASES)
def test_client_refuses_a_bad_answer_to_its_hello(
    sockdir: Path,
    connect: Callable[[str], None],
    answer: Callable[[bytes], bytes | None],
    error: type[Exception],
    match: str | None,
) -> None:
    """A bad step 2 raises ProtocolError (AuthenticationError for a wrong proof or an ERROR frame), and no proof is sent.

    After a wrong proof the client says so, with an ERROR frame of code
    "authentication", so that the server can log a wrong password.
    """
    path = str(sockdir / "standin.sock")
    stand_in = StandIn(path, answer)
    try:
        with pytest.raises(error, match=match):
            connect(path)
    finally:
        stand_in.close()
    # The client's hello was the documented one, and it was all the client said.
    assert set(stand_in.hello) == {"step", "version", "challenge"}
    assert (stand_in.hello["step"], stand_in.hello["version"]) == ("hello", 1)
    assert len(stand_in.hello["challenge"]) == 32
    if match is not None and match.startswith("the server's proof"):
        (length,) = struct.unpack(">I", stand_in.after_hello[:4])
        kind, nfds, payload = msgpack.unpackb(stand_in.after_hello[4 : 4 + length])
        assert (kind, nfds, payload["code"]) == (ERROR, 0, "authentication")
        assert len(stand_in.after_hello) == 4 + length
    else:
        assert stand_in.after_hello == b""


@pytest.mark.usefixtures("no_fd_leak")
@pytest.mark.parametrize("connect", [connect_sync, connect_async], ids=["sync", "asyncio"])
def test_client_takes_no_large_frame_before_the_server_proved_itself(
    sockdir: Path, connect: Callable[[str], None]
) -> None:
    """A step 2 over 4 KiB is refused from its header with FrameTooLarge, before its (wrong) proof is read."""
    path = str(sockdir / "standin.sock")
    stand_in = StandIn(path, lambda c: proving(c, proof=bytes(32), padding=bytes(5000)))
    try:
        with pytest.raises(FrameTooLarge):
            connect(path)
    finally:
        stand_in.close()
    assert stand_in.after_hello == b""
