"""Benchmark passrpc.ServerCollection: lookups under threads, the cleaner's CPU, expiry lateness.

Run from the repository root:

    python benchmarks/bench_collection.py            # about 20 seconds
    python benchmarks/bench_collection.py --quick    # about 6 seconds

It prints four figures:

1. lookup_or_add of an existing key (one real forked server) by 1 and by 16
   threads: lookups per second over all threads.
2. The cleaner thread's CPU time (its own thread CPU clock) while 1000 fake
   servers with far deadlines are registered: it should sleep, so ~0.
3. The same with 1000 fake servers whose deadlines fall over a few seconds:
   CPU per expiry, and the lateness of each expiry (the moment the cleaner
   calls stop() minus the deadline), idle and while 16 threads run lookups
   in a tight loop; with that load, the lateness of a bare
   Condition.wait(timeout) too: the floor CPython's GIL sets for any thread.
4. The lateness of real servers' expiry (stop() begins) and the time stop()
   takes until the process is reaped.

Fake servers are plain objects with what the collection uses: start(),
stop(), started, alive, max_idle_time, next_cleaning_time.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import statistics
import sys
import threading
import time
from collections.abc import Iterator

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import passrpc


class FakeServer:
    """What the collection needs of a server, and the time its stop() was called."""

    def __init__(self, max_idle_time: float | None) -> None:
        self.max_idle_time = max_idle_time
        self.next_cleaning_time: float | None = None
        self.started = False
        self.alive = False
        self.lateness: float | None = None
        self.stopped = threading.Event()

    def start(self) -> None:
        self.started = self.alive = True

    def stop(self) -> None:
        now = time.monotonic()
        assert self.next_cleaning_time is not None
        self.lateness = now - self.next_cleaning_time
        self.started = self.alive = False
        self.stopped.set()


def thread_cpu(thread: threading.Thread) -> float:
    """CPU seconds the thread has used (Linux: its per-thread CPU clock)."""
    assert thread.ident is not None
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.3f} ms"


def lookups_per_second(threads: int, seconds: float) -> float:
    """lookup_or_add of one existing key (a real server) from ``threads`` threads."""
    with passrpc.ServerCollection() as collection:

        def factory() -> passrpc.Server:
            return passrpc.Server(max_idle_time=3600)

        collection.lookup_or_add("app", factory)
        counts = [0] * threads
        stop = threading.Event()
        barrier = threading.Barrier(threads + 1)

        def run(i: int) -> None:
            lookup = collection.lookup_or_add
            n = 0
            barrier.wait()
            while not stop.is_set():
                for _ in range(100):
                    lookup("app", factory)
                n += 100
            counts[i] = n

        workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
        for worker in workers:
            worker.start()
        barrier.wait()
        started = time.perf_counter()
        time.sleep(seconds)
        stop.set()
        for worker in workers:
            worker.join()
        elapsed = time.perf_counter() - started
        return sum(counts) / elapsed


def cleaner_idle_cpu(n: int, seconds: float) -> tuple[float, float]:
    """Cleaner CPU and process CPU over ``seconds`` with ``n`` far deadlines registered."""
    with passrpc.ServerCollection() as collection:
        for i in range(n):
            collection.lookup_or_add(i, lambda: FakeServer(3600))
        cleaner = collection._cleaner
        assert cleaner is not None
        cpu0, proc0 = thread_cpu(cleaner), time.process_time()
        time.sleep(seconds)
        return thread_cpu(cleaner) - cpu0, time.process_time() - proc0


@contextlib.contextmanager
def lookup_load(collection: passrpc.ServerCollection, threads: int) -> Iterator[None]:
    """Keep ``threads`` threads looking up one key in a tight loop for the block's duration."""
    stop = threading.Event()

    def load() -> None:
        def factory() -> FakeServer:
            return FakeServer(3600)

        while not stop.is_set():
            collection.lookup_or_add("busy", factory)

    loaders = [threading.Thread(target=load) for _ in range(threads)]
    for loader in loaders:
        loader.start()
    try:
        yield
    finally:
        stop.set()
        for loader in loaders:
            loader.join()


