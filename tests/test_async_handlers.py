"""``async def`` handlers, in real server processes: awaited on the server's event loop.

The loop runs in a thread of its own (``passrpc-asyncio``), started only when
the server has an async handler or hook. An awaiting handler holds no pool
thread; a client that leaves cancels its handler; ``stop()`` cancels what
still runs after its timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import passrpc
from passrpc import ConfigurationError, Server

from .helpers import DESCRIBE, ERROR, MESSAGE, WAIT, Gate, frame, read_frame, wait_for
from .test_bounded import threads_of
from .test_cli import run_cli


def lines(path: Path) -> list[str]:
    """The lines written to ``path`` so far (none if it does not exist yet)."""
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


def note(path: Path, line: str) -> None:
    """Append ``line`` to ``path``: how a server process tells the test what happened."""
    with open(path, "a") as f:
        f.write(line + "\n")


def thread_names() -> list[str]:
    return sorted(t.name for t in threading.enumerate())


@pytest.fixture
def marks(sockdir: Path) -> Path:
    """Where the server process notes its handlers' steps."""
    return sockdir / "marks"


def waiting_server(marks: Path, **options: object) -> Server:
    """A server whose ``wait`` handler notes start, cancel and finally, and awaits forever."""
    srv = Server(**options)  # type: ignore[arg-type]

    @srv.handler()
    async def wait() -> None:
        note(marks, "started")
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            note(marks, "cancelled")
            raise
        finally:
            note(marks, "finally")

    @srv.handler()
    async def echo(x: object) -> object:
        return x

    return srv


class TestCalls:
    @pytest.fixture
    def server(self) -> Iterator[Server]:
        srv = Server()

        @srv.handler()
        async def add(a: int, b: int = 0) -> int:
            await asyncio.sleep(0)
            return a + b

        @srv.handler()
        async def pair(x: object) -> tuple[object, object]:
            return x, x

        @srv.handler()
        async def fail(message: str) -> None:
            await asyncio.sleep(0.001)
            raise ValueError(message)

        @srv.handler()
        async def who() -> int:
            await asyncio.sleep(0)
            return passrpc.current_peer().pid

        @srv.handler()
        async def who_in_thread() -> int:
            return await asyncio.to_thread(lambda: passrpc.current_peer().pid)

        @srv.handler()
        async def unsendable() -> object:
            return object()

        @srv.handler()
        def threads() -> list[str]:
            return thread_names()

        with srv:
            yield srv

    def test_awaited_with_args_and_kwargs(self, server: Server) -> None:
        with server.proxy(timeout=WAIT) as proxy:
            assert proxy.add(1, 2) == 3
            assert proxy.add(1, b=5) == 6
            assert proxy.pair("x") == ("x", "x")
            for i in range(50):  # back to back: the connection returns to the pool each time
                assert proxy.add(i) == i

    def test_exception_is_a_remote_error_of_its_type(self, server: Server) -> None:
        with server.proxy(timeout=WAIT) as proxy:
            with pytest.raises(ValueError, match="no luck"):
                proxy.fail("no luck")
            with pytest.raises(passrpc.RemoteError, match="cannot be sent"):
                proxy.unsendable()
            assert proxy.add(2, 2) == 4  # the connection stays in step

    def test_current_peer_in_the_task_and_its_threads(self, server: Server) -> None:
        with server.proxy(timeout=WAIT) as proxy:
            assert proxy.who() == os.getpid()
            assert proxy.who_in_thread() == os.getpid()

    def test_counted_in_status(self, server: Server) -> None:
        with server.proxy(timeout=WAIT) as proxy:
            for _ in range(3):
                proxy.add(1)
            with pytest.raises(ValueError):
                proxy.fail("x")
        status = server.status(timeout=WAIT)
        assert status.handlers["add"].calls == 3
        assert status.handlers["fail"].calls == 1
        assert status.handlers["fail"].errors == 1

    def test_the_loop_runs_in_its_thread(self, server: Server) -> None:
        with server.proxy(timeout=WAIT) as proxy:
            assert "passrpc-asyncio" in proxy.threads()

    def test_describe_and_list_mark_async_handlers(self, server: Server) -> None:
        with server.connect(timeout=WAIT) as channel:
            channel.send_frame(DESCRIBE, None)
            _, described = channel.receive_frame()
        by_name = {d["name"]: d for d in described}
        assert by_name["add"]["async"] is True
        assert "async" not in by_name["threads"]
        assert by_name["add"]["signature"] == "(a: int, b: int = 0)"
        result = run_cli(
            "list", "--socket", server.socket_path, PASSRPC_PASSWORD=str(server.password)
        )
        assert result.returncode == 0, result.stderr
        assert "add(a: int, b: int = 0)  [async]" in result.stdout
        assert "threads()\n" in result.stdout


