"""passrpc: decorator-driven RPC for processes on one machine.

A server on a password-protected Unix socket, a bounded pool of threads
for its clients, owned by the processes that hold it; msgpack-framed
messages with file descriptors passed beside them. See README.md and docs/ for the guide.
"""

from __future__ import annotations

from ._channel import Channel, Peer
from ._client import Proxy, connect, server_status
from ._clientstream import Stream
from ._collection import CollectionClosed, CollectionStatistics, ServerCollection
from ._dispatch import current_peer
from ._errors import (
    AuthenticationError,
    ConfigurationError,
    ConnectionClosed,
    DecodeError,
    EncodeError,
    Error,
    FrameTooLarge,
    ProtocolError,
    RemoteError,
    ServerAlreadyStarted,
    ServerBusy,
    ServerNotStarted,
    StartError,
    TargetError,
    Timeout,
    UnknownMessage,
    WorkerError,
)
from ._fd import FileDescriptor
from ._protocol import HandlerStatistics, ServerStatus
from ._registry import handler, on_signal, worker
from ._server import Server
from ._types import TypeRegistry, register_error, register_type
from ._wire import PROTOCOL_VERSION, Limits
from ._workers import Worker

__version__ = "0.1.0"

__all__ = [
    "PROTOCOL_VERSION",
    "AuthenticationError",
    "Channel",
    "CollectionClosed",
    "CollectionStatistics",
    "ConfigurationError",
    "ConnectionClosed",
    "DecodeError",
    "EncodeError",
    "Error",
    "FileDescriptor",
    "FrameTooLarge",
    "HandlerStatistics",
    "Limits",
    "Peer",
    "ProtocolError",
    "Proxy",
    "RemoteError",
    "Server",
    "ServerAlreadyStarted",
    "ServerBusy",
    "ServerCollection",
    "ServerNotStarted",
    "ServerStatus",
    "StartError",
    "Stream",
    "TargetError",
    "Timeout",
    "TypeRegistry",
    "UnknownMessage",
    "Worker",
    "WorkerError",
    "connect",
    "current_peer",
    "handler",
    "on_signal",
    "register_error",
    "register_type",
    "server_status",
    "worker",
]


def __getattr__(name: str) -> object:
    # passrpc.aio pulls in asyncio (tens of milliseconds): load it on first use,
    # so the command line and spawned servers start without it.
    if name == "aio":
        import importlib

        return importlib.import_module(".aio", __name__)
    raise AttributeError(f"module 'passrpc' has no attribute {name!r}")
