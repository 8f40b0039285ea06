"""An async generator handler's items, fetched from the server's event loop for a stream's pool thread.

A stream of an ``async def`` generator is driven as a sync generator's is
(:class:`~passrpc._streams.StreamCall`, on the pool thread that serves the
connection): its reads of the client's credit and cancels block. Only the
items come from elsewhere: :class:`AsyncItems` is the iterator it drives,
and each ``next()`` asks one task on the event loop for the generator's next
item and waits for it. One task for the whole stream, so the generator runs
in one context from its first item to its last (the one :func:`current_peer
<passrpc._dispatch.current_peer>` reads, and any context variable it sets
itself), on every Python from 3.10 on. Closing the iterator cancels that
task: the generator is closed at its ``yield`` (``aclose()``: its
``finally`` runs), or cancelled at its ``await`` if the loop stops under it.
While an item is slow to come, the waiting thread looks every
:data:`LOOK_EVERY` seconds at whether the client hung up (or the server shut
the connection to stop): then the generator is cancelled where it awaits,
as an async handler's call is.

Without the server's loop (a :class:`~passrpc._dispatch.Dispatcher` that
converses in a thread of its own) the iterator runs a private event loop in
the calling thread while it waits for each item, and closes it at the end.
Imported only by a stream of an async handler: asyncio is loaded when wanted.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import select
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

from ._streaming import ClientGone

#: Seconds between two looks, while an item is awaited, at whether the
#: client hung up (then the generator is cancelled where it awaits) and
#: whether the event loop is still there (a loop closed under a wait must
#: not hold the thread forever). Nothing is looked at while items come faster.
LOOK_EVERY = 0.5


async def one_item(
    fn: Callable[..., Awaitable[Any]], args: list[Any], kwargs: dict[str, Any]
) -> AsyncIterator[Any]:
    """A plain ``async def`` asked for a stream: its one result is the stream's one item."""
    yield await fn(*args, **kwargs)


