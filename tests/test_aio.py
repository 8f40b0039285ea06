"""The asyncio client (passrpc.aio) against forked servers: calls, pool, cancellation, descriptors."""

from __future__ import annotations

import asyncio
import gc
import inspect
import os
import signal
import socket
import time
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

import passrpc
from passrpc import (
    AuthenticationError,
    ConfigurationError,
    ConnectionClosed,
    EncodeError,
    FileDescriptor,
    ProtocolError,
    RemoteError,
    Server,
    Timeout,
    UnknownMessage,
)
from passrpc._protocol import ERROR_UNKNOWN_MESSAGE, describe_handlers, error_payload
from passrpc._wire import Kind
from passrpc.aio import AsyncChannel, AsyncProxy

from .conftest import open_fds
from .helpers import WAIT, Gate
from .test_client import answering_server, full_backlog

T = TypeVar("T")


def run(awaitable: Awaitable[T]) -> T:
    """Run ``awaitable`` on a fresh event loop, bounded so a hang fails quickly."""

    async def bounded() -> T:
        return await asyncio.wait_for(awaitable, 30)

    return asyncio.run(bounded())


def make_server(**kwargs: Any) -> Server:
    server = Server(**kwargs)

    @server.handler()
    def echo(value: object) -> object:
        """Return value unchanged."""
        return value

    @server.handler()
    def pair(first: object, second: object = 2) -> tuple[object, object]:
        return first, second

    @server.handler()
    def fail(message: str) -> None:
        raise ValueError(message)

    @server.handler()
    def block(started: FileDescriptor, release: FileDescriptor) -> str:
        """Say "started" on one socket, then wait until the other has data or closes."""
        with started.socket() as s, release.socket() as r:
            s.sendall(b"s")
            r.recv(1)
        return "late"

    @server.handler()
    def make_pipe(data: bytes) -> FileDescriptor:
        r, w = os.pipe()
        os.write(w, data)
        os.close(w)
        return FileDescriptor(r)

    @server.handler()
    def read_all(fd: FileDescriptor) -> bytes:
        with fd.open("rb") as f:
            return f.read()

    @server.handler()
    def close(x: int) -> int:
        """A name that clashes with the proxy's own close()."""
        return x + 1

    @server.handler("chat", raw=True)
    def chat(channel: passrpc.Channel, greeting: str) -> None:
        channel.write(greeting.upper())
        (number,) = channel.read()
        channel.write(number * 2)
        channel.close()

    return server


def proxy_for(server: Server, **kwargs: Any) -> AsyncProxy:
    """An async proxy of ``server`` with options server.async_proxy() does not take."""
    cls = passrpc.aio.async_proxy_class(describe_handlers(server._registry.handlers.values()))
    return cls(server.socket_path, server.password, **kwargs)


@pytest.fixture
def server(no_fd_leak: None) -> Iterator[Server]:
    """A started server; the descriptor check wraps its whole life."""
    server = make_server()
    server.start()
    try:
        yield server
    finally:
        if server.started:
            server.stop()


@pytest.fixture
def gate() -> Iterator[Gate]:
    gate = Gate()
    try:
        yield gate
    finally:
        gate.close()


