"""The asyncio client's streams: :class:`AsyncStream`, what a stream handler's method returns.

An open stream holds a slot of its proxy's pool, and the connection in it,
until its end. The rules of the frames are
:class:`passrpc._streaming.StreamReader`'s, as for the blocking
:class:`passrpc.Stream` (:mod:`passrpc._clientstream`); this module does the
asyncio I/O. Imported by :mod:`passrpc.aio` only, so that ``import passrpc``
does not load asyncio.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import Any, Protocol

from ._aiochannel import AsyncChannel, Expired
from ._clientstream import CANCEL_GRACE
from ._errors import DecodeError, Timeout
from ._streaming import END_FRAME, MORE, StreamReader, value_of


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
