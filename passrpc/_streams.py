"""The server's side of a stream: a generator's items sent as the client's credit allows.

:meth:`Dispatcher.dispatch <passrpc._dispatch.Dispatcher.dispatch>` answers a
STREAM request with a :class:`StreamCall`; the pool thread that serves the
connection runs it (:meth:`StreamCall.run`) and keeps the connection for as
long as the stream is open, as it does for a raw handler. What the frames
mean is :mod:`passrpc._streaming`'s to say; this module drives a generator
with them. An ``async def`` generator is driven here too, by the same pool
thread: only its items come from the server's event loop
(:mod:`passrpc._asyncitems`).
"""

from __future__ import annotations

import contextvars
import logging
import sys
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

from ._channel import Channel
from ._errors import (
    ConnectionClosed,
    DecodeError,
    EncodeError,
    FrameTooLarge,
    ProtocolError,
    Timeout,
)
from ._protocol import Frame, exception_reply
from ._stats import HandlerCounters
from ._streaming import (
    END,
    END_FRAME,
    ITEM,
    MORE,
    ClientGone,
    cancelled,
    credit,
    unsendable_item,
)

if TYPE_CHECKING:
    import asyncio

logger = logging.getLogger("passrpc")

_now = time.perf_counter_ns
#: Nanoseconds between two looks, without waiting, for a cancel while items
#: go out: a generator that takes its time between items still notices a
#: cancel (or a client gone) at its next yield, and a fast one pays for a
#: look only every half window.
LOOK_EVERY_NS = 1_000_000


class Streamed(Protocol):
    """What a :class:`StreamCall` needs of the handler it runs (a dispatcher's ``Served``)."""

    name: str
    fn: Callable[..., Any]
    stream: bool
    counters: HandlerCounters


def report(name: str, what: str = "handler") -> Frame:
    """The ERROR frame for the exception a handler (or a stream: ``what``) is raising now;
    logged at INFO. Shared with :mod:`passrpc._dispatch`, which imports this module."""
    exc_type, exc, tb = sys.exc_info()
    assert exc_type is not None
    assert exc is not None
    frame = exception_reply(exc_type, exc, tb)
    # The reply's message, not str(exc): that may raise, and did once already.
    logger.info("%s %r raised %s: %s", what, name, exc_type.__name__, frame[1]["message"])
    return frame


def _one(fn: Callable[..., Any], args: list[Any], kwargs: dict[str, Any]) -> Iterator[Any]:
    """A plain handler asked for a stream: its one result is the stream's one item."""
    yield fn(*args, **kwargs)


def _raise(exc: BaseException) -> Iterator[Any]:
    raise exc
    yield  # a generator, so that the exception ends the stream as the generator's would


class _Cancelled(Exception):
    """The client sent END: cancel the stream."""


