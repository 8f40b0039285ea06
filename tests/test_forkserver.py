"""Workers forked by the fork server, against real processes, locks, descriptors and signals.

Every server here records, in its own process and in its fork server, each
DeprecationWarning Python emits (``record_fork_warnings``); the fixture fails
a test whose processes forked while running threads. ``-W
error::DeprecationWarning`` cannot catch that warning: CPython clears the
exception its fork warning raises, so the record is the test.
"""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import subprocess
import sys
import threading
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

import passrpc
from passrpc import ConfigurationError, RemoteError, Server, Worker, WorkerError

from .helpers import REPO, WAIT, Gate, cli_env, pid_gone, server_log, wait_for

#: Held by a busy handler thread while a worker is forked; the worker takes it too.
LOCK = threading.Lock()
#: A library's lock (a queue's mutex), held by the busy thread as well: unlike
#: logging's locks, which logging re-creates in a forked child, nobody
#: re-creates this one.
QUEUE: queue.Queue[str] = queue.Queue()

#: Python's fork warning, as it reads on 3.12 and later.
FORK_WARNING = "is multi-threaded, use of fork() may lead to deadlocks"


def record_fork_warnings(path: Path) -> None:
    """In a server process or fork server: append every DeprecationWarning to ``path``."""
    warnings.simplefilter("always", DeprecationWarning)  # over the inherited "error"

    def show(message: Any, category: Any, filename: str, lineno: int, *rest: Any) -> None:
        with open(path, "a") as f:
            f.write(f"pid {os.getpid()}: {message}\n")

    warnings.showwarning = show


def gone_for_good(pid: int) -> bool:
    """True once ``pid`` is reaped: not even a zombie is left."""
    return not os.path.exists(f"/proc/{pid}")


def children_of(pid: int) -> list[int]:
    """The pids whose parent is ``pid``."""
    children = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError):
                continue
            if ppid == pid:
                children.append(int(name))
    return children


# Workers: each runs in its own process, forked by the fork server.


def echo(channel: passrpc.Channel, *args: Any) -> None:
    """Reply with this worker's pid, its parent's pid and the arguments, then exit."""
    channel.write(os.getpid(), os.getppid(), *args)


def block(channel: passrpc.Channel) -> None:
    """Say who this worker is, then run until the channel reaches end of file."""
    channel.write(os.getpid(), os.getppid())
    while True:
        try:
            channel.read()
        except passrpc.ConnectionClosed:
            return


def exit_with(channel: passrpc.Channel, code: int) -> None:
    """Exit with ``code``."""
    raise SystemExit(code)


def fail(channel: passrpc.Channel) -> None:
    """Raise: the worker exits with status 1."""
    raise ValueError("this worker fails on purpose")


def take_locks(channel: passrpc.Channel) -> None:
    """Take the lock and use the queue whose mutex a busy server thread holds; say so."""
    with LOCK:
        QUEUE.put("a worker was here")
    channel.write("ran")


def write_to(channel: passrpc.Channel, fd: passrpc.FileDescriptor, text: str) -> None:
    """Write ``text`` to the descriptor it was sent."""
    with fd.open("w") as f:
        f.write(text)
    channel.write("written")


def report_hygiene(channel: passrpc.Channel) -> None:
    """Reply with what this worker's descriptors point to and its signal dispositions."""
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except FileNotFoundError:  # listdir's own descriptor
            continue
    dispositions = {
        sig.name: str(signal.getsignal(sig))
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGUSR1)
    }
    channel.write(fds, dispositions, signal.set_wakeup_fd(-1), channel.fileno())


