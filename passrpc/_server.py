"""Server: the facade a user holds, over the registry, the loop and the process side.

:class:`Server` keeps what a user configures and registers, and runs it:
:meth:`Server.start` forks (or spawns) a server process, :meth:`Server.serve`
runs the loop in this one. The work is elsewhere, one job to a module:
handlers and hooks in :mod:`passrpc._registry`, requests in
:mod:`passrpc._dispatch`, polling and threads in :mod:`passrpc._loop`, the
socket file in :mod:`passrpc._socketfile`, processes in
:mod:`passrpc._process`. ``docs/architecture.md`` has the map.

Ownership follows Passenger's AbstractServer: the server holds one end of a
socketpair, its owners the other; forked children of an owner inherit that
end, and when every copy is closed (each owner closed it, exited, or died)
the server reads end of file and quits by itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import sys
import threading
import weakref
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any, overload

import attrs

from ._auth import default_uids, open_channel
from ._channel import Channel
from ._client import Proxy, proxy_class, server_status
from ._errors import ConfigurationError, ServerAlreadyStarted, ServerNotStarted
from ._forking import WorkerMethods
from ._handshake import DEFAULT_HANDSHAKE_TIMEOUT, password_key
from ._loop import DEFAULT_THREADS, App, ServeLoop, Settings
from ._process import (
    STOP,
    ServerProcess,
    child_hygiene,
    logging_fds,
    reap_unreaped,
    release,
    spawn,
)
from ._protocol import ServerStatus, describe_handlers
from ._registry import F, Registry, parse_signal
from ._socketfile import SocketFile, check_path, identity
from ._target import find_target
from ._types import TypeRegistry
from ._wire import DEFAULT_LIMITS, Limits, wire_options

if TYPE_CHECKING:
    from .aio import AsyncProxy

logger = logging.getLogger("passrpc")


class Server(WorkerMethods):
    """A passrpc server: handlers on a password-protected Unix socket, a pool of threads.

    Register handlers with :meth:`handler` (or :func:`passrpc.handler` on
    methods of a subclass), then :meth:`start` it in a forked child (or
    ``method="spawn"`` for a fresh interpreter) or :meth:`serve` it in the
    foreground. The process that starts it owns it, and so does every process
    forked from that one afterwards; the server quits by itself once every
    owner has let go, and :meth:`stop` stops it for everyone. Handlers that
    need worker processes fork them with :meth:`fork_worker`.

    Args:
        socket_path: where to listen; None for a fresh private directory
            (mode 0700) under ``$XDG_RUNTIME_DIR`` or the temp directory.
        password: the shared secret; None generates one with ``secrets``.
        max_idle_time: seconds a :class:`ServerCollection` keeps this server
            unused; None or 0 for never.
        allow_uids: uids allowed to connect besides the server's own and root;
            give them a ``socket_mode`` that lets them reach the socket too.
        socket_mode: the socket file's permission bits (0600: only this user).
        keep_fds: descriptor numbers the server process keeps open besides
            stdin, stdout, stderr and its own sockets.
        limits: what clients may send (:class:`Limits`).
        types: the :class:`TypeRegistry` of the classes that travel; None for
            the default one (what :func:`passrpc.register_type` fills). A
            forked server has the registrations its parent had at
            :meth:`start`; a spawned one, those that importing it makes.
        handshake_timeout: seconds a client has to authenticate.
        shutdown_timeout: seconds a quitting server waits for running handlers.
        client_idle_timeout: seconds a connection may sit idle before the
            server closes it; None for never.
        start_timeout: seconds :meth:`start` waits for the server to be ready.
        backlog: the listen backlog.
        max_connections: connections held at once, authenticated or not (None:
            4,096, or half of ``RLIMIT_NOFILE``); one more gets :class:`ServerBusy`.
        threads: the most threads serving clients at once; idle clients hold none.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        password: str | bytes | None = None,
        *,
        max_idle_time: float | None = None,
        allow_uids: Iterable[int] = (),
        socket_mode: int = 0o600,
        keep_fds: Iterable[int] = (),
        limits: Limits = DEFAULT_LIMITS,
        types: TypeRegistry | None = None,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        shutdown_timeout: float = 2.0,
        client_idle_timeout: float | None = None,
        start_timeout: float = 30.0,
        backlog: int = 1024,
        max_connections: int | None = None,
        threads: int = DEFAULT_THREADS,
    ) -> None:
        self._files = SocketFile.choose(socket_path, socket_mode)
        self._password = secrets.token_urlsafe(32) if password is None else password
        self.max_idle_time = max_idle_time
        #: When a :class:`ServerCollection` may stop this server (its clock); None for never.
        self.next_cleaning_time: float | None = None
        self._settings = Settings(
            key=password_key(self._password),
            allowed_uids=default_uids() | frozenset(allow_uids),
            wire=wire_options(limits, types),
            handshake_timeout=handshake_timeout,
            client_idle_timeout=client_idle_timeout,
            shutdown_timeout=shutdown_timeout,
            backlog=backlog,
            max_connections=max_connections,
            threads=threads,
        )
        self._keep_fds = frozenset(keep_fds)
        self._start_timeout = start_timeout
        self._lock = threading.RLock()
        self._process: ServerProcess | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._loop: ServeLoop | None = None
        self._registry = Registry(running=lambda: self.started)
        self._registry.collect(self)

    # Registration -----------------------------------------------------------

    def add_handler(self, name: str, fn: Callable[..., Any], *, raw: bool = False) -> None:
        """Register ``fn`` as the handler of message ``name``.

        The handler gets the message's arguments; what it returns is the
        reply (a tuple becomes a reply of several values). With ``raw=True``
        it gets the :class:`Channel` first and converses itself; an async def is awaited.

        Raises:
            ConfigurationError: ``name`` is taken, the server started, or ``fn`` cannot be served.
        """
        self._registry.add_handler(name, fn, raw=raw)

    @overload
    def handler(self, name: F, *, raw: bool = False) -> F: ...
    @overload
    def handler(self, name: str | None = None, *, raw: bool = False) -> Callable[[F], F]: ...
    def handler(self, name: Any = None, *, raw: bool = False) -> Any:
        """Decorator form of :meth:`add_handler`; the function is returned unchanged.

        ``name`` defaults to the function's name; ``@server.handler`` without
        parentheses works too.
        """
        if callable(name):
            self.add_handler(name.__name__, name, raw=raw)
            return name

        def register(fn: F) -> F:
            self.add_handler(name or fn.__name__, fn, raw=raw)
            return fn

        return register

    def add_signal_handler(self, sig: str | int, fn: Callable[[], Any]) -> None:
        """Run ``fn()`` in the server process whenever it receives ``sig``.

        ``sig`` is "USR1", "SIGUSR1" or a number. A handler for HUP replaces
        the server's default of ignoring it; handlers for INT or TERM replace
        the graceful stop of :meth:`serve`.

        Raises:
            ConfigurationError: an unknown or uncatchable signal, one already
                handled, or a server already started.
        """
        self._registry.add_signal_handler(sig, fn)

    def on_signal(self, sig: str | int) -> Callable[[F], F]:
        """Decorator form of :meth:`add_signal_handler`; the function is returned unchanged."""

        signum = parse_signal(sig)  # a bad name fails at the decorator line

        def register(fn: F) -> F:
            self.add_signal_handler(signum, fn)
            return fn

        return register

    def on_before_fork(self, fn: F) -> F:
        """Register ``fn()`` to run in the parent just before it forks the server."""
        return self._registry.add_hook("before_fork", fn)

    def on_initialize_server(self, fn: F) -> F:
        """Register ``fn()`` to run in the server process before it accepts clients (async: on its loop)."""
        return self._registry.add_hook("initialize_server", fn)

    def on_finalize_server(self, fn: F) -> F:
        """Register ``fn()`` to run in the server process after its loop ended (async: on its loop)."""
        return self._registry.add_hook("finalize_server", fn)

    def before_fork(self) -> None:
        """Hook: runs in the parent just before fork. Override it, or use :meth:`on_before_fork`."""
        self._registry.run_hooks("before_fork")

    def initialize_server(self) -> None:
        """Hook: runs in the server process before it accepts clients.

        Override it (call ``super()`` to keep decorator hooks), or use
        :meth:`on_initialize_server`. If it raises, :meth:`start` raises
        :class:`StartError`.
        """
        self._registry.run_hooks("initialize_server")

    def finalize_server(self) -> None:
        """Hook: runs in the server process after its loop ended, before it exits."""
        self._registry.run_hooks("finalize_server")

    # Properties -------------------------------------------------------------

    @property
    def socket_path(self) -> str:
        """The absolute path of the server's Unix socket."""
        return self._files.path

    @property
    def password(self) -> str | bytes:
        """The shared secret clients authenticate with."""
        return self._password

    @property
    def pid(self) -> int | None:
        """The server process's pid while started (this process's pid under :meth:`serve`)."""
        if self._process is not None:
            return self._process.pid
        return os.getpid() if self._loop is not None else None

    @property
    def started(self) -> bool:
        """True from :meth:`start` until :meth:`stop` or :meth:`close` (or while serving)."""
        return self._process is not None or self._loop is not None

    @property
    def alive(self) -> bool:
        """True while the server process runs; False once it exited, even before :meth:`stop`."""
        process = self._process
        if process is None:
            return self._loop is not None
        return not process.exited()

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.started else "not started"
        return f"<{type(self).__name__} {self._files.path!r} {state}>"

    # Clients ----------------------------------------------------------------

    def connect(self, *, timeout: float | None = None) -> Channel:
        """Open an authenticated :class:`Channel` to this server for one conversation.

        Use it as ``with server.connect() as channel:``; the channel closes at
        the end of the block. ``timeout`` bounds connecting, the handshake
        and then every read and write on the channel.

        Raises:
            ConnectionClosed: the server is not running.
            AuthenticationError: the handshake failed.
        """
        settings = self._settings
        return open_channel(self._files.path, settings.key, timeout=timeout, wire=settings.wire)

    def proxy(self, *, timeout: float | None = None) -> Proxy:
        """Return a proxy whose methods call this server's handlers (see :class:`passrpc.Proxy`)."""
        cls = proxy_class(describe_handlers(self._registry.handlers.values()))
        return cls(self._files.path, self._password, timeout=timeout, wire=self._settings.wire)

    def status(self, *, timeout: float | None = 10.0) -> ServerStatus:
        """Ask the running server for its figures (see :func:`passrpc.server_status`)."""
        return server_status(self._files.path, password=self._password, timeout=timeout)

    def async_proxy(self, *, timeout: float | None = None) -> AsyncProxy:
        """Return an asyncio proxy whose methods are coroutines (see :mod:`passrpc.aio`)."""
        from .aio import async_proxy_class  # asyncio is loaded only when wanted

        cls = async_proxy_class(describe_handlers(self._registry.handlers.values()))
        return cls(self._files.path, self._password, timeout=timeout, wire=self._settings.wire)

    # Lifecycle --------------------------------------------------------------

    def start(self, *, method: str = "fork", target: str | None = None) -> None:
        """Start the server in a child process; return once it accepts connections.

        The listening socket is made here, in the parent, before the child
        exists, so no client can race its creation.

        Args:
            method: "fork" (default) forks this process; "spawn" runs a fresh
                interpreter (``python -m passrpc._spawn``), for parents that
                run threads or must not fork.
            target: with "spawn", the ``module:attribute`` that names this
                server; found automatically when the server is a module-level
                name.

        Raises:
            ServerAlreadyStarted: it is already started.
            StartError: the socket path is taken, or the server failed before
                it was ready (its ``initialize_server`` raised, say).
            ConfigurationError: "spawn" without a target that can be found.
        """
        if method not in ("fork", "spawn"):
            raise ConfigurationError(f"method must be 'fork' or 'spawn', got {method!r}")
        with self._lock:
            if self.started:
                raise ServerAlreadyStarted(
                    f"{self!r} is already running; stop() it first or use it as it is"
                )
            reap_unreaped()
            if method == "spawn":
                target = self._spawn_target(target)
            listener, identity = self._files.listen(self._settings.backlog)
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            process = None
            try:
                if method == "fork":
                    pid, popen = self._fork(listener, theirs), None
                else:
                    assert target is not None
                    popen = spawn(target, listener, theirs, ours, _spawn_config(self, identity))
                    pid = popen.pid
                process = ServerProcess(pid, ours, os.getpid(), self._files, identity, popen)
                theirs.close()
                listener.close()
                process.wait_ready(self._start_timeout)
            except BaseException:
                theirs.close()
                listener.close()
                ours.close()
                if process is not None:
                    process.kill()
                    process.wait(5.0)
                    process.close_pidfd()
                self._files.remove(identity)
                raise
            self._process = process
            self._finalizer = weakref.finalize(self, release, process)
            logger.debug("started server pid %d on %s", pid, self._files.path)

    def _fork(self, listener: socket.socket, owner: socket.socket) -> int:
        self.before_fork()
        for stream in (sys.stdout, sys.stderr):  # else the child repeats buffered output
            with contextlib.suppress(Exception):
                stream.flush()
        pid = os.fork()
        if pid == 0:
            run_server_process(self, listener, owner)
        return pid

    def _spawn_target(self, target: str | None) -> str:
        """The ``module:attribute`` a fresh interpreter imports this server by."""
        target = target or find_target(self)
        if target is None:
            raise ConfigurationError(
                "start(method='spawn') needs to import this server in a fresh "
                "interpreter: bind it to a module-level name, or pass "
                "target='module:attribute'"
            )
        return target

    def stop(self, timeout: float = 4.0) -> None:
        """Stop the server for every owner, and wait for it to end.

        Tells the server to quit, lets go of this process's reference and
        removes the socket file; waits up to ``timeout`` seconds, then kills
        the process with SIGKILL. The process that started the server reaps
        it. Under :meth:`serve`, this ends the loop instead.

        Raises:
            ServerNotStarted: the server is not started.
        """
        loop = self._loop
        if loop is not None and self._process is None:
            loop.request_stop()
            # From a handler or a signal handler the loop cannot end before we
            # return: waiting would only stall it.
            if not loop.in_client_thread() and threading.current_thread() is not loop.thread:
                loop.done.wait(timeout)
            return
        with self._lock:
            process = self._process
            if process is None:
                raise ServerNotStarted(f"{self!r} is not started; start() it first")
            self._process = None
            if self._finalizer is not None:
                self._finalizer.detach()
            with contextlib.suppress(OSError):
                process.owner.send(STOP, socket.MSG_NOSIGNAL)
            process.owner.close()
            if not process.wait(timeout):
                logger.warning(
                    "server pid %d did not stop within %s s; killing it", process.pid, timeout
                )
                process.kill()
                process.wait(1.0)
            process.remove_files()
            process.close_pidfd()
            reap_unreaped()

    def close(self) -> None:
        """Let go of this process's reference without stopping the server.

        The server quits once every owner has let go (or exited, or died).
        Closing twice, or a server that is not started, is harmless.
        """
        with self._lock:
            process, self._process = self._process, None
            if process is not None and self._finalizer is not None:
                self._finalizer()
            reap_unreaped()

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._process is not None:
            self.stop()

    # Running ----------------------------------------------------------------

    def serve(self, *, owner: int | Any | None = None) -> None:
        """Run the server in this process until it is told to stop; blocking.

        The loop ends when ``owner`` (a socket, pipe or descriptor number)
        reaches end of file, when :meth:`stop` is called from another thread,
        or, in the main thread, on SIGINT or SIGTERM (unless you registered
        handlers for those). Hooks run as under :meth:`start`, but for
        ``before_fork``. Signal handlers are restored afterwards.

        Raises:
            ServerAlreadyStarted: it is already started or serving.
            StartError: the socket path is taken.
        """
        with self._lock:
            if self.started:
                raise ServerAlreadyStarted(f"{self!r} is already running")
            listener, identity = self._files.listen(self._settings.backlog)
            owner_fd = owner if owner is None or isinstance(owner, int) else owner.fileno()
            loop = self._loop = ServeLoop(
                self._app(), listener, owner_fd, identity, foreground=True
            )
        try:
            loop.run()
        finally:
            self._loop = None

    def _app(self) -> App:
        """What the loop serves: the registry, the settings, the socket file, the hooks, the forks."""
        return App(
            self._registry,
            self._settings,
            self._files,
            self.initialize_server,
            self.finalize_server,
            self._fork_server(self._settings.wire, self._keep_fds),
        )


