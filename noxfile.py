"""The test suite on every supported Python this machine has: ``python -m nox``.

One session per supported version, ``tests-3.10`` to ``tests-3.13`` (all of
them: ``nox -t tests``; one: ``nox -s tests-3.12``; pytest arguments after
``--``). Each installs ``.[test]`` into a fresh virtualenv under ``.nox/`` and
runs pytest. A version this machine does not have is **skipped** with a
message, never failed, also under ``CI=true`` (where nox would otherwise fail
a session whose interpreter is missing): the interpreters are looked up here,
before any session exists, and a missing one gets a session that only skips.

An interpreter counts as present when one of these runs and reports that
version: ``pythonX.Y`` on PATH, then ``$PYENV_ROOT/versions/X.Y.*/bin/pythonX.Y``
(newest patch release first; ``PYENV_ROOT`` defaults to ``~/.pyenv``), then
``/usr/local/bin`` and ``/usr/bin``. Running it matters: a pyenv shim is on
PATH for every version pyenv has, but fails for each one that is not pyenv's
active version. Nothing is ever downloaded.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator

import nox

SUPPORTED = ("3.10", "3.11", "3.12", "3.13")

nox.options.download_python = "never"  # this machine's interpreters only
nox.options.error_on_missing_interpreters = True  # a present one must work: see below
nox.options.reuse_venv = "no"


def _probe(executable: str, version: str) -> str | None:
    """Run ``executable``; if it is Python ``version`` ("X.Y"), return its real path.

    The real path is the interpreter's own (``sys._base_executable``): what a
    pyenv shim runs, the interpreter a virtual environment was made from.
    """
    code = (
        "import sys; print('%d.%d' % sys.version_info[:2]); "
        "print(getattr(sys, '_base_executable', sys.executable))"
    )
    try:
        result = subprocess.run(
            [executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = result.stdout.splitlines()
    if result.returncode != 0 or len(lines) != 2 or lines[0] != version:
        return None
    return lines[1] if os.path.isabs(lines[1]) and os.access(lines[1], os.X_OK) else executable


def _release(path: str) -> tuple[int, ...]:
    """The release of a pyenv version directory's interpreter, for sorting."""
    name = os.path.basename(os.path.dirname(os.path.dirname(path)))
    return tuple(int(part) for part in re.findall(r"\d+", name))


def _candidates(version: str) -> Iterator[str]:
    name = f"python{version}"
    on_path = shutil.which(name)
    if on_path:
        yield on_path
    pyenv_root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    pattern = os.path.join(glob.escape(pyenv_root), "versions", f"{version}.*", "bin", name)
    yield from sorted(glob.glob(pattern), key=_release, reverse=True)
    for directory in ("/usr/local/bin", "/usr/bin"):
        yield os.path.join(directory, name)


def find_interpreter(version: str) -> str | None:
    """The path of a working Python ``version`` ("X.Y") on this machine, or None."""
    for candidate in _candidates(version):
        if os.access(candidate, os.X_OK):
            found = _probe(candidate, version)
            if found is not None:
                return found
    return None


INTERPRETERS = {version: find_interpreter(version) for version in SUPPORTED}
MISSING = [version for version, path in INTERPRETERS.items() if path is None]
if MISSING:
    print(
        f"noxfile: Python {', '.join(MISSING)} not found on this machine (looked on PATH, "
        f"in $PYENV_ROOT/versions, /usr/local/bin, /usr/bin): skipping "
        f"{', '.join(f'tests-{version}' for version in MISSING)}",
        file=sys.stderr,
    )


def _tests(version: str, interpreter: str | None) -> Callable[[nox.Session], None]:
    def tests(session: nox.Session) -> None:
        if interpreter is None:
            session.skip(f"Python {version} is not installed on this machine")
        session.log(f"Python {version}: {interpreter}")
        session.install("-e", ".[test]")
        session.run("python", "-m", "pytest", *session.posargs)

    tests.__doc__ = f"The test suite on Python {version}" + (
        "" if interpreter else " (not installed here: skipped)"
    )
    return tests


for _version, _interpreter in INTERPRETERS.items():
    # A missing version gets a session without a virtualenv (python=False), so
    # nox never looks for its interpreter and can only report it skipped.
    nox.session(
        name=f"tests-{_version}",
        python=_interpreter if _interpreter is not None else False,
        tags=["tests"],
    )(_tests(_version, _interpreter))
