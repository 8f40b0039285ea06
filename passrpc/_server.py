"""Server: registration, the main loop, and the process lifecycle.

The main thread of a running server only polls (the owner socket, the
listening socket, a wake-up socket for signals) and accepts; every accepted
client gets its own thread, which does the handshake and then serves
requests until the client leaves. Ownership follows Passenger's
AbstractServer: the server holds one end of a socketpair, its owners the
other; forked children of an owner inherit that end, and when every copy is
closed (each owner closed it, exited, or died) the server reads end of file
and quits by itself.
"""

from __future__ import annotations

import contextlib
import errno
import inspect
import logging
import os
import queue
import secrets
import select
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Iterable
from types import FrameType, TracebackType
from typing import Any, TypeVar, overload

import attrs

from ._auth import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    default_uids,
    open_channel,
    password_key,
    server_handshake,
)
from ._channel import Channel, Peer
from ._errors import (
    AuthenticationError,
    ConfigurationError,
    ConnectionClosed,
    EncodeError,
    FrameTooLarge,
    ProtocolError,
    ServerAlreadyStarted,
    ServerNotStarted,
    StartError,
    Timeout,
)
from ._target import find_target
from ._wire import (
    DEFAULT_LIMITS,
    ERROR_BAD_REQUEST,
    ERROR_REMOTE,
    ERROR_UNKNOWN_MESSAGE,
    Kind,
    Limits,
    brief,
    encode_frame,
    error_payload,
)

logger = logging.getLogger("passrpc")

F = TypeVar("F", bound=Callable[..., Any])

#: AF_UNIX's sun_path holds 108 bytes with the terminating NUL.
MAX_SOCKET_PATH = 107

#: Bytes on the owner socket: the server tells its starter it is ready; an
#: owner tells the server to quit for everyone.
_READY = b"R"
_STOP = b"S"

#: Accept errors that mean "out of resources for now", after trio's
#: serve_listeners: log, back off, retry, instead of dying.
_ACCEPT_BACKOFF_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
_ACCEPT_BACKOFF = 0.1

_MESSAGE = int(Kind.MESSAGE)
_CALL = int(Kind.CALL)
_DESCRIBE = int(Kind.DESCRIBE)
_ERROR = int(Kind.ERROR)

_HOOKS = ("before_fork", "initialize_server", "finalize_server")

# The client layer plugs its proxy factories in here (passrpc/__init__ imports
# it), so that Server.proxy() works without the server importing a layer above.
_proxy_factories: dict[str, Callable[..., Any]] = {}

_peer = threading.local()


def current_peer() -> Peer:
    """Return who sent the request the calling handler is serving.

    Call it from a handler (or a raw handler) to learn the client's pid, uid
    and gid as the kernel reports them, for your own authorization or audit.

    Raises:
        LookupError: called outside a handler's thread.
    """
    try:
        return _peer.value  # type: ignore[no-any-return]
    except AttributeError:
        raise LookupError("current_peer() works only inside a passrpc handler") from None


# Registration ---------------------------------------------------------------


@attrs.frozen
class _Handler:
    name: str
    fn: Callable[..., Any]
    raw: bool


@overload
def handler(name: F, *, raw: bool = False) -> F: ...
@overload
def handler(name: str | None = None, *, raw: bool = False) -> Callable[[F], F]: ...
def handler(name: Any = None, *, raw: bool = False) -> Any:
    """Mark a method of a :class:`Server` subclass as the handler of message ``name``.

    ``name`` defaults to the method's name (``@passrpc.handler`` without
    parentheses works too). With ``raw=True`` the method gets the
    :class:`Channel` after ``self`` and converses itself. The method is
    returned unchanged.
    """
    if callable(name):
        name._passrpc_handler = (name.__name__, raw)
        return name

    def mark(fn: F) -> F:
        fn._passrpc_handler = (name or fn.__name__, raw)  # type: ignore[attr-defined]
        return fn

    return mark


def on_signal(sig: str | int) -> Callable[[F], F]:
    """Mark a method of a :class:`Server` subclass as the server process's handler of ``sig``.

    ``sig`` is a name ("USR1" or "SIGUSR1") or a number. The method is
    called with no arguments, in the server's main thread.
    """
    signum = _parse_signal(sig)

    def mark(fn: F) -> F:
        fn._passrpc_signal = signum  # type: ignore[attr-defined]
        return fn

    return mark


def _parse_signal(sig: str | int) -> signal.Signals:
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


def _describe(handlers: dict[str, _Handler]) -> list[dict[str, Any]]:
    """The introspection answer: every handler's name, parameters and docstring."""
    described = []
    for entry in handlers.values():
        params: list[dict[str, Any]] = []
        text = "(...)"
        try:
            # eval_str: show `first: str`, not the string "'str'" that postponed
            # annotations (from __future__ import annotations) leave behind.
            signature = inspect.signature(entry.fn, eval_str=True)
        except Exception:
            try:
                signature = inspect.signature(entry.fn)
            except (TypeError, ValueError):
                signature = None
        if signature is not None:
            parameters = list(signature.parameters.values())
            if entry.raw and parameters:
                parameters = parameters[1:]  # the channel is not the caller's to pass
            for p in parameters:
                item: dict[str, Any] = {"name": p.name, "kind": int(p.kind)}
                if p.default is not p.empty:
                    item["default"] = repr(p.default)
                params.append(item)
            text = str(signature.replace(parameters=parameters, return_annotation=signature.empty))
        described.append(
            {
                "name": entry.name,
                "params": params,
                "signature": text,
                "doc": inspect.getdoc(entry.fn) or "",
                "raw": entry.raw,
            }
        )
    return described


