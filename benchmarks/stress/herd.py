"""A herd: thousands of connections to one server closing at once, and what a new client waits.

Run from the repository root (about 30 s for both kinds at 10,000):

    python benchmarks/stress/herd.py                          # 10,000 strangers, then 10,000 authenticated
    python benchmarks/stress/herd.py --kind stranger          # connected, hello sent, then silent
    python benchmarks/stress/herd.py --kind authenticated     # through the handshake and one call
    python benchmarks/stress/herd.py --count 5000

A child process opens ``--count`` connections of a kind to a real server
(``Server.start()``, ``max_connections`` above the count, the handshake bound
raised to 120 s so that strangers stay), holds them, and is killed with
SIGKILL: the kernel closes every one of them at once. A prober process
connects, calls and closes every 10 ms from half a second before until the
window ends, and reports how long each new client took; another calls on a
connection it opened before, as often. The server's threads
and descriptors are read from /proc every 5 ms until its descriptors are
back where they were. Every process is killed and reaped and every file
removed at the end; the run is bounded by ``--bound`` seconds. This process
and its children raise RLIMIT_NOFILE for themselves as far as the count
needs (root may raise the hard limit too). See docs/reliability.md,
"Bounded concurrency", for the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import time

from _crowd import (
    SPARE_FDS,
    Child,
    crowd,
    probe_results,
    prober,
    raise_nofile,
    summary,
    time_bound,
)
from _raw import attacked_server, fd_count, memory, mib, thread_count


def herd(kind: str, count: int, window: float, bound: float) -> None:
    print(f"\n== {count:,} {kind} connections closing at once")
    with (
        time_bound(bound),
        attacked_server(max_connections=count + 100, handshake_timeout=120.0) as (server, _log),
    ):
        pid = server.pid
        assert pid is not None
        base_fds, base_threads = fd_count(pid), thread_count(pid)
        children: list[Child] = []
        try:
            holder = crowd(server, count, kind)
            children.append(holder)
            _, held, seconds = holder.read_line(bound).split()
            while fd_count(pid) < base_fds + count:  # connected is not yet accepted
                time.sleep(0.01)
            time.sleep(0.2)  # and the last hellos answered
            print(
                f"   {int(held):,} connections opened in {float(seconds):.1f} s; the server "
                f"holds {fd_count(pid):,} descriptors (was {base_fds}), {thread_count(pid)} "
                f"threads (was {base_threads}), VmRSS {mib(memory(pid)['VmRSS'])}"
            )
            probe = prober(server.socket_path, every=0.01, window=window)
            steady = prober(server.socket_path, every=0.01, window=window, fresh=False)
            children += [probe, steady]
            time.sleep(0.5)  # the prober's first attempts: the server with the crowd idle
            killed = time.monotonic()
            holder.kill()
            most_threads, released = thread_count(pid), None
            while time.monotonic() - killed < window - 0.5:
                most_threads = max(most_threads, thread_count(pid))
                # The crowd's gone when no more than the probers' two connections remain.
                if released is None and fd_count(pid) <= base_fds + 2:
                    released = time.monotonic() - killed
                time.sleep(0.005)
            results = probe_results(probe, bound)
            kept = probe_results(steady, bound)
        finally:
            for child in children:
                child.kill()
        gone = f"{released:.2f} s" if released is not None else f"more than {window - 0.5} s"
        print(
            f"   killed the crowd: the server closed every connection within {gone} "
            f"(descriptors back to {base_fds} and the probers' two); at most {most_threads} threads meanwhile"
        )
        before = [took for start, took, _ in results if start < killed]
        during = [
            took
            for start, took, _ in results
            if killed <= start <= killed + (released if released is not None else window)
        ]
        failed = [outcome for _, _, outcome in results + kept if outcome != "ok"]
        print(f"   a new client (connect, describe, call, close) before: {summary(before)}")
        print(f"   ... from the kill until all were closed: {summary(during)}")
        print(f"   ... every attempt: {summary([took for _, took, _ in results])}")
        print(f"   a call on a connection opened before: {summary([t for _, t, _ in kept])}")
        print(f"   failed attempts: {len(failed)} {sorted(set(failed)) if failed else ''}")
        print(f"   server after: {thread_count(pid)} threads, VmHWM {mib(memory(pid)['VmHWM'])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", choices=("stranger", "authenticated", "both"), default="both")
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--window", type=float, default=4.0, help="seconds the prober runs")
    parser.add_argument("--bound", type=float, default=240.0, help="seconds a herd may take")
    args = parser.parse_args()
    print(raise_nofile(args.count + SPARE_FDS)[2])
    kinds = ("stranger", "authenticated") if args.kind == "both" else (args.kind,)
    for kind in kinds:
        with contextlib.suppress(KeyboardInterrupt):
            herd(kind, args.count, args.window, args.bound)


if __name__ == "__main__":
    main()