# What the command line and the spawned process do to a Server, beyond its
# public API. They live here, beside the class whose state they change.


def _spawn_config(server: Server, identity: tuple[int, int]) -> dict[str, Any]:
    """What a spawned server process cannot know by itself (see passrpc._spawn)."""
    return {
        "password": server._password,
        "socket_path": server._files.path,
        "own_dir": server._files.own_dir,
        "identity": list(identity),
        "log_level": logger.getEffectiveLevel(),
    }


def socket_file(server: Server) -> SocketFile:
    """The socket file ``server`` will listen on (for files the CLI puts beside it)."""
    return server._files


def reconfigure(
    server: Server,
    *,
    socket_path: str | None = None,
    password: str | bytes | None = None,
    own_dir: str | None = None,
) -> None:
    """Point a server that is not running at another socket and password.

    For the command line (``--socket``) and the spawned process (which
    learns both from its parent); ``own_dir`` is the private directory
    passrpc made for the socket, removed with it.

    Raises:
        ServerAlreadyStarted: the server runs.
        ConfigurationError: the path is too long for AF_UNIX.
    """
    if server.started:
        raise ServerAlreadyStarted(f"{server!r} is running; it cannot change its socket now")
    if socket_path is not None:
        path = os.path.abspath(socket_path)
        check_path(path)
        server._files = SocketFile(path, own_dir, server._files.mode)
    if password is not None:
        server._password = password
        server._settings = attrs.evolve(server._settings, key=password_key(password))


def run_server_process(
    server: Server,
    listener: socket.socket,
    owner: socket.socket,
    ready_identity: tuple[int, int] | None = None,
) -> None:
    """Become ``server``'s process: hygiene, the loop, then ``os._exit``. Never returns.

    Runs in the child that :meth:`Server.start` forked, or in the fresh
    interpreter of ``start(method="spawn")``.
    """
    code = 1
    try:
        keep = {0, 1, 2, listener.fileno(), owner.fileno(), *server._keep_fds, *logging_fds()}
        child_hygiene(keep)
        server._registry.frozen = True  # this process's copy is the one that serves
        server._process = None
        server._finalizer = None
        if ready_identity is None:
            ready_identity = identity(server._files.path)
        server._loop = ServeLoop(
            server._app(), listener, owner.fileno(), ready_identity, foreground=False, ready=owner
        )
        server._loop.run()
        code = 0
    except BaseException:
        logger.exception("server process %d failed", os.getpid())
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)
