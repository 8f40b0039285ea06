"""The asyncio client: coroutine proxies over a pool of non-blocking connections.

``proxy = await passrpc.aio.connect(path, password=...)`` (or
``server.async_proxy()``) gives an :class:`AsyncProxy` whose methods are
coroutines named after the server's handlers. Many tasks may call at once:
each call borrows a connection from the proxy's pool (one call in flight per
connection, idle ones reused, at most ``max_connections`` open; further callers
wait their turn). A call that is cancelled or times out closes its connection,
so a late reply can never be read as the answer to a later call.

The frames, the handshake and the requests are exactly the sync client's: the
routing and generated classes are :mod:`passrpc._clientcore`'s, what a reply
means :mod:`passrpc._protocol`'s, and the channel (:class:`AsyncChannel`, in
:mod:`passrpc._aiochannel`) drives the same pure codec and handshake steps
over a non-blocking ``AF_UNIX`` socket. A connection registers with the loop that uses it and
moves when another loop uses it, so a proxy is not tied to one event loop (use
it from one loop at a time, e.g. under successive ``asyncio.run()`` calls).
"""

from __future__ import annotations

import asyncio
import os
from collections import deque
from collections.abc import Collection
from typing import Any

import attrs

from ._aiochannel import (
    AsyncChannel,
    AsyncClosing,
    Expired,
    NotDelivered,
    expire,
    open_async_channel,
)
from ._aiostream import AsyncStream
from ._auth import find_password
from ._clientcore import UNSET, ProxyBase, check_type_names, generation, make_proxy_class
from ._errors import ConfigurationError, ConnectionClosed, DecodeError, EncodeError, Timeout
from ._handshake import password_key
from ._protocol import (
    DESCRIBE,
    DESCRIBE_TYPES,
    OutOfStep,
    parse_described,
    reply_result,
    request,
)
from ._streaming import DEFAULT_WINDOW, StreamReader, stream_request
from ._types import TypeRegistry
from ._wire import DEFAULT_LIMITS, Buffer, Encoder, Limits, WireOptions, wire_options

__all__ = [
    "DEFAULT_MAX_CONNECTIONS",
    "AsyncChannel",
    "AsyncProxy",
    "AsyncStream",
    "PoolStatistics",
    "connect",
]

#: Connections an :class:`AsyncProxy` keeps open at most. The server runs a
#: thread per connection, so this also bounds the threads one proxy occupies;
#: 16 keeps a busy client well fed without hogging a server shared with others.
DEFAULT_MAX_CONNECTIONS = 16


def _check_max_connections(max_connections: object) -> None:
    if not isinstance(max_connections, int) or max_connections < 1:
        raise ConfigurationError(
            f"max_connections must be an int of at least 1, got {max_connections!r}"
        )


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
        self.generation = generation[0]

    def check(self) -> None:
        """Raise ConnectionClosed if the proxy was closed; start afresh in a forked child."""
        if self.closed:
            raise ConnectionClosed("this proxy was closed; make a new one")
        if self.generation != generation[0]:
            # A forked child: the connections are its parent's, and so is the
            # selector they may be registered with. Drop our copies quietly.
            for channel in (*self.channels, *self.raw):
                channel.abandon()
            self.idle.clear()
            self.channels.clear()
            self.raw.clear()
            self.waiters.clear()
            self.slots = 0
            self.generation = generation[0]

    async def acquire(self, deadline: float | None) -> AsyncChannel | None:
        """Take a slot, waiting for one if all are taken; return an idle connection or None.

        Raises:
            Expired: no slot came free before ``deadline``.
            ConnectionClosed: the proxy was closed.
        """
        self.check()
        if self.slots < self.cap and not self.waiters:
            self.slots += 1
            return self.idle.pop() if self.idle else None
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self.waiters.append(waiter)
        timer = None if deadline is None else loop.call_at(deadline, expire, waiter)
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


