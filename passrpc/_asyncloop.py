"""The server's asyncio event loop: a thread of its own that awaits the async handlers.

Started by the server's loop (:mod:`passrpc._loop`) only when the registry
has an ``async def`` handler or hook, after the fork server is forked. A pool
thread that reads an async handler's request hands its
:class:`~passrpc._dispatch.AsyncCall` here (:meth:`AsyncLoop.submit`, which
does not wait) and is free: the connection holds no thread while its handler
awaits. A task awaits the call while the loop watches the socket for the
client's hang-up, which cancels the task. When the task ends, the connection
goes back to the server's loop with its reply (``replied``); a pool thread
sends it, so a large reply or a client that does not read never blocks this
loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ._connection import ServerConnection
from ._dispatch import AsyncCall

logger = logging.getLogger("passrpc")

#: Seconds :meth:`AsyncLoop.cancel_all` gives cancelled handlers to run their
#: ``finally`` before the loop stops anyway.
CANCEL_GRACE = 1.0

#: What :meth:`AsyncLoop.submit` calls, on the loop's thread, when a call is
#: over: the connection and its call (None: cancelled or gone, close it).
Replied = Callable[[ServerConnection, AsyncCall | None], None]


class AsyncLoop:
    """An asyncio event loop in the thread ``passrpc-asyncio``, and the calls it awaits.

    Args:
        replied: called on the loop's thread with each connection whose call
            is over (see :data:`Replied`).
    """

    def __init__(self, replied: Replied) -> None:
        self.loop = asyncio.new_event_loop()
        self._replied = replied
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._run, name="passrpc-asyncio", daemon=True)

    def start(self) -> None:
        """Start the loop's thread; return once the loop runs."""
        self.thread.start()
        self._ready.wait()

    def _run(self) -> None:
        loop = self.loop
        asyncio.set_event_loop(loop)
        loop.call_soon(self._ready.set)
        try:
            loop.run_forever()
            # Stopped: what is still running had its chance (cancel_all).
            for task in asyncio.all_tasks(loop):
                task.cancel()
            loop.run_until_complete(asyncio.sleep(0))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            loop.close()

    def await_(self, awaitable: Awaitable[Any]) -> Any:
        """Await ``awaitable`` on the loop from another thread; its result (or exception)."""

        async def wrap() -> Any:
            return await awaitable

        return asyncio.run_coroutine_threadsafe(wrap(), self.loop).result()

    def submit(self, conn: ServerConnection, call: AsyncCall) -> None:
        """Await ``call`` for ``conn`` on the loop (from a pool thread, which does not wait)."""
        self.loop.call_soon_threadsafe(self._begin, conn, call)

    def _begin(self, conn: ServerConnection, call: AsyncCall) -> None:
        loop = self.loop
        task = loop.create_task(call.reply())
        self._tasks.add(task)
        fd = conn.fd
        watching = True

        def readable() -> None:
            # The only read of the socket while the task runs: a peek. End of
            # stream is a client gone (it closed, or its call timed out):
            # cancel. Bytes are a request sent behind this one: they wait
            # for the reply, and so does any hang-up after them.
            nonlocal watching
            watching = False
            loop.remove_reader(fd)
            if conn.hung_up():
                logger.debug("the client of %r left; cancelling it", call.entry.name)
                task.cancel()

        def done(task: asyncio.Task[Any]) -> None:
            self._tasks.discard(task)
            if watching:
                loop.remove_reader(fd)
            ok = not task.cancelled() and task.exception() is None
            self._replied(conn, call if ok else None)

        loop.add_reader(fd, readable)
        task.add_done_callback(done)

    def running(self) -> int:
        """How many calls the loop awaits now (read from any thread: a hint)."""
        return len(self._tasks)

    def cancel_all(self, deadline: float) -> int:
        """Let the running calls end by ``deadline`` (a ``time.monotonic()``), then cancel the rest.

        Cancelled handlers get :data:`CANCEL_GRACE` seconds to run their
        ``finally``. Returns how many calls were cancelled.
        """

        async def drain() -> int:
            while self._tasks and (left := deadline - time.monotonic()) > 0:
                await asyncio.wait(set(self._tasks), timeout=left)
            late = set(self._tasks)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=CANCEL_GRACE)
            return len(late)

        return asyncio.run_coroutine_threadsafe(drain(), self.loop).result()  # type: ignore[no-any-return]

    def stop(self) -> None:
        """Stop the loop and wait for its thread to end."""
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join()
        else:
            self.loop.close()
