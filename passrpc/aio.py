"""The asyncio client: coroutine proxies over a pool of non-blocking connections.

``proxy = await passrpc.aio.connect(path, password=...)`` (or
``server.async_proxy()``) gives an :class:`AsyncProxy` whose methods are
coroutines named after the server's handlers. Many tasks may call at once:
each call borrows a connection from the proxy's pool (one call in flight per
connection, idle ones reused, at most ``max_connections`` open; further callers
wait their turn). A call that is cancelled or times out closes its connection,
so a late reply can never be read as the answer to a later call.

The frames, the handshake and the requests are exactly the sync client's: this
module drives the same pure pieces (:class:`~passrpc._wire.Encoder`,
:class:`~passrpc._wire.Decoder`, :class:`~passrpc._auth.ClientHandshake`) over
a non-blocking ``AF_UNIX`` socket watched with ``loop.add_reader`` /
``loop.add_writer``. A connection registers with the loop that uses it and
moves when another loop uses it, so a proxy is not tied to one event loop (use
it from one loop at a time, e.g. under successive ``asyncio.run()`` calls).
"""

from __future__ import annotations

import asyncio
import os
import socket
import weakref
from collections import deque
from collections.abc import Callable, Collection, Sequence
from types import TracebackType
from typing import Any, TypeVar

import attrs

from ._auth import (
    ClientHandshake,
    _backoff,
    _connect_once,
    _handshake_payload,
    check_server_uid,
    password_key,
)
from ._channel import (
    _CTRUNC,
    _os_error,
    _scm_rights,
    _SocketEnd,
    _take_ancillary,
    _unsent,
)
from ._client import (
    _check_described,
    _dress,
    _generation,
    _make_proxy_class,
    _ProxyBase,
    _request,
    _unwrap,
)
from ._client import _server_proxy as _make_server_proxy
from ._errors import ConfigurationError, ConnectionClosed, EncodeError, ProtocolError, Timeout
from ._server import Server, _proxy_factories
from ._wire import DEFAULT_LIMITS, Buffer, Decoder, Encoder, Kind, Limits, error_from_payload

__all__ = [
    "DEFAULT_MAX_CONNECTIONS",
    "AsyncChannel",
    "AsyncProxy",
    "PoolStatistics",
    "connect",
]

#: Connections an :class:`AsyncProxy` keeps open at most. The server runs a
#: thread per connection, so this also bounds the threads one proxy occupies;
#: 16 keeps a busy client well fed without hogging a server shared with others.
DEFAULT_MAX_CONNECTIONS = 16

_MESSAGE = int(Kind.MESSAGE)
_ERROR = int(Kind.ERROR)
_HANDSHAKE = int(Kind.HANDSHAKE)
_DESCRIBE = int(Kind.DESCRIBE)
_NOSIGNAL = socket.MSG_NOSIGNAL
_CLOEXEC = socket.MSG_CMSG_CLOEXEC

_UNSET: Any = object()


class _Expired(Exception):
    """A deadline passed while waiting on a socket; callers turn it into :class:`Timeout`."""


def _wake(waiter: asyncio.Future[None]) -> None:
    # A level-triggered selector may call this again before the waiting task
    # has run and unregistered: only the first call counts.
    if not waiter.done():
        waiter.set_result(None)


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(_Expired())


def _readable(ref: weakref.ref[AsyncChannel]) -> None:
    channel = ref()
    if channel is not None:
        channel._on_readable()


class _NotDelivered(ConnectionClosed):
    """The peer was gone before any byte of the frame left: sending it elsewhere is safe."""


_Closable = TypeVar("_Closable", bound="_AsyncClosing")


class _AsyncClosing:
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


def _check_max_connections(max_connections: object) -> None:
    if not isinstance(max_connections, int) or max_connections < 1:
        raise ConfigurationError(
            f"max_connections must be an int of at least 1, got {max_connections!r}"
        )


