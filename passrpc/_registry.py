"""The registry: what a server answers (handlers), what it does on signals, its hooks, its workers.

Filled before the server runs, by :meth:`Server.add_handler` and the
decorators (``@server.handler``, ``@passrpc.handler`` on a subclass's
methods, ``@server.worker``); frozen once the server process has its copy.
The loop, the dispatch and the fork server only read it.
"""

from __future__ import annotations

import functools
import inspect
import signal
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

import attrs

from ._errors import ConfigurationError

F = TypeVar("F", bound=Callable[..., Any])

HOOKS = ("before_fork", "initialize_server", "finalize_server", "preload")
#: The hooks that may be ``async def``: they run in the server process, whose
#: event loop awaits them.
ASYNC_HOOKS = ("initialize_server", "finalize_server")


@attrs.frozen
class Handler:
    """A registered handler: its message name, the function, whether it converses raw,
    whether it streams (a generator function, async or not: see passrpc._streams),
    whether it is awaited."""

    name: str
    fn: Callable[..., Any]
    raw: bool
    stream: bool = False
    #: An ``async def`` (a generator too): awaited on the server's event loop
    #: (:mod:`passrpc._asyncloop`; a stream's items, :mod:`passrpc._asyncitems`).
    is_async: bool = False


@attrs.frozen
class WorkerTarget:
    """A registered worker: its name, what the worker process runs, and what was registered.

    ``fn(channel, *args)`` runs in the worker; ``source`` is the function,
    bound method or Server the user registered, so that
    ``fork_worker(source)`` finds it by the object as well as by the name.
    """

    name: str
    fn: Callable[..., Any]
    source: object


@overload
def handler(name: F, *, raw: bool = False) -> F: ...
@overload
def handler(name: str | None = None, *, raw: bool = False) -> Callable[[F], F]: ...
def handler(name: Any = None, *, raw: bool = False) -> Any:
    """Mark a method of a :class:`Server` subclass as the handler of message ``name``.

    ``name`` defaults to the method's name (``@passrpc.handler`` without
    parentheses works too). With ``raw=True`` the method gets the
    :class:`Channel` after ``self`` and converses itself. An ``async def``
    method is awaited on the server's event loop (an async generator's items
    too: it streams them). The method is returned unchanged.
    """
    if callable(name):
        name._passrpc_handler = (name.__name__, raw)
        return name

    def mark(fn: F) -> F:
        fn._passrpc_handler = (name or fn.__name__, raw)  # type: ignore[attr-defined]
        return fn

    return mark


@overload
def worker(name: F) -> F: ...
@overload
def worker(name: str | None = None) -> Callable[[F], F]: ...
def worker(name: Any = None) -> Any:
    """Mark a method of a :class:`Server` subclass as the worker named ``name``.

    ``name`` defaults to the method's name (``@passrpc.worker`` without
    parentheses works too). The method runs in a worker process forked by
    the server's fork server, as ``method(channel, *args)`` (see
    :meth:`Server.fork_worker`). The method is returned unchanged.
    """
    if callable(name):
        name._passrpc_worker = name.__name__
        return name

    def mark(fn: F) -> F:
        fn._passrpc_worker = name or fn.__name__  # type: ignore[attr-defined]
        return fn

    return mark


def on_signal(sig: str | int) -> Callable[[F], F]:
    """Mark a method of a :class:`Server` subclass as the server process's handler of ``sig``.

    ``sig`` is a name ("USR1" or "SIGUSR1") or a number. The method is
    called with no arguments, in the server's main thread.
    """
    signum = parse_signal(sig)

    def mark(fn: F) -> F:
        fn._passrpc_signal = signum  # type: ignore[attr-defined]
        return fn

    return mark


def parse_signal(sig: str | int) -> signal.Signals:
    """The signal named by ``sig`` ("USR1", "SIGUSR1" or a number), if it can be caught.

    Raises:
        ConfigurationError: no such signal, or SIGKILL/SIGSTOP.
    """
    try:
        if isinstance(sig, str):
            name = sig.upper()
            signum = signal.Signals[name if name.startswith("SIG") else "SIG" + name]
        else:
            signum = signal.Signals(sig)
    except (KeyError, ValueError):
        raise ConfigurationError(f"{sig!r} is not a signal name or number (try 'USR1')") from None
    if signum in (signal.SIGKILL, signal.SIGSTOP):
        raise ConfigurationError(f"{signum.name} cannot be caught; choose another signal")
    return signum


def _shape(fn: Callable[..., Any]) -> Callable[..., Any]:
    """What tells a handler's kind: ``fn`` itself (the inspect.is*function tests see
    through bound methods and functools.partial), or a callable instance's ``__call__``."""
    if inspect.isroutine(fn) or inspect.isclass(fn) or isinstance(fn, functools.partial):
        return fn
    return type(fn).__call__


