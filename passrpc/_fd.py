"""FileDescriptor: a received descriptor that owns its number until claimed."""

from __future__ import annotations

import os
import socket
from types import TracebackType
from typing import IO, Any


class FileDescriptor:
    """A file descriptor received in a message, owned until you claim it.

    Received descriptors come back as ``FileDescriptor`` objects. Use
    ``fileno()`` to look at the number while the object keeps it, ``detach()``
    to take the number over yourself, or ``open()`` / ``socket()`` to turn it
    into a file or socket object that then owns it. ``close()`` (or leaving a
    ``with`` block, or garbage collection) closes a descriptor nobody claimed.
    You can also wrap a descriptor of your own to send it; sending never closes
    it, and the peer gets its own copy.
    """

    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        if not isinstance(fd, int) or fd < 0:
            raise ValueError(f"a file descriptor is a non-negative int, got {fd!r}")
        self._fd = fd

    @classmethod
    def _adopt(cls, fd: int) -> FileDescriptor:
        """Own ``fd``, a number fresh from the kernel: no checks, for the receive path."""
        self = cls.__new__(cls)
        self._fd = fd
        return self

    @property
    def closed(self) -> bool:
        """True once the descriptor was closed or detached."""
        return self._fd < 0

    def fileno(self) -> int:
        """Return the descriptor number; the object still owns it.

        Raises:
            ValueError: the descriptor was closed or detached.
        """
        if self._fd < 0:
            raise ValueError("this FileDescriptor was closed or detached")
        return self._fd

    def detach(self) -> int:
        """Give up ownership and return the number; closing it is now yours to do."""
        fd = self.fileno()
        self._fd = -1
        return fd

    def close(self) -> None:
        """Close the descriptor unless it was detached; closing twice is harmless."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def open(self, mode: str = "rb", buffering: int = -1, **kwargs: Any) -> IO[Any]:
        """Return a file object that owns the descriptor (see :func:`open`)."""
        return os.fdopen(self.detach(), mode, buffering, **kwargs)

    def socket(self) -> socket.socket:
        """Return a socket object that owns the descriptor; family and type are detected."""
        return socket.socket(fileno=self.detach())

    def __enter__(self) -> FileDescriptor:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        if self._fd >= 0:
            try:
                self.close()
            except OSError:
                pass

    def __repr__(self) -> str:
        state = "closed" if self._fd < 0 else f"fd={self._fd}"
        return f"<passrpc.FileDescriptor {state}>"