class TestCalls:
    def test_calls_through_server_async_proxy(self, server: Server) -> None:
        """Methods, keyword arguments, several return values and call() all reach the handlers."""

        async def main() -> None:
            async with server.async_proxy() as proxy:
                assert await proxy.echo({"a": [1, b"2"]}) == {"a": [1, b"2"]}
                assert await proxy.pair(1) == (1, 2)
                assert await proxy.pair(1, second="x") == (1, "x")
                assert await proxy.call("echo", None) is None
                assert await proxy.call("close", 1) == 2

        run(main())

    def test_connect_learns_handlers_from_the_server(self, server: Server) -> None:
        """passrpc.aio.connect builds coroutine methods with the handlers' names, signatures, docs."""

        async def main() -> None:
            proxy = await passrpc.aio.connect(
                server.socket_path, password=server.password, timeout=WAIT
            )
            try:
                assert isinstance(proxy, AsyncProxy)
                assert {"echo", "pair", "block", "chat"} <= set(proxy.handlers)
                assert inspect.iscoroutinefunction(proxy.echo)
                assert proxy.echo.__doc__ == "Return value unchanged."
                assert str(inspect.signature(proxy.pair)) == "(first, second=2)"
                assert await proxy.echo("hi") == "hi"
                # The introspection connection became the pool's first, and is reused.
                assert proxy.statistics().connections == 1
            finally:
                await proxy.aclose()

        run(main())

    def test_unknown_attribute_raises_before_any_io(self, no_fd_leak: None) -> None:
        """A name the server lacks is an AttributeError even with no server running."""
        proxy = make_server().async_proxy()  # never started: any I/O would fail
        with pytest.raises(AttributeError, match="no handler 'nope'"):
            _ = proxy.nope
        assert proxy.statistics().connections == 0

    def test_remote_and_unknown_errors_leave_the_connection_in_use(self, server: Server) -> None:
        """A handler's exception and an unknown name raise, and the same connection serves on."""

        async def main() -> None:
            async with server.async_proxy() as proxy:
                with pytest.raises(RemoteError, match="ValueError: boom"):
                    await proxy.fail("boom")
                with pytest.raises(UnknownMessage):
                    await proxy.call("nope")
                assert await proxy.echo(1) == 1
                assert proxy.statistics().connections == 1

        run(main())

    def test_unencodable_argument_fails_without_io(self, server: Server) -> None:
        """EncodeError comes before a connection is even opened."""

        async def main() -> None:
            async with server.async_proxy() as proxy:
                with pytest.raises(EncodeError):
                    await proxy.echo(object())
                assert proxy.statistics().connections == 0

        run(main())

    def test_descriptor_not_open_keeps_the_connection(self, server: Server) -> None:
        """A descriptor that is not open raises EncodeError and leaves the healthy connection pooled."""

        class NotOpen:
            def fileno(self) -> int:
                return max(open_fds()) + 1000  # above every open descriptor

        async def main() -> None:
            async with server.async_proxy() as proxy:
                assert await proxy.echo(1) == 1
                (channel,) = proxy._pool.idle
                with pytest.raises(EncodeError, match="not open"):
                    await proxy.read_all(NotOpen())
                assert proxy._pool.idle == [channel]
                assert not channel.closed
                assert await proxy.echo(2) == 2
                stats = proxy.statistics()
                assert (stats.connections, stats.calls_in_flight) == (1, 0)

        run(main())

    def test_raw_handler_returns_an_async_channel(self, server: Server) -> None:
        """A raw handler's method opens a connection and hands over an AsyncChannel."""

        async def main() -> None:
            async with server.async_proxy() as proxy:
                channel = await proxy.chat("hi")
                assert isinstance(channel, AsyncChannel)
                async with channel:
                    assert await channel.read() == ("HI",)
                    await channel.write(21)
                    assert await channel.read() == (42,)
                    with pytest.raises(ConnectionClosed):
                        await channel.read()
                # call() and a timed view take the raw path too.
                for opened in (
                    await proxy.call("chat", "a"),
                    await proxy.with_timeout(WAIT).chat("b"),
                ):
                    async with opened:
                        assert (await opened.read())[0] in ("A", "B")

        run(main())


class TestConcurrency:
    def test_200_concurrent_calls_each_get_their_own_reply(self, server: Server) -> None:
        """200 tasks calling at once each get the reply to their own call, over at most 16 connections."""

        async def main() -> None:
            async with server.async_proxy() as proxy:
                values = [f"value {i}" * (i % 7) for i in range(200)]
                replies = await asyncio.gather(*(proxy.echo(v) for v in values))
                assert replies == values
                stats = proxy.statistics()
                assert 1 <= stats.connections <= 16
                assert stats.calls_in_flight == stats.waiting == 0

        run(main())

    def test_cancelling_many_calls_keeps_the_pool_consistent(self, server: Server) -> None:
        """Cancelling every third of 200 concurrent calls, wherever each is, spoils no other reply."""

        async def main() -> None:
            async with server.async_proxy() as proxy:
                # The first round catches calls opening their connections, the
                # second (on a warm pool) calls queued, sending or awaiting replies.
                for _round in range(2):
                    tasks = [asyncio.ensure_future(proxy.echo(i)) for i in range(200)]
                    for step in range(6):
                        await asyncio.sleep(0)
                        for task in tasks[step::18]:
                            task.cancel()
                    await asyncio.wait(tasks)
                    done = [i for i, t in enumerate(tasks) if not t.cancelled()]
                    assert 0 < len(done) < 200
                    assert all(tasks[i].result() == i for i in done)
                    stats = proxy.statistics()
                    assert stats.calls_in_flight == stats.waiting == 0
                    assert stats.connections == stats.idle <= 16
                assert await proxy.echo("last") == "last"

        run(main())

    def test_callers_over_the_cap_wait_their_turn(self, server: Server, gate: Gate) -> None:
        """With every connection busy, a further call waits, then runs on the freed connection."""

        async def main() -> None:
            proxy = proxy_for(server, max_connections=1)
            async with proxy:
                blocked = asyncio.ensure_future(proxy.block(*gate.args()))
                await gate.wait_started()
                waiting = asyncio.ensure_future(proxy.echo("after"))
                await asyncio.sleep(0)  # let the second call queue up
                assert proxy.statistics().waiting == 1
                gate.release.sendall(b"r")
                assert await blocked == "late"
                assert await waiting == "after"
                assert proxy.statistics().connections == 1

        run(main())


