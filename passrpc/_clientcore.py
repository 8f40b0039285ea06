"""What the sync and asyncio clients share: routing, generated proxy classes, timed views.

A proxy class is made from the server's description of its handlers: one
method per handler, named, documented and signed like it. How a handler is
called depends on its *route* (:func:`passrpc._protocol.route`): "call" (a
request and its reply), "raw" (a conversation on a connection of its own) or
"stream" (items of a generator handler, as an iterator).
Each concrete proxy names the method that carries each route in ``_routes``;
everything else here is written once for both: the generated methods, the
generic ``call()``, ``with_timeout()`` and fork detection. The I/O stays in
:mod:`passrpc._client` (blocking) and :mod:`passrpc.aio` (asyncio).
"""

from __future__ import annotations

import inspect
import keyword
import logging
import os
from collections.abc import Callable, Collection
from typing import Any, ClassVar, TypeVar

from ._handshake import password_key
from ._protocol import Route, described_by_name, route
from ._types import type_name_mismatches
from ._wire import WireOptions

logger = logging.getLogger("passrpc")

# Bumped in every forked child, so a proxy notices, at no cost per call, that
# the connection it holds is its parent's and opens its own.
generation = [0]


def _after_fork() -> None:
    generation[0] += 1


os.register_at_fork(after_in_child=_after_fork)

#: "No timeout given": the proxy's own applies (None means "wait forever").
UNSET: Any = object()


class ProxyBase:
    """What the sync and asyncio proxies share: the handlers a server described, and routing.

    A generated subclass (:func:`make_proxy_class`) fills ``_handler_info``
    and adds one method per handler; an unknown name raises ``AttributeError``
    before any I/O.
    """

    #: The described handlers by name (see ``passrpc._protocol.describe_handlers``).
    _handler_info: ClassVar[dict[str, dict[str, Any]]] = {}
    #: The class name ``repr()`` shows.
    _public_name: ClassVar[str] = "passrpc.Proxy"
    #: The method that carries each route: ``method(name, args, kwargs, timeout)``.
    _routes: ClassVar[dict[Route, str]] = {
        "call": "_call",
        "raw": "_open_raw",
        "stream": "_open_stream",
    }
    #: Whether generated methods are coroutines.
    _is_async: ClassVar[bool] = False

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        password: str | bytes,
        *,
        timeout: float | None,
        wire: WireOptions,
        server_uids: Collection[int] | None,
    ) -> None:
        self._path = os.fspath(socket_path)
        self._key = password_key(password)
        self._timeout = timeout
        self._wire = wire
        self._server_uids = server_uids

    @property
    def handlers(self) -> tuple[str, ...]:
        """The names of the server's handlers."""
        return tuple(self._handler_info)

    def call(self, name: str, /, *args: Any, **kwargs: Any) -> Any:
        """Call handler ``name`` with the arguments given; the generic form of the methods.

        For a raw handler this returns the channel to converse on, and for a
        stream handler the iterator of its items, as its method does. On an
        asyncio proxy, await the result (a stream's async iterator comes
        without ``await``).
        """
        return self._invoke(name, args, kwargs, UNSET)

    def with_timeout(self, timeout: float | None) -> TimedView:
        """Return a view of this proxy whose calls are bounded by ``timeout`` seconds.

        ``proxy.with_timeout(10).hello("Joe")`` (awaited, on an asyncio
        proxy): the view shares the proxy's connections; a call past its
        bound raises :class:`passrpc.Timeout` (a ``TimeoutError``) and
        discards its connection.
        """
        return TimedView(self, timeout)

    def _invoke(
        self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: Any
    ) -> Any:
        """Call ``name`` by its route; ``timeout`` is UNSET for the proxy's own."""
        method = getattr(self, self._routes[route(self._handler_info.get(name))])
        return method(name, args, kwargs, timeout)

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


class TimedView:
    """A proxy's methods with another time bound (see :meth:`ProxyBase.with_timeout`)."""

    def __init__(self, proxy: ProxyBase, timeout: float | None) -> None:
        self._proxy = proxy
        self._timeout = timeout

    def call(self, name: str, /, *args: Any, **kwargs: Any) -> Any:
        """Call handler ``name`` within this view's time bound (see ``call()`` of the proxy)."""
        return self._proxy._invoke(name, args, kwargs, self._timeout)

    def __getattr__(self, name: str) -> Any:
        # Only a handler's generated method is timed; anything else (the
        # proxy's own attributes, which win over clashing handler names) is
        # the proxy's.
        info = self._proxy._method_info(name)
        if info is None:
            return getattr(self._proxy, name)
        proxy, timeout = self._proxy, self._timeout

        def call(*args: Any, **kwargs: Any) -> Any:
            return proxy._invoke(name, args, kwargs, timeout)

        call.__name__ = call.__qualname__ = name
        call.__doc__ = info.get("doc") or None
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


def _method(base: type[ProxyBase], name: str, info: dict[str, Any]) -> Callable[..., Any]:
    """The generated method of handler ``name``: its route's method, with the handler's looks."""
    # Taken from the class once: the call path then looks up no attribute.
    fn = getattr(base, base._routes[route(info)])
    method: Callable[..., Any]
    # A stream's method returns its iterator at once, an async one on an
    # asyncio proxy: it is a plain method there too.
    if base._is_async and route(info) != "stream":

        async def method_async(self: Any, *args: Any, **kwargs: Any) -> Any:
            return await fn(self, name, args, kwargs)

        method = method_async
    else:

        def method_sync(self: Any, *args: Any, **kwargs: Any) -> Any:
            return fn(self, name, args, kwargs)

        method = method_sync

    method.__name__ = method.__qualname__ = name
    method.__doc__ = info.get("doc") or None
    signature = _signature(info)
    if signature is not None:
        method.__signature__ = signature  # type: ignore[union-attr]
    return method


# Mismatches already reported: each is logged once per process, not per connect.
_reported: set[tuple[int, str, str]] = set()


def check_type_names(path: str, local: dict[int, str], remote: object) -> None:
    """Log a warning, once per process for each, for codes the server names another class.

    ``local`` is this side's registry's ``names()``, ``remote`` the server's
    answer to DESCRIBE "types" (an older server's handler list is ignored).
    """
    new = [found for found in type_name_mismatches(local, remote) if found not in _reported]
    if not new:
        return
    _reported.update(new)
    listed = "; ".join(f"code {code} is {ours} here, {theirs} there" for code, ours, theirs in new)
    logger.warning(
        "the server at %s registered other classes under the same extension codes (%s): "
        "such values arrive as the receiver's class, or fail to decode; register the same "
        "class under the same code on both sides",
        path,
        listed,
    )


_P = TypeVar("_P", bound=ProxyBase)


def make_proxy_class(base: type[_P], described: list[Any]) -> type[_P]:
    """Make a subclass of ``base`` with one method per described handler.

    Handlers whose names are not identifiers, or clash with ``base``'s own
    attributes, get no method (the proxy's ``call`` reaches them).

    Raises:
        ProtocolError: an entry of ``described`` is not a handler description.
    """
    info_by_name = described_by_name(described)
    namespace: dict[str, Any] = {"_handler_info": info_by_name}
    reserved = frozenset(dir(base))  # a handler's method must not hide these
    for name, info in info_by_name.items():
        if name.isidentifier() and not keyword.iskeyword(name) and name not in reserved:
            namespace[name] = _method(base, name, info)
    return type(base.__name__, (base,), namespace)
