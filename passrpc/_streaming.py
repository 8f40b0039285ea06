"""Streams: the pure rules of a generator handler's reply, for the server and both clients.

A stream is a request (STREAM) answered by any number of ITEM frames and
one end: END (the generator finished), or an ERROR frame (it raised, or the
client cancelled). The client grants credit: the window it asks for, then
MORE frames as it consumes; the server never has more items out than the
credit allows. A client cancels with an END frame of its own and then
discards what is still in flight until the stream's end. ``docs/protocol.md``
section 9 ("A stream") describes the same rules for other languages.

Pure, like :mod:`passrpc._protocol`: frames in, decisions out. The server's
driver is :mod:`passrpc._streams`; the clients' readers are in
:mod:`passrpc._client` and :mod:`passrpc.aio`, both around :class:`StreamReader`.
"""

from __future__ import annotations

from typing import Any

from ._errors import ConnectionClosed, ProtocolError
from ._protocol import (
    ERROR,
    ERROR_BAD_REQUEST,
    ERROR_CANCELLED,
    ERROR_REMOTE,
    BadRequest,
    Frame,
    OutOfStep,
    error_from_payload,
    error_payload,
)
from ._types import DEFAULT_TYPES, TypeRegistry
from ._wire import Kind, brief

STREAM = int(Kind.STREAM)
ITEM = int(Kind.ITEM)
MORE = int(Kind.MORE)
END = int(Kind.END)

#: The most items a server sends ahead of its consumer: a STREAM request's
#: window, and the credit a client has granted and the server not used, are
#: both cut to this. It bounds what a stream holds in the socket's buffers,
#: whatever the client asks for.
MAX_WINDOW = 1024
#: The window the proxies ask for. They grant more when the consumer has
#: taken half of it, so a fast consumer never waits for the server and a
#: stalled one has at most this many items waiting for it. 256: in W6
#: (benchmarks/run.py), 128 gave about 7 % fewer items/s, 512 and 1024 only
#: about 3 % more.
DEFAULT_WINDOW = 256

#: What a client sends to cancel its stream, and what a server sends when a
#: generator finished.
END_FRAME: Frame = (END, None)


class ClientGone(ConnectionClosed):
    """A server's stream ends: its connection was shut while an item was awaited.

    Raised by a stream's items (an async generator's), never by the
    generator: the stream's driver ends the connection, and sends no error.
    """


def stream_request(name: str, args: tuple[Any, ...], kwargs: dict[str, Any], window: int) -> Frame:
    """The frame that opens a stream of handler ``name``, granting ``window`` items of credit."""
    return STREAM, (name, args, kwargs, window)


def _bad(message: str) -> BadRequest:
    return BadRequest((ERROR, error_payload(ERROR_BAD_REQUEST, "ProtocolError", message)))


def parse_stream_request(payload: Any) -> tuple[str, list[Any], dict[str, Any], int]:
    """Return ``(name, args, kwargs, window)`` of a STREAM request; the window cut to MAX_WINDOW.

    Raises:
        BadRequest: a malformed request; its ``frame`` answers it (the
            connection stays in step).
    """
    if (
        type(payload) is list
        and len(payload) == 4
        and type(payload[0]) is str
        and type(payload[1]) is list
        and type(payload[2]) is dict
        and all(type(k) is str for k in payload[2])
        and type(payload[3]) is int
        and payload[3] > 0
    ):
        return payload[0], payload[1], payload[2], min(payload[3], MAX_WINDOW)
    raise _bad(
        "a STREAM request is [name, [args...], {kwargs...}, window] with a str name and a "
        f"positive int window; got {brief(payload)}"
    )


def not_a_stream_call(name: str) -> Frame:
    """The ERROR frame that answers a plain call (MESSAGE or CALL) of a stream handler."""
    return ERROR, error_payload(
        ERROR_BAD_REQUEST,
        "ProtocolError",
        f"handler {name!r} streams its results (it is a generator): open it with a STREAM "
        "request, as passrpc 0.2's proxies do (docs/protocol.md section 9); this client "
        "is older or sent a plain call",
    )


