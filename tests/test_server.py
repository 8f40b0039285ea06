"""The server core against real forked processes, sockets and signals."""

from __future__ import annotations

import os
import random
import select
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import passrpc
from passrpc import (
    AuthenticationError,
    ConfigurationError,
    FileDescriptor,
    RemoteError,
    Server,
    ServerAlreadyStarted,
    ServerNotStarted,
    StartError,
    UnknownMessage,
)

from .conftest import open_fds
from .helpers import (
    ERROR,
    HANDSHAKE,
    MESSAGE,
    WAIT,
    Gate,
    frame,
    pid_gone,
    read_frame,
    read_until_closed,
    wait_for,
)


def make_seed_server(**kwargs: object) -> Server:
    server = Server(**kwargs)  # type: ignore[arg-type]

    @server.handler("hello")
    def hello(first_name: str, last_name: str) -> tuple[str, int]:
        return f"Hello {first_name} {last_name}, how are you?", 1234

    return server


@pytest.fixture
def seed() -> Iterator[Server]:
    server = make_seed_server()
    server.start()
    yield server
    if server.started:
        server.stop()


class TestSeed:
    def test_seed_example_end_to_end(self) -> None:
        """The original's example: handler, start, channel conversation, proxy, stop."""
        server = make_seed_server()
        server.start()
        try:
            with server.connect() as channel:
                channel.write("hello", "Joe", "Dalton")
                reply, number = channel.read()
            assert reply == "Hello Joe Dalton, how are you?"
            assert number == 1234
            assert server.proxy().hello("Joe", "Dalton") == (reply, 1234)
        finally:
            server.stop()
        assert not os.path.exists(server.socket_path)

    def test_raw_multi_message_conversation(self) -> None:
        """A raw handler converses: several reads and writes on one channel."""
        server = Server()

        @server.handler("sum", raw=True)
        def total(channel: passrpc.Channel, count: int) -> None:
            numbers = [channel.read()[0] for _ in range(count)]
            channel.write("sum", sum(numbers))
            channel.write("done")

        with server, server.connect(timeout=5) as channel:
            channel.write("sum", 3)
            for n in (1, 2, 39):
                channel.write(n)
            assert channel.read() == ("sum", 42)
            assert channel.read() == ("done",)
            channel.write("sum", 1)  # the connection serves the next request
            channel.write(5)
            assert channel.read() == ("sum", 5)

    def test_descriptors_both_ways(self) -> None:
        """A handler returns a pipe's end, and reads from one a client sent."""
        server = Server()

        @server.handler()
        def make_pipe(text: str) -> FileDescriptor:
            r, w = os.pipe()
            os.write(w, text.encode())
            os.close(w)
            return FileDescriptor(r)

        @server.handler()
        def read_from(fd: FileDescriptor) -> bytes:
            with fd.open("rb") as f:
                return f.read()

        with server:
            proxy = server.proxy(timeout=5)
            with proxy.make_pipe("from the server").open("rb") as f:
                assert f.read() == b"from the server"
            r, w = os.pipe()
            os.write(w, b"from the client")
            os.close(w)
            with FileDescriptor(r) as mine:
                assert proxy.read_from(mine) == b"from the client"
            proxy.close()


