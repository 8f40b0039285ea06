"""A module-level server with a worker: the fork server under spawn and the command line."""

from __future__ import annotations

import os
from typing import Any

import passrpc

server = passrpc.Server()


@server.worker()
def echo(channel: passrpc.Channel, *args: Any) -> None:
    """Reply with this worker's pid, its parent's pid and the arguments."""
    channel.write(os.getpid(), os.getppid(), *args)


@server.handler()
def spawn_echo(*args: Any) -> tuple[int, int, int]:
    """Fork an echo worker; return its pid, its parent's pid and its exit status."""
    with server.fork_worker(echo, *args, timeout=10.0) as worker:
        pid, parent, *_ = worker.channel.read()
    return pid, parent, worker.wait(10.0)
