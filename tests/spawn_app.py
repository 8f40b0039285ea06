"""A module-level server for the spawn tests: a fresh interpreter imports it by name."""

from __future__ import annotations

import os

import passrpc

from . import model  # noqa: F401 (registers the value tests' types, as an app's import would)

server = passrpc.Server()


@server.handler()
def whoami() -> tuple[int, int]:
    """Return the server process's pid and parent pid."""
    return os.getpid(), os.getppid()


@server.handler()
def echo(*values: object) -> tuple[object, ...]:
    """Return the values sent."""
    return values
