"""A fixture app whose initialize_server hook raises."""

from __future__ import annotations

import passrpc

server = passrpc.Server()


@server.on_initialize_server
def fail_to_initialize() -> None:
    """Fail the way a missing resource would."""
    raise RuntimeError("initialize_server of this fixture app fails")
