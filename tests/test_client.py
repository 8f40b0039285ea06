"""The generated proxy and passrpc.connect() against forked servers."""

from __future__ import annotations

import contextlib
import inspect
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import passrpc
from passrpc import (
    AuthenticationError,
    ConnectionClosed,
    FileDescriptor,
    ProtocolError,
    Server,
    Timeout,
    UnknownMessage,
)
from passrpc._auth import default_uids, server_handshake
from passrpc._client import proxy_class
from passrpc._handshake import password_key
from passrpc._protocol import ERROR_UNKNOWN_MESSAGE, error_payload
from passrpc._wire import Kind

from .helpers import WAIT, wait_for


def make_server(**kwargs: object) -> Server:
    server = Server(**kwargs)  # type: ignore[arg-type]

    @server.handler("hello")
    def hello(first_name: str, last_name: str = "Dalton") -> tuple[str, int]:
        """Greet someone."""
        return f"Hello {first_name} {last_name}, how are you?", 1234

    @server.handler()
    def echo(value: object) -> object:
        return value

    @server.handler()
    def nothing() -> None:
        return None

    @server.handler()
    def several() -> tuple[int, int, int]:
        return 1, 2, 3

    @server.handler()
    def sleep(seconds: float) -> str:
        time.sleep(seconds)
        return "woke"

    @server.handler()
    def pid() -> int:
        return os.getpid()

    @server.handler()
    def close(x: int) -> int:
        """A name that clashes with the proxy's own close()."""
        return x + 1

    @server.handler("stream", raw=True)
    def stream(channel: passrpc.Channel, count: int) -> None:
        for i in range(count):
            channel.write(i)
        channel.close()

    return server


@pytest.fixture
def server() -> Iterator[Server]:
    server = make_server()
    server.start()
    yield server
    if server.started:
        server.stop()


class TestProxyShape:
    def test_methods_carry_name_signature_and_doc(self, server: Server) -> None:
        """Each handler is a method with its name, signature and docstring."""
        proxy = server.proxy()
        assert {"hello", "echo", "several"} <= set(dir(proxy))
        assert proxy.hello.__name__ == "hello"
        assert proxy.hello.__doc__ == "Greet someone."
        assert str(inspect.signature(proxy.hello)) == "(first_name, last_name='Dalton')"
        proxy.close()

    def test_unknown_attribute_fails_before_io(self) -> None:
        """An unknown name raises AttributeError without touching the (absent) server."""
        proxy = make_server().proxy()
        with pytest.raises(AttributeError, match="no handler 'helo'"):
            proxy.helo

    def test_replies_single_value_or_tuple(self, server: Server) -> None:
        """One value comes back as itself (None and lists too), several as a tuple."""
        with server.proxy(timeout=5) as proxy:
            assert proxy.nothing() is None
            assert proxy.echo([1, 2]) == [1, 2]
            assert proxy.several() == (1, 2, 3)
            assert proxy.hello("Joe", last_name="Bloggs")[0] == "Hello Joe Bloggs, how are you?"

    def test_clashing_name_through_call(self, server: Server) -> None:
        """A handler named like a proxy method is reached with proxy.call()."""
        with server.proxy(timeout=5) as proxy:
            assert proxy.call("close", 41) == 42
            with pytest.raises(UnknownMessage):
                proxy.call("missing")

    def test_raw_handler_method_hands_back_the_channel(self, server: Server) -> None:
        """A raw handler's method returns a Channel to converse on."""
        with server.proxy(timeout=5) as proxy, proxy.stream(3) as channel:
            assert [channel.read()[0] for _ in range(3)] == [0, 1, 2]

    def test_connect_learns_the_handlers(self, server: Server) -> None:
        """passrpc.connect() builds the same proxy from the server's introspection."""
        with passrpc.connect(server.socket_path, password=server.password, timeout=5) as proxy:
            assert "hello" in dir(proxy)
            assert proxy.hello.__doc__ == "Greet someone."
            assert proxy.hello("Joe", "Dalton")[1] == 1234

    def test_descriptors_as_arguments_and_replies(self, server: Server) -> None:
        """Descriptors travel through a proxy as on a Channel."""
        r, w = os.pipe()
        with server.proxy(timeout=5) as proxy, FileDescriptor(r) as mine:
            back = proxy.echo(mine)
            assert isinstance(back, FileDescriptor)
            os.write(w, b"x")
            assert os.read(back.fileno(), 1) == b"x"
            back.close()
        os.close(w)


