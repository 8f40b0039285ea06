"""One client's connection as the server holds it, from accept to close.

A connection costs a thread only while bytes keep coming on it. The server's
loop (:mod:`passrpc._loop`) hands each new or readable connection to a pool
thread, which takes it as far as the bytes allow: the handshake's steps
(the pure ones of :mod:`passrpc._handshake`), then requests, for as long as
they keep coming. When they stop, the thread parks the connection in the
loop's poller, without a receive buffer, and is free for another.

Two fields say where a connection is. ``stage`` is how far its handshake
went; ``state`` is who holds it, and so who may move it on:

======== ========================================== =====================
state    where it is                                moved on by
======== ========================================== =====================
QUEUED   waiting for a pool thread, first come      the pool thread
SERVING  a pool thread takes its handshake or calls that thread
PARKED   idle in the poller: no thread, no buffer   the poller
AWAITING its async handler runs on the event loop      the event loop
CLOSED   gone                                       nobody
======== ========================================== =====================

An async handler's call (:class:`~passrpc._dispatch.AsyncCall`) leaves the
pool thread at once: the connection waits AWAITING, watched by the event
loop only for a hang-up (:mod:`passrpc._asyncloop`), and goes back QUEUED
with its reply, which the next pool thread sends before it reads on.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import math
import socket
import struct
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Collection

from ._auth import check_uid
from ._channel import Channel, DescriptorBudget, Peer
from ._dispatch import AsyncCall, Dispatcher, RawCall
from ._errors import AuthenticationError, ConnectionClosed, Timeout
from ._handshake import (
    HANDSHAKE_MAX_FRAME,
    ServerHandshake,
    client_proof,
    handshake_payload,
    refusal,
)
from ._protocol import HANDSHAKE
from ._streams import StreamCall
from ._wire import WireOptions

NEW, HELLO, PROOF, AUTHENTICATED = range(4)  # stages: what the connection waits for next
QUEUED, SERVING, PARKED, CLOSED, AWAITING = range(5)  # states

#: Seconds a pool thread waits for a connection's next bytes (a request, or
#: the handshake's next step) before it parks the connection; while another
#: connection waits for a thread it does not wait at all. A client that calls
#: again within this keeps its thread and pays no hand-off; one that pauses
#: longer costs a wake-up of the poller and of a thread (tens of
#: microseconds). 5 ms covers a client's own work between calls in a tight
#: loop, and a thread that waits in vain is held a scheduler tick or two.
LINGER = 0.005

#: Seconds a pool thread keeps waiting, LINGER at a time, on a connection
#: that sends nothing, while more than a quarter of the pool is free, before
#: it parks it. A client that is only delayed (a loaded machine's scheduler
#: can leave it without a CPU for tens of milliseconds) keeps its thread; an
#: idle one lets it go after this, or within LINGER once the pool is that
#: busy or another connection waits for a thread (so new work still finds a
#: thread at once).
PATIENCE = 0.25

_TIMEVAL = struct.Struct("@ll")


def timeval(seconds: float | None) -> bytes:
    """``SO_RCVTIMEO``/``SO_SNDTIMEO``'s value for ``seconds`` (None: no timeout)."""
    if seconds is None:
        return _TIMEVAL.pack(0, 0)
    whole = int(seconds)
    return _TIMEVAL.pack(whole, max(int((seconds - whole) * 1e6), 0 if whole else 1))


_FOREVER = timeval(None)
_LINGER = timeval(LINGER)


