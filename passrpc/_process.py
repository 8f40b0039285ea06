"""The server process as its owners see it, and the hygiene of a fresh server process.

:class:`ServerProcess` is a started server from one owner's side: its pid,
the owner socket that is this process's reference, a pidfd to wait on and
signal it without racing pid reuse, and reaping (only the starter can). A
fresh server process resets every signal to its default, ignores SIGHUP and
covers inherited descriptors with /dev/null (:func:`child_hygiene`); sockets
it serves are dropped in any process its handlers fork
(:data:`serving_sockets`). :func:`spawn` starts one in a fresh interpreter.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import attrs

from ._errors import StartError
from ._protocol import MESSAGE
from ._socketfile import SocketFile
from ._wire import encode_frame

#: Bytes on the owner socket: the server tells its starter it is ready; an
#: owner tells the server to quit for everyone.
READY = b"R"
STOP = b"S"


@attrs.define
class ServerProcess:
    """A started server as one owner process sees it."""

    pid: int
    owner: socket.socket  # this process's reference: closing it lets go
    starter: int  # pid of the process that started it, the only one that can reap it
    files: SocketFile  # where it listens
    identity: tuple[int, int]  # (st_dev, st_ino) of the socket file it listens on
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
                return readable(self.pidfd, 0)
            return pid_gone(self.pid)
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
                    readable(pidfd, left)
            except (OSError, ValueError):  # another thread saw the end and closed it
                continue
        return True

    def wait_ready(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the server to say it accepts clients.

        Raises:
            StartError: it did not in time, or it exited first.
        """
        data = self.owner.recv(1) if readable(self.owner, timeout) else None
        if data == READY:
            return
        if data is None:
            raise StartError(
                f"the server process {self.pid} was not ready within {timeout} s; "
                "it was killed (raise start_timeout if initialize_server is slow)"
            )
        self.wait(5.0)
        raise StartError(
            f"the server process {self.pid} exited with status {self.exit_status} "
            "before it was ready; its log (the 'passrpc' logger) says why"
        )

    def remove_files(self) -> None:
        """Remove its socket file (if still its own) and the directory made for it."""
        self.files.remove(self.identity)

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


def readable(fd: int | socket.socket, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for ``fd`` to be readable (poll: any descriptor number)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(max(0, int(timeout * 1000 + 0.999))))


def pid_gone(pid: int) -> bool:
    """True once ``pid`` is gone or a zombie (for kernels without pidfd)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, IndexError):
        return True


# Started servers this process let go of (close()) while they still ran; the
# starter reaps them later, so that no zombie outlives the next lifecycle call.
_unreaped: list[ServerProcess] = []
_unreaped_lock = threading.Lock()


def reap_unreaped() -> None:
    """Reap the servers this process let go of that have exited since."""
    with _unreaped_lock:
        _unreaped[:] = [p for p in _unreaped if os.getpid() == p.starter and not p.exited()]


def release(process: ServerProcess) -> None:
    """weakref.finalize target: a Server collected while started lets go of it."""
    process.release()


# Descriptors a server process must not hand down to processes its handlers
# fork (see _forget_in_forked_child): a worker holding the listener, the owner
# socket or another client's connection would keep them open after the
# server closed them, and that client would never see the end of its stream.
serving_sockets: set[socket.socket] = set()


def _forget_in_forked_child() -> None:
    # No lock here: the fork may have happened while another thread held it.
    for sock in list(serving_sockets):
        with contextlib.suppress(OSError):
            sock.close()
    serving_sockets.clear()


os.register_at_fork(after_in_child=_forget_in_forked_child)


def logging_fds() -> set[int]:
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


def child_hygiene(keep: set[int]) -> None:
    """Make a fresh server process: default signals, SIGHUP ignored, no stray descriptors.

    Descriptors are not closed but covered with /dev/null: a Python object
    left over from the parent that closes its number later then closes
    /dev/null, never a descriptor the server opened since. A number at or
    above RLIMIT_NOFILE (inherited from a parent whose limit was higher)
    cannot be covered, and needs not be: no descriptor opened since can get
    it, so it is closed.
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
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd in keep or fd == devnull:
            continue
        try:
            os.fstat(fd)
        except OSError:
            continue  # listdir's own descriptor, already closed
        if soft != resource.RLIM_INFINITY and fd >= soft:
            os.close(fd)
        else:
            os.dup2(devnull, fd, inheritable=False)
    os.close(devnull)


def spawn(
    target: str,
    listener: socket.socket,
    theirs: socket.socket,
    ours: socket.socket,
    config: dict[str, Any],
) -> subprocess.Popen[bytes]:
    """Start ``python -m passrpc._spawn TARGET`` with the listening and owner sockets passed.

    ``config`` (with the password, never in argv or the environment) goes to
    the new process as one frame on ``ours``, the starter's end of the owner
    socket.
    """
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
    data, _ = encode_frame(MESSAGE, [config])
    ours.sendall(data, socket.MSG_NOSIGNAL)
    return popen
