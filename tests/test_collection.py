"""ServerCollection: keyed servers started once, replaced when dead, stopped when idle."""

from __future__ import annotations

import itertools
import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest

import passrpc
from passrpc._collection import CollectionClosed

from .helpers import WAIT, wait_for

# Servers are forked from a process that runs the cleaner and test threads;
# Python 3.12+ warns about that. The servers' children do not touch the
# parent's locks (they only serve), which is what the warning is about.
pytestmark = pytest.mark.filterwarnings(
    "ignore:This process .* is multi-threaded:DeprecationWarning"
)

_socket_names = itertools.count()


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class PidServer(passrpc.Server):
    """A server that remembers its pid after it stopped (``pid`` is None then)."""

    last_pid: int | None = None

    def start(self, *, method: str = "fork", target: str | None = None) -> None:
        super().start(method=method, target=target)
        self.last_pid = self.pid


class Factory:
    """Makes servers and counts how often it was called, thread-safely."""

    def __init__(
        self,
        max_idle_time: float | None = None,
        *,
        cls: type[PidServer] = PidServer,
        socket_dir: Path | None = None,
        before: Callable[[], Any] | None = None,
    ) -> None:
        self.max_idle_time = max_idle_time
        self.cls = cls
        self.socket_dir = socket_dir
        self.before = before
        self.calls = 0
        self.made: list[PidServer] = []
        self.lock = threading.Lock()

    def __call__(self) -> PidServer:
        with self.lock:
            self.calls += 1
        if self.before is not None:
            self.before()
        path = None if self.socket_dir is None else self.socket_dir / f"s{next(_socket_names)}.sock"
        server = self.cls(socket_path=path, max_idle_time=self.max_idle_time)
        self.made.append(server)

        @server.handler()
        def pid() -> int:
            return os.getpid()

        return server


class SignallingServer(PidServer):
    """A server whose stop() sets an event, so a test can await the cleaner."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stopped = threading.Event()

    def stop(self, timeout: float = 4.0) -> None:
        try:
            super().stop(timeout)
        finally:
            self.stopped.set()


class SlowStopServer(PidServer):
    """A server whose stop() waits for the test's go-ahead first."""

    stopping = threading.Event()
    go = threading.Event()

    def stop(self, timeout: float = 4.0) -> None:
        type(self).stopping.set()
        assert type(self).go.wait(WAIT)
        super().stop(timeout)


def assert_reaped(pid: int) -> None:
    """The process is gone and reaped: no zombie, nothing left to wait for."""
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def blocker(entered: threading.Event, go: threading.Event) -> Callable[[], None]:
    """A factory's ``before``: say it has entered, then wait for the test's go-ahead."""

    def before() -> None:
        entered.set()
        assert go.wait(WAIT)

    return before


def run_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any], threading.Event]:
    """Run ``fn`` in a thread; its result or exception lands in the returned dict."""
    out: dict[str, Any] = {}
    done = threading.Event()

    def target() -> None:
        try:
            out["result"] = fn()
        except BaseException as exc:
            out["error"] = exc
        finally:
            done.set()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, out, done


@pytest.fixture
def clock() -> FakeClock:
    """A fake clock at 0."""
    return FakeClock()


@pytest.fixture
def collection(clock: FakeClock) -> Iterator[passrpc.ServerCollection]:
    """A collection on the fake clock, closed (every server stopped) at the end."""
    c = passrpc.ServerCollection(clock=clock)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def real_collection() -> Iterator[passrpc.ServerCollection]:
    """A collection on the real monotonic clock, closed at the end."""
    c = passrpc.ServerCollection()
    try:
        yield c
    finally:
        c.close()


