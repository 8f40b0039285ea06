"""ServerCollection: running servers by key, and a cleaner that stops idle ones.

Passenger kept its spawn servers in an ``AbstractServerCollection``: a map
from a key (an application root, a framework version) to a running server,
guarded by one lock that was also held while a server started or stopped, so
one slow spawn stalled every application (Passenger issue 420). Here the map
lock guards only the map: each key has an entry with its own state
(starting, running, stopping) and events, and the slow work (the factory,
``start()``, ``stop()``) runs outside the lock. Callers for a key that is
starting or stopping wait on that entry alone.

Idle cleaning keeps a heap of deadlines, at most one valid item per entry.
A lookup only moves the server's ``next_cleaning_time`` later; the heap
item is left as it is (lazily), and when the cleaner reaches it, it finds
the real deadline later and pushes the item again. So a busy server costs
the cleaner one wake-up per ``max_idle_time``, not one per lookup, and the
cleaner sleeps on a Condition until the earliest deadline or until an
earlier one is pushed: no polling, no fixed tick.

The entries and the heap are in ``_entries`` (:class:`Entry`,
:class:`IdleDeadlines`); this module holds the lock around them and decides
when servers start, expire and stop.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from types import TracebackType
from typing import Any, TypeVar

import attrs

from ._entries import GONE, RUNNING, STARTING, STOPPING, Entry, IdleDeadlines
from ._errors import ConfigurationError, Error
from ._server import Server

logger = logging.getLogger("passrpc")

S = TypeVar("S", bound=Server)


class CollectionClosed(Error, RuntimeError):
    """The :class:`ServerCollection` is closed; it starts no more servers.

    You get this from :meth:`ServerCollection.lookup_or_add` and
    :meth:`ServerCollection.use` after :meth:`ServerCollection.close` (or the
    end of its ``with`` block), including for a lookup whose server was
    starting while the collection closed (that server has been stopped).
    Make a new collection to go on.
    """


@attrs.frozen
class CollectionStatistics:
    """A snapshot of a :class:`ServerCollection` (from :meth:`ServerCollection.statistics`).

    Attributes:
        running: servers that lookups return (``len(collection)``).
        starting: keys whose factory or ``start()`` is running.
        stopping: servers being stopped (idle, deleted, dead or closing).
        in_use: ``use()`` blocks open right now, over all servers.
        waiting: threads waiting for a key that is starting or stopping.
        deadlines: items in the cleaner's heap (valid and not yet discarded).
    """

    running: int
    starting: int
    stopping: int
    in_use: int
    waiting: int
    deadlines: int


def _start_server(key: Hashable, factory: Callable[[], Any]) -> Any:
    """Make the server for ``key`` with ``factory()`` and start it, unless it is started."""
    server = factory()
    if not all(hasattr(server, name) for name in ("started", "start", "stop", "alive")):
        raise ConfigurationError(
            f"the factory for {key!r} returned {server!r}, not a passrpc.Server: "
            "make it return a Server (started or not)"
        )
    if not server.started:
        server.start()
    return server


class ServerCollection:
    """Running servers by key, started on first lookup and stopped when idle.

    ``lookup_or_add(key, factory)`` returns the running server for ``key``,
    or makes one with ``factory()`` and starts it; concurrent callers for a
    key get the same server and the factory runs once. Each lookup moves the
    server's ``next_cleaning_time`` to now + its ``max_idle_time`` (None or 0:
    never idle-cleaned), and a cleaner thread stops servers whose time has
    passed, unless they are inside a :meth:`use` block. A server whose
    process exited by itself is replaced on the next lookup. Starting or
    stopping one key's server never blocks lookups of other keys.

    The collection belongs to the process that made it: its servers are
    children of that process, and a forked child must not use it.

    Args:
        clock: the time source for deadlines, monotonic, in seconds
            (``time.monotonic``). Tests inject a fake one and call
            :meth:`check_idle_servers`; the cleaner thread cannot sleep on a
            fake clock, so it sleeps for (earliest deadline - ``clock()``)
            seconds of real time, re-reading the clock when it wakes.
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)  # the cleaner sleeps on it
        self._entries: dict[Hashable, Entry] = {}
        self._deadlines = IdleDeadlines(self._entries, clock, self._wakeup)
        self._running = 0
        self._waiting = 0
        self._closed = False
        self._cleaner: threading.Thread | None = None

    # Lookups ------------------------------------------------------------------

    def lookup_or_add(self, key: Hashable, factory: Callable[[], S]) -> S:
        """Return the running server for ``key``, starting one with ``factory()`` if needed.

        ``factory`` takes no arguments and returns a :class:`Server`; the
        collection calls its ``start()`` unless it is already started (start
        it yourself, with ``method="spawn"`` say, to choose how). Concurrent
        callers for one key get the same server and only one of them calls
        its factory; callers for other keys are never held up by it. A server
        whose process has exited is stopped (to reap it) and replaced. The
        lookup moves the server's ``next_cleaning_time`` to now +
        ``max_idle_time``.

        If the factory or ``start()`` raises, nothing is kept and the error
        reaches this caller; threads that were waiting for the same key then
        retry, and one of them calls its own factory. So the error you get
        always comes from your own factory.

        Raises:
            CollectionClosed: the collection is closed.
            ConfigurationError: ``factory`` looked up its own key (that would
                wait for itself forever).
            Exception: whatever ``factory()`` or ``start()`` raised
                (:class:`StartError`, say).
        """
        return self._acquire(key, factory, pin=False)[1]  # type: ignore[no-any-return]

    @contextlib.contextmanager
    def use(self, key: Hashable, factory: Callable[[], S]) -> Iterator[S]:
        """Look up (or start) the server for ``key`` and hold it for the ``with`` block.

        ``with collection.use(key, factory) as server:`` works as
        :meth:`lookup_or_add`, and the cleaner does not stop the server while
        the block runs, however long it takes (a use count; blocks may nest
        and run in many threads). When the block ends the deadline is pushed
        to now + ``max_idle_time``. :meth:`delete`, :meth:`clear` and
        :meth:`close` still stop it: those are explicit.

        Raises:
            The same as :meth:`lookup_or_add`.
        """
        entry, server = self._acquire(key, factory, pin=True)
        try:
            yield server
        finally:
            with self._lock:
                entry.uses -= 1
                if entry.state == RUNNING:
                    self._touch_locked(entry)

    def _acquire(
        self, key: Hashable, factory: Callable[[], Any], *, pin: bool
    ) -> tuple[Entry, Any]:
        while True:
            # Peek without the map lock and check that the server's process
            # lives (a non-blocking waitpid) before taking it, so a lookup
            # holds the map lock once, briefly, and only to read and write the
            # map. What the peek saw is verified under the map lock below.
            seen = self._entries.get(key)
            alive = None
            if seen is not None and seen.state == RUNNING and seen.server is not None:
                alive = seen.server_alive()
            with self._lock:
                if self._closed:
                    raise CollectionClosed(
                        f"cannot look up {key!r}: the ServerCollection is closed; make a new one"
                    )
                entry = self._entries.get(key)
                if entry is None:
                    entry = self._entries[key] = Entry(key)
                    state = GONE  # "create it"
                else:
                    state = entry.state
                    if state == RUNNING:
                        if entry is not seen or alive is None:
                            continue  # it changed since the peek: peek again
                        if alive:
                            if pin:
                                entry.uses += 1
                            self._touch_locked(entry)
                            return entry, entry.server
                        self._mark_stopping_locked(entry)  # dead: replace it
                    elif state == STARTING and entry.creator == threading.get_ident():
                        raise ConfigurationError(
                            f"the factory for {key!r} looked up {key!r} itself, which would "
                            "wait for itself forever; a factory must not use its own key"
                        )
                    else:
                        self._waiting += 1
            if state == GONE:
                return entry, self._create(entry, factory, pin=pin)
            if state == RUNNING:
                logger.warning(
                    "the server for %r (pid %s) exited by itself; replacing it",
                    key,
                    getattr(entry.server, "pid", "?"),
                )
                self._stop_and_remove(entry)
                continue
            try:
                (entry.started if state == STARTING else entry.removed).wait()
            finally:
                with self._lock:
                    self._waiting -= 1

    def _create(self, entry: Entry, factory: Callable[[], Any], *, pin: bool) -> Any:
        """Run the factory and start its server, outside the lock; the entry is STARTING."""
        try:
            server = _start_server(entry.key, factory)
        except BaseException:
            # start() cleans up after itself (kills the child, removes the
            # socket); the entry must go too, and waiters retry.
            with self._lock:
                self._remove_locked(entry)
            entry.started.set()
            entry.removed.set()
            raise
        with self._lock:
            entry.server = server
            closed = self._closed
            if closed:
                entry.state = STOPPING
            else:
                entry.state = RUNNING
                self._running += 1
                entry.uses = 1 if pin else 0
                self._touch_locked(entry)
        entry.started.set()
        if closed:
            self._stop_and_remove(entry)
            raise CollectionClosed(
                f"the ServerCollection closed while the server for {entry.key!r} started; "
                "that server has been stopped"
            )
        return server

    # Deadlines ----------------------------------------------------------------

    def _touch_locked(self, entry: Entry) -> None:
        """Move the entry's deadline on (:meth:`IdleDeadlines.touch`); start the cleaner if needed."""
        if self._deadlines.touch(entry) and self._cleaner is None and not self._closed:
            self._cleaner = threading.Thread(
                target=self._run_cleaner, name="passrpc-collection-cleaner", daemon=True
            )
            self._cleaner.start()

    @property
    def next_cleaning_time(self) -> float | None:
        """The earliest deadline of a server in the collection (its clock), or None."""
        with self._lock:
            return self._deadlines.earliest()

    def check_idle_servers(self) -> list[Hashable]:
        """Stop every server whose deadline has passed, now, in the calling thread.

        The cleaner thread does this by itself when the earliest deadline
        comes; call it when you inject a fake clock and move it (tests), or
        to force a pass. Servers inside a :meth:`use` block are kept. It
        returns once every expired server is stopped, including any the
        cleaner thread was stopping at the same moment.

        Returns:
            The keys of the servers this call stopped (the cleaner thread may
            have taken some first).
        """
        now = self._clock()
        with self._lock:
            # Stops the cleaner thread began before this pass are part of "now".
            others = [e for e in self._entries.values() if e.state == STOPPING and e.expired]
            expired, _ = self._expire_locked(now)
        self._stop_expired(expired)
        if threading.current_thread() is not self._cleaner:
            for entry in others:
                entry.removed.wait()
        return [entry.key for entry in expired]

    def _expire_locked(self, now: float) -> tuple[list[Entry], float | None]:
        """Take the servers whose deadline is ``now`` or earlier; return them and the next deadline."""
        due, top = self._deadlines.pop_due(now)
        expired: list[Entry] = []
        for entry in due:
            if entry.uses:
                continue  # in use: the end of its use block sets a new deadline
            entry.expired = True
            self._mark_stopping_locked(entry)
            expired.append(entry)
        return expired, top

    def _stop_expired(self, expired: list[Entry]) -> None:
        if not expired:
            return
        try:
            for entry in expired:
                logger.info(
                    "stopping the server for %r (pid %s): idle for %s s",
                    entry.key,
                    getattr(entry.server, "pid", "?"),
                    entry.server.max_idle_time,
                )
                entry.stop_server()
        finally:
            # One hold of the lock for the whole batch: under contention each
            # acquisition can cost the cleaner a wait for the GIL.
            with self._lock:
                for entry in expired:
                    self._remove_locked(entry)
            for entry in expired:
                entry.removed.set()

    def _run_cleaner(self) -> None:
        while True:
            try:
                with self._lock:
                    # Wake, read the clock and take the expired servers in one
                    # hold of the lock: every extra acquisition would compete
                    # with lookups and make the expiry later.
                    while True:
                        if self._closed:
                            return
                        now = self._clock()
                        expired, top = self._expire_locked(now)
                        if expired:
                            break
                        # Real seconds from the clock's difference: with a fake
                        # clock the thread wakes, reads it again, sleeps again.
                        timeout = None if top is None else min(top - now, threading.TIMEOUT_MAX)
                        self._wakeup.wait(timeout)
                self._stop_expired(expired)
            except Exception:
                # The cleaner must outlive a bad clock or server; the pause
                # keeps a clock that always raises from spinning the thread.
                logger.exception("the ServerCollection cleaner failed a pass; retrying in 1 s")
                with self._lock:
                    if not self._closed:
                        self._wakeup.wait(1.0)

    # Removal ------------------------------------------------------------------

    def _mark_stopping_locked(self, entry: Entry) -> None:
        if entry.state == RUNNING:
            self._running -= 1
        entry.state = STOPPING
        self._deadlines.drop(entry)

    def _remove_locked(self, entry: Entry) -> None:
        if self._entries.get(entry.key) is entry:
            del self._entries[entry.key]
        if entry.state == RUNNING:
            self._running -= 1
        entry.state = GONE
        self._deadlines.drop(entry)

    def _stop_and_remove(self, entry: Entry) -> None:
        """Stop the entry's server outside the lock, then take the entry out of the map."""
        try:
            entry.stop_server()
        finally:
            with self._lock:
                self._remove_locked(entry)
            entry.removed.set()

    def delete(self, key: Hashable) -> bool:
        """Stop the server for ``key`` and remove it; True if this call stopped one.

        A server that is starting is waited for and then stopped; one inside
        a :meth:`use` block is stopped all the same (you asked). If another
        thread is already stopping it, this waits for that and returns False.

        Raises:
            ConfigurationError: called from the factory of ``key`` itself.
        """
        while True:
            with self._lock:
                entry = self._entries.get(key)
                if entry is None:
                    return False
                state = entry.state
                if state == RUNNING:
                    self._mark_stopping_locked(entry)
                elif state == STARTING and entry.creator == threading.get_ident():
                    raise ConfigurationError(
                        f"the factory for {key!r} deleted {key!r}, which would wait for "
                        "itself forever"
                    )
            if state == RUNNING:
                self._stop_and_remove(entry)
                return True
            if state == STARTING:
                entry.started.wait()
                continue
            entry.removed.wait()
            return False

    def clear(self) -> None:
        """Stop and remove every server in the collection (see :meth:`delete`)."""
        with self._lock:
            keys = list(self._entries)
        for key in keys:
            self.delete(key)

    def close(self) -> None:
        """Stop the cleaner and every server; lookups raise :class:`CollectionClosed` after.

        Servers that are starting are stopped once started; those inside a
        :meth:`use` block are stopped too. Closing twice is harmless, and
        ``len()``, ``in`` and iteration still answer (empty) afterwards.
        """
        with self._lock:
            self._closed = True
            self._wakeup.notify_all()
            cleaner = self._cleaner
        if cleaner is not None and cleaner is not threading.current_thread():
            cleaner.join()
        self.clear()

    def __enter__(self) -> ServerCollection:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # Inspection ---------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has been called."""
        return self._closed

    def __len__(self) -> int:
        """The number of running servers (not counting ones starting or stopping)."""
        return self._running

    def __contains__(self, key: object) -> bool:
        """True if ``key`` has a running server (not one starting or stopping)."""
        with self._lock:
            entry = self._entries.get(key)
            return entry is not None and entry.state == RUNNING

    def __iter__(self) -> Iterator[tuple[Hashable, Any]]:
        """Iterate over ``(key, server)`` pairs of running servers, as a snapshot."""
        with self._lock:
            pairs = [(e.key, e.server) for e in self._entries.values() if e.state == RUNNING]
        return iter(pairs)

    def statistics(self) -> CollectionStatistics:
        """Return a snapshot of what the collection is doing (see :class:`CollectionStatistics`)."""
        with self._lock:
            states = [e.state for e in self._entries.values()]
            return CollectionStatistics(
                running=self._running,
                starting=states.count(STARTING),
                stopping=states.count(STOPPING),
                in_use=sum(e.uses for e in self._entries.values() if e.state == RUNNING),
                waiting=self._waiting,
                deadlines=len(self._deadlines),
            )

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self._running} running"
        return f"<{type(self).__name__} {state}>"