def test_no_loop_thread_without_async_handlers() -> None:
    srv = Server()
    srv.add_handler("threads", thread_names)
    with srv, srv.proxy(timeout=WAIT) as proxy:
        assert "passrpc-asyncio" not in proxy.threads()


def test_subclass_and_decorator_forms() -> None:
    class Async(Server):
        @passrpc.handler
        async def double(self, x: int) -> int:
            await asyncio.sleep(0)
            return 2 * x

        @passrpc.handler("triple")
        async def third(self, x: int) -> int:
            return 3 * x

    with Async() as srv, srv.proxy(timeout=WAIT) as proxy:
        assert proxy.double(4) == 8
        assert proxy.triple(4) == 12


class TestRefused:
    def test_async_raw_handler(self) -> None:
        srv = Server()

        async def chat(channel: passrpc.Channel) -> None:
            pass

        with pytest.raises(ConfigurationError, match="raw handler 'chat' is an async def"):
            srv.add_handler("chat", chat, raw=True)

    def test_raw_async_generator_handler(self) -> None:
        srv = Server()

        async def items(channel: passrpc.Channel) -> AsyncIterator[int]:
            yield 1

        with pytest.raises(ConfigurationError, match="raw and a generator function"):
            srv.add_handler("items", items, raw=True)

    def test_async_before_fork_hook(self) -> None:
        srv = Server()

        async def hook() -> None:
            pass

        with pytest.raises(ConfigurationError, match="only on_initialize_server"):
            srv.on_before_fork(hook)


class TestOverlap:
    def test_fifty_slow_calls_at_once_on_four_threads(self) -> None:
        """50 clients each await a 0.5 s sleep: all done within 1 s, on a pool of 4 threads."""
        srv = Server(threads=4)

        @srv.handler()
        async def slow(i: int, seconds: float = 0.5) -> int:
            await asyncio.sleep(seconds)
            return i

        with srv:
            proxies = [srv.proxy(timeout=WAIT) for _ in range(50)]
            try:
                for i, proxy in enumerate(proxies):  # connected before the clock starts
                    assert proxy.slow(-i, 0) == -i
                start = threading.Barrier(len(proxies))

                def call(i: int) -> float:
                    start.wait(WAIT)
                    begun = time.monotonic()
                    assert proxies[i].slow(i) == i
                    return time.monotonic() - begun

                with ThreadPoolExecutor(len(proxies)) as pool:
                    began = time.monotonic()
                    durations = list(pool.map(call, range(len(proxies))))
                    elapsed = time.monotonic() - began
                assert max(durations) < 1.0, durations
                assert elapsed < 1.5
                assert srv.pid is not None
                assert threads_of(srv.pid) <= 1 + 4 + 1  # main, the pool, the loop
            finally:
                for proxy in proxies:
                    proxy.close()

    def test_a_blocking_plain_handler_does_not_delay_async_ones(self, marks: Path) -> None:
        srv = waiting_server(marks, threads=4)

        @srv.handler()
        def block(started: passrpc.FileDescriptor, release: passrpc.FileDescriptor) -> None:
            Gate.hold(started, release)

        gate = Gate()
        with (
            srv,
            srv.proxy(timeout=WAIT) as blocker,
            srv.proxy(timeout=WAIT) as proxy,
            ThreadPoolExecutor(1) as pool,
        ):
            try:
                blocked = pool.submit(blocker.block, *gate.args())
                gate.wait_started_blocking()
                begun = time.monotonic()
                for i in range(20):
                    assert proxy.echo(i) == i
                assert time.monotonic() - begun < 1.0
                assert not blocked.done()
            finally:
                gate.close()
            blocked.result(WAIT)