class TestLookup:
    """lookup_or_add: one server per key, made once, replaced when dead."""

    def test_first_lookup_starts_the_server_and_later_ones_return_it(
        self, no_fd_leak: None, collection: passrpc.ServerCollection
    ) -> None:
        """The factory runs once; the started server is returned again and answers calls."""
        factory = Factory()
        server = collection.lookup_or_add("app", factory)
        assert server.started
        assert server.alive
        assert collection.lookup_or_add("app", factory) is server
        assert factory.calls == 1
        assert "app" in collection
        assert "other" not in collection
        assert len(collection) == 1
        assert list(collection) == [("app", server)]
        with server.proxy() as proxy:
            assert proxy.pid() == server.pid

    def test_concurrent_lookups_start_one_server_per_key(
        self, collection: passrpc.ServerCollection
    ) -> None:
        """32 threads looking up 4 keys at once start exactly 4 servers."""
        factories = {key: Factory() for key in "abcd"}
        barrier = threading.Barrier(32)
        got: list[tuple[str, passrpc.Server]] = []
        got_lock = threading.Lock()

        def look(i: int) -> None:
            key = "abcd"[i % 4]
            barrier.wait(WAIT)
            server = collection.lookup_or_add(key, factories[key])
            with got_lock:
                got.append((key, server))

        threads = [threading.Thread(target=look, args=(i,)) for i in range(32)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT)
        assert len(got) == 32
        assert {key: f.calls for key, f in factories.items()} == dict.fromkeys("abcd", 1)
        for key in "abcd":
            assert len({id(server) for k, server in got if k == key}) == 1
        assert len(collection) == 4
        assert len({server.pid for _, server in got}) == 4

    def test_factory_may_return_a_started_server(
        self, collection: passrpc.ServerCollection
    ) -> None:
        """A server the factory started itself is adopted, not started again."""
        started: list[passrpc.Server] = []

        def factory() -> passrpc.Server:
            server = passrpc.Server()
            server.start()
            started.append(server)
            return server

        server = collection.lookup_or_add("app", factory)
        assert server is started[0]
        assert server.alive

    def test_killed_server_is_replaced_on_next_lookup(
        self, no_fd_leak: None, collection: passrpc.ServerCollection
    ) -> None:
        """A server whose process was SIGKILLed is reaped and replaced by a fresh one."""
        factory = Factory()
        old = collection.lookup_or_add("app", factory)
        old_pid = old.pid
        assert old_pid is not None
        os.kill(old_pid, signal.SIGKILL)
        wait_for(lambda: not old.alive, what="the killed server to be seen dead")
        new = collection.lookup_or_add("app", factory)
        assert new is not old
        assert new.alive
        assert new.pid != old_pid
        assert factory.calls == 2
        assert not old.started
        assert_reaped(old_pid)
        assert len(collection) == 1

    def test_killed_server_is_replaced_once_under_concurrent_lookups(
        self, no_fd_leak: None, collection: passrpc.ServerCollection
    ) -> None:
        """16 threads looking up a dead server's key start one replacement and all get it."""
        factory = Factory()
        old = collection.lookup_or_add("app", factory)
        assert old.pid is not None
        os.kill(old.pid, signal.SIGKILL)
        # Wait for the death without reaping it, so the lookups race to notice.
        os.waitid(os.P_PID, old.pid, os.WEXITED | os.WNOWAIT)
        barrier = threading.Barrier(16)
        got: list[passrpc.Server] = []

        def look() -> None:
            barrier.wait(WAIT)
            got.append(collection.lookup_or_add("app", factory))

        threads = [threading.Thread(target=look) for _ in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT)
        assert factory.calls == 2
        assert len(got) == 16
        assert {id(server) for server in got} == {id(got[0])}
        assert got[0] is not old
        assert got[0].alive

    def test_server_stopped_behind_the_collections_back_is_replaced(
        self, collection: passrpc.ServerCollection
    ) -> None:
        """A server someone stopped directly is noticed and replaced."""
        factory = Factory()
        old = collection.lookup_or_add("app", factory)
        old.stop()
        new = collection.lookup_or_add("app", factory)
        assert new is not old
        assert new.alive

    def test_factory_looking_up_its_own_key_is_refused(
        self, collection: passrpc.ServerCollection
    ) -> None:
        """A factory that looks up its own key gets an error instead of waiting forever."""

        def factory() -> passrpc.Server:
            return collection.lookup_or_add("app", factory)

        with pytest.raises(passrpc.ConfigurationError, match="its own key"):
            collection.lookup_or_add("app", factory)
        assert "app" not in collection
        assert collection.statistics().starting == 0