class AsyncChannel(_SocketEnd, _AsyncClosing):
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
    """

    def __init__(self, sock: socket.socket, *, limits: Limits = DEFAULT_LIMITS) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._fd = sock.fileno()
        self._limits = limits
        self._encoder = Encoder(limits)
        self._decoder = Decoder(limits)
        self._ancbufsize = socket.CMSG_SPACE(limits.max_fds * 4) if limits.max_fds else 0
        self._closed = False
        self._generation = _generation[0]  # the process (see passrpc._client) that opened it
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
        await self._send_payload(_MESSAGE, values, None)

    async def read(self) -> tuple[Any, ...]:
        """Wait for the next message and return its values as a tuple.

        Raises:
            ConnectionClosed: the peer closed the connection (or it broke).
            RemoteError, UnknownMessage, AuthenticationError: the peer sent an
                error frame instead of a message.
            ProtocolError: the peer broke the protocol; the channel is closed.
        """
        kind, payload = await self._receive(None)
        if kind == _MESSAGE and type(payload) is list:
            return tuple(payload)
        raise self._unexpected(kind, payload)

    def _unexpected(self, kind: int, payload: Any) -> Exception:
        if kind == _ERROR:
            return error_from_payload(payload)
        self.close()
        return ProtocolError(f"expected a message, the peer sent a frame of kind {kind!r}")

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
        """Wait until the socket is readable, or raise _Expired at ``deadline``."""
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
        timer = None if deadline is None else loop.call_at(deadline, _expire, waiter)
        try:
            await waiter
        finally:
            if timer is not None:
                timer.cancel()
            if self._read_waiter is waiter:
                self._read_waiter = None

    async def _wait_writable(self, deadline: float | None) -> None:
        """Wait until the socket is writable, or raise _Expired at ``deadline``."""
        if self._closed:
            raise ConnectionClosed("this channel was closed; open a new connection")
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        loop.add_writer(self._fd, _wake, waiter)
        self._writer = (loop, waiter)
        timer = None if deadline is None else loop.call_at(deadline, _expire, waiter)
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

    async def _send_payload(self, kind: int, payload: Any, deadline: float | None) -> None:
        buffers, fds = self._encoder.encode(kind, payload)
        await self._send(buffers, fds, deadline)

    async def _send(
        self, buffers: Sequence[Buffer], fds: list[int], deadline: float | None
    ) -> None:
        """Send one encoded frame, its descriptors with the first bytes.

        Raises:
            _NotDelivered: the peer was gone before any byte left.
            ConnectionClosed: the peer went away, or the channel was closed.
            EncodeError: a descriptor is not open; nothing was sent.
            _Expired: ``deadline`` passed; the channel is closed if part went out.
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
                        sent = self._sock.sendmsg(buffers, _scm_rights(fds), _NOSIGNAL)
                        rest = _unsent(buffers, sent)
                    else:
                        n = self._sock.sendmsg(rest, [], _NOSIGNAL)
                        sent += n
                        rest = _unsent(rest, n)
                except BlockingIOError:
                    await self._wait_writable(deadline)
                    continue
                except OSError as exc:
                    if sent:
                        raise _os_error(exc, "sending", self._closed) from exc
                    # Nothing left yet: a bad descriptor is the caller's, and a
                    # peer that is gone never got the frame.
                    raise _os_error(exc, "sending", self._closed, fds, _NotDelivered) from exc
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

    async def _receive(
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
                raise _os_error(exc, "receiving", self._closed) from exc
        if ancillary or flags & _CTRUNC or not nbytes:
            _take_ancillary(self._decoder, nbytes, ancillary, flags, self._limits.max_fds)
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

    def _abandon(self) -> None:
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
        if self._generation == _generation[0]:
            self._stop_reading()
        self._abandon()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"fd={self._fd}"
        return f"<passrpc.aio.AsyncChannel {state}>"


async def _open(
    path: str,
    key: bytes,
    limits: Limits,
    deadline: float | None,
    server_uids: Collection[int] | None = None,
    pool: _Pool | None = None,
    *,
    raw: bool = False,
) -> AsyncChannel:
    """Connect to ``path`` and authenticate, all before ``deadline``.

    With a ``pool``, the connection joins it (see :meth:`_Pool.add`) before
    the handshake, so that closing the proxy fails this call at once; on
    failure it leaves the pool again.

    Raises:
        ConnectionClosed: nobody listens at ``path``, or the pool was closed.
        AuthenticationError: wrong password, or a server of another user.
        Timeout: the listen backlog stayed full until the deadline.
        _Expired: the handshake did not finish before the deadline.
    """
    waits = _backoff(path, deadline, asyncio.get_running_loop().time)
    while (sock := _connect_once(path)) is None:
        await asyncio.sleep(next(waits))
        if pool is not None:
            pool.check()  # closed while this call waited for room in the backlog
    channel = AsyncChannel(sock, limits=limits)
    try:
        if pool is not None:
            pool.add(channel, raw=raw)
        check_server_uid(channel.peer, server_uids)
        steps = ClientHandshake(key)
        try:
            await channel._send_payload(_HANDSHAKE, steps.hello(), deadline)
        except ConnectionClosed:
            # A server that refuses us says why and closes at once, maybe before
            # our hello left: its reason is still waiting to be read.
            kind, payload = await channel._receive(deadline, wait_first=True)
            _handshake_payload(kind, payload, from_server=True)
            raise
        kind, payload = await channel._receive(deadline, wait_first=True)
        answer = steps.answer(_handshake_payload(kind, payload, from_server=True))
        # The client may send its first request right behind its proof.
        await channel._send_payload(_HANDSHAKE, answer, deadline)
    except BaseException:
        channel.close()
        if pool is not None:
            pool.forget(channel)
        raise
    return channel


# The pool -------------------------------------------------------------------


@attrs.frozen
class PoolStatistics:
    """A snapshot of an :class:`AsyncProxy`'s connection pool (:meth:`AsyncProxy.statistics`).

    ``connections`` are open now, ``idle`` of them wait for a call,
    ``calls_in_flight`` calls hold a connection (or are opening one), and
    ``waiting`` callers wait for one to come free; ``max_connections`` is the cap.
    """

    connections: int
    idle: int
    calls_in_flight: int
    waiting: int
    max_connections: int


class _Pool:
    """Connections of one proxy: idle ones to reuse, a cap, and a queue of waiting callers.

    A *slot* is the right to hold one connection; ``slots`` counts those
    taken. A caller takes a slot, reuses an idle connection or opens one, and
    gives the slot back (with the connection, if it is still good). A freed
    slot goes straight to the longest-waiting caller, so nobody barges ahead.
    """

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.idle: list[AsyncChannel] = []
        #: Every pooled connection, from the moment its socket connects.
        self.channels: set[AsyncChannel] = set()
        #: Raw handlers' connections, until their first message is out.
        self.raw: set[AsyncChannel] = set()
        self.slots = 0
        self.waiters: deque[asyncio.Future[None]] = deque()
        self.closed = False
        self.generation = _generation[0]

    def check(self) -> None:
        """Raise ConnectionClosed if the proxy was closed; start afresh in a forked child."""
        if self.closed:
            raise ConnectionClosed("this proxy was closed; make a new one")
        if self.generation != _generation[0]:
            # A forked child: the connections are its parent's, and so is the
            # selector they may be registered with. Drop our copies quietly.
            for channel in (*self.channels, *self.raw):
                channel._abandon()
            self.idle.clear()
            self.channels.clear()
            self.raw.clear()
            self.waiters.clear()
            self.slots = 0
            self.generation = _generation[0]

    async def acquire(self, deadline: float | None) -> AsyncChannel | None:
        """Take a slot, waiting for one if all are taken; return an idle connection or None.

        Raises:
            _Expired: no slot came free before ``deadline``.
            ConnectionClosed: the proxy was closed.
        """
        self.check()
        if self.slots < self.cap and not self.waiters:
            self.slots += 1
            return self.idle.pop() if self.idle else None
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self.waiters.append(waiter)
        timer = None if deadline is None else loop.call_at(deadline, _expire, waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.release(None)  # a slot was handed over as we gave up: pass it on
            else:
                try:
                    self.waiters.remove(waiter)
                except ValueError:
                    pass
            raise
        finally:
            if timer is not None:
                timer.cancel()
        return self.idle.pop() if self.idle else None

    def add(self, channel: AsyncChannel, *, raw: bool = False) -> None:
        """Track a connection as soon as it connects, so that :meth:`close` reaches it.

        A pooled one is opened by a caller holding a slot; a ``raw`` one is
        tracked only until its first message is out (then :meth:`forget`).

        Raises:
            ConnectionClosed: the proxy was closed (the caller closes ``channel``).
        """
        self.check()
        (self.raw if raw else self.channels).add(channel)

    def forget(self, channel: AsyncChannel) -> None:
        """Stop tracking a connection (closed, or a raw one handed over)."""
        self.channels.discard(channel)
        self.raw.discard(channel)

    def release(self, channel: AsyncChannel | None) -> None:
        """Give a slot back, with its connection to reuse if it is still good."""
        if channel is not None:
            if channel.closed or self.closed:
                self.discard(channel)
            else:
                self.idle.append(channel)
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes to this caller as it is
                return
        self.slots -= 1

    def discard(self, channel: AsyncChannel) -> None:
        """Close a connection that must not carry another call."""
        channel.close()
        self.forget(channel)

    def close(self) -> None:
        """Close every connection, opening or open; fail every waiting caller."""
        self.closed = True
        channels = (*self.channels, *self.raw)
        self.channels, self.raw = set(), set()
        self.idle.clear()
        for channel in channels:
            channel.close()  # a task waiting on it gets ConnectionClosed
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done() and not waiter.get_loop().is_closed():
                waiter.set_exception(
                    ConnectionClosed("the proxy was closed while this call waited")
                )

    def statistics(self) -> PoolStatistics:
        return PoolStatistics(
            connections=len(self.channels),
            idle=len(self.idle),
            calls_in_flight=self.slots,
            waiting=sum(not w.done() for w in self.waiters),
            max_connections=self.cap,
        )


# The proxy ------------------------------------------------------------------


class AsyncProxy(_ProxyBase, _AsyncClosing):
    """Calls a server's handlers as coroutines: ``await proxy.hello("Joe", "Dalton")``.

    Each handler is a coroutine method with the handler's name, signature and
    docstring; ``dir(proxy)`` lists them, and an unknown name raises
    ``AttributeError`` before any I/O. A call returns the handler's single
    value, or a tuple when it returned several; a handler's exception is
    raised as :class:`passrpc.RemoteError`. Any number of tasks may call at
    once: each call holds one pooled connection (at most ``max_connections``
    open, idle ones reused, further callers wait their turn). A call that is
    cancelled, or outlives ``timeout`` (:class:`passrpc.Timeout`), closes its
    connection; a server that dies mid-call raises
    :class:`passrpc.ConnectionClosed` at once; an idle connection the server
    closed is replaced, and a call that may have run is never sent twice.
    Handlers whose names clash with the proxy's own attributes, or are not
    identifiers, are reached through :meth:`call`. A raw handler's method
    opens a new connection, sends the first message and returns that
    :class:`AsyncChannel` for you to converse on and close.

    Use it from one event loop at a time; close it with ``close()``,
    ``await proxy.aclose()`` or ``async with``.

    Args:
        socket_path: the server's socket.
        password: the server's password.
        timeout: seconds that bound each call as a whole (waiting for a free
            connection, connecting, sending, the reply); None waits forever.
        limits: what the server may send (:class:`passrpc.Limits`).
        max_connections: connections kept open at most.
        server_uids: the uids the server may run as; None means this
            process's own uid or root, so a stranger's socket is refused.

    Raises:
        ConfigurationError: ``max_connections`` is not a positive int.
    """

    _public_name = "passrpc.aio.AsyncProxy"

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        password: str | bytes,
        *,
        timeout: float | None = None,
        limits: Limits = DEFAULT_LIMITS,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        server_uids: Collection[int] | None = None,
    ) -> None:
        _check_max_connections(max_connections)
        super().__init__(
            socket_path, password, timeout=timeout, limits=limits, server_uids=server_uids
        )
        # Encoding is synchronous and happens before a connection is taken, so
        # one encoder serves every task of the loop.
        self._encoder = Encoder(limits)
        self._pool = _Pool(max_connections)

    def statistics(self) -> PoolStatistics:
        """Return a snapshot of the connection pool (see :class:`PoolStatistics`)."""
        return self._pool.statistics()

    async def call(self, name: str, /, *args: Any, **kwargs: Any) -> Any:
        """Call handler ``name`` with the arguments given; the generic form of the methods.

        For a raw handler it returns the :class:`AsyncChannel`, as its method does.
        """
        if self._is_raw(name):
            return await self._open_raw(name, args, kwargs)
        return await self._call(name, args, kwargs)

    def _encode(
        self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Buffer, ...], list[int]]:
        return self._encoder.encode(*_request(name, args, kwargs))

    async def _connect(self, deadline: float | None, *, raw: bool = False) -> AsyncChannel:
        pool = self._pool
        channel = await _open(
            self._path, self._key, self._limits, deadline, self._server_uids, pool, raw=raw
        )
        if pool.closed:  # closed as the handshake ended (the channel is closed with it)
            raise ConnectionClosed("this proxy was closed; make a new one")
        return channel

    async def _call(
        self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: Any = _UNSET
    ) -> Any:
        if timeout is _UNSET:
            timeout = self._timeout
        buffers, fds = self._encode(name, args, kwargs)  # fails before any I/O
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        pool = self._pool
        try:
            channel = await pool.acquire(deadline)
        except _Expired:
            raise Timeout(
                f"calling {name!r}: no connection came free within the timeout of {timeout} s "
                f"(all {pool.cap} in use); raise the timeout or max_connections"
            ) from None
        reused = channel is not None
        try:
            if channel is None:
                channel = await self._connect(deadline)
            try:
                await channel._send(buffers, fds, deadline)
            except _NotDelivered:
                if not reused:
                    raise
                # The server closed this idle connection and the send failed at
                # once: the call was never delivered, so a fresh connection may
                # carry it (once; a call that may have run is never resent).
                pool.discard(channel)
                channel = None
                channel = await self._connect(deadline)
                await channel._send(buffers, fds, deadline)
            kind, reply = await channel._receive(deadline, wait_first=True)
        except EncodeError:
            # A descriptor that is not open: refused before any byte left, so
            # the connection is still in step and goes back to the pool.
            pool.release(channel)
            raise
        except BaseException as exc:
            # Cancelled, timed out or broken: whatever is left on this
            # connection (a late reply) must never answer another call.
            if channel is not None:
                pool.discard(channel)
            pool.release(None)
            if isinstance(exc, _Expired):
                raise Timeout(
                    f"calling {name!r} took longer than the timeout of {timeout} s; its "
                    "connection was closed, so a late reply cannot answer another call"
                ) from None
            if pool.closed and isinstance(exc, ConnectionClosed):
                raise ConnectionClosed(
                    f"the proxy was closed while calling {name!r}; make a new one"
                ) from exc
            raise
        if kind == _ERROR or (kind == _MESSAGE and type(reply) is list):
            pool.release(channel)  # a reply, or the handler's error: still in step
        else:
            pool.discard(channel)
            pool.release(None)
        return _unwrap(kind, reply)

    async def _open_raw(
        self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: Any = _UNSET
    ) -> AsyncChannel:
        if timeout is _UNSET:
            timeout = self._timeout
        buffers, fds = self._encode(name, args, kwargs)
        pool = self._pool
        pool.check()
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        try:
            # Tracked by the pool until the first message is out, so that
            # closing the proxy fails this call at once.
            channel = await self._connect(deadline, raw=True)
            try:
                await channel._send(buffers, fds, deadline)
            except BaseException:
                channel.close()
                raise
            finally:
                pool.forget(channel)  # from here on the caller owns it
        except _Expired:
            raise Timeout(
                f"opening a connection for raw handler {name!r} took longer than {timeout} s"
            ) from None
        except ConnectionClosed as exc:
            if pool.closed:
                raise ConnectionClosed(
                    f"the proxy was closed while opening a connection for {name!r}; make a new one"
                ) from exc
            raise
        return channel

    def with_timeout(self, timeout: float | None) -> _TimedAsyncProxy:
        """Return a view of this proxy whose calls are bounded by ``timeout`` seconds.

        ``await proxy.with_timeout(10).hello("Joe")``: the view shares the
        proxy's pool; a call past its bound raises :class:`passrpc.Timeout`
        (a ``TimeoutError``) and discards its connection.
        """
        return _TimedAsyncProxy(self, timeout)

    def close(self) -> None:
        """Close every connection; calls in flight and later calls raise ConnectionClosed.

        A call still connecting or authenticating fails at once too. Call it
        from the event loop's thread (or when no loop runs).
        """
        self._pool.close()


