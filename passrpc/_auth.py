"""Authentication over a connection: the handshake's blocking drivers, peer checks, connecting.

The handshake's steps and every decision in them are pure
(:mod:`passrpc._handshake`); this module moves them over a :class:`Channel`
and checks the peer's uid from ``SO_PEERCRED``. Connecting (with back-off
while a server's listen backlog is full) is here too, shared with the
asyncio client, which differs only in how it waits.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import time
from collections.abc import Callable, Collection, Iterator

from ._channel import Channel, Peer
from ._errors import AuthenticationError, ConfigurationError, ConnectionClosed, Timeout
from ._handshake import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    HANDSHAKE_MAX_FRAME,
    ClientHandshake,
    ServerHandshake,
    client_proof,
    handshake_payload,
    refusal,
)
from ._protocol import HANDSHAKE
from ._wire import DEFAULT_WIRE, WireOptions


def check_uid(peer: Peer, allowed: Collection[int], who: str) -> None:
    """Raise AuthenticationError unless ``peer.uid`` is allowed."""
    if peer.uid not in allowed:
        raise AuthenticationError(
            f"the {who} runs as uid {peer.uid}, which is not allowed here "
            f"(allowed: {sorted(allowed)}); run it as the same user, or allow that uid"
        )


def default_uids() -> frozenset[int]:
    """Our own uid and root: whom either side talks to unless told otherwise."""
    return frozenset({os.getuid(), 0})


def check_server_uid(peer: Peer, server_uids: Collection[int] | None) -> None:
    """Raise AuthenticationError unless the server ``peer`` runs as one of ``server_uids``.

    None means :func:`default_uids` (ours or root).
    """
    check_uid(peer, default_uids() if server_uids is None else server_uids, "server")


def _expect(channel: Channel, deadline: float | None = None, *, from_server: bool) -> object:
    if deadline is not None and deadline <= time.monotonic():
        raise Timeout("the handshake took longer than its time bound")
    return handshake_payload(*channel.receive_frame(deadline), from_server=from_server)


def server_handshake(
    channel: Channel,
    key: bytes,
    allowed_uids: Collection[int],
    timeout: float | None = DEFAULT_HANDSHAKE_TIMEOUT,
    peer: Peer | None = None,
) -> Peer:
    """Run the server's side on a freshly accepted channel and return the peer.

    ``timeout`` bounds the whole handshake, however slowly the client
    trickles its bytes in. On refusal the client gets an ERROR frame saying
    why (as far as that does not help an attacker) before the exception
    reaches the caller. ``peer`` saves asking the kernel again when the
    caller already has it.

    Raises:
        AuthenticationError, ProtocolError, ConnectionClosed, Timeout.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    if peer is None:
        peer = channel.peer
    try:
        check_uid(peer, allowed_uids, "client")
        steps = ServerHandshake(key)
        # Until the client has proved it knows the password it may not make
        # this process set aside (or decode) more than a handshake frame.
        channel.cap_frame_size(HANDSHAKE_MAX_FRAME)
        hello = _expect(channel, deadline, from_server=False)
        channel.send_frame(HANDSHAKE, steps.challenge(hello))
        # The client may send its first request, descriptors and all, right
        # behind its proof: those are taken, but only once the proof is whole.
        channel.cap_frame_size(HANDSHAKE_MAX_FRAME, last_step=True)
        if deadline is not None and deadline <= time.monotonic():
            raise Timeout("the handshake took longer than its time bound")
        steps.verify(client_proof(*channel.receive_frame(deadline)))
        channel.cap_frame_size(None)
    except AuthenticationError as exc:
        try:
            channel.send_frame(*refusal(exc))
        except (ConnectionClosed, Timeout):
            pass
        raise
    except Timeout as exc:  # the channel's message names what was left of the bound
        raise Timeout(f"the client did not finish the handshake within {timeout} s") from exc
    return peer


def client_handshake(
    channel: Channel, key: bytes, allowed_uids: Collection[int] | None = None
) -> Peer:
    """Run the client's side on a freshly connected channel and return the server's credentials.

    ``allowed_uids`` are the uids the server may run as; None means ours
    or root. (The asyncio client drives the same steps in the same order:
    ``passrpc._aiochannel.open_async_channel``.)

    Raises:
        AuthenticationError, ProtocolError, ConnectionClosed, Timeout.
    """
    peer = channel.peer
    check_server_uid(peer, allowed_uids)
    steps = ClientHandshake(key)
    channel.cap_frame_size(HANDSHAKE_MAX_FRAME)  # nor a server that has not proved it
    try:
        channel.send_frame(HANDSHAKE, steps.hello())
    except ConnectionClosed:
        # A server that refuses us (our uid) says why and closes at once, maybe
        # before our hello left: its reason is still waiting to be read.
        _expect(channel, from_server=True)
        raise
    challenge = _expect(channel, from_server=True)
    try:
        answer = steps.answer(challenge)
    except AuthenticationError as exc:
        tell_server(channel, exc)
        raise
    channel.cap_frame_size(None)
    channel.send_frame(HANDSHAKE, answer)
    return peer


def tell_server(channel: Channel, exc: AuthenticationError) -> None:
    """Tell a server whose proof failed why this client hangs up (the server logs it)."""
    with contextlib.suppress(ConnectionClosed, Timeout):
        channel.send_frame(*refusal(exc))


#: The file beside a socket that ``python -m passrpc serve`` writes the password to.
PASSWORD_SUFFIX = ".password"  # noqa: S105 (a file name suffix)