class TestFailures:
    """A factory or start() that fails leaves nothing behind."""

    def test_raising_factory_leaves_nothing(
        self, no_fd_leak: None, collection: passrpc.ServerCollection
    ) -> None:
        """The factory's error reaches the caller and the key stays free for a retry."""

        def broken() -> passrpc.Server:
            raise OSError("no room")

        with pytest.raises(OSError, match="no room"):
            collection.lookup_or_add("app", broken)
        assert "app" not in collection
        assert len(collection) == 0
        assert collection.statistics() == passrpc._collection.CollectionStatistics(0, 0, 0, 0, 0, 0)
        factory = Factory()
        assert collection.lookup_or_add("app", factory).alive
        assert factory.calls == 1

    def test_server_failing_to_start_leaves_nothing(
        self, no_fd_leak: None, sockdir: Path, collection: passrpc.ServerCollection
    ) -> None:
        """StartError reaches the caller; no process, no socket file, no entry remain."""
        made: list[passrpc.Server] = []

        def factory() -> passrpc.Server:
            server = passrpc.Server(sockdir / "s.sock")

            @server.on_initialize_server
            def fail() -> None:
                raise RuntimeError("cannot initialize")

            made.append(server)
            return server

        with pytest.raises(passrpc.StartError):
            collection.lookup_or_add("app", factory)
        assert not made[0].started
        assert list(sockdir.iterdir()) == []
        assert "app" not in collection
        assert collection.statistics().starting == 0

    def test_waiters_retry_after_a_failed_factory(
        self, collection: passrpc.ServerCollection
    ) -> None:
        """A thread that waited on a failing start retries with its own factory and succeeds."""
        entered, go = threading.Event(), threading.Event()

        def failing() -> passrpc.Server:
            entered.set()
            assert go.wait(WAIT)
            raise OSError("first attempt failed")

        second = Factory()
        first_thread, first, _ = run_thread(lambda: collection.lookup_or_add("app", failing))
        assert entered.wait(WAIT)
        second_thread, other, _ = run_thread(lambda: collection.lookup_or_add("app", second))
        wait_for(lambda: collection.statistics().waiting == 1, what="the second lookup to wait")
        go.set()
        first_thread.join(WAIT)
        second_thread.join(WAIT)
        assert isinstance(first["error"], OSError)
        assert second.calls == 1
        assert other["result"] is collection.lookup_or_add("app", second)
        assert other["result"].alive