class TestErrors:
    def test_unknown_message(self, seed: Server) -> None:
        """An unknown name gets UnknownMessage, and the connection goes on."""
        with seed.connect(timeout=5) as channel:
            channel.write("goodbye")
            with pytest.raises(UnknownMessage, match="goodbye"):
                channel.read()
            channel.write("hello", "A", "B")
            assert channel.read()[1] == 1234

    def test_handler_exception_becomes_remote_error(self) -> None:
        """A raising handler gives RemoteError with type, message and traceback; serving goes on."""
        server = Server()

        @server.handler()
        def fail(text: str) -> None:
            raise KeyError(text)

        @server.handler()
        def ok() -> str:
            return "still here"

        with server:
            proxy = server.proxy(timeout=5)
            with pytest.raises(RemoteError) as info:
                proxy.fail("missing")
            assert info.value.remote_type == "KeyError"
            assert "missing" in info.value.remote_message
            assert "in fail" in info.value.remote_traceback
            assert "Remote traceback" in str(info.value)
            assert proxy.ok() == "still here"
            proxy.close()

    def test_wrong_password_runs_no_handler(self) -> None:
        """A wrong password, or a wrong proof with a request right behind it, runs no handler."""
        server = Server()
        calls: list[str] = []  # lives in the server process: grows each time the handler runs

        @server.handler()
        def count() -> int:
            calls.append("count")
            return len(calls)

        with server:
            start = time.monotonic()
            with pytest.raises(AuthenticationError):
                passrpc.connect(server.socket_path, password="wrong", timeout=5)
            assert time.monotonic() - start < 2
            # A client that skips its check of the server's proof may send its
            # request right behind its own (wrong) proof: it must not run.
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(WAIT)
                s.connect(server.socket_path)
                hello = {"step": "hello", "version": 1, "challenge": bytes(32)}
                s.sendall(frame(HANDSHAKE, 0, hello))
                kind, _, challenge = read_frame(s)
                assert (kind, challenge["step"]) == (HANDSHAKE, "challenge")
                proof = {"step": "proof", "proof": bytes(32)}
                s.sendall(frame(HANDSHAKE, 0, proof) + frame(MESSAGE, 0, ["count"]))
                kind, _, error = read_frame(s)
                assert (kind, error["code"]) == (ERROR, "authentication")
                assert read_until_closed(s) == b""
            # The right password's call is the first that ran the handler.
            with server.proxy(timeout=5) as proxy:
                assert proxy.count() == 1

    @pytest.mark.skipif(os.getuid() != 0, reason="dropping to another uid needs root")
    def test_other_uid_refused(self, seed: Server) -> None:
        """A client of another uid is refused even when the file system would let it in."""
        os.chmod(os.path.dirname(seed.socket_path), 0o755)
        os.chmod(seed.socket_path, 0o777)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 3
            try:
                os.close(r)
                os.setgid(65534)
                os.setuid(65534)
                try:
                    passrpc.connect(seed.socket_path, password=seed.password, timeout=5)
                    code = 0
                except AuthenticationError as exc:
                    os.write(w, str(exc).encode())
                    code = 1
            finally:
                os._exit(code)
        os.close(w)
        _, status = os.waitpid(pid, 0)
        with os.fdopen(r, "rb") as f:
            message = f.read().decode()
        assert os.waitstatus_to_exitcode(status) == 1
        assert "uid 65534" in message

    def test_server_that_died_gives_connection_closed(self, seed: Server) -> None:
        """A call to a server that died fails with ConnectionClosed, a ConnectionError."""
        proxy = seed.proxy(timeout=5)
        proxy.hello("a", "b")
        assert seed.pid is not None
        os.kill(seed.pid, signal.SIGKILL)
        wait_for(lambda: not seed.alive, what="the server to die")
        with pytest.raises(ConnectionError):
            proxy.hello("a", "b")
        proxy.close()


