"""Every example runs as written, as a script and as a module, exits 0 and prints what it says."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from .helpers import REPO

#: Each example and lines (regular expressions) its output must contain.
EXPECTED = {
    "async_handlers": [
        r"^session opened on the server's loop: True$",
        r"^digest, computed in a thread: [0-9a-f]{16}$",
        r"^8 lookups: KEY0, KEY1, KEY2, \.\.\.$",
        r"^they waited together: True$",
    ],
    "hello": [
        r"^proxy:   Hello Joe Dalton, how are you\? \(1234\)$",
        r"^channel: Hello Jack Dalton, how are you\? \(1234\)$",
    ],
    "passenger_subclass": [r"^\('Hello Joe Dalton, how are you\?', 1234\)$"],
    "fd_passing": [
        r"^pipe: line 1 of 3, written by pid \d+$",
        r"^pipe: line 3 of 3, written by pid \d+$",
        r"^file: Welcome: this text came through a descriptor, not the socket\.$",
    ],
    "streaming": [
        r"^before: started, ready$",
        r"^line: event 3$",
        r"^followers while open: 1$",
        r"^followers after close and one more line: 0$",
    ],
    "preloader": [
        r"^worker \d+, forked by the fork server \d+ of server \d+: 1/7 = 0\.142857142857142857142857142857$",
        r"^worker \d+, forked by the fork server \d+ of server \d+: 22/7 = 3\.14285714285714285714285714286$",
        r"^worker \d+ exited with status 0, reaped by the fork server$",
        r"^2 workers served and reaped: True$",
    ],
}


#: Every example in the directory runs, whether or not EXPECTED checks its output.
EXAMPLES = sorted(p.stem for p in (REPO / "examples").glob("*.py") if p.stem != "__init__")


def test_expected_examples_exist() -> None:
    """Every example EXPECTED checks is still in examples/."""
    assert set(EXPECTED) <= set(EXAMPLES)


#: Examples that must never fork a process that runs threads. Python 3.12+
#: warns when one does, and -W always shows the warning on stderr, which must
#: stay empty (-W error would not do: CPython swallows the exception its fork
#: warning raises).
NO_THREADED_FORK = {"preloader"}


def run_example(name: str, form: str, *options: str) -> subprocess.CompletedProcess[str]:
    """Run an example as a script or a module, with Python ``options``; return what it did."""
    argv = [f"examples/{name}.py"] if form == "script" else ["-m", f"examples.{name}"]
    env = dict(os.environ)
    # As after `pip install -e .`: the package importable from anywhere.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, *options, *argv],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize("form", ["script", "module"])
@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs(name: str, form: str) -> None:
    """``python examples/NAME.py`` and ``python -m examples.NAME`` exit 0 with the expected output."""
    options = ("-W", "always::DeprecationWarning") if name in NO_THREADED_FORK else ()
    result = run_example(name, form, *options)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    for pattern in EXPECTED.get(name, []):
        assert re.search(pattern, result.stdout, re.MULTILINE), (pattern, result.stdout)


def test_the_readme_quick_tour_runs() -> None:
    """The README's "Quick tour" block runs as written and prints what its comments say."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    found = re.search(r"## Quick tour\n\n```python\n(.*?)```", readme, re.S)
    assert found, "the README has no Quick tour code block"
    result = subprocess.run(
        [sys.executable, "-c", found.group(1)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:3] == ["('Hello Joe Dalton', 1234)", "[3, 2, 1]", "0.1"], result.stdout