class ServerConnection:
    """One client's connection on the server: its channel, how far it got, and the steps that move it.

    Args:
        sock: the accepted socket; the connection owns it.
        wire: the server's wire options.
        budget: the server-wide bound on descriptors waiting for their frame.
    """

    __slots__ = (
        "__weakref__",
        "_steps",
        "channel",
        "deadline",
        "expired",
        "fd",
        "peer",
        "pending",
        "registered",
        "sock",
        "stage",
        "state",
        "timed",
    )

    channel: Channel  # from greet() on

    def __init__(self, sock: socket.socket) -> None:
        # Only what the poller needs: a pool thread does the rest (greet).
        self.sock = sock
        self.fd = sock.fileno()
        self.stage = NEW
        self.state = QUEUED
        self.peer: Peer | None = None
        self._steps: ServerHandshake | None = None
        #: When the poller closes it while parked (client_idle_timeout), and
        #: whether it is in the poller's heap of such deadlines.
        self.deadline = math.inf
        self.timed = False
        self.registered = False  # in the poller's epoll set (from its first parking on)
        self.expired = False  # its handshake ran out of time while a thread held it
        #: An async call whose reply waits to be sent by the next pool thread.
        self.pending: AsyncCall | None = None

    def who(self) -> str:
        """The peer for a log line: its pid and uid, as the kernel told them at accept."""
        peer = self.peer
        return "a peer that is gone" if peer is None else f"pid {peer.pid} uid {peer.uid}"

    def greet(
        self, key: bytes, allowed_uids: Collection[int], wire: WireOptions, budget: DescriptorBudget
    ) -> None:
        """Make the connection's channel and check the client's uid, before reading a byte.

        ``wire`` are the server's wire options, ``budget`` its bound on
        descriptors waiting for their frame.

        Raises:
            AuthenticationError: a uid that is not allowed (the client was told why).
            OSError: the client is already gone.
        """
        self.channel = channel = Channel(self.sock, wire=wire)
        self.stage = HELLO
        channel.share_descriptor_budget(budget)
        # Until the client has proved it knows the password it may not make
        # this process set aside (or decode) more than a handshake frame.
        channel.cap_frame_size(HANDSHAKE_MAX_FRAME)
        # Reads wait LINGER at most, in the kernel: on a blocking socket, the
        # read of every request stays one system call.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _LINGER)
        self.peer = peer = channel.peer
        try:
            check_uid(peer, allowed_uids, "client")
        except AuthenticationError as exc:
            self._refuse(exc)
            raise
        self._steps = ServerHandshake(key)

    def advance(self, hurry: object) -> bool:
        """Take the handshake as far as the bytes that come allow (``hurry``: as for requests).

        Returns:
            True once the client has proved it knows the password (a request
            it sent right behind its proof stays buffered for :meth:`serve`);
            False when the next step did not come in time (park it).

        Raises:
            AuthenticationError: another protocol version or a wrong proof
                (the client was told why).
            ProtocolError, ConnectionClosed: a malformed step, or a client gone
                (or, if :attr:`expired`, the poller ended the wait: time is up).
        """
        channel = self.channel
        steps = self._steps
        assert steps is not None
        channel.reserve_buffer()
        try:
            while (frame := channel.receive_waiting(hurry)) is not None:
                if self.stage == HELLO:
                    hello = handshake_payload(*frame, from_server=False)
                    channel.send_frame(HANDSHAKE, steps.challenge(hello))
                    # The client may send its first request, descriptors and all,
                    # right behind its proof: those are taken, but only once the
                    # proof is whole.
                    channel.cap_frame_size(HANDSHAKE_MAX_FRAME, last_step=True)
                    self.stage = PROOF
                else:
                    steps.verify(client_proof(*frame))
                    channel.cap_frame_size(None)
                    self._steps = None
                    self.stage = AUTHENTICATED
                    return True
        except AuthenticationError as exc:
            self._refuse(exc)
            raise
        channel.release_buffer()
        return False

    def _refuse(self, exc: AuthenticationError) -> None:
        with contextlib.suppress(ConnectionClosed, Timeout):
            self.channel.send_frame(*refusal(exc))

    def hung_up(self) -> bool:
        """Whether the peer has closed the connection with nothing left to read (never blocks)."""
        try:
            return self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:  # reset: gone too
            return True

    def authenticated(self, idle_timeout: float | None) -> None:
        """Bound a send to a client that does not read by ``idle_timeout``, as a read is."""
        if idle_timeout is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval(idle_timeout))

    def serve(
        self,
        dispatcher: Dispatcher,
        hurry: object,
        wait_more: Callable[[float], bool],
        idle_timeout: float | None,
    ) -> bool | AsyncCall:
        """Serve the client's requests while they keep coming, in a pool thread.

        ``hurry`` and ``wait_more`` say when to stop waiting for the next
        request (see :meth:`Dispatcher.serve`). An async call's reply that
        came back (:attr:`pending`) is sent first.

        Returns:
            True to park the connection (its receive buffer is let go of);
            False when it is over (the caller closes it); an
            :class:`AsyncCall` for the event loop to await (its receive
            buffer is kept: a request may wait there behind it).
        """
        channel = self.channel
        channel.reserve_buffer()
        call = self.pending
        if call is not None:
            self.pending = None
            try:
                call.send(channel)
            except (ConnectionClosed, Timeout):
                return False
        while True:
            outcome = dispatcher.serve(channel, self.peer, hurry, wait_more)  # type: ignore[arg-type]
            if outcome is True:
                channel.release_buffer()
                return True
            if outcome is False:
                return False
            if type(outcome) is AsyncCall:
                return outcome
            if not self._converse(outcome, idle_timeout):  # type: ignore[arg-type]
                return False

    def _converse(self, call: RawCall | StreamCall, idle_timeout: float | None) -> bool:
        """Run a raw handler, which keeps this thread while it converses; False when it is over.

        It reads and writes on the channel as any channel does, waiting up to
        ``idle_timeout`` (the server's ``client_idle_timeout``) for the client.
        A stream keeps the thread too, but its reads stay system calls that
        block as the socket does: it looks for a cancel without waiting.
        """
        channel = self.channel
        if type(call) is StreamCall:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval(idle_timeout))
            try:
                return call.run(channel)
            finally:
                if not channel.closed:
                    self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _LINGER)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _FOREVER)
        channel.timeout = idle_timeout
        try:
            return call.run(channel)
        finally:
            if not channel.closed:
                channel.timeout = None
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _LINGER)

    def close(self) -> None:
        """Close the socket and every descriptor received on it that nobody claimed."""
        self.state = CLOSED
        channel: Channel | None = getattr(self, "channel", None)  # made by greet()
        if channel is None:
            self.sock.close()
        else:
            channel.close()