class AsyncItems:
    """The items of ``agen`` as a blocking iterator; ``close()`` closes the generator.

    Args:
        agen: the async generator (made, not started: nothing of it runs here).
        loop: the server's event loop, run by another thread; None for a
            private one that this iterator runs in the calling thread.
        context: the generator's context (the handler's peer set in it).
        fd: the connection's socket, watched for a hang-up while an item is
            awaited (None: not watched).
    """

    __slots__ = (
        "_agen",
        "_cancelled",
        "_context",
        "_done",
        "_fd",
        "_filled",
        "_loop",
        "_own",
        "_ready",
        "_slot",
        "_task",
        "_waiter",
    )

    def __init__(
        self,
        agen: AsyncGenerator[Any, None],
        loop: asyncio.AbstractEventLoop | None,
        context: contextvars.Context,
        fd: int | None = None,
    ) -> None:
        self._agen = agen
        self._fd = fd
        self._cancelled = False  # the task was cancelled once: never again (its finally runs)
        self._own = loop is None
        self._loop = asyncio.new_event_loop() if loop is None else loop
        self._context = context
        self._task: asyncio.Task[None] | None = None
        #: On the loop: what the task awaits for the thread's next ask.
        self._waiter: asyncio.Future[None] | None = None
        #: The answer to an ask: (True, the item) or (False, what to raise).
        self._slot: tuple[bool, Any] = (False, None)
        # Released by the loop when the slot is filled: a plain lock is the
        # cheapest hand-off between two threads (a Future per item costs a
        # fifth more per item).
        self._ready = threading.Lock()
        self._ready.acquire()
        #: The private loop's wait for the slot (no loop of the server's).
        self._filled: asyncio.Future[None] | None = None
        #: Set when the task is over: how the generator's closing went.
        self._done: concurrent.futures.Future[None] = concurrent.futures.Future()

    def __iter__(self) -> AsyncItems:
        return self

    def __next__(self) -> Any:
        loop = self._loop
        if self._own:
            self._filled = loop.create_future()
            self._ask()
            loop.run_until_complete(self._filled)
        else:
            try:
                loop.call_soon_threadsafe(self._ask)
            except RuntimeError:  # closed: the server is stopping
                raise _stopping() from None
            ready = self._ready
            while not ready.acquire(timeout=LOOK_EVERY):
                if loop.is_closed():
                    raise _stopping()
                if self._hung_up():
                    self._cancel()  # CancelledError where it awaits; close() waits for its end
                    raise ClientGone(
                        "the connection was shut while the stream's async generator awaited an "
                        "item: the client hung up, or the server is stopping"
                    )
        ok, value = self._slot
        self._slot = (False, None)  # let go of the item's descriptors with the item
        if ok:
            return value
        self._over()  # the generator ended, raised, or was cancelled
        if type(value) is StopAsyncIteration:
            raise StopIteration
        raise value

    def _hung_up(self) -> bool:
        """Whether the client shut its end (buffered bytes or not: POLLRDHUP says so)."""
        if self._fd is None:
            return False
        poller = select.poll()
        poller.register(self._fd, select.POLLRDHUP)
        return any(events & (select.POLLRDHUP | select.POLLHUP) for _, events in poller.poll(0))

    def _cancel(self) -> bool:
        """Cancel the task, once; False if the loop is closed (it cancelled the task as it stopped)."""
        task = self._task
        if task is None or self._cancelled:
            return True
        self._cancelled = True
        try:
            self._loop.call_soon_threadsafe(task.cancel)
        except RuntimeError:
            return False
        return True

    def _fill(self, ok: bool, value: Any) -> None:
        """On the loop: answer the thread's ask."""
        self._slot = (ok, value)
        if self._filled is not None:
            self._filled.set_result(None)
        else:
            self._ready.release()

    def _ask(self) -> None:
        """On the loop: start the task with the first ask, wake it for the later ones."""
        if self._task is None:
            # The task runs in a copy of the context current here: the generator's.
            self._task = self._context.run(self._loop.create_task, self._drive())
            return
        waiter = self._waiter
        if waiter is None or waiter.done():  # cancelled at its yield: the loop stops
            self._fill(False, _stopping())
        else:
            waiter.set_result(None)

    async def _drive(self) -> None:
        """The task: one item of the generator for each ask; then close it.

        Cancelled while the generator waits at its ``yield`` (the pool
        thread closed the iterator), it closes the generator there; cancelled
        while the generator awaits (the loop stops), the generator gets the
        CancelledError, and the thread that waits for the item an error that
        says the server is stopping.
        """
        agen = self._agen
        loop = self._loop
        try:
            while True:
                try:
                    item = await agen.__anext__()
                except asyncio.CancelledError:  # at its await: the loop stops
                    self._fill(False, _stopping())
                    raise
                except BaseException as exc:  # its end or its error: the thread raises it
                    # (SystemExit and KeyboardInterrupt too: out of a task they would end the loop)
                    self._fill(False, exc)
                    return
                self._fill(True, item)
                del item  # let go of the item's descriptors now
                self._waiter = waiter = loop.create_future()
                await waiter
        finally:
            self._waiter = None
            try:
                await agen.aclose()  # GeneratorExit at its yield: its finally runs
            except BaseException as exc:
                self._done.set_exception(exc)
            else:
                self._done.set_result(None)

    def close(self) -> None:
        """Close the generator on the loop and wait for it; raise what it raised then."""
        task = self._task
        if self._own:
            if task is not None and not task.done():
                task.cancel()
            self._over()
        elif task is not None and not self._done.done():
            if not self._cancel():  # the loop is closed: it closed the generator as it stopped
                return
            _wait(self._done, self._loop)
        if self._done.done():
            self._done.result()  # raises what the generator raised as it was closed

    def _over(self) -> None:
        """The generator is over (or is being closed): a private loop finishes its task and closes."""
        loop = self._loop
        if not self._own or loop.is_closed():
            return
        try:
            task = self._task
            if task is not None and not task.done():
                loop.run_until_complete(asyncio.wait({task}))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()


def _wait(future: concurrent.futures.Future[Any], loop: asyncio.AbstractEventLoop) -> Any:
    """The result of ``future``, set on ``loop``'s thread; raises if the loop closes first."""
    while True:
        try:
            return future.result(LOOK_EVERY)
        except concurrent.futures.TimeoutError:
            if loop.is_closed():
                raise _stopping() from None


def _stopping() -> RuntimeError:
    """What the stream's caller gets when the event loop stops under its generator."""
    return RuntimeError(
        "the server's event loop stopped while the stream's async generator ran, and "
        "cancelled it: the server is stopping; call again once it runs"
    )
