"""MkDocs hooks for the passrpc site (mkdocs.yml's ``hooks:``; not a page).

* The API reference (docs/api.md) documents every public name: everything
  in ``passrpc.__all__`` and ``passrpc.aio.__all__``. The page places most
  of them in sections by hand (``::: passrpc.Name``); a public name it does
  not place is appended under "Other public names", so a new name is never
  left out. A ``:::`` block for a name that is in neither ``__all__`` is a
  warning, which ``mkdocs build --strict`` (as .ci/run runs it) turns into a
  failure.
* The docstrings use Sphinx roles (``:class:`Server```). mkdocstrings renders
  them as the role's name followed by code; this shows the code alone, and
  makes a role naming a public object by its full name a link to it.
"""

from __future__ import annotations

import importlib
import logging
import re
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("mkdocs.hooks.passrpc")

API_PAGE = "api.md"
PUBLIC_MODULES = ("passrpc", "passrpc.aio")

_IDENTIFIER = re.compile(r"^:::\s+(\S+)", re.MULTILINE)
_ROLE = re.compile(
    r":(?:py:)?(?:class|meth|func|mod|attr|exc|data|obj|const):"
    r"<code>~?(?P<name>[^<]+)</code>"
)


def public_names() -> list[str]:
    """The dotted names the reference documents, in ``__all__`` order."""
    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:  # building from a checkout without passrpc installed
        sys.path.insert(0, root)
    names = []
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        names.extend(f"{module_name}.{name}" for name in module.__all__)
    return names


def on_page_markdown(markdown: str, *, page: Any, **kwargs: Any) -> str:
    if page.file.src_uri != API_PAGE:
        return markdown
    documented = set(_IDENTIFIER.findall(markdown))
    public = public_names()
    for name in sorted(documented.difference(public)):
        log.warning(f"{API_PAGE} documents {name}, which is in no __all__ of {PUBLIC_MODULES}")
    missing = [name for name in public if name not in documented]
    if not missing:
        return markdown
    log.info(f"{API_PAGE}: appending public names it does not place: {', '.join(missing)}")
    blocks = "\n\n".join(f"::: {name}" for name in missing)
    return f"{markdown.rstrip()}\n\n## Other public names\n\n{blocks}\n"


def _role(match: re.Match[str]) -> str:
    name = match["name"]
    code = f"<code>{name}</code>"
    if name.startswith("passrpc."):
        # Resolved by mkdocs-autorefs when that object is documented, else plain code.
        return f'<autoref identifier="{name}" optional>{code}</autoref>'
    return code


def on_page_content(html: str, **kwargs: Any) -> str:
    return _ROLE.sub(_role, html)
