"""The client: generated proxies with a persistent connection per thread, and ``connect()``.

It also holds what the asyncio client (:mod:`passrpc.aio`) shares with the
sync one, so that the two cannot drift apart: :class:`_ProxyBase` (the
described handlers, errors for names the server lacks, the repr), the shape of
a request (:func:`_request`) and of a reply (:func:`_unwrap`), the check of
the server's description (:func:`_check_described`), the class factory
(:func:`_make_proxy_class`) and fork detection (``_generation``).
"""

from __future__ import annotations

import inspect
import keyword
import os
import threading
import weakref
from collections.abc import Callable, Collection
from types import TracebackType
from typing import Any, TypeVar

from ._auth import open_channel, password_key
from ._channel import Channel
from ._errors import ConnectionClosed, EncodeError, ProtocolError
from ._server import Server, _describe, _proxy_factories
from ._wire import DEFAULT_LIMITS, Kind, Limits, brief, error_from_payload

_MESSAGE = int(Kind.MESSAGE)
_CALL = int(Kind.CALL)
_ERROR = int(Kind.ERROR)
_DESCRIBE = int(Kind.DESCRIBE)

# Bumped in every forked child, so a proxy notices, at no cost per call, that
# the connection it holds is its parent's and opens its own.
_generation = [0]


def _after_fork() -> None:
    _generation[0] += 1


os.register_at_fork(after_in_child=_after_fork)

_UNSET: Any = object()


class _ProxyBase:
    """What the sync and asyncio proxies share: the handlers a server described, and their errors.

    A generated subclass (:func:`_make_proxy_class`) fills ``_handler_info``
    and adds one method per handler; an unknown name raises ``AttributeError``
    before any I/O.
    """

    #: The described handlers by name (see ``passrpc._server._describe``).
    _handler_info: dict[str, dict[str, Any]] = {}
    #: The class name ``repr()`` shows.
    _public_name = "passrpc.Proxy"

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        password: str | bytes,
        *,
        timeout: float | None,
        limits: Limits,
        server_uids: Collection[int] | None,
    ) -> None:
        self._path = os.fspath(socket_path)
        self._key = password_key(password)
        self._timeout = timeout
        self._limits = limits
        self._server_uids = server_uids

    @property
    def handlers(self) -> tuple[str, ...]:
        """The names of the server's handlers."""
        return tuple(self._handler_info)

    def _is_raw(self, name: str) -> bool:
        info = self._handler_info.get(name)
        return info is not None and bool(info.get("raw"))

    def _method_info(self, name: str) -> dict[str, Any] | None:
        """The description of handler ``name`` if it has a generated method, else None.

        A name that clashes with the proxy's own attributes has none.
        """
        info = self._handler_info.get(name)
        return info if info is not None and name in type(self).__dict__ else None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if name in self._handler_info:
            raise AttributeError(
                f"handler {name!r} clashes with a proxy attribute; use proxy.call({name!r}, ...)"
            )
        raise AttributeError(
            f"the server at {self._path!r} has no handler {name!r}; it has: {sorted(self._handler_info)}"
        )

    def __repr__(self) -> str:
        return f"<{self._public_name} {self._path!r} handlers={sorted(self._handler_info)}>"


def _request(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, Any]:
    """Return the frame kind and payload that call handler ``name``.

    CALL carries keyword arguments; without them the plainer MESSAGE does.
    (:meth:`Proxy._call`, the hot path, inlines this.)
    """
    if kwargs:
        return _CALL, (name, args, kwargs)
    return _MESSAGE, (name, *args)


def _unwrap(kind: int, reply: Any) -> Any:
    """Return a call's result from its reply frame: the single value, or a tuple of several.

    Raises:
        RemoteError, UnknownMessage, ProtocolError: the server answered with an
            ERROR frame; the connection is still in step.
        ProtocolError: the frame is not a reply; the connection is out of step.
    """
    if kind == _MESSAGE and type(reply) is list:
        return reply[0] if len(reply) == 1 else tuple(reply)
    if kind == _ERROR:
        raise error_from_payload(reply)
    raise ProtocolError(f"expected a reply, the server sent a frame of kind {kind!r}")


