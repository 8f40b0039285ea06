"""The main loop's back-off paths, reached with injected failures in an in-process loop.

Running as root, real limits cannot make accept() fail with ENFILE or ENOBUFS,
nor a thread fail to start; the loop's two seams (the listener's ``accept``
and ``thread_class``) let these tests put failing ones there. EMFILE, which a
real RLIMIT_NOFILE does produce, is tested in a forked server in
test_server_edges.py.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import passrpc
from passrpc._loop import ServeLoop

from .helpers import WAIT, wait_for


class FailingListener:
    """A listening socket whose next accept() calls fail with the errnos given, in order."""

    def __init__(self, sock: socket.socket, errnos: list[int]) -> None:
        self._sock = sock
        self.errnos = errnos

    def accept(self) -> tuple[socket.socket, Any]:
        if self.errnos:
            number = self.errnos.pop(0)
            raise OSError(number, os.strerror(number))
        return self._sock.accept()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class ThreadThatFailsOnce(threading.Thread):
    """A client thread of which the first start() fails as an exhausted process's would."""

    failures = 1

    def start(self) -> None:
        if ThreadThatFailsOnce.failures:
            ThreadThatFailsOnce.failures -= 1
            raise RuntimeError("can't start new thread")
        super().start()


@contextlib.contextmanager
def _serve(sockdir: Path, errnos: list[int], loop_class: type[ServeLoop]) -> Iterator[str]:
    server = passrpc.Server(sockdir / "s.sock", password="pw")
    server.add_handler("ping", lambda: "pong")
    sock, identity = server._files.listen(16)
    listener = FailingListener(sock, errnos)
    loop = loop_class(server._app(), listener, None, identity, foreground=False)  # type: ignore[arg-type]
    thread = threading.Thread(target=loop.run)
    thread.start()
    try:
        yield server.socket_path
    finally:
        loop.request_stop()
        thread.join(WAIT)
        assert not thread.is_alive()


@pytest.fixture
def caplog_passrpc(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="passrpc")
    return caplog


@pytest.mark.parametrize("number", [errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.EMFILE])
def test_accept_out_of_resources_backs_off_and_serves_again(
    sockdir: Path, caplog_passrpc: pytest.LogCaptureFixture, number: int
) -> None:
    """An accept that fails for want of resources is logged, backed off, then retried."""
    errnos = [number, number]
    with _serve(sockdir, errnos, ServeLoop) as path:
        proxy = passrpc.connect(path, password="pw", timeout=WAIT)
        assert proxy.ping() == "pong"
        proxy.close()
    assert not errnos  # both failures happened before the client got in
    backoffs = [r for r in caplog_passrpc.records if "backing off" in r.getMessage()]
    assert len(backoffs) == 2
    assert os.strerror(number) in backoffs[0].getMessage()
    assert all(r.levelno == logging.WARNING for r in backoffs)


def test_other_accept_errors_are_skipped_without_backing_off(
    sockdir: Path, caplog_passrpc: pytest.LogCaptureFixture
) -> None:
    """An accept error that is not about resources (ECONNABORTED) is logged and passed over."""
    errnos = [errno.ECONNABORTED]
    with _serve(sockdir, errnos, ServeLoop) as path:
        proxy = passrpc.connect(path, password="pw", timeout=WAIT)
        assert proxy.ping() == "pong"
        proxy.close()
    assert not [r for r in caplog_passrpc.records if "backing off" in r.getMessage()]
    assert any("accept failed" in r.getMessage() for r in caplog_passrpc.records)


def test_a_thread_that_cannot_start_drops_that_client_and_the_loop_goes_on(
    sockdir: Path, caplog_passrpc: pytest.LogCaptureFixture
) -> None:
    """A failed thread start closes that one connection, logs, backs off; later clients are served."""

    class Loop(ServeLoop):
        thread_class = ThreadThatFailsOnce

    ThreadThatFailsOnce.failures = 1
    with _serve(sockdir, [], Loop) as path:
        with pytest.raises(passrpc.ConnectionClosed):
            passrpc.connect(path, password="pw", timeout=WAIT)
        wait_for(
            lambda: any("cannot start a client thread" in r.getMessage() for r in caplog_passrpc.records),
            what="the failed thread start to be logged",
        )
        proxy = passrpc.connect(path, password="pw", timeout=WAIT)
        assert proxy.ping() == "pong"
        proxy.close()
    assert ThreadThatFailsOnce.failures == 0