def read_password_file(path: str, *, ours: bool = False, private: bool = False) -> bytes:
    """Return the password stored in ``path``: its bytes without one trailing newline.

    Only a regular file is read (a FIFO planted there would hang us), never
    through a symlink; with ``ours``, only a file of this user's; with
    ``private``, only one nobody else may read or write (mode 0600 or
    stricter), as ``serve`` writes it.

    Raises:
        ConfigurationError: it cannot be read, or is not such a file, or is empty.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigurationError(f"cannot read the password file {path!r}: {exc.strerror}") from exc
    with os.fdopen(fd, "rb") as file:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or ((ours or private) and st.st_uid != os.getuid()):
            raise ConfigurationError(
                f"{path!r} is not a password file of yours (a regular file owned by you)"
            )
        if private and st.st_mode & 0o077:
            raise ConfigurationError(
                f"the password file {path!r} has mode {stat.S_IMODE(st.st_mode):04o}, readable "
                "or writable by others: passrpc reads it only at 0600 (chmod 600 it)"
            )
        data = file.read()
    if data.endswith(b"\n"):
        data = data[:-1]
        if data.endswith(b"\r"):
            data = data[:-1]
    if not data:
        raise ConfigurationError(f"the password file {path!r} is empty")
    return data


def find_password(
    socket_path: str, password: str | bytes | None, password_file: str | os.PathLike[str] | None
) -> str | bytes:
    """The password to use: ``password``, else ``password_file``'s, else the file beside the socket.

    The file beside the socket (``SOCKET.password``, as ``python -m passrpc
    serve`` writes it) is read only if it is a regular file of this user with
    mode 0600.

    Raises:
        ConfigurationError: both were given, or a file cannot be used (the
            message says why and what to do).
    """
    if password is not None:
        if password_file is not None:
            raise ConfigurationError("give password= or password_file=, not both")
        return password
    if password_file is not None:
        return read_password_file(os.fspath(password_file))
    beside = socket_path + PASSWORD_SUFFIX
    if not os.path.lexists(beside):
        raise ConfigurationError(
            f"no password given, and there is no {beside!r}: pass password= or "
            "password_file=, or serve with 'python -m passrpc serve', which writes that file"
        )
    return read_password_file(beside, private=True)


#: errno values of a connect that may succeed if tried again shortly: the
#: listen backlog is full (EAGAIN on Linux AF_UNIX), or the call was interrupted.
_RETRY_CONNECT = frozenset({errno.EAGAIN, errno.EINTR})

#: Backoff while a server's listen backlog is full (the kernel offers no event
#: for "a slot is free"): start small, as the backlog usually drains in
#: microseconds, and double up to a cap, so a waiting client notices a free
#: slot within 50 ms without spinning.
_CONNECT_FIRST_DELAY = 0.0005
_CONNECT_MAX_DELAY = 0.05


def connect_once(path: str) -> socket.socket | None:
    """Try once to connect a non-blocking socket to ``path``.

    Returns the connected socket (non-blocking), or None when the listen
    backlog is full or the call was interrupted: wait the next of
    :func:`backoff`'s delays and try again. Shared by the sync and asyncio
    clients, which differ only in how they wait.

    Raises:
        ConnectionClosed: nobody listens at ``path`` (the cause says why).
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)  # a full backlog answers EAGAIN instead of blocking
        sock.connect(path)
    except OSError as exc:
        sock.close()
        if exc.errno in _RETRY_CONNECT:
            return None
        raise ConnectionClosed(
            f"cannot connect to the passrpc server at {path!r}: {exc.strerror}; "
            "is it running, and is this its socket path?"
        ) from exc
    return sock


def backoff(path: str, deadline: float | None, clock: Callable[[], float]) -> Iterator[float]:
    """Yield the seconds to wait before each new attempt to connect to ``path``.

    ``deadline`` is on ``clock`` (``time.monotonic``, or the event loop's time).

    Raises:
        Timeout: the next wait would end past ``deadline``.
    """
    delay = _CONNECT_FIRST_DELAY
    while True:
        if deadline is not None and clock() + delay > deadline:
            raise Timeout(
                f"the server at {path!r} kept its listen backlog full until the timeout: "
                "it is overloaded; try again later, or allow a longer timeout"
            )
        yield delay
        delay = min(delay * 2, _CONNECT_MAX_DELAY)


def open_channel(
    path: str,
    key: bytes,
    *,
    timeout: float | None = None,
    wire: WireOptions = DEFAULT_WIRE,
    server_uids: Collection[int] | None = None,
) -> Channel:
    """Connect to the server at ``path``, authenticate, and return the channel.

    ``timeout`` bounds connecting and the handshake together, and is then
    left on the channel for every later read and write. ``server_uids`` are
    the uids the server may run as (None: ours or root).

    Raises:
        ConnectionClosed: nobody listens at ``path`` (the cause says why).
        AuthenticationError: wrong password, or a server of another user.
        Timeout: the server did not answer in time.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    waits = backoff(path, deadline, time.monotonic)
    while (sock := connect_once(path)) is None:
        time.sleep(next(waits))  # backlog full: back off briefly, as the kernel gives no event
    channel = Channel(sock, timeout=timeout, wire=wire)
    try:
        if deadline is not None:
            channel.timeout = max(deadline - time.monotonic(), 0.001)
        client_handshake(channel, key, server_uids)
        channel.timeout = timeout
    except BaseException:
        channel.close()
        raise
    return channel