# Processes ------------------------------------------------------------------


@attrs.define
class _Process:
    """A started server as one owner process sees it."""

    pid: int
    owner: socket.socket  # this process's reference: closing it lets go
    starter: int  # pid of the process that started it, the only one that can reap it
    path: str
    identity: tuple[int, int]  # (st_dev, st_ino) of the socket file it listens on
    own_dir: str | None  # the private directory made for the socket, if any
    popen: subprocess.Popen[bytes] | None = None
    exit_status: int | None = None
    # A pidfd turns readable when the server exits, for any process that holds
    # it: forks of the starter inherit it, and can wait for the end without
    # being able to reap it.
    pidfd: int | None = attrs.field(default=None)
    # exited() reaps and closes the pidfd: two threads asking `alive` at once
    # must not both wait for the child, nor both close one descriptor number.
    _lock: threading.Lock = attrs.field(factory=threading.Lock)

    def __attrs_post_init__(self) -> None:
        try:
            self.pidfd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):  # Linux < 5.3, or already reaped
            self.pidfd = None

    def exited(self) -> bool:
        """True once the server process has ended; the starter reaps it and its files."""
        with self._lock:
            return self._exited()

    def _exited(self) -> bool:
        if self.exit_status is not None:
            return True
        if os.getpid() != self.starter:
            if self.pidfd is not None:
                return _readable(self.pidfd, 0)
            return _pid_gone(self.pid)
        if self.popen is not None:
            status = self.popen.poll()
        else:
            try:
                pid, raw = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                pid, raw = self.pid, 0
            status = os.waitstatus_to_exitcode(raw) if pid else None
        if status is None:
            return False
        self.exit_status = status
        # A server that died without its own cleanup (a signal, SIGKILL)
        # leaves its socket file: the starter takes it away once it knows.
        self.remove_files()
        self._close_pidfd()
        return True

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the server process to end; True if it did."""
        deadline = time.monotonic() + timeout
        while not self.exited():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            pidfd = self.pidfd
            try:
                if pidfd is None:
                    time.sleep(min(left, 0.01))
                else:
                    _readable(pidfd, left)
            except (OSError, ValueError):  # another thread saw the end and closed it
                continue
        return True

    def remove_files(self) -> None:
        _unlink_if_ours(self.path, self.identity)
        if self.own_dir is not None:
            with contextlib.suppress(OSError):
                os.rmdir(self.own_dir)

    def kill(self) -> None:
        """SIGKILL the server; through the pidfd where there is one, so never a reused pid."""
        with self._lock, contextlib.suppress(ProcessLookupError, OSError):
            if self.pidfd is not None:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            elif not self._exited():
                os.kill(self.pid, signal.SIGKILL)

    def close_pidfd(self) -> None:
        with self._lock:
            self._close_pidfd()

    def _close_pidfd(self) -> None:
        fd, self.pidfd = self.pidfd, None
        if fd is not None:
            os.close(fd)

    def release(self) -> None:
        """Let go of this process's reference, without stopping the server."""
        self.owner.close()
        if os.getpid() != self.starter:
            self.close_pidfd()
        elif not self.exited():
            with _unreaped_lock:
                _unreaped.append(self)


def _readable(fd: int | socket.socket, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for ``fd`` to be readable (poll: any descriptor number)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(max(0, int(timeout * 1000 + 0.999))))


