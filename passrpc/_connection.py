"""One client's connection as the server holds it, from accept to close.

A connection costs a thread only while it has work. The server's poller
(:mod:`passrpc._loop`) drives its handshake one frame at a time as the bytes
arrive, never blocking, over the pure steps of :mod:`passrpc._handshake`.
Once the client has proved it knows the password, a pool thread serves its
requests for as long as they keep coming, and parks it in the poller,
without a receive buffer, when they stop.

Its ``state`` says who holds it, and who may move it on:

======== ======================================== ======================
state    where it is                              moved on by
======== ======================================== ======================
HELLO    the poller waits for the client's hello  the poller
PROOF    the poller waits for the client's proof  the poller
QUEUED   readable, waiting for a pool thread      the pool thread
SERVING  a pool thread serves its requests        that thread
PARKED   idle in the poller: no thread, no buffer the poller
CLOSED   gone                                     nobody
======== ======================================== ======================
"""

from __future__ import annotations

import contextlib
import math
import socket
import struct
from collections.abc import Callable, Collection

from ._auth import check_uid
from ._channel import Channel, DescriptorBudget, Peer
from ._dispatch import Dispatcher, RawCall
from ._errors import AuthenticationError, ConnectionClosed, Timeout
from ._handshake import (
    HANDSHAKE_MAX_FRAME,
    ServerHandshake,
    client_proof,
    handshake_payload,
    refusal,
)
from ._protocol import HANDSHAKE
from ._wire import WireOptions

HELLO, PROOF, QUEUED, SERVING, PARKED, CLOSED = range(6)

#: Seconds a pool thread waits for a connection's next request before it
#: parks the connection (while no other connection waits for a thread; with
#: one waiting, it parks at once). A client that calls again within this
#: keeps its thread and pays no hand-off; one that pauses longer costs a
#: wake-up of the poller and of a thread (tens of microseconds). 5 ms covers
#: a client's own work between calls in a tight loop, and a thread that
#: waits in vain is held no longer than a scheduler tick or two.
LINGER = 0.005

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
    """One client's connection on the server: its channel, its state, and the steps that move it.

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
        "fd",
        "peer",
        "sock",
        "state",
        "timed",
    )

    def __init__(self, sock: socket.socket, wire: WireOptions, budget: DescriptorBudget) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.channel = channel = Channel(sock, wire=wire)
        channel.share_descriptor_budget(budget)
        # Until the client has proved it knows the password it may not make
        # this process set aside (or decode) more than a handshake frame.
        channel.cap_frame_size(HANDSHAKE_MAX_FRAME)
        self.state = HELLO
        self.peer: Peer | None = None
        #: When the poller closes it if still parked (client_idle_timeout), and
        #: whether it is in the poller's heap of such deadlines.
        self.deadline = math.inf
        self.timed = False
        self._steps: ServerHandshake | None = None

    def who(self) -> str:
        """The peer for a log line: its pid and uid, as the kernel told them at accept."""
        peer = self.peer
        return "a peer that is gone" if peer is None else f"pid {peer.pid} uid {peer.uid}"

    def greet(self, key: bytes, allowed_uids: Collection[int]) -> None:
        """Check the client's uid, before reading a byte from it.

        Raises:
            AuthenticationError: a uid that is not allowed (the client was told why).
            OSError: the client is already gone.
        """
        self.peer = peer = self.channel.peer
        try:
            check_uid(peer, allowed_uids, "client")
        except AuthenticationError as exc:
            self._refuse(exc)
            raise
        self._steps = ServerHandshake(key)

    def advance(self) -> bool:
        """Take the handshake as far as the frames that have arrived allow; never blocks.

        Returns:
            True once the client has proved it knows the password (a request
            it sent right behind its proof stays buffered for :meth:`serve`);
            False while the next step has not arrived whole.

        Raises:
            AuthenticationError: another protocol version or a wrong proof
                (the client was told why).
            ProtocolError, ConnectionClosed: a malformed step, or a client gone.
        """
        channel = self.channel
        steps = self._steps
        assert steps is not None
        channel.reserve_buffer()
        try:
            while (frame := channel.receive_waiting(False)) is not None:
                if self.state == HELLO:
                    hello = handshake_payload(*frame, from_server=False)
                    channel.send_frame(HANDSHAKE, steps.challenge(hello))
                    # The client may send its first request, descriptors and all,
                    # right behind its proof: those are taken, but only once the
                    # proof is whole.
                    channel.cap_frame_size(HANDSHAKE_MAX_FRAME, last_step=True)
                    self.state = PROOF
                else:
                    steps.verify(client_proof(*frame))
                    channel.cap_frame_size(None)
                    self._steps = None
                    return True
        except AuthenticationError as exc:
            self._refuse(exc)
            raise
        channel.release_buffer()
        return False

    def _refuse(self, exc: AuthenticationError) -> None:
        with contextlib.suppress(ConnectionClosed, Timeout):
            self.channel.send_frame(*refusal(exc))

    def authenticated(self, idle_timeout: float | None) -> None:
        """Set the socket up for pool threads: reads wait :data:`LINGER` for a next request.

        The receive timeout lives in the kernel (``SO_RCVTIMEO``), so that the
        read of every request stays one system call on a blocking socket.
        ``idle_timeout`` bounds a send to a client that does not read.
        """
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _LINGER)
        if idle_timeout is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval(idle_timeout))

    def serve(
        self, dispatcher: Dispatcher, nobody_waits: Callable[[], bool], idle_timeout: float | None
    ) -> bool:
        """Serve the client's requests while they keep coming, in a pool thread.

        Returns:
            True to park the connection (its receive buffer is let go of);
            False when it is over (the caller closes it).
        """
        channel = self.channel
        channel.reserve_buffer()
        while True:
            outcome = dispatcher.serve(channel, self.peer, nobody_waits)  # type: ignore[arg-type]
            if outcome is True:
                channel.release_buffer()
                return True
            if outcome is False or not self._converse(outcome, idle_timeout):
                return False

    def _converse(self, call: RawCall, idle_timeout: float | None) -> bool:
        """Run a raw handler, which keeps this thread while it converses; False when it is over.

        It reads and writes on the channel as any channel does, waiting up to
        ``idle_timeout`` (the server's ``client_idle_timeout``) for the client.
        """
        channel = self.channel
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
        self.channel.close()
