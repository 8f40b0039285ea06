"""Dispatch: one request frame in, its reply frame out; and the conversation that repeats it.

A :class:`Dispatcher` holds a server's handlers and nothing of the OS: it
turns a request into its reply with :meth:`Dispatcher.dispatch` (testable on
bare frames), and :meth:`Dispatcher.converse` runs the request-reply loop of
one authenticated connection over any :class:`Channel` (a worker thread of
the server's loop drives it; tests drive it over ``Channel.pair()``). What a
frame means is :mod:`passrpc._protocol`'s to say; this module runs handlers.
This is the place for a per-handler feature (counting calls, timing them).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from collections.abc import Mapping
from typing import Any

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
    BadRequest,
    Frame,
    describe_handlers,
    describe_reply,
    exception_reply,
    parse_request,
    undecodable,
    unknown_message,
    unsendable,
)
from ._registry import Handler
from ._types import DEFAULT_TYPES, TypeRegistry

logger = logging.getLogger("passrpc")

_peer = threading.local()


def current_peer() -> Peer:
    """Return who sent the request the calling handler is serving.

    Call it from a handler (or a raw handler) to learn the client's pid, uid
    and gid as the kernel reports them, for your own authorization or audit.

    Raises:
        LookupError: called outside a handler's thread.
    """
    try:
        return _peer.value  # type: ignore[no-any-return]
    except AttributeError:
        raise LookupError("current_peer() works only inside a passrpc handler") from None


class RawCall:
    """A request for a raw handler: it converses on the connection itself (see :meth:`run`)."""

    __slots__ = ("args", "entry", "kwargs")

    def __init__(self, entry: Handler, args: list[Any], kwargs: dict[str, Any] | None) -> None:
        self.entry = entry
        self.args = args
        self.kwargs = kwargs

    def run(self, channel: Channel) -> bool:
        """Run the raw handler on ``channel``; False when the conversation is over."""
        try:
            self.entry.fn(channel, *self.args, **(self.kwargs or {}))
        except Exception:
            if channel.closed:
                return False
            # The client may be gone, or the handler may have left a frame half sent.
            with contextlib.suppress(ConnectionClosed, Timeout, EncodeError):
                channel.send_frame(*_report(self.entry.name))
        return not channel.closed


def _report(name: str) -> Frame:
    """The ERROR frame for the exception a handler is raising now; logged at INFO."""
    exc_type, exc, tb = sys.exc_info()
    assert exc_type is not None
    assert exc is not None
    logger.info("handler %r raised %s: %s", name, exc_type.__name__, exc)
    return exception_reply(exc_type, exc, tb)


class Dispatcher:
    """Runs a server's handlers for the requests of any number of connections.

    Args:
        handlers: the registered handlers by name; copied, so a dispatcher
            serves the registry as it was when it was made.
        types: the type registry the server's connections use, for
            DESCRIBE "types".
    """

    def __init__(self, handlers: Mapping[str, Handler], types: TypeRegistry = DEFAULT_TYPES) -> None:
        self.handlers = dict(handlers)
        self.described = describe_handlers(self.handlers.values())
        self.types = types

    def dispatch(self, kind: int, payload: Any) -> Frame | RawCall:
        """Return the reply frame to one request frame, or the :class:`RawCall` it starts.

        A handler's exception becomes an ERROR frame (and is logged); so do
        a malformed request, an unknown handler name and an unknown frame
        kind. Nothing here raises for what a client sends.
        """
        # protocol.parse_request's common case, a MESSAGE, inlined as the
        # reply below is: this runs for every call.
        if kind == MESSAGE and type(payload) is list and payload and type(payload[0]) is str:
            name, args, kwargs = payload[0], payload[1:], None
        else:
            try:
                request = parse_request(kind, payload)
            except BadRequest as exc:
                return exc.frame
            if request is None:
                return describe_reply(payload, self.described, self.types)
            name, args, kwargs = request
        entry = self.handlers.get(name)
        if entry is None:
            return unknown_message(name, self.handlers)
        if entry.raw:
            return RawCall(entry, args, kwargs)
        try:
            result = entry.fn(*args, **kwargs) if kwargs else entry.fn(*args)
        except Exception:
            return _report(name)
        # A tuple is a reply of several values; anything else, of one
        # (protocol.reply, inlined: this runs for every call).
        return MESSAGE, result if type(result) is tuple else (result,)

    def converse(self, channel: Channel, peer: Peer) -> None:
        """Serve one authenticated client's requests on ``channel`` until it leaves.

        Returns when the client closes the connection, stays idle past the
        channel's timeout, breaks the protocol, or a raw handler ends the
        conversation; the caller closes the channel.
        """
        _peer.value = peer
        receive = channel.receive_frame
        send = channel.send_frame
        dispatch = self.dispatch
        try:
            while True:
                try:
                    kind, payload = receive()
                except Timeout:
                    logger.debug("closing a connection idle for %s s", channel.timeout)
                    return
                except DecodeError as exc:  # skipped whole: answer it, read on
                    logger.info("refused a request that cannot be decoded: %s", exc)
                    send(*undecodable(exc))
                    continue
                except ProtocolError as exc:
                    logger.warning("closing a connection that broke the protocol: %s", exc)
                    return
                reply: Any = dispatch(kind, payload)
                if type(reply) is tuple:
                    try:
                        send(*reply)
                    except (EncodeError, FrameTooLarge) as exc:  # nothing was sent
                        send(*unsendable(payload, exc))
                elif not reply.run(channel):
                    return
                # Let go now, not at the next request: received or returned
                # FileDescriptors close as soon as nobody holds them.
                payload = reply = None
        except ConnectionClosed:
            return

