"""A fixture app that imports a module that does not exist."""

from __future__ import annotations

import passrpc_test_no_such_dependency  # type: ignore[import-not-found]  # noqa: F401

server = None