class _TimedAsyncProxy:
    """A proxy's methods with another time bound (see :meth:`AsyncProxy.with_timeout`)."""

    def __init__(self, proxy: AsyncProxy, timeout: float | None) -> None:
        self._proxy = proxy
        self._timeout = timeout

    async def call(self, name: str, /, *args: Any, **kwargs: Any) -> Any:
        if self._proxy._is_raw(name):
            return await self._proxy._open_raw(name, args, kwargs, self._timeout)
        return await self._proxy._call(name, args, kwargs, self._timeout)

    def __getattr__(self, name: str) -> Any:
        info = self._proxy._method_info(name)
        if info is None:
            return getattr(self._proxy, name)
        proxy, timeout = self._proxy, self._timeout
        if info.get("raw"):

            async def call(*args: Any, **kwargs: Any) -> Any:
                return await proxy._open_raw(name, args, kwargs, timeout)

        else:

            async def call(*args: Any, **kwargs: Any) -> Any:
                return await proxy._call(name, args, kwargs, timeout)

        call.__name__ = call.__qualname__ = name
        call.__doc__ = info.get("doc") or None
        return call

    def __dir__(self) -> list[str]:
        return dir(self._proxy)


def _method(name: str, info: dict[str, Any]) -> Callable[..., Any]:
    if info.get("raw"):

        async def method(self: AsyncProxy, *args: Any, **kwargs: Any) -> Any:
            return await self._open_raw(name, args, kwargs)

    else:

        async def method(self: AsyncProxy, *args: Any, **kwargs: Any) -> Any:
            return await self._call(name, args, kwargs)

    return _dress(method, name, info)


