"""What the stress scripts share: the protocol by hand, and a server watched from outside.

An attacker does not use passrpc's client, so the attacks speak the wire
protocol themselves (docs/protocol.md, sections 2 and 8) over raw Unix
sockets. The server under attack is a real ``passrpc.Server`` started in a
forked process; its descriptor count and memory are read from ``/proc``, its
log from a file its ``passrpc`` logger writes to.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import secrets
import select
import shutil
import socket
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack

import passrpc

PASSWORD = "stress-test"

#: Frame kinds (docs/protocol.md section 2).
MESSAGE, ERROR, HANDSHAKE = 0, 1, 2

_HEADER = struct.Struct(">I")


# Frames by hand -----------------------------------------------------------------


def frame(kind: int, nfds: int, payload: Any) -> bytes:
    """One frame: a big-endian uint32 length, then msgpack ``[kind, nfds, payload]``."""
    body = msgpack.packb([kind, nfds, payload], use_bin_type=True)
    return _HEADER.pack(len(body)) + body


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    """Read ``size`` bytes; EOFError if the peer closes first."""
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError(f"the peer closed after {len(data)} of {size} bytes")
        data += chunk
    return bytes(data)


def read_frame(sock: socket.socket) -> tuple[int, int, Any]:
    """Read one frame; return ``(kind, nfds, payload)``."""
    (length,) = _HEADER.unpack(recv_exactly(sock, 4))
    kind, nfds, payload = msgpack.unpackb(recv_exactly(sock, length), raw=False)
    return kind, nfds, payload


def hello_frame(challenge: bytes | None = None) -> bytes:
    """Step 1 of the handshake."""
    challenge = secrets.token_bytes(32) if challenge is None else challenge
    return frame(HANDSHAKE, 0, {"step": "hello", "version": 1, "challenge": challenge})


def proof_frame(password: str, ours: bytes, answer: Any, *, wrong: bool = False) -> bytes:
    """Step 3: the client's proof for the server's step-2 ``answer`` (or a wrong one)."""
    key = (password + "x" if wrong else password).encode()
    proof = hmac.digest(key, b"passrpc client\x00" + answer["challenge"] + ours, "sha256")
    return frame(HANDSHAKE, 0, {"step": "proof", "proof": proof})


def connect(path: str, timeout: float = 10.0) -> socket.socket:
    """A raw socket connected to the server."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(path)
    return sock


def authenticated(path: str, password: str = PASSWORD) -> socket.socket:
    """A raw socket through the documented handshake, by hand, ready for requests."""
    sock = connect(path)
    ours = secrets.token_bytes(32)
    sock.sendall(hello_frame(ours))
    _, _, answer = read_frame(sock)
    sock.sendall(proof_frame(password, ours, answer))
    return sock


def send_piece(sock: socket.socket, data: bytes, fds: list[int]) -> str | None:
    """Send ``data`` with ``fds`` attached; None if the kernel took it, else why not."""
    try:
        socket.send_fds(sock, [data], fds, socket.MSG_NOSIGNAL)
    except OSError as exc:
        return type(exc).__name__
    return None


def closed_by_peer(sock: socket.socket, timeout: float) -> str | None:
    """Wait up to ``timeout`` s for the peer to end the connection: "EOF", "ECONNRESET" or None.

    Anything the peer sent before it closed is read and dropped.
    """
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        ready, _, _ = select.select([sock], [], [], left)
        if not ready:
            return None
        try:
            data = sock.recv(65536, socket.MSG_DONTWAIT)
        except BlockingIOError:
            continue
        except ConnectionResetError:
            return "ECONNRESET"
        if not data:
            return "EOF"


# The server, watched from outside ----------------------------------------------------


