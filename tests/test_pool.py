"""WorkerPool: at most ``size`` threads, jobs first in first out once they are all busy."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from passrpc._pool import PoolStatistics, WorkerPool

from .helpers import WAIT, wait_for


class Jobs:
    """Jobs that record which thread ran them, in which order, and can be held."""

    def __init__(self) -> None:
        self.order: list[int] = []
        self.threads: set[str] = set()
        self.gates: dict[int, threading.Event] = {}
        self.running = 0
        self.most = 0
        self.lock = threading.Lock()

    def hold(self, job: int) -> None:
        self.gates[job] = threading.Event()

    def run(self, job: int) -> None:
        with self.lock:
            self.order.append(job)
            self.threads.add(threading.current_thread().name + str(threading.get_ident()))
            self.running += 1
            self.most = max(self.most, self.running)
        gate = self.gates.get(job)
        if gate is not None:
            assert gate.wait(WAIT)
        with self.lock:
            self.running -= 1


@pytest.fixture
def jobs() -> Iterator[Jobs]:
    recorded = Jobs()
    yield recorded
    for gate in recorded.gates.values():
        gate.set()


class TestWorkerPool:
    def test_jobs_wait_first_in_first_out_while_every_thread_is_busy(self, jobs: Jobs) -> None:
        """Two threads held: later jobs queue, and run in the order they came once one is free."""
        pool = WorkerPool(2, jobs.run)
        jobs.hold(0)
        jobs.hold(1)
        assert pool.submit(0)
        assert pool.submit(1)
        wait_for(lambda: jobs.running == 2, what="both threads to hold a job")
        for job in range(2, 8):
            assert pool.submit(job)
        assert len(pool.backlog) == 6  # the deque's truth tells a thread others wait
        jobs.gates[0].set()
        wait_for(lambda: len(jobs.order) == 8, what="the queued jobs to run in the freed thread")
        assert jobs.order[2:] == [2, 3, 4, 5, 6, 7]
        assert jobs.running == 1  # the other thread still holds its job
        jobs.gates[1].set()
        assert jobs.most == 2
        assert pool.close(WAIT) == 0

    def test_threads_start_on_demand_and_are_reused(self, jobs: Jobs) -> None:
        """Jobs one after another need one thread; the pool never passes its size."""
        pool = WorkerPool(8, jobs.run)
        for job in range(20):
            assert pool.submit(job)
            wait_for(lambda: pool.statistics().idle == 1, what="the thread to wait for more")
        assert len(jobs.threads) == 1
        assert pool.statistics() == PoolStatistics(threads=1, idle=1, queued=0)
        assert pool.close(WAIT) == 0

    def test_a_thread_that_cannot_start_refuses_the_job(self, jobs: Jobs) -> None:
        """A failed start returns False: the job was not taken, and a later submit may start one."""
        failures = [1]

        class Failing(threading.Thread):
            def start(self) -> None:
                if failures:
                    failures.pop()
                    raise RuntimeError("can't start new thread")
                super().start()

        pool = WorkerPool(2, jobs.run, Failing)
        assert not pool.submit(0)
        assert pool.submit(1)
        wait_for(lambda: jobs.order == [1], what="the second job")
        assert pool.close(WAIT) == 0

    def test_close_runs_the_queued_jobs_and_reports_those_still_running(self, jobs: Jobs) -> None:
        """close() lets queued jobs run, and counts threads still busy when its time is up."""
        pool = WorkerPool(1, jobs.run)
        jobs.hold(0)
        assert pool.submit(0)
        assert pool.submit(1)
        wait_for(lambda: jobs.running == 1, what="the held job")
        assert pool.close(0.05) == 1  # still held
        jobs.gates[0].set()
        assert pool.close(WAIT) == 0
        assert jobs.order == [0, 1]

    def test_owns_knows_its_threads(self, jobs: Jobs) -> None:
        """owns() is true in a pool thread only (the loop's stop() asks it)."""
        pool: WorkerPool[int] = WorkerPool(
            1, lambda job: jobs.order.append(int(pool.owns(threading.current_thread())))
        )
        assert pool.submit(0)
        wait_for(lambda: jobs.order == [1], what="the job")
        assert not pool.owns(threading.current_thread())
        assert pool.close(WAIT) == 0

    def test_roomy_while_more_than_a_quarter_is_free(self, jobs: Jobs) -> None:
        """roomy() is true while idle plus unstarted threads are over a quarter of the pool."""
        pool = WorkerPool(4, jobs.run)
        assert pool.roomy()  # none started: all four free
        for job in range(3):
            jobs.hold(job)
            assert pool.submit(job)
        wait_for(lambda: jobs.running == 3, what="three held jobs")
        assert not pool.roomy()  # one free of four: not more than a quarter
        jobs.gates[0].set()
        wait_for(lambda: pool.statistics().idle == 1, what="a thread to come free")
        assert pool.roomy()  # two free of four
        for gate in jobs.gates.values():
            gate.set()
        assert pool.close(WAIT) == 0
