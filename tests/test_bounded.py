"""Bounded concurrency, in real server processes: what idle clients, herds and floods cost.

Idle connections and unfinished handshakes hold no thread; a bounded pool
serves the connections that have work, first in first out when every thread
is busy; over ``max_connections`` a client is told "busy". The heavy figures
(10,000 and 20,000 connections) are in ``benchmarks/stress/``; these tests
use a few hundred.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import passrpc
from passrpc import Server

from .helpers import ERROR, HANDSHAKE, WAIT, frame, read_frame, wait_for

#: Connections the herd tests open: a few hundred, under half of a common
#: descriptor limit of 1,024 (the default max_connections there is 512).
HERD = 200


def threads_of(pid: int) -> int:
    """How many threads process ``pid`` runs now."""
    return len(os.listdir(f"/proc/{pid}/task"))


def fds_of(pid: int) -> int:
    """How many descriptors process ``pid`` holds now."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def handshake_only(path: str) -> socket.socket:
    """A raw connection that sends a hello and stops: an unfinished handshake."""
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(path)
    sock.sendall(frame(HANDSHAKE, 0, {"step": "hello", "version": 1, "challenge": b"c" * 32}))
    return sock


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server()
    srv.add_handler("echo", lambda x: x)
    srv.add_handler("pid", os.getpid)
    with srv:
        yield srv


class TestIdleConnectionsHoldNoThread:
    def test_hundreds_of_idle_clients_share_four_threads(self) -> None:
        """With threads=4, 200 open connections each call in turn: four threads serve them all."""
        srv = Server(threads=4)
        srv.add_handler("echo", lambda x: x)
        with srv:
            assert srv.pid is not None
            channels = [srv.connect(timeout=WAIT) for _ in range(HERD)]
            try:
                for round_ in range(2):
                    for i, channel in enumerate(channels):
                        channel.write("echo", [round_, i])
                        assert channel.read() == ([round_, i],)
                assert threads_of(srv.pid) <= 1 + 4
                status = srv.status(timeout=WAIT)
                assert status.connections_open == HERD + 1  # and the status call's own
            finally:
                for channel in channels:
                    channel.close()

    def test_unfinished_handshakes_hold_no_thread(self) -> None:
        """200 clients stopped after their hello wait in the poller, not in the server's 4 threads."""
        srv = Server(threads=4)
        srv.add_handler("echo", lambda x: x)
        with srv:
            assert srv.pid is not None
            socks = [handshake_only(srv.socket_path) for _ in range(HERD)]
            try:
                for sock in socks:  # each got its challenge: a thread took it that far
                    kind, _, payload = read_frame(sock)
                    assert (kind, payload["step"]) == (HANDSHAKE, "challenge")
                assert threads_of(srv.pid) <= 1 + 4
                with srv.proxy(timeout=WAIT) as proxy:
                    assert proxy.echo(2) == 2
            finally:
                for sock in socks:
                    sock.close()


class TestLeaving:
    def test_a_request_sent_just_before_a_half_close_is_still_answered(
        self, server: Server
    ) -> None:
        """A parked client that sends a request and shuts its writing side gets its reply."""
        with server.connect(timeout=WAIT) as channel:
            channel.write("echo", 1)
            assert channel.read() == (1,)
            time.sleep(0.1)  # parked by now
            channel.write("echo", 2)
            with socket.socket(fileno=os.dup(channel.fileno())) as same:
                same.shutdown(socket.SHUT_WR)  # the poller sees its peer gone, with a request
            assert channel.read() == (2,)
            with pytest.raises(passrpc.ConnectionClosed):
                channel.read()


class TestIdleTimeout:
    def test_a_client_that_pauses_often_is_not_taken_for_idle(self) -> None:
        """Parked between calls, a connection is closed only after client_idle_timeout without one."""
        srv = Server(client_idle_timeout=0.3)
        srv.add_handler("echo", lambda x: x)
        with srv, srv.connect(timeout=WAIT) as channel:
            for i in range(10):  # 1 s of calls 0.1 s apart: parked each time, never idle for long
                channel.write("echo", i)
                assert channel.read() == (i,)
                time.sleep(0.1)
            start = time.monotonic()
            with pytest.raises(passrpc.ConnectionClosed):
                channel.read()
            assert 0.15 < time.monotonic() - start < 2.0


