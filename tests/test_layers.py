"""The layering rule, enforced: pure modules import no I/O, layers import only lower ones."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import passrpc

PACKAGE = Path(passrpc.__file__).parent

#: Lowest first. A module may import passrpc modules of its own rank or lower.
LAYERS = {
    "_errors": 0,
    "_wire": 0,
    "_target": 0,
    "_fd": 1,
    "_channel": 1,
    "_auth": 2,
    "_server": 3,
    "_spawn": 3,
    "_client": 4,
    "aio": 4,
    "_collection": 5,
    "_cli": 6,
    "__main__": 6,
    "__init__": 6,
}
PURE = {"_errors", "_wire"}
IO_MODULES = {"socket", "os", "threading", "select", "signal", "subprocess", "selectors", "asyncio"}


def imports_of(module: str) -> set[str]:
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
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
    """The codec and the errors never touch sockets, the OS, threads or signals."""
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
