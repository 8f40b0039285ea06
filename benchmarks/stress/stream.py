"""A long stream, and a stalled one: what each side holds while a million items go by.

Run from the repository root (a few seconds):

    python benchmarks/stress/stream.py                  # 1,000,000 items
    python benchmarks/stress/stream.py --items 100000

A real server (``Server.start()``) streams ``numbers(n)`` (``yield from
range(n)``) to a sync proxy in this process. Every tenth of the way the
VmRSS of both processes is read from /proc: constant memory on both sides
is the claim (the stream's window, docs/protocol.md section 9, bounds what
is in flight). Then a consumer that takes one item and stops: the
generator's progress (written by itself) shows it stops a window ahead.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Iterator

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import passrpc


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    args = parser.parse_args()
    server = passrpc.Server()

    @server.handler
    def numbers(n: int) -> Iterator[int]:
        yield from range(n)

    @server.handler
    def counted(path: str) -> Iterator[int]:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            i = 0
            while True:
                os.pwrite(fd, f"{i + 1:<12}".encode(), 0)
                yield i
                i += 1
        finally:
            os.close(fd)

    server.start()
    try:
        assert server.pid is not None
        with server.proxy(timeout=30) as proxy:
            step = max(args.items // 10, 1)
            samples = []
            start = time.perf_counter()
            for i, _ in enumerate(proxy.numbers(args.items)):
                if i % step == 0:
                    samples.append((i, rss_kib(os.getpid()), rss_kib(server.pid)))
            elapsed = time.perf_counter() - start
            print(f"{args.items:,} items in {elapsed:.2f} s ({args.items / elapsed:,.0f} items/s)")
            print("item        client VmRSS   server VmRSS")
            for i, client, served in samples:
                print(f"{i:>9,}   {client:>8,} KiB   {served:>8,} KiB")
            with tempfile.TemporaryDirectory() as tmp:
                progress = os.path.join(tmp, "progress")
                with proxy.counted(progress) as stream:
                    next(stream)
                    time.sleep(1.0)  # a stalled consumer: how far does the generator get?
                    with open(progress) as f:
                        print(
                            f"a consumer that took 1 item and stopped for 1 s: the generator "
                            f"produced {int(f.read())} (the proxies' window is 256)"
                        )
    finally:
        server.stop()


if __name__ == "__main__":
    main()
