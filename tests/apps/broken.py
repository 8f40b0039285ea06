"""A fixture app whose import fails: the command line must say so, not 'not found'."""

from __future__ import annotations

raise RuntimeError("this fixture app fails on import")
