"""Dispatch: one request frame in, its reply frame out; and the conversation that repeats it.

A :class:`Dispatcher` holds a server's handlers and nothing of the OS: it
turns a request into its reply with :meth:`Dispatcher.dispatch` (testable on
bare frames), and :meth:`Dispatcher.serve` runs the request-reply loop of one
authenticated connection over any :class:`Channel` for as long as requests
keep coming (a pool thread of the server's loop drives it; tests drive
:meth:`Dispatcher.converse` over ``Channel.pair()``). What a frame means is
:mod:`passrpc._protocol`'s to say; this module runs handlers.
This is the place for a per-handler feature: it counts every call and times a
sample of them (:mod:`passrpc._stats`), answers STATUS requests with the
figures, and logs each call at DEBUG.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from ._channel import Channel, Peer
from ._errors import (
    ConnectionClosed,
    DecodeError,
    EncodeError,
    FrameTooLarge,
    ProtocolError,
    Timeout,
)
from ._protocol import (
    MESSAGE,
    STATUS,
    BadRequest,
    Frame,
    describe_handlers,
    describe_reply,
    parse_request,
    reply,
    undecodable,
    unknown_message,
    unsendable,
)
from ._registry import Handler
from ._stats import SAMPLE_EVERY, HandlerCounters
from ._streaming import (
    END,
    ITEM,
    STREAM,
    misdirected_item,
    not_a_stream_call,
    not_streamable,
    parse_stream_request,
)
from ._streams import StreamCall, report
from ._types import DEFAULT_TYPES, TypeRegistry
from ._wire import PROTOCOL_VERSION

if TYPE_CHECKING:
    import asyncio

logger = logging.getLogger("passrpc")

_peer = threading.local()
#: The peer of an async handler's call: set in its task's own context, so that
#: what it runs in other threads (asyncio.to_thread) sees it too.
_async_peer: contextvars.ContextVar[Peer] = contextvars.ContextVar("passrpc_peer")
_now = time.perf_counter_ns
#: What a handler may raise and still get an error reply: anything, so that a
#: handler's sys.exit() (or a stray KeyboardInterrupt) cannot end its
#: connection's thread.
_FAILURES = BaseException


def current_peer() -> Peer:
    """Return who sent the request the calling handler is serving.

    Call it from a handler (or a raw handler) to learn the client's pid, uid
    and gid as the kernel reports them, for your own authorization or audit.

    In an ``async def`` handler it works in the handler's task, and in what
    the task runs with ``asyncio.to_thread``.

    Raises:
        LookupError: called outside a handler's thread or task.
    """
    try:
        return _peer.value  # type: ignore[no-any-return]
    except AttributeError:
        pass
    try:
        return _async_peer.get()
    except LookupError:
        raise LookupError("current_peer() works only inside a passrpc handler") from None


class Served:
    """A handler as the dispatcher serves it: the registered handler and its counters."""

    __slots__ = ("calls", "counters", "fn", "is_async", "name", "raw", "special", "stream")

    def __init__(self, handler: Handler, every_call: bool) -> None:
        self.name = handler.name
        self.fn = handler.fn
        self.raw = handler.raw
        self.stream = handler.stream
        self.is_async = handler.is_async
        # Raw, stream or async: not a plain call. The hot path tests this one flag
        # (Dispatcher._special says which).
        self.special = handler.raw or handler.stream or handler.is_async
        self.counters = HandlerCounters(time_every_call=every_call)
        self.calls = self.counters.calls  # next() on it counts a call: the hot path's one step


class RawCall:
    """A request for a raw handler: it converses on the connection itself (see :meth:`run`)."""

    __slots__ = ("args", "entry", "kwargs", "timed")

    def __init__(
        self, entry: Served, args: list[Any], kwargs: dict[str, Any] | None, timed: bool
    ) -> None:
        self.entry = entry
        self.args = args
        self.kwargs = kwargs
        self.timed = timed

    def run(self, channel: Channel) -> bool:
        """Run the raw handler on ``channel``; False when the conversation is over."""
        entry = self.entry
        start = _now()
        try:
            entry.fn(channel, *self.args, **(self.kwargs or {}))
        except _FAILURES:
            next(entry.counters.errors)
            if self.timed:
                _timed(entry, start, "raised")
            if channel.closed:
                return False
            # The client may be gone, or the handler may have left a frame half sent.
            with contextlib.suppress(ConnectionClosed, Timeout, EncodeError):
                channel.send_frame(*report(entry.name))
        else:
            if self.timed:
                _timed(entry, start, "returned")
        return not channel.closed


class AsyncCall:
    """A request for an async handler: awaited on the server's event loop (see :meth:`reply`).

    The pool thread that read the request hands it to the loop and is free;
    the loop awaits :meth:`reply`, and a pool thread sends the reply
    (:meth:`send`).
    """

    __slots__ = ("args", "entry", "frame", "kwargs", "payload", "peer", "timed")

    def __init__(
        self,
        entry: Served,
        args: list[Any],
        kwargs: dict[str, Any] | None,
        timed: bool,
        payload: Any,
    ) -> None:
        self.entry = entry
        self.args = args
        self.kwargs = kwargs
        self.timed = timed
        self.payload = payload  # the request's, for an unsendable reply's error
        self.peer: Peer | None = getattr(_peer, "value", None)  # set by serve() in this thread
        #: The reply, once :meth:`reply` has returned.
        self.frame: Frame | None = None

    async def reply(self) -> Frame:
        """Await the handler and return its reply frame (an ERROR frame if it raised).

        Cancellation is let through (CancelledError is neither an Exception
        nor an exit): a cancelled call has no reply.
        """
        entry = self.entry
        if self.peer is not None:
            _async_peer.set(self.peer)  # in this task's own context
        start = _now()
        try:
            result = await (
                entry.fn(*self.args, **self.kwargs) if self.kwargs else entry.fn(*self.args)
            )
        except (Exception, KeyboardInterrupt, SystemExit):
            next(entry.counters.errors)
            if self.timed:
                _timed(entry, start, "raised")
            self.frame = frame = report(entry.name)
            return frame
        if self.timed:
            _timed(entry, start, "returned")
        self.frame = frame = reply(result)
        return frame

    def send(self, channel: Channel) -> None:
        """Send the reply on ``channel`` (an error reply if it cannot be sent); raises as send_frame."""
        assert self.frame is not None
        try:
            channel.send_frame(*self.frame)
        except (EncodeError, FrameTooLarge) as exc:  # nothing was sent
            channel.send_frame(*unsendable(self.payload, exc))
        self.frame = None  # let go of the result now

    def run(self, channel: Channel) -> bool:
        """Await the handler in a fresh event loop in this thread, and send its reply.

        For a conversation that has a thread to itself (:meth:`Dispatcher.converse`);
        the server's loop awaits it on its event loop instead.
        """
        import asyncio  # only where an async handler runs without the server's loop

        asyncio.run(self.reply())
        try:
            self.send(channel)
        except (ConnectionClosed, Timeout):
            return False
        return not channel.closed


def _timed(entry: Served, start: int, outcome: str) -> None:
    """Record the duration of a sampled call that began at ``start``; log it at DEBUG."""
    ns = _now() - start
    entry.counters.record(ns)
    if logger.isEnabledFor(logging.DEBUG):
        peer = getattr(_peer, "value", None) or _async_peer.get(None)
        logger.debug(
            "call %r from pid %s %s in %.3f ms",
            entry.name,
            peer.pid if peer is not None else "?",
            outcome,
            ns / 1e6,
        )


class Dispatcher:
    """Runs a server's handlers for the requests of any number of connections, and counts them.

    Every call is counted, and one in ``SAMPLE_EVERY`` timed; while the
    passrpc logger logs at DEBUG when the dispatcher is made, every call is
    timed and logged.

    Args:
        handlers: the registered handlers by name; copied, so a dispatcher
            serves the registry as it was when it was made.
        types: the type registry the server's connections use, for
            DESCRIBE "types".
    """

    def __init__(
        self, handlers: Mapping[str, Handler], types: TypeRegistry = DEFAULT_TYPES
    ) -> None:
        every_call = logger.isEnabledFor(logging.DEBUG)
        self.handlers = {name: Served(handler, every_call) for name, handler in handlers.items()}
        # The handlers a plain request runs, and returns from, in dispatch's
        # fast path: looked up by the request's first value with no checks.
        self._plain = {name: e for name, e in self.handlers.items() if not e.special}
        self.described = describe_handlers(handlers.values())
        self.types = types
        #: The server's event loop, which awaits the async handlers' stream
        #: items (its loop sets it); None: each such stream runs a loop of its own.
        self.event_loop: asyncio.AbstractEventLoop | None = None
        self.started = time.monotonic()
        # Connection counts; the lock guards them, never a call.
        self._lock = threading.Lock()
        self._open = 0
        self._served = 0

    def status(self) -> dict[str, Any]:
        """The payload that answers STATUS: the process, its connections, each handler's figures."""
        with self._lock:
            connections = {"open": self._open, "served": self._served}
        return {
            "pid": os.getpid(),
            "uptime": time.monotonic() - self.started,
            "protocol": PROTOCOL_VERSION,
            "connections": connections,
            "handlers": {name: e.counters.summary() for name, e in self.handlers.items()},
        }

    def dispatch(self, kind: int, payload: Any) -> Frame | RawCall | StreamCall | AsyncCall | None:
        """Return the reply frame to one request frame, or the :class:`RawCall`,
        :class:`StreamCall` or :class:`AsyncCall` it starts; None for a frame that
        gets no answer (a stream's MORE or cancel that crossed its end).

        A handler's exception becomes an ERROR frame (and is logged); so do
        a malformed request, an unknown handler name and an unknown frame
        kind. Nothing here raises for what a client sends.
        """
        # The common request, [name, *args] of a plain handler, straight to
        # the handler: a name that is no key of _plain (not a str, unhashable,
        # missing, or a raw, stream or async handler's) and the empty request take the checked
        # path below, which says what is wrong. This runs for every call.
        if kind == MESSAGE and type(payload) is list:
            try:
                entry = self._plain[payload[0]]
            except (LookupError, TypeError):
                pass
            else:
                # next() counts the call; a multiple of SAMPLE_EVERY picks it for timing.
                if not next(entry.calls) % SAMPLE_EVERY:
                    return self._timed_call(entry, payload[1:], None)
                try:
                    result = entry.fn(*payload[1:])
                except _FAILURES:
                    next(entry.counters.errors)
                    return report(entry.name)
                # A tuple is a reply of several values; anything else, of one
                # (protocol.reply, inlined).
                return MESSAGE, result if type(result) is tuple else (result,)
        if STREAM <= kind <= END:
            return self._stream_frame(kind, payload)
        try:
            request = parse_request(kind, payload)
        except BadRequest as exc:
            return exc.frame
        if request is None:
            if kind == STATUS:
                return STATUS, self.status()
            return describe_reply(payload, self.described, self.types)
        name, args, kwargs = request
        served = self.handlers.get(name)
        if served is None:
            return unknown_message(name, self.handlers)
        entry = served
        # next() counts the call; a multiple of SAMPLE_EVERY picks it for timing.
        if entry.special:
            return self._special(entry, args, kwargs, payload)
        if not next(entry.calls) % SAMPLE_EVERY:
            return self._timed_call(entry, args, kwargs)
        try:
            result = entry.fn(*args, **kwargs) if kwargs else entry.fn(*args)
        except _FAILURES:
            next(entry.counters.errors)
            return report(name)
        return reply(result)

    def _special(
        self, entry: Served, args: list[Any], kwargs: dict[str, Any] | None, payload: Any
    ) -> Frame | RawCall | AsyncCall:
        """:meth:`dispatch` of a plain request for a raw or async handler, or for a
        stream handler (refused: it needs a STREAM request)."""
        if entry.raw:
            return RawCall(entry, args, kwargs, not next(entry.calls) % SAMPLE_EVERY)
        if entry.stream:
            return not_a_stream_call(entry.name)
        return AsyncCall(entry, args, kwargs, not next(entry.calls) % SAMPLE_EVERY, payload)

    def _stream_frame(self, kind: int, payload: Any) -> Frame | StreamCall | None:
        """:meth:`dispatch` of a stream's frame: a STREAM request starts a :class:`StreamCall`.

        A plain handler (``async def`` too) streams its one result as one item;
        a raw one is refused. An ``async def`` handler's items are awaited on
        :attr:`event_loop`, in a context of their own that holds the peer.
        MORE and END outside a stream are late (they crossed its end): ignored.
        """
        if kind != STREAM:
            if kind != ITEM:
                return None
            return misdirected_item()
        try:
            name, args, kwargs, window = parse_stream_request(payload)
        except BadRequest as exc:
            return exc.frame
        entry = self.handlers.get(name)
        if entry is None:
            return unknown_message(name, self.handlers)
        if entry.raw:
            return not_streamable(name)
        timed = not next(entry.calls) % SAMPLE_EVERY
        if not entry.is_async:
            return StreamCall(entry, args, kwargs, window, timed)
        context = contextvars.copy_context()
        peer = getattr(_peer, "value", None)  # set by serve() in this thread
        if peer is not None:
            context.run(_async_peer.set, peer)
        return StreamCall(entry, args, kwargs, window, timed, context, self.event_loop)

    def _timed_call(self, entry: Served, args: list[Any], kwargs: dict[str, Any] | None) -> Frame:
        """:meth:`dispatch`'s call, timed: for the sampled calls."""
        start = _now()
        try:
            result = entry.fn(*args, **kwargs) if kwargs else entry.fn(*args)
        except _FAILURES:
            next(entry.counters.errors)
            _timed(entry, start, "raised")
            return report(entry.name)
        _timed(entry, start, "returned")
        return reply(result)

    def opened(self) -> None:
        """Count a connection that authenticated (STATUS reports open and served connections)."""
        with self._lock:
            self._open += 1
            self._served += 1

    def closed(self) -> None:
        """Count an authenticated connection that closed."""
        with self._lock:
            self._open -= 1

    def converse(self, channel: Channel, peer: Peer) -> None:
        """Serve one authenticated client's requests on ``channel`` until it leaves, in this thread.

        For a conversation that has a thread to itself (tests drive one over
        ``Channel.pair()``); the server's loop parks idle connections and
        calls :meth:`serve` instead. Returns when the client closes the
        connection, stays idle past the channel's timeout, breaks the
        protocol, or a raw handler ends the conversation; the caller closes
        the channel.
        """
        self.opened()
        try:
            while (outcome := self.serve(channel, peer, ())) is not False:
                if outcome is not True and not outcome.run(channel):
                    return
        finally:
            self.closed()

    def serve(
        self,
        channel: Channel,
        peer: Peer,
        hurry: object,
        wait_more: Callable[[float], bool] | None = None,
    ) -> bool | RawCall | StreamCall | AsyncCall:
        """Serve the requests that come on ``channel`` while they keep coming, in order; then say what next.

        Each read waits for the next request as the socket does (the
        server's loop sets a short receive timeout on it), unless ``hurry``
        is true (the loop's queue of connections that wait for a thread):
        then it takes only what has arrived. A wait that ends without a
        request is tried again while ``hurry`` stays false and
        ``wait_more(seconds idle)`` says so (never without it). Keeping the
        thread while requests keep coming spares a busy client's round trip
        any hand-off, also when the machine's scheduler delays the client
        for a few milliseconds.

        Returns:
            True when no whole request came: park the connection. False when
            the connection is over: the client left, broke the protocol, or
            stayed idle past the channel's timeout (the caller closes the
            channel). A :class:`RawCall` for a raw handler's request, or a
            :class:`StreamCall` for a stream: run it (its ``run``), then
            serve again.
        """
        # The server's side of every call: kept flat on purpose (a helper
        # call per request costs more than the 2 % a feature may).
        _peer.value = peer
        receive = channel.receive_waiting
        send = channel.send_frame
        dispatch = self.dispatch
        idle_since = 0.0  # when the first of the empty waits in a row ended; 0: none yet
        try:
            while True:
                try:
                    frame = receive(hurry)
                except Timeout:
                    logger.debug("closing a connection idle for %s s", channel.timeout)
                    return False
                except DecodeError as exc:  # skipped whole: answer it, read on
                    logger.info("refused a request that cannot be decoded: %s", exc)
                    send(*undecodable(exc))
                    continue
                except ProtocolError as exc:
                    logger.warning("closing a connection that broke the protocol: %s", exc)
                    return False
                if frame is None:
                    if hurry or wait_more is None:
                        return True
                    now = time.monotonic()
                    idle_since = idle_since or now
                    if not wait_more(now - idle_since):
                        return True
                    continue
                kind, payload = frame
                idle_since = 0.0
                reply: Any = dispatch(kind, payload)
                if type(reply) is tuple:
                    try:
                        send(*reply)
                    except (EncodeError, FrameTooLarge) as exc:  # nothing was sent
                        send(*unsendable(payload, exc))
                elif reply is not None:
                    # A raw handler keeps this thread while it converses, and a
                    # stream while it is open; an async handler's connection
                    # holds no thread until it replies.
                    return reply  # type: ignore[no-any-return]
                # Let go now, not at the next request: received or returned
                # FileDescriptors close as soon as nobody holds them.
                frame = payload = reply = None
        except ConnectionClosed:
            return False
