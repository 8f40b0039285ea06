"""The blocking client: generated proxies with a persistent connection per thread, and ``connect()``.

What it shares with the asyncio client (routing, the generated classes, the
timed view) is in :mod:`passrpc._clientcore`; what a frame means, in
:mod:`passrpc._protocol`. This module keeps what is blocking: one
:class:`Channel` per thread, opened on first use and reopened after a fork.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections import deque
from collections.abc import Collection
from types import TracebackType
from typing import Any

from ._auth import find_password, open_channel
from ._channel import Channel
from ._clientcore import UNSET, ProxyBase, check_type_names, generation, make_proxy_class
from ._clientstream import Link, Stream
from ._errors import ConnectionClosed, DecodeError, EncodeError
from ._handshake import password_key
from ._protocol import (
    CALL,
    DESCRIBE,
    DESCRIBE_TYPES,
    MESSAGE,
    STATUS,
    OutOfStep,
    ServerStatus,
    parse_described,
    parse_status,
    reply_result,
    request,
)
from ._streaming import DEFAULT_WINDOW, StreamReader, stream_request
from ._types import TypeRegistry
from ._wire import DEFAULT_LIMITS, Limits, WireOptions, wire_options


class _Connection:
    """One thread's connection of a proxy; closes it when the thread's locals go."""

    __slots__ = ("__weakref__", "born", "channel", "generation")

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        # generation is born's, or _FLAGGED: the next call takes the slow
        # path, which cancels the streams dropped meanwhile.
        self.generation = self.born = generation[0]

    def close(self) -> None:
        """End the connection; in a forked child, close only the child's copy of it.

        Shutting the socket down wakes a call blocked on it in another
        thread; in a child it would end the parent's connection too.
        """
        # born, not generation: that is _FLAGGED while a dropped stream waits,
        # which can happen in the middle of a call (a finalizer runs anywhere).
        if self.born == generation[0]:
            self.channel.shutdown()  # wakes a call blocked in its thread
        else:
            self.channel.close()

    def __del__(self) -> None:
        self.close()


#: A connection's generation while dropped streams wait to be cancelled.
_FLAGGED = -1


class _PerThread(threading.local):
    """A proxy's per-thread state: the thread's connection, None until its first call."""

    connection: _Connection | None = None


class Proxy(ProxyBase):
    """Calls a server's handlers as methods: ``proxy.hello("Joe", "Dalton")``.

    Each handler is a method with the handler's name, signature and
    docstring; ``dir(proxy)`` lists them, and an unknown name raises
    ``AttributeError`` before any I/O. A call returns the handler's single
    value, or a tuple when it returned several; a handler's exception is
    raised as :class:`RemoteError`, also an instance of its nearest builtin
    (or registered) class. Each thread gets its own connection,
    kept across calls and opened again if the server closed it while idle
    (a call that may have run is never sent twice); a forked child opens its
    own. Handlers whose names clash with the proxy's own methods, or are not
    identifiers, are reached through :meth:`call`. A raw handler's method
    sends the first message on a new connection and returns that
    :class:`Channel` for you to converse on and close. A stream handler's
    method returns a :class:`Stream` of its items; the stream owns the
    thread's connection while it is open, so a call meanwhile opens another
    (a proxy holds one connection per thread, plus one per open stream).
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        password: str | bytes,
        *,
        timeout: float | None = None,
        limits: Limits = DEFAULT_LIMITS,
        server_uids: Collection[int] | None = None,
        types: TypeRegistry | None = None,
        wire: WireOptions | None = None,
    ) -> None:
        super().__init__(
            socket_path,
            password,
            timeout=timeout,
            wire=wire_options(limits, types) if wire is None else wire,
            server_uids=server_uids,
        )
        self._local = _PerThread()
        self._connections: weakref.WeakSet[_Connection] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._closed = False
        #: Streams dropped unfinished, cancelled on the next slow-path call.
        self._dropped: deque[Link] = deque()

    def _channel(self) -> Channel:
        connection = self._local.connection
        if connection is not None and connection.generation == generation[0]:
            return connection.channel
        return self._reconnect()

    def _reconnect(self) -> Channel:
        """The thread's connection when the call's fast path could not take it, or a new one.

        The fast path misses when the thread has none, when it is a forked
        parent's, when a dropped stream flagged it, and when its send failed.
        """
        if self._closed:
            raise ConnectionClosed("this proxy was closed; make a new one")
        connection = self._local.connection
        usable = connection is None  # a dropped stream's cancel may give one back
        if connection is not None and connection.generation == _FLAGGED:
            connection.generation = connection.born
            usable = True
        if self._dropped:
            self._cancel_dropped()
        connection = self._local.connection
        if usable and connection is not None and connection.generation == generation[0]:
            return connection.channel
        self._drop()
        return self._adopt(self._open())

    def _open(self, timeout: Any = UNSET) -> Channel:
        return open_channel(
            self._path,
            self._key,
            timeout=self._timeout if timeout is UNSET else timeout,
            wire=self._wire,
            server_uids=self._server_uids,
        )

    def _adopt(self, channel: Channel) -> Channel:
        connection = _Connection(channel)
        self._local.connection = connection
        with self._lock:
            self._connections.add(connection)
        return channel

    def _drop(self) -> None:
        connection = self._local.connection
        if connection is not None:
            self._local.connection = None
            connection.close()

    def _call(
        self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: Any = UNSET
    ) -> Any:
        # The hot path of every proxy call: kept flat on purpose.
        connection = self._local.connection
        if connection is not None and connection.generation == generation[0]:
            channel = connection.channel
        else:
            channel = self._reconnect()
        # protocol.request, inlined (a call costs 1 % of this path):
        # keyword arguments need a CALL; without them the plainer MESSAGE does.
        if kwargs:
            kind, payload = CALL, (name, args, kwargs)
        else:
            kind, payload = MESSAGE, (name, *args)
        if timeout is not UNSET:
            channel.timeout = timeout
        try:
            try:
                channel.send_frame(kind, payload)
            except ConnectionClosed:
                # On AF_UNIX a closed peer fails the send at once: the call was
                # never delivered, so sending it on a new connection is safe.
                channel = self._reconnect()
                if timeout is not UNSET:
                    channel.timeout = timeout
                channel.send_frame(kind, payload)
            kind, reply = channel.receive_frame()
        except (EncodeError, DecodeError):
            # Nothing was sent, or the reply was read whole (and skipped): the
            # connection is still in step.
            raise
        except BaseException:
            self._drop()  # a late reply must never answer the next call
            raise
        finally:
            if timeout is not UNSET and not channel.closed:
                channel.timeout = self._timeout
        # protocol.reply_result's common case, inlined as protocol.request is.
        if kind == MESSAGE and type(reply) is list:
            return reply[0] if len(reply) == 1 else tuple(reply)
        try:
            # The channel's registry, not the proxy's: an attribute of a class
            # with __getattr__ (the proxy) is looked up the slow way.
            return reply_result(kind, reply, channel.types)
        except OutOfStep:
            self._drop()  # not a reply: the connection is out of step
            raise

    def _open_raw(
        self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: Any = UNSET
    ) -> Channel:
        channel = self._open(timeout)
        try:
            channel.send_frame(*request(name, args, kwargs))
        except BaseException:
            channel.close()
            raise
        return channel

    def _open_stream(
        self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: Any = UNSET
    ) -> Stream:
        """Send a STREAM request on the thread's connection, which the stream takes; its :class:`Stream`."""
        connection = self._local.connection
        if connection is None or connection.generation != generation[0]:
            self._reconnect()  # after any dropped stream's cancel
            connection = self._local.connection
        assert connection is not None
        self._local.connection = None  # the stream's now: a call meanwhile opens another
        channel = connection.channel
        frame = stream_request(name, args, kwargs, DEFAULT_WINDOW)
        if timeout is not UNSET:
            channel.timeout = timeout
        try:
            try:
                channel.send_frame(*frame)
            except ConnectionClosed:  # never delivered (see _call): safe to send again
                connection.close()
                connection = self._connection(timeout)
                channel = connection.channel
                channel.send_frame(*frame)
        except EncodeError:
            self._give_back(connection)  # nothing was sent: still in step
            raise
        except BaseException:
            connection.close()
            raise
        reader = StreamReader(name, DEFAULT_WINDOW, channel.types)
        own = self._timeout if timeout is UNSET else timeout
        return Stream(name, Link(connection, reader, self._give_back, own), self)

    def _connection(self, timeout: Any) -> _Connection:
        """A new connection, not the thread's (a stream's), closed with the proxy."""
        if self._closed:
            raise ConnectionClosed("this proxy was closed; make a new one")
        connection = _Connection(self._open(timeout))
        with self._lock:
            self._connections.add(connection)
        return connection

    def _give_back(self, connection: _Connection) -> None:
        """Take back a stream's connection, in step: the thread's if it has none, else closed."""
        channel = connection.channel
        if (
            self._local.connection is None
            and not self._closed
            and not channel.closed
            and connection.born == generation[0]
        ):
            channel.timeout = self._timeout
            connection.generation = connection.born
            self._local.connection = connection
        else:
            connection.close()

    def _dropped_stream(self, link: Link) -> None:
        """Called by a :class:`Stream` dropped unfinished: cancel it on this thread's next call.

        No I/O here (a finalizer runs it): the link waits in a queue, and
        this thread's connection is flagged so that its next call takes the
        slow path, which cancels what waits.
        """
        self._dropped.append(link)
        try:
            connection = self._local.connection
        except Exception:  # the interpreter is shutting down
            return
        if connection is not None:
            connection.generation = _FLAGGED

    def _cancel_dropped(self) -> None:
        """Cancel the streams dropped unfinished; their connections come back when in step."""
        while True:
            try:
                link = self._dropped.popleft()
            except IndexError:
                return
            link.cancel()

    def close(self) -> None:
        """Close every thread's connection; later calls raise :class:`ConnectionClosed`."""
        self._closed = True
        self._dropped.clear()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            connection.close()

    def __enter__(self) -> Proxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def proxy_class(described: list[dict[str, Any]]) -> type[Proxy]:
    """Make a :class:`Proxy` subclass with one method per described handler.

    Raises:
        ProtocolError: an entry of ``described`` is not a handler description.
    """
    return make_proxy_class(Proxy, described)


