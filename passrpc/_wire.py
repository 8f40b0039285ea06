"""The wire codec: frames of msgpack, with file descriptors beside them.

This module is pure (sans-IO, in the manner of h11): bytes and descriptor
objects go in, frames come out, and back. It never touches a socket, a thread
or the OS; ``tests/test_layers.py`` keeps it that way. ``docs/protocol.md``
describes every byte.

The decoder is :mod:`passrpc._decoder`; what a frame *means* (requests,
replies, errors, introspection) is :mod:`passrpc._protocol`.

A frame is a 4-byte big-endian unsigned length and a msgpack body. The body is
always an array of three items, ``[kind, nfds, payload]``:

* ``kind`` says what the frame is (:class:`Kind`). User messages and control
  frames (errors, the handshake, introspection) differ here, never by
  anything a user can put in a message.
* ``nfds`` is how many descriptors were sent with this frame. On a stream
  socket one read can return the bytes of several frames and the descriptors
  of a later one; counting them per frame is what ties each descriptor to its
  message.
* ``payload`` depends on the kind; for a message it is the array of values.

Inside a payload, the msgpack extension type :data:`FD_EXT_CODE` whose data
is an unsigned big-endian index stands in for "descriptor number i of this
frame".
"""

from __future__ import annotations

import datetime
import enum
import reprlib
import struct
from typing import Any

import attrs
import msgpack

from ._errors import EncodeError, FrameTooLarge
from ._types import DEFAULT_TYPES, MAX_TYPE_NESTING, RegisteredType, TypeRegistry, timestamp

#: Bumped whenever a frame or the handshake changes incompatibly.
PROTOCOL_VERSION = 1

#: Extension type code of the descriptor placeholder. Registered types take
#: codes 2 to 127 (passrpc._types); other codes pass through as msgpack.ExtType.
FD_EXT_CODE = 1

_HEADER = struct.Struct(">I")
HEADER_SIZE = _HEADER.size
_pack_header = _HEADER.pack

#: 64 MiB: large enough for any message that should not be a file descriptor
#: instead, small enough that a hostile length prefix cannot exhaust memory.
DEFAULT_MAX_FRAME_SIZE = 64 * 1024 * 1024

#: Descriptors per frame. Linux refuses more than 253 in one message
#: (SCM_MAX_FD); 64 keeps the ancillary buffer of every read small.
DEFAULT_MAX_FDS = 64
SCM_MAX_FD = 253


class Kind(enum.IntEnum):
    """What a frame is; the first item of every frame body."""

    #: A user's message: the payload is the array of its values. A request's
    #: first value is the handler name; a reply holds the returned values.
    MESSAGE = 0
    #: An error reported by the peer: a map (see :func:`error_payload`).
    ERROR = 1
    #: A step of the authentication handshake: a map.
    HANDSHAKE = 2
    #: A call with keyword arguments: ``[name, [args...], {kwargs...}]``.
    CALL = 3
    #: Introspection: the request's payload is nil, the reply's an array of
    #: handler descriptions.
    DESCRIBE = 4
    #: Opens a stream (client to server): ``[name, [args...], {kwargs...}, window]``.
    STREAM = 5
    #: One item of a stream (server to client): the array of its values.
    ITEM = 6
    #: Credit for more items of a stream (client to server): a positive int.
    MORE = 7
    #: The end of a stream: nil. From the server, it ended; from the client, cancel it.
    END = 8
    #: The server's counters: the request's payload is nil, the reply's a map
    #: (see passrpc._stats.ServerStatus).
    STATUS = 9


#: Frame kinds set aside for coming features of protocol version 1 (none
#: now: 5 to 8 became the stream's). A peer that does not implement a kind
#: answers it as any unknown kind (an ERROR frame of code "unknown_kind"),
#: never by breaking the connection.
RESERVED_KINDS = range(5, 5)
#: The largest kind a frame may have: one msgpack byte (a positive fixint).
#: A larger or a negative kind is not passrpc, and breaks the connection.
MAX_KIND = 0x7F
#: What an encoder hands out to send: bytes, or a view of a caller's buffer.
Buffer = bytes | bytearray | memoryview