class TestCancellationAndTimeouts:
    def test_cancelled_call_leaves_the_proxy_usable(self, server: Server, gate: Gate) -> None:
        """A call cancelled mid-flight closes its connection; the next call gets its own answer."""

        async def main() -> None:
            proxy = proxy_for(server, max_connections=1)
            async with proxy:
                call = asyncio.ensure_future(proxy.block(*gate.args()))
                await gate.wait_started()
                call.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await call
                assert proxy.statistics().connections == 0
                gate.release.sendall(b"r")  # the handler now replies "late" to nobody
                assert await proxy.echo("mine") == "mine"
                assert proxy.statistics().connections == 1

        run(main())

    def test_timeout_raises_and_discards_the_connection(self, server: Server, gate: Gate) -> None:
        """A call past its bound raises passrpc.Timeout (a TimeoutError); later calls work."""

        async def main() -> None:
            async with server.async_proxy() as proxy:
                start = time.monotonic()
                with pytest.raises(Timeout) as info:
                    await proxy.with_timeout(0.2).block(*gate.args())
                assert isinstance(info.value, TimeoutError)
                assert 0.2 <= time.monotonic() - start < WAIT
                assert proxy.statistics().connections == 0
                gate.release.sendall(b"r")
                assert await proxy.with_timeout(WAIT).echo(5) == 5
                assert await proxy.with_timeout(WAIT).call("echo", 6) == 6

        run(main())

    def test_proxy_timeout_bounds_every_call(self, server: Server, gate: Gate) -> None:
        """server.async_proxy(timeout=...) bounds each call like with_timeout does."""

        async def main() -> None:
            async with server.async_proxy(timeout=0.2) as proxy:
                with pytest.raises(Timeout):
                    await proxy.block(*gate.args())

        run(main())

    def test_close_fails_calls_in_flight_and_later_calls(self, server: Server, gate: Gate) -> None:
        """Closing the proxy wakes a waiting call with ConnectionClosed; later calls get it too."""

        async def main() -> None:
            proxy = server.async_proxy()
            call = asyncio.ensure_future(proxy.block(*gate.args()))
            await gate.wait_started()
            proxy.close()
            with pytest.raises(ConnectionClosed):
                await call
            with pytest.raises(ConnectionClosed, match="closed"):
                await proxy.echo(1)

        run(main())

    @pytest.mark.parametrize("handler", ["echo", "chat"])
    def test_close_fails_a_call_still_authenticating(
        self, handler: str, sockdir: Path, no_fd_leak: None
    ) -> None:
        """Closing the proxy fails at once a call (pooled or raw) whose server accepted and never answers."""
        path = str(sockdir / "silent.sock")
        described = [{"name": "echo", "raw": False}, {"name": "chat", "raw": True}]
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            listener.bind(path)
            listener.listen(1)
            listener.setblocking(False)

            async def main() -> None:
                loop = asyncio.get_running_loop()
                proxy = passrpc.aio.async_proxy_class(described)(path, "pw")  # no timeout
                call = asyncio.ensure_future(proxy.call(handler, 1))
                conn, _ = await asyncio.wait_for(loop.sock_accept(listener), WAIT)
                with conn:
                    # The client's hello arrived: it now waits for an answer that never comes.
                    assert await asyncio.wait_for(loop.sock_recv(conn, 1), WAIT)
                    assert not call.done()
                    start = time.monotonic()
                    proxy.close()
                    with pytest.raises(ConnectionClosed, match="proxy was closed"):
                        await asyncio.wait_for(call, WAIT)
                    assert time.monotonic() - start < 1
                    stats = proxy.statistics()
                    assert (stats.connections, stats.calls_in_flight) == (0, 0)
                    assert not proxy._pool.raw

            run(main())

    def test_close_fails_a_call_waiting_for_a_full_backlog(
        self, sockdir: Path, no_fd_leak: None
    ) -> None:
        """Closing the proxy stops a call that retries a full listen backlog with no timeout."""
        described = [{"name": "echo", "raw": False}]

        async def main(path: str) -> None:
            proxy = passrpc.aio.async_proxy_class(described)(path, "pw")  # no timeout
            call = asyncio.ensure_future(proxy.echo(1))
            for _ in range(5):
                await asyncio.sleep(0)  # let it start retrying
            assert not call.done()
            start = time.monotonic()
            proxy.close()
            with pytest.raises(ConnectionClosed, match="proxy was closed"):
                await asyncio.wait_for(call, WAIT)
            assert time.monotonic() - start < 1

        with full_backlog(sockdir) as path:
            run(main(path))


