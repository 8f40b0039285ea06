"""Fixtures shared by the test suite: short socket paths, descriptor counts, reaping."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


def open_fds() -> set[int]:
    """The descriptor numbers this process has open right now.

    listdir's own descriptor is listed but closed by the time we look: drop it.
    """
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            os.fstat(int(name))
        except OSError:
            continue
        fds.add(int(name))
    return fds


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short private directory for sockets: AF_UNIX paths stop at 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="prpc-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def no_fd_leak() -> Iterator[None]:
    """Fail the test if it leaves descriptors open in this process."""
    before = open_fds()
    yield
    leaked = open_fds() - before
    assert not leaked, f"descriptors leaked: {sorted(leaked)}"