def make_forking_server(sockdir: Path, record: Path, **options: Any) -> Server:
    """A server with the workers above and handlers that fork them; it records fork warnings."""
    server = Server(str(sockdir / "forking.sock"), **options)
    workers: dict[int, Worker] = {}

    @server.on_preload
    def record_in_fork_server() -> None:
        record_fork_warnings(record)

    @server.on_initialize_server
    def record_in_server() -> None:
        record_fork_warnings(record)

    for fn in (echo, block, exit_with, fail, take_locks, write_to, report_hygiene):
        server.add_worker(fn.__name__, fn)

    @server.handler()
    def ping() -> str:
        return "pong"

    @server.handler()
    def run(name: str, *args: Any) -> tuple[int, list[Any], int]:
        """Fork worker ``name``, read its one reply, close; return its pid, reply and exit status."""
        with server.fork_worker(name, *args, timeout=WAIT) as worker:
            worker.channel.timeout = WAIT
            try:
                reply = list(worker.channel.read())
            except passrpc.ConnectionClosed:
                reply = []
        return worker.pid, reply, worker.wait(WAIT)

    @server.handler(raw=True)
    def hand_over(channel: passrpc.Channel, name: str, *args: Any) -> None:
        """Fork worker ``name`` and send the client a socket connected to it, and its pid."""
        worker = server.fork_worker(name, *args, timeout=WAIT)
        workers[worker.pid] = worker
        with worker:
            channel.write(worker.channel, worker.pid)

    @server.handler()
    def wait(pid: int) -> int:
        """Wait for a worker handed over earlier; return its exit status."""
        return workers[pid].wait(WAIT)

    @server.handler()
    def kill(pid: int) -> None:
        """Kill a worker handed over earlier."""
        workers[pid].kill()

    @server.handler()
    def descriptors_after(n: int) -> int:
        """Fork ``n`` workers one after the other; return how many more descriptors are open."""
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(n):
            run("echo")
        return len(os.listdir("/proc/self/fd")) - before

    @server.handler()
    def hold_locks(started: passrpc.FileDescriptor, release: passrpc.FileDescriptor) -> None:
        """Hold LOCK and the queue's mutex until the test lets go."""
        with LOCK, QUEUE.mutex:
            Gate.hold(started, release)

    return server


@pytest.fixture
def record(tmp_path: Path) -> Iterator[Path]:
    """Where the servers record DeprecationWarnings; the test fails if a fork warned."""
    path = tmp_path / "warnings.txt"
    path.touch()
    yield path
    assert FORK_WARNING not in path.read_text(), path.read_text()


@pytest.fixture
def forking(sockdir: Path, record: Path) -> Iterator[Server]:
    """A started forking server, stopped at the end."""
    server = make_forking_server(sockdir, record)
    server.start()
    try:
        yield server
    finally:
        if server.started:
            server.stop()


def hand_over(proxy: passrpc.Proxy, name: str, *args: Any) -> tuple[passrpc.Channel, int]:
    """Call the hand_over handler; return a channel straight to the new worker, and its pid."""
    with proxy.hand_over(name, *args) as channel:
        channel.timeout = WAIT
        fd, pid = channel.read()
    worker = passrpc.Channel(fd.socket(), timeout=WAIT)
    return worker, pid


