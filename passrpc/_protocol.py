"""What a frame means: requests, replies, errors and introspection, decided in one place.

Pure, like the codec under it (:mod:`passrpc._wire`): payloads in, payloads
or decisions out, never a socket, a thread or an event loop
(``tests/test_layers.py`` keeps it so). The server's dispatch, the sync
client and the asyncio client all ask this module what a frame means, so a
rule (what a request looks like, when a reply leaves a connection out of
step) cannot drift between them. ``docs/protocol.md`` describes the same
rules for implementers in other languages.
"""

from __future__ import annotations

import inspect
import traceback
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any, Literal, Protocol

import attrs

from ._errors import (
    AuthenticationError,
    DecodeError,
    ProtocolError,
    ServerBusy,
    UnknownMessage,
)
from ._types import DEFAULT_TYPES, TypeRegistry, error_name, nearest_builtin
from ._wire import Kind, brief, describe_value

MESSAGE = int(Kind.MESSAGE)
ERROR = int(Kind.ERROR)
HANDSHAKE = int(Kind.HANDSHAKE)
CALL = int(Kind.CALL)
DESCRIBE = int(Kind.DESCRIBE)
STATUS = int(Kind.STATUS)

#: A frame as the layers above the codec pass it around: ``(kind, payload)``.
Frame = tuple[int, Any]

# Error codes ----------------------------------------------------------------

#: Codes of ERROR frames. A receiver that meets a code it does not know raises
#: RemoteError with the frame's type and message, so new codes stay version 1.
ERROR_REMOTE = "remote"  # a handler raised
ERROR_UNKNOWN_MESSAGE = "unknown_message"  # no handler of that name
ERROR_BAD_REQUEST = "bad_request"  # a request the server could not take
ERROR_AUTHENTICATION = "authentication"  # the handshake failed
ERROR_UNKNOWN_KIND = "unknown_kind"  # a frame kind this side does not implement
ERROR_UNDECODABLE = "undecodable"  # a request holding a value the server cannot rebuild
ERROR_BUSY = "busy"  # the server is at its connection limit (sent instead of its challenge)
#: Reserved for the features that come next, so that their meaning is fixed
#: before any peer sends them: a stream ended early by either side
#: ("cancelled"), a status request this server does not answer ("unavailable").
ERROR_CANCELLED = "cancelled"
ERROR_UNAVAILABLE = "unavailable"


#: Longest ``type`` and ``message`` (characters) an ERROR frame carries, and
#: longest ``traceback``: whatever a handler raised, its error reply stays
#: small enough to send (docs/protocol.md section 7).
MAX_ERROR_TEXT = 4096
MAX_TRACEBACK_TEXT = 65536


