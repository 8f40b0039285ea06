"""Streams where they meet the rest: a forked child, other threads, the other features.

Real server processes and sockets (tests/apps/streamer.py's handlers).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import pytest

import passrpc
from passrpc import ConnectionClosed, Server

from .apps.streamer import make_server
from .helpers import WAIT, wait_for

ITEM, MORE, END = 6, 7, 8


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    server = make_server(client_idle_timeout=30)
    server.start()
    yield server
    server.stop()


def _child(check: object) -> None:
    """In a forked child: exit 0 if ``check()`` is true, else 1 (2 if it raised)."""
    code = 2
    try:
        code = 0 if check() else 1  # type: ignore[operator]
    finally:
        os._exit(code)


def _exit_code(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


class TestFork:
    def test_a_child_cannot_read_its_parents_stream(self, server: Server) -> None:
        """A stream open at fork time is the parent's: the child's next() raises, takes no item."""
        with server.proxy(timeout=WAIT) as proxy:
            stream = proxy.numbers(1000)
            assert [next(stream) for _ in range(3)] == [0, 1, 2]
            pid = os.fork()
            if pid == 0:

                def check() -> bool:
                    try:
                        next(stream)
                    except ConnectionClosed as exc:
                        ok = "fork" in str(exc)
                    else:
                        ok = False
                    # The child's own calls and streams work.
                    return ok and stream.done and list(proxy.numbers(3)) == [0, 1, 2]

                _child(check)
            assert _exit_code(pid) == 0
            # The parent's stream lost nothing to the child.
            assert list(stream) == list(range(3, 1000))
            assert proxy.echo("in step") == "in step"

    def test_a_child_closing_its_parents_stream_leaves_it_open(self, server: Server) -> None:
        """close() in a child (or a with block's end) does not cancel the parent's stream."""
        with server.proxy(timeout=WAIT) as proxy:
            stream = proxy.numbers(1000)
            assert next(stream) == 0
            pid = os.fork()
            if pid == 0:

                def check() -> bool:
                    stream.close()
                    return stream.done and proxy.echo(1) == 1

                _child(check)
            assert _exit_code(pid) == 0
            assert list(stream) == list(range(1, 1000))

    def test_a_child_leaves_its_parents_dropped_stream_alone(self, server: Server) -> None:
        """A stream the parent dropped before the fork is cancelled by the parent, not the child."""
        with server.proxy(timeout=WAIT) as proxy:
            stream = proxy.numbers(1000)
            assert next(stream) == 0
            link = stream._link  # type: ignore[attr-defined]
            del stream  # dropped unfinished: its cancel waits for this thread's next call
            pid = os.fork()
            if pid == 0:
                _child(lambda: proxy.echo(1) == 1)
            assert _exit_code(pid) == 0
            # The child sent no END and read nothing: the parent's stream is whole,
            # 1 to 255 in the window, then the rest once credit is granted.
            channel = link.channel
            got = [channel.receive_frame() for _ in range(255)]
            channel.send_frame(MORE, 1000)
            got += [channel.receive_frame() for _ in range(744)]
            assert got == [(ITEM, [i]) for i in range(1, 1000)]
            assert channel.receive_frame() == (END, None)
            link.reader.done = True  # read to its end by hand
            assert proxy.echo(2) == 2


def _block(fd: passrpc.FileDescriptor) -> bytes:
    """A plain handler that waits until a byte can be read from ``fd``."""
    with fd:
        return os.read(fd.fileno(), 1)


@pytest.fixture(scope="module")
def blocking_server() -> Iterator[Server]:
    server = make_server(client_idle_timeout=30)
    server.add_handler("block", _block)
    server.start()
    yield server
    server.stop()


class TestThreads:
    def test_close_wakes_a_call_whose_thread_dropped_a_stream_meanwhile(
        self, blocking_server: Server
    ) -> None:
        """proxy.close() wakes a call blocked in another thread, also when that thread dropped
        a stream during the call (a finalizer flags the thread's connection at any moment)."""
        r, w = os.pipe()
        proxy = blocking_server.proxy(timeout=None)
        outcome: list[BaseException | object] = []

        class DropsAStream:
            """An argument whose fileno(), run as the call is sent, drops an open stream."""

            def __init__(self) -> None:
                self.stream: passrpc.Stream | None = None

            def fileno(self) -> int:
                self.stream = None  # dropped unfinished, in the calling thread, mid-call
                return r

        def call() -> None:
            argument = DropsAStream()
            argument.stream = proxy.numbers(1000)
            next(argument.stream)
            proxy.echo(0)  # the thread has its own connection again, beside the stream's
            try:
                outcome.append(proxy.block(argument))
            except BaseException as exc:
                outcome.append(exc)

        thread = threading.Thread(target=call)
        try:
            thread.start()
            wait_for(lambda: proxy._dropped, what="the stream dropped mid-call")  # type: ignore[attr-defined]
            proxy.close()
            thread.join(WAIT)
            woken = not thread.is_alive()
        finally:
            os.write(w, b"x")  # lets the handler return, so that the thread ends anyway
            thread.join(WAIT)
            os.close(r)
            os.close(w)
        assert woken, "proxy.close() did not wake the blocked call"
        assert len(outcome) == 1
        assert isinstance(outcome[0], ConnectionClosed)
