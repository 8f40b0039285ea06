"""The fork server: a process that never runs a thread, preloads, and forks a worker per request.

``os.fork()`` copies only the thread that calls it: a lock that another
thread held at that instant (logging's, an allocator's, a handler's own)
stays locked forever in the child, and Python 3.12 and later warn about
forking a process that runs threads. A server runs a thread per client, so
its workers are forked from here instead. The server's loop forks this
process first thing (:meth:`passrpc._loop.ServeLoop.run`, before
``initialize_server`` and before any thread), as CPython's ``forkserver``
and Passenger's spawn servers do. It never starts a thread; in order, it:

1. takes the server process's hygiene (:func:`passrpc._process.child_hygiene`):
   only stdin, stdout, stderr, its socket to the server, ``keep_fds`` and
   logging's descriptors stay; it holds no listener, owner reference or
   client, so it takes no part in ownership;
2. runs the preload hook and reports ``READY`` (or ``FAILED`` with the
   traceback, and exits);
3. serves the server's requests on its socket, one at a time, in order:
   ``FORK`` carries the worker's end of a socketpair and its arguments and is
   answered ``FORKED`` with the pid (or ``REFUSED`` with why); ``KILL``
   signals a worker not reaped yet (so never a reused pid);
4. reaps workers when SIGCHLD wakes it (through the wakeup socket) and
   reports each ``EXITED`` with its status;
5. on end of file (its server is gone, however it ended), SIGKILLs its
   workers, reaps them and exits.

Every frame is a passrpc MESSAGE whose first value says what it is. The
worker's start is here too (``_ForkLoop._run_worker``): the same hygiene,
then the user's function, then ``os._exit``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from types import FrameType
from typing import Any, NoReturn

import attrs

from ._channel import Channel, take_ancillary
from ._decoder import Decoder
from ._errors import ConnectionClosed, ProtocolError
from ._fd import FileDescriptor
from ._process import child_hygiene, logging_fds
from ._protocol import MESSAGE
from ._wire import WireOptions, encode_frame

logger = logging.getLogger("passrpc")

# The server asks (server -> fork server):
FORK = "fork"  # (FORK, request number, worker name, the worker's socket end, [arguments])
KILL = "kill"  # (KILL, pid, signal number)
# The fork server reports (fork server -> server):
READY = "ready"  # (READY, seconds the preload took)
FAILED = "failed"  # (FAILED, the preload's traceback); then it exits
FORKED = "forked"  # (FORKED, request number, pid)
REFUSED = "refused"  # (REFUSED, request number, why)
EXITED = "exited"  # (EXITED, pid, status: the exit code, or minus the signal that killed it)

#: prctl(2) option: the signal this process gets when its parent dies.
_PR_SET_PDEATHSIG = 1


@attrs.frozen
class ForkApp:
    """What a fork server runs: the preload hook, the workers by name, the wire, what it keeps.

    ``workers`` maps a name to ``fn(channel, *args)``; ``keep_fds`` are the
    server's ``keep_fds``, kept by the fork server and by every worker.
    """

    preload: Callable[[], Any]
    workers: Mapping[str, Callable[..., Any]]
    wire: WireOptions
    keep_fds: frozenset[int]


def start_fork_server(app: ForkApp) -> tuple[int, socket.socket]:
    """Fork the fork server from this process; return its pid and the server's end of its socket.

    Call it while this process runs no other thread (the loop does, before
    its first): that is the point of a fork server.
    """
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    server = os.getpid()
    _flush_stdio()  # else the child would write the buffered output again
    pid = os.fork()
    if pid == 0:
        ours.close()
        fork_server_main(theirs, app, server)
    theirs.close()
    return pid, ours


def fork_server_main(ctrl: socket.socket, app: ForkApp, server: int) -> NoReturn:
    """Be the fork server of process ``server`` until that is gone; never returns."""
    code = 1
    try:
        child_hygiene({0, 1, 2, ctrl.fileno(), *app.keep_fds, *logging_fds()})
        libc = _libc()
        # The preload may run long, and reads no end of file meanwhile: should
        # the server die then, the kernel ends this process. Afterwards the
        # loop notices the end itself, and SIGKILLs and reaps its workers first.
        _die_with_parent(libc, server)
        preloaded = _preload(ctrl, app)
        _die_with_parent(libc, server, 0)
        if preloaded:
            _ForkLoop(ctrl, app, libc).run()
            code = 0
    except BaseException:
        logger.exception("the fork server (pid %d) failed", os.getpid())
    finally:
        _flush_stdio()
        os._exit(code)


def _preload(ctrl: socket.socket, app: ForkApp) -> bool:
    """Run the preload hook and report how it went; False if it raised."""
    started = time.monotonic()
    try:
        app.preload()
    except BaseException:
        logger.exception("the preload of the fork server (pid %d) raised", os.getpid())
        _report(ctrl, FAILED, traceback.format_exc())
        return False
    _report(ctrl, READY, time.monotonic() - started)
    threads = _thread_count()
    if threads > 1:
        names = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
        logger.warning(
            "the preload left %d thread(s) running (%s): every worker forked now may inherit "
            "a lock one of them holds; start threads in the worker instead",
            threads - 1,
            ", ".join(names) or "threads of a native library",
        )
    return True


def _thread_count() -> int:
    """The threads this process runs, native ones included, as the kernel counts them."""
    try:
        with open("/proc/self/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[17])  # num_threads, field 20
    except (OSError, IndexError, ValueError):
        return threading.active_count()


def _report(ctrl: socket.socket, *values: Any) -> None:
    data, _ = encode_frame(MESSAGE, list(values))
    ctrl.sendall(data, socket.MSG_NOSIGNAL)


def _ignore(signum: int, frame: FrameType | None) -> None:
    """SIGCHLD's handler: the work is the wakeup byte Python writes for it, which the loop polls."""