#: A descriptor number is a C int: SCM_RIGHTS carries nothing larger.
_MAX_FD = 0x7FFFFFFF
_NO_FDS: list[int] = []  # shared, never mutated: most frames carry no descriptors
_BINARY = frozenset({bytes, bytearray, memoryview})
_ARRAY3 = b"\x93"
#: sendmsg takes at most IOV_MAX (1024 on Linux) buffers; a frame stays well below.
_MAX_BUFFERS = 512

#: A bytes-like value at least this large, among a message's top-level values,
#: is sent as a buffer of its own instead of being copied into the body (and
#: out of msgpack's buffer again): at 64 KiB the copies start to cost more
#: than the extra pieces do.
_OUT_OF_LINE = 64 * 1024
_MESSAGE = int(Kind.MESSAGE)


@attrs.frozen
class Limits:
    """Bounds on what a peer may send; each refused with :class:`FrameTooLarge` or
    :class:`ProtocolError` before it costs memory.

    ``max_frame_size`` bounds a frame body in bytes and ``max_fds`` the
    descriptors of one frame. The ``max_*_len`` fields are msgpack's own
    unpacker limits (elements of one str, bin, array, map or ext); ``None``
    derives them from the frame's size, which is already safe. Both ends
    should agree: a message over the receiver's limit closes the connection.
    """

    max_frame_size: int = attrs.field(default=DEFAULT_MAX_FRAME_SIZE)
    max_fds: int = attrs.field(default=DEFAULT_MAX_FDS)
    max_str_len: int | None = None
    max_bin_len: int | None = None
    max_array_len: int | None = None
    max_map_len: int | None = None
    max_ext_len: int | None = None

    @max_frame_size.validator
    def _check_frame_size(self, _: object, value: int) -> None:
        if not 1 <= value <= 0xFFFFFFFF:
            raise ValueError(f"max_frame_size must be from 1 to 4 GiB - 1, got {value!r}")

    @max_fds.validator
    def _check_fds(self, _: object, value: int) -> None:
        if not 0 <= value <= SCM_MAX_FD:
            raise ValueError(
                f"max_fds must be from 0 to {SCM_MAX_FD} (Linux's SCM_MAX_FD), got {value!r}"
            )


DEFAULT_LIMITS = Limits()


@attrs.frozen
class WireOptions:
    """Everything that decides how values travel on a connection, as one value.

    Threaded from the public entry points (``Server``, ``connect``, the
    proxies, the channels) down to every :class:`Encoder` and
    :class:`~passrpc._decoder.Decoder`, so that a new option is a field here,
    not a new parameter at every layer: the :class:`Limits`, and the
    :class:`~passrpc._types.TypeRegistry` that says which classes travel as
    which extension code.
    """

    limits: Limits = DEFAULT_LIMITS
    types: TypeRegistry = DEFAULT_TYPES


DEFAULT_WIRE = WireOptions()


def wire_options(limits: Limits, types: TypeRegistry | None) -> WireOptions:
    """The options of a public entry point's ``limits=`` and ``types=`` (None: the default registry)."""
    return WireOptions(limits, DEFAULT_TYPES if types is None else types)


# Placeholders for the first descriptors of a frame, made once.
_FD_PLACEHOLDERS = [msgpack.ExtType(FD_EXT_CODE, bytes([i])) for i in range(SCM_MAX_FD + 1)]


def _unencodable(obj: object) -> EncodeError:
    """Why msgpack's ``default`` hook got ``obj``, which is not registered and has no ``fileno()``."""
    if isinstance(obj, int):  # msgpack hands over the ints it cannot hold
        return EncodeError(
            f"the integer {brief(obj)} is outside msgpack's range (-2**63 to 2**64-1): "
            "send it as a str, or as bytes"
        )
    if isinstance(obj, datetime.datetime):  # aware ones were packed, or are handled before
        return EncodeError(
            f"cannot send the naive datetime {obj.isoformat()!r}: attach a timezone first "
            "(value.replace(tzinfo=datetime.timezone.utc) if it is UTC, value.astimezone() "
            "if it is local time); it arrives as a datetime in UTC"
        )
    cls = type(obj)
    return EncodeError(
        f"cannot send a value of type {cls.__module__}.{cls.__qualname__} ({brief(obj)}): "
        "register its class with passrpc.register_type(cls, code) on both sides, or convert "
        "it first; messages hold None, bool, int, float, str, bytes, list, tuple, dict, "
        "timezone-aware datetimes, objects with fileno() and registered types"
    )


