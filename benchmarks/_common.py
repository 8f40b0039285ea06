"""Shared helpers of the benchmark suite: pinning, forked servers, timed batches, medians.

Nothing here is passrpc-specific. ``run.py`` builds every workload from these
pieces; see docs/performance.md for the method and why it is the way it is.
"""

from __future__ import annotations

import contextlib
import gc
import os
import select
import shutil
import signal
import socket
import statistics
import struct
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

#: The CPUs this process may use when it starts (``taskset`` may have narrowed them).
ALL_CPUS: frozenset[int] = frozenset(os.sched_getaffinity(0))

#: 4-byte big-endian length prefix: the framing of every raw baseline (and of passrpc).
HEADER = struct.Struct(">I")


def pin(cpu: int | None) -> None:
    """Run the calling process on ``cpu`` alone; None lets it use every CPU it started with.

    Latency is measured with client and server on one CPU: on a 2-vCPU VM a
    wake-up across CPUs costs 20-40 µs, which would measure the scheduler,
    not the code (see /work/shared/PERFORMANCE.md).
    """
    os.sched_setaffinity(0, ALL_CPUS if cpu is None else {cpu})


# Processes ------------------------------------------------------------------


class Child:
    """A forked process running one function; ``stop()`` ends and reaps it.

    The function gets a ``ready()`` callable as its first argument and calls
    it once it serves (its socket is bound, say); :func:`fork` waits for that.
    """

    def __init__(self, pid: int, name: str) -> None:
        self.pid = pid
        self.name = name
        self.status: int | None = None

    def alive(self) -> bool:
        """True while the process runs (reaps it if it has ended)."""
        if self.status is not None:
            return False
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        if pid == 0:
            return True
        self.status = os.waitstatus_to_exitcode(status)
        return False

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the process to end and reap it; True if it did."""
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
        return True

    def stop(self, timeout: float = 3.0) -> None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL; always reaps."""
        if not self.alive():
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        if not self.wait(timeout):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self.wait(timeout)


def fork(
    name: str,
    fn: Callable[..., Any],
    *args: Any,
    cpu: int | None = 0,
    ready_timeout: float = 30.0,
) -> Child:
    """Fork a process that pins itself to ``cpu`` and runs ``fn(ready, *args)``.

    Returns once the child called ``ready()``. The child exits with
    ``os._exit`` when ``fn`` returns (0) or raises (1, traceback on stderr),
    so it never runs the parent's cleanup code. Fork before the parent starts
    threads: a forked child gets only the forking thread.

    Raises:
        RuntimeError: the child died or was not ready within ``ready_timeout``.
    """
    r, w = os.pipe()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    pid = os.fork()
    if pid == 0:  # the child
        code = 1
        try:
            os.close(r)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles ^C and stops us
            pin(cpu)

            def ready() -> None:
                os.write(w, b"R")
                os.close(w)

            fn(ready, *args)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)
    os.close(w)
    child = Child(pid, name)
    try:
        readable, _, _ = select.select([r], [], [], ready_timeout)
        if not readable or os.read(r, 1) != b"R":
            child.stop()
            raise RuntimeError(f"{name}: the server process did not become ready")
    finally:
        os.close(r)
    return child


@contextlib.contextmanager
def socket_dir() -> Iterator[str]:
    """A private, short temporary directory for sockets (AF_UNIX paths stop at 107 bytes)."""
    path = tempfile.mkdtemp(prefix="prpcb-", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def unix_listener(path: str, backlog: int = 128) -> socket.socket:
    """A listening AF_UNIX stream socket at ``path``, made in the parent before it forks."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(backlog)
    return sock


def recv_exact(sock: socket.socket, view: memoryview, n: int) -> bool:
    """Fill ``view[:n]`` from ``sock``; False on end of stream."""
    got = sock.recv_into(view, n) if n else 0
    if got == n:
        return True
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if not k:
            return False
        got += k
    return True


# Timing ---------------------------------------------------------------------


class Stats:
    """The per-call times of several timed batches of one system, in seconds."""

    def __init__(self, samples: Sequence[float]) -> None:
        self.samples = sorted(samples)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def q1(self) -> float:
        return _quantile(self.samples, 0.25)

    @property
    def q3(self) -> float:
        return _quantile(self.samples, 0.75)


def _quantile(ordered: Sequence[float], q: float) -> float:
    if len(ordered) == 1:
        return ordered[0]
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def run_calls(call: Callable[[int], Any], n: int) -> float:
    """Make ``n`` calls and return the seconds they took, with the garbage collector as is."""
    start = time.perf_counter()
    for i in range(n):
        call(i)
    return time.perf_counter() - start


def calibrate(call: Callable[[int], Any], warmup: float, batch_time: float) -> int:
    """Warm ``call`` up for ``warmup`` seconds; return the calls that fill ``batch_time``."""
    n, spent = 1, 0.0
    deadline = time.perf_counter() + warmup
    while True:
        spent = run_calls(call, n)
        if time.perf_counter() >= deadline and spent >= batch_time / 10:
            break
        if spent < batch_time / 10:
            n *= 2
    return max(1, round(n * batch_time / spent))


def interleaved_batches(
    calls: dict[str, Callable[[int], Any]],
    *,
    batches: int,
    batch_time: float,
    warmup: float,
) -> dict[str, Stats]:
    """Time ``batches`` batches of every call, taking turns; return per-call Stats by name.

    Taking turns (one batch of each system, then the next round) spreads a
    slow drift of the machine's load over every system alike, so that ratios
    stay fair on a busy machine. Before each batch a few calls warm the
    system's caches again, since the others ran in between.
    """
    sizes = {name: calibrate(call, warmup, batch_time) for name, call in calls.items()}
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(batches):
        for name, call in calls.items():
            n = sizes[name]
            run_calls(call, max(1, n // 20))  # re-warm after the other systems ran
            gc.collect()  # every batch starts from the same heap state; gc stays on
            samples[name].append(run_calls(call, n) / n)
    return {name: Stats(values) for name, values in samples.items()}


def machine_description() -> dict[str, str]:
    """nproc, CPU model, Python version and load averages, for the table's caption."""
    model = "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "python": sys.version.split()[0],
        "implementation": sys.implementation.name,
    }


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, as ``uptime`` prints them."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f}"
