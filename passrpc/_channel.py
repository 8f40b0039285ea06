"""Channel: whole messages, with their descriptors, over one connected Unix socket."""

from __future__ import annotations

import array
import contextlib
import errno
import socket
import struct
import threading
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any, NoReturn

import attrs

from ._decoder import Decoder
from ._errors import ConnectionClosed, EncodeError, FrameTooLarge, ProtocolError, Timeout
from ._fd import FileDescriptor
from ._protocol import OutOfStep, message_values
from ._types import TypeRegistry
from ._wire import DEFAULT_LIMITS, Buffer, Encoder, Kind, Limits, WireOptions, wire_options

_MESSAGE = int(Kind.MESSAGE)
# Plain ints: the socket module's flags are enums, and enum arithmetic is slow
# on a path that runs for every message.
_SOL_SOCKET = int(socket.SOL_SOCKET)
_SCM_RIGHTS = int(socket.SCM_RIGHTS)
_NOSIGNAL = int(socket.MSG_NOSIGNAL)
_CLOEXEC = int(socket.MSG_CMSG_CLOEXEC)
_NOWAIT = _CLOEXEC | int(socket.MSG_DONTWAIT)
CTRUNC = int(socket.MSG_CTRUNC)
_PEERCRED = struct.Struct("3i")
_INT_SIZE = array.array("i").itemsize
# One descriptor, the usual case, packs and unpacks faster with struct than
# with array.array.
_ONE_FD = struct.Struct("i")
_pack_fd = _ONE_FD.pack
_unpack_fd = _ONE_FD.unpack


#: errno values that mean the peer is gone rather than that we misused the socket.
_GONE = frozenset(
    {errno.EPIPE, errno.ECONNRESET, errno.ECONNABORTED, errno.ENOTCONN, errno.ESHUTDOWN}
)


@attrs.frozen
class Peer:
    """Who is at the other end of a connection, as the kernel vouches (``SO_PEERCRED``).

    ``pid``, ``uid`` and ``gid`` are those of the process that connected (or
    listened), taken at connect time. A handler reads them with
    :func:`passrpc.current_peer` for its own authorization and audit.
    """

    pid: int
    uid: int
    gid: int


def peer_of(sock: socket.socket) -> Peer:
    """Return the kernel's credentials of the process at the other end of ``sock``."""
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    return Peer(*_PEERCRED.unpack(data))


class DescriptorBudget:
    """How many received descriptors may wait for the rest of their frame, over many channels.

    A server shares one among its connections (see
    :meth:`Channel.share_descriptor_budget`), so that clients that announce
    frames with descriptors and never finish them cannot, together, fill
    its descriptor table. Thread-safe.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def take(self, count: int) -> bool:
        """Charge ``count`` descriptors; False (and nothing charged) if that would pass the limit."""
        with self._lock:
            if self.used + count > self.limit:
                return False
            self.used += count
            return True

    def give(self, count: int) -> None:
        """Give back ``count`` charged descriptors."""
        with self._lock:
            self.used -= count


class SocketEnd:
    """What every channel (this one and the asyncio one) says about its socket."""

    _sock: socket.socket
    _closed: bool

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran (or the channel closed itself after a broken frame)."""
        return self._closed

    @property
    def peer(self) -> Peer:
        """The credentials of the process at the other end (see :class:`Peer`)."""
        return peer_of(self._sock)

    def fileno(self) -> int:
        """Return the socket's descriptor number, for ``select``/``poll``."""
        return self._sock.fileno()