class _ForkLoop:
    """The fork server's loop: requests from the server in, workers out, their ends reported."""

    def __init__(self, ctrl: socket.socket, app: ForkApp, libc: Any) -> None:
        self.ctrl = ctrl
        self.app = app
        self.decoder = Decoder(app.wire)
        max_fds = app.wire.limits.max_fds
        self.max_fds = max_fds
        self.ancbufsize = socket.CMSG_SPACE(max_fds * 4) if max_fds else 0
        self.children: set[int] = set()  # forked and not reaped: their pids cannot be reused
        # A worker keeps what is open now (stdio, keep_fds, logging's, what
        # the preload opened for it) but for this loop's own sockets.
        self.keep = _open_fds() - {ctrl.fileno()}
        self.pid = os.getpid()
        self.libc = libc
        self.wake_r, self.wake_w = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)

    def run(self) -> None:
        """Serve requests and reap workers until the server is gone; then end every worker."""
        signal.set_wakeup_fd(self.wake_w.fileno(), warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, _ignore)
        poller = select.poll()
        poller.register(self.ctrl, select.POLLIN)
        poller.register(self.wake_r, select.POLLIN)
        wake_fd = self.wake_r.fileno()
        try:
            while True:
                for fd, _ in poller.poll():
                    if fd == wake_fd:
                        with contextlib.suppress(OSError):
                            self.wake_r.recv(4096)
                        self._reap()
                    elif not self._read_requests():
                        return
        except OSError as exc:  # a report could not be sent: the server is gone
            logger.debug("the fork server lost its server: %s", exc)
        finally:
            self._end_workers()

    def _read_requests(self) -> bool:
        """Handle every whole request that has come; False once the server is gone."""
        flags = socket.MSG_CMSG_CLOEXEC | socket.MSG_DONTWAIT
        try:
            buffer = self.decoder.get_buffer()
            nbytes, ancillary, rflags, _ = self.ctrl.recvmsg_into([buffer], self.ancbufsize, flags)
            take_ancillary(self.decoder, nbytes, ancillary, rflags, self.max_fds)
            while (frame := self.decoder.next_frame()) is not None:
                self._handle(frame[1])
        except (BlockingIOError, InterruptedError):
            return True
        except ConnectionClosed:
            return False
        except ProtocolError as exc:  # passrpc's own server sent it: a bug, not a peer
            logger.error("the fork server got a broken request (%s); it stops", exc)
            return False
        return True

    def _handle(self, payload: Any) -> None:
        if type(payload) is not list or not payload:
            return
        if payload[0] == FORK and len(payload) == 5:
            self._fork(*payload[1:])
        elif payload[0] == KILL and len(payload) == 3:
            self._kill(*payload[1:])
        else:
            logger.error("the fork server got an unknown request %r", payload[0])
            _close_descriptors(payload)

    def _fork(self, request: int, name: str, end: object, args: list[Any]) -> None:
        fn = self.app.workers.get(name)
        if fn is None or not isinstance(end, FileDescriptor) or type(args) is not list:
            _close_descriptors([end, args])
            self._send(REFUSED, request, f"the fork server knows no worker named {name!r}")
            return
        keep = self.keep | {end.fileno()} | {fd.fileno() for fd in _descriptors(args)}
        _flush_stdio()
        try:
            pid = os.fork()
        except OSError as exc:
            _close_descriptors([end, args])
            self._send(REFUSED, request, f"fork() failed: {exc}")
            return
        if pid == 0:
            self._run_worker(name, fn, end, args, keep)
        self.children.add(pid)
        _close_descriptors([end, args])  # the worker has its copies
        self._send(FORKED, request, pid)

    def _kill(self, pid: int, signum: int) -> None:
        if pid in self.children:  # not reaped yet, so the pid is still that worker's
            with contextlib.suppress(ProcessLookupError, ValueError, OverflowError):
                os.kill(pid, signum)

    def _reap(self) -> None:
        """Reap the workers that have ended and report each; waits for none."""
        # Pid by pid, never waitpid(-1): a process the preload started is not ours to reap.
        for pid in list(self.children):
            try:
                done, raw = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, raw = pid, 0
            if done:
                self.children.discard(pid)
                self._send(EXITED, pid, os.waitstatus_to_exitcode(raw))

    def _send(self, *values: Any) -> None:
        _report(self.ctrl, *values)

    def _run_worker(
        self,
        name: str,
        fn: Callable[..., Any],
        end: FileDescriptor,
        args: list[Any],
        keep: set[int],
    ) -> NoReturn:
        """Be a worker: hygiene, then ``fn(channel, *args)``, then ``os._exit``; never returns.

        The exit status is 0 when ``fn`` returns, the code of a ``SystemExit``,
        or 1 when it raised (the traceback goes to the ``passrpc`` logger).
        """
        code = 1
        try:
            _die_with_parent(self.libc, self.pid)
            child_hygiene(keep)
            fn(Channel(end.socket(), wire=self.app.wire), *args)
            code = 0
        except SystemExit as exc:
            code = _exit_code(exc)
        except BaseException:
            logger.exception("worker %r (pid %d) raised", name, os.getpid())
        finally:
            _flush_stdio()
            os._exit(code)

    def _end_workers(self) -> None:
        """The server is gone: SIGKILL every worker and reap them all."""
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in self.children:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        self.children.clear()


