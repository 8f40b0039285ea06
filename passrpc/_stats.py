"""Call statistics: exact counts, and durations in a log-bucket histogram.

The server's dispatch keeps one :class:`HandlerCounters` per handler. Calls
and errors are counted exactly, by ``itertools.count`` objects (advancing one
is a single C call, safe across threads under the GIL). Durations are
measured for one call in :data:`SAMPLE_EVERY` (every call when the passrpc
logger logs at DEBUG as the server starts): reading the clock twice costs more than the 3 % of a
call's server-side instructions that counting may take, while counting
alone costs under 1 %. The sampled call is the n-th of each handler with
``n % SAMPLE_EVERY == 0``, a prime, so a client whose calls alternate
between short and long ones in any shorter period is sampled across all of
them.

The histogram keeps 16 buckets per power of two of a duration in
nanoseconds: a bucket is at most 1/16 as wide as its lower bound, so the
midpoint it reports for a percentile is within 3.2 % of every duration in it.
"""

from __future__ import annotations

import itertools
import threading
from typing import Any

#: One call in this many is timed (a prime: see the module's docstring).
SAMPLE_EVERY = 17
#: Durations below 2**_EXACT_BITS ns have a bucket each.
_EXACT_BITS = 5
#: Sampled durations wait in a list (one C call to add one) and are folded
#: into the histogram by the status request, or when this many wait.
_FOLD_AT = 4096


def bucket(ns: int) -> int:
    """The histogram bucket of a duration of ``ns`` nanoseconds (16 per power of two)."""
    bits = ns.bit_length()
    if bits <= _EXACT_BITS:
        return ns
    return (bits << 4) | ((ns >> (bits - _EXACT_BITS)) & 15)


def bucket_midpoint(key: int) -> float:
    """The duration, in nanoseconds, a bucket stands for: the middle of its range."""
    if key < 1 << _EXACT_BITS:
        return float(key)
    bits, sub = key >> 4, key & 15
    shift = bits - _EXACT_BITS
    return float(((16 | sub) << shift) + (1 << shift) / 2)


def percentile(histogram: dict[int, int], fraction: float) -> float:
    """The duration (ns) under which ``fraction`` of the measured calls fell; 0.0 for none."""
    total = sum(histogram.values())
    if not total:
        return 0.0
    rank = fraction * total
    seen = 0
    for key in sorted(histogram):
        seen += histogram[key]
        if seen >= rank:
            return bucket_midpoint(key)
    return bucket_midpoint(max(histogram))  # pragma: no cover - the loop always returns


def _current(counter: itertools.count[int]) -> int:
    # repr is "count(N)" or "count(N, STEP)": the one way to read a count
    # without advancing it (its pickling support goes away in Python 3.14).
    return int(repr(counter)[6:-1].split(",")[0])


class HandlerCounters:
    """One handler's calls, errors and sampled durations since the server started.

    ``calls`` and ``errors`` are advanced with ``next()`` by whichever thread
    serves the call; :meth:`record` takes a sampled duration.
    """

    __slots__ = ("_lock", "_samples", "_step", "calls", "errors", "histogram", "timed", "total_ns")

    def __init__(self, *, time_every_call: bool = False) -> None:
        # The dispatcher times a call when the count it draws is a multiple of
        # SAMPLE_EVERY; counting in steps of SAMPLE_EVERY makes every draw one.
        self._step = SAMPLE_EVERY if time_every_call else 1
        self.calls = itertools.count(0, self._step)
        self.errors = itertools.count()
        self._samples: list[int] = []
        self.histogram: dict[int, int] = {}
        self.timed = 0
        self.total_ns = 0
        self._lock = threading.Lock()

    def record(self, ns: int) -> None:
        """Take the duration of a sampled call, in nanoseconds."""
        self._samples.append(ns)
        if len(self._samples) >= _FOLD_AT:
            self._fold()

    def _fold(self) -> None:
        with self._lock:
            samples, self._samples = self._samples, []
            histogram = self.histogram
            for ns in samples:
                key = bucket(ns)
                histogram[key] = histogram.get(key, 0) + 1
            self.timed += len(samples)
            self.total_ns += sum(samples)

    def summary(self) -> dict[str, Any]:
        """The status payload's entry for this handler (durations in seconds)."""
        self._fold()
        return {
            "calls": _current(self.calls) // self._step,
            "errors": _current(self.errors),
            "mean": self.total_ns / self.timed / 1e9 if self.timed else 0.0,
            "p99": percentile(self.histogram, 0.99) / 1e9,
            "timed": self.timed,
        }
