"""``async def`` handlers, in real server processes: awaited on the server's event loop.

The loop runs in a thread of its own (``passrpc-asyncio``), started only when
the server has an async handler or hook. An awaiting handler holds no pool
thread; a client that leaves cancels its handler; ``stop()`` cancels what
still runs after its timeout.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import passrpc
from passrpc import ConfigurationError, Server

from .helpers import DESCRIBE, WAIT, Gate, wait_for
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

    def test_async_generator_handler(self) -> None:
        srv = Server()

        async def items() -> object:
            yield 1

        with pytest.raises(ConfigurationError, match="async generator"):
            srv.add_handler("items", items)

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
            srv.stop(timeout=WAIT)
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