class TestConnections:
    def test_one_connection_per_thread_reused(self, server: Server) -> None:
        """Calls from one thread reuse one connection; another thread gets its own."""
        with server.proxy(timeout=5) as proxy:
            proxy.pid()
            first = proxy._local.connection.channel
            proxy.pid()
            assert proxy._local.connection.channel is first
            seen: list[object] = []
            t = threading.Thread(
                target=lambda: (proxy.pid(), seen.append(proxy._local.connection.channel))
            )
            t.start()
            t.join()
            assert seen[0] is not first

    def test_sixteen_threads_five_hundred_calls_each(self, server: Server) -> None:
        """16 threads x 500 calls through one proxy: every reply matches its call."""
        errors: list[str] = []
        with server.proxy(timeout=30) as proxy:

            def worker(n: int) -> None:
                for i in range(500):
                    value = [n, i]
                    got = proxy.echo(value)
                    if got != value:
                        errors.append(f"{value} -> {got}")

            threads = [threading.Thread(target=worker, args=(n,)) for n in range(16)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        assert errors == []

    def test_reconnects_after_an_idle_close(self) -> None:
        """When the server closed an idle connection, the next call reconnects."""
        server = make_server(client_idle_timeout=0.1)
        with server, server.proxy(timeout=5) as proxy:
            assert proxy.echo(1) == 1
            channel = proxy._local.connection.channel
            # Wait until the server has closed its side.
            wait_for(lambda: _peer_closed(channel), what="the idle close")
            assert proxy.echo(2) == 2
            assert proxy._local.connection.channel is not channel

    def test_timeout_discards_the_connection(self, server: Server) -> None:
        """A call past its bound raises TimeoutError; the next call gets its own reply."""
        with server.proxy(timeout=5) as proxy:
            with pytest.raises(TimeoutError):
                proxy.with_timeout(0.1).sleep(0.5)
            with pytest.raises(Timeout):
                proxy.with_timeout(0.1).call("sleep", 0.5)
            assert proxy.echo("after") == "after"

    def test_timed_view_routes_like_the_proxy(self, server: Server) -> None:
        """A timed view's call() opens a raw handler's channel, and its attributes mirror the proxy's."""
        with server.proxy(timeout=5) as proxy:
            timed = proxy.with_timeout(5)
            with timed.call("stream", 2) as channel:
                assert [channel.read()[0] for _ in range(2)] == [0, 1]
            assert timed.call("close", 41) == 42
            assert timed.close == proxy.close  # the proxy's own, not the clashing handler
            assert timed.hello("Joe")[1] == 1234

    def test_server_dying_mid_call_fails_at_once(self, server: Server) -> None:
        """A server killed during a call fails the call with ConnectionClosed, no hang."""
        with server.proxy() as proxy:
            assert server.pid is not None
            threading.Timer(0.2, os.kill, (server.pid, signal.SIGKILL)).start()
            start = time.monotonic()
            with pytest.raises(ConnectionClosed):
                proxy.sleep(30)
            assert time.monotonic() - start < 5

    def test_fork_aware(self, server: Server) -> None:
        """A child forked after the proxy was used opens its own connection."""
        with server.proxy(timeout=5) as proxy:
            proxy.echo(0)
            r, w = os.pipe()
            child = os.fork()
            if child == 0:
                code = 1
                try:
                    ok = proxy.echo("child") == "child" and proxy.echo(1) == 1
                    code = 0 if ok else 2
                finally:
                    os._exit(code)
            os.close(w)
            os.close(r)
            # The parent's connection is unharmed and in step.
            for i in range(20):
                assert proxy.echo(i) == i
            _, status = os.waitpid(child, 0)
            assert os.waitstatus_to_exitcode(status) == 0

    def test_closing_in_a_forked_child_leaves_the_parents_connection(self, server: Server) -> None:
        """proxy.close() in a child closes the child's copies only."""
        with server.proxy(timeout=5) as proxy:
            proxy.echo(0)
            channel = proxy._local.connection.channel
            child = os.fork()
            if child == 0:
                code = 1
                try:
                    proxy.close()
                    code = 0
                finally:
                    os._exit(code)
            _, status = os.waitpid(child, 0)
            assert os.waitstatus_to_exitcode(status) == 0
            assert proxy.echo("still") == "still"
            assert proxy._local.connection.channel is channel

    def test_closed_proxy_refuses_calls(self, server: Server) -> None:
        """After close(), a call raises ConnectionClosed."""
        proxy = server.proxy(timeout=5)
        proxy.echo(1)
        proxy.close()
        with pytest.raises(ConnectionClosed):
            proxy.echo(1)


@contextlib.contextmanager
def answering_server(sockdir: Path, kind: int, payload: Any) -> Iterator[str]:
    """A one-connection stand-in for a server, password "pw": it answers the first request with ``(kind, payload)``."""
    path = str(sockdir / "answering.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    listener.settimeout(WAIT)

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            with passrpc.Channel(conn, timeout=WAIT) as channel:
                server_handshake(channel, password_key("pw"), default_uids())
                channel.receive_frame()
                channel.send_frame(kind, payload)
                channel.receive_frame()  # until the client hangs up
        except (OSError, passrpc.Error):
            pass

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        yield path
    finally:
        thread.join(WAIT)
        listener.close()


@contextlib.contextmanager
def full_backlog(sockdir: Path) -> Iterator[str]:
    """A listening socket whose only backlog place is taken, so that a connect answers EAGAIN."""
    path = str(sockdir / "full.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(0)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as first:
            first.connect(path)  # takes the only place in the queue
            yield path


class TestDescriptions:
    def test_connect_raises_the_error_the_server_answered_with(
        self, sockdir: Path, no_fd_leak: None
    ) -> None:
        """An ERROR frame in answer to the description request raises that error, not ProtocolError."""
        payload = error_payload(ERROR_UNKNOWN_MESSAGE, "UnknownMessage", "no describing here")
        with (
            answering_server(sockdir, Kind.ERROR, payload) as path,
            pytest.raises(UnknownMessage, match="no describing here"),
        ):
            passrpc.connect(path, password="pw", timeout=WAIT)

    def test_connect_refuses_a_malformed_description(self, sockdir: Path, no_fd_leak: None) -> None:
        """A description whose entries are not handler descriptions raises ProtocolError."""
        with (
            answering_server(sockdir, Kind.DESCRIBE, [{"nom": "x"}]) as path,
            pytest.raises(ProtocolError, match="not a handler description"),
        ):
            passrpc.connect(path, password="pw", timeout=WAIT)

    @pytest.mark.parametrize("described", [[1], [{}], [{"name": 5}], [None]])
    def test_proxy_class_refuses_malformed_entries(self, described: list[Any]) -> None:
        """proxy_class raises ProtocolError, not KeyError or TypeError, on a malformed entry."""
        with pytest.raises(ProtocolError, match="not a handler description"):
            proxy_class(described)

    def test_repr_names_the_path_and_handlers(self) -> None:
        """repr() shows the class, the socket path and the handlers' names."""
        proxy = proxy_class([{"name": "b"}, {"name": "a"}])("/x.sock", "pw")
        assert repr(proxy) == "<passrpc.Proxy '/x.sock' handlers=['a', 'b']>"


class TestConnecting:
    def test_full_backlog_is_retried_until_the_timeout(
        self, sockdir: Path, no_fd_leak: None
    ) -> None:
        """A listener whose backlog stays full gives Timeout after retrying, not ConnectionClosed."""
        with full_backlog(sockdir) as path:
            start = time.monotonic()
            with pytest.raises(Timeout, match="backlog"):
                passrpc.connect(path, password="x", timeout=0.3)
            assert time.monotonic() - start >= 0.2

    def test_server_uids_refuse_a_server_of_another_uid(self, server: Server) -> None:
        """A server whose uid is not among server_uids is refused before any password proof."""
        with pytest.raises(AuthenticationError, match="uid"):
            passrpc.connect(
                server.socket_path,
                password=server.password,
                timeout=WAIT,
                server_uids={os.getuid() + 12345},
            )


def _peer_closed(channel: passrpc.Channel) -> bool:
    import select

    readable, _, _ = select.select([channel], [], [], 0)
    return bool(readable)
