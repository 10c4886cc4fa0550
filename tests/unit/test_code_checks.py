"""The static checks, run as part of `./rlhf test` so that CI fails on a violation:

- the import contracts of pyproject.toml ([tool.importlinter]): the library under the services, the
  composition root on top, no service importing another, no transport in the maths;
- ruff (lint and format), configured in pyproject.toml ([tool.ruff]);
- mypy on shared/, services/ and flywheel/, configured in pyproject.toml ([tool.mypy]): the packages,
  the strictness, and the untyped third-party modules whose missing types are ignored.

Each test runs the tool the way a developer would (`lint-imports`, `ruff check`, `mypy`, ...) from
the repo root and shows its output when it fails. mypy keeps its cache in .mypy_cache/ (git-ignored),
as it does when run by hand: a rerun takes seconds, a first run (a fresh clone in CI) under a minute.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1].parent
BIN = Path(sys.executable).parent


def run_tool(name: str, *args: str, timeout_s: float = 600) -> subprocess.CompletedProcess:
    exe = BIN / name
    if not exe.exists():
        found = shutil.which(name)
        if found is None:
            pytest.fail(f"{name} is not installed: it is in the dev extra of pyproject.toml (./rlhf installs it)")
        exe = Path(found)
    return subprocess.run([str(exe), *args], cwd=REPO, capture_output=True, text=True, timeout=timeout_s)


def assert_clean(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"{' '.join(result.args)} failed:\n{result.stdout}\n{result.stderr}"


def test_import_contracts_hold():
    result = run_tool("lint-imports", "--no-cache")
    assert_clean(result)
    assert "0 broken" in result.stdout


def test_ruff_finds_no_lint():
    assert_clean(run_tool("ruff", "check", "--no-cache", "."))


def test_ruff_format_is_applied():
    result = run_tool("ruff", "format", "--check", "--no-cache", ".")
    assert result.returncode == 0, f"run `ruff format .`:\n{result.stdout}\n{result.stderr}"


def test_mypy_finds_no_type_errors():
    # No arguments: the packages to check are [tool.mypy]'s, as for `.venv/bin/mypy` and pre-commit.
    assert_clean(run_tool("mypy"))