class StreamCall:
    """A STREAM request: a generator handler's items, sent while the client grants credit.

    Counted as one call of its handler (an error if the generator raised),
    timed as a sample of calls is, from the request to the stream's end.
    An ``async def`` handler's call has a ``context`` (its peer set in it):
    its items are awaited on ``loop``, the server's event loop (None: a
    private one, see :mod:`passrpc._asyncitems`).
    """

    __slots__ = ("args", "context", "entry", "kwargs", "loop", "timed", "window")

    def __init__(
        self,
        entry: Streamed,
        args: list[Any],
        kwargs: dict[str, Any],
        window: int,
        timed: bool,
        context: contextvars.Context | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.entry = entry
        self.args = args
        self.kwargs = kwargs
        self.window = window
        self.timed = timed
        self.context = context
        self.loop = loop

    def run(self, channel: Channel) -> bool:
        """Send the stream on ``channel``; False when the connection is over.

        The channel's reads must block as the socket does (the server sets
        ``SO_RCVTIMEO`` to its ``client_idle_timeout`` meanwhile): a wait for
        credit that ends without any is a client gone idle, and ends the
        connection. A frame other than MORE or END from the client while the
        stream is open breaks the protocol: the connection is closed.
        """
        entry = self.entry
        start = _now()
        items: Iterator[Any] | None = None
        try:
            try:
                items = self._items(channel)
                outcome = self._send_items(channel, items)
            except _Cancelled:
                outcome = "cancelled"
                _close(entry.name, items)
                channel.send_frame(*cancelled(entry.name))
        except (ConnectionClosed, Timeout, ProtocolError, DecodeError) as exc:
            _close(entry.name, items)
            if isinstance(exc, ProtocolError):
                logger.warning("closing a connection that broke a stream's protocol: %s", exc)
            else:
                logger.info("stream %r ended: the client is gone (%s)", entry.name, exc)
            return False
        finally:
            _close(entry.name, items)  # an async generator's task, a private loop: let go
            if self.timed:
                self._timed(start)
        logger.debug("stream %r %s", entry.name, outcome)
        return not channel.closed

    def _items(self, channel: Channel) -> Iterator[Any]:
        """The generator of the request; a generator that raises at once for bad arguments."""
        entry = self.entry
        if self.context is not None:
            return self._async_items(channel)
        if not entry.stream:
            return _one(entry.fn, self.args, self.kwargs)
        try:
            return entry.fn(*self.args, **self.kwargs)  # type: ignore[no-any-return]
        except BaseException as exc:  # wrong arguments: raised when its first item is asked for
            return _raise(exc)

    def _async_items(self, channel: Channel) -> Iterator[Any]:
        """:meth:`_items` of an ``async def`` handler: its items, awaited on the event loop."""
        from ._asyncitems import AsyncItems, one_item  # asyncio is loaded only when wanted

        entry = self.entry
        assert self.context is not None
        try:
            if entry.stream:
                agen = entry.fn(*self.args, **self.kwargs)
            else:  # a plain async def: its one result is the one item
                agen = one_item(entry.fn, self.args, self.kwargs)
        except BaseException as exc:  # wrong arguments, as for a generator
            return _raise(exc)
        return AsyncItems(agen, self.loop, self.context, channel.fileno())

    def _send_items(self, channel: Channel, items: Iterator[Any]) -> str:
        """Send every item, then the end; how it ended. Raises _Cancelled on the client's END.

        The generator is asked for an item before the credit for it is
        there, so that its end is sent without waiting for credit it does
        not need: it runs one item ahead of the credit, held here.
        """
        # The loop of every item: kept flat, its names local.
        entry = self.entry
        send = channel.send_frame
        now = _now
        look_every = LOOK_EVERY_NS
        kind = ITEM
        available = self.window
        every = max(self.window // 2, 1)
        countdown = every  # items until the next look for a cancel
        looked = now()
        ours = False  # whether an exception comes from sending (else from the generator)
        try:
            for value in items:
                ours = True
                if not available:  # the item waits here (the one the server holds) for credit
                    available = _listen(channel, 0)
                    countdown = every
                    looked = now()
                try:
                    send(kind, value if type(value) is tuple else (value,))
                except (EncodeError, FrameTooLarge) as exc:  # nothing was sent
                    next(entry.counters.errors)
                    _close(entry.name, items)
                    send(*unsendable_item(entry.name, exc))
                    return "raised"
                value = None  # let go of the item's descriptors now
                available -= 1
                countdown -= 1
                if available and (not countdown or now() - looked >= look_every):
                    available = _listen(channel, available)
                    countdown = every
                    looked = now()
                ours = False
        except (
            BaseException
        ) as exc:  # anything the generator raises, as for a call: the thread serves on
            if ours or type(exc) is ClientGone:
                raise
            next(entry.counters.errors)
            send(*report(entry.name, "stream"))
            return "raised"
        send(*END_FRAME)
        return "returned"

    def _timed(self, start: int) -> None:
        ns = _now() - start
        self.entry.counters.record(ns)
        logger.debug("stream %r took %.3f ms", self.entry.name, ns / 1e6)


def _listen(channel: Channel, available: int) -> int:
    """Take the client's MORE and END frames: the credit then. Waits only while there is none
    (``available`` 0), and then until some comes.

    Raises:
        _Cancelled: the client sent END.
        Timeout: no credit came within the idle timeout.
        ProtocolError: any other frame.
    """
    while True:
        frame = channel.receive_waiting(available)  # hurry (no wait) while credit lasts
        if frame is None:
            if available:
                return available
            # SO_RCVTIMEO (the idle timeout) ran out with no frame.
            raise Timeout("the client granted no credit within the server's client_idle_timeout")
        kind, payload = frame
        if kind == MORE:
            available = credit(available, payload)
        elif kind == END:
            raise _Cancelled
        else:
            raise ProtocolError(
                f"the client sent a frame of kind {kind!r} while a stream was open: only MORE "
                "and END may come then (docs/protocol.md section 9, 'A stream')"
            )


def _close(name: str, items: Iterator[Any] | None) -> None:
    """Stop a generator (GeneratorExit at its yield: its ``finally`` runs); log what it raises."""
    close = getattr(items, "close", None)
    if close is None:
        return
    try:
        close()
    except BaseException as exc:
        logger.info("stream %r raised %s as it was closed: %s", name, type(exc).__name__, exc)
