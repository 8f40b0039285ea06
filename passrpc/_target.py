"""Loading ``module:attribute`` and ``path/to/file.py:attribute`` targets (as Flask's locate_app)."""

from __future__ import annotations

import importlib
import os
import runpy
import sys
from typing import Any

from ._errors import TargetError

#: The attribute looked up when a target names only a module.
DEFAULT_ATTRIBUTE = "server"


def load_target(spec: str) -> Any:
    """Import what ``spec`` names and return it.

    ``spec`` is ``module:attribute`` (``attribute`` may be dotted and
    defaults to ``server``) or ``path/to/file.py:attribute``; a file is run
    under the name ``__passrpc__``, so its ``if __name__ == "__main__"`` block
    does not run.

    Raises:
        TargetError: the module or attribute does not exist, or importing the
            module failed (then the cause is chained).
    """
    module_name, _, attribute = spec.partition(":")
    attribute = attribute or DEFAULT_ATTRIBUTE
    if not module_name:
        raise TargetError(f"{spec!r} names no module: write it as module:attribute")
    if module_name.endswith(".py") or "/" in module_name:
        # As when Python runs a script: modules beside the file are importable.
        folder = os.path.dirname(os.path.abspath(module_name))
        if folder not in sys.path:
            sys.path.insert(0, folder)
        try:
            namespace: Any = runpy.run_path(module_name, run_name="__passrpc__")
        except FileNotFoundError as exc:
            raise TargetError(f"no file {module_name!r} (from {spec!r})") from exc
        except Exception as exc:
            raise TargetError(
                f"running {module_name!r} failed: {type(exc).__name__}: {exc}"
            ) from exc
        get = namespace.get
    else:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
                raise TargetError(
                    f"no module named {exc.name!r} (from {spec!r}); check the name and sys.path"
                ) from exc
            raise TargetError(f"importing {module_name!r} failed: {exc}") from exc
        except Exception as exc:
            raise TargetError(
                f"importing {module_name!r} failed: {type(exc).__name__}: {exc}"
            ) from exc
        get = vars(module).get
    first, *rest = attribute.split(".")
    missing = object()
    value = get(first, missing)
    for part in rest:
        if value is missing:
            break
        value = getattr(value, part, missing)
    if value is missing:
        raise TargetError(f"{module_name!r} has no attribute {attribute!r} (from {spec!r})")
    return value


def find_target(obj: object) -> str | None:
    """Return a ``module:attribute`` (or ``file.py:attribute``) under which ``obj`` can be loaded.

    Looks for a module-level name bound to ``obj`` itself; None when there is none.
    """
    fallback = None
    for name, module in list(sys.modules.items()):
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        for attribute, value in list(namespace.items()):
            if value is not obj:
                continue
            if name != "__main__":
                return f"{name}:{attribute}"
            spec = getattr(module, "__spec__", None)
            if spec is not None and spec.name:
                return f"{spec.name}:{attribute}"
            path = getattr(module, "__file__", None)
            if path:
                fallback = f"{path}:{attribute}"
    return fallback