class TestAdversarialClients:
    def test_garbage_silence_and_huge_frames_do_not_stop_the_server(self, seed: Server) -> None:
        """Garbage, an oversized header, a silent client: each is dropped; others are served."""
        silent = socket.socket(socket.AF_UNIX)
        silent.connect(seed.socket_path)
        for junk in (b"\x00\x00\x00\x01\xc1", b"\xff\xff\xff\xff", b"GET / HTTP/1.0\r\n\r\n"):
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(seed.socket_path)
                s.sendall(junk)
                s.settimeout(5)
                while s.recv(4096):  # the server closes the connection
                    pass
        assert seed.proxy(timeout=5).hello("still", "served")[1] == 1234
        silent.close()

    def test_silent_client_is_dropped_after_the_handshake_timeout(self) -> None:
        """A client that never authenticates is disconnected after handshake_timeout."""
        server = make_seed_server(handshake_timeout=0.2)
        with server, socket.socket(socket.AF_UNIX) as s:
            s.connect(server.socket_path)
            s.settimeout(5)
            assert s.recv(4096) == b""

    def test_bad_requests_get_errors_and_keep_the_connection(self, seed: Server) -> None:
        """A message without a str name gets a clear error; the connection stays usable."""
        with seed.connect(timeout=5) as channel:
            channel.write(42, "x")
            with pytest.raises(passrpc.ProtocolError, match="handler name"):
                channel.read()
            channel.write("hello", "a", "b")
            assert channel.read()[1] == 1234

    def test_fifty_clients_in_parallel(self) -> None:
        """50 clients at once, each call held in a pool thread of its own: a barrier of 50 is passed."""
        server = Server()
        barrier = threading.Barrier(50)

        @server.handler()
        def meet() -> int:
            return barrier.wait(timeout=20)

        results: list[object] = []

        def client() -> None:
            try:
                with server.connect(timeout=30) as channel:
                    channel.write("meet")
                    results.append(channel.read()[0])
            except Exception as exc:
                results.append(exc)

        with server:
            threads = [threading.Thread(target=client) for _ in range(50)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(40)
        assert sorted(results) == list(range(50))  # type: ignore[type-var]


class TestSignals:
    def test_usr1_handler_hup_ignored_term_kills(self) -> None:
        """SIGUSR1 runs its handler in the child; SIGHUP is ignored; SIGTERM kills it."""
        server = Server()
        hits: list[int] = []

        @server.on_signal("USR1")
        def usr1() -> None:
            hits.append(1)

        @server.handler()
        def count() -> int:
            return len(hits)

        server.start()
        try:
            assert server.pid is not None
            proxy = server.proxy(timeout=5)
            os.kill(server.pid, signal.SIGUSR1)
            wait_for(lambda: proxy.count() == 1, what="the USR1 handler")
            os.kill(server.pid, signal.SIGHUP)
            os.kill(server.pid, signal.SIGUSR1)
            wait_for(lambda: proxy.count() == 2, what="the second USR1")
            proxy.close()
            os.kill(server.pid, signal.SIGTERM)
            wait_for(lambda: not server.alive, what="SIGTERM to kill the server")
        finally:
            server.stop()

    def test_hup_handler_wins_over_the_ignore(self) -> None:
        """An on_signal("HUP") handler runs instead of SIGHUP being ignored."""

        class HupServer(Server):
            hups = 0

            @passrpc.on_signal("SIGHUP")
            def reload(self) -> None:
                self.hups += 1

            @passrpc.handler("hups")
            def get_hups(self) -> int:
                return self.hups

        server = HupServer()
        with server:
            assert server.pid is not None
            proxy = server.proxy(timeout=5)
            os.kill(server.pid, signal.SIGHUP)
            wait_for(lambda: proxy.hups() == 1, what="the HUP handler")
            proxy.close()

    def test_signals_reset_in_the_child(self) -> None:
        """The child's handlers are default, whatever the parent had installed."""
        server = Server()

        @server.handler()
        def dispositions() -> dict[str, object]:
            return {
                name: int(signal.getsignal(getattr(signal, name)))  # type: ignore[arg-type]
                for name in ("SIGINT", "SIGUSR2", "SIGHUP", "SIGPIPE")
            }

        previous = signal.signal(signal.SIGUSR2, lambda *_: None)
        try:
            with server:
                got = server.proxy(timeout=5).dispositions()
        finally:
            signal.signal(signal.SIGUSR2, previous)
        dfl, ign = int(signal.SIG_DFL), int(signal.SIG_IGN)
        assert got == {"SIGINT": dfl, "SIGUSR2": dfl, "SIGHUP": ign, "SIGPIPE": dfl}

    @pytest.mark.parametrize("sig", ["KILL", "STOP", "NOPE", 0])
    def test_uncatchable_or_unknown_signals_refused(self, sig: str | int) -> None:
        """Registering KILL, STOP or a non-signal raises ConfigurationError."""
        with pytest.raises(ConfigurationError):
            Server().on_signal(sig)


class TestOwnership:
    def test_owner_sigkilled_server_exits_and_removes_socket(self, sockdir: Path) -> None:
        """When the only owner dies by SIGKILL, the server exits within 2 s, socket file gone."""
        path = sockdir / "s.sock"
        script = textwrap.dedent(
            f"""
            import sys, passrpc
            server = passrpc.Server({str(path)!r})
            server.start()
            print(server.pid, flush=True)
            sys.stdin.read()
            """
        )
        owner = subprocess.Popen(
            [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert owner.stdout is not None
        server_pid = int(owner.stdout.readline())
        assert path.exists()
        owner.kill()
        owner.wait()
        owner.stdin.close()  # type: ignore[union-attr]
        owner.stdout.close()
        wait_for(lambda: pid_gone(server_pid), timeout=2, what="the orphaned server to exit")
        wait_for(lambda: not path.exists(), timeout=1, what="the socket file to go")

    def test_two_owners_server_lives_until_both_let_go(self, seed: Server) -> None:
        """A process forked after start() is an owner too; the server quits when both let go."""
        assert seed.pid is not None
        # A pidfd turns readable when its process ends: the end is an event to wait on.
        ended = os.pidfd_open(seed.pid)
        try:
            go_r, go_w = os.pipe()
            child = os.fork()
            if child == 0:
                os.close(go_w)
                os.read(go_r, 1)  # hold the inherited reference until told
                seed.close()
                os._exit(0)
            os.close(go_r)
            seed.close()  # the parent lets go; the child still holds on
            assert not seed.started
            # A server that wrongly quit now would read end of file on its owner
            # socket at once and be gone within milliseconds: 0.5 s is ample.
            assert not select.select([ended], [], [], 0.5)[0], "the server quit with an owner left"
            # And it still serves after the parent let go.
            with passrpc.connect(seed.socket_path, password=seed.password, timeout=5) as proxy:
                assert proxy.hello("x", "y")[1] == 1234
            os.write(go_w, b"x")
            os.close(go_w)
            os.waitpid(child, 0)
            assert select.select([ended], [], [], WAIT)[0], "the server outlived its last owner"
            wait_for(lambda: not os.path.exists(seed.socket_path), what="the socket file to go")
        finally:
            os.close(ended)

    def test_serve_in_a_subprocess_stops_when_its_owner_closes(self, sockdir: Path) -> None:
        """serve(owner=fd) returns once the owner's end is closed; socket removed, exit 0."""
        path = sockdir / "s.sock"
        r, w = os.pipe()
        script = textwrap.dedent(
            f"""
            import passrpc
            server = passrpc.Server({str(path)!r}, password="pw")
            server.add_handler("ping", lambda: "pong")
            server.serve(owner={r})
            """
        )
        proc = subprocess.Popen([sys.executable, "-c", script], pass_fds=(r,))
        os.close(r)
        try:
            wait_for(path.exists, what="the socket")
            proxy = passrpc.connect(path, password="pw", timeout=5)
            assert proxy.ping() == "pong"
            proxy.close()
            os.close(w)
            assert proc.wait(10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert not path.exists()


class TestLifecycle:
    def test_start_twice_and_stop_before_start(self, seed: Server) -> None:
        """start() on a started server and stop() on a stopped one raise."""
        with pytest.raises(ServerAlreadyStarted):
            seed.start()
        seed.stop()
        with pytest.raises(ServerNotStarted):
            seed.stop()

    def test_registration_after_start_or_twice_refused(self, seed: Server) -> None:
        """Registering once started, or a name twice, raises ConfigurationError."""
        with pytest.raises(ConfigurationError, match="after the server started"):
            seed.add_handler("late", lambda: None)
        with pytest.raises(ConfigurationError, match="already registered"):
            make_seed_server().add_handler("hello", lambda: None)

    def test_stop_with_a_hanging_handler_returns_within_timeout(self) -> None:
        """stop(timeout) returns within timeout + 1 s even if a handler hangs."""
        server = Server(shutdown_timeout=30)

        @server.handler()
        def hang(started: FileDescriptor, release: FileDescriptor) -> None:
            Gate.hold(started, release)  # the test never lets go: the handler hangs

        gate = Gate()
        server.start()
        try:
            with server.connect(timeout=30) as channel:
                channel.write("hang", *gate.args())
                gate.wait_started_blocking()
                start = time.monotonic()
                server.stop(timeout=1.0)
                assert time.monotonic() - start < 2.0
        finally:
            gate.close()
            if server.started:
                server.stop()
        assert not os.path.exists(server.socket_path)

    def test_stop_after_sigkill_then_start_again(self, seed: Server) -> None:
        """stop() of a killed server returns promptly; start() then gives a working server."""
        assert seed.pid is not None
        os.kill(seed.pid, signal.SIGKILL)
        start = time.monotonic()
        seed.stop()
        assert time.monotonic() - start < 1
        seed.start()
        assert seed.proxy(timeout=5).hello("a", "b")[1] == 1234

    def test_stop_and_start_three_times(self, seed: Server) -> None:
        """The same server stops and starts again and again, each time working."""
        pids = set()
        for _ in range(3):
            seed.stop()
            seed.start()
            pids.add(seed.pid)
            assert seed.proxy(timeout=5).hello("a", "b")[1] == 1234
        assert len(pids) == 3

    def test_no_descriptor_leaks_over_200_cycles(self) -> None:
        """200 start/stop cycles leave the parent's descriptors as they were."""
        server = make_seed_server()
        server.start()
        server.stop()
        baseline = open_fds()
        for _ in range(200):
            server.start()
            server.stop()
        assert open_fds() == baseline

    def test_children_are_reseeded(self) -> None:
        """Two servers forked from one parent draw different random numbers."""
        servers = [Server(), Server()]
        for server in servers:
            server.add_handler("draw", random.random)
        for server in servers:
            server.start()
        try:
            a, b = (server.proxy(timeout=5).draw() for server in servers)
        finally:
            for server in servers:
                server.stop()
        assert a != b

    def test_hooks_run_where_they_belong(self, sockdir: Path) -> None:
        """before_fork runs in the parent; initialize and finalize in the server process."""
        log = sockdir / "log"
        server = Server()
        parent = os.getpid()

        @server.on_before_fork
        def before() -> None:
            with open(log, "a") as f:
                f.write(f"before_fork {os.getpid() == parent}\n")

        @server.on_initialize_server
        def init() -> None:
            with open(log, "a") as f:
                f.write(f"initialize {os.getpid() == parent}\n")

        @server.on_finalize_server
        def fini() -> None:
            with open(log, "a") as f:
                f.write(f"finalize {os.getpid() == parent}\n")

        server.start()
        server.stop()
        # The whole log: a hook that ran twice, or in both processes, shows here.
        assert log.read_text().splitlines() == [
            "before_fork True",
            "initialize False",
            "finalize False",
        ]

    def test_failing_initialize_is_a_start_error(self) -> None:
        """initialize_server raising makes start() raise StartError and leaves nothing."""
        server = Server()

        @server.on_initialize_server
        def broken() -> None:
            raise RuntimeError("no database")

        with pytest.raises(StartError, match="exited with status 1"):
            server.start()
        assert not server.started
        assert not os.path.exists(server.socket_path)

    def test_current_peer_names_the_caller(self) -> None:
        """current_peer() in a handler gives the client's pid, uid and gid."""
        server = Server()

        @server.handler()
        def who() -> tuple[int, int, int]:
            peer = passrpc.current_peer()
            return peer.pid, peer.uid, peer.gid

        with server:
            assert server.proxy(timeout=5).who() == (os.getpid(), os.getuid(), os.getgid())
        with pytest.raises(LookupError):
            passrpc.current_peer()


class TestSocketFile:
    def test_default_socket_is_private(self, seed: Server) -> None:
        """The default socket lives in a 0700 directory and is itself 0600."""
        directory = os.path.dirname(seed.socket_path)
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(seed.socket_path).st_mode) == 0o600

    def test_given_path_is_private_whatever_the_umask(self, sockdir: Path) -> None:
        """A socket at a given path is 0600 even under umask 0."""
        os.chmod(sockdir, 0o755)
        old = os.umask(0)
        try:
            server = make_seed_server(socket_path=sockdir / "s.sock")
            with server:
                assert stat.S_IMODE(os.stat(server.socket_path).st_mode) == 0o600
                assert server.proxy(timeout=5).hello("a", "b")[1] == 1234
        finally:
            os.umask(old)
        assert sorted(os.listdir(sockdir)) == []

    def test_stale_socket_is_replaced(self, sockdir: Path) -> None:
        """A socket file nobody listens on is replaced at start."""
        path = sockdir / "s.sock"
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(str(path))
        stale.close()
        with make_seed_server(socket_path=path) as server:
            assert server.proxy(timeout=5).hello("a", "b")[1] == 1234

    def test_regular_file_and_live_socket_are_never_replaced(self, sockdir: Path) -> None:
        """A regular file, or a live server's socket, at the path makes start() fail."""
        path = sockdir / "s.sock"
        path.write_text("precious")
        with pytest.raises(StartError, match="not a socket"):
            Server(path).start()
        assert path.read_text() == "precious"
        path.unlink()
        with make_seed_server(socket_path=path) as live:
            with pytest.raises(StartError, match="already listens"):
                Server(path).start()
            assert live.proxy(timeout=5).hello("a", "b")[1] == 1234

    def test_path_too_long_names_the_limit(self) -> None:
        """A socket path over 107 bytes is refused with the limit named."""
        with pytest.raises(ConfigurationError, match="107"):
            Server("/tmp/" + "x" * 120)


class TestSpawn:
    def test_spawn_method_end_to_end(self) -> None:
        """start(method="spawn") runs the module-level server in a fresh interpreter."""
        from .spawn_app import server

        server.start(method="spawn")
        try:
            proxy = server.proxy(timeout=10)
            pid, ppid = proxy.whoami()
            assert pid == server.pid
            assert ppid == os.getpid()
            assert proxy.echo(1, "two", b"3") == (1, "two", b"3")
            proxy.close()
        finally:
            server.stop()
        assert not os.path.exists(server.socket_path)

    def test_spawn_without_a_findable_target_says_how_to_fix(self) -> None:
        """A server that is no module-level name needs target=..., and the error says so."""
        with pytest.raises(ConfigurationError, match="target="):
            Server().start(method="spawn")
