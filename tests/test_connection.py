"""A server's connections: the clocks the poller keeps for them (Deadlines), with fake time."""

from __future__ import annotations

import gc
import socket
import time
from collections.abc import Iterator

import pytest

from passrpc._connection import (
    AUTHENTICATED,
    PARKED,
    SERVING,
    Deadlines,
    ServerConnection,
    timeval,
)


class Connections:
    """Makes server connections over socketpairs, and closes them all afterwards."""

    def __init__(self) -> None:
        self.made: list[ServerConnection] = []
        self.ends: list[socket.socket] = []

    def new(self) -> ServerConnection:
        ours, theirs = socket.socketpair()
        self.ends.append(theirs)
        conn = ServerConnection(ours)
        self.made.append(conn)
        return conn

    def close(self) -> None:
        for conn in self.made:
            conn.close()
        for end in self.ends:
            end.close()


@pytest.fixture
def conns() -> Iterator[Connections]:
    made = Connections()
    yield made
    made.close()


class TestDeadlines:
    def test_handshakes_come_due_in_order_unless_done(self, conns: Connections) -> None:
        """A handshake deadline is due after the bound, unless the client authenticated."""
        deadlines = Deadlines(0.5, None)
        slow, done = conns.new(), conns.new()
        deadlines.accepted(slow)
        deadlines.accepted(done)
        done.stage = AUTHENTICATED
        now = time.monotonic()
        assert deadlines.due(now) == ([], [])
        assert 0.4 < deadlines.wait() <= 0.5
        assert deadlines.due(now + 0.6) == ([slow], [])
        assert deadlines.wait() == float("inf")

    def test_a_connection_parked_again_is_timed_once_from_its_last_parking(
        self, conns: Connections
    ) -> None:
        """Parking twice keeps one heap entry; it comes due at the later deadline."""
        deadlines = Deadlines(None, 1.0)
        conn = conns.new()
        conn.stage = AUTHENTICATED
        deadlines.park(conn)
        first = conn.deadline
        assert conn.state == PARKED
        conn.state = SERVING
        time.sleep(0.01)
        deadlines.park(conn)
        assert conn.deadline > first
        assert len(deadlines._idle) == 1
        assert deadlines.due(first + 0.001) == ([], [])  # early: back under its new deadline
        assert deadlines.due(conn.deadline) == ([], [conn])
        assert not conn.timed

    def test_a_connection_a_thread_holds_leaves_the_heap(self, conns: Connections) -> None:
        """Taken by a pool thread when its entry comes due, it is not timed until parked again."""
        deadlines = Deadlines(None, 0.1)
        conn = conns.new()
        conn.stage = AUTHENTICATED
        deadlines.park(conn)
        conn.state = SERVING
        assert deadlines.due(conn.deadline + 1) == ([], [])
        assert not conn.timed
        assert not deadlines._idle

    def test_closed_connections_are_not_kept_alive(self) -> None:
        """Entries hold weak references: a dropped connection is simply skipped."""
        deadlines = Deadlines(0.1, 0.1)
        a, b = socket.socketpair()
        conn = ServerConnection(a)
        deadlines.accepted(conn)
        conn.stage = AUTHENTICATED
        deadlines.park(conn)
        conn.close()
        del conn
        gc.collect()
        assert deadlines.due(time.monotonic() + 1) == ([], [])
        b.close()

    def test_no_bound_means_no_wake_up(self) -> None:
        """Without either timeout the poller sleeps until something happens."""
        assert Deadlines(None, None).wait() == float("inf")


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [(None, (0, 0)), (0.005, (0, 5000)), (2.5, (2, 500000)), (1e-9, (0, 1)), (3.0, (3, 0))],
)
def test_timeval_packs_seconds_for_the_socket_options(
    seconds: float | None, expected: tuple[int, int]
) -> None:
    """SO_RCVTIMEO's value; a tiny timeout is never 0, which would mean none."""
    import struct

    assert struct.unpack("@ll", timeval(seconds)) == expected
