"""The wire codec: frames of msgpack, with file descriptors beside them.

This module is pure (sans-IO, in the manner of h11): bytes and descriptor
objects go in, frames come out, and back. It never touches a socket, a thread
or the OS; ``tests/test_layers.py`` keeps it that way. ``docs/protocol.md``
describes every byte.

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

import enum
import reprlib
import struct
from collections import deque
from collections.abc import Iterable
from typing import Any, Protocol

import attrs
import msgpack

from ._errors import (
    AuthenticationError,
    EncodeError,
    FrameTooLarge,
    ProtocolError,
    RemoteError,
    UnknownMessage,
)

#: Bumped whenever a frame or the handshake changes incompatibly.
PROTOCOL_VERSION = 1

#: Extension type code of the descriptor placeholder. Users' own extension
#: types pass through untouched under any other code.
FD_EXT_CODE = 1

_HEADER = struct.Struct(">I")
HEADER_SIZE = _HEADER.size
_unpack_header = _HEADER.unpack_from
_pack_header = _HEADER.pack
#: A frame's header and the first four bytes of its body, in one call.
_unpack_start = struct.Struct(">II").unpack_from
_unpackb = msgpack.unpackb

#: 64 MiB: large enough for any message that should not be a file descriptor
#: instead, small enough that a hostile length prefix cannot exhaust memory.
DEFAULT_MAX_FRAME_SIZE = 64 * 1024 * 1024

#: Descriptors per frame. Linux refuses more than 253 in one message
#: (SCM_MAX_FD); 64 keeps the ancillary buffer of every read small.
DEFAULT_MAX_FDS = 64
_SCM_MAX_FD = 253

#: Receive buffer a decoder starts with: one read takes in many small frames.
_INITIAL_BUFFER = 16 * 1024

#: The first step a receive buffer grows by for a large frame; after it, it
#: doubles (see Decoder.get_buffer).
_GROWTH_STEP = 1024 * 1024

#: A buffer grown for a large frame is kept up to this size, so that repeated
#: large messages reuse memory instead of faulting in fresh pages each time
#: (see docs/performance.md); a larger one is dropped once its frame is read.
_RETAIN_BUFFER = 16 * 1024 * 1024


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


_KINDS = frozenset(int(k) for k in Kind)
#: What an encoder hands out to send: bytes, or a view of a caller's buffer.
Buffer = bytes | bytearray | memoryview

_NO_FDS: list[int] = []  # shared, never mutated: most frames carry no descriptors
_BINARY = frozenset({bytes, bytearray, memoryview})
_ARRAY3 = b"\x93"
#: sendmsg takes at most IOV_MAX (1024 on Linux) buffers; a frame stays well below.
_MAX_BUFFERS = 512
#: The first three body bytes of a message, as the top bytes of a 32-bit
#: word: [MESSAGE, nfds, ...] packs as 0x93, 0x00, nfds while nfds < 128.
_MESSAGE_WORD = 0x9300
_PLAIN_WORD = 0x930000  # ... and with no descriptors
_FIXINT_FDS = 0x7F  # descriptor counts the fast path reads from one byte
_PLAIN_MESSAGE = b"\x93\x00\x00"  # the same, as bytes to look for in a buffer
_FAST_MIN = HEADER_SIZE + 4  # a header and the four body bytes the fast path reads

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
        if not 0 <= value <= _SCM_MAX_FD:
            raise ValueError(
                f"max_fds must be from 0 to {_SCM_MAX_FD} (Linux's SCM_MAX_FD), got {value!r}"
            )


DEFAULT_LIMITS = Limits()


class Descriptor(Protocol):
    """What the decoder needs of a received descriptor object: it can close it."""

    def close(self) -> None: ...


# Placeholders for the first descriptors of a frame, made once.
_FD_PLACEHOLDERS = [msgpack.ExtType(FD_EXT_CODE, bytes([i])) for i in range(_SCM_MAX_FD + 1)]


def _unencodable(obj: object) -> EncodeError:
    """Why msgpack's ``default`` hook got ``obj``, which has no ``fileno()``."""
    if isinstance(obj, int):  # msgpack hands over the ints it cannot hold
        return EncodeError(
            f"the integer {brief(obj)} is outside msgpack's range (-2**63 to 2**64-1): "
            "send it as a str, or as bytes"
        )
    return EncodeError(
        f"cannot send a value of type {type(obj).__qualname__!r} ({brief(obj)}); "
        "messages hold None, bool, int, float, str, bytes, list, tuple, dict "
        "and objects with fileno(): convert it first"
    )