def _pid_gone(pid: int) -> bool:
    """True once ``pid`` is gone or a zombie (for kernels without pidfd)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, IndexError):
        return True


# Started servers this process let go of (close()) while they still ran; the
# starter reaps them later, so that no zombie outlives the next lifecycle call.
_unreaped: list[_Process] = []
_unreaped_lock = threading.Lock()


def _reap_unreaped() -> None:
    with _unreaped_lock:
        _unreaped[:] = [p for p in _unreaped if os.getpid() == p.starter and not p.exited()]


def _release(process: _Process) -> None:
    """weakref.finalize target: a Server collected while started lets go of it."""
    process.release()


# Descriptors a server process must not hand down to processes its handlers
# fork (see _forget_in_forked_child): a worker holding the listener, the owner
# socket or another client's connection would keep them open after the
# server closed them, and that client would never see the end of its stream.
_serving_sockets: set[socket.socket] = set()


def _forget_in_forked_child() -> None:
    # No lock here: the fork may have happened while another thread held it.
    for sock in list(_serving_sockets):
        with contextlib.suppress(OSError):
            sock.close()
    _serving_sockets.clear()


os.register_at_fork(after_in_child=_forget_in_forked_child)


def _logging_fds() -> set[int]:
    """Descriptors that configured logging handlers write to: a server keeps them.

    Without this a ``logging.FileHandler`` set up before ``start()`` would
    write to /dev/null in the server process.
    """
    loggers: list[Any] = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    fds = set()
    for log in loggers:
        for log_handler in getattr(log, "handlers", ()):
            for name in ("stream", "sock", "socket"):
                with contextlib.suppress(Exception):
                    fds.add(int(getattr(log_handler, name).fileno()))
    return fds


def _child_hygiene(keep: set[int]) -> None:
    """Make a fresh server process: default signals, SIGHUP ignored, no stray descriptors.

    Descriptors are not closed but covered with /dev/null: a Python object
    left over from the parent that closes its number later then closes
    /dev/null, never a descriptor the server opened since.
    """
    with contextlib.suppress(ValueError):
        signal.set_wakeup_fd(-1)
    signal.pthread_sigmask(signal.SIG_SETMASK, ())
    for sig in signal.valid_signals():
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            continue
        with contextlib.suppress(OSError, ValueError, RuntimeError):
            signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd in keep or fd == devnull:
            continue
        try:
            os.fstat(fd)
        except OSError:
            continue  # listdir's own descriptor, already closed
        os.dup2(devnull, fd, inheritable=False)
    os.close(devnull)


def _default_socket_dir() -> str:
    base = os.environ.get("XDG_RUNTIME_DIR") or ""
    if not base or not os.access(base, os.W_OK | os.X_OK) or len(base) > 60:
        base = tempfile.gettempdir()
    if len(base) > 60:
        base = "/tmp"
    return os.path.join(base, "passrpc-" + secrets.token_hex(8))


def _check_path(path: str) -> None:
    size = len(os.fsencode(path))
    if size > MAX_SOCKET_PATH:
        raise ConfigurationError(
            f"socket path {path!r} is {size} bytes; AF_UNIX allows at most {MAX_SOCKET_PATH}: "
            "choose a shorter path (or leave socket_path=None for a safe default)"
        )


def _is_live_socket(path: str) -> bool:
    """True if a server listens at ``path``; never blocks, even on a full backlog."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(path)
    except BlockingIOError:
        return True  # the backlog is full: someone listens
    except OSError:
        return False
    finally:
        probe.close()
    return True


def _identity(path: str) -> tuple[int, int]:
    st = os.lstat(path)
    return (st.st_dev, st.st_ino)


def _unlink_if_ours(path: str, identity: tuple[int, int]) -> None:
    """Remove the socket file unless something else has taken the path since."""
    with contextlib.suppress(OSError):
        if _identity(path) == identity:
            os.unlink(path)


# The server -----------------------------------------------------------------


