"""The frame decoder: received bytes and descriptors in, whole frames out.

Pure, like :mod:`passrpc._wire` (the encoder and the frame layout, which
``docs/protocol.md`` describes byte by byte): it never touches a socket. A
channel reads straight into the decoder's buffer (:meth:`Decoder.get_buffer`),
hands over the descriptors that came with the bytes, and asks for frames
(:meth:`Decoder.next_frame`). The common case, one whole message per read,
takes a fast path that decodes it with one ``struct`` call and one
``msgpack.unpackb``.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Iterable
from typing import Any, Protocol

import msgpack

from ._errors import FrameTooLarge, ProtocolError
from ._wire import (
    DEFAULT_WIRE,
    FD_EXT_CODE,
    HEADER_SIZE,
    MAX_KIND,
    Kind,
    Limits,
    WireOptions,
    describe_value,
)

_HEADER = struct.Struct(">I")
_unpack_header = _HEADER.unpack_from
#: A frame's header and the first four bytes of its body, in one call.
_unpack_start = struct.Struct(">II").unpack_from
_unpackb = msgpack.unpackb
_MESSAGE = int(Kind.MESSAGE)

#: Receive buffer a decoder starts with: one read takes in many small frames.
_INITIAL_BUFFER = 16 * 1024

#: The first step a receive buffer grows by for a large frame; after it, it
#: doubles (see Decoder.get_buffer).
_GROWTH_STEP = 1024 * 1024

#: A buffer grown for a large frame is kept up to this size, so that repeated
#: large messages reuse memory instead of faulting in fresh pages each time
#: (see docs/performance.md); a larger one is dropped once its frame is read.
_RETAIN_BUFFER = 16 * 1024 * 1024

#: The first three body bytes of a message, as the top bytes of a 32-bit
#: word: [MESSAGE, nfds, ...] packs as 0x93, 0x00, nfds while nfds < 128.
_MESSAGE_WORD = 0x9300
_PLAIN_WORD = 0x930000  # ... and with no descriptors
_FIXINT_FDS = 0x7F  # descriptor counts the fast path reads from one byte
_PLAIN_MESSAGE = b"\x93\x00\x00"  # the same, as bytes to look for in a buffer
_FAST_MIN = HEADER_SIZE + 4  # a header and the four body bytes the fast path reads


def any_ext(code: int, data: bytes) -> msgpack.ExtType:
    """An extension value this side has no meaning for, as ``msgpack.ExtType(code, data)``.

    msgpack's own hook refuses the negative codes (-128 to -2) that its
    specification reserves; they pass through here like any other
    (docs/protocol.md section 4), and encode back unchanged.
    """
    if code >= 0:
        return msgpack.ExtType(code, data)
    return tuple.__new__(msgpack.ExtType, (code, data))  # ExtType's own check wants 0..127


class Descriptor(Protocol):
    """What the decoder needs of a received descriptor object: it can close it."""

    def close(self) -> None: ...


class Budget(Protocol):
    """A count shared by many decoders: descriptors waiting for their frame, process-wide."""

    def take(self, count: int) -> bool: ...
    def give(self, count: int) -> None: ...


class Decoder:
    """Turns received bytes and descriptors into whole frames, incrementally.

    Feed it with :meth:`receive_data`, or read straight into its buffer with
    :meth:`get_buffer` and :meth:`buffer_updated` (no copy); then call
    :meth:`next_frame` until it returns None. Descriptor objects handed in are
    owned by the decoder until a frame claims them; :meth:`close` closes the
    rest. Not thread-safe.
    """

    def __init__(self, wire: WireOptions = DEFAULT_WIRE) -> None:
        self._buf = bytearray(_INITIAL_BUFFER)
        #: The buffer, as a view. Channel.receive_frame reads ``view`` and
        #: ``end`` on every message (a method call would cost more than the
        #: rest of its check): ``end`` is 0 exactly when nothing is buffered,
        #: and ``view`` is then the whole buffer to read into. Keep that true.
        self.view = memoryview(self._buf)
        self._start = 0  # first byte not yet consumed
        self.end = 0  # end of the bytes received
        self._offset = 0  # stream offset of self._start, for error messages
        self._fds: deque[Descriptor] = deque()
        self._used: list[int] = []  # placeholders met in the frame being decoded
        self._broken: ProtocolError | None = None
        self._oversized = False  # the buffer outgrew _RETAIN_BUFFER for one frame
        self._hook = self._ext_hook  # bound once, not on every frame
        self._refuse_fds = False  # until the peer authenticates (cap_frame_size)
        self._fds_after_frame = False
        self._budget: Budget | None = None
        self._charged = 0  # descriptors charged to the budget, all waiting now
        self._configure(wire.limits)

    def cap_frame_size(self, size: int | None, *, last_step: bool = False) -> None:
        """Take frames of at most ``size`` bytes, and no descriptor, from the next one on.

        For a peer that has not authenticated yet: it may not make this
        process set aside more than ``size`` bytes for one frame, nor make it
        hold a descriptor: one that arrives breaks the decoder, and is
        closed. With ``last_step`` (the peer's last handshake frame is
        next), descriptors are taken once that frame has arrived whole: they
        can only belong to a request sent right behind it, and the frame is
        checked before anything else is read. None lifts both caps.
        """
        self._max_frame = self._limits.max_frame_size if size is None else size
        self._refuse_fds = size is not None
        self._fds_after_frame = last_step
        self._gate_fast_path()

    def share_budget(self, budget: Budget | None) -> None:
        """Charge descriptors that wait for the rest of their frame to ``budget`` (see :class:`Budget`).

        A server gives every connection's decoder one budget, so that many
        connections together cannot fill its descriptor table with frames
        they never finish.
        """
        self._budget = budget

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
        return self.end - self._start

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
            self.end += n
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
        if self.end == 0:  # empty: the whole buffer, no slicing
            if not self._buf:  # released (release_buffer)
                self.reserve_buffer()
            return self.view
        pending = self.end - self._start
        need = HEADER_SIZE - pending
        if pending >= HEADER_SIZE:
            need = HEADER_SIZE + self._frame_length() - pending
        if len(self._buf) - self.end >= max(need, 1):
            return self.view[self.end :]
        size = max(pending + need, _INITIAL_BUFFER)
        size = min(size, max(2 * len(self._buf), _GROWTH_STEP))
        if size <= len(self._buf):
            self._buf[:pending] = self.view[self._start : self.end]
        else:
            buf = bytearray(size)
            buf[:pending] = self.view[self._start : self.end]
            self._buf = buf
            self.view = memoryview(buf)
            self._oversized = size > _RETAIN_BUFFER
            if self._oversized:
                self._fast_max = -1  # its frame takes the general path, which drops it after
        self._start, self.end = 0, pending
        return self.view[pending:]

    def release_buffer(self) -> None:
        """Let go of the buffer if it holds nothing; :meth:`reserve_buffer` before reading again."""
        if self.end == 0:
            self._buf = bytearray()
            self.view = memoryview(self._buf)

    def reserve_buffer(self, *, fresh: bool = False) -> None:
        """Make a receive buffer after :meth:`release_buffer` (with ``fresh``, in any case)."""
        if fresh or not self._buf:
            self._buf = bytearray(_INITIAL_BUFFER)
            self.view = memoryview(self._buf)

    def buffer_updated(self, nbytes: int, fds: Iterable[Descriptor] = ()) -> None:
        """Record that ``nbytes`` were written at the start of :meth:`get_buffer`'s view.

        ``fds`` are the descriptor objects that came with them; the decoder
        owns them from now on.
        """
        self.end += nbytes
        if fds:
            self._fds.extend(fds)
            if self._refuse_fds and not (self._fds_after_frame and self._frame_complete()):
                raise self._fail(
                    ProtocolError(
                        f"the peer sent {len(self._fds)} descriptor(s) before it authenticated; "
                        "they were closed"
                    )
                )

    def _frame_complete(self) -> bool:
        """Whether the frame at the start of the buffer has arrived whole."""
        pending = self.end - self._start
        return pending >= HEADER_SIZE and pending >= HEADER_SIZE + self._frame_length()

    def _frame_length(self) -> int:
        if self._broken is not None:
            raise self._broken
        (length,) = _HEADER.unpack_from(self._buf, self._start)
        if length > self._max_frame:
            before = " before the peer authenticated" if self._refuse_fds else ""
            raise self._fail(
                FrameTooLarge(
                    f"frame at stream offset {self._offset} announces {length} bytes, over the "
                    f"limit of {self._max_frame}{before}: the peer sent too large a message "
                    "or is not speaking passrpc"
                )
            )
        return int(length)

    def _fail(self, exc: ProtocolError) -> ProtocolError:
        self._broken = exc
        self._start = self.end = 0  # every later call lands on the broken check
        self._max_frame = self._fast_max = -1
        self.close()
        return exc

    def _ext_hook(self, code: int, data: bytes) -> object:
        # Each placeholder met is noted in _used, so that the frame's
        # descriptors its payload does not mention can be closed.
        if code == FD_EXT_CODE and len(data) == 1 and data[0] < len(self._fds):
            self._used.append(data[0])
            return self._fds[data[0]]
        return _other_ext(self._fds, self._used, code, data)

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
                    # general path decodes (or refuses) the frame.
                    try:
                        payload = _unpackb(self.view[HEADER_SIZE:end])[2]
                    except ValueError:
                        self.end = end
                        return self._next_general(0, end, end, self.view[HEADER_SIZE:end])
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
                payload = _unpackb(view)[2]
            except ValueError:
                pass
            else:
                self._consumed(start, stop, end)
                return _MESSAGE, payload
        return self._next_general(start, stop, end, view)

    def _incomplete(self) -> None:
        """Bound the descriptors that wait for the rest of their frame.

        They arrived with the frame's first byte, so they are at most one
        frame's worth (``max_fds``), and charged to the shared budget.

        Raises:
            ProtocolError: more wait than one frame may carry, or the budget
                is spent; the decoder is broken and every descriptor closed.
        """
        waiting = len(self._fds)
        if waiting > self._limits.max_fds:
            raise self._fail(
                ProtocolError(
                    f"the peer sent {waiting} descriptors for frames it has not finished, over "
                    f"the limit of {self._limits.max_fds} per frame; they were closed"
                )
            )
        budget = self._budget
        if budget is not None and waiting > self._charged:
            if not budget.take(waiting - self._charged):
                raise self._fail(
                    ProtocolError(
                        "this process holds as many descriptors waiting for unfinished frames "
                        f"as it allows; the peer's {waiting} were closed"
                    )
                )
            self._charged = waiting

    def _release(self) -> None:
        """Give the charged descriptors back to the budget: their frame is decoded (or closed)."""
        if self._budget is not None:
            self._budget.give(self._charged)
        self._charged = 0

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
                self.view[HEADER_SIZE:end], strict_map_key=False, ext_hook=self._hook
            )[2]
        except ValueError:
            return None
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

    def _unpack_general(self, view: memoryview, hook: Any) -> Any:
        """Decode with every option; placeholders resolve only in frames that carry descriptors."""
        self._used = []
        return _unpackb(view, strict_map_key=False, ext_hook=hook or any_ext, **self._options)

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
        self.reserve_buffer(fresh=True)
        self._oversized = False
        self._gate_fast_path()

    def _check_frame(self, offset: int, kind: Any, nfds: Any, payload: Any) -> tuple[int, Any]:
        used = self._used
        problem = _head_problem(offset, kind, nfds, len(self._fds), used, self._limits.max_fds)
        if problem is not None:
            raise self._fail(ProtocolError(problem))
        popleft = self._fds.popleft
        taken = [popleft() for _ in range(nfds)]
        if self._charged:
            self._release()  # what still waits is charged again if its frame is unfinished
        if len(used) < nfds or len(set(used)) < nfds:
            _close_unmentioned(taken, used)
        return kind, payload

    def close(self) -> None:
        """Close every descriptor received and not yet handed out in a frame."""
        while self._fds:
            self._fds.popleft().close()
        if self._charged:
            self._release()


def _other_ext(fds: deque[Descriptor], used: list[int], code: int, data: bytes) -> object:
    """Other extension types, wide placeholders, and placeholders that point nowhere."""
    if code != FD_EXT_CODE:
        return any_ext(code, data)
    if not 1 <= len(data) <= 4:
        raise ValueError(f"a descriptor placeholder of {len(data)} bytes; it takes 1 to 4")
    index = int.from_bytes(data, "big")
    if index >= len(fds):
        raise ValueError(f"descriptor placeholder {index} refers to no descriptor received")
    used.append(index)
    return fds[index]


def _head_problem(
    offset: int, kind: Any, nfds: Any, arrived: int, used: list[int], max_fds: int
) -> str | None:
    """What is wrong with a decoded frame's kind and descriptor count, or None."""
    # Kinds this side does not know still decode: the layer above answers
    # them (see RESERVED_KINDS), so that a newer peer keeps its connection.
    if type(kind) is not int or not 0 <= kind <= MAX_KIND:
        return (
            f"frame at stream offset {offset}: frame kind {kind!r} is not an integer "
            f"from 0 to {MAX_KIND}; the peer is not speaking passrpc"
        )
    if type(nfds) is not int or not 0 <= nfds <= max_fds:
        return (
            f"frame at stream offset {offset}: descriptor count {nfds!r} is not an "
            f"integer from 0 to {max_fds}"
        )
    if nfds > arrived:
        return (
            f"frame at stream offset {offset} claims {nfds} descriptors but only "
            f"{arrived} arrived with it"
        )
    if used and max(used) >= nfds:
        return (
            f"frame at stream offset {offset} refers to descriptor {max(used)} "
            f"but carries only {nfds}"
        )
    return None


def _close_unmentioned(taken: list[Descriptor], used: list[int]) -> None:
    """Close a frame's descriptors that its payload does not mention: nobody else could."""
    mentioned = set(used)
    for index, fd in enumerate(taken):
        if index not in mentioned:
            fd.close()
