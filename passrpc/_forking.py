"""What :class:`~passrpc.Server` offers for forking workers: registering them, and forking one.

A server with workers registered gets a fork server
(:mod:`passrpc._forkserver`): a process forked before the server starts any
thread, which runs the ``preload`` hook once and then forks each worker a
handler asks for with :meth:`WorkerMethods.fork_worker`. The methods live in
this mixin so that the ``Server`` facade stays one screenful of lifecycle;
``docs/server.md`` (section "Forking workers") is the guide.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any, overload

from ._errors import ConfigurationError, WorkerError
from ._forkserver import ForkApp
from ._registry import F, Registry
from ._wire import WireOptions
from ._workers import ForkServerLink, Worker, serve_channel

logger = logging.getLogger("passrpc")

#: Seconds fork_worker waits by default: the preload may still run when a handler asks.
DEFAULT_FORK_TIMEOUT = 30.0


class WorkerMethods:
    """The worker half of :class:`Server`'s API (a mixin; ``Server`` is the class you use)."""

    _registry: Registry
    _forks: ForkServerLink | None = None
    # Server's hooks, which a Server registered as a worker runs in the worker.
    initialize_server: Callable[[], None]
    finalize_server: Callable[[], None]

    def add_worker(self, name: str, target: Callable[..., Any] | WorkerMethods) -> None:
        """Register ``target`` as the worker ``name``, for :meth:`fork_worker`.

        ``target`` is a function, run in the worker as ``target(channel,
        *args)`` with the worker's end of the connection; or a
        :class:`Server`, whose handlers then answer requests on that
        connection (its ``initialize_server`` first, its
        ``finalize_server`` last, in the worker) until the requester closes
        it. Register workers before the server starts: the fork server knows
        what was registered when it was forked.

        Raises:
            ConfigurationError: ``name`` is taken, ``target`` is neither, the
                server already started, or ``target`` is a Server whose
                ``initialize_server`` or ``finalize_server`` is an ``async def``
                (a worker runs no event loop to await it).
        """
        if isinstance(target, WorkerMethods):  # a Server: the mixin is its base
            for hook in (target.initialize_server, target.finalize_server):
                # The worker calls the hooks plainly: a coroutine would never run.
                if inspect.iscoroutinefunction(hook):
                    raise ConfigurationError(
                        f"worker {name!r}: {hook.__qualname__} is an async def, which only a "
                        "server process awaits (on its event loop); a Server run as a worker "
                        "has none: make it a plain def"
                    )
            fn: Callable[..., Any] = functools.partial(
                serve_channel, target._registry, target.initialize_server, target.finalize_server
            )
        elif callable(target):
            fn = target
        else:
            raise ConfigurationError(
                f"a worker is a function fn(channel, *args) or a passrpc.Server, got {target!r}"
            )
        self._registry.add_worker(name, fn, target)

    @overload
    def worker(self, name: F) -> F: ...
    @overload
    def worker(self, name: str | None = None) -> Callable[[F], F]: ...
    def worker(self, name: Any = None) -> Any:
        """Decorator form of :meth:`add_worker` for a function; it is returned unchanged.

        ``name`` defaults to the function's name; ``@server.worker`` without
        parentheses works too.
        """
        if callable(name):
            self.add_worker(name.__name__, name)
            return name

        def register(fn: F) -> F:
            self.add_worker(name or fn.__name__, fn)
            return fn

        return register

    def on_preload(self, fn: F) -> F:
        """Register ``fn()`` to run once in the fork server, before it forks any worker."""
        return self._registry.add_hook("preload", fn)

    def preload(self) -> None:
        """Hook: runs once in the fork server; what it loads, every worker starts with.

        Override it (call ``super()`` to keep decorator hooks), or use
        :meth:`on_preload`. It runs in its own process, so a slow preload
        delays only :meth:`fork_worker`, never the server's other handlers.
        Start no thread here: workers are forked from this process. If it
        raises, every :meth:`fork_worker` raises :class:`WorkerError` with
        the traceback.
        """
        self._registry.run_hooks("preload")

    def fork_worker(
        self,
        fn: str | Callable[..., Any] | WorkerMethods,
        /,
        *args: Any,
        timeout: float | None = DEFAULT_FORK_TIMEOUT,
    ) -> Worker:
        """Fork a worker that runs ``fn(channel, *args)``; return it, connected to you.

        Call it in the server process: from a handler (any number at once),
        or ``initialize_server``. ``fn`` is a registered worker, or its
        name. The fork server, a single-threaded process forked before the
        server's threads, forks the worker, so no lock held by a handler
        thread is copied locked into it; the worker gets the same hygiene as
        a server process (only stdio, its connection, the descriptors among
        ``args``, ``keep_fds``, logging's and what the preload opened stay;
        every signal at its default, SIGHUP ignored). ``args`` travel as
        msgpack, descriptors included. The returned :class:`Worker` holds
        your end of the connection, its pid, and its exit status once the
        fork server reaps it.

        Args:
            fn: a registered worker (function, method or Server), or its name.
            args: what ``fn`` gets after the channel.
            timeout: seconds to wait for the worker, the preload included;
                None waits as long as it takes.

        Raises:
            ConfigurationError: ``fn`` is not a registered worker.
            WorkerError: not in the server process, the preload raised,
                ``fork()`` failed, or the fork server is gone.
            Timeout: no worker within ``timeout`` (the preload still runs?).
            EncodeError: an argument cannot travel; nothing was sent.
        """
        name = self._registry.worker_name(fn)
        forks = self._forks
        if forks is None:
            raise WorkerError(
                "fork_worker() works in the server process (in a handler or a hook) of a "
                "started server; from elsewhere, call a handler that forks the worker"
            )
        return forks.fork(name, args, timeout)

    def _fork_server(self, wire: WireOptions, keep_fds: frozenset[int]) -> ForkServerLink | None:
        """A link to a fork server for one run of the loop; None when no worker is registered."""
        workers = self._registry.workers
        if not workers:
            if self._registry.hooks["preload"] or type(self).preload is not WorkerMethods.preload:
                logger.warning(
                    "%r has a preload but no worker, so no fork server: the preload never "
                    "runs; register a worker with @server.worker or add_worker()",
                    self,
                )
            self._forks = None
            return None
        app = ForkApp(self.preload, {n: w.fn for n, w in workers.items()}, wire, keep_fds)
        self._forks = ForkServerLink(app)
        return self._forks