class Server:
    """A passrpc server: handlers on a password-protected Unix socket, a thread per client.

    Register handlers with :meth:`handler` (or :func:`passrpc.handler` on
    methods of a subclass), then :meth:`start` it in a forked child (or
    ``method="spawn"`` for a fresh interpreter) or :meth:`serve` it in the
    foreground. The process that starts it owns it, and so does every process
    forked from that one afterwards; the server quits by itself once every
    owner has let go, and :meth:`stop` stops it for everyone.

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
        handshake_timeout: seconds a client has to authenticate.
        shutdown_timeout: seconds a quitting server waits for running handlers.
        client_idle_timeout: seconds a connection may sit idle before the
            server closes it; None for never.
        start_timeout: seconds :meth:`start` waits for the server to be ready.
        backlog: the listen backlog.
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
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        shutdown_timeout: float = 2.0,
        client_idle_timeout: float | None = None,
        start_timeout: float = 30.0,
        backlog: int = 1024,
    ) -> None:
        if socket_path is None:
            self._own_dir: str | None = _default_socket_dir()
            self._socket_path = os.path.join(self._own_dir, "server.sock")
        else:
            self._own_dir = None
            self._socket_path = os.path.abspath(os.fspath(socket_path))
        _check_path(self._socket_path)
        self._password = secrets.token_urlsafe(32) if password is None else password
        self._key = password_key(self._password)
        self.max_idle_time = max_idle_time
        #: When a :class:`ServerCollection` may stop this server (its clock); None for never.
        self.next_cleaning_time: float | None = None
        self._allowed_uids = default_uids() | frozenset(allow_uids)
        self._socket_mode = socket_mode
        self._keep_fds = frozenset(keep_fds)
        self._limits = limits
        self._handshake_timeout = handshake_timeout
        self._shutdown_timeout = shutdown_timeout
        self._client_idle_timeout = client_idle_timeout
        self._start_timeout = start_timeout
        self._backlog = backlog
        self._handlers: dict[str, _Handler] = {}
        self._signal_handlers: dict[signal.Signals, Callable[[], Any]] = {}
        self._hooks: dict[str, list[Callable[[], Any]]] = {hook: [] for hook in _HOOKS}
        self._lock = threading.RLock()
        self._process: _Process | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._loop: _Loop | None = None
        self._frozen = False  # True in a server process: registration is over
        for attr in dir(type(self)):
            member = getattr(type(self), attr, None)
            if callable(member) and hasattr(member, "_passrpc_handler"):
                name, raw = member._passrpc_handler
                self.add_handler(name, getattr(self, attr), raw=raw)
            if callable(member) and hasattr(member, "_passrpc_signal"):
                self.add_signal_handler(member._passrpc_signal, getattr(self, attr))

    def _reconfigure(
        self,
        *,
        socket_path: str | None = None,
        password: str | bytes | None = None,
        own_dir: str | None = None,
    ) -> None:
        """Point a server that is not running at another socket and password.

        For the command line (``--socket``) and the spawned process (which
        learns both from its parent); ``own_dir`` is the private directory
        passrpc made for the socket, removed with it.
        """
        if self.started:
            raise ServerAlreadyStarted(f"{self!r} is running; it cannot change its socket now")
        if socket_path is not None:
            path = os.path.abspath(socket_path)
            _check_path(path)
            self._socket_path = path
            self._own_dir = own_dir
        if password is not None:
            self._password = password
            self._key = password_key(password)

    # Registration -----------------------------------------------------------

    def _check_registration(self, what: str) -> None:
        if self._frozen or self._process is not None or self._loop is not None:
            raise ConfigurationError(
                f"{what} came after the server started: the server process already has "
                "its copy of the registry; register everything before start() or serve()"
            )

    def add_handler(self, name: str, fn: Callable[..., Any], *, raw: bool = False) -> None:
        """Register ``fn`` as the handler of message ``name``.

        The handler gets the message's arguments; what it returns is the
        reply (a tuple becomes a reply of several values). With ``raw=True``
        it gets the :class:`Channel` first and converses itself.

        Raises:
            ConfigurationError: ``name`` is taken, or the server already started.
        """
        self._check_registration(f"add_handler({name!r})")
        if not isinstance(name, str) or not name:
            raise ConfigurationError(f"a handler name is a non-empty str, got {name!r}")
        if name in self._handlers:
            raise ConfigurationError(
                f"a handler for {name!r} is already registered ({self._handlers[name].fn!r})"
            )
        self._handlers[name] = _Handler(name, fn, raw)

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
        signum = _parse_signal(sig)
        self._check_registration(f"add_signal_handler({signum.name})")
        if signum in self._signal_handlers:
            raise ConfigurationError(f"{signum.name} already has a handler")
        self._signal_handlers[signum] = fn

    def on_signal(self, sig: str | int) -> Callable[[F], F]:
        """Decorator form of :meth:`add_signal_handler`; the function is returned unchanged."""

        signum = _parse_signal(sig)  # a bad name fails at the decorator line

        def register(fn: F) -> F:
            self.add_signal_handler(signum, fn)
            return fn

        return register

    def _add_hook(self, hook: str, fn: F) -> F:
        self._check_registration(f"on_{hook}")
        self._hooks[hook].append(fn)
        return fn

    def on_before_fork(self, fn: F) -> F:
        """Register ``fn()`` to run in the parent just before it forks the server."""
        return self._add_hook("before_fork", fn)

    def on_initialize_server(self, fn: F) -> F:
        """Register ``fn()`` to run in the server process before it accepts clients."""
        return self._add_hook("initialize_server", fn)

    def on_finalize_server(self, fn: F) -> F:
        """Register ``fn()`` to run in the server process after its loop ended."""
        return self._add_hook("finalize_server", fn)

    def before_fork(self) -> None:
        """Hook: runs in the parent just before fork. Override it, or use :meth:`on_before_fork`."""
        for fn in self._hooks["before_fork"]:
            fn()

    def initialize_server(self) -> None:
        """Hook: runs in the server process before it accepts clients.

        Override it (call ``super()`` to keep decorator hooks), or use
        :meth:`on_initialize_server`. If it raises, :meth:`start` raises
        :class:`StartError`.
        """
        for fn in self._hooks["initialize_server"]:
            fn()

    def finalize_server(self) -> None:
        """Hook: runs in the server process after its loop ended, before it exits."""
        for fn in self._hooks["finalize_server"]:
            fn()

    # Properties -------------------------------------------------------------

    @property
    def socket_path(self) -> str:
        """The absolute path of the server's Unix socket."""
        return self._socket_path

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
        return f"<{type(self).__name__} {self._socket_path!r} {state}>"

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
        return open_channel(self._socket_path, self._key, timeout=timeout, limits=self._limits)

    def proxy(self, *, timeout: float | None = None) -> Any:
        """Return a proxy whose methods call this server's handlers (see :class:`passrpc.Proxy`)."""
        return _proxy_factories["sync"](self, timeout=timeout)

    def async_proxy(self, *, timeout: float | None = None) -> Any:
        """Return an asyncio proxy whose methods are coroutines (see :mod:`passrpc.aio`)."""
        return _proxy_factories["async"](self, timeout=timeout)

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
            _reap_unreaped()
            if method == "spawn":
                target = target or find_target(self)
                if target is None:
                    raise ConfigurationError(
                        "start(method='spawn') needs to import this server in a fresh "
                        "interpreter: bind it to a module-level name, or pass "
                        "target='module:attribute'"
                    )
            listener, identity = self._listen()
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            process = None
            try:
                if method == "fork":
                    pid, popen = self._fork(listener, theirs), None
                else:
                    assert target is not None
                    popen = self._spawn(listener, theirs, ours, target, identity)
                    pid = popen.pid
                process = _Process(
                    pid, ours, os.getpid(), self._socket_path, identity, self._own_dir, popen
                )
                theirs.close()
                listener.close()
                self._wait_ready(process)
            except BaseException:
                theirs.close()
                listener.close()
                ours.close()
                if process is not None:
                    process.kill()
                    process.wait(5.0)
                    process.close_pidfd()
                self._remove_files(identity)
                raise
            self._process = process
            self._finalizer = weakref.finalize(self, _release, process)
            logger.debug("started server pid %d on %s", pid, self._socket_path)

    def _listen(self) -> tuple[socket.socket, tuple[int, int]]:
        """Create, bind and listen on the socket, never reachable by group or others."""
        path = self._socket_path
        if self._own_dir is not None:
            # Others may pass through (never list) only when the socket lets them in.
            dir_mode = 0o711 if self._socket_mode & 0o077 else 0o700
            with contextlib.suppress(FileExistsError):
                os.mkdir(self._own_dir, 0o700)
            st = os.lstat(self._own_dir)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o066:
                raise StartError(f"{self._own_dir!r} is not a private directory of ours")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if self._own_dir is not None:
                # The directory is 0700: the socket is private from the moment it exists.
                self._take_stale_path(path)
                sock.bind(path)
                os.chmod(path, self._socket_mode)
                os.chmod(self._own_dir, dir_mode)
            else:
                self._bind_privately(sock, path)
            sock.listen(self._backlog)
            return sock, _identity(path)
        except BaseException:
            sock.close()
            raise

    def _bind_privately(self, sock: socket.socket, path: str) -> None:
        """Bind in a fresh 0700 directory beside ``path``, chmod, then link into place."""
        parent = os.path.dirname(path)
        try:
            private = tempfile.mkdtemp(prefix=".prpc", dir=parent)
        except OSError as exc:
            raise StartError(
                f"cannot create the socket in {parent!r}: {exc.strerror}; "
                "choose a socket_path in a directory you can write to"
            ) from exc
        temporary = os.path.join(private, "s")
        try:
            if len(os.fsencode(temporary)) > MAX_SOCKET_PATH:
                raise ConfigurationError(
                    f"binding {path!r} safely needs {temporary!r}, over AF_UNIX's "
                    f"{MAX_SOCKET_PATH} bytes: choose a shorter path"
                )
            sock.bind(temporary)
            os.chmod(temporary, self._socket_mode)
            self._take_stale_path(path)
            try:
                os.link(temporary, path)  # fails if anything appeared there meanwhile
            except FileExistsError:
                raise StartError(f"{path!r} appeared while the server was starting") from None
        finally:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            with contextlib.suppress(OSError):
                os.rmdir(private)

    def _take_stale_path(self, path: str) -> None:
        """Remove ``path`` only if it is a socket nobody listens on."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise StartError(
                f"{path!r} exists and is not a socket; passrpc never removes it: "
                "choose another socket_path or remove it yourself"
            )
        if _is_live_socket(path):
            raise StartError(
                f"a server already listens on {path!r}: stop it, or choose another socket_path"
            )
        try:
            os.unlink(path)
        except OSError as exc:
            raise StartError(
                f"a stale socket at {path!r} cannot be removed ({exc.strerror}): "
                "remove it yourself, or choose another socket_path"
            ) from exc
        logger.info("removed stale socket %s", path)

    def _remove_files(self, identity: tuple[int, int]) -> None:
        _unlink_if_ours(self._socket_path, identity)
        if self._own_dir is not None:
            with contextlib.suppress(OSError):
                os.rmdir(self._own_dir)

    def _fork(self, listener: socket.socket, owner: socket.socket) -> int:
        self.before_fork()
        for stream in (sys.stdout, sys.stderr):  # else the child repeats buffered output
            with contextlib.suppress(Exception):
                stream.flush()
        pid = os.fork()
        if pid == 0:
            self._run_as_child(listener, owner)
        return pid

    def _spawn(
        self,
        listener: socket.socket,
        theirs: socket.socket,
        ours: socket.socket,
        target: str,
        identity: tuple[int, int],
    ) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        paths = [p for p in sys.path if p and os.path.isdir(p)]
        env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), *paths])
        argv = [
            sys.executable,
            "-m",
            "passrpc._spawn",
            target,
            str(listener.fileno()),
            str(theirs.fileno()),
        ]
        popen = subprocess.Popen(
            argv, pass_fds=(listener.fileno(), theirs.fileno()), env=env, stdin=subprocess.DEVNULL
        )
        config = {
            "password": self._password,
            "socket_path": self._socket_path,
            "own_dir": self._own_dir,
            "identity": list(identity),
            "log_level": logger.getEffectiveLevel(),
        }
        data, _ = encode_frame(_MESSAGE, [config])
        ours.sendall(data, socket.MSG_NOSIGNAL)
        return popen

    def _wait_ready(self, process: _Process) -> None:
        ready = _readable(process.owner, self._start_timeout)
        data = process.owner.recv(1) if ready else None
        if data == _READY:
            return
        if data is None:
            raise StartError(
                f"the server process {process.pid} was not ready within {self._start_timeout} s; "
                "it was killed (raise start_timeout if initialize_server is slow)"
            )
        process.wait(5.0)
        raise StartError(
            f"the server process {process.pid} exited with status {process.exit_status} "
            "before it was ready; its log (the 'passrpc' logger) says why"
        )

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
                process.owner.send(_STOP, socket.MSG_NOSIGNAL)
            process.owner.close()
            if not process.wait(timeout):
                logger.warning(
                    "server pid %d did not stop within %s s; killing it", process.pid, timeout
                )
                process.kill()
                process.wait(1.0)
            process.remove_files()
            process.close_pidfd()
            _reap_unreaped()

    def close(self) -> None:
        """Let go of this process's reference without stopping the server.

        The server quits once every owner has let go (or exited, or died).
        Closing twice, or a server that is not started, is harmless.
        """
        with self._lock:
            process, self._process = self._process, None
            if process is not None and self._finalizer is not None:
                self._finalizer()
            _reap_unreaped()

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
            listener, identity = self._listen()
            owner_fd = owner if owner is None or isinstance(owner, int) else owner.fileno()
            loop = self._loop = _Loop(self, listener, owner_fd, identity, foreground=True)
        try:
            loop.run()
        finally:
            self._loop = None

    def _run_as_child(
        self,
        listener: socket.socket,
        owner: socket.socket,
        identity: tuple[int, int] | None = None,
    ) -> None:
        """Become the server process: hygiene, the loop, then ``os._exit``. Never returns."""
        code = 1
        try:
            keep = {0, 1, 2, listener.fileno(), owner.fileno(), *self._keep_fds, *_logging_fds()}
            _child_hygiene(keep)
            self._frozen = True
            self._process = None
            self._finalizer = None
            if identity is None:
                identity = _identity(self._socket_path)
            self._loop = _Loop(
                self, listener, owner.fileno(), identity, foreground=False, ready=owner
            )
            self._loop.run()
            code = 0
        except BaseException:
            logger.exception("server process %d failed", os.getpid())
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os._exit(code)


#: Client threads kept waiting for a next client, and for how long.
_MAX_IDLE_WORKERS = 16
_IDLE_WORKER_SECONDS = 30.0


class _Worker:
    """A client thread and its inbox of accepted sockets."""

    __slots__ = ("jobs", "thread")

    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue[socket.socket | None] = queue.SimpleQueue()
        self.thread: threading.Thread | None = None


class _Loop:
    """One run of a server's main loop, in whichever process serves it."""

    def __init__(
        self,
        server: Server,
        listener: socket.socket,
        owner_fd: int | None,
        identity: tuple[int, int],
        *,
        foreground: bool,
        ready: socket.socket | None = None,
    ) -> None:
        self.server = server
        self.listener = listener
        self.owner_fd = owner_fd
        self.identity = identity
        self.foreground = foreground
        self.ready = ready
        self.done = threading.Event()
        self.thread = threading.current_thread()
        self.handlers = dict(server._handlers)
        self.describe = _describe(self.handlers)
        self.clients: dict[socket.socket, threading.Thread] = {}
        self.idle: list[_Worker] = []  # client threads waiting for their next client
        self.clients_lock = threading.Lock()
        self.stopping = False
        self.wake_r, self.wake_w = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        self.saved_signals: dict[int, Any] = {}
        self.saved_wakeup: int | None = None

    def in_client_thread(self) -> bool:
        with self.clients_lock:
            return threading.current_thread() in self.clients.values()

    def request_stop(self) -> None:
        self.stopping = True
        with contextlib.suppress(OSError):
            self.wake_w.send(b"x")

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        fn = self.server._signal_handlers.get(signal.Signals(signum))
        if fn is not None:
            try:
                fn()
            except Exception:  # a broken signal handler must not take the server down
                logger.exception("the %s handler raised", signal.Signals(signum).name)
        else:  # SIGINT or SIGTERM in the foreground
            logger.info("received %s; stopping", signal.Signals(signum).name)
            self.request_stop()

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            logger.debug("serving outside the main thread: signals are left alone")
            return
        self.saved_wakeup = signal.set_wakeup_fd(self.wake_w.fileno(), warn_on_full_buffer=False)
        wanted: set[int] = set(self.server._signal_handlers)
        if self.foreground:
            wanted |= {signal.SIGINT, signal.SIGTERM}
        for signum in wanted:
            self.saved_signals[signum] = signal.signal(signum, self._on_signal)

    def _restore_signals(self) -> None:
        for signum, previous in self.saved_signals.items():
            signal.signal(signum, previous)
        if self.saved_wakeup is not None:
            signal.set_wakeup_fd(self.saved_wakeup)

    def run(self) -> None:
        server = self.server
        own = {self.listener, self.wake_r, self.wake_w}
        if self.ready is not None:
            own.add(self.ready)
        _serving_sockets.update(own)
        try:
            self._install_signals()
            try:
                server.initialize_server()
            except BaseException:
                self.listener.close()  # nobody will accept: take the socket away now
                server._remove_files(self.identity)
                raise
            if self.ready is not None:
                self.ready.send(_READY, socket.MSG_NOSIGNAL)
            logger.info("passrpc server pid %d listening on %s", os.getpid(), server.socket_path)
            try:
                self._poll()
            finally:
                self.stopping = True  # also if _poll raised: no worker goes back to idle
                self._shutdown()
                server.finalize_server()
        finally:
            self._restore_signals()
            self.wake_r.close()
            self.wake_w.close()
            _serving_sockets.difference_update(own)  # another loop in this process keeps its own
            self.done.set()

    def _poll(self) -> None:
        poller = select.poll()
        listener_fd = self.listener.fileno()
        wake_fd = self.wake_r.fileno()
        self.listener.setblocking(False)
        poller.register(listener_fd, select.POLLIN)
        poller.register(wake_fd, select.POLLIN)
        if self.owner_fd is not None:
            poller.register(self.owner_fd, select.POLLIN)
        resume_accepting: float | None = None
        while not self.stopping:
            timeout_ms = None
            if resume_accepting is not None:
                timeout_ms = max(0, int((resume_accepting - time.monotonic()) * 1000))
            events = poller.poll(timeout_ms)
            if resume_accepting is not None and time.monotonic() >= resume_accepting:
                poller.register(listener_fd, select.POLLIN)
                resume_accepting = None
            for fd, _ in events:
                if fd == wake_fd:
                    with contextlib.suppress(OSError):
                        self.wake_r.recv(4096)
                elif fd == self.owner_fd:
                    self._read_owner()
                elif fd == listener_fd and not self._accept():
                    poller.unregister(listener_fd)
                    resume_accepting = time.monotonic() + _ACCEPT_BACKOFF

    def _read_owner(self) -> None:
        assert self.owner_fd is not None
        try:
            data = os.read(self.owner_fd, 64)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            logger.info("every owner has let go; stopping")
            self.stopping = True
        elif _STOP in data:
            logger.info("an owner asked the server to stop")
            self.stopping = True

    def _accept(self) -> bool:
        """Accept waiting clients; False when out of resources (back off)."""
        for _ in range(64):
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return True
            except OSError as exc:
                if exc.errno in _ACCEPT_BACKOFF_ERRNOS:
                    logger.warning("accept failed (%s); backing off for %s s", exc, _ACCEPT_BACKOFF)
                    return False
                logger.debug("accept failed: %s", exc)
                continue
            _serving_sockets.add(sock)  # before any thread can fork: its children must drop it
            if not self._dispatch(sock):
                return False
        return True

    def _dispatch(self, sock: socket.socket) -> bool:
        """Hand a new client to an idle worker thread, or start one; False if none can start."""
        with self.clients_lock:
            if self.idle:
                worker = self.idle.pop()
                self.clients[sock] = worker.thread  # type: ignore[assignment]
                worker.jobs.put(sock)
                return True
        worker = _Worker()
        worker.thread = threading.Thread(
            target=self._work, args=(worker, sock), name="passrpc-client", daemon=True
        )
        with self.clients_lock:
            self.clients[sock] = worker.thread
        try:
            worker.thread.start()
        except RuntimeError as exc:
            logger.warning("cannot start a client thread (%s); backing off", exc)
            with self.clients_lock:
                del self.clients[sock]
            _serving_sockets.discard(sock)
            sock.close()
            return False
        return True

    def _work(self, worker: _Worker, sock: socket.socket | None) -> None:
        """A client thread: serves one client at a time, then waits a while for the next.

        Reusing threads spares each new connection a thread start, a large
        part of a short connection's cost; each client still has a thread
        of its own for as long as it stays connected.
        """
        while sock is not None:
            self._serve_client(sock)
            with self.clients_lock:
                if self.stopping or len(self.idle) >= _MAX_IDLE_WORKERS:
                    return
                self.idle.append(worker)
            try:
                sock = worker.jobs.get(timeout=_IDLE_WORKER_SECONDS)
            except queue.Empty:
                with self.clients_lock:
                    if worker in self.idle:
                        self.idle.remove(worker)
                        return
                sock = worker.jobs.get()  # claimed just as the wait ended: the job is coming

    def _serve_client(self, sock: socket.socket) -> None:
        server = self.server
        channel = Channel(sock, limits=server._limits)
        try:
            try:
                peer = server_handshake(
                    channel, server._key, server._allowed_uids, server._handshake_timeout
                )
            except (AuthenticationError, ProtocolError, ConnectionClosed, Timeout) as exc:
                logger.warning("refused a connection: %s", exc)
                return
            channel.timeout = server._client_idle_timeout
            _peer.value = peer
            self._converse(channel)
        except Exception:
            logger.exception("a client connection failed")
        finally:
            _serving_sockets.discard(sock)
            with self.clients_lock:
                self.clients.pop(sock, None)
                channel.close()

    def _converse(self, channel: Channel) -> None:
        """Serve one authenticated client's requests until it leaves."""
        handlers = self.handlers
        receive = channel._receive
        send = channel._send
        try:
            while True:
                try:
                    kind, payload = receive()
                except Timeout:
                    logger.debug("closing a connection idle for %s s", channel.timeout)
                    return
                except ProtocolError as exc:
                    logger.warning("closing a connection that broke the protocol: %s", exc)
                    return
                kwargs = None
                if (
                    kind == _MESSAGE
                    and type(payload) is list
                    and payload
                    and type(payload[0]) is str
                ):
                    name = payload[0]
                    args = payload[1:]
                elif kind == _CALL and _is_call(payload):
                    name, args, kwargs = payload
                elif kind == _DESCRIBE:
                    send(_DESCRIBE, self.describe)
                    continue
                else:
                    send(_ERROR, _bad_request(kind, payload))
                    continue
                entry = handlers.get(name)
                if entry is None:
                    send(_ERROR, _unknown_message(name, handlers))
                    continue
                if entry.raw:
                    if not self._run_raw(channel, entry, args, kwargs):
                        return
                    continue
                try:
                    result = entry.fn(*args, **kwargs) if kwargs else entry.fn(*args)
                except Exception:
                    self._send_exception(channel, name, *sys.exc_info())
                    continue
                try:
                    # A tuple is a reply of several values; anything else, of one.
                    send(_MESSAGE, result if type(result) is tuple else (result,))
                except (EncodeError, FrameTooLarge) as exc:  # nothing was sent
                    send(_ERROR, _unsendable(name, exc))
                # Let go now, not at the next request: received or returned
                # FileDescriptors close as soon as nobody holds them.
                payload = args = result = None  # type: ignore[assignment]
        except ConnectionClosed:
            return

    def _run_raw(
        self, channel: Channel, entry: _Handler, args: list[Any], kwargs: dict[str, Any] | None
    ) -> bool:
        """Run a raw handler; False when the conversation is over."""
        try:
            entry.fn(channel, *args, **(kwargs or {}))
        except Exception:
            if channel.closed:
                return False
            self._send_exception(channel, entry.name, *sys.exc_info())
        return not channel.closed

    def _send_exception(
        self, channel: Channel, name: str, exc_type: Any, exc: Any, tb: TracebackType | None
    ) -> None:
        logger.info("handler %r raised %s: %s", name, exc_type.__name__, exc)
        remote_type = exc_type.__qualname__
        if exc_type.__module__ not in ("builtins", "__main__"):
            remote_type = f"{exc_type.__module__}.{remote_type}"
        text = "".join(traceback.format_exception(exc_type, exc, tb))
        with contextlib.suppress(ConnectionClosed, Timeout, EncodeError):
            channel._send(_ERROR, error_payload(ERROR_REMOTE, remote_type, str(exc), text))

    def _shutdown(self) -> None:
        """Stop accepting, remove the socket file, let running handlers finish within a bound."""
        self.listener.close()
        self.server._remove_files(self.identity)
        with self.clients_lock:
            for worker in self.idle:
                worker.jobs.put(None)
            self.idle.clear()
            clients = list(self.clients.items())
            for sock, _ in clients:
                # Ends each thread's wait for a next request; a running handler
                # still finishes and sends its reply.
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RD)
        deadline = time.monotonic() + self.server._shutdown_timeout
        for _, thread in clients:
            thread.join(max(0.0, deadline - time.monotonic()))
        busy = sum(thread.is_alive() for _, thread in clients)
        if busy:
            logger.warning(
                "%d handler(s) still running after %s s; leaving them",
                busy,
                self.server._shutdown_timeout,
            )


def _bad_request(kind: Any, payload: Any) -> dict[str, str]:
    return error_payload(
        ERROR_BAD_REQUEST,
        "ProtocolError",
        "a request is a message whose first value is the handler name (a str); "
        f"got a frame of kind {kind!r} with {_short(payload)}",
    )


def _unknown_message(name: str, handlers: dict[str, _Handler]) -> dict[str, str]:
    return error_payload(
        ERROR_UNKNOWN_MESSAGE,
        "UnknownMessage",
        f"the server has no handler for {name!r}; it has: {sorted(handlers)}",
    )


def _unsendable(name: str, exc: Exception) -> dict[str, str]:
    return error_payload(
        ERROR_REMOTE, "EncodeError", f"handler {name!r} returned a value that cannot be sent: {exc}"
    )


def _is_call(payload: Any) -> bool:
    return (
        type(payload) is list
        and len(payload) == 3
        and type(payload[0]) is str
        and type(payload[1]) is list
        and type(payload[2]) is dict
        and all(type(k) is str for k in payload[2])
    )


def _short(value: Any) -> str:
    return brief(value)
