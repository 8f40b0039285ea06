"""Adversarial peers: what a client can make a server hold, and what it gets for trying.

Each test speaks the protocol by hand over a raw socket (docs/protocol.md),
checks the server's answer, that it holds nothing for the attacker (its
descriptor table read from /proc), and that it still serves a good client.
"""

from __future__ import annotations

import hmac
import logging
import os
import resource
import secrets
import socket
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest

import passrpc
from passrpc import Channel, Peer, ProtocolError, Server
from passrpc._channel import DescriptorBudget
from passrpc._decoder import Decoder
from passrpc._dispatch import Dispatcher
from passrpc._registry import Handler

from .helpers import (
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

PASSWORD = "attack-test"


def _mac(label: bytes, first: bytes, second: bytes) -> bytes:
    return hmac.digest(PASSWORD.encode(), label + first + second, "sha256")


def server_fds(server: Server) -> int:
    """How many descriptors the server process has open now."""
    return len(os.listdir(f"/proc/{server.pid}/fd"))


@pytest.fixture
def server() -> Iterator[Server]:
    server = Server(password=PASSWORD)
    server.add_handler("ok", lambda *args: len(args))
    with server:
        yield server


def connected(server: Server) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(WAIT)
    sock.connect(server.socket_path)
    return sock


def authenticate(sock: socket.socket) -> None:
    """The documented handshake, by hand."""
    ours = secrets.token_bytes(32)
    sock.sendall(frame(HANDSHAKE, 0, {"step": "hello", "version": 1, "challenge": ours}))
    _, _, answer = read_frame(sock)
    theirs = answer["challenge"]
    proof = _mac(b"passrpc client\x00", theirs, ours)
    sock.sendall(frame(HANDSHAKE, 0, {"step": "proof", "proof": proof}))


def still_serves(server: Server) -> None:
    with passrpc.connect(server.socket_path, password=PASSWORD, timeout=WAIT) as proxy:
        assert proxy.ok(1, 2) == 2


class TestDescriptors:
    def test_descriptors_before_authentication_are_refused_at_once(self, server: Server) -> None:
        """A stranger's descriptors, sent one byte at a time with a hello, are closed and it is cut off."""
        before = server_fds(server)
        hello = frame(HANDSHAKE, 0, {"step": "hello", "version": 1, "challenge": bytes(32)})
        r, w = os.pipe()
        try:
            with connected(server) as sock:
                socket.send_fds(sock, [hello[:1]], [r] * 64)
                # The server refuses at once; nothing it sent, the connection closed.
                assert read_until_closed(sock) == b""
            # Whatever the server had taken in, it has let go of.
            wait_for(lambda: server_fds(server) <= before, what="the server to close them")
        finally:
            os.close(r)
            os.close(w)
        still_serves(server)

    def test_a_whole_hello_with_descriptors_is_refused_too(self, server: Server) -> None:
        """Descriptors are refused before the proof even when the hello frame they ride is whole."""
        hello = frame(HANDSHAKE, 0, {"step": "hello", "version": 1, "challenge": bytes(32)})
        r, w = os.pipe()
        try:
            with connected(server) as sock:
                socket.send_fds(sock, [hello], [r])
                assert read_until_closed(sock) == b""
        finally:
            os.close(r)
            os.close(w)
        still_serves(server)

    def test_a_request_behind_the_proof_may_carry_descriptors(self, server: Server) -> None:
        """A client may pipeline its first request, with descriptors, right behind its proof."""
        r, w = os.pipe()
        try:
            with connected(server) as sock:
                ours = secrets.token_bytes(32)
                sock.sendall(frame(HANDSHAKE, 0, {"step": "hello", "version": 1, "challenge": ours}))
                _, _, answer = read_frame(sock)
                proof = _mac(b"passrpc client\x00", answer["challenge"], ours)
                request = frame(MESSAGE, 1, ["ok", passrpc_fd_placeholder(0)])
                sock.sendall(frame(HANDSHAKE, 0, {"step": "proof", "proof": proof}))
                socket.send_fds(sock, [request], [r])
                assert read_frame(sock) == (MESSAGE, 0, [1])
        finally:
            os.close(r)
            os.close(w)

    def test_an_unfinished_frame_may_hold_one_frames_descriptors(self, server: Server) -> None:
        """An authenticated client that trickles a frame with descriptors on every byte is cut off."""
        before = server_fds(server)
        r, w = os.pipe()
        try:
            with connected(server) as sock:
                authenticate(sock)
                big = frame(MESSAGE, 64, ["ok", "x" * 1000])
                socket.send_fds(sock, [big[:1]], [r] * 64)
                socket.send_fds(sock, [big[1:2]], [r] * 64)
                assert read_until_closed(sock) == b""
            wait_for(lambda: server_fds(server) <= before, what="the server to close them")
        finally:
            os.close(r)
            os.close(w)
        still_serves(server)


def passrpc_fd_placeholder(index: int) -> object:
    return msgpack.ExtType(1, bytes([index]))


class TestDescriptorBudget:
    def test_decoders_sharing_a_budget_refuse_past_it(self) -> None:
        """Descriptors waiting for unfinished frames are charged to a shared budget, and given back."""
        budget = DescriptorBudget(100)
        first, second = Decoder(), Decoder()
        first.share_budget(budget)
        second.share_budget(budget)
        unfinished = frame(MESSAGE, 64, ["x" * 100])[:10]
        closed: list[int] = []

        class Fd:
            def __init__(self, n: int) -> None:
                self.n = n

            def close(self) -> None:
                closed.append(self.n)

        first.receive_data(unfinished, [Fd(i) for i in range(64)])
        assert first.next_frame() is None
        assert budget.used == 64
        second.receive_data(unfinished, [Fd(i) for i in range(64)])
        with pytest.raises(ProtocolError, match="as many descriptors waiting"):
            second.next_frame()
        assert len(closed) == 64  # the second peer's, closed
        assert budget.used == 64
        first.close()
        assert budget.used == 0

    def test_the_server_wide_bound_follows_the_descriptor_limit(self) -> None:
        """The bound is 1,024 descriptors, or a quarter of RLIMIT_NOFILE when that is lower."""
        from passrpc._loop import MAX_WAITING_DESCRIPTORS, waiting_descriptor_limit

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        assert waiting_descriptor_limit() == min(MAX_WAITING_DESCRIPTORS, soft // 4)

    def test_a_finished_frame_gives_its_descriptors_back(self) -> None:
        """Once the frame is whole and decoded, its descriptors leave the budget."""
        budget = DescriptorBudget(100)
        left, right = Channel.pair(timeout=WAIT)
        right.share_descriptor_budget(budget)
        r, w = os.pipe()
        # Larger than the socket's buffer: it arrives in pieces, its descriptor
        # with the first, and waits (charged) until the last.
        sent = passrpc.FileDescriptor(os.dup(r))
        writer = threading.Thread(target=left.write, args=("x", sent, b"y" * 1_000_000))
        writer.start()
        try:
            (_, fd, _) = right.read()
            fd.close()
            assert budget.used == 0
        finally:
            writer.join(WAIT)
            sent.close()
            os.close(r)
            os.close(w)
            left.close()
            right.close()


class TestMemory:
    @pytest.mark.parametrize(
        "first", [pytest.param(1, id="bad-request"), pytest.param("nope", id="unknown-handler")]
    )
    def test_a_refused_requests_payload_is_let_go_once_answered(self, first: object) -> None:
        """The decoded payload of a request answered with an error is released at once, not parked."""
        client, server = Channel.pair(timeout=WAIT)
        dispatcher = Dispatcher({})
        thread = threading.Thread(target=dispatcher.converse, args=(server, Peer(0, 0, 0)))
        thread.start()
        # 200,000 empty maps: 200 KB on the wire, about 13 MB once decoded.
        body = msgpack.packb([MESSAGE, 0, [first, *([{}] * 200_000)]])
        tracemalloc.start()
        try:
            client.send_frame(MESSAGE, [first, *([{}] * 200_000)])
            with pytest.raises(passrpc.Error):
                client.read()
            # Answered: the server thread lets go of the payload before it reads on.
            wait_for(
                lambda: tracemalloc.get_traced_memory()[0] < 2_000_000,
                what="the payload to be released",
            )
        finally:
            tracemalloc.stop()
            client.close()
            thread.join(WAIT)
            server.close()
        assert len(body) < 300_000

    @pytest.mark.parametrize(
        ("shape", "bound"),
        [
            (b"\x80", 75),  # empty maps
            (b"\x90", 70),  # empty arrays
            (b"\x81\x00\x81\x00\x81\x00\x80", 120),  # one-entry maps, nested
            (b"\xc0", 10),  # nils
        ],
    )
    def test_a_frame_decodes_to_at_most_120_times_its_size(self, shape: bytes, bound: int) -> None:
        """The worst shapes msgpack can send decode to at most 120 bytes per byte (docs/protocol.md, 6)."""
        count = (1 << 20) // len(shape)
        body = b"\x93\x00\x00\xdd" + count.to_bytes(4, "big") + shape * count
        decoder = Decoder()
        decoder.receive_data(len(body).to_bytes(4, "big") + body)
        tracemalloc.start()
        try:
            frame_ = decoder.next_frame()
            size, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert frame_ is not None
        assert size / len(body) <= bound


class TestEveryOutcomeAnswered:
    """Whatever a handler does, the caller gets the documented error reply and the connection lives."""

    @pytest.fixture
    def odd(self) -> Iterator[Server]:
        server = Server(password=PASSWORD)

        class Unprintable(Exception):
            def __str__(self) -> str:
                raise RuntimeError("no text for you")

        class HugeFd:
            def fileno(self) -> int:
                return 2**31

        def exits() -> None:
            raise SystemExit(3)

        def unprintable() -> None:
            raise Unprintable

        server.add_handler("exits", exits)
        server.add_handler("unprintable", unprintable)
        server.add_handler("huge_fd", HugeFd)
        server.add_handler("ext", lambda: msgpack.ExtType(127, b"x"))
        server.add_handler("echo", lambda value: value)
        with server:
            yield server

    @pytest.mark.parametrize(
        ("name", "match"),
        [
            ("exits", "SystemExit: 3"),
            ("unprintable", "message could not be made: RuntimeError"),
            ("huge_fd", "EncodeError: handler 'huge_fd' returned a value that cannot be sent"),
        ],
    )
    def test_the_caller_gets_an_error_reply(self, odd: Server, name: str, match: str) -> None:
        """SystemExit, an exception whose str() raises, an unsendable descriptor: each an error reply."""
        with passrpc.connect(odd.socket_path, password=PASSWORD, timeout=WAIT) as proxy:
            with pytest.raises(passrpc.RemoteError, match=match):
                proxy.call(name)
            assert proxy.echo(1) == 1  # the same connection goes on
        assert odd.alive

    def test_a_huge_unknown_name_gets_a_bounded_error(self, odd: Server) -> None:
        """A 16 MiB handler name is answered with an error of at most a few KiB."""
        with passrpc.connect(odd.socket_path, password=PASSWORD, timeout=WAIT) as proxy:
            with pytest.raises(passrpc.UnknownMessage) as info:
                proxy.call("x" * (16 << 20))
            assert len(str(info.value)) < 5000
            assert proxy.echo(2) == 2

    def test_reserved_negative_ext_codes_pass_through(self, odd: Server) -> None:
        """An extension value of code -128 (msgpack's reserved range) travels both ways unchanged."""
        from passrpc._decoder import any_ext

        value = any_ext(-128, b"abc")
        with passrpc.connect(odd.socket_path, password=PASSWORD, timeout=WAIT) as proxy:
            assert proxy.echo(value) == value
            assert proxy.ext() == msgpack.ExtType(127, b"x")


def test_start_copes_with_a_descriptor_above_the_limit() -> None:
    """A parent holding a descriptor at or above RLIMIT_NOFILE still starts a server."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 600:
        pytest.skip("needs a hard limit of at least 600 descriptors")
    r, w = os.pipe()
    resource.setrlimit(resource.RLIMIT_NOFILE, (600, hard))
    high = os.dup2(r, 550)
    resource.setrlimit(resource.RLIMIT_NOFILE, (500, hard))
    try:
        server = Server(password=PASSWORD)
        server.add_handler("ok", lambda: "ok")
        with server:
            assert server.proxy(timeout=WAIT).ok() == "ok"
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        os.close(high)
        os.close(r)
        os.close(w)


class TestChannelCall:
    def test_a_late_reply_never_answers_a_later_call(self) -> None:
        """call() closes a channel whose reply is late; a timed-out read() makes call() refuse."""
        left, right = Channel.pair(timeout=0.2)
        try:
            with pytest.raises(passrpc.Timeout):
                left.call("first")
            assert left.closed
            other, peer = Channel.pair(timeout=0.2)
            with pytest.raises(passrpc.Timeout):
                other.read()
            peer.write("late reply")
            with pytest.raises(ProtocolError, match="an earlier read on this channel timed out"):
                other.call("second")
            assert other.read() == ("late reply",)  # read() still hands it over, as documented
            other.close()
            peer.close()
        finally:
            left.close()
            right.close()

    def test_call_returns_the_reply(self) -> None:
        """call() writes one message and returns the next one."""
        left, right = Channel.pair(timeout=WAIT)
        with left, right:
            thread = threading.Thread(target=lambda: right.write(*right.read(), "back"))
            thread.start()
            assert left.call("there") == ("there", "back")
            thread.join(WAIT)


class TestTheLogNamesThePeer:
    def test_refusals_name_the_pid_even_when_the_decoder_closed_the_channel(
        self, sockdir: Path
    ) -> None:
        """Descriptors before the proof, and a silent client, are logged with the client's pid."""
        server = Server(password=PASSWORD, handshake_timeout=0.3)
        server.add_handler("ok", lambda: "ok")
        with server_log(sockdir / "log") as log, server:
            hello = frame(HANDSHAKE, 0, {"step": "hello", "version": 1, "challenge": bytes(32)})
            r, w = os.pipe()
            try:
                with connected(server) as sock:
                    socket.send_fds(sock, [hello[:1]], [r])
                    assert read_until_closed(sock) == b""
                with connected(server) as silent:
                    assert read_until_closed(silent) == b""
            finally:
                os.close(r)
                os.close(w)
            wait_for(lambda: log.read_text().count("refused a connection") >= 2, what="two refusals")
        lines = [x for x in log.read_text().splitlines() if "refused a connection" in x]
        assert all(f"from pid {os.getpid()} uid {os.getuid()}: " in line for line in lines), lines
        assert any("before it authenticated" in line for line in lines), lines
        assert any("did not finish the handshake within 0.3 s" in line for line in lines), lines


class TestOddExceptions:
    def test_any_base_exception_gets_an_error_reply_and_a_clean_log(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """KeyboardInterrupt and an unprintable exception get error replies, logged without a logging error."""

        class Unprintable(Exception):
            def __str__(self) -> str:
                raise RuntimeError("no text")

        def interrupted() -> None:
            raise KeyboardInterrupt

        def unprintable() -> None:
            raise Unprintable

        entries = [Handler("interrupted", interrupted, False), Handler("unprintable", unprintable, False)]
        dispatcher = Dispatcher({e.name: e for e in entries})
        caplog.set_level(logging.INFO, logger="passrpc")
        for name in ("interrupted", "unprintable"):
            kind, _ = dispatcher.dispatch(MESSAGE, [name])  # type: ignore[misc]
            assert kind == ERROR
        assert "handler 'interrupted' raised KeyboardInterrupt" in caplog.text
        assert "handler 'unprintable' raised Unprintable: <the exception's message" in caplog.text
