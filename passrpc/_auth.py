"""Authentication: the mutual handshake that opens every connection.

The password never crosses the socket. Each side proves it knows the password
by an HMAC-SHA256 over both sides' fresh random challenges, under a label that
differs by direction so one side's proof can never be replayed as the other's:

1. client -> server  HANDSHAKE {"step": "hello", "version": V, "challenge": C}
2. server -> client  HANDSHAKE {"step": "challenge", "version": V, "challenge": S,
                                "proof": HMAC(key, b"passrpc server\0" + C + S)}
3. client -> server  HANDSHAKE {"step": "proof", "proof": HMAC(key, b"passrpc client\0" + S + C)}

The client checks the server's proof before it sends its own, so a wrong
password (or a stranger's socket) fails on the client at once, and the client
may send its first request right behind step 3. A server that refuses the
client (a wrong proof, a uid it does not allow, another protocol version)
answers with an ERROR frame of code "authentication" and closes. Both sides
also check the peer's uid from ``SO_PEERCRED``.

The steps are pure functions over payloads; the drivers at the bottom move
them over a :class:`Channel` (the asyncio client drives the same steps).
"""

from __future__ import annotations

import errno
import hmac
import os
import secrets
import socket
import time
from collections.abc import Callable, Collection, Iterator
from typing import Any

from ._channel import Channel, Peer
from ._errors import AuthenticationError, ConnectionClosed, ProtocolError, Timeout
from ._wire import (
    DEFAULT_LIMITS,
    ERROR_AUTHENTICATION,
    PROTOCOL_VERSION,
    Kind,
    Limits,
    brief,
    error_from_payload,
    error_payload,
)

_CHALLENGE_SIZE = 32
_SERVER_LABEL = b"passrpc server\x00"
_CLIENT_LABEL = b"passrpc client\x00"
_HANDSHAKE = int(Kind.HANDSHAKE)
_ERROR = int(Kind.ERROR)

#: The largest frame either side takes before the peer has proved it knows the
#: password: a handshake frame is under 200 bytes, and this leaves room.
HANDSHAKE_MAX_FRAME = 4096

#: Seconds a client may take over the whole handshake before the server drops it:
#: ample for a local peer, short enough that silent clients cannot pile up.
DEFAULT_HANDSHAKE_TIMEOUT = 5.0


def password_key(password: str | bytes) -> bytes:
    """Return the HMAC key for ``password`` (UTF-8 for a str)."""
    return password.encode() if isinstance(password, str) else bytes(password)


def _mac(key: bytes, label: bytes, first: bytes, second: bytes) -> bytes:
    return hmac.digest(key, label + first + second, "sha256")


def _field(payload: Any, step: str, name: str) -> bytes:
    if not isinstance(payload, dict) or payload.get("step") != step:
        raise ProtocolError(f"handshake: expected step {step!r}, got {brief(payload)}")
    value = payload.get(name)
    if not isinstance(value, bytes) or len(value) != _CHALLENGE_SIZE:
        raise ProtocolError(f"handshake: {step!r} needs a {_CHALLENGE_SIZE}-byte {name!r}")
    return value


class ClientHandshake:
    """The client's side of the handshake, as pure steps."""

    def __init__(self, key: bytes) -> None:
        self._key = key
        self._challenge = secrets.token_bytes(_CHALLENGE_SIZE)

    def hello(self) -> dict[str, Any]:
        """Step 1: the payload to send first."""
        return {"step": "hello", "version": PROTOCOL_VERSION, "challenge": self._challenge}

    def answer(self, payload: Any) -> dict[str, Any]:
        """Step 3: check the server's step-2 payload and return the client's proof.

        Raises:
            AuthenticationError: the server's proof is wrong (another password).
            ProtocolError: the payload is not a step-2 payload.
        """
        server_challenge = _field(payload, "challenge", "challenge")
        proof = _field(payload, "challenge", "proof")
        expected = _mac(self._key, _SERVER_LABEL, self._challenge, server_challenge)
        if not hmac.compare_digest(proof, expected):
            raise AuthenticationError(
                "the server could not prove it knows the password: client and server "
                "use different passwords, or the socket belongs to another server"
            )
        return {
            "step": "proof",
            "proof": _mac(self._key, _CLIENT_LABEL, server_challenge, self._challenge),
        }


class ServerHandshake:
    """The server's side of the handshake, as pure steps."""

    def __init__(self, key: bytes) -> None:
        self._key = key
        self._challenge = secrets.token_bytes(_CHALLENGE_SIZE)
        self._client_challenge = b""

    def challenge(self, payload: Any) -> dict[str, Any]:
        """Step 2: check the client's hello and return the server's challenge and proof.

        Raises:
            AuthenticationError: the client speaks another protocol version.
            ProtocolError: the payload is not a hello.
        """
        if isinstance(payload, dict) and payload.get("version") != PROTOCOL_VERSION:
            raise AuthenticationError(
                f"the client speaks protocol version {payload.get('version')!r}, this server "
                f"{PROTOCOL_VERSION}: use the same passrpc version on both sides"
            )
        self._client_challenge = _field(payload, "hello", "challenge")
        return {
            "step": "challenge",
            "version": PROTOCOL_VERSION,
            "challenge": self._challenge,
            "proof": _mac(self._key, _SERVER_LABEL, self._client_challenge, self._challenge),
        }

    def verify(self, payload: Any) -> None:
        """Check the client's step-3 proof.

        Raises:
            AuthenticationError: the proof is wrong (another password).
        """
        proof = _field(payload, "proof", "proof")
        expected = _mac(self._key, _CLIENT_LABEL, self._challenge, self._client_challenge)
        if not hmac.compare_digest(proof, expected):
            raise AuthenticationError("wrong password: the client's proof does not match")


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


