"""The server's side of its fork server: asking for workers, and hearing how they end.

:class:`ForkServerLink` is made with the loop's :class:`~passrpc._loop.App`
when the server has workers registered; the loop starts it (forks the fork
server, :mod:`passrpc._forkserver`) before anything else and closes it after
``finalize_server``. Handlers ask it for workers through
``Server.fork_worker``, from any number of threads at once: each request is
numbered, sent whole under a lock, and answered in turn by the fork server,
which handles one request at a time. One reader thread, started with the
first request, takes every report: a pid for a request, a worker's exit
status for its :class:`Worker`, the preload's failure for everyone.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any

from ._channel import Channel
from ._dispatch import Dispatcher
from ._errors import ConnectionClosed, ProtocolError, Timeout, WorkerError
from ._forkserver import (
    EXITED,
    FAILED,
    FORK,
    FORKED,
    KILL,
    READY,
    REFUSED,
    ForkApp,
    start_fork_server,
)
from ._process import serving_sockets
from ._registry import Registry

logger = logging.getLogger("passrpc")

#: Seconds a closing server waits for its fork server to end its workers and exit.
_CLOSE_WAIT = 2.0


class _Exit:
    """How one worker ended, once its fork server said so (or could no longer say)."""

    __slots__ = ("ended", "lost", "status")

    def __init__(self) -> None:
        self.ended = threading.Event()
        self.status: int | None = None
        self.lost = False  # the fork server ended first: the status is unknowable


class _Request:
    """One FORK request waiting for its answer."""

    __slots__ = ("answered", "error", "exit", "pid")

    def __init__(self) -> None:
        self.answered = threading.Event()
        self.pid = 0
        self.exit: _Exit | None = None
        self.error: str | None = None


class Worker:
    """A worker process that the server's fork server forked for you, and your channel to it.

    :meth:`Server.fork_worker` returns one. ``channel`` is your end of a
    socketpair whose other end the worker got: talk to the worker on it, or
    send it on (it has ``fileno()``, so ``channel.write(worker.channel)``
    hands a client a socket connected straight to the worker) and close
    yours. ``with worker:`` closes your end at the end of the block; the
    worker sees end of file once every copy is closed. Your process is not
    the worker's parent: the fork server reaps it and tells this object its
    exit status (:meth:`wait`, :attr:`exit_status`). Workers end with their
    server: when it stops, its fork server SIGKILLs those still running.
    """

    def __init__(
        self, pid: int, name: str, channel: Channel, link: ForkServerLink, ending: _Exit
    ) -> None:
        #: The worker's pid (its parent is the fork server, not this process).
        self.pid = pid
        #: The name of the registered worker it runs.
        self.name = name
        #: Your end of the connection to the worker.
        self.channel = channel
        self._link = link
        self._exit = ending

    @property
    def exit_status(self) -> int | None:
        """Its exit code, or minus the signal that killed it; None while it runs (or if lost)."""
        return self._exit.status

    @property
    def alive(self) -> bool:
        """True until the fork server reported its end (or ended itself)."""
        return not self._exit.ended.is_set()

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the worker to end; return its exit code, or minus the signal that killed it.

        Raises:
            Timeout: it still runs after ``timeout`` seconds.
            WorkerError: the fork server ended first (its server stopped, or
                it died); the worker was killed with it, its status is lost.
        """
        if not self._exit.ended.wait(timeout):
            raise Timeout(f"worker {self.name!r} (pid {self.pid}) still runs after {timeout} s")
        if self._exit.lost:
            raise WorkerError(
                f"the fork server ended before worker {self.name!r} (pid {self.pid}) did; "
                "the worker was killed with it and its exit status is lost"
            )
        assert self._exit.status is not None
        return self._exit.status

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send the worker ``sig`` (SIGKILL by default), through its parent: never a reused pid.

        Harmless once it has ended.
        """
        if self.alive:
            self._link.kill(self.pid, sig)

    def close(self) -> None:
        """Close your end of the channel (the worker goes on until every copy is closed)."""
        self.channel.close()

    def __enter__(self) -> Worker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.alive else f"exited {self._exit.status}"
        return f"<passrpc.Worker {self.name!r} pid={self.pid} {state}>"


class ForkServerLink:
    """A server's link to its fork server; see the module's docstring.

    Args:
        app: what the fork server runs (preload, workers, wire, keep_fds).
    """

    def __init__(self, app: ForkApp) -> None:
        self.app = app
        self.pid: int | None = None  # the fork server's, once started
        self._unreaped: int | None = None  # its pid until one thread takes it to reap it
        self._sockets: tuple[socket.socket, ...] = ()
        self._server_pid = -1  # the process that started it: the only one that may use it
        self._writer: Channel | None = None
        self._reader: Channel | None = None
        self._thread: threading.Thread | None = None
        self._numbers = itertools.count(1)
        # Guards the tables below and the state; never held while blocking.
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()  # one frame at a time on the socket
        self._pending: dict[int, _Request] = {}
        self._exits: dict[int, _Exit] = {}
        self._preloaded: float | None = None  # seconds the preload took, once READY came
        self._failure: str | None = None  # the preload's traceback, once FAILED came
        self._gone: str | None = None  # why no worker can be forked any more

    def start(self) -> None:
        """Fork the fork server; call it while this process runs no other thread."""
        pid, sock = start_fork_server(self.app)
        self.pid = self._unreaped = pid
        self._server_pid = os.getpid()
        reading = sock.dup()
        # Processes a handler forks itself must not keep the fork server's
        # socket open: it would not see end of file when this server ends.
        self._sockets = (sock, reading)
        serving_sockets.update(self._sockets)
        self._writer = Channel(sock, wire=self.app.wire)
        self._reader = Channel(reading, wire=self.app.wire)

    # Requests, from the server's handler threads --------------------------

    def fork(self, name: str, args: tuple[Any, ...], timeout: float | None) -> Worker:
        """Ask for a worker running ``name`` with ``args``; see ``Server.fork_worker``."""
        writer = self._writer
        if writer is None or os.getpid() != self._server_pid:
            raise WorkerError(
                "fork_worker() works in the server process (in a handler or a hook), where "
                "the fork server runs; from elsewhere, call a handler that forks the worker"
            )
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with self._lock:
                if self._gone is not None:
                    raise WorkerError(self._gone)
                number = next(self._numbers)
                request = self._pending[number] = _Request()
            self._start_reader()
            try:
                with self._send_lock:
                    writer.write(FORK, number, name, theirs, list(args))
            except BaseException:
                with self._lock:
                    self._pending.pop(number, None)
                raise
        except ConnectionClosed as exc:
            ours.close()
            if self._thread is not None:  # it reads why (a failed preload, say) and the end
                self._thread.join(_CLOSE_WAIT)
            raise WorkerError(self._gone or f"the fork server is gone ({exc})") from exc
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()  # the fork server has its copy, or never will
        return self._answer(number, request, name, ours, timeout)

    def _answer(
        self, number: int, request: _Request, name: str, ours: socket.socket, timeout: float | None
    ) -> Worker:
        """Wait for the answer to request ``number``; the worker, or the error."""
        if not request.answered.wait(timeout):
            with self._lock:
                abandoned = self._pending.pop(number, None) is not None
            if abandoned:  # the reader will SIGKILL the worker if it comes after all
                ours.close()
                raise Timeout(self._late(timeout))
        if request.error is not None:
            ours.close()
            raise WorkerError(request.error)
        assert request.exit is not None
        return Worker(request.pid, name, Channel(ours, wire=self.app.wire), self, request.exit)

    def _late(self, timeout: float | None) -> str:
        doing = (
            "still runs the preload (on_preload, or your preload())"
            if self._preloaded is None
            else "did not answer"
        )
        return (
            f"the fork server (pid {self.pid}) {doing} within the {timeout} s of fork_worker(); "
            "raise its timeout if the preload is slow"
        )

    def kill(self, pid: int, sig: int) -> None:
        """Have the fork server send ``sig`` to its worker ``pid``, if not reaped yet."""
        writer = self._writer
        if writer is None:
            return
        with self._send_lock, contextlib.suppress(ConnectionClosed):  # gone: so is the worker
            writer.write(KILL, pid, int(sig))

    # Reports, in the reader thread ------------------------------------------

    def _start_reader(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            # Started with the first request, not before: until then this
            # process may still be single-threaded, and its initialize_server
            # may fork.
            self._thread = threading.Thread(
                target=self._read, name="passrpc-forkserver", daemon=True
            )
            self._thread.start()

    def _read(self) -> None:
        reader = self._reader
        assert reader is not None
        try:
            while True:
                self._on_report(reader.read())
        except (ConnectionClosed, ProtocolError, OSError):
            pass
        finally:
            self._lost()

    def _on_report(self, values: tuple[Any, ...]) -> None:
        what = values[0] if values else None
        if what == FORKED:
            _, number, pid = values
            with self._lock:
                request = self._pending.pop(number, None)
                if request is not None:
                    request.pid, request.exit = pid, self._exits.setdefault(pid, _Exit())
            if request is None:  # its requester gave up waiting: nobody holds its channel
                # From another thread: this one must never block on a send, or
                # it and the fork server could each wait for the other to read.
                threading.Thread(
                    target=self.kill, args=(pid, signal.SIGKILL), name="passrpc-kill", daemon=True
                ).start()
            else:
                request.answered.set()
        elif what == REFUSED:
            _, number, why = values
            with self._lock:
                request = self._pending.pop(number, None)
            if request is not None:
                request.error = f"the fork server (pid {self.pid}) could not fork a worker: {why}"
                request.answered.set()
        elif what == EXITED:
            self._on_exit(values[1], values[2])
        elif what == READY:
            self._preloaded = values[1]
            logger.debug("fork server pid %s preloaded in %.3f s", self.pid, values[1])
        elif what == FAILED:
            self._failure = (
                f"the fork server's preload raised, so no worker can be forked "
                f"(fix it and restart the server):\n{values[1]}"
            )

    def _on_exit(self, pid: int, status: int) -> None:
        with self._lock:
            ending = self._exits.pop(pid, None)
        if ending is None:
            return
        ending.status = status
        ending.ended.set()
        log = logger.debug if status == 0 else logger.info
        log("worker pid %d exited with status %d", pid, status)

    def _lost(self) -> None:
        """The fork server is gone: fail every waiting request; no exit status will come."""
        with self._lock:
            expected = self._gone is not None  # close() said so first
            if self._gone is None:
                self._gone = self._failure or (
                    f"the fork server (pid {self.pid}) died; no worker can be forked until "
                    "the server restarts (its log may say why)"
                )
            pending, self._pending = list(self._pending.values()), {}
            exits, self._exits = list(self._exits.values()), {}
        for request in pending:
            request.error = self._gone
            request.answered.set()
        for ending in exits:
            ending.lost = True
            ending.ended.set()
        if not expected:
            if self._failure is None:
                logger.error("%s", self._gone)
            self._reap()  # it is exiting, or has: no zombie until the server ends

    # Closing ----------------------------------------------------------------

    def close(self) -> None:
        """End the fork server (it SIGKILLs its workers first) and reap it; the loop calls it last."""
        with self._lock:
            if self._gone is None:
                self._gone = "the server is stopping; its fork server has ended"
        writer, reader = self._writer, self._reader
        if writer is None or reader is None or os.getpid() != self._server_pid:
            return
        writer.shutdown()  # end of file for the fork server, and for our reader thread
        if self._thread is not None:
            self._thread.join(_CLOSE_WAIT)
        reader.close()
        serving_sockets.difference_update(self._sockets)
        self._reap()

    def _reap(self) -> None:
        """Wait for the fork server to exit (SIGKILL it after a while) and reap it, once."""
        with self._lock:
            pid, self._unreaped = self._unreaped, None
        if pid is None:  # reaped already (the reader saw it die), or never started
            return
        deadline = time.monotonic() + _CLOSE_WAIT
        while True:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                return
            if done:
                return
            if time.monotonic() > deadline:
                logger.warning("the fork server (pid %d) did not exit; killing it", pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
                return
            time.sleep(0.005)


def serve_channel(
    registry: Registry,
    initialize: Callable[[], Any],
    finalize: Callable[[], Any],
    channel: Channel,
    *args: Any,
) -> None:
    """A worker that runs a Server: its handlers answer requests on ``channel`` until it closes.

    The server's ``initialize_server`` runs first and its
    ``finalize_server`` last, in the worker; its signal handlers are
    installed. No handshake: the channel is a private socketpair.
    """
    if args:
        raise TypeError(f"a worker that runs a Server takes no arguments, got {args!r}")
    registry.frozen = True
    for signum, fn in registry.signal_handlers.items():
        signal.signal(signum, _on_signal(fn))
    initialize()
    try:
        Dispatcher(registry.handlers).converse(channel, channel.peer)
    finally:
        finalize()


def _on_signal(fn: Callable[[], Any]) -> Callable[[int, FrameType | None], None]:
    """A signal handler that calls ``fn()``, as a server's ``on_signal`` handlers are called."""

    def handle(signum: int, frame: FrameType | None) -> None:
        fn()

    return handle
