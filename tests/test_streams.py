"""Streams: generator handlers, consumed by the sync and asyncio proxies, by hand and by the CLI.

Real server processes and sockets. Generators that the tests watch write
how far they got, and "closed" when their ``finally`` ran, to files the
test names (tests/apps/streamer.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import socket
import subprocess
import sys
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import passrpc
from passrpc import ConfigurationError, ProtocolError, RemoteError, Server, Stream

from .apps.streamer import Counter, make_server
from .helpers import (
    ERROR,
    MESSAGE,
    REPO,
    WAIT,
    Gate,
    cli_env,
    frame,
    read_frame,
    read_until_closed,
    wait_for,
)

STREAM, ITEM, MORE, END = 5, 6, 7, 8
#: The window the proxies ask for (docs/protocol.md section 3).
WINDOW = 256


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    server = make_server(client_idle_timeout=30)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def proxy(server: Server) -> Iterator[passrpc.Proxy]:
    with server.proxy(timeout=WAIT) as proxy:
        yield proxy


def closed(marker: Path) -> bool:
    return marker.exists() and marker.read_text() == "closed"


def wait_closed(marker: Path) -> None:
    wait_for(lambda: closed(marker), what="the generator's finally")


def produced(progress: Path) -> int:
    text = progress.read_text().strip() if progress.exists() else ""
    return int(text) if text else 0


def waiting_for_credit(pid: int) -> bool:
    """Whether a thread of the server ``pid`` sleeps reading a Unix socket: the stream's, for credit.

    The connection of the test's stream is the only one open on the server,
    and its thread reads without waiting while it has credit.
    """
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/wchan") as f:
                if f.read().startswith("unix_stream_read"):
                    return True
        except FileNotFoundError:
            continue
    return False


@contextlib.contextmanager
def handshake(server: Server) -> Iterator[socket.socket]:
    """A socket authenticated with the server, for frames by hand (a channel's, kept open)."""
    with server.connect(timeout=WAIT) as channel:
        yield channel._sock  # type: ignore[attr-defined]


class TestSyncProxy:
    def test_list_of_a_stream(self, proxy: passrpc.Proxy) -> None:
        """A generator handler's method returns a Stream; list() of it is what it yielded."""
        stream = proxy.numbers(5)
        assert isinstance(stream, Stream)
        assert list(stream) == [0, 1, 2, 3, 4]
        assert stream.done
        assert list(proxy.pairs(3)) == [(0, 0), (1, 1), (2, 4)]  # a yielded tuple: several values
        assert list(proxy.numbers(0)) == []
        assert list(proxy.call("numbers", n=2)) == [0, 1]
        assert list(proxy.with_timeout(5).numbers(2)) == [0, 1]
        assert list(proxy.fives()) == [0, 1, 2, 3, 4]  # a partial of a generator streams

    def test_many_items_and_the_connection_is_reused(self, proxy: passrpc.Proxy) -> None:
        """Streams longer than many windows end in step; the thread's connection carries on."""
        assert proxy.echo(1) == 1
        channel = proxy._local.connection.channel  # type: ignore[union-attr]
        assert sum(proxy.numbers(10_000)) == sum(range(10_000))
        assert proxy.echo(2) == 2
        assert proxy._local.connection.channel is channel  # type: ignore[union-attr]

    def test_first_item_comes_before_the_generator_finishes(
        self, proxy: passrpc.Proxy, tmp_path: Path
    ) -> None:
        """The consumer sees an item as soon as it is yielded, while the generator goes on."""
        gate = Gate()
        marker = tmp_path / "marker"
        try:
            with proxy.gated(*gate.args(), str(marker)) as stream:
                assert next(stream) == "first"
                gate.wait_started_blocking()  # the generator is past its first yield, held
                gate.let_go()
                assert next(stream) == "second"
        finally:
            gate.close()
        wait_closed(marker)

    @pytest.mark.usefixtures("no_fd_leak")
    def test_items_carry_descriptors(self, server: Server) -> None:
        """Each item may hold descriptors; they arrive as FileDescriptors, one per item."""
        with server.proxy(timeout=WAIT) as proxy:
            for i, fd in proxy.pipes(5):
                with fd.open("rb") as pipe:
                    assert pipe.read() == f"item {i}".encode()

    def test_the_server_stays_a_window_ahead_at_most(self, server: Server, tmp_path: Path) -> None:
        """A consumer that stops consuming stops the generator after one window of items
        (and the one item the server holds until credit comes)."""
        progress, marker = tmp_path / "progress", tmp_path / "marker"
        assert server.pid is not None
        with passrpc.connect(server.socket_path, password=server.password, timeout=WAIT) as proxy:
            stream = proxy.counted(str(progress), str(marker))
            assert next(stream) == 0
            wait_for(
                lambda: produced(progress) == WINDOW + 1 and waiting_for_credit(server.pid),  # type: ignore[arg-type]
                what="the generator to fill the window and the server to wait for credit",
            )
            assert produced(progress) == WINDOW + 1
            for expected in range(1, WINDOW // 2):  # half a window taken: 64 more granted
                assert next(stream) == expected
            wait_for(
                lambda: (
                    produced(progress) == WINDOW + WINDOW // 2 + 1
                    and waiting_for_credit(server.pid)
                ),  # type: ignore[arg-type]
                what="the granted items to be produced",
            )
            assert produced(progress) == WINDOW + WINDOW // 2 + 1
            stream.close()
        wait_closed(marker)

    def test_client_memory_stays_flat_over_a_long_stream(self, proxy: passrpc.Proxy) -> None:
        """100,000 items through the proxy: what it allocates does not grow with the count."""
        stream = proxy.numbers(100_000)
        for _ in range(1_000):  # buffers made once are not growth
            next(stream)
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            for _ in stream:
                pass
            current, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak - base < 256 * 1024, (base, current, peak)

    def test_close_cancels_and_keeps_the_connection(
        self, proxy: passrpc.Proxy, tmp_path: Path
    ) -> None:
        """close() sends the cancel: GeneratorExit on the server, its finally runs; the
        connection carries the next call."""
        marker = tmp_path / "marker"
        proxy.echo(0)
        channel = proxy._local.connection.channel  # type: ignore[union-attr]
        stream = proxy.ticking(str(marker), 0.001)
        assert [next(stream) for _ in range(3)] == [0, 1, 2]
        stream.close()
        assert stream.done
        wait_closed(marker)
        with pytest.raises(StopIteration):
            next(stream)
        stream.close()  # idempotent
        assert proxy.echo(1) == 1
        assert proxy._local.connection.channel is channel  # type: ignore[union-attr]

    def test_a_with_block_cancels(self, proxy: passrpc.Proxy, tmp_path: Path) -> None:
        """Leaving ``with`` early cancels the stream, also when an exception leaves it."""
        marker = tmp_path / "marker"

        def leave_early() -> None:
            with proxy.ticking(str(marker)) as stream:
                next(stream)
                raise KeyError("out")

        with pytest.raises(KeyError):
            leave_early()
        wait_closed(marker)
        assert proxy.echo("after") == "after"

    def test_break_cancels_on_the_next_call(self, proxy: passrpc.Proxy, tmp_path: Path) -> None:
        """A stream left by ``break`` and dropped is cancelled by the thread's next call,
        which then goes out on the same connection."""
        marker = tmp_path / "marker"
        proxy.echo(0)
        channel = proxy._local.connection.channel  # type: ignore[union-attr]
        for item in proxy.ticking(str(marker), 0.001):
            if item == 3:
                break
        gc.collect()
        assert proxy.echo(1) == 1
        wait_closed(marker)
        assert proxy._local.connection.channel is channel  # type: ignore[union-attr]

    def test_a_dropped_stream_is_cancelled_though_the_thread_has_a_connection(
        self, proxy: passrpc.Proxy, tmp_path: Path
    ) -> None:
        """A call made while the stream was open gave the thread another connection; the
        next call still cancels the dropped stream (and closes its connection)."""
        marker = tmp_path / "marker"
        stream = proxy.ticking(str(marker), 0.001)
        next(stream)
        assert proxy.echo(1) == 1  # the thread's slot was empty: a second connection
        del stream
        gc.collect()
        assert proxy.echo(2) == 2
        wait_closed(marker)

    def test_a_generator_busy_in_its_own_code_stops_at_its_next_yield(
        self, proxy: passrpc.Proxy, tmp_path: Path
    ) -> None:
        """A cancel that comes while the generator is blocked takes effect at its next yield."""
        gate = Gate()
        marker = tmp_path / "marker"
        try:
            stream = proxy.gated(*gate.args(), str(marker))
            assert next(stream) == "first"
            gate.wait_started_blocking()
            stream.close()  # waits a moment for the end, then lets the connection go
            assert not closed(marker)  # still held in its own code
            gate.let_go()
            wait_closed(marker)
        finally:
            gate.close()
        assert proxy.echo("after") == "after"

    def test_an_error_comes_after_the_items(self, proxy: passrpc.Proxy) -> None:
        """A generator's exception reaches the caller after its items, as a call's would."""
        seen: list[int] = []
        with pytest.raises(ValueError, match="failed after 3 items") as info:
            seen.extend(proxy.failing(3))
        assert seen == [0, 1, 2]
        assert isinstance(info.value, RemoteError)
        assert "Remote traceback" in str(info.value)
        assert proxy.echo("in step") == "in step"

    def test_wrong_arguments_fail_as_a_call_would(self, proxy: passrpc.Proxy) -> None:
        """A stream called with the wrong arguments raises the TypeError at its first item."""
        with pytest.raises(TypeError):
            next(proxy.call("numbers", 1, 2, 3))
        assert proxy.echo("in step") == "in step"

    def test_an_unsendable_item_ends_the_stream(self, proxy: passrpc.Proxy) -> None:
        """A yielded value that cannot travel ends the stream with an EncodeError report."""
        stream = proxy.unsendable()
        assert next(stream) == 1
        with pytest.raises(RemoteError, match="yielded a value that cannot be sent"):
            next(stream)
        assert proxy.echo("in step") == "in step"

    def test_a_client_gone_mid_stream_stops_the_generator(
        self, server: Server, tmp_path: Path
    ) -> None:
        """Closing the proxy mid-stream closes the connection: the generator is stopped."""
        marker = tmp_path / "marker"
        proxy = server.proxy(timeout=WAIT)
        stream = proxy.ticking(str(marker))
        next(stream)
        proxy.close()
        wait_closed(marker)
        with pytest.raises(passrpc.ConnectionClosed):
            for _ in stream:
                pass

    def test_calls_while_a_stream_is_open(self, proxy: passrpc.Proxy) -> None:
        """A call made while the thread's stream is open goes out on another connection."""
        assert [proxy.echo(x) for x in proxy.numbers(5)] == [0, 1, 2, 3, 4]
        outer = proxy.numbers(3)
        inner = proxy.pairs(2)
        assert (next(outer), next(inner), next(outer)) == (0, (0, 0), 1)
        assert list(inner) == [(1, 1)]
        assert list(outer) == [2]

    def test_status_counts_a_stream_as_one_call(self, server: Server) -> None:
        """A stream is one call of its handler; one whose generator raised, one error."""
        before = passrpc.server_status(server.socket_path, password=server.password)
        with server.proxy(timeout=WAIT) as proxy:
            list(proxy.pairs(3))
            with pytest.raises(ValueError):
                list(proxy.failing(1))
        after = passrpc.server_status(server.socket_path, password=server.password)
        assert after.handlers["pairs"].calls == before.handlers["pairs"].calls + 1
        assert after.handlers["failing"].calls == before.handlers["failing"].calls + 1
        assert after.handlers["failing"].errors == before.handlers["failing"].errors + 1


class TestRegistration:
    def test_describe_marks_stream_handlers(self, proxy: passrpc.Proxy) -> None:
        """DESCRIBE says "stream": true of a generator handler, and nothing of the others."""
        info = proxy._handler_info
        assert info["numbers"]["stream"] is True
        assert info["fives"]["stream"] is True
        assert "stream" not in info["echo"]
        assert "stream" not in info["sums"]

    def test_a_raw_generator_is_refused_at_registration(self) -> None:
        """raw=True on a generator function fails when it is registered, saying why."""
        server = Server()

        def gen(channel: passrpc.Channel) -> Iterator[int]:
            yield 1

        with pytest.raises(ConfigurationError, match="raw and a generator function"):
            server.add_handler("gen", gen, raw=True)
        with pytest.raises(ConfigurationError, match="raw and a generator function"):
            server.handler(raw=True)(gen)

        class Raw(Server):
            @passrpc.handler(raw=True)
            def gen(self, channel: passrpc.Channel) -> Iterator[int]:
                yield 1

        with pytest.raises(ConfigurationError, match="raw and a generator function"):
            Raw()

    def test_the_subclass_form_streams(self) -> None:
        """A generator method marked with @passrpc.handler on a Server subclass streams."""
        with Counter() as server, server.proxy(timeout=WAIT) as proxy:
            assert list(proxy.count(3)) == [1, 2, 3]


class TestFramesByHand:
    """What a client in another language sees (docs/protocol.md section 9)."""

    def test_a_stream_by_hand(self, server: Server) -> None:
        """STREAM, ITEMs as credit allows, MORE, END: the documented conversation."""
        with handshake(server) as sock:
            sock.sendall(frame(STREAM, 0, ["numbers", [5], {}, 2]))
            assert read_frame(sock) == (ITEM, 0, [0])
            assert read_frame(sock) == (ITEM, 0, [1])
            sock.sendall(frame(MORE, 0, 3))
            assert [read_frame(sock) for _ in range(4)] == [
                (ITEM, 0, [2]),
                (ITEM, 0, [3]),
                (ITEM, 0, [4]),
                (END, 0, None),
            ]
            sock.sendall(frame(MESSAGE, 0, ["echo", "next"]))
            assert read_frame(sock) == (MESSAGE, 0, ["next"])

    def test_a_cancel_by_hand(self, server: Server, tmp_path: Path) -> None:
        """END from the client closes the generator; the stream ends with a cancelled ERROR."""
        marker = tmp_path / "marker"
        with handshake(server) as sock:
            sock.sendall(frame(STREAM, 0, ["ticking", [str(marker), 0.001], {}, 1]))
            assert read_frame(sock) == (ITEM, 0, [0])
            sock.sendall(frame(END, 0, None))
            kind, _, payload = read_frame(sock)
            assert (kind, payload["code"]) == (ERROR, "cancelled")
            assert closed(marker)
            # A cancel or MORE that crossed the stream's end is ignored, with no reply.
            sock.sendall(frame(END, 0, None) + frame(MORE, 0, 5))
            sock.sendall(frame(MESSAGE, 0, ["echo", "next"]))
            assert read_frame(sock) == (MESSAGE, 0, ["next"])

    def test_a_plain_call_of_a_stream_handler_gets_a_clear_error(self, server: Server) -> None:
        """An older client's MESSAGE to a stream handler is refused, saying it streams."""
        with server.connect(timeout=WAIT) as channel:
            channel.write("numbers", 3)
            with pytest.raises(ProtocolError, match="streams its results"):
                channel.read()
            assert channel.call("echo", 1) == (1,)

    def test_a_stream_request_for_plain_and_raw_handlers(self, server: Server) -> None:
        """A plain handler streams its result as one item; a raw one is refused."""
        with handshake(server) as sock:
            sock.sendall(frame(STREAM, 0, ["double", [21], {}, 8]))
            assert read_frame(sock) == (ITEM, 0, [42])
            assert read_frame(sock) == (END, 0, None)
            sock.sendall(frame(STREAM, 0, ["sums", [], {}, 8]))
            kind, _, payload = read_frame(sock)
            assert (kind, payload["code"]) == (ERROR, "bad_request")
            assert "raw" in payload["message"]
            sock.sendall(frame(STREAM, 0, ["numbers", [1], {}, 0]))  # no credit: malformed
            kind, _, payload = read_frame(sock)
            assert (kind, payload["code"]) == (ERROR, "bad_request")
            sock.sendall(frame(MESSAGE, 0, ["echo", "next"]))
            assert read_frame(sock) == (MESSAGE, 0, ["next"])

    def test_a_request_during_a_stream_closes_the_connection(
        self, server: Server, tmp_path: Path
    ) -> None:
        """Only MORE and END may come while a stream is open; the generator is stopped."""
        marker = tmp_path / "marker"
        with handshake(server) as sock:
            sock.sendall(frame(STREAM, 0, ["ticking", [str(marker), 0.001], {}, 1]))
            assert read_frame(sock) == (ITEM, 0, [0])
            sock.sendall(frame(MESSAGE, 0, ["echo", "pipelined"]))
            read_until_closed(sock)
        wait_closed(marker)


def run(coroutine: Any) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coroutine, WAIT * 2)

    return asyncio.run(bounded())


class TestAsyncProxy:
    def test_async_for(self, server: Server) -> None:
        """A stream handler's method returns an async iterator at once; items, then the end."""

        async def main() -> None:
            async with server.async_proxy(timeout=WAIT) as proxy:
                stream = proxy.numbers(5)
                assert isinstance(stream, passrpc.aio.AsyncStream)
                assert [x async for x in stream] == [0, 1, 2, 3, 4]
                assert [x async for x in proxy.pairs(2)] == [(0, 0), (1, 1)]
                assert [x async for x in proxy.call("numbers", 3)] == [0, 1, 2]
                assert sum([x async for x in proxy.numbers(5_000)]) == sum(range(5_000))
                # Calls while the stream is open take another pooled connection.
                assert [await proxy.echo(x) async for x in proxy.numbers(3)] == [0, 1, 2]
                assert proxy.statistics().calls_in_flight == 0

        run(main())

    def test_errors_and_early_ends(self, server: Server, tmp_path: Path) -> None:
        """A generator's error comes after its items; aclose() and ``async with`` cancel,
        keeping the connection."""
        first, second = tmp_path / "first", tmp_path / "second"

        async def main() -> None:
            async with server.async_proxy(timeout=WAIT) as proxy:
                seen: list[int] = []

                async def consume() -> None:
                    async for item in proxy.failing(2):
                        seen.append(item)

                with pytest.raises(ValueError, match="failed after 2 items"):
                    await consume()
                assert seen == [0, 1]
                stream = proxy.ticking(str(first), 0.001)
                assert await stream.__anext__() == 0
                await stream.aclose()
                assert stream.done
                async with proxy.ticking(str(second), 0.001) as stream:
                    async for item in stream:
                        if item == 2:
                            break
                assert await proxy.echo("in step") == "in step"
                assert proxy.statistics().connections == 1

        run(main())
        wait_closed(first)
        wait_closed(second)

    def test_a_cancelled_task_stops_the_generator(self, server: Server, tmp_path: Path) -> None:
        """Cancelling the task in ``async for`` closes the connection: the generator stops."""
        marker = tmp_path / "marker"

        async def main() -> None:
            async with server.async_proxy(timeout=WAIT) as proxy:
                got_one = asyncio.Event()

                async def consume() -> None:
                    async for _ in proxy.ticking(str(marker), 0.05):
                        got_one.set()

                task = asyncio.ensure_future(consume())
                await got_one.wait()
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                assert proxy.statistics().calls_in_flight == 0
                assert await proxy.echo(1) == 1

        run(main())
        wait_closed(marker)


class TestCommandLine:
    @pytest.fixture
    def served(self, sockdir: Path) -> Iterator[str]:
        path = str(sockdir / "s.sock")
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "passrpc",
                "serve",
                "tests.apps.streamer:server",
                "--socket",
                path,
            ],
            cwd=REPO,
            env=cli_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            wait_for(lambda: os.path.exists(path + ".password"), what="the server to start")
            yield path
        finally:
            process.send_signal(signal.SIGTERM)
            _, err = process.communicate(timeout=30)
            assert process.returncode == 0, err

    def cli(self, *args: str, **options: Any) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "passrpc", *args],
            cwd=REPO,
            env=cli_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            **options,
        )

    def test_list_and_call(self, served: str) -> None:
        """``list`` marks stream handlers; ``call`` prints one JSON line per item."""
        out, err = self.cli("list", "--socket", served).communicate(timeout=30)
        assert "numbers(n: int)  [stream" in out, err
        assert "echo(value: Any)\n" in out
        process = self.cli("call", "--socket", served, "pairs", "3")
        out, err = process.communicate(timeout=30)
        assert process.returncode == 0, err
        assert out.splitlines() == ["[0, 0]", "[1, 1]", "[2, 4]"]

    def test_ctrl_c_stops_the_stream(self, served: str, tmp_path: Path) -> None:
        """Items print as they come; SIGINT ends the call with status 130 and stops the generator."""
        marker = tmp_path / "marker"
        process = self.cli("call", "--socket", served, "ticking", str(marker), "0.01")
        assert process.stdout is not None
        assert process.stdout.readline() == "0\n"  # printed (and flushed) as it came
        assert process.stdout.readline() == "1\n"
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=30)
        assert process.returncode == 130, err
        wait_closed(marker)


def test_a_closed_proxy_opens_no_stream(server: Server) -> None:
    """A stream method of a closed proxy raises ConnectionClosed, as a call does."""
    proxy = server.proxy(timeout=WAIT)
    assert proxy.echo(1) == 1
    proxy.close()
    with pytest.raises(passrpc.ConnectionClosed):
        proxy.numbers(3)