def _body_head(kind: int, nfds: int) -> bytes:
    """The bytes msgpack packs ``[kind, nfds, payload]`` with before the payload's own.

    An array of three, then the two ints: one byte each below 128 (always
    for the kind, and for descriptor counts but the largest).
    """
    if 0 <= kind <= MAX_KIND and 0 <= nfds <= MAX_KIND:
        return bytes((0x93, kind, nfds))
    return b"".join((_ARRAY3, msgpack.packb(kind), msgpack.packb(nfds)))


#: The body's head of a frame without descriptors, by kind (see _body_head).
_PLAIN_HEADS = {kind: _body_head(kind, 0) for kind in range(MAX_KIND + 1)}
#: A frame's length header and its body's head in one call.
_pack_start = struct.Struct(">I3s").pack
#: Whether no value of an iterable of types is a bytes-like type.
_no_binary = _BINARY.isdisjoint


def _wide_placeholder(index: int) -> msgpack.ExtType:
    # Only a frame over any limit gets this far; it is refused after packing.
    return msgpack.ExtType(FD_EXT_CODE, index.to_bytes(4, "big"))


class Encoder:
    """Turns messages into frame bytes plus the descriptors to send with them.

    Not thread-safe: give each connection its own encoder, and let one
    thread at a time use it.
    """

    def __init__(self, wire: WireOptions = DEFAULT_WIRE) -> None:
        self._limits = limits = wire.limits
        self._max_frame = limits.max_frame_size
        self._fds: list[int] = []
        # The registry's own dict: a class registered later travels at once.
        self._registered = wire.types.by_class
        # Packers for registered values, one per nesting level, made on first
        # need (a packer is busy until its value is packed, and a value may
        # hold another); _depth is the level being packed.
        self._packers: list[Any] = []
        self._depth = 0
        # A small first buffer: msgpack grows it as needed, and a fresh
        # connection should not pay for 256 KiB it may never use. datetime=True
        # packs timezone-aware datetimes as msgpack's Timestamp, in C.
        self._pack = msgpack.Packer(
            default=self._default, use_bin_type=True, datetime=True, buf_size=4096
        ).pack

    def _default(self, obj: object) -> msgpack.ExtType | msgpack.Timestamp:
        # msgpack asks only about what it cannot pack itself: registered
        # classes, descriptors, datetime subclasses, and what cannot travel.
        entry = self._registered.get(type(obj))
        if entry is not None:
            return self._extension(entry, obj)
        try:
            fileno = obj.fileno  # type: ignore[attr-defined]
        except AttributeError:
            if isinstance(obj, datetime.datetime) and obj.utcoffset() is not None:
                return timestamp(obj)  # a subclass: msgpack packs only datetime itself
            raise _unencodable(obj) from None
        if fileno is None:  # as some classes say "no fileno here"
            raise _unencodable(obj)
        fd = fileno()
        if not isinstance(fd, int) or not 0 <= fd <= _MAX_FD:
            raise EncodeError(
                f"{brief(obj)}.fileno() returned {brief(fd)}, not a descriptor number"
            )
        fds = self._fds
        fds.append(fd)
        index = len(fds) - 1
        return _FD_PLACEHOLDERS[index] if index <= SCM_MAX_FD else _wide_placeholder(index)

    def _extension(self, entry: RegisteredType, obj: object) -> msgpack.ExtType:
        """A registered value: its ``encode``'s value, packed, as extension ``entry.code``.

        Packed with this encoder's hook, so registered values, datetimes and
        descriptors inside it travel too (placeholders count among the frame's).
        """
        depth = self._depth
        if depth >= MAX_TYPE_NESTING:
            raise EncodeError(
                f"registered values nest more than {MAX_TYPE_NESTING} deep (is a value "
                "inside itself?); the receiver would refuse it"
            )
        try:
            value = entry.encode(obj)
        except Exception as exc:
            raise EncodeError(
                f"encoding a {entry.name} (extension type {entry.code}) failed: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        if depth == len(self._packers):
            packer = msgpack.Packer(
                default=self._default, use_bin_type=True, datetime=True, buf_size=1024
            )
            self._packers.append(packer.pack)
        self._depth = depth + 1
        try:
            data = self._packers[depth](value)
        except (OverflowError, ValueError) as exc:
            raise EncodeError(
                f"encoding a {entry.name} (extension type {entry.code}) failed: {exc}"
            ) from exc
        finally:
            self._depth = depth
        return msgpack.ExtType(entry.code, data)

    def encode(self, kind: int, payload: Any) -> tuple[tuple[Buffer, ...], list[int]]:
        """Encode one frame.

        Args:
            kind: a :class:`Kind`.
            payload: the frame's payload; objects with ``fileno()`` anywhere
                in it become descriptors of the frame.

        Returns:
            ``(buffers, fds)``: send the buffers in order, and the descriptor
            numbers with their first byte. Usually one buffer holds the whole
            frame; a message with a large bytes-like value among its top-level
            values gets that value as a buffer of its own, never copied (keep
            it unchanged until it is sent). The descriptors stay owned by the
            objects they came from.

        Raises:
            EncodeError: a value cannot travel as msgpack; nothing is sent.
            FrameTooLarge: the body or the descriptor count is over the limit.
        """
        if kind == _MESSAGE and not _no_binary(map(type, payload)):
            for value in payload:
                if type(value) in _BINARY and len(value) >= _OUT_OF_LINE:
                    return self._encode_out_of_line(payload)
        try:
            # Only the payload goes through msgpack: the body's head, [kind,
            # nfds, ...], is three known bytes (packing them costs a tuple and
            # two ints every frame).
            body = self._pack(payload)
        except BaseException as exc:
            error = self._failed(exc)
            if error is None:
                raise
            raise error from exc
        if self._fds:
            return self._with_fds(kind, body)
        size = len(body) + 3
        if size > self._max_frame:
            raise self._too_large(size)
        try:
            return (_pack_start(size, _PLAIN_HEADS[kind]) + body,), _NO_FDS
        except KeyError:  # a kind beyond one msgpack byte: none of passrpc's
            return self._framed(_body_head(kind, 0), body), _NO_FDS

    def _failed(self, exc: BaseException) -> EncodeError | None:
        """Forget the failed frame's descriptors; msgpack's refusals become EncodeError."""
        self._fds = []
        self._depth = 0
        if isinstance(exc, (OverflowError, ValueError, BufferError)) and not isinstance(
            exc, EncodeError
        ):
            return EncodeError(f"cannot encode the message: {exc}")
        return None

    def _with_fds(self, kind: int, body: bytes) -> tuple[tuple[Buffer, ...], list[int]]:
        """Frame a packed payload whose hook met descriptors: their count goes in the head."""
        fds, self._fds = self._fds, []
        nfds = len(fds)
        if nfds > self._limits.max_fds:
            self._check_fd_count(fds)  # raises
        if nfds > MAX_KIND or kind not in _PLAIN_HEADS:
            return self._framed(_body_head(kind, nfds), body), fds
        # The usual head, [kind, nfds, ...] in three bytes, without a call.
        size = len(body) + 3
        if size > self._max_frame:
            raise self._too_large(size)
        return (_pack_start(size, bytes((0x93, kind, nfds))) + body,), fds

    def _check_fd_count(self, fds: list[int]) -> None:
        if len(fds) > self._limits.max_fds:
            raise FrameTooLarge(
                f"a message carries {len(fds)} descriptors, over the limit of "
                f"{self._limits.max_fds} per message: send fewer, or raise Limits.max_fds"
            )

    def _framed(self, head: bytes, body: bytes) -> tuple[Buffer, ...]:
        size = len(head) + len(body)
        if size > self._max_frame:
            raise self._too_large(size)
        return (_pack_header(size) + head + body,)

    def _encode_out_of_line(self, payload: Any) -> tuple[tuple[Buffer, ...], list[int]]:
        """A message with large binary values: each goes out as its own buffer, uncopied.

        msgpack's bin format is a header and the raw bytes, so packing the
        pieces around each large value and its bin header gives the very
        bytes ``pack`` would, without copying megabytes twice on the way.
        """
        parts: list[Buffer] = []
        pending = [_array_header(len(payload))]  # the body's head goes first once fds are counted
        try:
            for value in payload:
                if type(value) in _BINARY and len(value) >= _OUT_OF_LINE:
                    view = memoryview(value)
                    if not view.c_contiguous:
                        raise EncodeError(
                            "a memoryview to send must be C-contiguous; copy it first"
                        )
                    view = view.cast("B")
                    pending.append(_bin_header(len(view)))
                    parts.append(b"".join(pending))
                    parts.append(view)
                    pending = []
                else:
                    pending.append(self._pack(value))
        except BaseException as exc:
            error = self._failed(exc)
            if error is None:
                raise
            raise error from exc
        if pending:
            parts.append(b"".join(pending))
        fds, self._fds = self._fds, []
        self._check_fd_count(fds)
        if len(parts) >= _MAX_BUFFERS:  # too many pieces for one sendmsg: one body
            return self._framed(_body_head(_MESSAGE, len(fds)), b"".join(parts)), fds or _NO_FDS
        parts[0] = _body_head(_MESSAGE, len(fds)) + parts[0]  # the joined first piece
        size = sum(len(part) for part in parts)
        if size > self._max_frame:
            raise self._too_large(size)
        return (_pack_header(size), *parts), fds or _NO_FDS

    def _too_large(self, size: int) -> FrameTooLarge:
        return FrameTooLarge(
            f"the message encodes to {size} bytes, over the limit of "
            f"{self._max_frame}: send large data through a file descriptor, "
            "or raise Limits.max_frame_size on both ends"
        )


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes((0x90 | n,))
    if n < 0x10000:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def _bin_header(n: int) -> bytes:
    if n < 0x100:
        return b"\xc4" + bytes((n,))
    if n < 0x10000:
        return b"\xc5" + n.to_bytes(2, "big")
    return b"\xc6" + n.to_bytes(4, "big")


def frame_head(body: memoryview) -> tuple[int, int] | None:
    """The kind and descriptor count at the head of a frame body, read byte by byte.

    For a body that msgpack could not finish, as the decoder skips it: None
    if its head is not ``[kind, nfds, ...]`` with a kind from 0 to 127 (the
    array may be any of msgpack's array formats, the ints any unsigned one).
    """
    data = bytes(body[:24])
    for prefix in (b"\x93", b"\xdc\x00\x03", b"\xdd\x00\x00\x00\x03"):
        if data.startswith(prefix):
            at = len(prefix)
            break
    else:
        return None
    kind, at = _small_uint(data, at)
    nfds, _ = _small_uint(data, at)
    if kind is None or nfds is None or kind > MAX_KIND:
        return None
    return kind, nfds


def _small_uint(data: bytes, at: int) -> tuple[int | None, int]:
    """The unsigned int at ``data[at]`` (fixint or uint 8 to 64) and where the next item starts."""
    if at >= len(data):
        return None, at
    marker = data[at]
    if marker <= 0x7F:
        return marker, at + 1
    width = _UINT_WIDTHS.get(marker)
    if width is None or at + 1 + width > len(data):
        return None, at
    return int.from_bytes(data[at + 1 : at + 1 + width], "big"), at + 1 + width


#: Widths of msgpack's uint 8, 16, 32 and 64 (markers 0xcc to 0xcf).
_UINT_WIDTHS = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}


def encode_frame(
    kind: int, payload: Any, wire: WireOptions = DEFAULT_WIRE
) -> tuple[bytes, list[int]]:
    """Encode one frame into a single bytes object, with its descriptor numbers.

    A convenience over :class:`Encoder` for tests and one-off frames.
    """
    buffers, fds = Encoder(wire).encode(kind, payload)
    return b"".join(buffers), fds


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60
_REPR.maxlevel = 3


def brief(value: object) -> str:
    """A short repr of ``value`` that costs little however large it is.

    For error messages about what a peer sent: ``repr()`` of a 64 MiB value
    would build 64 MiB of text before any cutting.
    """
    return _REPR.repr(value)


def describe_value(value: object) -> str:
    """The type and a short repr of ``value``, for error messages."""
    return f"{type(value).__name__} {brief(value)}"