def _libc() -> Any:
    """The C library, for prctl(2); None where ctypes cannot load it."""
    try:
        import ctypes  # only the fork server needs it: not loaded by every passrpc import

        return ctypes.CDLL(None, use_errno=True)
    except (ImportError, OSError):
        return None


def _die_with_parent(libc: Any, parent: int, sig: int = signal.SIGKILL) -> None:
    """Have the kernel send this process ``sig`` when ``parent`` dies (0: no longer).

    For a worker: the fork server SIGKILLs its workers when its server goes;
    this covers a fork server that is itself killed (the OOM killer, a stray
    SIGKILL), so no worker outlives it unowned. For the fork server, during
    its preload. Without ctypes or prctl(2), nothing happens.
    """
    if libc is None or libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return
    if sig and os.getppid() != parent:  # it died before the request took hold
        os._exit(1)


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=sys.stderr)  # as Python does for sys.exit("message")
    return 1


def _descriptors(value: Any) -> Iterator[FileDescriptor]:
    """Every FileDescriptor in a received value, however deep in lists and maps."""
    if isinstance(value, FileDescriptor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _descriptors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _descriptors(item)


def _close_descriptors(value: Any) -> None:
    for fd in _descriptors(value):
        fd.close()


def _open_fds() -> set[int]:
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # listdir's own descriptor, closed by now
            os.fstat(int(name))
            fds.add(int(name))
    return fds


def _flush_stdio() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
