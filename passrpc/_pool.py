"""The worker pool: a bounded number of threads for the connections that have work.

After gunicorn's threaded worker (``gunicorn/workers/gthread.py``): the
server's loop parks idle connections in its poller and submits the ones that
become readable here; a pool thread serves each until it has nothing more to
do. Jobs wait first in, first out while every thread is busy. Threads start
on demand, up to the pool's size, and end after a while without work, so an
idle server holds few.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

logger = logging.getLogger("passrpc")

#: Seconds a pool thread waits for a job before it ends: long enough that a
#: steady trickle of work never pays for starting threads, short enough that
#: a burst's threads do not outstay it by much.
IDLE_THREAD_SECONDS = 30.0

J = TypeVar("J")


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
        self._jobs: queue.SimpleQueue[J | None] = queue.SimpleQueue()
        #: True while no job waits for a thread: a thread may keep serving its
        #: connection instead of giving way (SimpleQueue.empty: cheap, C).
        self.nobody_waits = self._jobs.empty
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self._idle = 0  # threads waiting for a job that no submit() has claimed yet

    def submit(self, job: J) -> bool:
        """Queue ``job`` for the next free thread; start one if none is free and there is room.

        Returns:
            False when a thread had to be started and could not be (the
            process is out of threads or memory): the job was not queued.
        """
        with self._lock:
            if self._idle or len(self._threads) >= self.size:
                if self._idle:
                    self._idle -= 1  # that waiting thread takes this job (or an earlier one)
                self._jobs.put(job)
                return True
            thread = self._thread_class(target=self._work, name="passrpc-worker", daemon=True)
            self._threads.add(thread)
        try:
            thread.start()
        except RuntimeError as exc:
            logger.warning("cannot start a client thread (%s); backing off", exc)
            with self._lock:
                self._threads.discard(thread)
            return False
        self._jobs.put(job)
        return True

    def _work(self) -> None:
        jobs = self._jobs
        job = jobs.get()
        while job is not None:
            try:
                self._run(job)
            except Exception:
                logger.exception("a client connection failed")
            job = None  # let go of it while waiting for the next
            with self._lock:
                self._idle += 1
            try:
                job = jobs.get(timeout=IDLE_THREAD_SECONDS)
            except queue.Empty:
                with self._lock:
                    if self._idle:  # no submit() counts on this thread: it may end
                        self._idle -= 1
                        self._threads.discard(threading.current_thread())
                        return
                job = jobs.get()  # claimed just as the wait ended: the job is coming
        with self._lock:
            self._threads.discard(threading.current_thread())

    def owns(self, thread: threading.Thread) -> bool:
        """Whether ``thread`` is one of this pool's."""
        with self._lock:
            return thread in self._threads

    @property
    def threads(self) -> int:
        """How many threads the pool has now."""
        with self._lock:
            return len(self._threads)

    def close(self, timeout: float) -> int:
        """Let every thread end once the jobs queued before now are done; wait up to ``timeout`` s.

        Returns:
            How many threads were still running (their handlers, say) when
            the time was up; they are left to finish (daemon threads).
        """
        with self._lock:
            threads = list(self._threads)
        for _ in threads:
            self._jobs.put(None)
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return sum(thread.is_alive() for thread in threads)