def expiries(n: int, spread: float, load_threads: int) -> tuple[float, list[float]]:
    """Register ``n`` fakes expiring over ``spread`` seconds; cleaner CPU and lateness."""
    servers = [FakeServer(random.uniform(0.2, 0.2 + spread)) for _ in range(n)]
    with passrpc.ServerCollection() as collection, lookup_load(collection, load_threads):
        for i, server in enumerate(servers):
            collection.lookup_or_add(i, lambda s=server: s)
        cleaner = collection._cleaner
        assert cleaner is not None
        cpu0 = thread_cpu(cleaner)
        for server in servers:
            assert server.stopped.wait(spread + 30)
        cpu = thread_cpu(cleaner) - cpu0
    return cpu, [s.lateness for s in servers if s.lateness is not None]


def bare_wait_lateness(n: int, load_threads: int) -> list[float]:
    """The floor: a bare Condition.wait(timeout)'s lateness under the same lookup load."""
    with passrpc.ServerCollection() as collection, lookup_load(collection, load_threads):
        condition = threading.Condition()
        late = []
        for _ in range(n):
            target = time.monotonic() + random.uniform(0.001, 0.01)
            with condition:
                condition.wait(target - time.monotonic())
            late.append(time.monotonic() - target)
    return late


def real_expiries(rounds: int) -> tuple[list[float], list[float]]:
    """Lateness of real servers' expiry, and how long their stop() took."""
    late: list[float] = []
    took: list[float] = []
    done = threading.Event()

    class Timed(passrpc.Server):
        def stop(self, timeout: float = 4.0) -> None:
            begin = time.monotonic()
            assert self.next_cleaning_time is not None
            late.append(begin - self.next_cleaning_time)
            super().stop(timeout)
            took.append(time.monotonic() - begin)
            done.set()

    with passrpc.ServerCollection() as collection:
        for i in range(rounds):
            done.clear()
            collection.lookup_or_add(i, lambda: Timed(max_idle_time=0.05))
            assert done.wait(30)
    return late, took


def report(name: str, values: list[float]) -> None:
    print(
        f"  {name}: n={len(values)} median {ms(statistics.median(values))}, "
        f"p99 {ms(percentile(values, 99))}, max {ms(max(values))}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs")
    args = parser.parse_args(argv)
    seconds = 1.0 if args.quick else 3.0
    random.seed(1)

    print(f"passrpc {passrpc.__version__}, Python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    print(f"switch interval {sys.getswitchinterval() * 1000:.1f} ms")
    print()
    print("1. lookup_or_add of an existing key (real server)")
    for threads in (1, 16):
        rate = lookups_per_second(threads, seconds)
        print(f"  {threads:2d} thread(s): {rate:,.0f} lookups/s")
    print()
    print("2. cleaner CPU with 1000 far deadlines registered")
    cpu, proc = cleaner_idle_cpu(1000, seconds)
    print(f"  over {seconds:.0f} s: cleaner thread {ms(cpu)} CPU; whole process {ms(proc)}")
    print()
    print("3. 1000 fake servers expiring over the run")
    for load in (0, 16):
        cpu, late = expiries(1000 if not args.quick else 300, seconds, load)
        print(
            f"  with {load} lookup threads: cleaner CPU {ms(cpu)} in all, "
            f"{cpu / len(late) * 1e6:.1f} us per expiry"
        )
        report("lateness", late)
        if load:
            report(
                "floor: a bare Condition.wait's lateness, same load", bare_wait_lateness(300, load)
            )
    print()
    print("4. real servers (max_idle_time=0.05), one at a time")
    late, took = real_expiries(10 if args.quick else 30)
    report("lateness of stop()", late)
    report("stop() until reaped", took)


if __name__ == "__main__":
    main()