class TestConnecting:
    def test_max_connections_is_checked_before_any_io(
        self, sockdir: Path, no_fd_leak: None
    ) -> None:
        """connect() with a bad max_connections raises ConfigurationError, even with nobody listening."""

        async def main() -> None:
            with pytest.raises(ConfigurationError, match="max_connections"):
                await passrpc.aio.connect(
                    str(sockdir / "none.sock"), password="x", max_connections=0
                )

        run(main())

    def test_server_uids_are_checked(self, server: Server) -> None:
        """A server whose uid is not among server_uids is refused; an allowed uid is served."""
        stranger = {os.getuid() + 12345}

        async def main() -> None:
            with pytest.raises(AuthenticationError, match="uid"):
                await passrpc.aio.connect(
                    server.socket_path, password=server.password, server_uids=stranger
                )
            async with proxy_for(server, server_uids=stranger) as refused:
                with pytest.raises(AuthenticationError, match="uid"):
                    await refused.echo(1)
                with pytest.raises(AuthenticationError, match="uid"):
                    await refused.chat("raw")
            proxy = await passrpc.aio.connect(
                server.socket_path, password=server.password, server_uids=[os.getuid()]
            )
            async with proxy:
                assert proxy._server_uids == [os.getuid()]
                assert await proxy.echo(1) == 1

        run(main())

    def test_connect_raises_the_error_the_server_answered_with(
        self, sockdir: Path, no_fd_leak: None
    ) -> None:
        """An ERROR frame in answer to the description request raises that error."""
        payload = error_payload(ERROR_UNKNOWN_MESSAGE, "UnknownMessage", "no describing here")

        async def main(path: str) -> None:
            with pytest.raises(UnknownMessage, match="no describing here"):
                await passrpc.aio.connect(path, password="pw", timeout=WAIT)

        with answering_server(sockdir, Kind.ERROR, payload) as path:
            run(main(path))

    def test_connect_refuses_a_malformed_description(self, sockdir: Path, no_fd_leak: None) -> None:
        """A description whose entries are not handler descriptions raises ProtocolError."""

        async def main(path: str) -> None:
            with pytest.raises(ProtocolError, match="not a handler description"):
                await passrpc.aio.connect(path, password="pw", timeout=WAIT)

        with answering_server(sockdir, Kind.DESCRIBE, [{"nom": "x"}]) as path:
            run(main(path))

    def test_repr_names_the_path_and_handlers(self) -> None:
        """repr() shows the class, the socket path and the handlers' names."""
        proxy = passrpc.aio.async_proxy_class([{"name": "b"}, {"name": "a"}])("/x.sock", "pw")
        assert repr(proxy) == "<passrpc.aio.AsyncProxy '/x.sock' handlers=['a', 'b']>"

    def test_wrong_password_fails_promptly(self, server: Server) -> None:
        """A wrong password raises AuthenticationError at once, not after a timeout."""

        async def main() -> None:
            start = time.monotonic()
            with pytest.raises(AuthenticationError):
                await passrpc.aio.connect(server.socket_path, password="wrong", timeout=WAIT)
            assert time.monotonic() - start < 2

        run(main())

    def test_nobody_listening_raises_connection_closed(
        self, sockdir: Any, no_fd_leak: None
    ) -> None:
        """Connecting to a path without a server raises ConnectionClosed."""

        async def main() -> None:
            with pytest.raises(ConnectionClosed, match="cannot connect"):
                await passrpc.aio.connect(str(sockdir / "none.sock"), password="x")

        run(main())

    def test_full_backlog_is_retried_until_the_timeout(
        self, sockdir: Any, no_fd_leak: None
    ) -> None:
        """A listener whose backlog stays full gives Timeout (after retrying), not ConnectionClosed."""

        async def main(path: str) -> None:
            start = time.monotonic()
            with pytest.raises(Timeout, match="backlog"):
                await passrpc.aio.connect(path, password="x", timeout=0.3)
            assert time.monotonic() - start >= 0.2

        with full_backlog(sockdir) as path:
            run(main(path))

    def test_idle_connection_closed_by_the_server_is_replaced(self, no_fd_leak: None) -> None:
        """A pooled connection the server closed while idle is replaced; the call goes through."""
        server = make_server(client_idle_timeout=0.1)
        server.start()
        try:

            async def main() -> None:
                async with server.async_proxy() as proxy:
                    assert await proxy.echo(1) == 1
                    # Wait for the server's idle timeout to close our connection,
                    # watching a duplicate so the channel's own watch is untouched.
                    (channel,) = proxy._pool.idle
                    loop = asyncio.get_running_loop()
                    closed = asyncio.Event()
                    dup = os.dup(channel.fileno())
                    loop.add_reader(dup, closed.set)
                    try:
                        await asyncio.wait_for(closed.wait(), WAIT)
                    finally:
                        loop.remove_reader(dup)
                        os.close(dup)
                    # Nobody reads the end of file: the channel stops watching
                    # its socket instead of waking the loop on every iteration.
                    for _ in range(3):
                        await asyncio.sleep(0)
                    assert channel._read_loop is None
                    assert await proxy.echo(2) == 2
                    assert proxy.statistics().connections == 1
                    assert proxy._pool.idle != [channel]

            run(main())
        finally:
            server.stop()


