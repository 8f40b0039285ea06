"""A fixture app of stream handlers (generator functions), for tests/test_streams.py and the CLI.

Generators that tests watch say how far they got in files the test names:
``progress`` holds the number of items produced so far, and ``marker``
gets the text "closed" once the generator's ``finally`` ran.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Iterator
from typing import Any

import passrpc
from tests.helpers import Gate


def _closed(marker: str) -> None:
    with open(marker, "w") as f:
        f.write("closed")


def numbers(n: int) -> Iterator[int]:
    """Yield 0 to n - 1."""
    yield from range(n)


def pairs(n: int) -> Iterator[tuple[int, int]]:
    """Yield (i, i * i): an item of two values."""
    for i in range(n):
        yield i, i * i


def counted(progress: str, marker: str) -> Iterator[int]:
    """Yield 0, 1, 2, ... forever, writing the count produced to ``progress`` before each yield."""
    fd = os.open(progress, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        i = 0
        while True:
            os.pwrite(fd, f"{i + 1:<12}".encode(), 0)
            yield i
            i += 1
    finally:
        os.close(fd)
        _closed(marker)


def ticking(marker: str, every: float = 0.01) -> Iterator[int]:
    """Yield 0, 1, 2, ... forever, one every ``every`` seconds; mark ``marker`` when closed."""
    try:
        i = 0
        while True:
            yield i
            i += 1
            time.sleep(every)
    finally:
        _closed(marker)


def gated(
    started: passrpc.FileDescriptor, release: passrpc.FileDescriptor, marker: str
) -> Iterator[str]:
    """Yield "first", then wait in its own code until the test lets go, then "second" forever."""
    try:
        yield "first"
        Gate.hold(started, release)
        while True:
            yield "second"
    finally:
        _closed(marker)


def pipes(n: int) -> Iterator[Any]:
    """Yield n pipes' read ends, each holding the text "item i", with the index."""
    for i in range(n):
        r, w = os.pipe()
        os.write(w, f"item {i}".encode())
        os.close(w)
        with open(r, "rb") as f:
            yield i, f


def failing(n: int) -> Iterator[int]:
    """Yield 0 to n - 1, then raise ValueError."""
    yield from range(n)
    raise ValueError(f"failed after {n} items")


def unsendable() -> Iterator[object]:
    """Yield 1, then a value that cannot travel."""
    yield 1
    yield object()


def echo(value: Any) -> Any:
    """Return ``value`` (a plain handler)."""
    return value


def double(value: Any) -> Any:
    """Return twice ``value`` (a plain handler, streamed as one item when asked for a stream)."""
    return value * 2


def sums(channel: passrpc.Channel) -> None:
    """A raw handler: answer one message with its sum."""
    channel.write(sum(channel.read()))


class Counter(passrpc.Server):
    """The subclass form: a generator method streams."""

    @passrpc.handler
    def count(self, n: int) -> Iterator[int]:
        """Yield 1 to n."""
        yield from range(1, n + 1)


def make_server(**options: Any) -> passrpc.Server:
    """A server with every handler of this module."""
    server = passrpc.Server(**options)
    for fn in (numbers, pairs, counted, ticking, gated, pipes, failing, unsendable, echo, double):
        server.add_handler(fn.__name__, fn)
    server.add_handler("sums", sums, raw=True)
    server.add_handler("fives", functools.partial(numbers, 5))
    return server


server = make_server()
