"""The spawned server process: ``python -m passrpc._spawn TARGET LISTEN_FD OWNER_FD``.

``Server.start(method="spawn")`` runs this in a fresh interpreter with only
the listening socket and the owner socket passed. The parent sends one frame
on the owner socket with what the fresh interpreter cannot know (the
password, the socket path); the password so never appears in argv or the
environment.
"""

from __future__ import annotations

import logging
import os
import socket
import sys

from ._decoder import Decoder
from ._protocol import MESSAGE
from ._server import Server, logger, reconfigure, run_server_process
from ._target import load_target


def _read_config(owner: socket.socket) -> dict[str, object]:
    decoder = Decoder()
    while (frame := decoder.next_frame()) is None:
        data = owner.recv(65536)
        if not data:
            raise SystemExit(
                "passrpc._spawn: the parent went away before sending the configuration"
            )
        decoder.receive_data(data)
    kind, payload = frame
    if kind != MESSAGE or not isinstance(payload, list) or not isinstance(payload[0], dict):
        raise SystemExit("passrpc._spawn: the parent sent no configuration")
    return payload[0]


def main(argv: list[str]) -> None:
    """Serve the target passed on the command line; never returns."""
    if len(argv) != 3:
        raise SystemExit(
            "usage: python -m passrpc._spawn TARGET LISTEN_FD OWNER_FD (used by passrpc)"
        )
    target, listen_fd, owner_fd = argv
    listener = socket.socket(fileno=int(listen_fd))
    owner = socket.socket(fileno=int(owner_fd))
    config = _read_config(owner)
    if not logging.getLogger().handlers and not logger.handlers:
        logging.basicConfig(format="passrpc[%(process)d] %(levelname)s %(message)s")
    logger.setLevel(int(config.get("log_level") or logging.WARNING))  # type: ignore[call-overload]
    try:
        obj = load_target(target)
        server = obj if isinstance(obj, Server) else obj()
        if not isinstance(server, Server):
            raise TypeError(f"{target!r} gave {server!r}, not a passrpc.Server")
    except Exception:
        logger.exception("cannot load the server %r", target)
        os._exit(1)
    reconfigure(
        server,
        socket_path=str(config["socket_path"]),
        password=config["password"],  # type: ignore[arg-type]
        own_dir=config.get("own_dir"),  # type: ignore[arg-type]
    )
    identity = config["identity"]
    run_server_process(server, listener, owner, (int(identity[0]), int(identity[1])))  # type: ignore[index]


if __name__ == "__main__":
    main(sys.argv[1:])
