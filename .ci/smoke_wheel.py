"""Smoke-test an installed passrpc wheel: .ci/run runs this with a fresh venv's python.

Run it from outside the checkout with ``python -I`` so that only the installed
package can be imported. It serves a handler in a forked server and in a
spawned one (``python -m passrpc._spawn``), calls both through
``server.proxy()``, calls once through ``passrpc.aio``, runs the console
script, and checks the installed files: a module, ``py.typed`` or the
license missing from the wheel fails here.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import passrpc

server = passrpc.Server()


@server.handler("hello")
def hello(first: str, last: str) -> tuple[str, int]:
    """Greet someone."""
    return f"Hello {first} {last}", os.getpid()


def check_installed() -> None:
    package = Path(passrpc.__file__).resolve().parent
    assert package.is_relative_to(Path(sys.prefix).resolve()), (
        f"passrpc was imported from {package}, not from this venv ({sys.prefix})"
    )
    assert (package / "py.typed").is_file(), "py.typed is missing from the wheel"
    dist = importlib.metadata.distribution("passrpc")
    assert dist.version == passrpc.__version__, (dist.version, passrpc.__version__)
    assert dist.metadata["License"] == "MIT", dist.metadata["License"]
    files = {Path(str(f)).name for f in dist.files or ()}
    assert "LICENSE" in files, "LICENSE is missing from the wheel's metadata"
    print(f"installed: passrpc {dist.version} in {package}")


def call(method: str) -> None:
    server.start(method=method, target=f"{__file__}:server" if method == "spawn" else None)
    try:
        with server.proxy(timeout=30) as proxy:
            reply, pid = proxy.hello("Joe", "Dalton")
        assert reply == "Hello Joe Dalton", reply
        assert pid == server.pid != os.getpid(), (pid, server.pid)
        print(f"{method}: proxy.hello('Joe', 'Dalton') -> {reply!r} from server pid {pid}")
    finally:
        server.stop()


async def call_async() -> None:
    async with server.async_proxy(timeout=30) as proxy:
        reply, _ = await proxy.hello("Jack", "Dalton")
    assert reply == "Hello Jack Dalton", reply
    print(f"aio: await proxy.hello('Jack', 'Dalton') -> {reply!r}")


def main() -> None:
    check_installed()
    call("fork")
    call("spawn")
    server.start()
    try:
        asyncio.run(call_async())
    finally:
        server.stop()
    script = Path(sys.executable).with_name("passrpc")
    subprocess.run([script, "--help"], check=True, stdout=subprocess.DEVNULL)
    print(f"console script: {script} --help ran")
    print("wheel smoke test passed")


if __name__ == "__main__":
    main()
