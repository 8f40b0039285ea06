"""``async def`` (issue 14) where it meets workers: a Server run as a worker has no event loop."""

from __future__ import annotations

import pytest

from passrpc import ConfigurationError, Server


class _AsyncInit(Server):
    async def initialize_server(self) -> None:  # type: ignore[override]
        pass


class _AsyncFinal(Server):
    async def finalize_server(self) -> None:  # type: ignore[override]
        pass


@pytest.mark.parametrize("target", [_AsyncInit, _AsyncFinal])
def test_a_worker_server_with_an_async_hook_method_is_refused(target: type[Server]) -> None:
    """The worker would call it and never await it (it ran nothing, silently): refused at add_worker."""
    server = Server()
    with pytest.raises(ConfigurationError, match=r"async def.*worker.*plain def"):
        server.add_worker("calc", target())
    assert "calc" not in server._registry.workers  # type: ignore[attr-defined]
