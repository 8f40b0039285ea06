"""One server per application, started on first use and stopped when idle.

A ServerCollection maps a key (here an application root) to a running
server. The first lookup of a key calls your factory and starts the server;
later lookups, from any thread, get the same one. A server unused for longer
than its max_idle_time is stopped by the collection's cleaner thread.

Run it from the repository root with ``python examples/collection.py`` (or
``python -m examples.collection``), passrpc installed (``pip install -e .``).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

import passrpc

IDLE = 0.3  # seconds a server may sit unused; small so the example is quick


def make_server(root: str) -> passrpc.Server:
    """The factory: a server for one application root (not started: the collection starts it)."""
    server = passrpc.Server(max_idle_time=IDLE)

    @server.handler()
    def whoami() -> tuple[str, int]:
        """Say which application this server is for, and its pid."""
        return root, os.getpid()

    return server


def running(servers: passrpc.ServerCollection) -> list[str]:
    """The keys of the running servers, sorted."""
    return sorted(str(key) for key, _ in servers)


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``condition`` until it holds (the cleaner works on its own time)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the cleaner did not act in time")
        time.sleep(0.02)


def main() -> None:
    with passrpc.ServerCollection() as servers:
        # Eight threads ask for two applications at once: two servers start.
        # use() holds the server for the block, so the cleaner cannot stop it
        # between the lookup and the call, however slow the thread is.
        answers: list[tuple[str, str, int]] = []

        def ask(root: str) -> None:
            with servers.use(root, lambda: make_server(root)) as server, server.proxy() as proxy:
                app, pid = proxy.whoami()
            answers.append((threading.current_thread().name, app, pid))

        threads = [
            threading.Thread(target=ask, args=(root,), name=f"thread-{i}")
            for i, root in enumerate(["/srv/blog", "/srv/shop"] * 4)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for name, app, pid in sorted(answers):
            print(f"{name}: {app} is served by pid {pid}")
        assert len({pid for _, _, pid in answers}) == 2
        print(f"{len(servers)} servers running:", running(servers))

        # Inside use() the cleaner leaves the server alone, however long it takes.
        with servers.use("/srv/shop", lambda: make_server("/srv/shop")) as shop:
            # Nobody looks the blog server up: after max_idle_time it goes.
            wait_for(lambda: "/srv/blog" not in servers)
            print("during a long use():", running(servers))
            assert running(servers) == ["/srv/shop"]
            assert shop.alive

        # After the block the shop server gets max_idle_time more, then goes too.
        wait_for(lambda: len(servers) == 0)
        print("after idling:", len(servers), "servers running")
        assert len(servers) == 0

        # A lookup starts a fresh one when needed.
        blog = servers.lookup_or_add("/srv/blog", lambda: make_server("/srv/blog"))
        print("started again: pid", blog.pid)
    # Leaving the with block closed the collection and stopped every server.
    print("closed; blog server running:", blog.alive)


if __name__ == "__main__":
    main()