def connect(
    socket_path: str | os.PathLike[str],
    *,
    password: str | bytes | None = None,
    password_file: str | os.PathLike[str] | None = None,
    timeout: float | None = None,
    limits: Limits = DEFAULT_LIMITS,
    server_uids: Collection[int] | None = None,
    types: TypeRegistry | None = None,
) -> Proxy:
    """Connect to a passrpc server and return a proxy of its handlers.

    The proxy learns the handlers (names, signatures, docstrings) from the
    server itself, so this works in a process that has no :class:`Server`.
    With neither ``password`` nor ``password_file``, the password is read
    from ``SOCKET.password`` (as ``python -m passrpc serve`` writes it) if
    that is a regular file of yours with mode 0600. When this side has
    registered types, it also asks the server for its own, and logs a
    warning (once per process) for each extension code the two sides give to
    differently named classes.

    Args:
        socket_path: the server's socket.
        password: the server's password.
        password_file: a file holding the password (one trailing newline is
            not part of it).
        timeout: seconds that bound connecting and then every call; None
            waits forever.
        limits: what the server may send (:class:`Limits`).
        server_uids: the uids the server may run as; None means this
            process's own uid or root, so a stranger's socket is refused.
        types: the :class:`TypeRegistry` of the classes that travel; None
            for the default one (what :func:`passrpc.register_type` fills).

    Raises:
        ConfigurationError: no password to be had (the message says why).
        ConnectionClosed: nobody listens at ``socket_path``.
        AuthenticationError: wrong password, or a server of another user.
        Timeout: the server did not answer in time.
        ProtocolError: the server's description of its handlers is malformed.
        Error: the server answered the request for its description with an
            error: that error.
    """
    path = os.fspath(socket_path)
    password = find_password(path, password, password_file)
    wire = wire_options(limits, types)
    channel = open_channel(
        path, password_key(password), timeout=timeout, wire=wire, server_uids=server_uids
    )
    try:
        cls = _describe(channel, path, wire)
        proxy = cls(path, password, timeout=timeout, wire=wire, server_uids=server_uids)
    except BaseException:
        channel.close()
        raise
    proxy._adopt(channel)
    return proxy