class Deadlines:
    """When connections run out of time: handshakes too slow, parked connections idle too long.

    The poller asks :meth:`wait` how long it may sleep and :meth:`due` what
    is up; pool threads :meth:`park` connections. Entries hold weak
    references, so a closed connection is not kept alive by its deadline.

    Handshake deadlines come in the order of accepts (one bound for all): a
    queue. Idle deadlines are a heap with at most one entry per connection,
    under the deadline it had when it was put there: deadlines only move
    later (each is a parking time plus the same bound), so an entry that
    comes due early goes back under its connection's new deadline, and one
    whose connection a pool thread holds leaves the heap (parking puts it
    back). That keeps the heap as large as the parked connections, however
    often they park.

    Args:
        handshake_timeout: the server's bound for a whole handshake (None: none).
        idle_timeout: its ``client_idle_timeout`` (None: none).
    """

    def __init__(self, handshake_timeout: float | None, idle_timeout: float | None) -> None:
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self._handshakes: deque[tuple[float, weakref.ref[ServerConnection]]] = deque()
        self._idle: list[tuple[float, int, weakref.ref[ServerConnection]]] = []
        self._order = itertools.count()
        self._lock = threading.Lock()  # pool threads park while the poller pops

    def accepted(self, conn: ServerConnection) -> None:
        """Start the clock of ``conn``'s handshake (the poller, at accept)."""
        if self.handshake_timeout is not None:
            deadline = time.monotonic() + self.handshake_timeout
            self._handshakes.append((deadline, weakref.ref(conn)))

    def park(self, conn: ServerConnection) -> None:
        """Mark ``conn`` parked, idle from now (a pool thread, before the poller watches it)."""
        with self._lock:
            if self.idle_timeout is not None and conn.stage == AUTHENTICATED:
                conn.deadline = time.monotonic() + self.idle_timeout
                if not conn.timed:
                    conn.timed = True
                    entry = (conn.deadline, next(self._order), weakref.ref(conn))
                    heapq.heappush(self._idle, entry)
            conn.state = PARKED  # before it is armed: the poller queues only parked ones

    def late(self) -> Timeout:
        """What a handshake that ran out of time is refused with."""
        return Timeout(f"the client did not finish the handshake within {self.handshake_timeout} s")

    def wait(self) -> float:
        """Seconds until something may come due (math.inf: nothing can)."""
        soonest = math.inf
        if self._handshakes:
            soonest = self._handshakes[0][0]
        if self._idle:
            soonest = min(soonest, self._idle[0][0])
        if self.idle_timeout is not None:
            # A pool thread may park a connection at any moment: its deadline
            # is at least this far away, so waking by then is never late.
            soonest = min(soonest, time.monotonic() + self.idle_timeout)
        return soonest - time.monotonic()

    def any_due(self, now: float) -> bool:
        """Whether :meth:`due` may find something (cheap: no lock, no list)."""
        handshakes, idle = self._handshakes, self._idle
        return bool((handshakes and handshakes[0][0] <= now) or (idle and idle[0][0] <= now))

    def due(self, now: float) -> tuple[list[ServerConnection], list[ServerConnection]]:
        """The connections whose time is up: ``(slow handshakes, idle parked ones)``.

        Slow handshakes may be held by a pool thread (a client trickling its
        bytes in); the idle ones are all parked.
        """
        slow = []
        handshakes = self._handshakes
        while handshakes and handshakes[0][0] <= now:
            conn = handshakes.popleft()[1]()
            if conn is not None and conn.stage != AUTHENTICATED and conn.state != CLOSED:
                slow.append(conn)
        idle = []
        with self._lock:
            heap = self._idle
            while heap and heap[0][0] <= now:
                _, _, ref = heapq.heappop(heap)
                conn = ref()
                if conn is None:
                    continue
                if conn.state == PARKED and conn.deadline > now:
                    heapq.heappush(heap, (conn.deadline, next(self._order), ref))
                    continue
                conn.timed = False
                if conn.state == PARKED:
                    idle.append(conn)
        return slow, idle
