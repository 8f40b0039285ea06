"""Passenger's real use: a preloader that forks workers with the application already loaded.

Passenger's spawn server imported an application once and then forked a
worker per request: each worker starts with the application in memory
(shared copy-on-write) instead of loading it again. The caller gets back a
socket connected to its worker and talks to the worker directly; the
preloader is not in the way.

A handler must not fork by itself: the server runs a thread per client, and
a fork copies any lock another thread holds at that instant, locked for
good (docs/server.md, "Forking workers"). So the forks come from the
server's fork server: a process forked before the server started any
thread, which runs :meth:`Preloader.preload` once and then forks the worker
each ``fork_worker`` call asks for. It also reaps the workers and tells the
server how each one ended.

Here the "application" is the stdlib module :mod:`decimal`, and a worker
speaks a tiny protocol of passrpc messages on its socket:
``("divide", a, b)`` answers the quotient as a string, ``("whoami",)`` its
pid and parent pid (the fork server's); end of file ends the worker.

Run it with ``python examples/preloader.py`` (or ``python -m examples.preloader``),
or serve it with ``python -m passrpc examples.preloader:server``.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
import time
from types import ModuleType

import passrpc

logger = logging.getLogger("passrpc.examples.preloader")

#: The module every worker starts with; it stands in for an application that is slow to load.
PRELOAD = "decimal"


class Preloader(passrpc.Server):
    """A server whose fork server preloads :data:`PRELOAD`; ``spawn_worker`` forks a worker."""

    def __init__(self, module: str = PRELOAD) -> None:
        super().__init__()
        self.module_name = module
        self.app: ModuleType | None = None
        self._workers: dict[int, passrpc.Worker] = {}
        self._workers_lock = threading.Lock()

    def preload(self) -> None:
        """Load the application once, in the fork server, before it forks any worker."""
        super().preload()
        started = time.perf_counter()
        self.app = importlib.import_module(self.module_name)
        logger.info(
            "preloaded %s in %.1f ms", self.module_name, (time.perf_counter() - started) * 1e3
        )

    @passrpc.worker()
    def calculator(self, channel: passrpc.Channel) -> None:
        """The worker: answer ``divide`` and ``whoami`` on ``channel`` until end of file."""
        app = self.app
        assert app is not None  # preloaded: the worker is a fork of the fork server
        while True:
            try:
                command, *args = channel.read()
            except passrpc.ConnectionClosed:
                return  # exit status 0
            if command == "divide":
                app.getcontext().prec = 30
                channel.write(str(app.Decimal(args[0]) / app.Decimal(args[1])))
            elif command == "whoami":
                channel.write(os.getpid(), os.getppid())
            else:
                channel.write(f"unknown command {command!r}")

    @passrpc.handler("spawn_worker", raw=True)
    def spawn_worker(self, channel: passrpc.Channel) -> None:
        """Have a worker forked; reply with a socket connected to it, and its pid."""
        worker = self.fork_worker(self.calculator)
        with self._workers_lock:
            self._workers[worker.pid] = worker
        with worker:  # the caller gets its own copy of the socket; ours closes at once
            channel.write(worker.channel, worker.pid)

    @passrpc.handler("wait_worker")
    def wait_worker(self, pid: int, timeout: float = 10.0) -> int:
        """Wait for worker ``pid`` to end; return its exit status, as the fork server reported it."""
        with self._workers_lock:
            worker = self._workers.pop(pid, None)
        if worker is None:
            raise LookupError(
                f"no worker {pid} from spawn_worker to wait for (or waited for already)"
            )
        return worker.wait(timeout)


server = Preloader()


def main() -> None:
    """Start the preloader, get two workers, talk to each directly, see them end, stop it."""
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
                assert worker_pid == pid
                assert parent != server.pid
                print(
                    f"worker {pid}, forked by the fork server {parent} "
                    f"of server {server.pid}: {a}/{b} = {quotient}"
                )
                # We closed our socket: the worker reads end of file and exits.
                status = proxy.wait_worker(pid)
                print(f"worker {pid} exited with status {status}, reaped by the fork server")
    finally:
        server.stop()  # the fork server ends with the server, and any worker still running
    gone = all(not os.path.exists(f"/proc/{pid}") for pid in pids)
    print(f"{len(pids)} workers served and reaped: {gone}")


if __name__ == "__main__":
    main()