def async_proxy_class(described: list[dict[str, Any]]) -> type[AsyncProxy]:
    """Make an :class:`AsyncProxy` subclass with one coroutine method per described handler.

    Raises:
        ProtocolError: an entry of ``described`` is not a handler description.
    """
    return _make_proxy_class(AsyncProxy, described, _method)


async def connect(
    socket_path: str | os.PathLike[str],
    *,
    password: str | bytes,
    timeout: float | None = None,
    limits: Limits = DEFAULT_LIMITS,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    server_uids: Collection[int] | None = None,
) -> AsyncProxy:
    """Connect to a passrpc server and return an asyncio proxy of its handlers.

    The proxy learns the handlers (names, signatures, docstrings) from the
    server itself, so this works in a process that has no :class:`passrpc.Server`.
    The connection opened here becomes the pool's first.

    Args:
        socket_path: the server's socket.
        password: the server's password.
        timeout: seconds that bound connecting and then each call; None waits
            forever.
        limits: what the server may send.
        max_connections: connections the proxy keeps open at most.
        server_uids: the uids the server may run as; None means this
            process's own uid or root, so a stranger's socket is refused.

    Raises:
        ConfigurationError: ``max_connections`` is not a positive int (before any I/O).
        ConnectionClosed: nobody listens at ``socket_path``.
        AuthenticationError: wrong password, or a server of another user.
        Timeout: the server did not answer in time.
        ProtocolError: the server's description of its handlers is malformed.
        Error: the server answered the request for its description with an
            error: that error.
    """
    _check_max_connections(max_connections)
    path = os.fspath(socket_path)
    key = password_key(password)
    deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
    try:
        channel = await _open(path, key, limits, deadline, server_uids)
        try:
            await channel._send_payload(_DESCRIBE, None, deadline)
            described = _check_described(*await channel._receive(deadline, wait_first=True))
            proxy = async_proxy_class(described)(
                path,
                password,
                timeout=timeout,
                limits=limits,
                max_connections=max_connections,
                server_uids=server_uids,
            )
        except BaseException:
            channel.close()
            raise
    except _Expired:
        raise Timeout(
            f"the server at {path!r} did not answer within the timeout of {timeout} s"
        ) from None
    pool = proxy._pool
    pool.add(channel)
    pool.idle.append(channel)
    return proxy


def _server_proxy(server: Server, *, timeout: float | None = None) -> AsyncProxy:
    proxy: AsyncProxy = _make_server_proxy(server, timeout=timeout, make_class=async_proxy_class)
    return proxy


_proxy_factories["async"] = _server_proxy  # also reached lazily through _client
