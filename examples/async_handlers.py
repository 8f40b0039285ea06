"""asyncio handlers: ``async def`` handlers awaited on the server's event loop.

Run it with ``python examples/async_handlers.py`` (or
``python -m examples.async_handlers``): it starts the server in a child
process, calls it from ten threads at once, and stops it.

The handlers share one client session, opened by an async
``on_initialize_server`` hook on the loop that uses it and closed by an async
``on_finalize_server`` hook: the way to hold an HTTP client session or a
database pool. Here the session stands in for such a client: each request
waits 0.2 s for its "backend", at most four at a time.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from concurrent.futures import ThreadPoolExecutor

import passrpc

server = passrpc.Server()


class Session:
    """A stand-in for an asyncio client session (aiohttp's, a database pool's)."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()  # such sessions belong to one loop
        self.slots = asyncio.Semaphore(4)  # at most four requests in flight
        self.closed = False

    async def get(self, key: str) -> str:
        async with self.slots:
            await asyncio.sleep(0.2)  # the backend's round trip
            return key.upper()

    async def close(self) -> None:
        self.closed = True


session: Session | None = None


@server.on_initialize_server
async def open_session() -> None:
    """Runs once, on the server's event loop, before the first client is served."""
    global session
    session = Session()


@server.on_finalize_server
async def close_session() -> None:
    """Runs once, on the same loop, after the last handler finished."""
    assert session is not None
    await session.close()


@server.handler()
async def lookup(key: str) -> str:
    """Ask the backend for ``key``: the connection holds no thread while this waits."""
    assert session is not None
    return await session.get(key)


@server.handler()
async def same_loop() -> bool:
    """Whether this handler runs on the loop the session was opened on."""
    assert session is not None
    return session.loop is asyncio.get_running_loop()


@server.handler()
async def digest(data: bytes) -> str:
    """Blocking work goes to a thread, so that it does not hold up the other handlers."""
    return await asyncio.to_thread(lambda: hashlib.sha256(data * 10_000).hexdigest())


def main() -> None:
    """Start the server, call it from ten threads at once, stop it."""
    server.start()
    try:
        with server.proxy() as proxy:
            print(f"session opened on the server's loop: {proxy.same_loop()}")
            print(f"digest, computed in a thread: {proxy.digest(b'passrpc')[:16]}")

        keys = [f"key{i}" for i in range(8)]

        def call(key: str) -> str:
            with server.proxy() as proxy:  # a connection per thread
                return proxy.lookup(key)  # type: ignore[no-any-return]

        with ThreadPoolExecutor(len(keys)) as pool:
            begun = time.monotonic()
            values = list(pool.map(call, keys))
            elapsed = time.monotonic() - begun
        print(f"{len(keys)} lookups: {', '.join(values[:3])}, ...")
        # Eight waits of 0.2 s, four at a time: about 0.4 s, not 1.6 s.
        print(f"they waited together: {elapsed < 1.2}")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
