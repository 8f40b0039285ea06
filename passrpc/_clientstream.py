"""The blocking client's streams: :class:`Stream`, what a stream handler's method returns.

An open stream owns a connection of its proxy: the thread's, taken out of its
slot while the stream is open (a call meanwhile opens another), given back
when the stream ends. The rules of the frames are
:class:`passrpc._streaming.StreamReader`'s; this module does the blocking
I/O (:mod:`passrpc._aiostream`, the asyncio client's).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any, NoReturn

from ._channel import Channel
from ._clientcore import generation
from ._errors import ConnectionClosed, DecodeError
from ._streaming import END_FRAME, ITEM, MORE, StreamReader, value_of

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

    __slots__ = ("born", "channel", "connection", "give_back", "reader", "timeout")

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
        # The process's generation when the stream opened: in a forked child
        # the stream is the parent's, and the child must neither read its
        # items nor cancel it (see forked).
        self.born = generation[0]

    def forked(self) -> NoReturn:
        """Raise in a forked child, whose copy of the parent's stream is closed (the parent's stays)."""
        self.reader.done = True
        self.connection.close()  # the child's copy only: its generation is the parent's
        raise ConnectionClosed(
            f"the stream of {self.reader.name!r} was opened by the parent process before a "
            "fork, and its items go to the parent; open the stream again in the child"
        )

    def failed(self, exc: BaseException) -> NoReturn:
        """Raise ``exc``, which reading the stream's next frame raised, the stream left as it must be."""
        if isinstance(exc, DecodeError):
            # An item that could not be rebuilt was skipped whole: it counts
            # as taken, and the stream goes on.
            grant = self.reader.taken()
            if grant:
                self.grant(grant)
        else:
            self._discard()  # the connection broke, timed out, or was interrupted mid-read
        raise exc

    def other(self, kind: int, payload: Any) -> Any:
        """The value of a frame that is no plain item: the end (StopIteration), an error, or broken."""
        reader = self.reader
        try:
            values = reader.receive(kind, payload)
        except Exception:
            if reader.done:
                self._over()  # the generator raised: the connection is in step
            else:
                self._discard()
            raise
        if values is None:
            self._over()
            raise StopIteration
        grant = reader.taken()
        if grant:
            self.grant(grant)
        return value_of(values)

    def grant(self, items: int) -> None:
        """Grant credit for ``items`` more items (the consumer took them)."""
        self.reader.unacked = 0
        try:
            self.channel.send_frame(MORE, items)
        except BaseException:
            self._discard()
            raise

    def cancel(self) -> None:
        """Cancel the stream, drop what is still in flight; the connection goes back when in step.

        Waits up to :data:`CANCEL_GRACE` for the stream's end, then closes
        the connection instead. Never raises for the connection's failures.
        """
        reader = self.reader
        if reader.done:
            return
        if self.born != generation[0]:  # a forked child: the stream is the parent's to cancel
            reader.done = True
            self.connection.close()
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
    window of items (256 by default). Each item is the yielded value, or a
    tuple if it yielded a tuple; descriptors arrive as
    :class:`FileDescriptor`. A generator's exception is raised by
    ``next()`` after the items it yielded first, as the :class:`RemoteError`
    a call would raise. ``close()`` (or leaving a ``with`` block) cancels
    the stream: the server's generator stops at its next yield, and the
    connection serves the proxy's next call. A stream dropped unfinished
    (``break`` out of a ``for`` loop, then no reference left) is cancelled
    on the same thread's next call on its proxy, or when the proxy closes:
    no I/O happens in a finalizer. Not for several threads at once; a
    forked child cannot read a stream its parent opened (``next()`` raises
    :class:`ConnectionClosed`: open it again in the child).
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
        link = self._link
        reader = link.reader
        if reader.done:
            raise StopIteration
        if link.born != generation[0]:
            link.forked()
        try:
            kind, payload = link.channel.receive_frame()
        except BaseException as exc:
            link.failed(exc)
        # StreamReader.receive's and taken's common case, inlined: this runs for every item.
        if kind == ITEM and type(payload) is list:
            unacked = reader.unacked + 1
            if unacked * 2 >= reader.window:
                link.grant(unacked)
            else:
                reader.unacked = unacked
            return payload[0] if len(payload) == 1 else tuple(payload)
        return link.other(kind, payload)

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
