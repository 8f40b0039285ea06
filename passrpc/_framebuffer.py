"""The receive buffer: bytes and descriptors that wait until their frame is whole.

Pure, like the rest of the codec: a channel reads straight into the buffer
(:meth:`FrameBuffer.get_buffer`, :meth:`FrameBuffer.buffer_updated`), and the
:class:`~passrpc._decoder.Decoder` built on it takes whole frames out. This
part decides what a peer can make this process hold before a frame is whole:
memory that grows with the bytes that arrived (never with what a header
announces), and descriptors bounded three ways (none before the peer has
authenticated, one frame's worth per connection, and a budget shared by all
of a server's connections).
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Iterable
from typing import Protocol

from ._errors import FrameTooLarge, ProtocolError
from ._wire import DEFAULT_LIMITS, HEADER_SIZE, Limits

_HEADER = struct.Struct(">I")

#: Receive buffer a decoder starts with: one read takes in many small frames.
INITIAL_BUFFER = 16 * 1024

#: The first step a receive buffer grows by for a large frame; after it, it
#: doubles (see Decoder.get_buffer).
_GROWTH_STEP = 1024 * 1024

#: A buffer grown for a large frame is kept up to this size, so that repeated
#: large messages reuse memory instead of faulting in fresh pages each time
#: (see docs/performance.md); a larger one is dropped once its frame is read.
_RETAIN_BUFFER = 16 * 1024 * 1024


class Descriptor(Protocol):
    """What the decoder needs of a received descriptor object: it can close it."""

    def close(self) -> None: ...


class Budget(Protocol):
    """A count shared by many decoders: descriptors waiting for their frame, process-wide."""

    def take(self, count: int) -> bool: ...
    def give(self, count: int) -> None: ...


class FrameBuffer:
    """Where received bytes and descriptors wait for the rest of their frame.

    The base of :class:`~passrpc._decoder.Decoder`; it owns every
    descriptor handed in until a frame claims it, and :meth:`close` closes
    the rest. Not thread-safe.
    """

    def __init__(self) -> None:
        self._buf = bytearray(INITIAL_BUFFER)
        #: The buffer, as a view. Channel.receive_frame reads ``view`` and
        #: ``end`` on every message (a method call would cost more than the
        #: rest of its check): ``end`` is 0 exactly when nothing is buffered,
        #: and ``view`` is then the whole buffer to read into. Keep that true.
        self.view = memoryview(self._buf)
        self._start = 0  # first byte not yet consumed
        self.end = 0  # end of the bytes received
        self._offset = 0  # stream offset of self._start, for error messages
        self._fds: deque[Descriptor] = deque()
        self._broken: ProtocolError | None = None
        self._oversized = False  # the buffer outgrew _RETAIN_BUFFER for one frame
        self._refuse_fds = False  # until the peer authenticates (Decoder.cap_frame_size)
        self._fds_after_frame = False
        self._budget: Budget | None = None
        self._charged = 0  # descriptors charged to the budget, all waiting now
        # Set by the decoder (Decoder._configure): the frame size in force,
        # the limits, and the largest body the decoder's fast path takes.
        self._max_frame = 0
        self._fast_max = -1
        self._limits: Limits = DEFAULT_LIMITS

    def share_budget(self, budget: Budget | None) -> None:
        """Charge descriptors that wait for the rest of their frame to ``budget`` (see :class:`Budget`).

        A server gives every connection's decoder one budget, so that many
        connections together cannot fill its descriptor table with frames
        they never finish.
        """
        self._budget = budget

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
        size = max(pending + need, INITIAL_BUFFER)
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
        """Let go of the buffer while it holds nothing (a connection parked idle).

        Call :meth:`reserve_buffer` before reading into :attr:`view` again
        (:meth:`get_buffer` does it by itself).
        """
        if self.end == 0:
            self._buf = bytearray()
            self.view = memoryview(self._buf)

    def reserve_buffer(self) -> None:
        """Make a receive buffer again after :meth:`release_buffer`."""
        if not self._buf:
            self._buf = bytearray(INITIAL_BUFFER)
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

    def close(self) -> None:
        """Close every descriptor received and not yet handed out in a frame."""
        while self._fds:
            self._fds.popleft().close()
        if self._charged:
            self._release()
