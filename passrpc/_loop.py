"""The main loop: poll, accept, hand each client to a thread, stop cleanly.

The main thread of a running server only polls (the owner socket, the
listening socket, a wake-up socket for signals) and accepts; every accepted
client gets a thread of its own, which does the handshake and then lets the
:class:`~passrpc._dispatch.Dispatcher` serve its requests until it leaves.
Threads are reused for later clients. Ownership follows Passenger's
AbstractServer: end of file on the owner socket means every owner let go,
and the loop ends. Accept errors that mean "out of resources" back off
instead of ending the server.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import queue
import resource
import select
import signal
import socket
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import attrs

from ._auth import server_handshake
from ._channel import Channel, DescriptorBudget, Peer
from ._dispatch import Dispatcher
from ._errors import AuthenticationError, ConnectionClosed, ProtocolError, Timeout
from ._process import READY, STOP, serving_sockets
from ._registry import Registry
from ._socketfile import SocketFile
from ._wire import WireOptions
from ._workers import ForkServerLink

logger = logging.getLogger("passrpc")

#: Accept errors that mean "out of resources for now", after trio's
#: serve_listeners: log, back off, retry, instead of dying.
ACCEPT_BACKOFF_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_BACKOFF = 0.1


def _peer_of(channel: Channel) -> Peer | None:
    """The peer of ``channel`` as the kernel tells it; None if it is already gone."""
    try:
        return channel.peer
    except OSError:
        return None


#: Descriptors that may wait for the rest of their frame, over all of a
#: server's connections: enough for 16 clients sending frames of 64 at once,
#: and never more than a quarter of the process's descriptor limit.
MAX_WAITING_DESCRIPTORS = 1024


def waiting_descriptor_limit() -> int:
    """The server-wide bound on descriptors waiting for their frame (see docs/reliability.md)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_WAITING_DESCRIPTORS
    return max(1, min(MAX_WAITING_DESCRIPTORS, soft // 4))


@attrs.frozen
class Settings:
    """A server's settings for serving clients: how they authenticate, and its time bounds."""

    key: bytes
    allowed_uids: frozenset[int]
    wire: WireOptions
    handshake_timeout: float | None
    client_idle_timeout: float | None
    shutdown_timeout: float
    backlog: int


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


#: Client threads kept waiting for a next client, and for how long.
_MAX_IDLE_WORKERS = 16
_IDLE_WORKER_SECONDS = 30.0


class _Worker:
    """A client thread and its inbox of accepted sockets."""

    __slots__ = ("jobs", "thread")

    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue[socket.socket | None] = queue.SimpleQueue()
        self.thread: threading.Thread | None = None


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
        self.settings = app.settings
        self.listener = listener
        self.owner_fd = owner_fd
        self.identity = identity
        self.foreground = foreground
        self.ready = ready
        self.done = threading.Event()
        self.thread = threading.current_thread()
        self.dispatcher = Dispatcher(app.registry.handlers, app.settings.wire.types)
        # Sized again once initialize_server has run (it may change the limit).
        self.descriptor_budget = DescriptorBudget(waiting_descriptor_limit())
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
            self._install_signals()
            try:
                app.initialize()
            except BaseException:
                self.listener.close()  # nobody will accept: take the socket away now
                app.files.remove(self.identity)
                raise
            self.descriptor_budget.limit = waiting_descriptor_limit()
            if self.ready is not None:
                self.ready.send(READY, socket.MSG_NOSIGNAL)
            logger.info("passrpc server pid %d listening on %s", os.getpid(), app.files.path)
            try:
                self._poll()
            finally:
                self.stopping = True  # also if _poll raised: no worker goes back to idle
                self._shutdown()
                app.finalize()
        finally:
            self._restore_signals()
            if app.forks is not None:  # after finalize_server, which may still use workers
                app.forks.close()
            self.wake_r.close()
            self.wake_w.close()
            serving_sockets.difference_update(own)  # another loop in this process keeps its own
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
                    resume_accepting = time.monotonic() + ACCEPT_BACKOFF

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
            serving_sockets.add(sock)  # before any thread can fork: its children must drop it
            if not self._hand_over(sock):
                return False
        return True

    def _hand_over(self, sock: socket.socket) -> bool:
        """Hand a new client to an idle worker thread, or start one; False if none can start."""
        with self.clients_lock:
            if self.idle:
                worker = self.idle.pop()
                self.clients[sock] = worker.thread  # type: ignore[assignment]
                worker.jobs.put(sock)
                return True
        worker = _Worker()
        worker.thread = self.thread_class(
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
            serving_sockets.discard(sock)
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
        settings = self.settings
        channel = Channel(sock, wire=settings.wire)
        channel.share_descriptor_budget(self.descriptor_budget)
        try:
            peer = _peer_of(channel)  # now: a refused channel is closed before it is logged
            if peer is None:
                logger.debug("a client hung up before it could be served")
                return
            try:
                server_handshake(
                    channel,
                    settings.key,
                    settings.allowed_uids,
                    settings.handshake_timeout,
                    peer,
                )
            except (AuthenticationError, ProtocolError, ConnectionClosed, Timeout) as exc:
                logger.warning(
                    "refused a connection from pid %d uid %d: %s", peer.pid, peer.uid, exc
                )
                return
            channel.timeout = settings.client_idle_timeout
            self.dispatcher.converse(channel, peer)
        except Exception:
            logger.exception("a client connection failed")
        finally:
            serving_sockets.discard(sock)
            with self.clients_lock:
                self.clients.pop(sock, None)
                channel.close()

    def _shutdown(self) -> None:
        """Stop accepting, remove the socket file, let running handlers finish within a bound."""
        self.listener.close()
        self.app.files.remove(self.identity)
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
        deadline = time.monotonic() + self.settings.shutdown_timeout
        for _, thread in clients:
            thread.join(max(0.0, deadline - time.monotonic()))
        busy = sum(thread.is_alive() for _, thread in clients)
        if busy:
            logger.warning(
                "%d handler(s) still running after %s s; leaving them",
                busy,
                self.settings.shutdown_timeout,
            )
