"""Streams where they meet the rest: a forked child, other threads, the other features.

Real server processes and sockets (tests/apps/streamer.py's handlers).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

import passrpc
from passrpc import ConnectionClosed, Server

from .apps.streamer import make_server
from .helpers import WAIT

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