@pytest.mark.usefixtures("no_fd_leak")
class TestWorkers:
    def test_worker_gets_arguments_and_descriptors(self, forking: Server) -> None:
        """A worker runs its function with the arguments and descriptors sent, forked by the fork server."""
        r, w = os.pipe()
        with forking.proxy() as proxy, os.fdopen(r) as reading:
            pid, (worker_pid, parent, *args), status = proxy.run("echo", 1, "two", [3.0])
            assert (worker_pid, args, status) == (pid, [1, "two", [3.0]], 0)
            assert children_of(forking.pid or 0) == [parent]  # the fork server, the server's child
            with passrpc.FileDescriptor(w) as writing:
                _, reply, status = proxy.run("write_to", writing, "through a descriptor")
            assert (reply, status) == (["written"], 0)
            assert reading.read() == "through a descriptor"

    def test_no_descriptor_left_in_the_server_or_fork_server(self, forking: Server) -> None:
        """Forking and reaping workers leaves no descriptor open in the server or the fork server."""
        with forking.proxy() as proxy:
            _, (_, parent), _ = proxy.run("echo")  # the first request starts the reader thread
            before = len(os.listdir(f"/proc/{parent}/fd"))
            assert proxy.descriptors_after(20) == 0
            assert len(os.listdir(f"/proc/{parent}/fd")) == before

    def test_worker_can_be_handed_to_a_client(self, forking: Server) -> None:
        """The client talks straight to the worker on the socket a handler sent it."""
        with forking.proxy() as proxy:
            worker, pid = hand_over(proxy, "block")
            with worker:
                assert worker.read()[0] == pid
            assert proxy.wait(pid) == 0  # end of file ended it

    def test_worker_runs_a_server(self, sockdir: Path, record: Path) -> None:
        """A Server registered as a worker answers its handlers on the channel, its hooks around."""
        calc = Server()
        calls = []

        @calc.handler()
        def add(a: int, b: int) -> tuple[int, int]:
            return a + b, os.getpid()

        @calc.on_initialize_server
        def opened() -> None:
            calls.append("initialize")

        @calc.handler()
        def hooks() -> list[str]:
            return calls

        server = make_forking_server(sockdir, record)
        server.add_worker("calc", calc)
        with server, server.proxy() as proxy:
            worker, pid = hand_over(proxy, "calc")
            with worker:
                worker.write("add", 2, 3)
                assert worker.read() == (5, pid)
                worker.write("hooks")
                assert worker.read() == (["initialize"],)
            assert proxy.wait(pid) == 0

    def test_worker_server_streams_an_async_generator(self, sockdir: Path, record: Path) -> None:
        """A Server run as a worker has no event loop: an async generator's stream runs on a
        private one (docs/protocol.md, "A stream": STREAM, ITEMs, END)."""
        calc = Server()

        @calc.handler()
        async def numbers(n: int) -> AsyncIterator[int]:
            for i in range(n):
                await asyncio.sleep(0)
                yield i

        server = make_forking_server(sockdir, record)
        server.add_worker("calc", calc)
        with server, server.proxy() as proxy:
            worker, pid = hand_over(proxy, "calc")
            with worker:
                for _ in range(2):
                    worker.send_frame(5, ["numbers", [3], {}, 8])  # STREAM
                    frames = [worker.receive_frame() for _ in range(4)]
                    assert frames == [(6, [0]), (6, [1]), (6, [2]), (8, None)]  # ITEMs, END
                fds = len(os.listdir(f"/proc/{pid}/fd"))
                worker.send_frame(5, ["numbers", [3], {}, 8])
                assert [worker.receive_frame() for _ in range(4)][-1] == (8, None)
                assert len(os.listdir(f"/proc/{pid}/fd")) == fds  # each private loop closed
            assert proxy.wait(pid) == 0

    def test_many_requests_at_once(self, forking: Server) -> None:
        """Handlers in many threads fork workers at the same time; each gets its own."""
        results: list[Any] = []

        def ask() -> None:
            with forking.proxy() as proxy:
                results.append(proxy.run("echo"))

        threads = [threading.Thread(target=ask) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT)
        assert len(results) == 8
        assert len({pid for pid, _, _ in results}) == 8
        assert {status for _, _, status in results} == {0}
        assert len({parent for _, (_, parent), _ in results}) == 1  # one fork server