class AsyncProxy(ProxyBase, AsyncClosing):
    """Calls a server's handlers as coroutines: ``await proxy.hello("Joe", "Dalton")``.

    Each handler is a coroutine method with the handler's name, signature and
    docstring; ``dir(proxy)`` lists them, and an unknown name raises
    ``AttributeError`` before any I/O. A call returns the handler's single
    value, or a tuple when it returned several; a handler's exception is
    raised as :class:`passrpc.RemoteError`, also an instance of its nearest
    builtin (or registered) class. Any number of tasks may call at
    once: each call holds one pooled connection (at most ``max_connections``
    open, idle ones reused, further callers wait their turn). A call that is
    cancelled, or outlives ``timeout`` (:class:`passrpc.Timeout`), closes its
    connection; a server that dies mid-call raises
    :class:`passrpc.ConnectionClosed` at once; an idle connection the server
    closed is replaced, and a call that may have run is never sent twice.
    Handlers whose names clash with the proxy's own attributes, or are not
    identifiers, are reached through :meth:`call`. A raw handler's method
    opens a new connection, sends the first message and returns that
    :class:`AsyncChannel` for you to converse on and close. A stream
    handler's method is a plain one: it returns an :class:`AsyncStream` to
    ``async for`` over, which holds one pooled connection while it is open.

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
        types: the :class:`passrpc.TypeRegistry` of the classes that travel;
            None for the default one.

    Raises:
        ConfigurationError: ``max_connections`` is not a positive int.
    """

    _public_name = "passrpc.aio.AsyncProxy"
    _is_async = True

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        password: str | bytes,
        *,
        timeout: float | None = None,
        limits: Limits = DEFAULT_LIMITS,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        server_uids: Collection[int] | None = None,
        types: TypeRegistry | None = None,
        wire: WireOptions | None = None,
    ) -> None:
        _check_max_connections(max_connections)
        super().__init__(
            socket_path,
            password,
            timeout=timeout,
            wire=wire_options(limits, types) if wire is None else wire,
            server_uids=server_uids,
        )
        # Encoding is synchronous and happens before a connection is taken, so
        # one encoder serves every task of the loop.
        self._encoder = Encoder(self._wire)
        self._pool = _Pool(max_connections)

    def statistics(self) -> PoolStatistics:
        """Return a snapshot of the connection pool (see :class:`PoolStatistics`)."""
        return self._pool.statistics()

    def _encode(
        self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Buffer, ...], list[int]]:
        return self._encoder.encode(*request(name, args, kwargs))

    async def _connect(self, deadline: float | None, *, raw: bool = False) -> AsyncChannel:
        pool = self._pool
        channel = await open_async_channel(
            self._path, self._key, self._wire, deadline, self._server_uids, pool, raw=raw
        )
        if pool.closed:  # closed as the handshake ended (the channel is closed with it)
            raise ConnectionClosed("this proxy was closed; make a new one")
        return channel

    async def _acquire(
        self, name: str, timeout: float | None, deadline: float | None
    ) -> AsyncChannel | None:
        """Take a slot of the pool: an idle connection, or None to open one."""
        try:
            return await self._pool.acquire(deadline)
        except Expired:
            raise Timeout(
                f"calling {name!r}: no connection came free within the timeout of {timeout} s "
                f"(all {self._pool.cap} in use); raise the timeout or max_connections"
            ) from None

    async def _call(
        self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: Any = UNSET
    ) -> Any:
        if timeout is UNSET:
            timeout = self._timeout
        buffers, fds = self._encode(name, args, kwargs)  # fails before any I/O
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        pool = self._pool
        channel = await self._acquire(name, timeout, deadline)
        try:
            if channel is None:
                channel = await self._connect(deadline)
                await channel.send_encoded(buffers, fds, deadline)
            else:
                try:
                    await channel.send_encoded(buffers, fds, deadline)
                except NotDelivered:
                    # The server closed this idle connection and the send failed
                    # at once: the call was never delivered, so a fresh
                    # connection may carry it (once; a call that may have run is
                    # never resent).
                    pool.discard(channel)
                    channel = None
                    channel = await self._connect(deadline)
                    await channel.send_encoded(buffers, fds, deadline)
            kind, reply = await channel.receive_frame(deadline, wait_first=True)
        except (EncodeError, DecodeError):
            # A descriptor that is not open (refused before any byte left), or
            # a reply read whole and skipped: the connection is still in step
            # and goes back to the pool.
            pool.release(channel)
            raise
        except BaseException as exc:
            # Cancelled, timed out or broken: whatever is left on this
            # connection (a late reply) must never answer another call.
            if channel is not None:
                pool.discard(channel)
            pool.release(None)
            if isinstance(exc, Expired):
                raise Timeout(
                    f"calling {name!r} took longer than the timeout of {timeout} s; its "
                    "connection was closed, so a late reply cannot answer another call"
                ) from None
            if pool.closed and isinstance(exc, ConnectionClosed):
                raise ConnectionClosed(
                    f"the proxy was closed while calling {name!r}; make a new one"
                ) from exc
            raise
        try:
            return reply_result(kind, reply, channel.types)  # a reply, or the handler's error
        except OutOfStep:
            pool.discard(channel)  # not a reply: the connection is out of step
            channel = None
            raise
        finally:
            pool.release(channel)

    async def _open_raw(
        self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: Any = UNSET
    ) -> AsyncChannel:
        if timeout is UNSET:
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
                await channel.send_encoded(buffers, fds, deadline)
            except BaseException:
                channel.close()
                raise
            finally:
                pool.forget(channel)  # from here on the caller owns it
        except Expired:
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

    def _open_stream(
        self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: Any = UNSET
    ) -> AsyncStream:
        if timeout is UNSET:
            timeout = self._timeout
        # Encoded now, so that a value that cannot travel fails the call itself.
        buffers, fds = self._encoder.encode(*stream_request(name, args, kwargs, DEFAULT_WINDOW))

        async def start(deadline: float | None) -> AsyncChannel:
            return await self._start_stream(name, buffers, fds, timeout, deadline)

        reader = StreamReader(name, DEFAULT_WINDOW, self._wire.types)
        return AsyncStream(name, start, self._pool, reader, timeout, (args, kwargs))

    async def _start_stream(
        self,
        name: str,
        buffers: tuple[Buffer, ...],
        fds: list[int],
        timeout: float | None,
        deadline: float | None,
    ) -> AsyncChannel:
        """Send a stream's request on a pooled connection, whose slot the stream then holds."""
        pool = self._pool
        channel = await self._acquire(name, timeout, deadline)
        try:
            if channel is not None:
                try:
                    await channel.send_encoded(buffers, fds, deadline)
                    return channel
                except NotDelivered:  # an idle connection the server closed (see _call)
                    pool.discard(channel)
                    channel = None
            channel = await self._connect(deadline)
            await channel.send_encoded(buffers, fds, deadline)
            return channel
        except EncodeError:
            pool.release(channel)  # nothing was sent: still in step
            raise
        except BaseException as exc:
            if channel is not None:
                pool.discard(channel)
            pool.release(None)
            if isinstance(exc, Expired):
                raise Timeout(
                    f"opening the stream of {name!r} took longer than the timeout of {timeout} s"
                ) from None
            raise

    def close(self) -> None:
        """Close every connection; calls in flight and later calls raise ConnectionClosed.

        A call still connecting or authenticating fails at once too. Call it
        from the event loop's thread (or when no loop runs).
        """
        self._pool.close()


