"""A fixture app: a server instance, a Server subclass, a factory, and a non-server."""

from __future__ import annotations

import datetime
import os
from typing import Any

import passrpc
from tests import model  # registers the value tests' types in the server (not in `call`)

server = passrpc.Server()


@server.handler("hello")
def hello(first_name: str, last_name: str) -> tuple[str, int]:
    """Greet someone by name."""
    return f"Hello {first_name} {last_name}, how are you?", 1234


@server.handler("echo")
def echo(*values: Any, **options: Any) -> list[Any]:
    """Return the positional and keyword arguments as they arrived."""
    return [list(values), options]


@server.handler("fail")
def fail(message: str) -> None:
    """Raise ValueError with ``message``."""
    raise ValueError(message)


@server.handler("blob")
def blob() -> bytes:
    """Return some bytes that are not text."""
    return b"\x00\x01binary\xff"


@server.handler("pipe")
def pipe() -> passrpc.FileDescriptor:
    """Return the read end of a pipe holding b"piped"."""
    read_end, write_end = os.pipe()
    os.write(write_end, b"piped")
    os.close(write_end)
    return passrpc.FileDescriptor(read_end)


@server.handler("when")
def when() -> datetime.datetime:
    """Return a fixed aware datetime."""
    return datetime.datetime(2024, 5, 1, 12, 30, tzinfo=datetime.timezone.utc)


@server.handler("point")
def point(x: int = 1, y: int = 2) -> model.Point:
    """Return a registered value, which the command line has not registered."""
    return model.Point(x, y)


@server.handler("kinds")
def kinds(*values: Any) -> list[str]:
    """Return the type name of each value as the server rebuilt it."""
    return [type(value).__qualname__ for value in values]


class GreeterServer(passrpc.Server):
    """A Server subclass the command line instantiates itself."""

    @passrpc.handler("hello")
    def hello(self, first_name: str, last_name: str) -> tuple[str, int]:
        """Greet someone by name, from a subclass."""
        return f"Hello {first_name} {last_name}, from a subclass", 1234


def make_server() -> passrpc.Server:
    """A factory the command line calls with no arguments."""
    return GreeterServer()


#: Not a server: serving it is a usage error.
answer = 42


@server.handler("environment")
def environment(name: str) -> str | None:
    """Return the server process's value of environment variable ``name``."""
    return os.environ.get(name)