def _check_described(kind: int, described: Any) -> list[Any]:
    """Return the handler descriptions from the server's answer to a DESCRIBE request.

    Raises:
        Error: the server answered with an ERROR frame: the error it sent.
        ProtocolError: any other answer that is not a list of descriptions.
    """
    if kind == _ERROR:
        raise error_from_payload(described)
    if kind != _DESCRIBE or not isinstance(described, list):
        raise ProtocolError(f"the server answered introspection with a frame of kind {kind!r}")
    return described


class _Connection:
    """One thread's connection of a proxy; closes it when the thread's locals go."""

    __slots__ = ("__weakref__", "channel", "generation")

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.generation = _generation[0]

    def close(self) -> None:
        """End the connection; in a forked child, close only the child's copy of it.

        Shutting the socket down wakes a call blocked on it in another
        thread; in a child it would end the parent's connection too.
        """
        if self.generation == _generation[0]:
            self.channel.shutdown()  # wakes a call blocked in its thread
        else:
            self.channel.close()

    def __del__(self) -> None:
        self.close()


class _PerThread(threading.local):
    """A proxy's per-thread state: the thread's connection, None until its first call."""

    connection: _Connection | None = None


class Proxy(_ProxyBase):
    """Calls a server's handlers as methods: ``proxy.hello("Joe", "Dalton")``.

    Each handler is a method with the handler's name, signature and
    docstring; ``dir(proxy)`` lists them, and an unknown name raises
    ``AttributeError`` before any I/O. A call returns the handler's single
    value, or a tuple when it returned several; a handler's exception is
    raised as :class:`RemoteError`. Each thread gets its own connection,
    kept across calls and opened again if the server closed it while idle
    (a call that may have run is never sent twice); a forked child opens its
    own. Handlers whose names clash with the proxy's own methods, or are not
    identifiers, are reached through :meth:`call`. A raw handler's method
    sends the first message on a new connection and returns that
    :class:`Channel` for you to converse on and close.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        password: str | bytes,
        *,
        timeout: float | None = None,
        limits: Limits = DEFAULT_LIMITS,
        server_uids: Collection[int] | None = None,
    ) -> None:
        super().__init__(
            socket_path, password, timeout=timeout, limits=limits, server_uids=server_uids
        )
        self._local = _PerThread()
        self._connections: weakref.WeakSet[_Connection] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._closed = False

    def _channel(self) -> Channel:
        connection = self._local.connection
        if connection is not None and connection.generation == _generation[0]:
            return connection.channel
        return self._reconnect()

    def _reconnect(self) -> Channel:
        if self._closed:
            raise ConnectionClosed("this proxy was closed; make a new one")
        self._drop()
        return self._adopt(self._open())

    def _open(self) -> Channel:
        return open_channel(
            self._path,
            self._key,
            timeout=self._timeout,
            limits=self._limits,
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

    def call(self, name: str, /, *args: Any, **kwargs: Any) -> Any:
        """Call handler ``name`` with the arguments given; the generic form of the methods.

        For a raw handler this returns the :class:`Channel` to converse on,
        as its method does.
        """
        if self._is_raw(name):
            return self._open_raw(name, args, kwargs)
        return self._call(name, args, kwargs)

    def _call(
        self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: Any = _UNSET
    ) -> Any:
        # The hot path of every proxy call: kept flat on purpose.
        connection = self._local.connection
        if connection is not None and connection.generation == _generation[0]:
            channel = connection.channel
        else:
            channel = self._reconnect()
        if kwargs:
            kind, payload = _CALL, (name, args, kwargs)
        else:
            kind, payload = _MESSAGE, (name, *args)
        if timeout is not _UNSET:
            channel.timeout = timeout
        try:
            try:
                channel._send(kind, payload)
            except ConnectionClosed:
                # On AF_UNIX a closed peer fails the send at once: the call was
                # never delivered, so sending it on a new connection is safe.
                channel = self._reconnect()
                if timeout is not _UNSET:
                    channel.timeout = timeout
                channel._send(kind, payload)
            kind, reply = channel._receive()
        except EncodeError:
            raise  # nothing was sent: the connection is still in step
        except BaseException:
            self._drop()  # a late reply must never answer the next call
            raise
        finally:
            if timeout is not _UNSET and not channel.closed:
                channel.timeout = self._timeout
        if kind == _MESSAGE and type(reply) is list:
            return reply[0] if len(reply) == 1 else tuple(reply)
        if kind != _ERROR:
            self._drop()  # not a reply: the connection is out of step
        return _unwrap(kind, reply)

    def _open_raw(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Channel:
        channel = self._open()
        try:
            channel._send(*_request(name, args, kwargs))
        except BaseException:
            channel.close()
            raise
        return channel

    def with_timeout(self, timeout: float | None) -> _TimedProxy:
        """Return a view of this proxy whose calls are bounded by ``timeout`` seconds.

        ``proxy.with_timeout(10).hello("Joe")``: the view shares the proxy's
        connections; a call past its bound raises :class:`Timeout` (a
        ``TimeoutError``) and discards its connection.
        """
        return _TimedProxy(self, timeout)

    def close(self) -> None:
        """Close every thread's connection; later calls raise :class:`ConnectionClosed`."""
        self._closed = True
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


