"""Helpers shared by the test modules: waiting with deadlines, gates, logs, frames by hand.

Only the public API of passrpc is used here (and raw sockets and msgpack
where a test speaks the wire protocol itself, as docs/protocol.md lays it
out), so the package's modules can move without this file changing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack

import passrpc

#: Seconds a test waits for an event before it fails: far above what a healthy
#: run needs, far below the global pytest-timeout.
WAIT = 10.0

#: The repository's root, for subprocesses that import passrpc and the tests.
REPO = Path(__file__).resolve().parent.parent

#: Frame kinds, as docs/protocol.md section 2 numbers them
#: (tests/test_protocol_doc.py checks the document against the code).
MESSAGE, ERROR, HANDSHAKE, CALL, DESCRIBE = 0, 1, 2, 3, 4


def wait_for(predicate: Callable[[], object], *, what: str, timeout: float = WAIT) -> None:
    """Poll ``predicate`` until it returns something true; fail naming ``what`` after ``timeout`` s.

    The predicate may itself raise (an assertion, pytest.fail) to stop the
    wait early, for instance when a process it waits on has exited.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)  # short: most events come within milliseconds


def wait_while_running(
    predicate: Callable[[], object],
    process: subprocess.Popen[str],
    *,
    what: str,
    timeout: float = WAIT,
) -> None:
    """:func:`wait_for`, but fail at once, with its stderr, if ``process`` exits first."""

    def holds() -> object:
        if predicate():
            return True
        if process.poll() is not None:
            _, err = process.communicate()
            raise AssertionError(f"the process exited ({process.returncode}) before {what}: {err}")
        return False

    wait_for(holds, what=what, timeout=timeout)


def pid_gone(pid: int) -> bool:
    """True once ``pid`` no longer runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def blocked_on(thread: threading.Thread, fd: int) -> bool:
    """True while ``thread`` sleeps in a system call whose first argument is ``fd``.

    That is the thread blocked in its ``recvmsg``/``sendmsg`` on that
    descriptor, as the kernel reports it in /proc: a test can wait for it
    instead of sleeping and hoping the thread got there.
    """
    assert thread.native_id is not None, "the thread has not started"
    try:
        with open(f"/proc/self/task/{thread.native_id}/syscall") as f:
            fields = f.read().split()
    except FileNotFoundError:
        raise AssertionError(f"{thread.name} ended instead of blocking") from None
    # "running", or "-1 ..." outside a system call, or "NR ARG1 ... SP PC" in hex.
    return len(fields) > 2 and fields[0] != "-1" and int(fields[1], 16) == fd


class Gate:
    """Holds a handler mid-call, and tells the test when the call got there.

    Pass ``*gate.args()`` (two socket ends) to a handler: they travel with the
    call as descriptors, so this works whatever the server process closed
    when it started. In the handler (where they arrive as FileDescriptors)
    call ``Gate.hold(started, release)``, or ``Gate.reached(started)`` to
    only say the call arrived. The test waits with ``wait_started_blocking()``
    (or ``await wait_started()``) and lets the handler go on with
    ``let_go()``; ``close()`` also lets it go (it reads end of file).
    """

    def __init__(self) -> None:
        self.started, self._started_far = socket.socketpair()
        self.release, self._release_far = socket.socketpair()
        self.started.setblocking(False)

    def args(self) -> tuple[socket.socket, socket.socket]:
        """The ends to pass to the handler: ``started`` first, then ``release``."""
        return self._started_far, self._release_far

    @staticmethod
    def reached(started: passrpc.FileDescriptor) -> None:
        """In the handler: say the call arrived."""
        with started.socket() as s:
            s.sendall(b"s")

    @staticmethod
    def hold(started: passrpc.FileDescriptor, release: passrpc.FileDescriptor) -> None:
        """In the handler: say the call arrived, then wait until the test lets go."""
        Gate.reached(started)
        with release.socket() as r:
            r.recv(1)

    async def wait_started(self) -> None:
        """Wait (in asyncio) until the handler said it started; fail after WAIT s."""
        loop = asyncio.get_running_loop()
        data = await asyncio.wait_for(loop.sock_recv(self.started, 1), WAIT)
        assert data == b"s"

    def wait_started_blocking(self, timeout: float = WAIT) -> None:
        """Wait until the handler said it started; fail after ``timeout`` s."""
        ready, _, _ = select.select([self.started], [], [], timeout)
        assert ready, f"the call did not reach the handler within {timeout} s"
        assert self.started.recv(1) == b"s"

    def let_go(self) -> None:
        """Let a held handler go on."""
        self.release.sendall(b"r")

    def close(self) -> None:
        """Close every end; a handler still waiting sees end of file and returns."""
        for sock in (self.started, self._started_far, self.release, self._release_far):
            sock.close()


@contextlib.contextmanager
def server_log(path: Path, level: int = logging.INFO) -> Iterator[Path]:
    """Write the ``passrpc`` logger's records to the file ``path`` during the block.

    A server started inside the block keeps the handler's descriptor (it
    keeps those of configured logging handlers), so its process logs there
    too; each record is flushed as it is written.
    """
    logger = logging.getLogger("passrpc")
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(level)  # the root's WARNING would drop the server's INFO records
    try:
        yield path
    finally:
        logger.setLevel(previous)
        logger.removeHandler(handler)
        handler.close()


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a CLI subprocess: the repo importable, no inherited passrpc settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PASSRPC_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


# Frames by hand (docs/protocol.md section 2), for tests that speak the wire
# protocol themselves instead of through passrpc's codec.


def frame(kind: int, nfds: int, payload: Any) -> bytes:
    """One frame: the body's length as a big-endian uint32, then msgpack ``[kind, nfds, payload]``."""
    body = msgpack.packb([kind, nfds, payload], use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    """Read exactly ``size`` bytes; AssertionError if the peer closes first."""
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, f"the peer closed after {len(data)} of {size} bytes"
        data += chunk
    return data


def read_frame(sock: socket.socket) -> tuple[int, int, Any]:
    """Read one frame and return ``(kind, nfds, payload)``, unpacked as docs/protocol.md says."""
    (size,) = struct.unpack(">I", recv_exactly(sock, 4))
    body = msgpack.unpackb(recv_exactly(sock, size), raw=False, strict_map_key=False)
    kind, nfds, payload = body
    return kind, nfds, payload


def read_until_closed(sock: socket.socket) -> bytes:
    """Read until the peer closes; return every byte that came before.

    A peer that closes with bytes of ours still unread makes Linux report
    ECONNRESET instead of end of file: that is a close too.
    """
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk
