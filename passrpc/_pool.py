"""The worker pool: a bounded number of threads for the connections that have work.

After gunicorn's threaded worker (``gunicorn/workers/gthread.py``): the
server's loop parks idle connections in its poller and submits the ones that
become readable here; a pool thread serves each until it has nothing more to
do. Jobs wait first in, first out while every thread is busy. Threads start
on demand, up to the pool's size, and end after a while without work, so an
idle server holds few. The thread that went idle last takes the next job:
its stack and the data it touched are still in the CPU's caches.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

import attrs

logger = logging.getLogger("passrpc")

#: Seconds a pool thread waits for a job before it ends: long enough that a
#: steady trickle of work never pays for starting threads, short enough that
#: a burst's threads do not outstay it by much.
IDLE_THREAD_SECONDS = 30.0

J = TypeVar("J")


@attrs.frozen
class PoolStatistics:
    """A pool's figures at one moment (see :meth:`WorkerPool.statistics`)."""

    threads: int
    idle: int
    queued: int


class _Idle(Generic[J]):
    """A pool thread waiting for its next job, and the inbox it waits on."""

    __slots__ = ("inbox", "thread")

    def __init__(self, thread: threading.Thread) -> None:
        self.thread = thread
        self.inbox: queue.SimpleQueue[J | None] = queue.SimpleQueue()


class WorkerPool(Generic[J]):
    """Runs ``run(job)`` for each submitted job in one of at most ``size`` threads.

    Args:
        size: the most threads at once.
        run: what a thread does with a job; an exception it lets out is logged.
        thread_class: makes the threads (tests inject one that fails to start).
    """

    def __init__(
        self,
        size: int,
        run: Callable[[J], object],
        thread_class: type[threading.Thread] = threading.Thread,
    ) -> None:
        self.size = size
        self._run = run
        self._thread_class = thread_class
        self._lock = threading.Lock()
        #: Jobs that wait for a thread, first in, first out. True while not
        #: empty: a thread then takes only what has arrived for its
        #: connection, and leaves it to the poller sooner.
        self.backlog: collections.deque[J] = collections.deque()
        self._idle: list[_Idle[J]] = []  # a stack: the last to go idle is woken first
        self._threads: set[threading.Thread] = set()
        self._closing = False

    def submit(self, job: J) -> bool:
        """Give ``job`` to an idle thread, or a new one, or queue it until a thread is free.

        Returns:
            False when a thread had to be started and could not be (the
            process is out of threads or memory): the job was not taken.
        """
        with self._lock:
            if self._idle:
                self._idle.pop().inbox.put(job)
                return True
            if len(self._threads) >= self.size:
                self.backlog.append(job)
                return True
            thread = self._thread_class(
                target=self._work, args=(job,), name="passrpc-worker", daemon=True
            )
            self._threads.add(thread)
        try:
            thread.start()
        except RuntimeError as exc:
            logger.warning("cannot start a client thread (%s); backing off", exc)
            with self._lock:
                self._threads.discard(thread)
            return False
        return True

    def _work(self, job: J | None) -> None:
        me = _Idle[J](threading.current_thread())
        while job is not None:
            try:
                self._run(job)
            except Exception:
                logger.exception("a client connection failed")
            job = self._next(me)
        with self._lock:
            self._threads.discard(me.thread)

    def _next(self, me: _Idle[J]) -> J | None:
        """The next job for this thread, first from the backlog; None to end the thread."""
        with self._lock:
            if self.backlog:
                return self.backlog.popleft()
            if self._closing:
                return None
            self._idle.append(me)
        try:
            return me.inbox.get(timeout=IDLE_THREAD_SECONDS)
        except queue.Empty:
            with self._lock:
                if me in self._idle:
                    self._idle.remove(me)
                    return None
            return me.inbox.get()  # claimed just as the wait ended: the job is coming

    def roomy(self) -> bool:
        """Whether more than a quarter of the pool is free: idle threads, or threads not started.

        Read without the lock: a hint, for a thread deciding whether to go
        on waiting for its connection's next bytes. (With this quarter kept
        free, new work finds a thread at once.)
        """
        return len(self._idle) + self.size - len(self._threads) > self.size // 4

    def statistics(self) -> PoolStatistics:
        """How many threads the pool has, how many of them wait for a job, and how many jobs wait."""
        with self._lock:
            return PoolStatistics(len(self._threads), len(self._idle), len(self.backlog))

    def owns(self, thread: threading.Thread) -> bool:
        """Whether ``thread`` is one of this pool's."""
        with self._lock:
            return thread in self._threads

    def close(self, timeout: float) -> int:
        """Let every thread end once the queued jobs are done; wait up to ``timeout`` s for them.

        Returns:
            How many threads were still running (their handlers, say) when
            the time was up; they are left to finish (daemon threads).
        """
        with self._lock:
            self._closing = True
            for idle in self._idle:
                idle.inbox.put(None)
            self._idle.clear()
            threads = list(self._threads)
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return sum(thread.is_alive() for thread in threads)
