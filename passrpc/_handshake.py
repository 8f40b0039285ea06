"""The handshake's steps, as pure functions over payloads: no socket, no clock.

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
answers with an ERROR frame of code "authentication" and closes.

The drivers that move these steps over a connection are in
:mod:`passrpc._auth` (blocking) and :mod:`passrpc._aiochannel` (asyncio); every
decision is made here, so the two cannot differ.
"""

from __future__ import annotations

import hmac
import secrets
from typing import Any

from ._errors import AuthenticationError, ProtocolError
from ._protocol import (
    ERROR,
    ERROR_AUTHENTICATION,
    HANDSHAKE,
    Frame,
    error_from_payload,
    error_payload,
)
from ._wire import PROTOCOL_VERSION, brief

_CHALLENGE_SIZE = 32
_SERVER_LABEL = b"passrpc server\x00"
_CLIENT_LABEL = b"passrpc client\x00"

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
                "the server's proof of the password did not match this client's password: "
                "check the password (a trailing newline or space read from a file?), and "
                "that the socket belongs to the server you meant"
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
            ProtocolError: the payload is not a hello (its shape is checked first:
                a malformed step is never answered).
        """
        self._client_challenge = _field(payload, "hello", "challenge")
        version = payload.get("version")
        if type(version) is not int:  # not bool, not float: they compare equal to 1
            raise ProtocolError(f"handshake: 'hello' needs an int 'version', got {brief(version)}")
        if version != PROTOCOL_VERSION:
            raise AuthenticationError(
                f"the client speaks protocol version {version!r}, this server "
                f"{PROTOCOL_VERSION}: use the same passrpc version on both sides"
            )
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


def handshake_payload(kind: int, payload: Any, *, from_server: bool) -> Any:
    """Return the payload of a frame the handshake expects, or raise what the frame means.

    Only the server may refuse with an ERROR frame (it says why); from the
    client, as any other kind, it breaks the protocol (but see
    :func:`client_proof`).

    Raises:
        AuthenticationError and the like: the server refused (an ERROR frame).
        ProtocolError: the frame is not a handshake frame.
    """
    if kind == ERROR and from_server:
        raise error_from_payload(payload)
    if kind != HANDSHAKE:
        raise ProtocolError(f"handshake: expected a handshake frame, got kind {kind!r}")
    return payload


def client_proof(kind: int, payload: Any) -> Any:
    """Return the payload of the client's step 3, or raise what the client said instead.

    A client whose check of the server's proof failed sends an ERROR frame of
    code "authentication" in place of its proof, so the server can tell a
    wrong password from a client that went away.

    Raises:
        AuthenticationError: the client reports a wrong password.
        ProtocolError: the frame is not a handshake frame.
    """
    if kind == ERROR and isinstance(payload, dict) and payload.get("code") == ERROR_AUTHENTICATION:
        raise AuthenticationError(
            "a client reports a wrong password: this server's proof did not match its "
            f"password ({brief(payload.get('message'))})"
        )
    return handshake_payload(kind, payload, from_server=False)


def refusal(exc: AuthenticationError) -> Frame:
    """The ERROR frame that says why: a server's to a client it refuses, or a client's to a
    server whose proof did not match its password."""
    return ERROR, error_payload(ERROR_AUTHENTICATION, "AuthenticationError", str(exc))
