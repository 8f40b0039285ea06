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
import concurrent.futures
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
#: Seconds beyond their own bounds that stopping waits for the loop's thread.
_SLACK = 0.5

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
        self._watching: dict[asyncio.Task[Any], int] = {}  # tasks whose socket is watched
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
            # Stopped: what still runs (tasks a handler started, say) had its
            # chance; cancel it and give it a moment for its finally blocks.
            left = asyncio.all_tasks(loop)
            for task in left:
                task.cancel()
            if left:
                loop.run_until_complete(asyncio.wait(left, timeout=CANCEL_GRACE))
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
        task = loop.create_task(self._await(conn, call))
        self._tasks.add(task)
        # Runs after the task's first step: a handler that returned without
        # waiting for anything needs no watch (two epoll_ctl calls spared).
        loop.call_soon(self._watch, task, conn)

    async def _await(self, conn: ServerConnection, call: AsyncCall) -> None:
        task = asyncio.current_task()
        ok = False
        try:
            await call.reply()
            ok = True
        except asyncio.CancelledError:
            logger.debug("cancelled the call of %r", call.entry.name)
        except BaseException:  # GeneratorExit and the like: AsyncCall.reply reports the rest
            logger.exception("the call of %r failed", call.entry.name)
        finally:
            self._tasks.discard(task)
            if self._watching.pop(task, None) is not None:  # type: ignore[arg-type]
                self.loop.remove_reader(conn.fd)
        # Here, not in a done callback: that would cost the loop another turn.
        self._replied(conn, call if ok else None)

    def _watch(self, task: asyncio.Task[Any], conn: ServerConnection) -> None:
        if not task.done():
            self._watching[task] = conn.fd
            self.loop.add_reader(conn.fd, self._readable, task, conn)

    def _readable(self, task: asyncio.Task[Any], conn: ServerConnection) -> None:
        # The only read of the socket while the task runs: a peek. End of
        # stream is a client gone (it closed, or its call timed out): cancel.
        # Bytes are a request sent behind this one: they wait for the reply,
        # and so does any hang-up after them.
        del self._watching[task]
        self.loop.remove_reader(conn.fd)
        if conn.hung_up():
            task.cancel()

    def running(self) -> int:
        """How many calls the loop awaits now (read from any thread: a hint)."""
        return len(self._tasks)

    def cancel_all(self, deadline: float) -> int:
        """Let the running calls end by ``deadline`` (a ``time.monotonic()``), then cancel the rest.

        Cancelled handlers get :data:`CANCEL_GRACE` seconds to run their
        ``finally``. Returns how many calls were cancelled (logged as a warning).
        """

        async def drain() -> int:
            while self._tasks and (left := deadline - time.monotonic()) > 0:
                await asyncio.wait(set(self._tasks), timeout=left)
            late = set(self._tasks)
            for task in late:
                task.cancel()
            if late:
                logger.warning("cancelling %d async handler(s) still running", len(late))
                await asyncio.wait(late, timeout=CANCEL_GRACE)
            return len(late)

        future = asyncio.run_coroutine_threadsafe(drain(), self.loop)
        # Bounded: a handler that blocks the loop never lets drain() run; it
        # is left running, as a plain handler past the timeout would be.
        bound = max(deadline - time.monotonic(), 0.0) + CANCEL_GRACE + _SLACK
        try:
            return future.result(bound)
        except concurrent.futures.TimeoutError:
            future.cancel()
            logger.warning(
                "the event loop is blocked (an async handler that calls blocking code "
                "without awaiting?); leaving %d async handler(s) running",
                len(self._tasks),
            )
            return len(self._tasks)

    def stop(self) -> None:
        """Stop the loop and wait for its thread to end."""
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            # Bounded: a blocked loop's thread (a daemon) is left behind.
            self.thread.join(CANCEL_GRACE + _SLACK)
        else:
            self.loop.close()