class TestSafety:
    def test_worker_runs_while_handler_threads_hold_locks(self, forking: Server) -> None:
        """A worker forked while a busy handler holds a lock and a queue's mutex takes both."""
        gate = Gate()
        with forking.proxy() as proxy, forking.proxy() as other:
            holder = threading.Thread(target=proxy.hold_locks, args=gate.args())
            holder.start()
            try:
                gate.wait_started_blocking()
                # In a fork of the busy server process, take_locks would hang for good.
                _, reply, status = other.run("take_locks")
                assert (reply, status) == (["ran"], 0)
            finally:
                gate.close()
                holder.join(WAIT)

    def test_control_a_fork_from_a_handler(self, sockdir: Path, tmp_path: Path) -> None:
        """The control: a handler's own fork copies a lock another thread holds locked, and is recorded."""
        record = tmp_path / "control.txt"
        server = make_forking_server(sockdir, record)

        @server.handler()
        def unsafe_fork() -> int:
            held, release = threading.Event(), threading.Event()

            def hold() -> None:
                with LOCK:
                    held.set()
                    release.wait(WAIT)

            holder = threading.Thread(target=hold)
            holder.start()
            held.wait(WAIT)
            try:
                pid = os.fork()
                if pid == 0:
                    os._exit(0 if LOCK.acquire(timeout=0.5) else 7)
                return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
            finally:
                release.set()
                holder.join(WAIT)

        with server, server.proxy() as proxy:
            assert proxy.unsafe_fork() == 7  # the child found LOCK locked, for good
        if sys.version_info >= (3, 12):
            assert FORK_WARNING in record.read_text()

    def test_worker_hygiene(self, forking: Server) -> None:
        """A worker keeps no socket but its channel (no client's, no server's), signals at their defaults."""
        with forking.proxy() as proxy, forking.proxy() as other:
            other.ping()  # another client is connected meanwhile
            _, (fds, dispositions, wakeup, channel_fd), status = proxy.run("report_hygiene")
        assert status == 0
        sockets = {int(fd) for fd, target in fds.items() if target.startswith("socket:")}
        assert sockets - {0, 1, 2} == {channel_fd}
        assert wakeup == -1
        assert dispositions["SIGHUP"] == str(signal.SIG_IGN)
        for name in ("SIGTERM", "SIGINT", "SIGCHLD", "SIGUSR1"):
            assert dispositions[name] == str(signal.SIG_DFL), name


@pytest.mark.usefixtures("no_fd_leak")
class TestEndings:
    @pytest.mark.parametrize(
        ("name", "args", "expected"),
        [("echo", (), 0), ("exit_with", (3,), 3), ("fail", (), 1)],
    )
    def test_exit_status_reported_and_worker_reaped(
        self, forking: Server, name: str, args: tuple[Any, ...], expected: int
    ) -> None:
        """The fork server reaps each worker and reports its exit status to the handler that asked."""
        with forking.proxy() as proxy:
            pid, _, status = proxy.run(name, *args)
        assert status == expected
        assert gone_for_good(pid)  # reaped before its status was reported: no zombie

    def test_killed_worker_is_reaped(self, forking: Server) -> None:
        """A worker killed through its Worker ends with -SIGKILL and leaves no zombie."""
        with forking.proxy() as proxy:
            worker, pid = hand_over(proxy, "block")
            with worker:
                proxy.kill(pid)
                assert proxy.wait(pid) == -signal.SIGKILL
            assert gone_for_good(pid)

    def test_workers_end_with_the_server(self, forking: Server) -> None:
        """stop() ends the fork server and every worker, even one whose socket a client holds."""
        with forking.proxy() as proxy:
            worker, pid = hand_over(proxy, "block")
            _, parent = worker.read()
        with worker:
            forking.stop()
            # stop() reaped the server, the server its fork server, the fork server its worker.
            assert gone_for_good(parent)
            assert gone_for_good(pid)
            with pytest.raises(passrpc.ConnectionClosed):
                worker.read()

    def test_fork_server_takes_no_part_in_ownership(self, forking: Server) -> None:
        """close() by the only owner stops the server though its fork server and a worker run."""
        server_pid = forking.pid
        assert server_pid is not None
        with forking.proxy() as proxy:
            worker, pid = hand_over(proxy, "block")
            _, parent = worker.read()
        with worker:
            forking.close()
            for gone in (server_pid, parent, pid):
                wait_for(lambda gone=gone: pid_gone(gone), what=f"pid {gone} gone")
        assert gone_for_good(parent)
        assert gone_for_good(pid)
        assert not os.path.exists(forking.socket_path)
        forking.close()  # a lifecycle call reaps the server let go of before (and its pidfd)

    def test_server_killed_takes_fork_server_and_workers(self, forking: Server) -> None:
        """A server killed with SIGKILL takes its fork server and its workers with it."""
        assert forking.pid is not None
        with forking.proxy() as proxy:
            worker, pid = hand_over(proxy, "block")
            _, parent = worker.read()
        with worker:
            os.kill(forking.pid, signal.SIGKILL)
            for gone in (parent, pid):
                wait_for(lambda gone=gone: pid_gone(gone), what=f"pid {gone} gone")
            with pytest.raises(passrpc.ConnectionClosed):
                worker.read()

    def test_fork_server_death_reported(self, forking: Server) -> None:
        """A fork server killed by accident: its workers die too, and every requester is told."""
        with forking.proxy() as proxy:
            worker, pid = hand_over(proxy, "block")
            _, parent = worker.read()
            with worker:
                os.kill(parent, signal.SIGKILL)
                with pytest.raises(RemoteError, match="exit status is lost"):
                    proxy.wait(pid)
                wait_for(lambda: pid_gone(pid), what="the worker killed with its parent")
                with pytest.raises(RemoteError, match=r"fork server \(pid \d+\) died"):
                    proxy.run("echo")
            assert proxy.ping() == "pong"
        wait_for(lambda: gone_for_good(parent), what="the fork server reaped by its server")


