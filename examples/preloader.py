"""Passenger's real use: a preloader that forks workers with the application already loaded.

Passenger's spawn server imported an application once, in
``initialize_server``, and then forked a worker per request: each worker
starts with the application in memory (shared copy-on-write) instead of
loading it again. The caller gets back a socket connected to its worker and
talks to the worker directly; the preloader is not in the way.

Here the "application" is the stdlib module :mod:`decimal`, and a worker
speaks a tiny protocol of passrpc messages on its socket:
``("divide", a, b)`` answers the quotient as a string, ``("whoami",)`` its pid
and parent pid; end of file ends the worker. The preloader reaps its workers
without SIGCHLD: with ``os.waitpid(WNOHANG)`` on every request, and in
``finalize_server`` it terminates the ones still running and reaps them all.

Run it with ``python examples/preloader.py`` (or ``python -m examples.preloader``),
or serve it with ``python -m passrpc examples.preloader:server``.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import signal
import socket
import threading
import time
import warnings
from types import ModuleType
from typing import NoReturn

import passrpc

logger = logging.getLogger("passrpc.examples.preloader")

#: The module every worker starts with; it stands in for an application that is slow to load.
PRELOAD = "decimal"


class Preloader(passrpc.Server):
    """A server that preloads :data:`PRELOAD` and forks a worker per ``spawn_worker`` call."""

    def __init__(self, module: str = PRELOAD) -> None:
        super().__init__()
        self.module_name = module
        self.app: ModuleType | None = None
        self._workers: set[int] = set()
        self._workers_lock = threading.Lock()

    def initialize_server(self) -> None:
        """Load the application once, in the server process, before any client comes."""
        super().initialize_server()
        started = time.perf_counter()
        self.app = importlib.import_module(self.module_name)
        logger.info(
            "preloaded %s in %.1f ms", self.module_name, (time.perf_counter() - started) * 1e3
        )
        # Python 3.12+ warns about fork() in a process with threads, since the
        # child may inherit a lock another thread held. The worker below uses
        # nothing but its socket and the preloaded module, and leaves with
        # os._exit, so it is safe here (Passenger's spawn server did the same).
        warnings.filterwarnings(
            "ignore", message=r".*fork\(\) may lead to deadlocks", category=DeprecationWarning
        )

    def finalize_server(self) -> None:
        """Terminate the workers still running, and reap every one, before the server exits."""
        with self._workers_lock:
            workers, self._workers = self._workers, set()
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in workers:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        super().finalize_server()

    def _reap(self) -> None:
        """Collect the workers that have exited, without blocking (no SIGCHLD handler needed)."""
        with self._workers_lock:
            for pid in list(self._workers):
                try:
                    done, _ = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    done = pid
                if done:
                    self._workers.discard(pid)

    @passrpc.handler("spawn_worker", raw=True)
    def spawn_worker(self, channel: passrpc.Channel) -> None:
        """Fork a worker that has the application loaded; reply with a socket to it and its pid."""
        self._reap()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with self._workers_lock:  # so that _reap never sees a pid before it is ours
            pid = os.fork()
            if pid == 0:
                ours.close()
                _worker(theirs, self.app)
            self._workers.add(pid)
        theirs.close()
        with ours:  # the caller gets its own copy; the server's closes at once
            channel.write(ours, pid)

    @passrpc.handler("workers")
    def workers(self) -> list[int]:
        """Return the pids of the workers still running."""
        self._reap()
        with self._workers_lock:
            return sorted(self._workers)


def _worker(sock: socket.socket, app: ModuleType | None) -> NoReturn:
    """Serve the worker protocol on ``sock`` until end of file; never returns."""
    code = 1
    try:
        # The worker inherited the server's descriptors, its clients'
        # connections among them: drop them all, or a client would not see
        # the server close its connection while this worker lives.
        keep = sock.fileno()
        os.closerange(3, keep)
        os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX"))
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        assert app is not None
        with passrpc.Channel(sock) as channel:
            while True:
                try:
                    command, *args = channel.read()
                except passrpc.ConnectionClosed:
                    break
                if command == "divide":
                    app.getcontext().prec = 30
                    channel.write(str(app.Decimal(args[0]) / app.Decimal(args[1])))
                elif command == "whoami":
                    channel.write(os.getpid(), os.getppid())
                else:
                    channel.write(f"unknown command {command!r}")
        code = 0
    finally:
        os._exit(code)


server = Preloader()


def main() -> None:
    """Start the preloader, get two workers, talk to each directly, stop it."""
    server.start()
    pids = []
    try:
        with server.proxy() as proxy:
            for a, b in (("1", "7"), ("22", "7")):
                with proxy.spawn_worker() as channel:  # a raw handler: we read its reply
                    sock, pid = channel.read()
                pids.append(pid)
                # The socket goes straight to the worker; the preloader is not in the way.
                with passrpc.Channel(sock.socket()) as worker:
                    worker.write("whoami")
                    worker_pid, parent = worker.read()
                    worker.write("divide", a, b)
                    (quotient,) = worker.read()
                assert (worker_pid, parent) == (pid, server.pid)
                print(f"worker {pid}, forked by the preloader {parent}: {a}/{b} = {quotient}")
    finally:
        server.stop()  # finalize_server reaps every worker before the server exits
    gone = all(not os.path.exists(f"/proc/{pid}") for pid in pids)
    print(f"{len(pids)} workers served and reaped: {gone}")


if __name__ == "__main__":
    main()
