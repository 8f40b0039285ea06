"""The asyncio channel: whole messages and descriptors over a non-blocking Unix socket.

The coroutine twin of :class:`passrpc.Channel`, over the same pure pieces
(:class:`~passrpc._wire.Encoder`, :class:`~passrpc._decoder.Decoder`, the
handshake steps of :mod:`passrpc._handshake`): the socket is watched with
``loop.add_reader`` / ``loop.add_writer``. :func:`open_async_channel`
connects and authenticates, as :func:`passrpc._auth.open_channel` does for
the blocking client. The connection pool and the proxy are in
:mod:`passrpc.aio`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import weakref
from collections.abc import Collection, Sequence
from types import TracebackType
from typing import Any, Protocol, TypeVar

from ._auth import backoff, check_server_uid, connect_once
from ._channel import CTRUNC, SocketEnd, os_error, scm_rights, take_ancillary, unsent
from ._clientcore import generation
from ._decoder import Decoder
from ._errors import AuthenticationError, ConnectionClosed, ProtocolError
from ._handshake import HANDSHAKE_MAX_FRAME, ClientHandshake, handshake_payload, refusal
from ._protocol import HANDSHAKE, MESSAGE, OutOfStep, message_values
from ._types import TypeRegistry
from ._wire import DEFAULT_LIMITS, Buffer, Encoder, Limits, WireOptions, wire_options

_NOSIGNAL = socket.MSG_NOSIGNAL
_CLOEXEC = socket.MSG_CMSG_CLOEXEC

_UNSET: Any = object()


class Expired(Exception):
    """A deadline passed while waiting on a socket; callers turn it into :class:`Timeout`."""


def _wake(waiter: asyncio.Future[None]) -> None:
    # A level-triggered selector may call this again before the waiting task
    # has run and unregistered: only the first call counts.
    if not waiter.done():
        waiter.set_result(None)


def expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(Expired())


def _readable(ref: weakref.ref[AsyncChannel]) -> None:
    channel = ref()
    if channel is not None:
        channel._on_readable()


class NotDelivered(ConnectionClosed):
    """The peer was gone before any byte of the frame left: sending it elsewhere is safe."""


_Closable = TypeVar("_Closable", bound="AsyncClosing")


class AsyncClosing:
    """``await aclose()`` and ``async with`` for an object whose ``close()`` is synchronous."""

    def close(self) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        """Close it: the same as ``close()``, for symmetry with other asyncio objects."""
        self.close()

    async def __aenter__(self: _Closable) -> _Closable:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncChannel(SocketEnd, AsyncClosing):
    """One connected Unix socket that carries whole messages and descriptors, for asyncio.

    The coroutine twin of :class:`passrpc.Channel`: ``await write(*values)``
    sends one message, ``await read()`` returns the next one as a tuple; objects
    with ``fileno()`` travel as descriptors, received ones come back as
    :class:`passrpc.FileDescriptor`, and an error frame is raised by ``read()``.
    You get one from a raw handler's proxy method. Bound a read or write with
    ``asyncio.wait_for`` or ``asyncio.timeout``: a cancelled read leaves the
    channel usable (bytes already received stay buffered); a write cancelled
    after part of its frame went out closes the channel. One task may read
    while another writes (a second concurrent reader or writer gets
    ``RuntimeError``); call ``close()`` from the loop's thread.

    Args:
        sock: a connected ``AF_UNIX`` ``SOCK_STREAM`` socket; the channel owns it
            and makes it non-blocking.
        limits: what the peer may send (:class:`passrpc.Limits`).
        types: the :class:`passrpc.TypeRegistry` of the classes that travel;
            None for the default one.
        wire: every wire option at once, for passrpc's own layers (it
            overrides ``limits`` and ``types``).
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        limits: Limits = DEFAULT_LIMITS,
        types: TypeRegistry | None = None,
        wire: WireOptions | None = None,
    ) -> None:
        if wire is None:
            wire = wire_options(limits, types)
        sock.setblocking(False)
        self._sock = sock
        self._fd = sock.fileno()
        self._max_fds = max_fds = wire.limits.max_fds
        #: The :class:`passrpc.TypeRegistry` this channel encodes and decodes with.
        self.types = wire.types
        self._encoder = Encoder(wire)
        self._decoder = Decoder(wire)
        self._ancbufsize = socket.CMSG_SPACE(max_fds * 4) if max_fds else 0
        self._closed = False
        self._generation = generation[0]  # the process that opened it
        # One task at a time may send, and one receive: frames must not interleave.
        self._sending = self._receiving = False
        # The loop the socket is registered with for reading, and the waiting reader.
        self._read_loop: asyncio.AbstractEventLoop | None = None
        self._read_waiter: asyncio.Future[None] | None = None
        self._unattended = 0  # readable events in a row with nobody waiting
        # (loop, waiter) of a task waiting for room to write.
        self._writer: tuple[asyncio.AbstractEventLoop, asyncio.Future[None]] | None = None

    async def write(self, *values: Any) -> None:
        """Send one message made of ``values``.

        Raises:
            EncodeError: a value cannot travel; nothing was sent.
            FrameTooLarge: the message is over the limit; nothing was sent.
            ConnectionClosed: the peer has gone, or the channel was closed.
        """
        await self.send_frame(MESSAGE, values, None)

    async def read(self) -> tuple[Any, ...]:
        """Wait for the next message and return its values as a tuple.

        Raises:
            ConnectionClosed: the peer closed the connection (or it broke).
            RemoteError, UnknownMessage, AuthenticationError: the peer sent an
                error frame instead of a message.
            DecodeError: the message holds a value that cannot be rebuilt; it
                was skipped, and the channel stays usable.
            ProtocolError: the peer broke the protocol; the channel is closed.
        """
        kind, payload = await self.receive_frame(None)
        try:
            return message_values(kind, payload, self.types)
        except OutOfStep:
            self.close()
            raise

    # Waiting ----------------------------------------------------------------
    #
    # Reading: the socket stays registered with the loop between reads, so a
    # call costs no epoll_ctl pair. The callback wakes the task that waits.
    # When nobody waits it may be a stale event (the loop polled before the
    # woken reader ran and drained the socket) or real data nobody will read
    # soon (an idle connection the server closed, a late reply after a
    # cancelled read). A level-triggered selector repeats the latter on every
    # iteration, so a second call in a row with nobody waiting unregisters.
    # Writing waits only when the send buffer is full, which is rare: it
    # registers for that one wait.

    def _on_readable(self) -> None:
        waiter = self._read_waiter
        if waiter is None:
            self._unattended += 1
            if self._unattended > 1:
                self._stop_reading()
        elif not waiter.done():
            waiter.set_result(None)

    def _stop_reading(self) -> None:
        loop, self._read_loop = self._read_loop, None
        if loop is not None and not loop.is_closed():  # a closed loop dropped its selector
            loop.remove_reader(self._fd)

    async def _wait_readable(self, deadline: float | None) -> None:
        """Wait until the socket is readable, or raise Expired at ``deadline``."""
        if self._closed:
            raise ConnectionClosed("this channel was closed; open a new connection")
        loop = asyncio.get_running_loop()
        if self._read_loop is not loop:
            self._stop_reading()
            # A weak reference: a channel nobody holds can be collected (and
            # its __del__ unregister it) even while it is registered.
            loop.add_reader(self._fd, _readable, weakref.ref(self))
            self._read_loop = loop
        waiter: asyncio.Future[None] = loop.create_future()
        self._read_waiter = waiter
        self._unattended = 0
        timer = None if deadline is None else loop.call_at(deadline, expire, waiter)
        try:
            await waiter
        finally:
            if timer is not None:
                timer.cancel()
            if self._read_waiter is waiter:
                self._read_waiter = None

    async def _wait_writable(self, deadline: float | None) -> None:
        """Wait until the socket is writable, or raise Expired at ``deadline``."""
        if self._closed:
            raise ConnectionClosed("this channel was closed; open a new connection")
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        loop.add_writer(self._fd, _wake, waiter)
        self._writer = (loop, waiter)
        timer = None if deadline is None else loop.call_at(deadline, expire, waiter)
        try:
            await waiter
        finally:
            if timer is not None:
                timer.cancel()
            if self._writer is not None and self._writer[1] is waiter:
                self._stop_writing()

    def _stop_writing(self) -> asyncio.Future[None] | None:
        """Unregister the waiting writer from its loop; return its waiter."""
        if self._writer is None:
            return None
        (loop, waiter), self._writer = self._writer, None
        if not loop.is_closed():
            loop.remove_writer(self._fd)
        return waiter

    # Sending ----------------------------------------------------------------

    async def send_frame(self, kind: int, payload: Any, deadline: float | None) -> None:
        """Encode and send one frame, all before ``deadline`` (the loop's time); see :meth:`send_encoded`."""
        buffers, fds = self._encoder.encode(kind, payload)
        await self.send_encoded(buffers, fds, deadline)

    async def send_encoded(
        self, buffers: Sequence[Buffer], fds: list[int], deadline: float | None
    ) -> None:
        """Send one encoded frame, its descriptors with the first bytes.

        Raises:
            NotDelivered: the peer was gone before any byte left.
            ConnectionClosed: the peer went away, or the channel was closed.
            EncodeError: a descriptor is not open; nothing was sent.
            Expired: ``deadline`` passed; the channel is closed if part went out.
        """
        if self._closed:
            raise ConnectionClosed("this channel was closed; open a new connection")
        if self._sending:
            raise RuntimeError("another task is writing to this channel; write from one at a time")
        self._sending = True
        rest: Sequence[Buffer] = buffers
        sent = 0
        try:
            while True:
                try:
                    if sent == 0:
                        sent = self._sock.sendmsg(buffers, scm_rights(fds), _NOSIGNAL)
                        rest = unsent(buffers, sent)
                    else:
                        n = self._sock.sendmsg(rest, [], _NOSIGNAL)
                        sent += n
                        rest = unsent(rest, n)
                except BlockingIOError:
                    await self._wait_writable(deadline)
                    continue
                except OSError as exc:
                    if sent:
                        raise os_error(exc, "sending", self._closed) from exc
                    # Nothing left yet: a bad descriptor is the caller's, and a
                    # peer that is gone never got the frame.
                    raise os_error(exc, "sending", self._closed, fds, NotDelivered) from exc
                if not rest:
                    return
                await self._wait_writable(deadline)  # the send buffer is full: wait for room
        except BaseException:
            if sent and rest:
                self.close()  # half a frame is out: the stream is unusable
            raise
        finally:
            self._sending = False

    # Receiving --------------------------------------------------------------

    async def receive_frame(
        self, deadline: float | None, *, wait_first: bool = False
    ) -> tuple[int, Any]:
        """Return the next frame as ``(kind, payload)``.

        ``wait_first`` skips the first read attempt when nothing can be there
        yet (right after sending a request), saving a system call.
        """
        if self._receiving:
            raise RuntimeError("another task is reading from this channel; read from one at a time")
        self._receiving = True
        decoder = self._decoder
        try:
            frame = decoder.next_frame()
            ready = not wait_first
            while frame is None:
                ready = await self._fill(deadline, ready)
                frame = decoder.next_frame()
        except ProtocolError:
            self.close()
            raise
        finally:
            self._receiving = False
        return frame

    async def _fill(self, deadline: float | None, ready: bool) -> bool:
        """Read once into the decoder; return whether more may be waiting already."""
        buffer = self._decoder.get_buffer()
        while True:
            if not ready:
                await self._wait_readable(deadline)
            if self._closed:
                raise ConnectionClosed("this channel was closed; open a new connection")
            try:
                nbytes, ancillary, flags, _ = self._sock.recvmsg_into(
                    [buffer], self._ancbufsize, _CLOEXEC
                )
                break
            except BlockingIOError:
                ready = False
            except OSError as exc:
                raise os_error(exc, "receiving", self._closed) from exc
        if ancillary or flags & CTRUNC or not nbytes:
            take_ancillary(self._decoder, nbytes, ancillary, flags, self._max_fds)
        else:
            self._decoder.buffer_updated(nbytes)
        return nbytes == len(buffer)

    # Closing ----------------------------------------------------------------

    def close(self) -> None:
        """Close the socket and every received descriptor nobody claimed; idempotent.

        A task waiting on the channel gets :class:`passrpc.ConnectionClosed`.
        """
        if self._closed:
            return
        self._closed = True
        # Unregister before closing: the selector must not keep a number that
        # the next socket opened may get.
        self._stop_reading()
        reader, self._read_waiter = self._read_waiter, None
        for waiter in (reader, self._stop_writing()):
            if waiter is not None and not waiter.done() and not waiter.get_loop().is_closed():
                waiter.set_exception(
                    ConnectionClosed("the connection was closed while a task waited on it")
                )
        self._decoder.close()
        self._sock.close()

    def abandon(self) -> None:
        """Close this process's copy after a fork, leaving the (shared) selector alone."""
        self._closed = True
        self._read_loop = self._read_waiter = self._writer = None
        self._decoder.close()
        self._sock.close()

    def __del__(self) -> None:
        # Unreachable means no task waits on it. Unregister from the loop unless
        # this is a forked child's copy (the selector is shared with the parent).
        if getattr(self, "_closed", True):
            return
        if self._generation == generation[0]:
            self._stop_reading()
        self.abandon()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"fd={self._fd}"
        return f"<passrpc.aio.AsyncChannel {state}>"