class TestPreload:
    def test_preloaded_state_reaches_workers(self, sockdir: Path, record: Path) -> None:
        """What the preload sets up in the fork server, every worker starts with."""
        server = make_forking_server(sockdir, record)
        loaded: list[int] = []

        @server.on_preload
        def load() -> None:
            loaded.append(os.getpid())

        @server.worker()
        def show(channel: passrpc.Channel) -> None:
            channel.write(loaded, os.getppid())

        with server, server.proxy() as proxy:
            _, [preloaded_in, parent], status = proxy.run("show")
        assert preloaded_in == [parent]
        assert status == 0

    def test_slow_preload_blocks_no_other_handler(self, sockdir: Path, record: Path) -> None:
        """While the preload runs, other handlers answer and fork_worker times out saying why."""
        r, w = os.pipe()
        server = make_forking_server(sockdir, record, keep_fds=(r,))

        @server.on_preload
        def slow() -> None:
            os.read(r, 1)  # until the test lets go

        @server.handler()
        def fork_quickly() -> None:
            server.fork_worker("echo", timeout=0.2).close()

        try:
            with server, server.proxy() as proxy:
                assert proxy.ping() == "pong"
                with pytest.raises(RemoteError, match=r"Timeout.*still runs the preload"):
                    proxy.fork_quickly()
                os.write(w, b"x")
                assert proxy.run("echo")[2] == 0
        finally:
            os.close(r)
            os.close(w)

    def test_server_killed_during_preload_takes_fork_server(
        self, sockdir: Path, record: Path
    ) -> None:
        """A server killed while its fork server's preload hangs takes the fork server with it."""
        r, w = os.pipe()
        server = make_forking_server(sockdir, record, keep_fds=(r,))

        @server.on_preload
        def hang() -> None:
            os.read(r, 1)  # never answered

        try:
            server.start()
            assert server.pid is not None
            wait_for(lambda: children_of(server.pid or 0), what="the fork server")
            (fork_server,) = children_of(server.pid)
            os.kill(server.pid, signal.SIGKILL)
            wait_for(lambda: pid_gone(fork_server), what="the fork server gone")
        finally:
            server.stop()
            os.close(r)
            os.close(w)

    def test_failed_preload_reported_to_every_request(self, sockdir: Path, record: Path) -> None:
        """A preload that raises makes every fork_worker raise WorkerError with its traceback."""
        server = make_forking_server(sockdir, record)

        @server.on_preload
        def broken() -> None:
            raise LookupError("the application is missing")

        with server, server.proxy() as proxy:
            for _ in range(2):
                with pytest.raises(RemoteError) as caught:
                    proxy.run("echo")
                assert caught.value.remote_type.endswith("WorkerError")
                assert "LookupError: the application is missing" in caught.value.remote_message
            assert proxy.ping() == "pong"