def _expect_handshake(channel: Channel, deadline: float | None = None, *, from_server: bool) -> Any:
    if deadline is not None and deadline <= time.monotonic():
        raise Timeout("the handshake took longer than its time bound")
    kind, payload = channel._receive(deadline)
    return _handshake_payload(kind, payload, from_server=from_server)


def _handshake_payload(kind: int, payload: Any, *, from_server: bool) -> Any:
    """Return the payload of a frame the handshake expects, or raise what the frame means.

    Only the server may refuse with an ERROR frame (it says why); from the
    client, as any other kind, it breaks the protocol.

    Raises:
        AuthenticationError and the like: the server refused (an ERROR frame).
        ProtocolError: the frame is not a handshake frame.
    """
    if kind == _ERROR and from_server:
        raise error_from_payload(payload)
    if kind != _HANDSHAKE:
        raise ProtocolError(f"handshake: expected a handshake frame, got kind {kind!r}")
    return payload


def server_handshake(
    channel: Channel,
    key: bytes,
    allowed_uids: Collection[int],
    timeout: float | None = DEFAULT_HANDSHAKE_TIMEOUT,
) -> Peer:
    """Run the server's side on a freshly accepted channel and return the peer.

    ``timeout`` bounds the whole handshake, however slowly the client
    trickles its bytes in. On refusal the client gets an ERROR frame saying
    why (as far as that does not help an attacker) before the exception
    reaches the caller.

    Raises:
        AuthenticationError, ProtocolError, ConnectionClosed, Timeout.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    peer = channel.peer
    try:
        check_uid(peer, allowed_uids, "client")
        steps = ServerHandshake(key)
        # Until the client has proved it knows the password it may not make
        # this process set aside (or decode) more than a handshake frame.
        channel._decoder.cap_frame_size(HANDSHAKE_MAX_FRAME)
        hello = _expect_handshake(channel, deadline, from_server=False)
        channel._send(_HANDSHAKE, steps.challenge(hello))
        steps.verify(_expect_handshake(channel, deadline, from_server=False))
        channel._decoder.cap_frame_size(None)
    except AuthenticationError as exc:
        try:
            channel._send(
                Kind.ERROR, error_payload(ERROR_AUTHENTICATION, "AuthenticationError", str(exc))
            )
        except (ConnectionClosed, Timeout):
            pass
        raise
    return peer


def client_handshake(
    channel: Channel, key: bytes, allowed_uids: Collection[int] | None = None
) -> Peer:
    """Run the client's side on a freshly connected channel and return the server's credentials.

    ``allowed_uids`` are the uids the server may run as; None means ours
    or root.

    Raises:
        AuthenticationError, ProtocolError, ConnectionClosed, Timeout.
    """
    peer = channel.peer
    check_server_uid(peer, allowed_uids)
    steps = ClientHandshake(key)
    channel._decoder.cap_frame_size(HANDSHAKE_MAX_FRAME)  # nor a server that has not proved it
    try:
        channel._send(_HANDSHAKE, steps.hello())
    except ConnectionClosed:
        # A server that refuses us (our uid) says why and closes at once, maybe
        # before our hello left: its reason is still waiting to be read.
        _expect_handshake(channel, from_server=True)
        raise
    answer = steps.answer(_expect_handshake(channel, from_server=True))
    channel._decoder.cap_frame_size(None)
    channel._send(_HANDSHAKE, answer)
    return peer


#: errno values of a connect that may succeed if tried again shortly: the
#: listen backlog is full (EAGAIN on Linux AF_UNIX), or the call was interrupted.
_RETRY_CONNECT = frozenset({errno.EAGAIN, errno.EINTR})

#: Backoff while a server's listen backlog is full (the kernel offers no event
#: for "a slot is free"): start small, as the backlog usually drains in
#: microseconds, and double up to a cap, so a waiting client notices a free
#: slot within 50 ms without spinning.
_CONNECT_FIRST_DELAY = 0.0005
_CONNECT_MAX_DELAY = 0.05


def _connect_once(path: str) -> socket.socket | None:
    """Try once to connect a non-blocking socket to ``path``.

    Returns the connected socket (non-blocking), or None when the listen
    backlog is full or the call was interrupted: wait the next of
    :func:`_backoff`'s delays and try again. Shared by the sync and asyncio
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


def _backoff(path: str, deadline: float | None, clock: Callable[[], float]) -> Iterator[float]:
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
    limits: Limits = DEFAULT_LIMITS,
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
    waits = _backoff(path, deadline, time.monotonic)
    while (sock := _connect_once(path)) is None:
        time.sleep(next(waits))  # backlog full: back off briefly, as the kernel gives no event
    channel = Channel(sock, timeout=timeout, limits=limits)
    try:
        if deadline is not None:
            channel.timeout = max(deadline - time.monotonic(), 0.001)
        client_handshake(channel, key, server_uids)
        channel.timeout = timeout
    except BaseException:
        channel.close()
        raise
    return channel
