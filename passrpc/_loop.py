"""The main loop: one poller for every socket, a bounded pool of threads for the work, a clean stop.

The main thread of a running server polls (epoll) the owner socket, the
listening socket, a wake-up socket for signals, and every connection that
has no thread: clients in the middle of the handshake, which it drives
itself without blocking (:mod:`passrpc._connection`), and authenticated
clients parked idle. A connection that becomes readable goes to the
:class:`~passrpc._pool.WorkerPool`, whose thread serves its requests while
they keep coming and parks it again when they stop. So an idle connection,
or an unfinished handshake, costs a socket and a few kilobytes, never a
thread; and a herd of clients that all close at once is a herd of short
jobs, not of threads. The poller also keeps the time bounds: the
handshake's, and ``client_idle_timeout`` for parked connections.

Ownership follows Passenger's AbstractServer: end of file on the owner
socket means every owner let go, and the loop ends. Accept errors that mean
"out of resources" back off instead of ending the server, and so does a
pool thread that cannot start. Over ``max_connections``, a new connection
is accepted only to be told "busy" and closed.
"""

from __future__ import annotations

import contextlib
import errno
import inspect
import logging
import math
import os
import resource
import select
import signal
import socket
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any

import attrs

from ._channel import DescriptorBudget
from ._connection import (
    AUTHENTICATED,
    AWAITING,
    CLOSED,
    NEW,
    PARKED,
    PATIENCE,
    QUEUED,
    SERVING,
    Deadlines,
    ServerConnection,
    timeval,
)
from ._dispatch import AsyncCall, Dispatcher
from ._errors import (
    AuthenticationError,
    ConfigurationError,
    ConnectionClosed,
    ProtocolError,
    Timeout,
)
from ._pool import WorkerPool
from ._process import READY, STOP, serving_sockets
from ._protocol import busy
from ._registry import Registry
from ._socketfile import SocketFile
from ._wire import WireOptions, encode_frame
from ._workers import ForkServerLink

if TYPE_CHECKING:
    from ._asyncloop import AsyncLoop

logger = logging.getLogger("passrpc")

#: Accept errors that mean "out of resources for now", after trio's
#: serve_listeners: log, back off, retry, instead of dying.
ACCEPT_BACKOFF_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_BACKOFF = 0.1

#: Descriptors that may wait for the rest of their frame, over all of a
#: server's connections: enough for 16 clients sending frames of 64 at once,
#: and never more than a quarter of the process's descriptor limit.
MAX_WAITING_DESCRIPTORS = 1024

#: Connections a server holds at once unless told otherwise (``max_connections``):
#: far more than local clients need, few enough that their sockets and buffers
#: stay in the tens of megabytes; lowered to half the descriptor limit.
DEFAULT_MAX_CONNECTIONS = 4096

#: Pool threads unless told otherwise (``threads``): handlers that block
#: (on a lock, a barrier, another process) may all wait at once up to this
#: many; more threads would only contend for the GIL.
DEFAULT_THREADS = 64

#: Seconds between two log lines about connections refused for being over the limit.
_BUSY_LOG_EVERY = 10.0

#: A parked connection's events: bytes to read, or the peer gone (then the
#: poller closes it itself, sparing a pool thread a job); one event, then
#: quiet until a pool thread arms it again.
_ARMED = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLONESHOT
_GONE = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR


