"""passrpc: decorator-driven RPC for processes on one machine.

A server on a password-protected Unix socket, a thread per client, owned by
the processes that hold it; msgpack-framed messages with file descriptors
passed beside them. See README.md and docs/ for the guide.
"""

from __future__ import annotations

from ._channel import Channel, Peer
from ._errors import (
    AuthenticationError,
    ConnectionClosed,
    EncodeError,
    Error,
    FrameTooLarge,
    ProtocolError,
    RegistrationError,
    RemoteError,
    ServerAlreadyStarted,
    ServerNotStarted,
    StartError,
    Timeout,
    UnknownMessage,
)
from ._fd import FileDescriptor
from ._wire import PROTOCOL_VERSION, Limits

__version__ = "0.1.0"

__all__ = [
    "PROTOCOL_VERSION",
    "AuthenticationError",
    "Channel",
    "ConnectionClosed",
    "EncodeError",
    "Error",
    "FileDescriptor",
    "FrameTooLarge",
    "Limits",
    "Peer",
    "ProtocolError",
    "RegistrationError",
    "RemoteError",
    "ServerAlreadyStarted",
    "ServerNotStarted",
    "StartError",
    "Timeout",
    "UnknownMessage",
]