def not_streamable(name: str) -> Frame:
    """The ERROR frame that answers a STREAM request for a raw handler."""
    return ERROR, error_payload(
        ERROR_BAD_REQUEST,
        "ProtocolError",
        f"handler {name!r} is raw: it converses on its connection and cannot be streamed; "
        "send it a plain request",
    )


def misdirected_item() -> Frame:
    """The ERROR frame that answers an ITEM frame a client sent (items go the other way)."""
    return ERROR, error_payload(
        ERROR_BAD_REQUEST,
        "ProtocolError",
        "an ITEM frame goes from a server to its client, never to a server",
    )


def cancelled(name: str) -> Frame:
    """The ERROR frame that ends a stream the client cancelled."""
    return ERROR, error_payload(
        ERROR_CANCELLED,
        "Cancelled",
        f"the client cancelled the stream of {name!r}; its generator was closed",
    )


def unsendable_item(name: str, exc: Exception) -> Frame:
    """The ERROR frame that ends a stream whose generator yielded a value that cannot travel."""
    return ERROR, error_payload(
        ERROR_REMOTE,
        "EncodeError",
        f"handler {name!r} yielded a value that cannot be sent: {exc}; the stream ends here",
    )


def item(value: Any) -> Frame:
    """The ITEM frame of a yielded value: a tuple is an item of several values."""
    return ITEM, value if type(value) is tuple else (value,)


def credit(available: int, payload: Any) -> int:
    """The server's credit once a MORE frame of ``payload`` came: cut to MAX_WINDOW.

    Raises:
        ProtocolError: the payload is not a positive int (close the connection).
    """
    if type(payload) is not int or payload <= 0:
        raise ProtocolError(f"a MORE frame's payload is a positive int, got {brief(payload)}")
    return min(available + payload, MAX_WINDOW)


class StreamReader:
    """A client's side of one stream: what each frame means, and when to grant credit.

    Feed it every frame the stream's connection receives (:meth:`receive`),
    tell it each item the consumer takes (:meth:`taken`), and it says what
    to send. After :meth:`cancel` the caller reads on until :attr:`done`,
    dropping items: then the connection is in step for the next call.
    """

    __slots__ = ("cancelled", "done", "name", "types", "unacked", "window")

    def __init__(self, name: str, window: int, types: TypeRegistry = DEFAULT_TYPES) -> None:
        self.name = name
        self.window = window
        self.types = types
        self.unacked = 0  # items taken since the last grant
        self.done = False  # the stream's end frame came
        self.cancelled = False

    def receive(self, kind: int, payload: Any) -> list[Any] | None:
        """The values of an ITEM frame; None at the stream's end.

        Raises:
            RemoteError and the like: the stream ended with an ERROR frame (the
                generator raised); the connection is in step. After a cancel,
                an ERROR frame ends the stream quietly instead.
            OutOfStep: a frame that does not belong to a stream; close the
                connection (the stream is not :attr:`done`: it is broken).
        """
        if kind == ITEM and type(payload) is list:
            return payload
        if kind == END and payload is None:
            self.done = True
            return None
        if kind == ERROR:
            self.done = True
            if self.cancelled:  # "cancelled", or the generator's error that crossed the cancel
                return None
            raise error_from_payload(payload, self.types)
        raise OutOfStep(
            f"expected an item of the stream of {self.name!r}, the server sent a frame of "
            f"kind {kind!r}"
        )

    def taken(self) -> int:
        """Count an item the consumer took; the credit to grant now (0: none yet)."""
        self.unacked = unacked = self.unacked + 1
        if unacked * 2 >= self.window:
            self.unacked = 0
            return unacked
        return 0

    def cancel(self) -> bool:
        """Mark the stream cancelled; whether an END frame (:data:`END_FRAME`) must be sent."""
        if self.done or self.cancelled:
            return False
        self.cancelled = True
        return True


def value_of(values: list[Any]) -> Any:
    """An item's value as the consumer sees it: the single value, or a tuple of several."""
    return values[0] if len(values) == 1 else tuple(values)