def waiting_descriptor_limit() -> int:
    """The server-wide bound on descriptors waiting for their frame (see docs/reliability.md)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_WAITING_DESCRIPTORS
    return max(1, min(MAX_WAITING_DESCRIPTORS, soft // 4))


def connection_limit(requested: int | None) -> int:
    """The most connections a server holds at once: ``requested``, or the default.

    The default is :data:`DEFAULT_MAX_CONNECTIONS`, or half the descriptor
    limit (``RLIMIT_NOFILE``) if that is lower: the other half is left to
    descriptors in flight and the handlers' own files.
    """
    if requested is not None:
        return requested
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return DEFAULT_MAX_CONNECTIONS
    return max(1, min(DEFAULT_MAX_CONNECTIONS, soft // 2))


def _at_least_one(settings: Any, attribute: attrs.Attribute[Any], value: int | None) -> None:
    if value is not None and (type(value) is not int or value < 1):
        raise ConfigurationError(f"{attribute.name} must be an int of at least 1, got {value!r}")


@attrs.frozen
class Settings:
    """A server's settings for serving clients: how they authenticate, its bounds in time and number."""

    key: bytes
    allowed_uids: frozenset[int]
    wire: WireOptions
    handshake_timeout: float | None
    client_idle_timeout: float | None
    shutdown_timeout: float
    backlog: int
    max_connections: int | None = attrs.field(default=None, validator=_at_least_one)
    threads: int = attrs.field(default=DEFAULT_THREADS, validator=_at_least_one)


@attrs.frozen
class App:
    """What one run of the loop serves: the registry, the settings, the socket file, the hooks.

    ``initialize`` and ``finalize`` are the server's overridable hooks
    (``Server.initialize_server``, ``Server.finalize_server``); ``forks``
    is the link to a fork server, for a server with workers.
    """

    registry: Registry
    settings: Settings
    files: SocketFile
    initialize: Callable[[], Any]
    finalize: Callable[[], Any]
    forks: ForkServerLink | None = None


def start_event_loop(registry: Registry, replied: Callable[..., None]) -> AsyncLoop:
    """Start the event loop of the async handlers and hooks (after the fork server is forked)."""
    from ._asyncloop import AsyncLoop  # asyncio is loaded only when wanted

    asyncloop = AsyncLoop(replied)
    asyncloop.start()
    registry.awaiter = asyncloop.await_
    return asyncloop


def run_hook(fn: Callable[[], Any], asyncloop: AsyncLoop | None) -> None:
    """Run a server hook; an overriding ``async def`` is awaited on the event loop."""
    result = fn()
    if inspect.isawaitable(result):
        assert asyncloop is not None  # started for an async hook
        asyncloop.await_(result)


def _send_while_closing(conn: ServerConnection, call: AsyncCall, bound: float) -> None:
    """Send an async call's reply while the server stops, waiting at most ``bound`` s.

    With no client_idle_timeout a send has no timeout, and a client that does
    not read would hold the event loop's thread, and the stop, for good.
    """
    with contextlib.suppress(OSError):
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval(bound))
    with contextlib.suppress(ConnectionClosed, Timeout):
        call.send(conn.channel)


