"""The clients' streams: :class:`Stream` and :class:`AsyncStream`, what a stream handler's method returns.

An open stream owns a connection of its proxy: the thread's, taken out of its
slot while the stream is open (a call meanwhile opens another), given back
when the stream ends. An async stream holds a slot of its proxy's pool
instead. The rules of the frames are
:class:`passrpc._streaming.StreamReader`'s; this module does the I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from types import TracebackType
from typing import Any, Protocol

from ._aiochannel import AsyncChannel, Expired
from ._channel import Channel
from ._errors import DecodeError, Timeout
from ._streaming import END_FRAME, MORE, StreamReader, value_of

#: Seconds :meth:`Stream.close` waits for the server to confirm a cancel
#: (at most the proxy's timeout): a generator busy in its own code stops
#: only at its next yield. Past it the connection is closed instead of
#: kept, which stops the generator just as well.
CANCEL_GRACE = 1.0


class Link:
    """An open stream's connection and state; what a dropped :class:`Stream` leaves to its proxy.

    ``give_back(connection)`` hands the connection back to the proxy once
    the stream is over and in step; ``connection.close()`` discards it.
    """

    __slots__ = ("channel", "connection", "give_back", "reader", "timeout")

    def __init__(
        self,
        connection: Any,
        reader: StreamReader,
        give_back: Callable[[Any], None],
        timeout: float | None,
    ) -> None:
        self.connection = connection  # passrpc._client's per-thread connection object
        self.channel: Channel = connection.channel
        self.reader = reader
        self.give_back = give_back
        self.timeout = timeout  # the proxy's, restored after a bounded read

    def next(self) -> Any:
        """The next item's value; StopIteration at the end; the generator's error after its items."""
        reader = self.reader
        if reader.done:
            raise StopIteration
        channel = self.channel
        try:
            values = reader.receive(*channel.receive_frame())
            if values is None:
                self._over()
                raise StopIteration
            grant = reader.taken()
            if grant:
                channel.send_frame(MORE, grant)
        except StopIteration:
            raise
        except DecodeError:
            # An item that could not be rebuilt was skipped whole: it counts
            # as taken, and the stream goes on.
            grant = reader.taken()
            if grant:
                self._grant(grant)
            raise
        except Exception:
            if reader.done:
                self._over()  # the generator raised: the connection is in step
            else:
                self._discard()
            raise
        except BaseException:
            self._discard()  # interrupted mid-read: the connection is out of step
            raise
        return value_of(values)

    def cancel(self) -> None:
        """Cancel the stream, drop what is still in flight; the connection goes back when in step.

        Waits up to :data:`CANCEL_GRACE` for the stream's end, then closes
        the connection instead. Never raises for the connection's failures.
        """
        reader = self.reader
        if reader.done:
            return
        channel = self.channel
        bound = CANCEL_GRACE if self.timeout is None else min(self.timeout, CANCEL_GRACE)
        try:
            if reader.cancel():
                channel.send_frame(*END_FRAME)
            deadline = time.monotonic() + bound
            while not reader.done:
                reader.receive(*channel.receive_frame(deadline))
        except Exception:
            self._discard()
            return
        except BaseException:
            self._discard()
            raise
        channel.timeout = self.timeout
        self._over()

    def _grant(self, grant: int) -> None:
        try:
            self.channel.send_frame(MORE, grant)
        except BaseException:
            self._discard()
            raise

    def _over(self) -> None:
        self.reader.done = True
        self.give_back(self.connection)

    def _discard(self) -> None:
        self.reader.done = True
        self.connection.close()


class Stream(Iterator[Any]):
    """The items a stream handler yields, as they come: ``for n in proxy.numbers(5): ...``.

    A proxy's method of a generator handler returns one; the request is
    already sent, so the server works ahead of you, at most the stream's
    window of items (128 by default). Each item is the yielded value, or a
    tuple if it yielded a tuple; descriptors arrive as
    :class:`FileDescriptor`. A generator's exception is raised by
    ``next()`` after the items it yielded first, as the :class:`RemoteError`
    a call would raise. ``close()`` (or leaving a ``with`` block) cancels
    the stream: the server's generator stops at its next yield, and the
    connection serves the proxy's next call. A stream dropped unfinished
    (``break`` out of a ``for`` loop, then no reference left) is cancelled
    on the same thread's next call on its proxy, or when the proxy closes:
    no I/O happens in a finalizer. Not for several threads at once.
    """

    __slots__ = ("_link", "_owner", "name")

    def __init__(self, name: str, link: Link, owner: Any) -> None:
        #: The handler's name.
        self.name = name
        self._link = link
        self._owner = owner  # the proxy, told of a stream dropped unfinished

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> Any:
        return self._link.next()

    @property
    def done(self) -> bool:
        """Whether the stream is over: ended, failed, cancelled or closed."""
        return self._link.reader.done

    def close(self) -> None:
        """Cancel the stream unless it is over; idempotent. Its generator is stopped."""
        self._link.cancel()

    def __enter__(self) -> Stream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        link = self._link
        if not link.reader.done:
            self._owner._dropped_stream(link)

    def __repr__(self) -> str:
        state = "done" if self._link.reader.done else "open"
        return f"<passrpc.Stream {self.name!r} {state}>"


class StreamPool(Protocol):
    """What an :class:`AsyncStream` needs of its proxy's pool: giving its slot back."""

    def release(self, channel: AsyncChannel | None) -> None: ...
    def discard(self, channel: AsyncChannel) -> None: ...