class ConnectionTracker(Protocol):
    """What :func:`open_async_channel` needs of a pool: track a connection while it opens."""

    def check(self) -> None: ...
    def add(self, channel: AsyncChannel, *, raw: bool = False) -> None: ...
    def forget(self, channel: AsyncChannel) -> None: ...


async def open_async_channel(
    path: str,
    key: bytes,
    wire: WireOptions,
    deadline: float | None,
    server_uids: Collection[int] | None = None,
    pool: ConnectionTracker | None = None,
    *,
    raw: bool = False,
) -> AsyncChannel:
    """Connect to ``path`` and authenticate, all before ``deadline``.

    With a ``pool`` (``passrpc.aio``'s), the connection joins it before
    the handshake, so that closing the proxy fails this call at once; on
    failure it leaves the pool again.

    Raises:
        ConnectionClosed: nobody listens at ``path``, or the pool was closed.
        AuthenticationError: wrong password, or a server of another user.
        Timeout: the listen backlog stayed full until the deadline.
        Expired: the handshake did not finish before the deadline.
    """
    waits = backoff(path, deadline, asyncio.get_running_loop().time)
    while (sock := connect_once(path)) is None:
        await asyncio.sleep(next(waits))
        if pool is not None:
            pool.check()  # closed while this call waited for room in the backlog
    channel = AsyncChannel(sock, wire=wire)
    try:
        if pool is not None:
            pool.add(channel, raw=raw)
        check_server_uid(channel.peer, server_uids)
        # The same steps, in the same order, as passrpc._auth.client_handshake.
        steps = ClientHandshake(key)
        channel._decoder.cap_frame_size(HANDSHAKE_MAX_FRAME)
        try:
            await channel.send_frame(HANDSHAKE, steps.hello(), deadline)
        except ConnectionClosed:
            # A server that refuses us says why and closes at once, maybe before
            # our hello left: its reason is still waiting to be read.
            handshake_payload(*await channel.receive_frame(deadline), from_server=True)
            raise
        reply = await channel.receive_frame(deadline, wait_first=True)
        challenge = handshake_payload(*reply, from_server=True)
        try:
            answer = steps.answer(challenge)
        except AuthenticationError as exc:
            # Tell the server why we hang up, as passrpc._auth.tell_server does.
            with contextlib.suppress(ConnectionClosed, Expired):
                await channel.send_frame(*refusal(exc), deadline)
            raise
        channel._decoder.cap_frame_size(None)
        # The client may send its first request right behind its proof.
        await channel.send_frame(HANDSHAKE, answer, deadline)
    except BaseException:
        channel.close()
        if pool is not None:
            pool.forget(channel)
        raise
    return channel