class ServeLoop:
    """One run of a server's main loop, in whichever process serves it.

    ``listener.accept`` and ``thread_class`` are the only ways the loop gets
    sockets and threads: tests put failing ones there to reach the back-off
    paths (ENFILE, ENOBUFS, a thread that cannot start) that real limits
    cannot produce for root.

    Args:
        app: what the loop serves and runs (see :class:`App`).
        listener: the listening socket; the loop closes it.
        owner_fd: the owner socket's descriptor (end of file: every owner
            let go), or None to serve until told to stop.
        identity: the socket file's identity, to remove it only if ours.
        foreground: SIGINT and SIGTERM stop the loop (``serve()``).
        ready: where to say "ready" once clients are accepted (``start()``).
    """

    thread_class: type[threading.Thread] = threading.Thread

    def __init__(
        self,
        app: App,
        listener: socket.socket,
        owner_fd: int | None,
        identity: tuple[int, int],
        *,
        foreground: bool,
        ready: socket.socket | None = None,
    ) -> None:
        self.app = app
        self.settings = settings = app.settings
        self.listener = listener
        self.owner_fd = owner_fd
        self.identity = identity
        self.foreground = foreground
        self.ready = ready
        self.done = threading.Event()
        self.thread = threading.current_thread()
        self.dispatcher = Dispatcher(app.registry.handlers, app.settings.wire.types)
        # Both sized again once initialize_server has run (it may change the limit).
        self.descriptor_budget = DescriptorBudget(waiting_descriptor_limit())
        self.max_connections = connection_limit(settings.max_connections)
        self.pool: WorkerPool[ServerConnection] = WorkerPool(
            settings.threads, self._serve, self.thread_class
        )
        #: Every open connection by descriptor number, whatever its state.
        self.connections: dict[int, ServerConnection] = {}
        self.lock = threading.Lock()  # guards parking against stopping, closing against closing
        self.deadlines = Deadlines(settings.handshake_timeout, settings.client_idle_timeout)
        self.epoll = select.epoll()
        self.stopping = False
        self.resume_accepting: float | None = None
        self.wake_r, self.wake_w = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        self.saved_signals: dict[int, Any] = {}
        self.saved_wakeup: int | None = None
        self._busy_frame = b""
        self._busy_refused = 0
        self._busy_logged = -math.inf
        #: The event loop of the async handlers and hooks; None if there are none.
        self.asyncloop: AsyncLoop | None = None

    def in_client_thread(self) -> bool:
        thread = threading.current_thread()
        return self.pool.owns(thread) or (
            self.asyncloop is not None and thread is self.asyncloop.thread
        )

    def request_stop(self) -> None:
        self.stopping = True
        with contextlib.suppress(OSError):
            self.wake_w.send(b"x")

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        fn = self.app.registry.signal_handlers.get(signal.Signals(signum))
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
        wanted: set[int] = set(self.app.registry.signal_handlers)
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
        app = self.app
        own = {self.listener, self.wake_r, self.wake_w}
        if self.ready is not None:
            own.add(self.ready)
        serving_sockets.update(own)
        try:
            if app.forks is not None:
                # First, while this process runs no thread and initialize_server
                # has not started any: workers are forked from there.
                app.forks.start()
            if app.registry.needs_event_loop(app.initialize, app.finalize):
                self.asyncloop = start_event_loop(app.registry, self._replied)
                self.dispatcher.event_loop = self.asyncloop.loop  # for async streams' items
            self._install_signals()
            try:
                run_hook(app.initialize, self.asyncloop)
            except BaseException:
                self.listener.close()  # nobody will accept: take the socket away now
                app.files.remove(self.identity)
                raise
            self.descriptor_budget.limit = waiting_descriptor_limit()
            self.max_connections = connection_limit(self.settings.max_connections)
            self._busy_frame = encode_frame(*busy(self.max_connections))[0]
            if self.ready is not None:
                self.ready.send(READY, socket.MSG_NOSIGNAL)
            logger.info("passrpc server pid %d listening on %s", os.getpid(), app.files.path)
            try:
                self._poll()
            finally:
                self.stopping = True  # also if _poll raised: no connection is parked again
                self._shutdown()
                run_hook(app.finalize, self.asyncloop)
        finally:
            if self.asyncloop is not None:  # after finalize_server, which may await on it
                self.app.registry.awaiter = None
                self.asyncloop.stop()
            self._restore_signals()
            if app.forks is not None:  # after finalize_server, which may still use workers
                app.forks.close()
            self.wake_r.close()
            self.wake_w.close()
            self.epoll.close()
            serving_sockets.difference_update(own)  # another loop in this process keeps its own
            self.done.set()

    # The poller ---------------------------------------------------------------

    def _poll(self) -> None:
        epoll = self.epoll
        listener_fd = self.listener.fileno()
        wake_fd = self.wake_r.fileno()
        self.listener.setblocking(False)
        epoll.register(listener_fd, select.EPOLLIN)
        epoll.register(wake_fd, select.EPOLLIN)
        if self.owner_fd is not None:
            epoll.register(self.owner_fd, select.EPOLLIN)
        connections = self.connections
        while not self.stopping:
            for fd, events in epoll.poll(self._wait()):
                conn = connections.get(fd)
                if conn is not None:
                    self._readable(conn, events)
                elif fd == wake_fd:
                    with contextlib.suppress(OSError):
                        self.wake_r.recv(4096)
                elif fd == self.owner_fd:
                    self._read_owner()
                elif fd == listener_fd and not self._accept():
                    self._back_off()
            now = time.monotonic()
            if self.resume_accepting is not None and now >= self.resume_accepting:
                epoll.register(listener_fd, select.EPOLLIN)
                self.resume_accepting = None
            if self.deadlines.any_due(now):
                self._expire(now)

    def _wait(self) -> float:
        """Seconds until the poller has something to do by itself (-1: nothing)."""
        wait = self.deadlines.wait()
        if self.resume_accepting is not None:
            wait = min(wait, self.resume_accepting - time.monotonic())
        return -1 if wait == math.inf else max(0.0, wait)

    def _back_off(self) -> None:
        """Stop accepting for :data:`ACCEPT_BACKOFF` seconds (out of descriptors, memory or threads)."""
        if self.resume_accepting is None:
            with contextlib.suppress(OSError):
                self.epoll.unregister(self.listener.fileno())
            self.resume_accepting = time.monotonic() + ACCEPT_BACKOFF

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
        elif STOP in data:
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
                if exc.errno in ACCEPT_BACKOFF_ERRNOS:
                    logger.warning("accept failed (%s); backing off for %s s", exc, ACCEPT_BACKOFF)
                    return False
                logger.debug("accept failed: %s", exc)
                continue
            if len(self.connections) >= self.max_connections:
                self._refuse_busy(sock)
                continue
            serving_sockets.add(sock)  # before any thread can fork: its children must drop it
            conn = ServerConnection(sock)
            self.connections[conn.fd] = conn
            self.deadlines.accepted(conn)
            if not self._submit(conn):
                return False
        return True

    def _refuse_busy(self, sock: socket.socket) -> None:
        """Tell a connection over ``max_connections`` that the server is busy, and close it."""
        with contextlib.suppress(OSError):
            sock.send(self._busy_frame, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        sock.close()
        self._busy_refused += 1
        now = time.monotonic()
        if now >= self._busy_logged + _BUSY_LOG_EVERY:  # a flood of them logs a line now and then
            logger.warning(
                "refused %d connection(s) as busy: the server holds %d, its max_connections",
                self._busy_refused,
                self.max_connections,
            )
            self._busy_refused = 0
            self._busy_logged = now

    def _readable(self, conn: ServerConnection, events: int) -> None:
        """A parked connection has bytes to read, or its peer left."""
        if conn.state != PARKED:
            return
        if events & _GONE and conn.hung_up():
            # Nothing to serve: closed here, a herd of leaving clients costs
            # no pool thread a job, and new clients do not queue behind it.
            if conn.stage == AUTHENTICATED:
                self._close(conn)
            else:
                self._refused(conn, ConnectionClosed("the peer closed the connection"))
            return
        conn.state = QUEUED
        if not self._submit(conn):
            self._back_off()

    def _refused(self, conn: ServerConnection, exc: Exception) -> None:
        logger.warning("refused a connection from %s: %s", conn.who(), exc)
        self._close(conn)

    def _submit(self, conn: ServerConnection) -> bool:
        """Queue ``conn`` for a pool thread; False (and ``conn`` closed) if no thread could start."""
        if self.pool.submit(conn):
            return True
        self._close(conn)
        return False

    def _expire(self, now: float) -> None:
        """Close the connections whose handshake or idle time is up."""
        slow, idle = self.deadlines.due(now)
        for conn in slow:
            if conn.state == PARKED:
                self._refused(conn, self.deadlines.late())
            else:  # a pool thread holds it (a client trickling its bytes): end its wait
                conn.expired = True
                with contextlib.suppress(OSError):
                    conn.sock.shutdown(socket.SHUT_RDWR)
        for conn in idle:
            logger.debug("closing a connection idle for %s s", self.settings.client_idle_timeout)
            self._close(conn)

    # Pool threads -----------------------------------------------------------

    def _serve(self, conn: ServerConnection) -> None:
        """A pool thread's job: take ``conn`` as far as its bytes allow; park or close it."""
        conn.state = SERVING
        hurry = self.pool.backlog
        try:
            if conn.stage != AUTHENTICATED and not self._authenticate(conn, hurry):
                return
            idle = self.settings.client_idle_timeout
            outcome = conn.serve(self.dispatcher, hurry, self._wait_more, idle)
            if outcome is True:
                self._park(conn)
                return
            if outcome is not False:  # an async call: the event loop holds it now
                assert self.asyncloop is not None  # started for the async handlers
                conn.state = AWAITING
                self.asyncloop.submit(conn, outcome)
                return
        except Exception:
            logger.exception("a client connection failed")
        self._close(conn)

    def _replied(self, conn: ServerConnection, call: AsyncCall | None) -> None:
        """An async call is over (on the event loop's thread): queue its reply, or close ``conn``."""
        if call is None:  # cancelled: the client left, or the server is stopping
            self._close(conn)
            return
        with self.lock:
            if not self.stopping:
                conn.state = QUEUED
        if conn.state == QUEUED:
            conn.pending = call
            self._submit(conn)
            return
        # The pool is closing: the reply goes out from here, the loop's thread.
        _send_while_closing(conn, call, self.settings.shutdown_timeout)
        self._close(conn)

    def _wait_more(self, idle: float) -> bool:
        """Whether a pool thread goes on waiting for its connection, ``idle`` s without a request."""
        return idle < PATIENCE and self.pool.roomy()

    def _authenticate(self, conn: ServerConnection, hurry: object) -> bool:
        """Take ``conn``'s handshake as far as its bytes allow; False if it was parked or refused."""
        settings = self.settings
        try:
            if conn.stage == NEW:
                conn.greet(
                    settings.key, settings.allowed_uids, settings.wire, self.descriptor_budget
                )
            if not conn.advance(hurry):
                self._park(conn)
                return False
        except (AuthenticationError, ProtocolError, ConnectionClosed, Timeout) as exc:
            self._refused(conn, self.deadlines.late() if conn.expired else exc)
            return False
        except OSError:  # from greet(): the kernel has no credentials to tell
            logger.debug("a client hung up before it could be served")
            self._close(conn)
            return False
        conn.authenticated(settings.client_idle_timeout)
        self.dispatcher.opened()
        return True

    def _park(self, conn: ServerConnection) -> None:
        """Hand ``conn`` back to the poller, idle (or close it if the server is stopping)."""
        with self.lock:
            stopping = self.stopping
            if not stopping:
                self.deadlines.park(conn)
        if stopping:
            self._close(conn)
            return
        try:
            if conn.registered:
                self.epoll.modify(conn.fd, _ARMED)
            else:
                conn.registered = True
                self.epoll.register(conn.fd, _ARMED)
        except (OSError, ValueError):  # closed meanwhile, or the server's loop has ended
            self._close(conn)

    def _close(self, conn: ServerConnection) -> None:
        """Close ``conn`` for good, from whichever thread holds it; idempotent."""
        with self.lock:
            if conn.state == CLOSED:
                return
            conn.state = CLOSED
            self.connections.pop(conn.fd, None)  # before its number can be reused
        if conn.registered:
            with contextlib.suppress(OSError, ValueError):
                self.epoll.unregister(conn.fd)
        serving_sockets.discard(conn.sock)
        conn.close()
        if conn.stage == AUTHENTICATED:
            self.dispatcher.closed()

    # Stopping ---------------------------------------------------------------

    def _shutdown(self) -> None:
        """Stop accepting, remove the socket file, let running handlers finish within a bound."""
        self.listener.close()
        self.app.files.remove(self.identity)
        with self.lock:
            self.stopping = True
            connections = list(self.connections.values())
        deadline = time.monotonic() + self.settings.shutdown_timeout
        for conn in connections:
            if conn.state == PARKED:
                self._close(conn)  # no thread holds it
            elif conn.state == AWAITING:
                pass  # its handler finishes, or is cancelled below; then it is closed
            else:
                # Ends a pool thread's wait for a next request; a running
                # handler still finishes and sends its reply.
                with contextlib.suppress(OSError):
                    conn.sock.shutdown(socket.SHUT_RD)
        busy = self.pool.close(self.settings.shutdown_timeout)
        if self.asyncloop is not None:
            self.asyncloop.cancel_all(deadline)
        if busy:
            logger.warning(
                "%d handler(s) still running after %s s; leaving them",
                busy,
                self.settings.shutdown_timeout,
            )