def _bounded(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    keep = limit - len(f" [... {len(text)} characters cut]")  # the marker, at its longest
    return f"{text[:keep]} [... {len(text) - keep} characters cut]"


def error_payload(
    code: str, remote_type: str, message: str, traceback: str = "", builtin: str | None = None
) -> dict[str, str]:
    """Build the payload of an ERROR frame; long texts are cut to the documented bounds.

    ``builtin`` is the optional key of remote errors: the nearest builtin
    ancestor of the exception's class.
    """
    payload = {
        "code": code,
        "type": _bounded(remote_type, MAX_ERROR_TEXT),
        "message": _bounded(message, MAX_ERROR_TEXT),
        "traceback": _bounded(traceback, MAX_TRACEBACK_TEXT),
    }
    if builtin is not None:
        payload["builtin"] = builtin
    return payload


def error_from_payload(payload: Any, types: TypeRegistry = DEFAULT_TYPES) -> Exception:
    """Turn an ERROR frame's payload into the exception the receiver raises.

    A handler's error is typed by ``types``: by a registered exception class
    of its name, else by its nearest builtin class (see
    :meth:`TypeRegistry.remote_error`).
    """
    if not isinstance(payload, dict):
        return ProtocolError(f"the peer sent a malformed error frame: {describe_value(payload)}")
    code = payload.get("code")
    remote_type = str(payload.get("type", "Exception"))
    message = str(payload.get("message", ""))
    if code == ERROR_UNKNOWN_MESSAGE:
        return UnknownMessage(message)
    if code == ERROR_AUTHENTICATION:
        return AuthenticationError(message)
    if code == ERROR_BUSY:
        return ServerBusy(message)
    if code in (ERROR_BAD_REQUEST, ERROR_UNKNOWN_KIND):
        return ProtocolError(f"the server refused the request: {message}")
    if code == ERROR_UNDECODABLE:
        return DecodeError(f"the server could not decode the request: {message}")
    builtin = payload.get("builtin") if code == ERROR_REMOTE else None
    return types.remote_error(remote_type, builtin, message, str(payload.get("traceback", "")))


class OutOfStep(ProtocolError):
    """A frame that is no answer to what was asked: the connection cannot carry another call.

    Raised by :func:`reply_result`; the client that gets it closes the
    connection, so that a late reply can never answer a later call. Users
    see it as the :class:`ProtocolError` it is.
    """


class BadRequest(Exception):
    """A request the server cannot take; ``frame`` is the ERROR frame that answers it.

    Raised by :func:`parse_request`. The connection stays in step: the
    server answers and reads the next request.
    """

    def __init__(self, frame: Frame) -> None:
        super().__init__(frame[1]["message"])
        self.frame = frame


# Requests -------------------------------------------------------------------


def request(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Frame:
    """Return the frame that calls handler ``name``.

    CALL carries keyword arguments; without them the plainer MESSAGE does.
    """
    if kwargs:
        return CALL, (name, args, kwargs)
    return MESSAGE, (name, *args)


def parse_request(kind: int, payload: Any) -> tuple[str, list[Any], dict[str, Any] | None] | None:
    """Return ``(name, args, kwargs)`` of a call; None for a control request (DESCRIBE,
    answered by :func:`describe_reply`, or STATUS).

    ``kwargs`` is None for a MESSAGE request (it has none). A STATUS
    request's payload is ignored.

    Raises:
        BadRequest: not a request; its ``frame`` is the ERROR frame to answer with.
    """
    if kind == MESSAGE:
        if type(payload) is list and payload and type(payload[0]) is str:
            return payload[0], payload[1:], None
    elif kind == CALL:
        if (
            type(payload) is list
            and len(payload) == 3
            and type(payload[0]) is str
            and type(payload[1]) is list
            and type(payload[2]) is dict
            and all(type(k) is str for k in payload[2])
        ):
            return payload[0], payload[1], payload[2]
    elif kind in (DESCRIBE, STATUS):
        return None
    elif kind not in (ERROR, HANDSHAKE):
        raise BadRequest(
            (
                ERROR,
                error_payload(
                    ERROR_UNKNOWN_KIND,
                    "ProtocolError",
                    f"this server does not implement frame kind {kind!r} (protocol version 1 "
                    "reserves it); the connection stays usable",
                ),
            )
        )
    raise BadRequest(
        (
            ERROR,
            error_payload(
                ERROR_BAD_REQUEST,
                "ProtocolError",
                "a request is a message whose first value is the handler name (a str); "
                f"got a frame of kind {kind!r} with {brief(payload)}",
            ),
        )
    )


def unknown_message(name: str, names: Iterable[str]) -> Frame:
    """The ERROR frame that answers a request for a handler the server does not have."""
    return ERROR, error_payload(
        ERROR_UNKNOWN_MESSAGE,
        "UnknownMessage",
        f"the server has no handler for {brief(name)}; it has: {sorted(names)}",
    )


def reply(result: Any) -> Frame:
    """The reply frame to a handler's return value: a tuple is a reply of several values."""
    return MESSAGE, result if type(result) is tuple else (result,)


def exception_reply(exc_type: Any, exc: BaseException, tb: TracebackType | None) -> Frame:
    """The ERROR frame that reports a handler's exception, with its traceback text and
    the name of its nearest builtin class (so the caller's ``except ValueError`` works)."""
    text = "".join(traceback.format_exception(exc_type, exc, tb))
    try:
        message = str(exc)
    except Exception as failure:  # its __str__ raised: the reply must still go out
        message = f"<the exception's message could not be made: {type(failure).__name__}>"
    return ERROR, error_payload(
        ERROR_REMOTE, error_name(exc_type), message, text, nearest_builtin(exc_type)
    )


def undecodable(exc: DecodeError) -> Frame:
    """The ERROR frame that answers a request the server could not decode (it was skipped)."""
    return ERROR, error_payload(ERROR_UNDECODABLE, "DecodeError", str(exc))


def unsendable(request_payload: Any, exc: Exception) -> Frame:
    """The ERROR frame to send when the reply to ``request_payload`` could not be encoded."""
    name = request_payload[0] if type(request_payload) is list and request_payload else "?"
    return ERROR, error_payload(
        ERROR_REMOTE, "EncodeError", f"handler {name!r} returned a value that cannot be sent: {exc}"
    )


def busy(limit: int) -> Frame:
    """The ERROR frame a server at its connection limit sends to a connection it refuses."""
    return ERROR, error_payload(
        ERROR_BUSY,
        "ServerBusy",
        f"the server holds {limit} connections, its limit (max_connections): this one was "
        "refused; try again later",
    )


# Replies --------------------------------------------------------------------


def reply_result(kind: int, payload: Any, types: TypeRegistry = DEFAULT_TYPES) -> Any:
    """Return a call's result from its reply frame: the single value, or a tuple of several.

    ``types`` types a handler's error (:func:`error_from_payload`).

    Raises:
        RemoteError, UnknownMessage, ProtocolError: the server answered with an
            ERROR frame; the connection is still in step.
        OutOfStep: the frame is not a reply; close the connection.
    """
    if kind == MESSAGE and type(payload) is list:
        return payload[0] if len(payload) == 1 else tuple(payload)
    if kind == ERROR:
        raise error_from_payload(payload, types)
    raise OutOfStep(f"expected a reply, the server sent a frame of kind {kind!r}")


def message_values(kind: int, payload: Any, types: TypeRegistry = DEFAULT_TYPES) -> tuple[Any, ...]:
    """Return the values of a MESSAGE frame read from a raw conversation.

    Raises:
        RemoteError and the like: the peer sent an ERROR frame (still in step).
        OutOfStep: any other frame; close the connection.
    """
    if kind == MESSAGE and type(payload) is list:
        return tuple(payload)
    if kind == ERROR:
        raise error_from_payload(payload, types)
    raise OutOfStep(f"expected a message, the peer sent a frame of kind {kind!r}")


# Introspection --------------------------------------------------------------


class HandlerEntry(Protocol):
    """What :func:`describe_handlers` needs of a registered handler."""

    @property
    def name(self) -> str: ...
    @property
    def fn(self) -> Callable[..., Any]: ...
    @property
    def raw(self) -> bool: ...
    @property
    def is_async(self) -> bool: ...
    @property
    def stream(self) -> bool: ...


#: How a client calls a described handler: "call" (a request, one reply),
#: "raw" (the first message of a conversation on a connection of its own) or
#: "stream" (a STREAM request, answered by items: see passrpc._streaming).
Route = Literal["call", "raw", "stream"]


#: The payload of a DESCRIBE request that asks for the registered types
#: instead of the handlers; the answer maps each code to ``module.QualName``.
#: An older server ignores the payload and answers with its handlers.
DESCRIBE_TYPES = "types"


def describe_reply(payload: Any, described: list[dict[str, Any]], types: TypeRegistry) -> Frame:
    """The answer to a DESCRIBE request: the handlers, or with payload "types" the types."""
    if type(payload) is str and payload == DESCRIBE_TYPES:
        return DESCRIBE, types.names()
    return DESCRIBE, described


def describe_handlers(entries: Iterable[HandlerEntry]) -> list[dict[str, Any]]:
    """The payload that answers DESCRIBE: every handler's name, parameters and docstring."""
    return [_describe_one(entry) for entry in entries]


def _describe_one(entry: HandlerEntry) -> dict[str, Any]:
    params: list[dict[str, Any]] = []
    text = "(...)"
    try:
        # eval_str: show `first: str`, not the string "'str'" that postponed
        # annotations (from __future__ import annotations) leave behind.
        signature = inspect.signature(entry.fn, eval_str=True)
    except Exception:
        try:
            signature = inspect.signature(entry.fn)
        except (TypeError, ValueError):
            signature = None
    if signature is not None:
        parameters = list(signature.parameters.values())
        if entry.raw and parameters:
            parameters = parameters[1:]  # the channel is not the caller's to pass
        for p in parameters:
            item: dict[str, Any] = {"name": p.name, "kind": int(p.kind)}
            if p.default is not p.empty:
                item["default"] = repr(p.default)
            params.append(item)
        text = str(signature.replace(parameters=parameters, return_annotation=signature.empty))
    described = {
        "name": entry.name,
        "params": params,
        "signature": text,
        "doc": inspect.getdoc(entry.fn) or "",
        "raw": entry.raw,
    }
    if entry.is_async:  # absent otherwise: older clients ignore a key they do not know
        described["async"] = True
    if entry.stream:  # only then: an older client ignores the key it does not know
        described["stream"] = True
    return described


def parse_described(kind: int, payload: Any, types: TypeRegistry = DEFAULT_TYPES) -> list[Any]:
    """Return the handler descriptions from the server's answer to a DESCRIBE request.

    Raises:
        Error: the server answered with an ERROR frame: the error it sent.
        ProtocolError: any other answer that is not a list of descriptions.
    """
    if kind == ERROR:
        raise error_from_payload(payload, types)
    if kind != DESCRIBE or not isinstance(payload, list):
        raise ProtocolError(f"the server answered introspection with a frame of kind {kind!r}")
    return payload


def described_by_name(described: Iterable[Any]) -> dict[str, dict[str, Any]]:
    """Index handler descriptions by name.

    Raises:
        ProtocolError: an entry is not a handler description.
    """
    by_name: dict[str, dict[str, Any]] = {}
    for info in described:
        if not isinstance(info, dict) or not isinstance(info.get("name"), str):
            raise ProtocolError(
                f"the server described a handler as {brief(info)}, which is not a handler "
                "description: run the same passrpc version on both sides"
            )
        by_name[info["name"]] = info
    return by_name


@attrs.frozen
class HandlerStatistics:
    """What a server counted for one handler since it started (see :class:`ServerStatus`).

    ``calls`` counts every call, failed ones included; ``errors`` those that
    raised. ``mean`` and ``p99`` are durations in seconds, measured on
    ``timed`` of the calls (one in 17, or every one while the server logs at
    DEBUG; ``p99``: 99 % of them took at most this long, from a histogram
    accurate to within 3.2 %); both are 0.0 before the first timed call. A
    raw handler's duration is its whole conversation.
    """

    calls: int
    errors: int
    mean: float
    p99: float
    timed: int


@attrs.frozen
class ServerStatus:
    """A running server's answer to a status request (:func:`passrpc.server_status`).

    ``pid`` and ``uptime`` (seconds) are the server process's;
    ``protocol_version`` the protocol it speaks; ``connections_open`` the
    authenticated connections it serves now, ``connections_served`` all it
    has served since it started (both count the status request's own);
    ``handlers`` maps each handler's name to its :class:`HandlerStatistics`.
    """

    pid: int
    uptime: float
    protocol_version: int
    connections_open: int
    connections_served: int
    handlers: dict[str, HandlerStatistics]


def parse_status(kind: int, payload: Any) -> ServerStatus:
    """Return the :class:`ServerStatus` a server sent in answer to a STATUS request.

    Raises:
        Error: the server answered with an ERROR frame (an older server
            answers ``unknown_kind``: it has no status to give).
        ProtocolError: any other answer.
    """
    if kind == ERROR:
        raise error_from_payload(payload)
    try:
        if kind != STATUS:
            raise TypeError(f"a frame of kind {kind!r}")
        connections = payload["connections"]
        return ServerStatus(
            pid=int(payload["pid"]),
            uptime=float(payload["uptime"]),
            protocol_version=int(payload["protocol"]),
            connections_open=int(connections["open"]),
            connections_served=int(connections["served"]),
            handlers={
                str(name): HandlerStatistics(
                    int(s["calls"]),
                    int(s["errors"]),
                    float(s["mean"]),
                    float(s["p99"]),
                    int(s["timed"]),
                )
                for name, s in payload["handlers"].items()
            },
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ProtocolError(
            f"the server answered a status request with {brief(payload)} ({exc}): run the "
            "same passrpc version on both sides"
        ) from None


def route(info: dict[str, Any] | None) -> Route:
    """How a client calls the handler described by ``info`` (None: one it does not know)."""
    if info is None:
        return "call"
    if info.get("raw"):
        return "raw"
    return "stream" if info.get("stream") else "call"