class TestCancellation:
    def test_disconnect_cancels_the_handler(self, marks: Path) -> None:
        with waiting_server(marks) as srv:
            channel = srv.connect(timeout=WAIT)
            channel.write("wait")
            wait_for(lambda: "started" in lines(marks), what="the handler to start")
            channel.close()
            wait_for(lambda: lines(marks) == ["started", "cancelled", "finally"], what="cancel")
            with srv.proxy(timeout=WAIT) as proxy:  # the server serves on
                assert proxy.echo(1) == 1
            # The proxy's connection closes on the server's side a moment after
            # the proxy lets go of it: wait for it, then only the status
            # call's own is open.
            wait_for(
                lambda: srv.status(timeout=WAIT).connections_open == 1,
                what="the closed connections to be counted closed",
            )

    def test_call_timeout_cancels_the_handler(self, marks: Path) -> None:
        with waiting_server(marks) as srv, srv.proxy(timeout=0.3) as proxy:
            with pytest.raises(passrpc.Timeout):
                proxy.wait()
            wait_for(lambda: "finally" in lines(marks), what="cancel after the timeout")
            assert lines(marks) == ["started", "cancelled", "finally"]

    def test_a_request_behind_the_call_waits_for_its_reply(self, marks: Path) -> None:
        """A pipelined request is not taken for a hang-up, and is answered after the first."""
        srv = Server()

        @srv.handler()
        async def slow(x: int) -> int:
            await asyncio.sleep(0.2)
            return x

        with srv, srv.connect(timeout=WAIT) as channel:
            channel.write("slow", 1)
            channel.write("slow", 2)
            assert channel.read() == (1,)
            assert channel.read() == (2,)

    def test_stop_cancels_a_handler_still_running_after_the_timeout(self, marks: Path) -> None:
        srv = waiting_server(marks, shutdown_timeout=0.5)
        srv.start()
        pid = srv.pid
        assert pid is not None
        channel = srv.connect(timeout=WAIT)
        try:
            channel.write("wait")
            wait_for(lambda: "started" in lines(marks), what="the handler to start")
            begun = time.monotonic()
            srv.stop(timeout=WAIT * 2)
            assert time.monotonic() - begun < WAIT / 2
            assert lines(marks) == ["started", "cancelled", "finally"]
            with pytest.raises(passrpc.ConnectionClosed):
                channel.read()
        finally:
            channel.close()


class TestHooks:
    def test_async_hooks_run_once_on_the_loop(self, marks: Path) -> None:
        srv = Server()
        state: dict[str, object] = {}

        @srv.on_initialize_server
        async def open_session() -> None:
            state["loop"] = asyncio.get_running_loop()
            note(marks, f"initialize {threading.current_thread().name}")

        @srv.on_initialize_server
        def plain_initialize() -> None:
            note(marks, f"plain initialize {threading.current_thread().name}")

        @srv.on_finalize_server
        async def close_session() -> None:
            same = state["loop"] is asyncio.get_running_loop()
            note(marks, f"finalize {threading.current_thread().name} {same}")

        @srv.handler()
        async def same_loop() -> bool:
            return state["loop"] is asyncio.get_running_loop()

        with srv, srv.proxy(timeout=WAIT) as proxy:
            assert proxy.same_loop()
        assert lines(marks) == [
            "initialize passrpc-asyncio",
            "plain initialize MainThread",
            "finalize passrpc-asyncio True",
        ]

    def test_an_async_override_of_initialize_server(self, marks: Path) -> None:
        class Overrides(Server):
            async def initialize_server(self) -> None:  # type: ignore[override]
                note(marks, f"override {threading.current_thread().name}")

            @passrpc.handler
            def threads(self) -> list[str]:
                return thread_names()

        with Overrides() as srv, srv.proxy(timeout=WAIT) as proxy:
            assert "passrpc-asyncio" in proxy.threads()
        assert lines(marks) == ["override passrpc-asyncio"]

    def test_a_failing_async_initialize_fails_start(self) -> None:
        srv = Server()

        @srv.on_initialize_server
        async def broken() -> None:
            raise RuntimeError("no database")

        srv.add_handler("echo", lambda x: x)
        with pytest.raises(passrpc.StartError, match="before it was ready"):
            srv.start()


def test_no_descriptor_or_process_left(no_fd_leak: None, marks: Path) -> None:
    srv = waiting_server(marks)
    with srv:
        for _ in range(3):
            channel = srv.connect(timeout=WAIT)
            channel.write("wait")
            wait_for(lambda: "started" in lines(marks), what="the handler to start")
            channel.close()
            wait_for(lambda: "finally" in lines(marks), what="cancel")
            marks.unlink()
        with srv.proxy(timeout=WAIT) as proxy:
            assert proxy.echo(2) == 2
    assert not srv.alive