def fd_count(pid: int) -> int:
    """How many descriptors process ``pid`` has open now."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def thread_count(pid: int) -> int:
    """How many threads process ``pid`` runs now."""
    return len(os.listdir(f"/proc/{pid}/task"))


def memory(pid: int) -> dict[str, int]:
    """VmRSS (resident now) and VmHWM (its peak since the process started), in KiB."""
    figures = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                figures[name] = int(value.split()[0])
    return figures


def mib(kib: int) -> str:
    return f"{kib / 1024:,.1f} MiB"


def settle(pid: int, target: int, timeout: float = 2.0) -> int:
    """Wait up to ``timeout`` s for the fd count of ``pid`` to fall to ``target``; return it."""
    deadline = time.monotonic() + timeout
    count = fd_count(pid)
    while count > target and time.monotonic() < deadline:
        time.sleep(0.01)
        count = fd_count(pid)
    return count


class Unprintable(Exception):
    """An exception whose ``str()`` raises."""

    def __str__(self) -> str:
        raise RuntimeError("no text for you")


class HugeFd:
    """An object whose ``fileno()`` is over a C int: it cannot travel as a descriptor."""

    def fileno(self) -> int:
        return 2**31


def _exits() -> None:
    raise SystemExit(3)


def _unprintable() -> None:
    raise Unprintable


def _long_message(size: int) -> None:
    raise ValueError("m" * size)


def _takes(*values: Any) -> int:
    return len(values)


def add_handlers(server: passrpc.Server) -> None:
    """The handlers every attack finds on the server."""
    server.add_handler("ok", _takes)
    server.add_handler("echo", lambda value: value)
    server.add_handler("exits", _exits)
    server.add_handler("unprintable", _unprintable)
    server.add_handler("huge_fd", HugeFd)
    server.add_handler("long_message", _long_message)
    server.add_handler("ext127", lambda: msgpack.ExtType(127, b"x"))


@contextlib.contextmanager
def attacked_server(
    initialize: Callable[[], Any] | None = None, **options: Any
) -> Iterator[tuple[passrpc.Server, Path]]:
    """Start a real server (forked) with :func:`add_handlers`; yield it and its log file.

    ``initialize`` runs in the server process before it accepts clients
    (``on_initialize_server``); ``options`` go to ``passrpc.Server``.

    The server's ``passrpc`` logger writes INFO and above to the log file
    (a server keeps the descriptors of configured logging handlers). On exit
    the server is stopped and reaped, and its socket, directory and the log
    are removed.
    """
    tmp = Path(tempfile.mkdtemp(prefix="passrpc-stress-"))
    log = tmp / "server.log"
    logger = logging.getLogger("passrpc")
    handler = logging.FileHandler(log)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    previous, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    server = passrpc.Server(password=PASSWORD, **options)
    add_handlers(server)
    if initialize is not None:
        server.on_initialize_server(initialize)
    # The server process writes its stderr to a file of ours, read at the end.
    errors = tmp / "server.stderr"
    saved = os.dup(2)
    try:
        with open(errors, "wb") as err:
            os.dup2(err.fileno(), 2)
            try:
                server.start()
            finally:
                os.dup2(saved, 2)
        yield server, log
    finally:
        if server.started:
            server.stop()
        os.close(saved)
        text = errors.read_text(errors="replace") if errors.exists() else ""
        if text:
            print(
                f"   server stderr: {len(text.splitlines())} line(s), "
                f"{text.count('--- Logging error ---')} of them 'Logging error' reports"
            )
        logger.removeHandler(handler)
        logger.setLevel(previous)
        logger.propagate = propagate
        handler.close()
        shutil.rmtree(tmp, ignore_errors=True)


def log_lines(log: Path, *needles: str) -> list[str]:
    """The server's log lines that contain any of ``needles``.

    A server logs a refusal just after it closed the connection: wait a
    little for the last lines.
    """
    time.sleep(0.2)
    with contextlib.suppress(FileNotFoundError):
        return [
            line.rstrip("\n")
            for line in log.read_text().splitlines()
            if any(needle in line for needle in needles)
        ]
    return []


def shorten(text: str, width: int = 150) -> str:
    return text if len(text) <= width else text[: width - 5] + "[...]"