class TestIdleCleaning:
    """Deadlines: pushed by lookups, held by use(), enforced by the cleaner."""

    def test_idle_server_is_stopped_and_reaped(
        self, no_fd_leak: None, clock: FakeClock, collection: passrpc.ServerCollection
    ) -> None:
        """At its deadline, exactly, the server is stopped, reaped and its socket removed."""
        server = collection.lookup_or_add("app", Factory(max_idle_time=10))
        pid = server.pid
        assert pid is not None
        assert server.next_cleaning_time == 10
        assert collection.next_cleaning_time == 10
        clock.now = 9.999
        assert collection.check_idle_servers() == []
        assert "app" in collection
        clock.now = 10
        collection.check_idle_servers()
        assert "app" not in collection
        assert len(collection) == 0
        assert not server.started
        assert_reaped(pid)
        assert not os.path.exists(server.socket_path)
        assert collection.next_cleaning_time is None

    def test_lookup_pushes_the_deadline(
        self, clock: FakeClock, collection: passrpc.ServerCollection
    ) -> None:
        """Each lookup moves the deadline to now + max_idle_time."""
        factory = Factory(max_idle_time=10)
        server = collection.lookup_or_add("app", factory)
        clock.now = 5
        assert collection.lookup_or_add("app", factory) is server
        assert server.next_cleaning_time == 15
        assert collection.next_cleaning_time == 15
        clock.now = 12
        collection.check_idle_servers()
        assert "app" in collection
        clock.now = 15
        collection.check_idle_servers()
        assert "app" not in collection
        assert factory.calls == 1

    def test_server_in_use_is_kept_until_its_block_ends(
        self, clock: FakeClock, collection: passrpc.ServerCollection
    ) -> None:
        """Inside use() the server outlives its deadline; the block's end sets a new one."""
        factory = Factory(max_idle_time=10)
        with collection.use("app", factory) as server:
            with collection.use("app", factory) as inner:
                assert inner is server
                assert collection.statistics().in_use == 2
            clock.now = 100
            collection.check_idle_servers()
            assert "app" in collection
            assert server.alive
        assert server.next_cleaning_time == 110
        clock.now = 109
        collection.check_idle_servers()
        assert "app" in collection
        clock.now = 110
        collection.check_idle_servers()
        assert "app" not in collection
        assert not server.started

    @pytest.mark.parametrize("max_idle_time", [None, 0])
    def test_no_max_idle_time_means_never_cleaned(
        self,
        max_idle_time: float | None,
        clock: FakeClock,
        collection: passrpc.ServerCollection,
    ) -> None:
        """A server without max_idle_time has no deadline and is never idle-cleaned."""
        server = collection.lookup_or_add("app", Factory(max_idle_time=max_idle_time))
        assert server.next_cleaning_time is None
        assert collection.next_cleaning_time is None
        clock.now = 1e9
        collection.check_idle_servers()
        assert "app" in collection

    def test_next_cleaning_time_is_the_earliest_deadline(
        self, clock: FakeClock, collection: passrpc.ServerCollection
    ) -> None:
        """The collection's next_cleaning_time is its earliest server deadline."""
        assert collection.next_cleaning_time is None
        collection.lookup_or_add("slow", Factory(max_idle_time=10))
        collection.lookup_or_add("fast", Factory(max_idle_time=5))
        assert collection.next_cleaning_time == 5
        clock.now = 5
        collection.check_idle_servers()
        assert [key for key, _ in collection] == ["slow"]
        assert collection.next_cleaning_time == 10

    def test_lookups_do_not_grow_the_heap(
        self, clock: FakeClock, collection: passrpc.ServerCollection
    ) -> None:
        """Repeated lookups keep one heap item per server (deadlines move lazily)."""
        factory = Factory(max_idle_time=10)
        for step in range(200):
            clock.now = step / 10
            collection.lookup_or_add("app", factory)
        assert collection.statistics().deadlines == 1
        assert collection.next_cleaning_time == pytest.approx(19.9 + 10)

    def test_cleaner_thread_stops_an_idle_server_by_itself(
        self, real_collection: passrpc.ServerCollection
    ) -> None:
        """With the real clock, the cleaner thread stops the server after max_idle_time."""
        server = real_collection.lookup_or_add(
            "app", Factory(max_idle_time=0.05, cls=SignallingServer)
        )
        assert isinstance(server, SignallingServer)
        pid = server.pid
        assert pid is not None
        assert server.stopped.wait(WAIT)
        wait_for(lambda: real_collection.statistics().stopping == 0, what="the stop to finish")
        assert "app" not in real_collection
        assert_reaped(pid)

    def test_cleaner_wakes_for_an_earlier_deadline(
        self, real_collection: passrpc.ServerCollection
    ) -> None:
        """A new earlier deadline wakes a cleaner that was sleeping for an hour."""
        real_collection.lookup_or_add("hour", Factory(max_idle_time=3600))
        assert real_collection.statistics().deadlines == 1
        server = real_collection.lookup_or_add(
            "soon", Factory(max_idle_time=0.05, cls=SignallingServer)
        )
        assert isinstance(server, SignallingServer)
        assert server.stopped.wait(WAIT)
        assert "hour" in real_collection


