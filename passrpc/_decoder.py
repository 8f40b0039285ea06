"""The frame decoder: received bytes and descriptors in, whole frames out.

Pure, like :mod:`passrpc._wire` (the encoder and the frame layout, which
``docs/protocol.md`` describes byte by byte): it never touches a socket. A
channel reads straight into the decoder's buffer (:meth:`Decoder.get_buffer`),
hands over the descriptors that came with the bytes, and asks for frames
(:meth:`Decoder.next_frame`). The common case, one whole message per read,
takes a fast path that decodes it with one ``struct`` call and one
``msgpack.unpackb``.

Extension values are decoded wherever they are: descriptor placeholders
become the descriptors received, msgpack's Timestamp a ``datetime`` in UTC,
and the codes of the registry (:class:`~passrpc._types.TypeRegistry`) their
classes. A value that cannot be rebuilt (a registered ``decode`` that fails,
a map key that cannot be a dict key) spoils only its own frame: the frame is
skipped whole and :class:`DecodeError` raised, and the stream stays in step.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

from ._errors import DecodeError, ProtocolError
from ._framebuffer import INITIAL_BUFFER, Descriptor, FrameBuffer
from ._types import MAX_TYPE_NESTING, RegisteredType, TypeRegistry
from ._wire import (
    DEFAULT_WIRE,
    FD_EXT_CODE,
    HEADER_SIZE,
    MAX_KIND,
    Kind,
    Limits,
    WireOptions,
    describe_value,
    frame_head,
)

_HEADER = struct.Struct(">I")
_unpack_header = _HEADER.unpack_from
#: A frame's header and the first four bytes of its body, in one call.
_unpack_start = struct.Struct(">II").unpack_from
_unpackb = msgpack.unpackb
_MESSAGE = int(Kind.MESSAGE)

#: The first three body bytes of a message, as the top bytes of a 32-bit
#: word: [MESSAGE, nfds, ...] packs as 0x93, 0x00, nfds while nfds < 128.
_MESSAGE_WORD = 0x9300
_PLAIN_WORD = 0x930000  # ... and with no descriptors
_FIXINT_FDS = 0x7F  # descriptor counts the fast path reads from one byte
_PLAIN_MESSAGE = b"\x93\x00\x00"  # the same, as bytes to look for in a buffer
#: A stream's item without descriptors (docs/protocol.md section 9): decoded
#: as a plain message is, once a frame is no message. (Not in the one-frame
#: fast path: code there costs every call, even where it never runs.)
_ITEM = int(Kind.ITEM)
_PLAIN_ITEM = b"\x93\x06\x00"
_FAST_MIN = HEADER_SIZE + 4  # a header and the four body bytes the fast path reads
_PAYLOAD = HEADER_SIZE + 3  # where a message's payload starts when its head is three bytes
# Every unpackb below passes timestamp=3: msgpack's Timestamp becomes a
# timezone-aware datetime in UTC. A literal, not a named constant: looking a
# global up costs a frame about a hundred instructions (benchmarks/instructions.py).


class _Undecodable(Exception):
    """A registered value could not be rebuilt; raised through msgpack to the decoder."""


#: What a value that cannot be rebuilt raises out of msgpack: our hook's
#: refusal, a map key that is not hashable (TypeError), a timestamp out of
#: datetime's range (OverflowError). Its frame is skipped, not the stream broken.
_VALUE_FAILURES = (_Undecodable, TypeError, OverflowError)


class _Registered:
    """How a decoder rebuilds the extension values of registered codes.

    ``hook`` is the decoder's own extension hook, so that a registered
    value's data may hold placeholders, datetimes and registered values.
    """

    def __init__(self, types: TypeRegistry, hook: Any) -> None:
        self.types = types
        # The registry's own dict: a code registered later decodes at once.
        self.decoders: dict[int, RegisteredType] = types.by_code
        self.hook = hook
        self.options: dict[str, Any] = {}  # msgpack's limits, as the decoder's
        self.nesting = 0  # registered values being decoded inside one another
        #: Whether a frame that cannot be rebuilt is skipped (True) or breaks
        #: the stream: off, with the registry, until the peer authenticated.
        self.on = True

    def enable(self, on: bool) -> None:
        """Decode registered codes (on), or leave every code an ExtType (off)."""
        self.decoders = self.types.by_code if on else {}
        self.on = on

    def rebuild(self, code: int, data: bytes) -> object:
        """The value of extension ``code``: a registered class's instance, else an ExtType.

        Raises:
            _Undecodable: a registered value failed; its frame is skipped.
        """
        entry = self.decoders.get(code)
        if entry is None:
            return any_ext(code, data)  # not registered here: as it came
        if self.nesting >= MAX_TYPE_NESTING:
            raise _Undecodable(f"registered values nest more than {MAX_TYPE_NESTING} deep")
        self.nesting += 1
        try:
            if self.options:
                value = _unpackb(
                    data, ext_hook=self.hook, timestamp=3, strict_map_key=False, **self.options
                )
            else:  # no ** call: it costs msgpack's argument parser a dict of its own
                value = _unpackb(data, ext_hook=self.hook, timestamp=3, strict_map_key=False)
            return entry.decode(value)
        except _Undecodable:
            raise
        except Exception as exc:
            raise _Undecodable(
                f"extension type {entry.code} ({entry.name}) could not be decoded: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        finally:
            self.nesting -= 1


def any_ext(code: int, data: bytes) -> msgpack.ExtType:
    """An extension value this side has no meaning for, as ``msgpack.ExtType(code, data)``.

    msgpack's own hook refuses the negative codes (-128 to -2) that its
    specification reserves; they pass through here like any other
    (docs/protocol.md section 4), and encode back unchanged.
    """
    if code >= 0:
        return msgpack.ExtType(code, data)
    return tuple.__new__(msgpack.ExtType, (code, data))  # ExtType's own check wants 0..127


class Decoder(FrameBuffer):
    """Turns received bytes and descriptors into whole frames, incrementally.

    Feed it with :meth:`receive_data`, or read straight into its buffer with
    :meth:`get_buffer` and :meth:`buffer_updated` (no copy); then call
    :meth:`next_frame` until it returns None. Descriptor objects handed in are
    owned by the decoder until a frame claims them; :meth:`close` closes the
    rest. Not thread-safe.
    """

    def __init__(self, wire: WireOptions = DEFAULT_WIRE) -> None:
        super().__init__()
        self._used: list[int] = []  # placeholders met in the frame being decoded
        self._hook = self._ext_hook  # bound once, not on every frame
        self._registered = _Registered(wire.types, self._hook)
        self._configure(wire.limits)

    def cap_frame_size(self, size: int | None, *, last_step: bool = False) -> None:
        """Take frames of at most ``size`` bytes, and no descriptor, from the next one on.

        For a peer that has not authenticated yet: it may not make this
        process set aside more than ``size`` bytes for one frame, nor make it
        hold a descriptor: one that arrives breaks the decoder, and is
        closed. With ``last_step`` (the peer's last handshake frame is
        next), descriptors are taken once that frame has arrived whole: they
        can only belong to a request sent right behind it, and the frame is
        checked before anything else is read. Nor does it run a registered
        ``decode`` (its codes arrive as ``msgpack.ExtType``), nor have a
        frame skipped: one that cannot be rebuilt breaks the stream. None
        lifts every cap.
        """
        self._max_frame = self._limits.max_frame_size if size is None else size
        self._refuse_fds = size is not None
        self._fds_after_frame = last_step
        self._registered.enable(size is None)
        self._gate_fast_path()

    def _configure(self, limits: Limits) -> None:
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
        self._registered.options = self._options
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

    def _ext_hook(self, code: int, data: bytes) -> object:
        # Each placeholder met is noted in _used, so that the frame's
        # descriptors its payload does not mention can be closed.
        if code == FD_EXT_CODE and len(data) == 1:
            index = data[0]
            fds = self._fds
            if index < len(fds):
                self._used.append(index)
                return fds[index]
        return self._ext_hook_rest(code, data)

    def _ext_hook_rest(self, code: int, data: bytes) -> object:
        """Registered and other extension types, wide placeholders, placeholders that point nowhere."""
        if code != FD_EXT_CODE:
            return self._registered.rebuild(code, data)
        if not self._fds:
            # No descriptor waits, so this is no placeholder: as it came.
            return any_ext(code, data)
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
        end = self.end + received
        if start == 0 and end >= _FAST_MIN:
            # Nearly every read brings exactly one whole frame into an empty
            # buffer. Its header and first body bytes, read in one call, tell
            # whether it is a message, and with how many descriptors.
            length, word = _unpack_start(self._buf)
            if length + HEADER_SIZE == end and length <= self._fast_max:
                if word >> 8 == _PLAIN_WORD and not self._fds:
                    # [0, 0, payload]: with str map keys msgpack's defaults
                    # decode it; other keys make it raise ValueError, and the
                    # general path decodes (or refuses) the frame. Only the
                    # payload is unpacked: its head was just read.
                    try:
                        payload = _unpackb(
                            self.view[_PAYLOAD:end], ext_hook=self._hook, timestamp=3
                        )
                    except Exception as exc:  # one clause: a second costs every call
                        self.end = end
                        return self._failed(0, end, end, self.view[HEADER_SIZE:end], exc)
                    self._offset += end
                    self.end = 0
                    return _MESSAGE, payload
                elif word >> 16 == _MESSAGE_WORD:
                    frame = self._message_with_fds(end, word >> 8 & 0xFF)
                    if frame is not None:
                        return frame
        self.end = end
        if end - start < HEADER_SIZE:
            if self._broken is not None:
                raise self._broken
            if self._fds:
                self._incomplete()
            return None
        length = _unpack_header(self._buf, start)[0]
        if length > self._max_frame:
            self._frame_length()  # raises FrameTooLarge (or the error that broke us)
        stop = start + HEADER_SIZE + length
        if stop > end:
            if self._fds:
                self._incomplete()
            return None
        view = self.view[start + HEADER_SIZE : stop]
        buf = self._buf
        # Several frames in the buffer: a message without descriptors still
        # skips the general path, as above.
        if self._plain and length >= 3 and buf.startswith(_PLAIN_MESSAGE, start + HEADER_SIZE):
            try:
                payload = _unpackb(view[3:], ext_hook=self._hook, timestamp=3)
            except Exception as exc:
                return self._failed(start, stop, end, view, exc)
            self._consumed(start, stop, end)
            return _MESSAGE, payload
        if self._plain and length >= 3 and buf.startswith(_PLAIN_ITEM, start + HEADER_SIZE):
            # A stream's item, decoded as a plain message is (a stream's many
            # items mostly come several to a read).
            try:
                payload = _unpackb(view, ext_hook=self._hook, timestamp=3)[2]
            except Exception as exc:
                return self._failed(start, stop, end, view, exc)
            self._consumed(start, stop, end)
            return _ITEM, payload
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
            # The payload alone: the head, [0, nfds, ...], is three bytes read already.
            payload = _unpackb(
                self.view[_PAYLOAD:end], strict_map_key=False, ext_hook=self._hook, timestamp=3
            )
        except ValueError:
            return None
        except _VALUE_FAILURES as exc:
            self._failed(0, end, end, self.view[HEADER_SIZE:end], exc)
        used = self._used
        if len(used) < nfds or (nfds > 1 and len(set(used)) < nfds):
            _close_unmentioned(list(fds), used)
        fds.clear()
        if self._charged:
            self._release()
        self._offset += end
        self.end = 0
        return _MESSAGE, payload

    def _next_general(self, start: int, stop: int, end: int, view: memoryview) -> tuple[int, Any]:
        """Decode any frame, checking every field: the path of all but plain messages."""
        try:
            body = self._unpack_general(view)
        except _VALUE_FAILURES as exc:
            self._failed(start, stop, end, view, exc)
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
                    f"[kind, nfds, payload], got {describe_value(body)}"
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
            self._start = self.end = 0
            if self._oversized or self._fds:
                self._after_last_frame()
        else:
            self._start = stop

    def _unpack_general(self, view: memoryview) -> Any:
        """Decode with every option (placeholders resolve only while descriptors wait).

        A body whose head is what passrpc's encoder writes, ``[kind, nfds,
        ...]`` in three bytes, has its payload decoded alone, as on the fast
        paths: the encoder packs the payload alone too, so a payload as deep
        as msgpack's nesting limit allows decodes on every path.
        """
        self._used = []
        if not self._options and len(view) > 3 and view[0] == 0x93:
            kind, nfds = view[1], view[2]
            if kind <= MAX_KIND and nfds <= MAX_KIND:
                payload = _unpackb(view[3:], strict_map_key=False, ext_hook=self._hook, timestamp=3)
                return [kind, nfds, payload]
        return _unpackb(
            view,
            strict_map_key=False,
            ext_hook=self._hook,
            timestamp=3,
            **self._options,
        )

    def _failed(
        self, start: int, stop: int, end: int, view: memoryview, exc: Exception
    ) -> tuple[int, Any]:
        """A frame msgpack failed on: skip it if a value cannot be rebuilt, else the general path's.

        Skipping keeps the stream in step (the header gave the frame's end)
        and closes the descriptors the body's head counts; decoding again
        would run a registered ``decode`` twice. Any other ValueError (a map
        key other than str or bytes, a broken body) goes to the general path.

        Raises:
            DecodeError: the frame was skipped.
            ProtocolError: the peer has not authenticated, or the body's head
                is not ``[kind, nfds, ...]`` with its descriptors arrived.
        """
        if not isinstance(exc, _VALUE_FAILURES):
            if isinstance(exc, ValueError):
                return self._next_general(start, stop, end, view)
            raise exc
        offset = self._offset
        reason = _why(exc)
        head = frame_head(view) if self._registered.on else None
        if head is None or head[1] > min(self._limits.max_fds, len(self._fds)):
            raise self._fail(ProtocolError(f"frame at stream offset {offset}: {reason}")) from exc
        kind, nfds = head
        for _ in range(nfds):
            self._fds.popleft().close()
        self._consumed(start, stop, end)
        closed = f" (its {nfds} descriptor(s) closed)" if nfds else ""
        raise DecodeError(
            f"frame at stream offset {offset}: {reason}; the frame was skipped{closed}, "
            "and the connection stays usable",
            kind,
        ) from exc

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
        self._buf = bytearray(INITIAL_BUFFER)
        self.view = memoryview(self._buf)
        self._oversized = False
        self._gate_fast_path()

    def _check_frame(self, offset: int, kind: Any, nfds: Any, payload: Any) -> tuple[int, Any]:
        # Kinds this side does not know still decode: the layer above answers
        # them (see RESERVED_KINDS), so that a newer peer keeps its connection.
        if type(kind) is not int or not 0 <= kind <= MAX_KIND:
            raise self._fail(
                ProtocolError(
                    f"frame at stream offset {offset}: frame kind {kind!r} is not an integer "
                    f"from 0 to {MAX_KIND}; the peer is not speaking passrpc"
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
        if self._charged:
            self._release()  # what still waits is charged again if its frame is unfinished
        if len(used) < nfds or len(set(used)) < nfds:
            _close_unmentioned(taken, used)
        return kind, payload


def _why(exc: Exception) -> str:
    """What a value that cannot be rebuilt did wrong, for :class:`DecodeError`."""
    if isinstance(exc, _Undecodable):
        return str(exc)
    if isinstance(exc, OverflowError):
        return f"a timestamp is out of datetime's range ({exc})"
    if "unhashable" in str(exc):
        return (
            f"a map key cannot be rebuilt ({exc}): map keys must be str, int, float, bool, "
            "None, bytes or hashable registered values (a tuple key arrives as a list)"
        )
    return f"a value cannot be rebuilt ({type(exc).__name__}: {exc})"


def _close_unmentioned(taken: list[Descriptor], used: list[int]) -> None:
    """Close a frame's descriptors that its payload does not mention: nobody else could."""
    mentioned = set(used)
    for index, fd in enumerate(taken):
        if index not in mentioned:
            fd.close()