def _with_count(body: Buffer, nfds: int) -> bytearray:
    """``body`` with ``nfds`` (below 128) as its descriptor count.

    [kind, 0, ...] packs as 0x93, kind, 0x00: the count is byte 2, and a
    count below 128 is one byte too, so it is patched, not repacked.
    """
    patched = bytearray(body)
    patched[2] = nfds
    return patched


def _wide_placeholder(index: int) -> msgpack.ExtType:
    # Only a frame over any limit gets this far; it is refused after packing.
    return msgpack.ExtType(FD_EXT_CODE, index.to_bytes(4, "big"))


class Encoder:
    """Turns messages into frame bytes plus the descriptors to send with them.

    Not thread-safe: give each connection its own encoder, and let one
    thread at a time use it.
    """

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        self._limits = limits
        self._max_frame = limits.max_frame_size
        self._fds: list[int] = []
        # A small first buffer: msgpack grows it as needed, and a fresh
        # connection should not pay for 256 KiB it may never use.
        self._pack = msgpack.Packer(default=self._default, use_bin_type=True, buf_size=4096).pack

    def _default(self, obj: object) -> msgpack.ExtType:
        try:
            fileno = obj.fileno  # type: ignore[attr-defined]
        except AttributeError:
            raise _unencodable(obj) from None
        if fileno is None:  # as some classes say "no fileno here"
            raise _unencodable(obj)
        fd = fileno()
        if not isinstance(fd, int) or fd < 0:
            raise EncodeError(f"{brief(obj)}.fileno() returned {fd!r}, not a descriptor number")
        fds = self._fds
        fds.append(fd)
        index = len(fds) - 1
        return _FD_PLACEHOLDERS[index] if index <= _SCM_MAX_FD else _wide_placeholder(index)

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
        if kind == _MESSAGE and not _BINARY.isdisjoint(map(type, payload)):
            for value in payload:
                if type(value) in _BINARY and len(value) >= _OUT_OF_LINE:
                    return self._encode_out_of_line(payload)
        try:
            body = self._pack((kind, 0, payload))
        except BaseException as exc:
            error = self._failed(exc)
            if error is None:
                raise
            raise error from exc
        if self._fds:
            body, fds = self._count_fds(body, kind, payload)
        else:
            fds = _NO_FDS
        size = len(body)
        if size > self._max_frame:
            raise self._too_large(size)
        return (_pack_header(size) + body,), fds

    def _failed(self, exc: BaseException) -> EncodeError | None:
        """Forget the failed frame's descriptors; msgpack's refusals become EncodeError."""
        self._fds = []
        if isinstance(exc, (OverflowError, ValueError, BufferError)) and not isinstance(
            exc, EncodeError
        ):
            return EncodeError(f"cannot encode the message: {exc}")
        return None

    def _count_fds(
        self, body: bytes, kind: int, payload: Any
    ) -> tuple[bytes | bytearray, list[int]]:
        """Write the descriptor count the body was packed without."""
        fds, self._fds = self._fds, []
        if len(fds) > self._limits.max_fds:
            raise FrameTooLarge(
                f"a message carries {len(fds)} descriptors, over the limit of "
                f"{self._limits.max_fds} per message: send fewer, or raise Limits.max_fds"
            )
        if len(fds) < 0x80:
            return _with_count(body, len(fds)), fds
        try:
            return self._pack((kind, len(fds), payload)), fds
        finally:
            self._fds = []

    def _encode_out_of_line(self, payload: Any) -> tuple[tuple[Buffer, ...], list[int]]:
        """A message with large binary values: each goes out as its own buffer, uncopied.

        msgpack's bin format is a header and the raw bytes, so packing the
        pieces around each large value and its bin header gives the very
        bytes ``pack`` would, without copying megabytes twice on the way.
        """
        parts: list[Buffer] = []
        pending = [_ARRAY3, bytes((_MESSAGE,)), b"\x00", _array_header(len(payload))]
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
        if len(parts) >= _MAX_BUFFERS:
            self._fds = []  # too many pieces for one sendmsg: copy them into one body
            return self._encode_with_copies(payload)
        fds, self._fds = self._fds, []
        if fds:
            if len(fds) >= 0x80:
                return self._encode_with_copies(payload)
            if len(fds) > self._limits.max_fds:
                raise FrameTooLarge(
                    f"a message carries {len(fds)} descriptors, over the limit of "
                    f"{self._limits.max_fds} per message: send fewer, or raise Limits.max_fds"
                )
            parts[0] = _with_count(parts[0], len(fds))  # the joined first piece
        size = sum(len(part) for part in parts)
        if size > self._max_frame:
            raise self._too_large(size)
        return (_pack_header(size), *parts), fds or _NO_FDS

    def _encode_with_copies(self, payload: Any) -> tuple[tuple[Buffer, ...], list[int]]:
        body = self._pack((_MESSAGE, 0, payload))
        body, fds = self._count_fds(body, _MESSAGE, payload)
        size = len(body)
        if size > self._max_frame:
            raise self._too_large(size)
        return (_pack_header(size) + body,), fds

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