class TestDescriptors:
    def test_descriptor_sent_to_the_server(self, server: Server) -> None:
        """A pipe's read end passed as an argument is read by the handler."""

        async def main() -> None:
            async with server.async_proxy() as proxy:
                r, w = os.pipe()
                os.write(w, b"through the pipe")
                os.close(w)
                with FileDescriptor(r) as read_end:
                    assert await proxy.read_all(read_end) == b"through the pipe"

        run(main())

    def test_descriptor_received_from_the_server(self, server: Server) -> None:
        """A descriptor in a reply arrives as a FileDescriptor that reads the server's data."""

        async def main() -> None:
            async with server.async_proxy() as proxy:
                received = await proxy.make_pipe(b"from the server")
                assert isinstance(received, FileDescriptor)
                with received.open("rb") as f:
                    assert f.read() == b"from the server"

        run(main())

    def test_more_descriptors_than_the_limit_are_refused(self, server: Server) -> None:
        """A reply with more descriptors than Limits.max_fds raises FrameTooLarge and leaks nothing."""

        async def main() -> None:
            async with proxy_for(server, limits=passrpc.Limits(max_fds=0)) as proxy:
                with pytest.raises(passrpc.FrameTooLarge, match="max_fds"):
                    await proxy.make_pipe(b"x")
                assert proxy.statistics().connections == 0
                assert await proxy.echo(1) == 1

        run(main())


class TestServerDeath:
    def test_server_killed_mid_call_raises_connection_closed(
        self, server: Server, gate: Gate
    ) -> None:
        """A server that dies while a call waits fails that call with ConnectionClosed at once."""

        async def main() -> None:
            async with server.async_proxy() as proxy:
                call = asyncio.ensure_future(proxy.block(*gate.args()))
                await gate.wait_started()
                assert server.pid is not None
                os.kill(server.pid, signal.SIGKILL)
                with pytest.raises(ConnectionClosed):
                    await asyncio.wait_for(call, WAIT)

        run(main())


class TestResources:
    def test_dropped_proxy_releases_its_connections(self, server: Server) -> None:
        """A proxy dropped without close() closes its sockets, and the loop forgets them."""

        async def main() -> None:
            baseline = open_fds()
            proxy = server.async_proxy()
            assert await asyncio.gather(*(proxy.echo(i) for i in range(4))) == [0, 1, 2, 3]
            del proxy
            gc.collect()
            assert open_fds() == baseline
            # New sockets get the freed numbers: the loop must not still watch them.
            async with server.async_proxy() as again:
                assert await asyncio.gather(*(again.echo(i) for i in range(4))) == [0, 1, 2, 3]

        run(main())


class TestFork:
    def test_forked_child_opens_its_own_connections(self, server: Server) -> None:
        """A child forked after the parent used the proxy calls on its own connection."""
        proxy = server.async_proxy()
        try:
            assert run(proxy.echo(1)) == 1
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child reports by exit status
                code = 1
                try:
                    if run(proxy.echo(os.getpid())) == os.getpid():
                        code = 0
                finally:
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
            # The parent's connection was left alone by the child.
            assert proxy.statistics().connections == 1
            assert run(proxy.echo(2)) == 2
            assert proxy.statistics().connections == 1
        finally:
            proxy.close()