class _TimedProxy:
    """A proxy's methods with another time bound (see :meth:`Proxy.with_timeout`)."""

    def __init__(self, proxy: Proxy, timeout: float | None) -> None:
        self._proxy = proxy
        self._timeout = timeout

    def call(self, name: str, /, *args: Any, **kwargs: Any) -> Any:
        if self._proxy._is_raw(name):  # the raw channel, as from the proxy's own call()
            return self._proxy._open_raw(name, args, kwargs)
        return self._proxy._call(name, args, kwargs, self._timeout)

    def __getattr__(self, name: str) -> Any:
        # Only a handler's generated method is timed; anything else (the
        # proxy's own attributes, which win over clashing handler names, and
        # raw handlers) is the proxy's.
        info = self._proxy._method_info(name)
        if info is None or info.get("raw"):
            return getattr(self._proxy, name)
        proxy, timeout = self._proxy, self._timeout

        def call(*args: Any, **kwargs: Any) -> Any:
            return proxy._call(name, args, kwargs, timeout)

        return call

    def __dir__(self) -> list[str]:
        return dir(self._proxy)


def _signature(info: dict[str, Any]) -> inspect.Signature | None:
    class _Default:
        def __init__(self, text: str) -> None:
            self.text = text

        def __repr__(self) -> str:
            return self.text

    try:
        params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        for p in info.get("params", []):
            default = _Default(p["default"]) if "default" in p else inspect.Parameter.empty
            params.append(
                inspect.Parameter(p["name"], inspect._ParameterKind(p["kind"]), default=default)
            )
        return inspect.Signature(params)
    except (KeyError, TypeError, ValueError):
        return None


def _dress(method: Callable[..., Any], name: str, info: dict[str, Any]) -> Callable[..., Any]:
    """Give a generated method the handler's name, docstring and signature."""
    method.__name__ = method.__qualname__ = name
    method.__doc__ = info.get("doc") or None
    signature = _signature(info)
    if signature is not None:
        method.__signature__ = signature  # type: ignore[attr-defined]
    return method


def _method(name: str, info: dict[str, Any]) -> Callable[..., Any]:
    if info.get("raw"):

        def method(self: Proxy, *args: Any, **kwargs: Any) -> Any:
            return self._open_raw(name, args, kwargs)

    else:

        def method(self: Proxy, *args: Any, **kwargs: Any) -> Any:
            return self._call(name, args, kwargs)

    return _dress(method, name, info)