def test_stop_from_an_async_handler_under_serve(sockdir: Path) -> None:
    """Under serve(), an async handler's stop() ends the loop without waiting on itself."""
    path = sockdir / "s.sock"
    srv = Server(socket_path=str(path))

    @srv.handler()
    async def halt() -> str:
        srv.stop()
        return "stopping"

    thread = threading.Thread(target=srv.serve)
    thread.start()
    try:
        wait_for(path.exists, what="the server to listen")
        with srv.proxy(timeout=WAIT) as proxy:
            begun = time.monotonic()
            try:
                assert proxy.halt() == "stopping"
            except passrpc.ConnectionClosed:
                pass  # the loop may close the connection first: the server is stopping
        thread.join(WAIT)
        assert not thread.is_alive()
        assert time.monotonic() - begun < 3.0  # stop()'s own wait would take its 4 s
    finally:
        if thread.is_alive():
            srv.stop()
        thread.join(WAIT)


# Async generator handlers: streams ------------------------------------------

STREAM, ITEM, MORE, END = 5, 6, 7, 8
#: A context variable an async generator sets: it keeps its value from one
#: item to the next (the generator runs in one context for the whole stream).
_count: contextvars.ContextVar[int] = contextvars.ContextVar("count", default=0)


def streaming_server(marks: Path, **options: object) -> Server:
    """A server of async generator handlers; ``ticking`` and ``stuck`` note how they end."""
    srv = Server(**options)  # type: ignore[arg-type]

    @srv.handler()
    async def numbers(n: int) -> AsyncIterator[int]:
        """Yield 0 to n - 1."""
        for i in range(n):
            await asyncio.sleep(0)
            yield i

    @srv.handler()
    async def pairs(n: int) -> AsyncIterator[tuple[int, int]]:
        for i in range(n):
            yield i, i * i

    @srv.handler()
    async def failing(n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i
        await asyncio.sleep(0.001)
        raise ValueError(f"failed after {n} items")

    @srv.handler()
    async def peers(n: int) -> AsyncIterator[tuple[int, int, int]]:
        for _ in range(n):
            _count.set(_count.get() + 1)
            in_thread = await asyncio.to_thread(lambda: passrpc.current_peer().pid)
            yield passrpc.current_peer().pid, in_thread, _count.get()

    @srv.handler()
    async def ticking(every: float = 0.001) -> AsyncIterator[int]:
        i = 0
        note(marks, "started")
        try:
            while True:
                yield i
                i += 1
                await asyncio.sleep(every)
        except GeneratorExit:
            note(marks, "closed")
            raise
        finally:
            note(marks, "finally")

    @srv.handler()
    async def stuck() -> AsyncIterator[int]:
        """Yield one item, then await forever."""
        try:
            yield 0
            note(marks, "waiting")
            await asyncio.sleep(3600)
            yield 1
        except asyncio.CancelledError:
            note(marks, "cancelled")
            raise
        finally:
            note(marks, "finally")

    @srv.handler()
    async def add(a: int, b: int = 0) -> int:
        await asyncio.sleep(0)
        return a + b

    @srv.handler()
    def echo(x: object) -> object:
        return x

    @srv.handler()
    def threads() -> list[str]:
        return thread_names()

    return srv


@contextlib.contextmanager
def authenticated_socket(server: Server) -> Iterator[socket.socket]:
    """A socket authenticated with the server, for frames by hand (a channel's, kept open)."""
    with server.connect(timeout=WAIT) as channel:
        yield channel._sock  # type: ignore[attr-defined]


class TestAsyncStreams:
    @pytest.fixture
    def server(self, marks: Path) -> Iterator[Server]:
        with streaming_server(marks, client_idle_timeout=30) as srv:
            yield srv

    def test_list_of_an_async_generator(self, server: Server) -> None:
        with server.proxy(timeout=WAIT) as proxy:
            stream = proxy.numbers(5)
            assert isinstance(stream, passrpc.Stream)
            assert list(stream) == [0, 1, 2, 3, 4]
            assert list(proxy.pairs(3)) == [(0, 0), (1, 1), (2, 4)]
            assert list(proxy.numbers(0)) == []
            assert list(proxy.call("numbers", n=2)) == [0, 1]
            # Many windows of credit; the connection stays in step.
            assert sum(proxy.numbers(3000)) == sum(range(3000))
            assert proxy.echo("in step") == "in step"

    def test_error_after_items(self, server: Server) -> None:
        seen: list[int] = []
        with server.proxy(timeout=WAIT) as proxy:
            with pytest.raises(ValueError, match="failed after 3 items"):
                seen.extend(proxy.failing(3))
            assert seen == [0, 1, 2]
            with pytest.raises(TypeError):  # wrong arguments: raised as the stream's error
                list(proxy.numbers(1, 2, 3))
            assert proxy.echo(1) == 1
        figures = server.status(timeout=WAIT).handlers["failing"]
        assert (figures.calls, figures.errors) == (1, 1)

    def test_current_peer_and_one_context_for_the_whole_stream(self, server: Server) -> None:
        me = os.getpid()
        with server.proxy(timeout=WAIT) as proxy:
            assert list(proxy.peers(3)) == [(me, me, 1), (me, me, 2), (me, me, 3)]
            assert list(proxy.peers(1)) == [(me, me, 1)]  # a new stream, a new context

    def test_close_runs_the_generators_finally(self, server: Server, marks: Path) -> None:
        with server.proxy(timeout=WAIT) as proxy:
            stream = proxy.ticking()
            assert next(stream) == 0
            assert next(stream) == 1
            stream.close()
            wait_for(lambda: "finally" in lines(marks), what="the generator's finally")
            assert lines(marks) == ["started", "closed", "finally"]
            assert proxy.echo("in step") == "in step"
            # The cancel kept the connection: the proxy's and the status call's served.
            assert server.status(timeout=WAIT).connections_served == 2

    def test_disconnect_closes_the_generator(self, server: Server, marks: Path) -> None:
        with authenticated_socket(server) as sock:
            sock.sendall(frame(STREAM, 0, ["ticking", [0.001], {}, 1]))
            assert read_frame(sock) == (ITEM, 0, [0])
            wait_for(lambda: "started" in lines(marks), what="the generator to start")
        # The driver waits for credit: the hang-up ends the wait, and the generator.
        wait_for(lambda: "finally" in lines(marks), what="the generator's finally")
        assert lines(marks) == ["started", "closed", "finally"]
        with server.proxy(timeout=WAIT) as proxy:
            assert proxy.echo(1) == 1

    def test_hang_up_while_awaiting_cancels_the_generator(
        self, server: Server, marks: Path
    ) -> None:
        with authenticated_socket(server) as sock:
            sock.sendall(frame(STREAM, 0, ["stuck", [], {}, 8]))
            assert read_frame(sock) == (ITEM, 0, [0])
            wait_for(lambda: "waiting" in lines(marks), what="the generator to await")
        wait_for(lambda: "finally" in lines(marks), what="the generator's finally")
        assert lines(marks) == ["waiting", "cancelled", "finally"]
        with server.proxy(timeout=WAIT) as proxy:
            assert proxy.echo(1) == 1

    def test_a_timed_out_item_cancels_the_generator(self, server: Server, marks: Path) -> None:
        with server.proxy(timeout=0.3) as proxy:
            stream = proxy.stuck()
            assert next(stream) == 0
            with pytest.raises(passrpc.Timeout):
                next(stream)  # the proxy drops the stream's connection
            wait_for(lambda: "finally" in lines(marks), what="the generator's finally")
            assert lines(marks) == ["waiting", "cancelled", "finally"]
            assert proxy.echo("serves on") == "serves on"

    def test_frames_by_hand(self, server: Server) -> None:
        """The same frames as a sync generator's: items as credit allows, the end; a plain
        async def streams its result as one item; a plain request is refused."""
        with authenticated_socket(server) as sock:
            sock.sendall(frame(STREAM, 0, ["numbers", [4], {}, 2]))
            assert read_frame(sock) == (ITEM, 0, [0])
            assert read_frame(sock) == (ITEM, 0, [1])
            sock.sendall(frame(MORE, 0, 3))
            assert [read_frame(sock) for _ in range(3)] == [
                (ITEM, 0, [2]),
                (ITEM, 0, [3]),
                (END, 0, None),
            ]
            sock.sendall(frame(STREAM, 0, ["add", [20], {"b": 22}, 8]))
            assert read_frame(sock) == (ITEM, 0, [42])
            assert read_frame(sock) == (END, 0, None)
            sock.sendall(frame(MESSAGE, 0, ["numbers", 3]))
            kind, _, payload = read_frame(sock)
            assert (kind, payload["code"]) == (ERROR, "bad_request")
            assert "streams its results" in payload["message"]
            sock.sendall(frame(MESSAGE, 0, ["echo", "next"]))
            assert read_frame(sock) == (MESSAGE, 0, ["next"])

    def test_async_proxy(self, server: Server, marks: Path) -> None:
        async def main() -> None:
            async with server.async_proxy(timeout=WAIT) as proxy:
                assert [item async for item in proxy.numbers(5)] == [0, 1, 2, 3, 4]
                seen: list[int] = []

                async def consume() -> None:
                    async for item in proxy.failing(2):
                        seen.append(item)

                with pytest.raises(ValueError, match="failed after 2 items"):
                    await consume()
                assert seen == [0, 1]
                async with proxy.ticking() as stream:
                    async for item in stream:
                        if item == 2:
                            break
                assert await proxy.echo("in step") == "in step"

        asyncio.run(asyncio.wait_for(main(), WAIT * 2))
        wait_for(lambda: "finally" in lines(marks), what="the generator's finally")
        assert lines(marks) == ["started", "closed", "finally"]

    def test_describe_and_list(self, server: Server) -> None:
        with server.connect(timeout=WAIT) as channel:
            channel.send_frame(DESCRIBE, None)
            _, described = channel.receive_frame()
        by_name = {d["name"]: d for d in described}
        assert by_name["numbers"]["async"] is True
        assert by_name["numbers"]["stream"] is True
        assert "stream" not in by_name["add"]
        result = run_cli(
            "list", "--socket", server.socket_path, PASSRPC_PASSWORD=str(server.password)
        )
        assert result.returncode == 0, result.stderr
        assert "numbers(n: int)  [stream: one item per line]  [async]" in result.stdout
        result = run_cli(
            "call",
            "--socket",
            server.socket_path,
            "numbers",
            "3",
            PASSRPC_PASSWORD=str(server.password),
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == ["0", "1", "2"]

    def test_the_loop_thread_and_no_more(self, server: Server) -> None:
        with server.proxy(timeout=WAIT) as proxy:
            assert list(proxy.numbers(3)) == [0, 1, 2]
            names = proxy.threads()
        assert names.count("passrpc-asyncio") == 1


def test_every_registration_form_streams() -> None:
    class Numbers(Server):
        @passrpc.handler
        async def count(self, n: int) -> AsyncIterator[int]:
            for i in range(n):
                yield i + 1

        @passrpc.handler("down")
        async def count_down(self, n: int) -> AsyncIterator[int]:
            for i in range(n, 0, -1):
                yield i

    srv = Numbers()

    async def squares(n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i * i

    srv.add_handler("squares", squares)
    srv.add_handler("cubes", functools.partial(squares, 2))
    with srv, srv.proxy(timeout=WAIT) as proxy:
        assert list(proxy.count(3)) == [1, 2, 3]
        assert list(proxy.down(2)) == [2, 1]
        assert list(proxy.squares(3)) == [0, 1, 4]
        assert list(proxy.cubes()) == [0, 1]


def test_a_callable_instance_is_what_its_call_is() -> None:
    """An object whose __call__ is an async def is awaited; a generator __call__ streams."""

    class Doubler:
        async def __call__(self, x: int) -> int:
            await asyncio.sleep(0)
            return 2 * x

    class Counter:
        def __call__(self, n: int) -> Iterator[int]:
            yield from range(n)

    class Ticker:
        async def __call__(self, n: int) -> AsyncIterator[int]:
            for i in range(n):
                yield i

    srv = Server()
    srv.add_handler("double", Doubler())
    srv.add_handler("count", Counter())
    srv.add_handler("tick", Ticker())
    with srv, srv.proxy(timeout=WAIT) as proxy:
        assert proxy.double(21) == 42
        assert list(proxy.count(3)) == [0, 1, 2]
        assert list(proxy.tick(2)) == [0, 1]


def test_only_an_async_generator_starts_the_loop() -> None:
    srv = Server()

    async def items() -> AsyncIterator[str]:
        yield " ".join(thread_names())

    srv.add_handler("items", items)
    with srv, srv.proxy(timeout=WAIT) as proxy:
        assert "passrpc-asyncio" in next(iter(proxy.items()))


def test_stop_ends_an_open_async_stream(marks: Path) -> None:
    """stop() ends an async stream waiting for credit, and one whose generator awaits
    forever (cancelled where it awaits), well before its shutdown timeout."""
    srv = streaming_server(marks, shutdown_timeout=WAIT)
    srv.start()
    try:
        with srv.proxy(timeout=WAIT) as proxy, srv.proxy(timeout=WAIT) as other:
            waiting = proxy.ticking()  # holds the proxy's window of items, waits for credit
            assert next(waiting) == 0
            stuck = other.stuck()
            assert next(stuck) == 0
            wait_for(lambda: "waiting" in lines(marks), what="the generator to await")
            begun = time.monotonic()
            srv.stop(timeout=WAIT)
            assert time.monotonic() - begun < WAIT / 2
            assert sorted(lines(marks)) == sorted(
                ["started", "waiting", "closed", "finally", "cancelled", "finally"]
            )
            with pytest.raises(passrpc.ConnectionClosed):
                next(stuck)
    finally:
        if srv.started:
            srv.stop()


def test_no_descriptor_thread_or_process_left_by_async_streams(
    no_fd_leak: None, marks: Path
) -> None:
    srv = streaming_server(marks)

    def one_round(proxy: passrpc.Proxy) -> None:
        """A stream closed by its client, one whose client hung up, one to its end."""
        stream = proxy.ticking()
        assert next(stream) == 0
        stream.close()
        wait_for(lambda: "finally" in lines(marks), what="the generator's finally")
        marks.unlink()
        with authenticated_socket(srv) as sock:
            sock.sendall(frame(STREAM, 0, ["ticking", [0.001], {}, 1]))
            assert read_frame(sock) == (ITEM, 0, [0])
        wait_for(lambda: "finally" in lines(marks), what="the generator's finally")
        marks.unlink()
        assert list(proxy.numbers(100)) == list(range(100))

    with srv, srv.proxy(timeout=WAIT) as proxy:
        one_round(proxy)  # the pool's threads for two connections at once
        threads = threads_of(srv.pid)
        fds = len(os.listdir(f"/proc/{srv.pid}/fd"))
        for _ in range(3):
            one_round(proxy)
        assert threads_of(srv.pid) == threads
        # The hung-up connection is closed once its pool thread is back from the stream.
        wait_for(lambda: len(os.listdir(f"/proc/{srv.pid}/fd")) == fds, what="no descriptor left")
    assert not srv.alive


def test_async_stream_without_the_servers_loop() -> None:
    """A dispatcher that converses in a thread of its own (a Server run as a worker) runs
    an async stream on a private event loop, closed at the stream's end."""
    from passrpc._dispatch import Dispatcher
    from passrpc._registry import Handler

    async def numbers(n: int) -> AsyncIterator[int]:
        for i in range(n):
            await asyncio.sleep(0)
            yield i

    async def who() -> AsyncIterator[int]:
        yield passrpc.current_peer().pid

    peer = passrpc.Peer(pid=7, uid=0, gid=0)
    dispatcher = Dispatcher(
        {
            "numbers": Handler("numbers", numbers, False, True, True),
            "who": Handler("who", who, False, True, True),
        }
    )
    before = set(os.listdir("/proc/self/fd"))
    client, server = passrpc.Channel.pair(timeout=WAIT)
    thread = threading.Thread(target=dispatcher.converse, args=(server, peer))
    thread.start()
    try:
        client.send_frame(STREAM, ["numbers", [3], {}, 8])
        assert [client.receive_frame() for _ in range(4)] == [
            (ITEM, [0]),
            (ITEM, [1]),
            (ITEM, [2]),
            (END, None),
        ]
        client.send_frame(STREAM, ["who", [], {}, 8])
        assert client.receive_frame() == (ITEM, [7])
        assert client.receive_frame() == (END, None)
        client.send_frame(STREAM, ["numbers", [100], {}, 1])
        assert client.receive_frame() == (ITEM, [0])
        client.send_frame(END, None)  # cancel: the private loop closes too
        kind, payload = client.receive_frame()
        assert (kind, payload["code"]) == (ERROR, "cancelled")
    finally:
        client.close()
        thread.join(WAIT)
        server.close()
    assert not thread.is_alive()
    assert set(os.listdir("/proc/self/fd")) <= before
