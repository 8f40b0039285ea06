"""The entries of a ServerCollection and the heap of their idle deadlines.

An :class:`Entry` is one key's slot in the collection's map: its state
(starting, running, stopping, gone), its server, and the events that
callers waiting for the key sleep on. :class:`IdleDeadlines` is the
cleaner's heap over the entries, lazy as the ``_collection`` module
describes. Neither takes a lock: the collection holds its own around them,
and decides when servers start, expire and stop.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
from collections.abc import Callable, Hashable
from typing import Any

from ._errors import ServerNotStarted

logger = logging.getLogger("passrpc")

# Entry states. An entry is in the map from the moment a lookup decides to
# create its server until its server has been stopped (or failed to start).
STARTING = 0  # the factory or start() runs; lookups of the key wait on `started`
RUNNING = 1  # the server is returned to lookups
STOPPING = 2  # stop() runs; lookups of the key wait on `removed`, then start a new one
GONE = 3  # out of the map

#: Rebuild the heap once it holds this many stale items and they outnumber
#: the valid ones: stale items come from deleted servers and from deadlines
#: moved earlier, and would otherwise wait in the heap until their time.
_COMPACT_MIN_STALE = 64


class Entry:
    """One key's slot in the map; every field is guarded by the collection's lock."""

    __slots__ = (
        "checking",
        "creator",
        "expired",
        "heap_item",
        "key",
        "removed",
        "server",
        "started",
        "state",
        "uses",
    )

    def __init__(self, key: Hashable) -> None:
        self.key = key
        self.state = STARTING
        self.server: Any = None
        self.uses = 0
        # The entry's one valid heap item, or None; an item in the heap that
        # is not its entry's heap_item is stale and is discarded when popped.
        self.heap_item: tuple[float, int, Entry] | None = None
        self.expired = False  # stopping because it was idle
        self.creator = threading.get_ident()
        self.started = threading.Event()  # set when the entry leaves STARTING
        self.removed = threading.Event()  # set when the entry leaves the map
        # Held while one thread asks the server whether it lives, or stops it:
        # Server.alive reaps a dead process and closes its pidfd, which must
        # not run in two threads at once (nor beside stop()). It is per key:
        # lookups of other keys never wait on it, and lookups of this key
        # take turns only for the microseconds of a non-blocking waitpid.
        self.checking = threading.Lock()

    def server_alive(self) -> bool:
        """Ask the server whether its process lives (reaping it if not), holding ``checking``."""
        with self.checking:
            return bool(self.server.alive)

    def stop_server(self) -> None:
        """Stop the entry's server, outside the map lock; log, never raise, an Exception."""
        try:
            with self.checking:
                self.server.stop()
        except ServerNotStarted:
            pass  # someone stopped it behind the collection's back: nothing to do
        except Exception:
            logger.exception("stopping the server for %r failed", self.key)


class IdleDeadlines:
    """The cleaner's heap of idle deadlines, at most one valid item per entry.

    An item is ``(deadline, seq, entry)``. It is valid while it is its
    entry's ``heap_item``; any other item is stale (its server was deleted,
    or its deadline moved earlier) and is discarded when it comes up, or
    when stale items pile up and the heap is rebuilt. Every method runs
    under the collection's lock, of which ``wakeup`` is a Condition.
    """

    def __init__(
        self,
        entries: dict[Hashable, Entry],
        clock: Callable[[], float],
        wakeup: threading.Condition,
    ) -> None:
        self._entries = entries  # the collection's map, read to rebuild the heap
        self._clock = clock
        self._wakeup = wakeup  # the cleaner sleeps on it
        self._heap: list[tuple[float, int, Entry]] = []
        self._stale = 0  # stale items in the heap
        self._seq = itertools.count()  # ties in the heap never compare entries

    def __len__(self) -> int:
        """Items in the heap, valid and not yet discarded."""
        return len(self._heap)

    def touch(self, entry: Entry) -> bool:
        """Move the entry's deadline to now + max_idle_time; True if that pushed a new item.

        A new item that comes before every other wakes the cleaner.
        """
        server = entry.server
        idle = server.max_idle_time
        if not idle:
            server.next_cleaning_time = None
            return False  # a heap item left behind is discarded when it comes up
        deadline = self._clock() + idle
        server.next_cleaning_time = deadline
        item = entry.heap_item
        if item is not None and item[0] <= deadline:
            return False  # the cleaner finds the later deadline when it reaches the item
        self._push(entry, deadline)
        if item is not None:  # the old item, later than the new one, is stale now
            self._note_stale()
        return True

    def _push(self, entry: Entry, deadline: float) -> None:
        item = (deadline, next(self._seq), entry)
        entry.heap_item = item
        heapq.heappush(self._heap, item)
        if self._heap[0] is item:
            self._wakeup.notify()  # the cleaner must wake earlier than it planned

    def drop(self, entry: Entry) -> None:
        """Make the entry's item, if any, stale: its server is no longer cleaned."""
        if entry.heap_item is not None:
            entry.heap_item = None
            self._note_stale()

    def _note_stale(self) -> None:
        self._stale += 1
        if self._stale >= _COMPACT_MIN_STALE and self._stale * 2 > len(self._heap):
            self._heap = [e.heap_item for e in self._entries.values() if e.heap_item]
            heapq.heapify(self._heap)
            self._stale = 0

    def earliest(self) -> float | None:
        """Fix the heap's top until it is a valid item holding its server's real deadline."""
        heap = self._heap
        while heap:
            item = heap[0]
            deadline, _, entry = item
            if entry.heap_item is not item:
                heapq.heappop(heap)
                self._stale -= 1
                continue
            real = entry.server.next_cleaning_time if entry.state == RUNNING else None
            if real is None:
                heapq.heappop(heap)
                entry.heap_item = None
                continue
            if real != deadline:
                new = (real, next(self._seq), entry)
                entry.heap_item = new
                heapq.heapreplace(heap, new)
                continue
            return deadline
        return None

    def pop_due(self, now: float) -> tuple[list[Entry], float | None]:
        """Take the entries whose deadline is ``now`` or earlier; return them and the next deadline."""
        due: list[Entry] = []
        while True:
            top = self.earliest()
            if top is None or top > now:
                return due, top
            entry = heapq.heappop(self._heap)[2]
            entry.heap_item = None
            due.append(entry)