def _describe(channel: Channel, path: str, wire: WireOptions) -> type[Proxy]:
    """Ask the server for its handlers (and types, if this side has some); make the class."""
    local = wire.types.names()
    channel.send_frame(DESCRIBE, None)
    if local:  # two requests, one wait: the server answers in order
        channel.send_frame(DESCRIBE, DESCRIBE_TYPES)
    cls = proxy_class(parse_described(*channel.receive_frame(), wire.types))
    if local:
        kind, names = channel.receive_frame()
        if kind == DESCRIBE:
            check_type_names(path, local, names)
    return cls


def server_status(
    socket_path: str | os.PathLike[str],
    *,
    password: str | bytes | None = None,
    password_file: str | os.PathLike[str] | None = None,
    timeout: float | None = 10.0,
    server_uids: Collection[int] | None = None,
) -> ServerStatus:
    """Ask a running server what it has done since it started; return its :class:`ServerStatus`.

    Opens a connection of its own (counted in the figures) and closes it.
    The password is found as by :func:`connect`. This is what
    ``python -m passrpc status`` shows.

    Raises:
        ConfigurationError: no password to be had.
        ConnectionClosed, AuthenticationError, Timeout: as :func:`connect`.
        ProtocolError: the server is older than status requests (it answers
            that it does not implement them) or sent a malformed answer.
    """
    path = os.fspath(socket_path)
    key = password_key(find_password(path, password, password_file))
    with open_channel(path, key, timeout=timeout, server_uids=server_uids) as channel:
        channel.send_frame(STATUS, None)
        return parse_status(*channel.receive_frame())