_P = TypeVar("_P", bound=_ProxyBase)


def _make_proxy_class(
    base: type[_P],
    described: list[Any],
    make_method: Callable[[str, dict[str, Any]], Callable[..., Any]],
) -> type[_P]:
    """Make a subclass of ``base`` with one method, from ``make_method``, per described handler.

    Handlers whose names are not identifiers, or clash with ``base``'s own
    attributes, get no method (the proxy's ``call`` reaches them).

    Raises:
        ProtocolError: an entry of ``described`` is not a handler description.
    """
    info_by_name: dict[str, dict[str, Any]] = {}
    namespace: dict[str, Any] = {"_handler_info": info_by_name}
    reserved = frozenset(dir(base))  # a handler's method must not hide these
    for info in described:
        if not isinstance(info, dict) or not isinstance(info.get("name"), str):
            raise ProtocolError(
                f"the server described a handler as {brief(info)}, which is not a handler "
                "description: run the same passrpc version on both sides"
            )
        name = info["name"]
        info_by_name[name] = info
        if name.isidentifier() and not keyword.iskeyword(name) and name not in reserved:
            namespace[name] = make_method(name, info)
    return type(base.__name__, (base,), namespace)


def proxy_class(described: list[dict[str, Any]]) -> type[Proxy]:
    """Make a :class:`Proxy` subclass with one method per described handler.

    Raises:
        ProtocolError: an entry of ``described`` is not a handler description.
    """
    return _make_proxy_class(Proxy, described, _method)


def connect(
    socket_path: str | os.PathLike[str],
    *,
    password: str | bytes,
    timeout: float | None = None,
    limits: Limits = DEFAULT_LIMITS,
    server_uids: Collection[int] | None = None,
) -> Proxy:
    """Connect to a passrpc server and return a proxy of its handlers.

    The proxy learns the handlers (names, signatures, docstrings) from the
    server itself, so this works in a process that has no :class:`Server`.

    Args:
        socket_path: the server's socket.
        password: the server's password.
        timeout: seconds that bound connecting and then every call; None
            waits forever.
        limits: what the server may send (:class:`Limits`).
        server_uids: the uids the server may run as; None means this
            process's own uid or root, so a stranger's socket is refused.

    Raises:
        ConnectionClosed: nobody listens at ``socket_path``.
        AuthenticationError: wrong password, or a server of another user.
        Timeout: the server did not answer in time.
        ProtocolError: the server's description of its handlers is malformed.
        Error: the server answered the request for its description with an
            error: that error.
    """
    path = os.fspath(socket_path)
    key = password_key(password)
    channel = open_channel(path, key, timeout=timeout, limits=limits, server_uids=server_uids)
    try:
        channel._send(_DESCRIBE, None)
        described = _check_described(*channel._receive())
        proxy = proxy_class(described)(
            path, password, timeout=timeout, limits=limits, server_uids=server_uids
        )
    except BaseException:
        channel.close()
        raise
    proxy._adopt(channel)
    return proxy


def _server_proxy(
    server: Server,
    *,
    timeout: float | None = None,
    make_class: Callable[[list[dict[str, Any]]], type[_ProxyBase]] = proxy_class,
) -> Any:
    """Return ``server.proxy()``; with aio's class factory, ``server.async_proxy()``."""
    cls: Any = make_class(_describe(server._handlers))
    return cls(server.socket_path, server.password, timeout=timeout, limits=server._limits)


def _async_server_proxy(server: Server, *, timeout: float | None = None) -> Any:
    from .aio import _server_proxy as make  # asyncio is loaded only when wanted

    return make(server, timeout=timeout)


_proxy_factories["sync"] = _server_proxy
_proxy_factories["async"] = _async_server_proxy
