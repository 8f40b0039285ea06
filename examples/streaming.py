"""Streaming: a generator handler that follows a growing log file, as ``tail -f`` does.

The handler's first item is the log file itself (its descriptor: the caller
can read what was written before), then each line appended to it, as it
comes. The caller iterates; closing the stream cancels it, and the
connection serves the next call. The server's generator stops (its
``finally`` runs) at its next ``yield``: while it waits for a line in its
own code nothing can stop it, so here it stops when the next line comes.

Run it with ``python examples/streaming.py`` (or ``python -m examples.streaming``).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import passrpc

server = passrpc.Server()
following = [0]  # in the server process: generators running now


@server.handler
def follow(path: str, poll: float = 0.01) -> Iterator[Any]:
    """Yield the log file at ``path`` (a descriptor), then each line appended to it, forever."""
    following[0] += 1
    try:
        with open(path, "rb") as log:
            log.seek(0, os.SEEK_END)  # from here on, only what is appended
            # A file of its own for the caller (a copy of ``log``'s descriptor
            # would share its offset), sent as a descriptor with the first item.
            with open(path, "rb") as whole:
                yield whole
            while True:
                line = log.readline()
                if line.endswith(b"\n"):
                    yield line.decode().rstrip("\n")
                else:
                    log.seek(-len(line), os.SEEK_CUR)  # half a line: read it again whole
                    time.sleep(poll)
    finally:
        following[0] -= 1


@server.handler
def followers() -> int:
    """How many follow() generators run now."""
    return following[0]


def main() -> None:
    """Write a log, follow it through the server, append to it, stop following."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "app.log")
        with open(path, "w") as f:
            f.write("started\nready\n")
        server.start()
        try:
            with server.proxy(timeout=10) as proxy, open(path, "a") as writer:
                with proxy.follow(path) as stream:
                    first = next(stream)  # a passrpc.FileDescriptor of app.log
                    with first.open("r") as log:
                        print("before:", ", ".join(log.read().split()))
                    for i in range(1, 4):
                        writer.write(f"event {i}\n")
                        writer.flush()
                        print("line:", next(stream))
                    print("followers while open:", proxy.followers())
                # Leaving the block cancelled the stream. The generator waits
                # for a line in its own code: it stops at its next yield.
                writer.write("event 4\n")
                writer.flush()
                deadline = time.monotonic() + 10
                while proxy.followers() and time.monotonic() < deadline:
                    time.sleep(0.01)
                print("followers after close and one more line:", proxy.followers())
        finally:
            server.stop()


if __name__ == "__main__":
    main()