class Registry:
    """A server's handlers, signal handlers and hooks; refuses changes once frozen.

    The :class:`Server` facade owns one. ``running`` tells whether its server
    runs now; ``frozen`` is set for good in a server process. Either way a
    registration the running server would never see fails loudly instead.
    """

    def __init__(self, running: Callable[[], bool]) -> None:
        self.handlers: dict[str, Handler] = {}
        self.signal_handlers: dict[signal.Signals, Callable[[], Any]] = {}
        self.hooks: dict[str, list[Callable[[], Any]]] = {hook: [] for hook in HOOKS}
        self.workers: dict[str, WorkerTarget] = {}
        self.frozen = False
        #: In a server process with an event loop: awaits an async hook's
        #: coroutine on that loop, from the calling thread (the loop sets it).
        self.awaiter: Callable[[Awaitable[Any]], Any] | None = None
        self._running = running

    def collect(self, obj: object) -> None:
        """Register the methods of ``obj`` marked by :func:`handler`, :func:`on_signal`, :func:`worker`."""
        cls = type(obj)
        for attr in dir(cls):
            member = getattr(cls, attr, None)
            if not callable(member):
                continue
            if hasattr(member, "_passrpc_handler"):
                name, raw = member._passrpc_handler
                self.add_handler(name, getattr(obj, attr), raw=raw)
            if hasattr(member, "_passrpc_signal"):
                self.add_signal_handler(member._passrpc_signal, getattr(obj, attr))
            if hasattr(member, "_passrpc_worker"):
                method = getattr(obj, attr)
                self.add_worker(member._passrpc_worker, method, method)

    def check_open(self, what: str) -> None:
        """Raise ConfigurationError if registration is over (``what`` names the late call)."""
        if self.frozen or self._running():
            raise ConfigurationError(
                f"{what} came after the server started: the server process already has "
                "its copy of the registry; register everything before start() or serve()"
            )

    def add_handler(self, name: str, fn: Callable[..., Any], *, raw: bool = False) -> None:
        """Register ``fn`` for message ``name`` (see :meth:`Server.add_handler`)."""
        self.check_open(f"add_handler({name!r})")
        if not isinstance(name, str) or not name:
            raise ConfigurationError(f"a handler name is a non-empty str, got {name!r}")
        if name in self.handlers:
            raise ConfigurationError(
                f"a handler for {name!r} is already registered ({self.handlers[name].fn!r})"
            )
        shape = _shape(fn)
        agen = inspect.isasyncgenfunction(shape)  # streams, its items awaited on the event loop
        stream = agen or inspect.isgeneratorfunction(shape)
        if raw and stream:
            raise ConfigurationError(
                f"handler {name!r} is raw and a generator function: a raw handler converses "
                "on its channel itself, so it cannot also stream what it yields; drop raw=True "
                "to stream its items, or write the items to the channel yourself"
            )
        is_async = agen or inspect.iscoroutinefunction(shape)
        if raw and is_async:
            raise ConfigurationError(
                f"raw handler {name!r} is an async def: a raw handler converses on a blocking "
                "channel in a thread of its own; make it a plain def (or drop raw=True)"
            )
        self.handlers[name] = Handler(name, fn, raw, stream, is_async)

    def add_signal_handler(self, sig: str | int, fn: Callable[[], Any]) -> None:
        """Run ``fn()`` on ``sig`` (see :meth:`Server.add_signal_handler`)."""
        signum = parse_signal(sig)
        self.check_open(f"add_signal_handler({signum.name})")
        if signum in self.signal_handlers:
            raise ConfigurationError(f"{signum.name} already has a handler")
        self.signal_handlers[signum] = fn

    def add_worker(self, name: str, fn: Callable[..., Any], source: object) -> None:
        """Register ``fn(channel, *args)`` as the worker ``name`` (see :meth:`Server.add_worker`)."""
        self.check_open(f"add_worker({name!r})")
        if not isinstance(name, str) or not name:
            raise ConfigurationError(f"a worker name is a non-empty str, got {name!r}")
        if name in self.workers:
            raise ConfigurationError(
                f"a worker named {name!r} is already registered ({self.workers[name].source!r})"
            )
        self.workers[name] = WorkerTarget(name, fn, source)

    def worker_name(self, target: object) -> str:
        """The name of the registered worker ``target`` (a name, or the object registered).

        Raises:
            ConfigurationError: nothing of that name, or that object, is registered.
        """
        if isinstance(target, str):
            if target in self.workers:
                return target
        else:
            for entry in self.workers.values():
                # == and not `is`: a bound method is a new object at each attribute access
                if entry.source is target or entry.source == target:
                    return entry.name
        known = ", ".join(map(repr, self.workers)) or "none"
        raise ConfigurationError(
            f"{target!r} is not a registered worker (registered: {known}); register it with "
            "@server.worker or server.add_worker before start(): the fork server only knows "
            "what was registered when it was forked"
        )

    def add_hook(self, hook: str, fn: F) -> F:
        """Append ``fn`` to the functions that run at ``hook`` (one of :data:`HOOKS`).

        An ``async def`` is accepted for the hooks of the server process
        (:data:`ASYNC_HOOKS`), which await it on the server's event loop.
        """
        self.check_open(f"on_{hook}")
        if hook not in ASYNC_HOOKS and inspect.iscoroutinefunction(fn):
            raise ConfigurationError(
                f"on_{hook} got an async def; only on_initialize_server and "
                "on_finalize_server may be async (they run on the server's event loop): "
                "make it a plain def"
            )
        self.hooks[hook].append(fn)
        return fn

    def needs_event_loop(self, *hooks: Callable[[], Any]) -> bool:
        """Whether the server process needs its event loop: an async handler, hook, or one of ``hooks``."""
        fns = [*hooks, *self.hooks["initialize_server"], *self.hooks["finalize_server"]]
        return any(h.is_async for h in self.handlers.values()) or any(
            map(inspect.iscoroutinefunction, fns)
        )

    def run_hooks(self, hook: str) -> None:
        """Run the functions registered for ``hook``, in order; await the async ones with :attr:`awaiter`."""
        for fn in self.hooks[hook]:
            result = fn()
            if inspect.isawaitable(result):
                if self.awaiter is None:  # not in a server process that runs its loop
                    raise ConfigurationError(
                        f"the async on_{hook} hook {fn!r} needs the server's event loop, which "
                        "only a server process runs (not a Server run as a worker): make it a "
                        "plain def"
                    )
                self.awaiter(result)
