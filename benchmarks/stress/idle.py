"""A crowd of idle authenticated clients: what the server holds, what a new client waits, how it stops.

Run from the repository root (about 30 s at 20,000):

    python benchmarks/stress/idle.py                    # 20,000 clients in 4 processes
    python benchmarks/stress/idle.py --count 5000 --processes 2

``--processes`` child processes open ``--count`` authenticated connections
between them (through the handshake and one call each) to a real server
(``Server.start()``, ``max_connections`` above the count), and hold them
idle. Meanwhile the server's threads, descriptors and memory (VmRSS, and
VmHWM, its peak) are read from /proc, and a prober process connects, calls
and closes every 20 ms for two seconds. Then ``Server.stop()`` is timed,
with the crowd still connected, and the server's log is searched for the
SIGKILL that ``stop()`` falls back on after its timeout. Every process is
killed and reaped and every file removed at the end; the run is bounded by
``--bound`` seconds.

Descriptors: the server needs one per client, and a few of its own. This
process raises RLIMIT_NOFILE to the count plus a margin before it starts the
server, which inherits it; as root it may raise the hard limit too. Where it
may not, the count is lowered to what fits and the output says so. See
docs/reliability.md, "Bounded concurrency", for the figures.
"""

from __future__ import annotations

import argparse
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
from _raw import attacked_server, fd_count, log_lines, memory, mib, thread_count

#: Descriptors the server may need beside its clients' at any moment: the
#: prober's connection, and a margin.
_SERVER_SPARE = 4


def idle(count: int, processes: int, bound: float) -> None:
    soft, _, said = raise_nofile(count + SPARE_FDS)
    print(said)
    with time_bound(bound), attacked_server(max_connections=count + 100) as (server, log):
        pid = server.pid
        assert pid is not None
        base = (fd_count(pid), thread_count(pid), memory(pid)["VmRSS"])
        room = soft - base[0] - _SERVER_SPARE
        if room < count:
            print(
                f"   the server process holds {base[0]} descriptors of its own, so under that "
                f"limit it can hold {room:,} clients, not {count:,}: using {room:,}"
            )
            count = room
        print(f"\n== {count:,} idle authenticated clients in {processes} processes")
        children: list[Child] = []
        try:
            started = time.monotonic()
            shares = [count // processes + (i < count % processes) for i in range(processes)]
            children += [crowd(server, share, "authenticated") for share in shares]
            held = sum(int(child.read_line(bound).split()[1]) for child in children)
            opened = time.monotonic() - started
            figures = memory(pid)
            print(
                f"   {held:,} clients connected, authenticated and called in {opened:.1f} s; "
                f"the server: {thread_count(pid)} threads (was {base[1]}), "
                f"{fd_count(pid):,} descriptors (was {base[0]}), VmRSS {mib(figures['VmRSS'])} "
                f"(was {mib(base[2])}), VmHWM {mib(figures['VmHWM'])}"
            )
            probe = prober(server.socket_path, every=0.02, window=2.0)
            children.append(probe)
            results = probe_results(probe, bound)
            failed = [outcome for _, _, outcome in results if outcome != "ok"]
            print(
                f"   a new client (connect, describe, call, close) meanwhile: {summary([t for _, t, _ in results])}"
            )
            print(f"   failed attempts: {len(failed)} {sorted(set(failed)) if failed else ''}")
            print(
                f"   the server still: {thread_count(pid)} threads, VmRSS {mib(memory(pid)['VmRSS'])}"
            )
            stopping = time.monotonic()
            server.stop()
            took = time.monotonic() - stopping
        finally:
            for child in children:
                child.kill()
        killed = log_lines(log, "killing it")
        print(
            f"   stop() with the crowd connected returned in {took:.2f} s; "
            + (
                "the server had to be killed: " + killed[0]
                if killed
                else "no SIGKILL (it ended by itself)"
            )
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--processes", type=int, default=4, help="client processes")
    parser.add_argument("--bound", type=float, default=300.0, help="seconds the run may take")
    args = parser.parse_args()
    idle(args.count, args.processes, args.bound)


if __name__ == "__main__":
    main()