def async_proxy_class(described: list[dict[str, Any]]) -> type[AsyncProxy]:
    """Make an :class:`AsyncProxy` subclass with one coroutine method per described handler.

    Raises:
        ProtocolError: an entry of ``described`` is not a handler description.
    """
    return make_proxy_class(AsyncProxy, described)


async def _describe(channel: AsyncChannel, path: str, deadline: float | None) -> type[AsyncProxy]:
    """Ask the server for its handlers (and, with types registered here, its types); make the class.

    The two requests go out together: the server answers them in order.
    """
    local = channel.types.names()
    await channel.send_frame(DESCRIBE, None, deadline)
    if local:
        await channel.send_frame(DESCRIBE, DESCRIBE_TYPES, deadline)
    reply = await channel.receive_frame(deadline, wait_first=True)
    cls = async_proxy_class(parse_described(*reply, channel.types))
    if local:
        kind, names = await channel.receive_frame(deadline, wait_first=True)
        if kind == DESCRIBE:
            check_type_names(path, local, names)
    return cls


async def connect(
    socket_path: str | os.PathLike[str],
    *,
    password: str | bytes | None = None,
    password_file: str | os.PathLike[str] | None = None,
    timeout: float | None = None,
    limits: Limits = DEFAULT_LIMITS,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    server_uids: Collection[int] | None = None,
    types: TypeRegistry | None = None,
) -> AsyncProxy:
    """Connect to a passrpc server and return an asyncio proxy of its handlers.

    As :func:`passrpc.connect` does: the proxy learns the handlers from the
    server, the password is found as there, and codes the two sides give to
    differently named classes are warned about. Its connection becomes the
    pool's first.

    Args:
        socket_path: the server's socket.
        password: the server's password.
        password_file: a file holding it (one trailing newline is not part of it).
        timeout: seconds that bound connecting and then each call; None: no bound.
        limits: what the server may send.
        max_connections: connections the proxy keeps open at most.
        server_uids: the uids the server may run as; None means this
            process's own uid or root, so a stranger's socket is refused.
        types: the :class:`passrpc.TypeRegistry` of the classes that travel;
            None for the default one.

    Raises:
        ConfigurationError: ``max_connections`` is not a positive int, or no
            password is to be had (before any I/O).
        ConnectionClosed: nobody listens at ``socket_path``.
        AuthenticationError: wrong password, or a server of another user.
        Timeout: the server did not answer in time.
        ProtocolError: the server's description of its handlers is malformed.
        Error: the server answered the request for its description with an
            error: that error.
    """
    _check_max_connections(max_connections)
    path = os.fspath(socket_path)
    wire = wire_options(limits, types)
    password = find_password(path, password, password_file)
    deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
    try:
        channel = await open_async_channel(
            path, password_key(password), wire, deadline, server_uids
        )
        try:
            cls = await _describe(channel, path, deadline)
            proxy = cls(path, password, timeout=timeout, wire=wire, max_connections=max_connections, server_uids=server_uids)  # fmt: skip
        except BaseException:
            channel.close()
            raise
    except Expired:
        raise Timeout(
            f"the server at {path!r} did not answer within the timeout of {timeout} s"
        ) from None
    proxy._pool.add(channel)
    proxy._pool.idle.append(channel)
    return proxy