class TestMisuse:
    def test_fork_worker_outside_the_server_process(self, forking: Server) -> None:
        """fork_worker() in the owner's process raises WorkerError saying where it works."""
        with pytest.raises(WorkerError, match="in the server process"):
            forking.fork_worker("echo")

    def test_unregistered_worker_and_late_registration(self, forking: Server) -> None:
        """An unknown worker and a worker registered after start() raise ConfigurationError."""
        with pytest.raises(ConfigurationError, match="not a registered worker"):
            forking.fork_worker(print)
        with pytest.raises(ConfigurationError, match="after the server started"):
            forking.add_worker("late", echo)
        with pytest.raises(ConfigurationError, match="already registered"):
            make_forking_server(Path("/tmp"), Path("/dev/null")).add_worker("echo", echo)

    def test_registration_forms(self) -> None:
        """@server.worker bare or named registers a function; anything else is refused."""
        server = Server()

        @server.worker
        def bare(channel: passrpc.Channel) -> None: ...

        @server.worker("named")
        def other(channel: passrpc.Channel) -> None: ...

        for registered in (bare, "bare", other, "named"):
            with pytest.raises(WorkerError, match="in the server process"):
                server.fork_worker(registered)  # found: only the process is wrong
        with pytest.raises(ConfigurationError, match="a worker is a function"):
            server.add_worker("number", 42)  # type: ignore[arg-type]

    def test_preload_without_worker_is_logged(self, sockdir: Path, tmp_path: Path) -> None:
        """A preload registered on a server with no worker never runs, and the log says so."""
        server = Server(str(sockdir / "plain.sock"))

        @server.on_preload
        def never() -> None: ...

        with server_log(tmp_path / "server.log") as log, server:
            pass
        assert "has a preload but no worker" in log.read_text()

    def test_server_without_workers_has_no_fork_server(self, sockdir: Path) -> None:
        """A server with no worker registered forks no fork server: its process has no child."""
        with Server(str(sockdir / "plain.sock")) as server:
            assert server.pid is not None
            assert children_of(server.pid) == []


class TestOtherStarts:
    def test_spawned_server_forks_workers(self) -> None:
        """start(method="spawn") gets a fork server too, forked in the fresh interpreter."""
        from .apps.forking import server

        server.start(method="spawn")
        try:
            with server.proxy() as proxy:
                _, parent, status = proxy.spawn_echo("hi")
            assert status == 0
            assert children_of(server.pid or 0) == [parent]
        finally:
            server.stop()

    def test_cli_served_server_forks_workers_and_ends_them(self, sockdir: Path) -> None:
        """``python -m passrpc`` serves in the foreground; SIGTERM ends its fork server and workers."""
        path = str(sockdir / "cli.sock")
        process = subprocess.Popen(
            [
                sys.executable,
                *("-W", "always::DeprecationWarning"),
                *("-m", "passrpc", "tests.apps.forking:server", "--socket", path),
            ],
            cwd=REPO,
            env=cli_env(PASSRPC_PASSWORD="secret"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            wait_for(lambda: os.path.exists(path), what="the CLI server's socket")
            proxy = passrpc.connect(path, password="secret")
            with proxy:
                _, parent, status = proxy.spawn_echo("hi")
                assert status == 0
            process.send_signal(signal.SIGTERM)
            _, err = process.communicate(timeout=WAIT)
            assert process.returncode == 0, err
            assert FORK_WARNING not in err
            assert pid_gone(parent)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