#: Opens an async stream: sends its request on a pooled connection whose slot
#: it takes, within the deadline; returns that connection.
Opener = Callable[[float | None], Awaitable[AsyncChannel]]


class AsyncStream(AsyncIterator[Any]):
    """The items a stream handler yields, on an asyncio proxy: ``async for n in proxy.numbers(5)``.

    A stream handler's method on :class:`passrpc.aio.AsyncProxy` returns one
    at once (no ``await``); the request goes out at the first ``__anext__``
    on a pooled connection, which the stream holds until its end. The rules
    are :class:`passrpc.Stream`'s: a generator's error comes after its items,
    ``await stream.aclose()`` (or leaving ``async with``) cancels it and keeps
    the connection; the proxy's timeout bounds the wait for each item. A
    task cancelled while it waits for an item, and a stream dropped
    unfinished, close the connection instead: the server stops the
    generator at its next yield.
    """

    __slots__ = ("_channel", "_keep", "_open", "_pool", "_reader", "_timeout", "name")

    def __init__(
        self,
        name: str,
        opener: Opener,
        pool: StreamPool,
        reader: StreamReader,
        timeout: float | None,
        keep: object,
    ) -> None:
        #: The handler's name.
        self.name = name
        self._open: Opener | None = opener
        self._pool = pool
        self._reader = reader
        self._timeout = timeout
        self._channel: AsyncChannel | None = None
        self._keep = keep  # the arguments, whose descriptors must stay open until sent

    def __aiter__(self) -> AsyncStream:
        return self

    @property
    def done(self) -> bool:
        """Whether the stream is over: ended, failed, cancelled or closed."""
        return self._reader.done

    def _deadline(self, seconds: float | None) -> float | None:
        return None if seconds is None else asyncio.get_running_loop().time() + seconds

    async def __anext__(self) -> Any:
        reader = self._reader
        if reader.done:
            raise StopAsyncIteration
        deadline = self._deadline(self._timeout)
        try:
            channel = self._channel
            if channel is None:
                assert self._open is not None
                channel = self._channel = await self._open(deadline)
                self._open = self._keep = None
            values = reader.receive(*await channel.receive_frame(deadline))
            if values is None:
                self._over()
                raise StopAsyncIteration
            grant = reader.taken()
            if grant:
                await channel.send_frame(MORE, grant, deadline)
        except StopAsyncIteration:
            raise
        except DecodeError:
            grant = reader.taken()  # skipped whole: it counts as taken
            if grant:
                await self._grant(grant, deadline)
            raise
        except Expired:
            self._discard()
            raise Timeout(
                f"the next item of the stream of {self.name!r} did not come within the timeout "
                f"of {self._timeout} s; its connection was closed"
            ) from None
        except Exception:
            if reader.done:
                self._over()  # the generator raised: the connection is in step
            else:
                self._discard()
            raise
        except BaseException:
            self._discard()  # cancelled mid-read: closing it stops the generator
            raise
        return value_of(values)

    async def _grant(self, grant: int, deadline: float | None) -> None:
        try:
            assert self._channel is not None
            await self._channel.send_frame(MORE, grant, deadline)
        except BaseException:
            self._discard()
            raise

    async def aclose(self) -> None:
        """Cancel the stream unless it is over; idempotent. Its generator is stopped."""
        reader = self._reader
        channel = self._channel
        if reader.done:
            return
        if channel is None:  # never started: nothing was sent
            reader.done = True
            self._open = self._keep = None
            return
        bound = CANCEL_GRACE if self._timeout is None else min(self._timeout, CANCEL_GRACE)
        deadline = self._deadline(bound)
        try:
            if reader.cancel():
                await channel.send_frame(*END_FRAME, deadline)
            while not reader.done:
                reader.receive(*await channel.receive_frame(deadline))
        except Exception:
            self._discard()
            return
        except BaseException:
            self._discard()
            raise
        self._over()

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _over(self) -> None:
        self._reader.done = True
        channel, self._channel = self._channel, None
        self._pool.release(channel)

    def _discard(self) -> None:
        self._reader.done = True
        channel, self._channel = self._channel, None
        if channel is not None:
            self._pool.discard(channel)
            self._pool.release(None)

    def __del__(self) -> None:
        if self._channel is not None and not self._reader.done:
            with contextlib.suppress(Exception):  # the loop may be gone
                self._discard()

    def __repr__(self) -> str:
        state = "done" if self._reader.done else "open"
        return f"<passrpc.aio.AsyncStream {self.name!r} {state}>"
