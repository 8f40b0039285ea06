"""``async def`` handlers and hooks (issue 14) where they meet the rest: workers, stopping.

A Server run as a worker has no event loop; a stopping server still sends the
replies of async handlers that finish, from its event loop's thread.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import pytest

from passrpc import ConfigurationError, Server

from .helpers import MESSAGE, WAIT, wait_for


class _AsyncInit(Server):
    async def initialize_server(self) -> None:  # type: ignore[override]
        pass


class _AsyncFinal(Server):
    async def finalize_server(self) -> None:  # type: ignore[override]
        pass


@pytest.mark.parametrize("target", [_AsyncInit, _AsyncFinal])
def test_a_worker_server_with_an_async_hook_method_is_refused(target: type[Server]) -> None:
    """The worker would call it and never await it (it ran nothing, silently): refused at add_worker."""
    server = Server()
    with pytest.raises(ConfigurationError, match=r"async def.*worker.*plain def"):
        server.add_worker("calc", target())
    assert "calc" not in server._registry.workers  # type: ignore[attr-defined]


#: stop()'s own bound, after which it kills the server (its shutdown_timeout is 0.5 s).
STOP = 3.0


def test_stop_is_not_held_by_a_reply_that_a_client_does_not_read(tmp_path: Path) -> None:
    """An async handler that finishes while the server stops gets its reply sent within the
    shutdown bound: a client that reads nothing must not keep the server from exiting."""
    started = tmp_path / "started"
    server = Server(shutdown_timeout=0.5)  # no client_idle_timeout: no send timeout either

    @server.handler()
    async def big() -> bytes:
        started.write_text("")
        path = server.socket_path
        while os.path.exists(path):  # until the server is stopping (it removes its socket)
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.1)  # then reply: far more than the socket buffers hold
        return b"x" * (4 << 20)

    server.start()
    channel = server.connect(timeout=WAIT)
    try:
        channel.send_frame(MESSAGE, ["big"])  # and never read the reply
        wait_for(started.exists, what="the handler to start")
        begun = time.monotonic()
        stopper = threading.Thread(target=server.stop, kwargs={"timeout": STOP})
        stopper.start()
        stopper.join(WAIT)
        took = time.monotonic() - begun
    finally:
        channel.close()
    # stop() kills a server that has not exited within its timeout: it must not come to that.
    assert took < STOP - 0.5, f"the server took {took:.1f} s to stop (killed at {STOP} s)"


def test_stop_is_not_held_by_a_handler_that_blocks_the_event_loop(tmp_path: Path) -> None:
    """An async handler that blocks its event loop (a time.sleep by mistake) is left running
    after shutdown_timeout, as a plain handler is: the server still exits by itself."""
    started = tmp_path / "started"
    server = Server(shutdown_timeout=0.5)

    @server.handler()
    async def hog() -> None:
        started.write_text("")
        time.sleep(60)  # blocks the loop: nothing on it can run until this returns

    server.start()
    channel = server.connect(timeout=WAIT)
    try:
        channel.send_frame(MESSAGE, ["hog"])
        wait_for(started.exists, what="the handler to start")
        begun = time.monotonic()
        stopper = threading.Thread(target=server.stop, kwargs={"timeout": 2 * STOP})
        stopper.start()
        stopper.join(WAIT + 2 * STOP)
        took = time.monotonic() - begun
    finally:
        channel.close()
    assert took < 2 * STOP - 0.5, f"the server took {took:.1f} s to stop (killed at {2 * STOP} s)"
