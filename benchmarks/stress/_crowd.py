"""What herd.py and idle.py share: crowds of clients in child processes, a prober, limits.

A crowd is a forked process that opens many connections to a server and holds
them until it is told to go (it exits, and the kernel closes them all at
once) or is killed. A prober is a forked process that opens a fresh
connection, makes one call and closes it, again and again, and reports how
long each took: what a new client waits while the crowd comes and goes.
"""

from __future__ import annotations

import contextlib
import os
import resource
import select
import signal
import socket
import statistics
import time
from collections.abc import Iterator
from typing import Any

from _raw import PASSWORD, hello_frame

import passrpc

#: Descriptors a process keeps for itself beside its crowd's connections.
SPARE_FDS = 200


def raise_nofile(needed: int) -> tuple[int, int, str]:
    """Raise this process's RLIMIT_NOFILE to ``needed`` if it is lower; its children inherit it.

    The hard limit is raised too when that is allowed (root may); otherwise
    the soft limit goes as far as the hard one. Returns the new ``(soft,
    hard)`` and a sentence saying what was done.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return soft, hard, f"RLIMIT_NOFILE {soft} (enough)"
    if hard != resource.RLIM_INFINITY and hard < needed:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, needed))
        except (ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            return (
                hard,
                hard,
                (
                    f"RLIMIT_NOFILE raised to the hard limit {hard} only (not allowed to raise it "
                    f"to {needed})"
                ),
            )
        return needed, needed, f"RLIMIT_NOFILE raised from {soft}/{hard} to {needed}/{needed}"
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    return needed, hard, f"RLIMIT_NOFILE soft limit raised from {soft} to {needed}"


class Child:
    """A forked process and a pipe it reports on; ``kill()`` ends and reaps it."""

    def __init__(self, pid: int, reports: int) -> None:
        self.pid = pid
        self.reports = reports
        self._buffer = b""

    def read_line(self, timeout: float) -> str:
        """The child's next line, waiting up to ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"child {self.pid} said nothing within {timeout} s")
            if select.select([self.reports], [], [], left)[0]:
                chunk = os.read(self.reports, 65536)
                if not chunk:
                    raise EOFError(f"child {self.pid} ended")
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()

    def kill(self) -> None:
        """SIGKILL and reap (the kernel closes every descriptor it held, at once)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)
        with contextlib.suppress(OSError):
            os.close(self.reports)


def _fork(body: Any, *args: Any) -> Child:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(r)
            body(w, *args)
        except BaseException as exc:  # report, never return into the parent's code
            with contextlib.suppress(OSError):
                os.write(w, f"failed {type(exc).__name__}: {exc}\n".encode())
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    return Child(pid, r)


def _hold(report: int, server: passrpc.Server, count: int, kind: str) -> None:
    """A crowd's body: open ``count`` connections of ``kind``, say so, then wait to be killed.

    ``kind`` is "authenticated" (a channel through the handshake that made
    one call) or "stranger" (a raw socket that sent its hello and stops).
    """
    held: list[Any] = []
    started = time.monotonic()
    for i in range(count):
        if kind == "authenticated":
            channel = server.connect(timeout=60)
            channel.write("ok", i)
            channel.read()
            held.append(channel)
        else:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(60)
            for attempt in range(1000):  # a full listen backlog answers EAGAIN
                try:
                    sock.connect(server.socket_path)
                    break
                except BlockingIOError:
                    time.sleep(0.001 * min(attempt + 1, 50))
            sock.sendall(hello_frame())
            held.append(sock)
    os.write(report, f"holding {len(held)} {time.monotonic() - started:.2f}\n".encode())
    while True:
        signal.pause()


def crowd(server: passrpc.Server, count: int, kind: str) -> Child:
    """Fork a process holding ``count`` connections of ``kind`` to ``server`` (see :func:`_hold`)."""
    return _fork(_hold, server, count, kind)


def _probe(report: int, path: str, every: float, window: float, fresh: bool) -> None:
    """A prober's body: a call every ``every`` s for ``window`` s; report each one.

    With ``fresh``, each call is a new client's: connect (the handshake and
    the description), call, close. Without, one connection opened first
    makes every call.
    """
    end = time.monotonic() + window
    kept = None if fresh else passrpc.connect(path, password=PASSWORD, timeout=30)
    while time.monotonic() < end:
        start = time.monotonic()
        try:
            if kept is None:
                proxy = passrpc.connect(path, password=PASSWORD, timeout=30)
                proxy.ok()
                proxy.close()
            else:
                kept.ok()
            outcome = "ok"
        except passrpc.Error as exc:
            outcome = type(exc).__name__
        took = time.monotonic() - start
        os.write(report, f"{start:.6f} {took:.6f} {outcome}\n".encode())
        time.sleep(max(0.0, every - took))
    os.write(report, b"done\n")


def prober(path: str, every: float, window: float, *, fresh: bool = True) -> Child:
    """Fork a prober (see :func:`_probe`): one line per call, then "done"."""
    return _fork(_probe, path, every, window, fresh)


def probe_results(child: Child, timeout: float) -> list[tuple[float, float, str]]:
    """Every ``(start, seconds, outcome)`` a prober reported, once it is done."""
    results = []
    while (line := child.read_line(timeout)) != "done":
        start, took, outcome = line.split()
        results.append((float(start), float(took), outcome))
    return results


def summary(times: list[float]) -> str:
    """Median, 99th percentile and worst of ``times`` (seconds), in milliseconds."""
    if not times:
        return "no attempts"
    ordered = sorted(times)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return (
        f"{len(ordered)} attempts: median {statistics.median(ordered) * 1000:.1f} ms, "
        f"p99 {p99 * 1000:.1f} ms, worst {ordered[-1] * 1000:.1f} ms"
    )


@contextlib.contextmanager
def time_bound(seconds: float) -> Iterator[None]:
    """Raise TimeoutError in this process if the block runs longer than ``seconds``."""

    def expired(signum: int, frame: Any) -> None:
        raise TimeoutError(f"the run took longer than its bound of {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
