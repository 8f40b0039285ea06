"""Edges of the server: failures that must not take it down, and what it leaves behind."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import resource
import select
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

import passrpc
from passrpc import Limits, RemoteError, Server

from .conftest import open_fds
from .helpers import WAIT, blocked_on, pid_gone, server_log, wait_for


class TestFailuresThatMustNotStopTheServer:
    def test_signal_handler_that_raises(self, sockdir: Path) -> None:
        """A raising on_signal handler is logged with its traceback; the server goes on serving."""
        server = Server()
        hits: list[int] = []

        @server.on_signal("USR1")
        def broken() -> None:
            hits.append(1)
            raise RuntimeError("broken signal handler")

        server.add_handler("hits", lambda: len(hits))
        log = sockdir / "server.log"
        with server_log(log), server:
            assert server.pid is not None
            proxy = server.proxy(timeout=5)
            os.kill(server.pid, signal.SIGUSR1)
            # The log line is written after the handler ran: wait for it, not for hits.
            wait_for(
                lambda: "RuntimeError: broken signal handler" in log.read_text(),
                what="the handler's exception in the server's log",
            )
            text = log.read_text()
            assert "ERROR the SIGUSR1 handler raised" in text
            assert "in broken" in text  # the traceback, not only the message
            assert proxy.hits() == 1
            proxy.close()

    def test_accept_backs_off_when_out_of_descriptors(self, sockdir: Path) -> None:
        """Out of descriptors, accept logs a warning and backs off; once freed, it serves again."""
        room = sockdir / "room"
        # Far over the room: the default (half the descriptor limit) would
        # refuse the extra clients as busy before accept() ran out.
        server = Server(max_connections=100_000)
        server.add_handler("ok", lambda: "ok")

        @server.on_initialize_server
        def few_descriptors() -> None:
            # In the server process only: a limit that leaves room for exactly
            # two more descriptors (the numbers below it that are free), so a
            # few connections make accept() fail with EMFILE.
            used = open_fds()
            limit = free = 0
            while free < 2 or limit <= max(used):
                free += limit not in used
                limit += 1
            room.write_text(str(free))
            _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))

        log = sockdir / "server.log"
        with server_log(log), server:
            clients: list[socket.socket] = []
            try:
                # Each accepted client takes a descriptor and holds it while the
                # server waits for its hello; two more than the room must fail.
                for _ in range(int(room.read_text()) + 2):
                    client = socket.socket(socket.AF_UNIX)
                    clients.append(client)
                    client.connect(server.socket_path)  # queued in the backlog if not accepted
                wait_for(lambda: "backing off" in log.read_text(), what="accept to back off")
                assert re.search(
                    r"WARNING accept failed \(.*Too many open files\); backing off", log.read_text()
                )
                assert server.alive
            finally:
                for client in clients:
                    client.close()
            # The closed clients' descriptors are freed; the server accepts again.
            with server.proxy(timeout=WAIT) as proxy:
                assert proxy.ok() == "ok"

    def test_reply_over_the_frame_limit_is_a_remote_error(self) -> None:
        """A reply too large to send becomes a RemoteError; the connection goes on."""
        server = Server(limits=Limits(max_frame_size=1024))
        server.add_handler("big", lambda: b"x" * 4096)
        server.add_handler("small", lambda: "ok")
        with server, server.proxy(timeout=5) as proxy:
            with pytest.raises(RemoteError, match="cannot be sent"):
                proxy.big()
            assert proxy.small() == "ok"

    def test_bare_decorators_register(self) -> None:
        """@server.handler and @passrpc.handler without parentheses register too."""
        server = Server()

        @server.handler
        def plain() -> str:
            return "plain"

        class Sub(Server):
            @passrpc.handler
            def method(self) -> str:
                return "method"

        assert plain() == "plain"  # the decorator returns the function unchanged
        # A proxy's methods are the registered handlers; making one needs no running server.
        assert "plain" in dir(server.proxy())
        assert "method" in dir(Sub().proxy())


class TestWhatStaysBehind:
    def test_server_killed_by_a_signal_leaves_no_socket(self) -> None:
        """When the server dies of SIGTERM, its starter removes the socket file and directory."""
        server = Server()
        server.start()
        assert server.pid is not None
        os.kill(server.pid, signal.SIGTERM)
        wait_for(lambda: not server.alive, what="the server to die")
        assert not os.path.exists(server.socket_path)
        assert not os.path.exists(os.path.dirname(server.socket_path))
        server.stop()

    def test_stop_from_a_forked_owner_is_prompt(self) -> None:
        """stop() in a fork of the starter waits for the end through the pidfd: no busy wait."""
        server = Server()
        server.start()
        assert server.pid is not None
        server_pid = server.pid
        r, w = os.pipe()
        child = os.fork()
        if child == 0:
            code = 1
            try:
                start = time.monotonic()
                server.stop(timeout=4)
                os.write(w, f"{time.monotonic() - start:.3f}".encode())
                code = 0
            finally:
                os._exit(code)
        os.close(w)
        _, status = os.waitpid(child, 0)
        with os.fdopen(r) as f:
            took = float(f.read())
        assert os.waitstatus_to_exitcode(status) == 0
        assert took < 2
        wait_for(lambda: not server.alive, what="the starter to see the end")
        assert pid_gone(server_pid)
        server.stop()

    def test_handshake_bound_covers_a_trickling_client(self) -> None:
        """A hello trickled in a byte at a time is dropped at the bound for the whole handshake."""
        server = Server(handshake_timeout=0.5)
        hello = b"\x00\x00\x00\x40" + b"\x93\x02\x00" + b"\xc0" * 61  # a 64-byte frame, never whole
        with server, socket.socket(socket.AF_UNIX) as s:
            s.connect(server.socket_path)
            start = time.monotonic()
            closed = False
            for byte in hello:
                try:
                    s.send(bytes([byte]))
                except OSError:
                    closed = True
                    break
                if select.select([s], [], [], 0.05)[0]:
                    with contextlib.suppress(OSError):
                        closed = s.recv(4096) == b""
                    closed = True
                    break
            assert closed, "the server kept a trickling client past its handshake bound"
            assert time.monotonic() - start < 1.5

    def test_unauthenticated_client_cannot_make_the_server_reserve_memory(self) -> None:
        """A header announcing a large frame before the handshake closes the connection at once."""
        server = Server()
        server.add_handler("ok", lambda: "ok")
        with server, socket.socket(socket.AF_UNIX) as s:
            s.connect(server.socket_path)
            s.sendall(b"\x03\xff\xff\xff")  # 64 MiB - 1, under the limit for the authenticated
            s.settimeout(5)
            assert s.recv(4096) == b""
            assert server.proxy(timeout=5).ok() == "ok"

    def test_shutdown_from_another_thread_wakes_a_blocked_read(self) -> None:
        """Channel.shutdown() makes a read blocked in another thread fail at once."""
        a, b = passrpc.Channel.pair()
        errors: list[BaseException] = []

        def reader() -> None:
            try:
                a.read()
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=reader)
        thread.start()
        wait_for(lambda: blocked_on(thread, a.fileno()), what="the reader to block in its read")
        a.shutdown()
        thread.join(5)
        assert not thread.is_alive()
        assert isinstance(errors[0], passrpc.ConnectionClosed)
        b.close()

    def test_many_large_values_in_one_message(self) -> None:
        """More large binary values than sendmsg takes buffers still travel whole."""
        a, b = passrpc.Channel.pair()
        blobs = [bytes([i % 256]) * (64 * 1024) for i in range(600)]
        writer = threading.Thread(target=a.write, args=("many", *blobs))
        writer.start()
        got = b.read()
        writer.join()
        assert got == ("many", *blobs)
        a.close()
        b.close()

    def test_descriptor_numbers_above_1024(self) -> None:
        """start() and stop() work in a process whose descriptor numbers pass 1024."""
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and hard < 1200:
            pytest.skip("the descriptor limit is below 1200")
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
        fillers = []
        try:
            while len(fillers) < 1100:
                fillers.append(os.open(os.devnull, os.O_RDONLY))
            server = Server()
            server.add_handler("ok", lambda: "ok")
            with server:
                assert server.proxy(timeout=5).ok() == "ok"
                assert server.alive
        finally:
            for fd in fillers:
                os.close(fd)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    def test_processes_forked_by_handlers_do_not_hold_other_clients(self) -> None:
        """A worker forked by a handler does not keep another client's connection open."""
        server = Server(client_idle_timeout=0.3)

        @server.handler()
        def fork_sleeper() -> int:
            pid = os.fork()
            if pid == 0:
                time.sleep(3)
                os._exit(0)
            threading.Thread(target=os.waitpid, args=(pid, 0), daemon=True).start()
            return pid

        with server:
            other = server.connect(timeout=5)
            other.write("fork_sleeper")  # accepted and served: its socket exists in the server
            sleeper = other.read()[0]
            with server.proxy(timeout=5) as proxy:
                proxy.fork_sleeper()
            # The server closes the idle connection; the sleepers must not keep it open.
            assert select.select([other], [], [], 2)[0]
            assert not pid_gone(sleeper)
            with pytest.raises(passrpc.ConnectionClosed):
                other.read()
            other.close()

    def test_logging_file_handler_works_in_the_server(self, sockdir: Path) -> None:
        """A FileHandler configured before start() still writes in the server process."""
        log_path = sockdir / "server.log"
        log = logging.getLogger("passrpc.test.filehandler")
        handler = logging.FileHandler(log_path)
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        try:
            server = Server()

            @server.handler()
            def note(text: str) -> None:
                log.info("server says %s", text)
                handler.flush()

            with server:
                server.proxy(timeout=5).note("hello")
        finally:
            log.removeHandler(handler)
            handler.close()
        assert "server says hello" in log_path.read_text()


@pytest.mark.skipif(os.getuid() != 0, reason="dropping to another uid needs root")
def test_allowed_uid_with_an_open_socket_mode_gets_in() -> None:
    """allow_uids plus socket_mode lets another user in, and only that one."""
    server = Server(allow_uids={65534}, socket_mode=0o666)
    server.add_handler("whoami", lambda: passrpc.current_peer().uid)
    with server:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.setgid(65534)
                os.setuid(65534)
                proxy = passrpc.connect(server.socket_path, password=server.password, timeout=5)
                os.write(w, str(proxy.whoami()).encode())
                code = 0
            finally:
                os._exit(code)
        os.close(w)
        _, status = os.waitpid(pid, 0)
        with os.fdopen(r) as f:
            assert f.read() == "65534"
        assert os.waitstatus_to_exitcode(status) == 0