def encode_frame(
    kind: int, payload: Any, limits: Limits = DEFAULT_LIMITS
) -> tuple[bytes, list[int]]:
    """Encode one frame into a single bytes object, with its descriptor numbers.

    A convenience over :class:`Encoder` for tests and one-off frames.
    """
    buffers, fds = Encoder(limits).encode(kind, payload)
    return b"".join(buffers), fds


class Decoder:
    """Turns received bytes and descriptors into whole frames, incrementally.

    Feed it with :meth:`receive_data`, or read straight into its buffer with
    :meth:`get_buffer` and :meth:`buffer_updated` (no copy); then call
    :meth:`next_frame` until it returns None. Descriptor objects handed in are
    owned by the decoder until a frame claims them; :meth:`close` closes the
    rest. Not thread-safe.
    """

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        # Channel._receive reads _end and _view directly on every message: _end
        # is 0 exactly when nothing is buffered, and _view is then the whole
        # buffer to read into. Keep that true when changing either.
        self._buf = bytearray(_INITIAL_BUFFER)
        self._view = memoryview(self._buf)
        self._start = 0  # first byte not yet consumed
        self._end = 0  # end of the bytes received
        self._offset = 0  # stream offset of self._start, for error messages
        self._fds: deque[Descriptor] = deque()
        self._used: list[int] = []  # placeholders met in the frame being decoded
        self._broken: ProtocolError | None = None
        self._oversized = False  # the buffer outgrew _RETAIN_BUFFER for one frame
        self._hook = self._ext_hook  # bound once, not on every frame
        self.set_limits(limits)

    def cap_frame_size(self, size: int | None) -> None:
        """Take frames of at most ``size`` bytes from the next one on; None lifts the cap.

        For a peer that has not authenticated yet: it may not make this
        process set aside more than ``size`` bytes for one frame.
        """
        self._max_frame = self._limits.max_frame_size if size is None else size
        self._gate_fast_path()

    def set_limits(self, limits: Limits) -> None:
        """Apply ``limits`` from the next frame on."""
        self._limits = limits
        self._max_frame = limits.max_frame_size
        # msgpack's own length limits, only where the user set them: each
        # keyword costs time on every frame, and by default msgpack already
        # derives safe limits from the body's size.
        self._options: dict[str, Any] = {
            name: getattr(limits, name)
            for name in (
                "max_str_len",
                "max_bin_len",
                "max_array_len",
                "max_map_len",
                "max_ext_len",
            )
            if getattr(limits, name) is not None
        }
        self._plain = not self._options  # msgpack's defaults are our limits
        self._fast_fds = min(limits.max_fds, _FIXINT_FDS)
        self._gate_fast_path()

    def _gate_fast_path(self) -> None:
        # One number gates next_frame's fast path: the largest body it takes,
        # or -1 when it must not run (msgpack's limits are set, which only the
        # general path passes on; the decoder is broken; or the buffer grew
        # past _RETAIN_BUFFER, and the general path must drop it after).
        ok = self._plain and self._broken is None and not self._oversized
        self._fast_max = self._max_frame if ok else -1

    @property
    def pending(self) -> int:
        """Bytes received that do not yet make a whole frame (0 between frames)."""
        return self._end - self._start

    def receive_data(
        self, data: bytes | bytearray | memoryview, fds: Iterable[Descriptor] = ()
    ) -> None:
        """Add bytes (and the descriptors that came with them) from the peer.

        Args:
            data: any part of the stream, however split.
            fds: descriptor objects received with ``data``; the decoder owns
                them from now on.
        """
        self._fds.extend(fds)
        data = memoryview(data).cast("B")
        while data:
            free = self.get_buffer()
            n = min(len(free), len(data))
            free[:n] = data[:n]
            self._end += n
            data = data[n:]

    def get_buffer(self) -> memoryview:
        """Return free buffer space to read into; call :meth:`buffer_updated` after.

        A large frame is read into one buffer, without joins. The buffer
        grows as the frame's bytes arrive, doubling from 1 MiB up to the
        frame's size, never to what a header merely announces: a peer that
        sends a header and stops costs no more memory than it sent.

        Raises:
            FrameTooLarge: the pending frame's header is over the limit.
        """
        if self._end == 0:  # empty: the whole buffer, no slicing
            return self._view
        pending = self._end - self._start
        need = HEADER_SIZE - pending
        if pending >= HEADER_SIZE:
            need = HEADER_SIZE + self._frame_length() - pending
        if len(self._buf) - self._end >= max(need, 1):
            return self._view[self._end :]
        size = max(pending + need, _INITIAL_BUFFER)
        size = min(size, max(2 * len(self._buf), _GROWTH_STEP))
        if size <= len(self._buf):
            self._buf[:pending] = self._view[self._start : self._end]
        else:
            buf = bytearray(size)
            buf[:pending] = self._view[self._start : self._end]
            self._buf = buf
            self._view = memoryview(buf)
            self._oversized = size > _RETAIN_BUFFER
            if self._oversized:
                self._fast_max = -1  # its frame takes the general path, which drops it after
        self._start, self._end = 0, pending
        return self._view[pending:]

    def buffer_updated(self, nbytes: int, fds: Iterable[Descriptor] = ()) -> None:
        """Record that ``nbytes`` were written at the start of :meth:`get_buffer`'s view.

        ``fds`` are the descriptor objects that came with them; the decoder
        owns them from now on.
        """
        self._end += nbytes
        if fds:
            self._fds.extend(fds)

    def _frame_length(self) -> int:
        if self._broken is not None:
            raise self._broken
        (length,) = _HEADER.unpack_from(self._buf, self._start)
        if length > self._max_frame:
            raise self._fail(
                FrameTooLarge(
                    f"frame at stream offset {self._offset} announces {length} bytes, over the "
                    f"limit of {self._limits.max_frame_size}: the peer sent too large a message "
                    "or is not speaking passrpc"
                )
            )
        return int(length)

    def _fail(self, exc: ProtocolError) -> ProtocolError:
        self._broken = exc
        self._start = self._end = 0  # every later call lands on the broken check
        self._max_frame = self._fast_max = -1
        self.close()
        return exc

    def _ext_hook(self, code: int, data: bytes) -> object:
        # Each placeholder met is noted in _used, so that the frame's
        # descriptors its payload does not mention can be closed.
        if code == FD_EXT_CODE and len(data) == 1 and data[0] < len(self._fds):
            self._used.append(data[0])
            return self._fds[data[0]]
        return self._ext_hook_rest(code, data)

    def _ext_hook_rest(self, code: int, data: bytes) -> object:
        """Other extension types, wide placeholders, and placeholders that point nowhere."""
        if code != FD_EXT_CODE:
            return msgpack.ExtType(code, data)
        if not 1 <= len(data) <= 4:
            raise ValueError(f"a descriptor placeholder of {len(data)} bytes; it takes 1 to 4")
        index = int.from_bytes(data, "big")
        if index >= len(self._fds):
            raise ValueError(f"descriptor placeholder {index} refers to no descriptor received")
        self._used.append(index)
        return self._fds[index]

    def next_frame(self, received: int = 0) -> tuple[int, Any] | None:
        """Return the next whole frame as ``(kind, payload)``, or None if more bytes are needed.

        ``received`` counts bytes just written into :meth:`get_buffer`'s view:
        ``next_frame(n)`` is ``buffer_updated(n)`` then ``next_frame()`` in one
        call, which the read path of every message saves.

        Descriptors in the payload come back as the objects handed in with
        the bytes; the frame's descriptors that its payload does not mention
        are closed.

        Raises:
            FrameTooLarge: a frame header is over the limit.
            ProtocolError: the bytes are not a valid frame; the decoder stays
                broken and closes every descriptor it holds.
        """
        # The hot path of every read: kept flat on purpose.
        start = self._start
        end = self._end + received
        if start == 0 and end >= _FAST_MIN:
            # Nearly every read brings exactly one whole frame into an empty
            # buffer. Its header and first body bytes, read in one call, tell
            # whether it is a message, and with how many descriptors.
            length, word = _unpack_start(self._buf)
            if length + HEADER_SIZE == end and length <= self._fast_max:
                if word >> 8 == _PLAIN_WORD and not self._fds:
                    # [0, 0, payload]: with str map keys msgpack's defaults
                    # decode it; other keys make it raise ValueError, and the
                    # general path decodes (or refuses) the frame.
                    try:
                        payload = _unpackb(self._view[HEADER_SIZE:end])[2]
                    except ValueError:
                        self._end = end
                        return self._next_general(0, end, end, self._view[HEADER_SIZE:end])
                    self._offset += end
                    self._end = 0
                    return _MESSAGE, payload
                elif word >> 16 == _MESSAGE_WORD:
                    frame = self._message_with_fds(end, word >> 8 & 0xFF)
                    if frame is not None:
                        return frame
        self._end = end
        if end - start < HEADER_SIZE:
            if self._broken is not None:
                raise self._broken
            return None
        length = _unpack_header(self._buf, start)[0]
        if length > self._max_frame:
            self._frame_length()  # raises FrameTooLarge (or the error that broke us)
        stop = start + HEADER_SIZE + length
        if stop > end:
            return None
        view = self._view[start + HEADER_SIZE : stop]
        buf = self._buf
        # Several frames in the buffer: a message without descriptors still
        # skips the general path, as above.
        if self._plain and length >= 3 and buf.startswith(_PLAIN_MESSAGE, start + HEADER_SIZE):
            try:
                payload = _unpackb(view)[2]
            except ValueError:
                pass
            else:
                self._consumed(start, stop, end)
                return _MESSAGE, payload
        return self._next_general(start, stop, end, view)

    def _message_with_fds(self, end: int, nfds: int) -> tuple[int, Any] | None:
        """Decode the one whole frame in the buffer, a message that carries ``nfds`` descriptors.

        Only when exactly its descriptors arrived with it (at most 127) and it
        decodes without error; None leaves the frame to the general path,
        which decodes it or says what is wrong with it.
        """
        fds = self._fds
        if nfds != len(fds) or nfds > self._fast_fds:
            return None
        self._used = []
        try:
            payload = _unpackb(
                self._view[HEADER_SIZE:end], strict_map_key=False, ext_hook=self._hook
            )[2]
        except ValueError:
            return None
        used = self._used
        if len(used) < nfds or (nfds > 1 and len(set(used)) < nfds):
            _close_unmentioned(list(fds), used)
        fds.clear()
        self._offset += end
        self._end = 0
        return _MESSAGE, payload

    def _next_general(self, start: int, stop: int, end: int, view: memoryview) -> tuple[int, Any]:
        """Decode any frame, checking every field: the path of all but plain messages."""
        # Placeholders can only point at descriptors that have arrived; with
        # none waiting, extension type 1 stays the ExtType it is.
        try:
            body = self._unpack_general(view, self._hook if self._fds else None)
        except Exception as exc:  # msgpack raises ValueError and its own types
            raise self._fail(
                ProtocolError(
                    f"frame at stream offset {self._offset}: the body is not valid passrpc "
                    f"msgpack ({type(exc).__name__}: {exc})"
                )
            ) from exc
        offset = self._offset
        if type(body) is not list or len(body) != 3:
            raise self._fail(
                ProtocolError(
                    f"frame at stream offset {offset}: the body must be an array "
                    f"[kind, nfds, payload], got {_describe(body)}"
                )
            )
        kind, nfds, payload = body
        frame = self._check_frame(offset, kind, nfds, payload)
        self._consumed(start, stop, end)
        return frame

    def _consumed(self, start: int, stop: int, end: int) -> None:
        """The frame at ``start:stop`` is decoded; ``end`` is where received bytes end."""
        self._offset += stop - start
        if stop == end:
            self._start = self._end = 0
            if self._oversized or self._fds:
                self._after_last_frame()
        else:
            self._start = stop

    def _unpack_general(self, view: memoryview, hook: Any) -> Any:
        """Decode with every option; placeholders resolve only in frames that carry descriptors."""
        self._used = []
        if hook is None:
            return _unpackb(view, strict_map_key=False, **self._options)
        return _unpackb(view, strict_map_key=False, ext_hook=hook, **self._options)

    def _after_last_frame(self) -> None:
        """Every byte received is decoded: drop an outsized buffer, refuse stray descriptors.

        Descriptors arrive with their frame's first byte, so once every byte
        is decoded, any still waiting belong to no frame: a peer that
        attaches them to frames that do not count them would otherwise pile
        them up in this process.
        """
        if self._fds:
            raise self._fail(
                ProtocolError(
                    f"the peer sent {len(self._fds)} descriptor(s) that no frame claims "
                    f"(by stream offset {self._offset}); they were closed"
                )
            )
        self._buf = bytearray(_INITIAL_BUFFER)
        self._view = memoryview(self._buf)
        self._oversized = False
        self._gate_fast_path()

    def _check_frame(self, offset: int, kind: Any, nfds: Any, payload: Any) -> tuple[int, Any]:
        if type(kind) is not int or kind not in _KINDS:
            raise self._fail(
                ProtocolError(
                    f"frame at stream offset {offset}: unknown frame kind {kind!r}; "
                    f"the peer may speak a newer protocol than version {PROTOCOL_VERSION}"
                )
            )
        if type(nfds) is not int or not 0 <= nfds <= self._limits.max_fds:
            raise self._fail(
                ProtocolError(
                    f"frame at stream offset {offset}: descriptor count {nfds!r} is not an "
                    f"integer from 0 to {self._limits.max_fds}"
                )
            )
        if nfds > len(self._fds):
            raise self._fail(
                ProtocolError(
                    f"frame at stream offset {offset} claims {nfds} descriptors but only "
                    f"{len(self._fds)} arrived with it"
                )
            )
        used = self._used
        if used and max(used) >= nfds:
            raise self._fail(
                ProtocolError(
                    f"frame at stream offset {offset} refers to descriptor {max(used)} "
                    f"but carries only {nfds}"
                )
            )
        popleft = self._fds.popleft
        taken = [popleft() for _ in range(nfds)]
        if len(used) < nfds or len(set(used)) < nfds:
            _close_unmentioned(taken, used)
        return kind, payload

    def close(self) -> None:
        """Close every descriptor received and not yet handed out in a frame."""
        while self._fds:
            self._fds.popleft().close()