class TestIsolation:
    """One key's slow start or stop never holds up another key."""

    def test_slow_factory_does_not_block_other_keys(
        self, collection: passrpc.ServerCollection
    ) -> None:
        """While key A's factory is stuck, a lookup of key B completes."""
        entered, go = threading.Event(), threading.Event()
        thread_a, out_a, _ = run_thread(
            lambda: collection.lookup_or_add("a", Factory(before=blocker(entered, go)))
        )
        try:
            assert entered.wait(WAIT)
            _, out_b, done_b = run_thread(lambda: collection.lookup_or_add("b", Factory()))
            assert done_b.wait(WAIT), "the lookup of b waited for a's factory"
            assert out_b["result"].alive
            assert "a" not in collection  # still starting
        finally:
            go.set()
            thread_a.join(WAIT)
        assert out_a["result"].alive

    def test_slow_stop_does_not_block_other_keys(
        self, collection: passrpc.ServerCollection
    ) -> None:
        """While key A's server is stopping, a lookup of key B completes and A's lookup waits."""
        SlowStopServer.stopping.clear()
        SlowStopServer.go.clear()
        factory_a = Factory(cls=SlowStopServer)
        old = collection.lookup_or_add("a", factory_a)
        deleting, deleted, _ = run_thread(lambda: collection.delete("a"))
        try:
            assert SlowStopServer.stopping.wait(WAIT)
            _, out_b, done_b = run_thread(lambda: collection.lookup_or_add("b", Factory()))
            assert done_b.wait(WAIT), "the lookup of b waited for a's stop"
            assert out_b["result"].alive
            waiter, again, _ = run_thread(lambda: collection.lookup_or_add("a", factory_a))
            wait_for(lambda: collection.statistics().waiting == 1, what="the second lookup to wait")
            assert factory_a.calls == 1
        finally:
            SlowStopServer.go.set()
            deleting.join(WAIT)
        waiter.join(WAIT)
        assert deleted["result"] is True
        assert again["result"] is not old
        assert again["result"].alive
        assert factory_a.calls == 2