class TestHerds:
    def test_a_few_hundred_connections_closing_at_once(self, server: Server) -> None:
        """Half authenticated, half in the handshake, all closed together: threads and descriptors stay bounded, and a new client is served meanwhile."""
        pid = server.pid
        assert pid is not None
        fds_before = fds_of(pid)  # the listener, the owner socket, the poller...
        channels = [server.connect(timeout=WAIT) for _ in range(HERD // 2)]
        for channel in channels:
            channel.write("echo", 1)
            assert channel.read() == (1,)
        raw = [handshake_only(server.socket_path) for _ in range(HERD // 2)]
        wait_for(lambda: fds_of(pid) >= fds_before + HERD, what="every connection accepted")
        most = threads_of(pid)
        assert most <= 1 + 64
        for channel in channels:
            channel.close()
        for sock in raw:
            sock.close()
        start = time.monotonic()
        with server.proxy(timeout=WAIT) as proxy:
            assert proxy.echo(2) == 2
        assert time.monotonic() - start < 1.0
        wait_for(lambda: fds_of(pid) <= fds_before, what="the closed connections' descriptors")
        assert threads_of(pid) <= 1 + 64

    def test_stop_with_hundreds_of_idle_clients_is_graceful(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """stop() ends a server holding hundreds of idle connections at once, without SIGKILL."""
        srv = Server()
        srv.add_handler("echo", lambda x: x)
        srv.start()
        channels = [srv.connect(timeout=WAIT) for _ in range(HERD)]
        try:
            for channel in channels:
                channel.write("echo", 1)
                assert channel.read() == (1,)
            start = time.monotonic()
            srv.stop()
            assert time.monotonic() - start < 2.0
            assert not any("killing it" in r.getMessage() for r in caplog.records)
            for channel in channels[:10]:  # the server closed them
                with pytest.raises(passrpc.ConnectionClosed):
                    channel.read()
        finally:
            for channel in channels:
                channel.close()


class TestServerBusy:
    def test_over_max_connections_a_client_is_told_busy(self, sockdir: Path) -> None:
        """The connection over the limit gets ServerBusy (no retry); one freed, the next gets in."""
        srv = Server(sockdir / "s.sock", password="pw", max_connections=3)
        srv.add_handler("echo", lambda x: x)
        with srv:
            held: list[passrpc.Channel | socket.socket] = [
                srv.connect(timeout=WAIT),
                srv.connect(timeout=WAIT),
                handshake_only(srv.socket_path),
            ]
            try:
                with pytest.raises(passrpc.ServerBusy, match="max_connections") as info:
                    srv.connect(timeout=WAIT)
                assert isinstance(info.value, passrpc.Error)
                assert isinstance(info.value, ConnectionError)
                assert not isinstance(info.value, passrpc.ConnectionClosed)
                with pytest.raises(passrpc.ServerBusy):
                    passrpc.connect(srv.socket_path, password="pw", timeout=WAIT)
                held.pop().close()  # an unfinished handshake counts too: closing it frees a place
                wait_for(lambda: _gets_in(srv), what="a place to come free")
            finally:
                for conn in held:
                    conn.close()

    def test_the_refusal_is_an_error_frame_of_code_busy(self, sockdir: Path) -> None:
        """On the wire: accepted, one ERROR frame with code "busy" in place of the challenge, closed."""
        srv = Server(sockdir / "s.sock", password="pw", max_connections=1)
        with srv, srv.connect(timeout=WAIT), socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(WAIT)
            sock.connect(srv.socket_path)
            kind, nfds, payload = read_frame(sock)
            assert (kind, nfds) == (ERROR, 0)
            assert payload["code"] == "busy"
            assert payload["type"] == "ServerBusy"
            assert sock.recv(1) == b""

    def test_asyncio_clients_get_server_busy_too(self, sockdir: Path) -> None:
        """passrpc.aio raises the same ServerBusy."""
        import asyncio

        srv = Server(sockdir / "s.sock", password="pw", max_connections=1)
        srv.add_handler("echo", lambda x: x)

        async def second() -> None:
            proxy = await passrpc.aio.connect(srv.socket_path, password="pw", timeout=WAIT)
            await proxy.aclose()

        with srv, srv.connect(timeout=WAIT), pytest.raises(passrpc.ServerBusy):
            asyncio.run(second())


def _gets_in(srv: Server) -> bool:
    try:
        srv.connect(timeout=WAIT).close()
    except passrpc.ServerBusy:
        return False
    return True


class TestThePool:
    def test_requests_wait_first_in_first_out_when_every_thread_is_busy(
        self, sockdir: Path
    ) -> None:
        """With its one thread held, requests from five clients run in the order they came."""
        srv = Server(threads=1)
        gate = sockdir / "gate"
        order: list[int] = []

        @srv.handler()
        def hold(path: str) -> None:
            while not os.path.exists(path):
                time.sleep(0.005)

        @srv.handler()
        def record(n: int) -> None:
            order.append(n)

        @srv.handler()
        def recorded() -> list[int]:
            return order

        with srv:
            waiting = [srv.connect(timeout=WAIT) for _ in range(5)]  # authenticated first
            holder = srv.connect(timeout=WAIT)
            try:
                holder.write("hold", str(gate))
                time.sleep(0.1)  # the one thread is in hold() now
                for n, channel in enumerate(waiting):
                    channel.write("record", n)
                    time.sleep(0.05)  # the poller has queued it before the next comes
                gate.touch()
                assert holder.read() == (None,)
                for channel in waiting:
                    assert channel.read() == (None,)
                with srv.proxy(timeout=WAIT) as proxy:
                    assert proxy.recorded() == [0, 1, 2, 3, 4]
            finally:
                for channel in [holder, *waiting]:
                    channel.close()

    def test_a_raw_handler_keeps_its_thread_while_it_converses(self) -> None:
        """With threads=2, two raw conversations hold both threads; a call waits for one to end."""
        srv = Server(threads=2)
        srv.add_handler("echo", lambda x: x)

        @srv.handler(raw=True)
        def chat(channel: passrpc.Channel) -> None:
            while (message := channel.read()) != (None,):
                channel.write(*message)

        with srv, srv.proxy(timeout=WAIT) as proxy:
            other = srv.proxy(timeout=WAIT)
            assert other.echo(0) == 0  # connected before the threads are taken
            chats = [proxy.call("chat") for _ in range(2)]
            for channel in chats:
                channel.write("hi")
                assert channel.read() == ("hi",)
            with ThreadPoolExecutor(1) as pool:
                call = pool.submit(other.echo, 1)
                time.sleep(0.2)
                assert not call.done()  # no thread is free
                chats[0].write(None)
                assert call.result(WAIT) == 1
            chats[1].write("still here")
            assert chats[1].read() == ("still here",)
            for channel in chats:
                channel.close()
            other.close()

    def test_handlers_never_run_on_the_main_thread(self, server: Server) -> None:
        """Every call runs in a pool thread of the server, never its main thread."""
        srv = Server()

        @srv.handler()
        def where() -> tuple[str, bool]:
            current = threading.current_thread()
            return current.name, current is threading.main_thread()

        with srv, srv.proxy(timeout=WAIT) as proxy:
            name, on_main = proxy.where()
        assert not on_main
        assert name == "passrpc-worker"


@pytest.mark.parametrize(
    "options", [{"threads": 0}, {"max_connections": 0}, {"threads": True}, {"max_connections": 2.5}]
)
def test_pool_and_connection_limits_must_be_positive_ints(options: dict[str, object]) -> None:
    """threads and max_connections take an int of at least 1 (max_connections also None)."""
    with pytest.raises(passrpc.ConfigurationError, match="must be an int of at least 1"):
        Server(**options)  # type: ignore[arg-type]