def _close_unmentioned(taken: list[Descriptor], used: list[int]) -> None:
    """Close a frame's descriptors that its payload does not mention: nobody else could."""
    mentioned = set(used)
    for index, fd in enumerate(taken):
        if index not in mentioned:
            fd.close()


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60
_REPR.maxlevel = 3


def brief(value: object) -> str:
    """A short repr of ``value`` that costs little however large it is.

    For error messages about what a peer sent: ``repr()`` of a 64 MiB value
    would build 64 MiB of text before any cutting.
    """
    return _REPR.repr(value)


def _describe(value: object) -> str:
    return f"{type(value).__name__} {brief(value)}"


# Error frames ---------------------------------------------------------------

#: Codes of error frames, and what the receiving side raises for each.
ERROR_REMOTE = "remote"  # a handler raised
ERROR_UNKNOWN_MESSAGE = "unknown_message"
ERROR_BAD_REQUEST = "bad_request"  # a request the server could not take
ERROR_AUTHENTICATION = "authentication"


def error_payload(code: str, remote_type: str, message: str, traceback: str = "") -> dict[str, str]:
    """Build the payload of an ERROR frame."""
    return {"code": code, "type": remote_type, "message": message, "traceback": traceback}


def error_from_payload(payload: Any) -> Exception:
    """Turn an ERROR frame's payload into the exception the receiver raises."""
    if not isinstance(payload, dict):
        return ProtocolError(f"the peer sent a malformed error frame: {_describe(payload)}")
    code = payload.get("code")
    remote_type = str(payload.get("type", "Exception"))
    message = str(payload.get("message", ""))
    if code == ERROR_UNKNOWN_MESSAGE:
        return UnknownMessage(message)
    if code == ERROR_AUTHENTICATION:
        return AuthenticationError(message)
    if code == ERROR_BAD_REQUEST:
        return ProtocolError(f"the server refused the request: {message}")
    return RemoteError(remote_type, message, str(payload.get("traceback", "")))