class TestRemoval:
    """delete, clear, close and the context manager stop what they remove."""

    def test_delete_stops_the_server(self, collection: passrpc.ServerCollection) -> None:
        """delete() stops and removes the key's server; True once, then False."""
        server = collection.lookup_or_add("app", Factory())
        pid = server.pid
        assert pid is not None
        assert collection.delete("app") is True
        assert "app" not in collection
        assert_reaped(pid)
        assert collection.delete("app") is False

    def test_delete_stops_a_server_in_use(self, collection: passrpc.ServerCollection) -> None:
        """An explicit delete() stops a server even inside a use() block."""
        with collection.use("app", Factory()) as server:
            assert collection.delete("app") is True
            assert not server.alive
        assert collection.statistics() == passrpc._collection.CollectionStatistics(0, 0, 0, 0, 0, 0)

    def test_clear_stops_every_server(self, collection: passrpc.ServerCollection) -> None:
        """clear() stops and removes all servers; the collection stays usable."""
        servers = [collection.lookup_or_add(key, Factory()) for key in "abc"]
        collection.clear()
        assert len(collection) == 0
        assert not any(server.alive for server in servers)
        assert collection.lookup_or_add("a", Factory()).alive

    def test_iteration_is_a_snapshot(self, collection: passrpc.ServerCollection) -> None:
        """Iterating while servers are deleted neither fails nor skips the snapshot's pairs."""
        for name in "abc":
            collection.lookup_or_add(name, Factory())
        seen = []
        for key, server in collection:
            collection.delete(key)
            seen.append((key, server.started))
        assert seen == [("a", False), ("b", False), ("c", False)]

    def test_close_leaves_no_process_and_no_socket_file(
        self, no_fd_leak: None, sockdir: Path, clock: FakeClock
    ) -> None:
        """close() stops every server and the cleaner; it is idempotent and len/in still answer."""
        collection = passrpc.ServerCollection(clock=clock)
        servers = [
            collection.lookup_or_add(key, Factory(max_idle_time=10, socket_dir=sockdir))
            for key in "abc"
        ]
        pids = [server.pid for server in servers]
        cleaner = collection._cleaner
        assert cleaner is not None
        assert cleaner.is_alive()
        collection.close()
        for pid in pids:
            assert pid is not None
            assert_reaped(pid)
        assert list(sockdir.iterdir()) == []
        assert not cleaner.is_alive()
        collection.close()
        assert collection.closed
        assert len(collection) == 0
        assert "a" not in collection
        assert list(collection) == []
        with pytest.raises(CollectionClosed, match="closed"):
            collection.lookup_or_add("a", Factory())

    def test_context_manager_closes(self) -> None:
        """Leaving the with block closes the collection and stops its servers."""
        with passrpc.ServerCollection() as collection:
            server = collection.lookup_or_add("app", Factory())
        assert collection.closed
        assert not server.started

    def test_close_stops_a_server_that_was_starting(self, no_fd_leak: None) -> None:
        """A server whose start overlaps close() is stopped, and its caller is told."""
        collection = passrpc.ServerCollection()
        entered, go = threading.Event(), threading.Event()
        factory = Factory(before=blocker(entered, go))
        starter, out, _ = run_thread(lambda: collection.lookup_or_add("app", factory))
        assert entered.wait(WAIT)
        closer, _, closed = run_thread(collection.close)
        wait_for(lambda: collection.closed, what="the collection to close")
        go.set()
        assert closed.wait(WAIT)
        starter.join(WAIT)
        closer.join(WAIT)
        assert isinstance(out["error"], CollectionClosed)
        assert not factory.made[0].started
        assert factory.made[0].last_pid is not None
        assert_reaped(factory.made[0].last_pid)
        assert len(collection) == 0
        assert collection.statistics().stopping == 0


class BareServer:
    """Only what the collection uses of a server: no process, for heap bookkeeping tests."""

    def __init__(self, max_idle_time: float | None) -> None:
        self.max_idle_time = max_idle_time
        self.next_cleaning_time: float | None = None
        self.started = False
        self.alive = False

    def start(self) -> None:
        self.started = self.alive = True

    def stop(self) -> None:
        self.started = self.alive = False


def bare(server: BareServer) -> Callable[[], passrpc.Server]:
    """A factory returning ``server``, typed as the collection expects."""
    return lambda: cast(passrpc.Server, server)


class TestHeap:
    """The cleaner's heap stays small and exact however deadlines move."""

    def test_deleted_servers_do_not_pile_up_in_the_heap(
        self, collection: passrpc.ServerCollection
    ) -> None:
        """Stale heap items of deleted servers are compacted away."""
        for i in range(300):
            collection.lookup_or_add(i, bare(BareServer(3600)))
        assert collection.statistics().deadlines == 300
        for i in range(290):
            collection.delete(i)
        assert collection.statistics().deadlines < 300 // 2
        assert collection.next_cleaning_time == 3600

    def test_a_shorter_max_idle_time_moves_the_deadline_earlier(
        self, clock: FakeClock, collection: passrpc.ServerCollection
    ) -> None:
        """Lowering max_idle_time takes effect at the next lookup, earlier than the old deadline."""
        server = BareServer(100)
        collection.lookup_or_add("app", bare(server))
        assert collection.next_cleaning_time == 100
        server.max_idle_time = 10
        clock.now = 1
        collection.lookup_or_add("app", bare(server))
        assert collection.next_cleaning_time == 11
        clock.now = 11
        collection.check_idle_servers()
        assert "app" not in collection
        assert not server.started
        assert collection.statistics().deadlines <= 1
