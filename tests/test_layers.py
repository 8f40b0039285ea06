"""The layering rule, enforced: pure modules import no I/O, layers import only lower ones,
and no module imports another module's private names.

docs/architecture.md draws the same map; change both together.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import passrpc

PACKAGE = Path(passrpc.__file__).parent

#: Lowest first. A module may import passrpc modules of its own rank or lower.
LAYERS = {
    # 0: pure (sans-IO): the codec, what frames mean, the handshake's steps
    "_errors": 0,
    "_types": 0,
    "_wire": 0,
    "_framebuffer": 0,
    "_decoder": 0,
    "_protocol": 0,
    "_streaming": 0,
    "_handshake": 0,
    "_target": 0,
    # 1: one connection
    "_fd": 1,
    "_channel": 1,
    # 2: authentication over a connection
    "_auth": 2,
    # 3: the server's engine, one job a module
    "_registry": 3,
    "_dispatch": 3,
    "_stats": 3,
    "_socketfile": 3,
    "_process": 3,
    "_loop": 3,
    "_forkserver": 3,
    "_workers": 3,
    "_pool": 3,
    "_connection": 3,
    "_asyncloop": 3,
    "_streams": 3,
    "_asyncitems": 3,
    # 4: the clients (they know nothing of the server)
    "_clientcore": 4,
    "_client": 4,
    "_clientstream": 4,
    "_aiostream": 4,
    "_aiochannel": 4,
    "aio": 4,
    # 5: the Server facade (its proxy() is a client's), and the spawned process
    "_server": 5,
    "_spawn": 5,
    "_forking": 5,
    # 6: collection; 7: the command line and the package
    "_collection": 6,
    "_entries": 6,
    "_cli": 7,
    "_cli_client": 7,
    "_clivalues": 7,
    "__main__": 7,
    "__init__": 7,
}
PURE = {
    "_errors",
    "_types",
    "_wire",
    "_framebuffer",
    "_decoder",
    "_protocol",
    "_streaming",
    "_handshake",
}
IO_MODULES = {"socket", "os", "threading", "select", "signal", "subprocess", "selectors", "asyncio"}


def _tree(module: str) -> ast.Module:
    return ast.parse((PACKAGE / f"{module}.py").read_text())


def imports_of(module: str) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(_tree(module)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                names.add("." + (node.module or ""))
            else:
                names.add(node.module or "")
    return names


MODULES = sorted(p.stem for p in PACKAGE.glob("*.py"))


def test_every_module_has_a_layer() -> None:
    """A new module must be placed in LAYERS before it can be used."""
    assert set(MODULES) <= set(LAYERS), set(MODULES) - set(LAYERS)


@pytest.mark.parametrize("module", sorted(PURE))
def test_pure_modules_import_no_io(module: str) -> None:
    """The codec, the protocol and the handshake steps never touch sockets, the OS, threads or signals."""
    roots = {name.split(".")[0] for name in imports_of(module)}
    assert not roots & IO_MODULES


@pytest.mark.parametrize("module", MODULES)
def test_layers_import_only_lower_layers(module: str) -> None:
    """No module imports one of a higher layer."""
    for name in imports_of(module):
        if name.startswith("."):
            target = name[1:].split(".")[0]
            if target in LAYERS:
                assert LAYERS[target] <= LAYERS[module], f"{module} imports {target}"


@pytest.mark.parametrize("module", MODULES)
def test_no_module_imports_another_modules_private_names(module: str) -> None:
    """What a module offers its siblings has no leading underscore (``_x`` is that module's own)."""
    private = []
    for node in ast.walk(_tree(module)):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("passrpc")):
            private += [
                f"{alias.name} from {node.module}"
                for alias in node.names
                if alias.name.startswith("_") and not alias.name.startswith("__")
            ]
    assert not private, f"{module} imports private names: {private}"


def test_the_protocol_layer_serves_the_server_and_both_clients() -> None:
    """Dispatch and both clients take a frame's meaning from passrpc._protocol, not their own code."""
    for module in ("_dispatch", "_client", "aio", "_clientcore"):
        assert "._protocol" in imports_of(module), module