class Channel(SocketEnd):
    """One connected Unix stream socket that carries whole messages and descriptors.

    ``write(*values)`` sends one message; ``read()`` returns the next one as a
    tuple of values. Objects with ``fileno()`` in an outgoing message travel
    as descriptors (the peer gets a copy; yours stay open); received ones come
    back as :class:`FileDescriptor`. Instances of registered classes travel
    as themselves (:func:`passrpc.register_type`). An error frame from the
    peer is raised by ``read()`` as the matching :class:`Error`. A channel is
    for one thread at a time; ``close()`` may come from any.

    Args:
        sock: a connected ``AF_UNIX`` ``SOCK_STREAM`` socket; the channel owns it.
        timeout: seconds a read or write may block, or None to wait forever.
        limits: what the peer may send (:class:`Limits`).
        types: the :class:`TypeRegistry` of the classes that travel; None for
            the default one (what :func:`passrpc.register_type` fills).
        wire: every wire option at once, for passrpc's own layers (it
            overrides ``limits`` and ``types``).
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        timeout: float | None = None,
        limits: Limits = DEFAULT_LIMITS,
        types: TypeRegistry | None = None,
        wire: WireOptions | None = None,
    ) -> None:
        if wire is None:
            wire = wire_options(limits, types)
        self._sock = sock
        self._wire = wire
        #: The :class:`TypeRegistry` this channel encodes and decodes with.
        self.types = wire.types
        self._max_fds = max_fds = wire.limits.max_fds
        self._encoder = Encoder(wire)
        self._decoder = Decoder(wire)
        self._ancbufsize = socket.CMSG_SPACE(max_fds * 4) if max_fds else 0
        self._closed = False
        self._late = False  # a read timed out: call() is no longer safe
        sock.settimeout(timeout)
        # Bound once: the read and write paths below run for every message.
        self._encode = self._encoder.encode
        self._sendall = sock.sendall
        self._recvmsg_into = sock.recvmsg_into

    @classmethod
    def pair(
        cls,
        *,
        timeout: float | None = None,
        limits: Limits = DEFAULT_LIMITS,
        types: TypeRegistry | None = None,
    ) -> tuple[Channel, Channel]:
        """Return two channels joined by a fresh ``socketpair()``: handy for a forked child."""
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        wire = wire_options(limits, types)
        return cls(a, timeout=timeout, wire=wire), cls(b, timeout=timeout, wire=wire)

    @property
    def timeout(self) -> float | None:
        """Seconds a read or write may block before :class:`Timeout`; None waits forever."""
        return self._sock.gettimeout()

    @timeout.setter
    def timeout(self, value: float | None) -> None:
        self._sock.settimeout(value)

    def write(self, *values: Any) -> None:
        """Send one message made of ``values``.

        Raises:
            EncodeError: a value cannot travel; nothing was sent.
            FrameTooLarge: the message is over the limit; nothing was sent.
            ConnectionClosed: the peer has gone, or the OS refused the send
                (the message says which); the channel is unusable.
            Timeout: the peer did not take the bytes in time; the channel is
                closed, since part of a frame may have gone out.
        """
        self.send_frame(_MESSAGE, values)

    def read(self) -> tuple[Any, ...]:
        """Wait for the next message and return its values as a tuple.

        Raises:
            ConnectionClosed: the peer closed the connection (or it broke).
            Timeout: no whole message within the timeout; the channel stays
                usable, and a later read returns the message when it comes.
                That message may be the late reply to an earlier request: for
                request and reply, use :meth:`call`, which never mixes them up.
            RemoteError, UnknownMessage, AuthenticationError: the peer sent an
                error frame instead of a message.
            DecodeError: the message holds a value that cannot be rebuilt; it
                was skipped, and the channel stays usable.
            ProtocolError: the peer broke the protocol; the channel is closed.
        """
        kind, payload = self.receive_frame()
        if kind == _MESSAGE and type(payload) is list:
            return tuple(payload)
        try:
            return message_values(kind, payload, self.types)
        except OutOfStep:
            self.close()
            raise

    def call(self, *values: Any) -> tuple[Any, ...]:
        """Send one message and return the peer's reply: request and reply, kept in step.

        If the reply does not come within the timeout, the channel is closed
        (as a proxy discards its connection), so that a late reply can never
        be taken for the answer to a later request; open a new channel to go
        on. A channel whose :meth:`read` timed out earlier is refused, for the
        same reason.

        Raises:
            Timeout: no reply within the timeout; the channel is closed.
            ProtocolError: an earlier read on this channel timed out; its
                reply may still be on its way.
            and what :meth:`write` and :meth:`read` raise.
        """
        if self._late:
            raise ProtocolError(
                "an earlier read on this channel timed out, and its reply may still come: "
                "call() on it could return that reply; open a new channel"
            )
        self.send_frame(_MESSAGE, values)
        try:
            return self.read()
        except Timeout:
            self.close()
            raise

    # The frame level: what passrpc's own layers (the handshake, the server's
    # dispatch, the proxies) speak; most code wants read() and write().

    def send_frame(self, kind: int, payload: Any) -> None:
        """Send one frame of ``kind`` (see ``docs/protocol.md``); raises as :meth:`write`."""
        buffers, fds = self._encode(kind, payload)
        try:
            if fds or len(buffers) > 1:
                self._send_buffers(buffers, fds)
            else:
                self._sendall(buffers[0], _NOSIGNAL)
        except OSError as exc:
            self._raise(exc, "sending", fds)

    def _send_buffers(self, buffers: Sequence[Buffer], fds: Sequence[int]) -> None:
        """Send a frame in pieces, its descriptors with the first byte."""
        # One descriptor, the usual case, without scm_rights' call.
        ancillary = (
            [(_SOL_SOCKET, _SCM_RIGHTS, _pack_fd(fds[0]))] if len(fds) == 1 else scm_rights(fds)
        )
        sent = self._sock.sendmsg(buffers, ancillary, _NOSIGNAL)
        if len(buffers) == 1 and sent == len(buffers[0]):
            return  # the usual case: the whole frame went out at once
        rest = unsent(buffers, sent)
        while rest:  # a signal or a timeout cut the send short: the rest, without descriptors
            rest = unsent(rest, self._sock.sendmsg(rest, [], _NOSIGNAL))

    def receive_frame(self, deadline: float | None = None) -> tuple[int, Any]:
        """Return the next frame as ``(kind, payload)``; raises as :meth:`read`, but for error frames.

        With ``deadline`` (a ``time.monotonic()`` value) the whole read is
        bounded, however slowly the peer trickles its bytes in.
        """
        decoder = self._decoder
        try:
            # The read path of every message. The decoder's fill mark (end) is
            # 0 when it holds nothing: then its whole buffer (view) is the
            # place to read into, and asking it for a frame first is pointless.
            if decoder.end == 0:
                buffer = decoder.view
            else:
                frame = decoder.next_frame()
                if frame is not None:
                    return frame
                buffer = decoder.get_buffer()
            while True:
                if deadline is not None:  # a bound for the frame, not for each read of it
                    self._sock.settimeout(max(deadline - time.monotonic(), 0.001))
                try:
                    nbytes, ancillary, flags, _ = self._recvmsg_into(
                        [buffer], self._ancbufsize, _CLOEXEC
                    )
                except OSError as exc:
                    self._raise(exc, "receiving")
                # Linux echoes MSG_CMSG_CLOEXEC in flags; only MSG_CTRUNC matters.
                if ancillary or flags & CTRUNC or not nbytes:
                    # Descriptors, a truncation or end of stream: off the hot path.
                    take_ancillary(decoder, nbytes, ancillary, flags, self._max_fds)
                    frame = decoder.next_frame()
                else:
                    frame = decoder.next_frame(nbytes)
                if frame is not None:
                    return frame
                buffer = decoder.get_buffer()
        except ProtocolError:
            self.close()
            raise

    def receive_waiting(self, hurry: object) -> tuple[int, Any] | None:
        """Return the next frame, or None when none is whole and the socket has no more for now.

        For a server that parks idle connections (see :mod:`passrpc._loop`).
        Before each read it asks whether ``hurry`` is true (the server passes
        its queue of connections that wait for a thread): if not, the read
        blocks as the socket does (until bytes come, or for the receive
        timeout set on it with ``SO_RCVTIMEO``); if so, it takes only what is
        there (``MSG_DONTWAIT``). The bytes of an unfinished frame stay
        buffered for the next call. Raises as :meth:`receive_frame`; a
        timeout set with :attr:`timeout` still raises :class:`Timeout`.
        """
        decoder = self._decoder
        try:
            # receive_frame's read path, but for the flags and "nothing now".
            if decoder.end == 0:
                buffer = decoder.view
            else:
                frame = decoder.next_frame()
                if frame is not None:
                    return frame
                buffer = decoder.get_buffer()
            while True:
                try:
                    nbytes, ancillary, flags, _ = self._recvmsg_into(
                        [buffer], self._ancbufsize, _NOWAIT if hurry else _CLOEXEC
                    )
                except BlockingIOError:
                    return None
                except OSError as exc:
                    self._raise(exc, "receiving")
                if ancillary or flags & CTRUNC or not nbytes:
                    take_ancillary(decoder, nbytes, ancillary, flags, self._max_fds)
                    frame = decoder.next_frame()
                else:
                    frame = decoder.next_frame(nbytes)
                if frame is not None:
                    return frame
                buffer = decoder.get_buffer()
        except ProtocolError:
            self.close()
            raise

    def release_buffer(self) -> None:
        """Let go of the receive buffer while no byte of a frame waits in it (an idle connection).

        Call :meth:`reserve_buffer` before the next read.
        """
        self._decoder.release_buffer()

    def reserve_buffer(self) -> None:
        """Make the receive buffer that :meth:`release_buffer` let go of."""
        self._decoder.reserve_buffer()

    def _raise(self, exc: OSError, doing: str, fds: Sequence[int] = ()) -> NoReturn:
        if isinstance(exc, TimeoutError):
            if doing == "sending":  # part of a frame may be out: the stream is unusable
                self.close()
            else:
                self._late = True  # what comes next may answer an earlier request
            raise Timeout(
                f"{doing} a message took longer than the timeout of {self.timeout} s"
            ) from exc
        raise os_error(exc, doing, self._closed, fds) from exc

    def cap_frame_size(self, size: int | None, *, last_step: bool = False) -> None:
        """Take frames of at most ``size`` bytes, and no descriptor, from the next one on.

        For a peer that has not authenticated yet (see :mod:`passrpc._auth`):
        a descriptor it sends breaks the channel at once, unless ``last_step``
        and the peer's last handshake frame has arrived whole (a request sent
        right behind it may carry descriptors). None lifts both caps.
        """
        self._decoder.cap_frame_size(size, last_step=last_step)

    def share_descriptor_budget(self, budget: DescriptorBudget) -> None:
        """Charge descriptors waiting for the rest of their frame to ``budget``, shared with others."""
        self._decoder.share_budget(budget)

    def shutdown(self) -> None:
        """End the connection itself, for every process that holds it; then :meth:`close`.

        A read or write blocked in another thread fails at once with
        :class:`ConnectionClosed` (``close()`` alone does not wake it on
        Linux). Do not call it on a channel a forked child shares with its
        parent unless you mean to end the connection for both.
        """
        if not self._closed:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
        self.close()

    def close(self) -> None:
        """Close this process's socket and every received descriptor nobody claimed; idempotent.

        Another process that shares the socket (a fork) keeps its copy and
        the connection. To end the connection itself, see :meth:`shutdown`.
        """
        if not self._closed:
            self._closed = True
            self._decoder.close()
            self._sock.close()

    def __enter__(self) -> Channel:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"fd={self._sock.fileno()}"
        return f"<passrpc.Channel {state}>"


_adopt = FileDescriptor._adopt  # the kernel's numbers need no checking


def _descriptors(ancillary: list[tuple[int, int, bytes]]) -> list[FileDescriptor]:
    """Take ownership of every descriptor in ``ancillary`` at once."""
    if len(ancillary) == 1:  # the usual case, one message of SCM_RIGHTS: no loop
        level, kind, data = ancillary[0]
        if len(data) == _INT_SIZE and level == _SOL_SOCKET and kind == _SCM_RIGHTS:
            return [_adopt(_unpack_fd(data)[0])]
    fds: list[FileDescriptor] = []
    for level, kind, data in ancillary:
        if level == _SOL_SOCKET and kind == _SCM_RIGHTS:
            if len(data) % _INT_SIZE:  # cut short by MSG_CTRUNC: whole numbers only
                data = data[: len(data) - len(data) % _INT_SIZE]
            numbers = _ONE_FD.unpack(data) if len(data) == _INT_SIZE else array.array("i", data)
            fds += map(_adopt, numbers)
    return fds


def scm_rights(fds: Sequence[int]) -> list[tuple[int, int, bytes | array.array[int]]]:
    """The ancillary data that sends ``fds`` (none: an empty list)."""
    if not fds:
        return []
    data = _ONE_FD.pack(fds[0]) if len(fds) == 1 else array.array("i", fds)
    return [(_SOL_SOCKET, _SCM_RIGHTS, data)]


def take_ancillary(
    decoder: Decoder,
    nbytes: int,
    ancillary: list[tuple[int, int, bytes]],
    flags: int,
    max_fds: int,
) -> None:
    """Hand one ``recvmsg`` result that carried descriptors, a truncation or end of stream to ``decoder``.

    Shared by :class:`Channel` and the asyncio channel. Descriptors that cannot
    be delivered (truncated, or arriving with end of stream) are closed here.

    Raises:
        FrameTooLarge: the peer sent more descriptors than ``max_fds``.
        ConnectionClosed: end of stream (``nbytes`` is 0).
    """
    fds = _descriptors(ancillary) if ancillary else []
    if flags & CTRUNC:
        for fd in fds:
            fd.close()
        raise FrameTooLarge(
            "descriptors that came with a message did not fit: the peer sent more than "
            f"this side's limit of {max_fds} (raise Limits.max_fds, or send fewer), or this "
            "process has no descriptor numbers left (see ulimit -n); those that came were closed"
        )
    if not nbytes:
        for fd in fds:
            fd.close()
        where = " in the middle of a message" if decoder.pending else ""
        raise ConnectionClosed(f"the peer closed the connection{where}")
    decoder.buffer_updated(nbytes, fds)


def os_error(
    exc: OSError,
    doing: str,
    closed: bool,
    fds: Sequence[int] = (),
    gone: type[ConnectionClosed] = ConnectionClosed,
) -> EncodeError | ConnectionClosed:
    """The passrpc error for an ``OSError`` (not a timeout) from sending or receiving.

    Args:
        exc: what the socket call raised.
        doing: "sending" or "receiving", for the message.
        closed: whether this side had closed the channel (its socket).
        fds: the descriptors of a send whose first bytes had not gone out: a
            bad one is the caller's mistake (EncodeError), not a broken link.
        gone: the class for "the peer has gone" (the asyncio client uses a
            subclass that says the frame never left).
    """
    if closed:
        return ConnectionClosed("this channel was closed; open a new connection")
    if fds and exc.errno == errno.EBADF:
        return EncodeError(
            f"a descriptor in the message ({list(fds)}) is not open; nothing was sent"
        )
    if exc.errno in _GONE:
        return gone(f"the peer closed the connection ({exc.strerror})")
    return ConnectionClosed(f"{doing} failed: {exc}; the connection is unusable")


def unsent(buffers: Sequence[Buffer], sent: int) -> list[memoryview]:
    """What is left of ``buffers`` once their first ``sent`` bytes went out."""
    rest: list[memoryview] = []
    for buffer in buffers:
        size = len(buffer) if not isinstance(buffer, memoryview) else buffer.nbytes
        if sent >= size:
            sent -= size
            continue
        rest.append(memoryview(buffer).cast("B")[sent:])
        sent = 0
    return rest
