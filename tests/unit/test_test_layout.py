"""The unit test tree mirrors the source tree, and unit tests need no broker.

pytest runs with --import-mode=importlib (pyproject.toml), so test modules are named by their path
and two of them may share a base name in different folders. Each unit test module is
tests/unit/<package path>/test_<name>.py for the module <package path>/<name>.py, or for the
package <package path>/<name>/ when it tests that package as a whole; the exceptions are listed
below with their reason. Tests that start a real Kafka broker belong in tests/integration/.
"""

import ast
import re
from pathlib import Path

UNIT = Path(__file__).resolve().parent
REPO = UNIT.parents[1]

# Unit test modules (or folders, ending in "/") that test no single source module or package.
NOT_MIRRORED = {
    "test_code_checks.py": "the static checks (import contracts, lint, types) over the whole repository",
    "test_protos_fresh.py": "the committed stubs in shared/pb against a fresh `rlhf protos` run",
    "test_test_layout.py": "this file: the layout of the test tree itself",
    "deploy/": "the Helm chart (helm/), the Dockerfiles and dashboards (deploy/): no Python package",
    "benchmarks/": "the pure helpers of the benchmark scripts in tests/benchmarks/ (scripts, not a package)",
    "shared/kafka/test_envelope_codec.py": "a second module for shared/kafka/envelope.py: the codec "
    "against the stdlib-json contract, with its own event fixtures (test_envelope.py has the rest)",
}

BROKER = re.compile(r"\b(start_broker|EmbeddedBroker)\b")

# Unit test modules that still start a broker: each is a move to tests/integration/ still owed.
STARTS_A_BROKER: dict[str, str] = {}


def _unit_modules(pattern: str) -> list[str]:
    return sorted(p.relative_to(UNIT).as_posix() for p in UNIT.rglob(pattern))


def _excepted(rel: str, exceptions: dict[str, str]) -> bool:
    return rel in exceptions or any(rel.startswith(key) for key in exceptions if key.endswith("/"))


def _mirrors_a_source_module(rel: str) -> bool:
    test = Path(rel)
    if not test.name.startswith("test_"):
        return False
    name = test.stem.removeprefix("test_")
    package = REPO / test.parent
    return (package / "__init__.py").is_file() and (
        (package / f"{name}.py").is_file() or (package / name / "__init__.py").is_file()
    )


def _uses_a_broker(path: Path) -> bool:
    text = path.read_text()
    if BROKER.search(text):
        return True
    for node in ast.walk(ast.parse(text)):
        # the session's `broker` fixture of tests/conftest.py, as an argument or by name
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and "broker" in {
            a.arg for a in (*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs)
        }:
            return True
        if (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", None) in ("usefixtures", "getfixturevalue")
            and any(isinstance(a, ast.Constant) and a.value == "broker" for a in node.args)
        ):
            return True
    return False


def test_unit_tests_mirror_the_source_and_start_no_broker():
    strays = [
        rel
        for rel in _unit_modules("test_*.py")
        if not _excepted(rel, NOT_MIRRORED) and not _mirrors_a_source_module(rel)
    ]
    assert not strays, (
        "name unit test modules tests/unit/<package path>/test_<module>.py after the module they test "
        f"(or add a documented exception to NOT_MIRRORED): {strays}"
    )
    for key in NOT_MIRRORED:
        assert (UNIT / key).exists(), f"NOT_MIRRORED names {key}, which is gone"

    users = [rel for rel in _unit_modules("*.py") if rel != "test_test_layout.py" and _uses_a_broker(UNIT / rel)]
    assert users == sorted(STARTS_A_BROKER), (
        "tests that start a Kafka broker belong in tests/integration/ (and a module that no longer "
        f"starts one leaves STARTS_A_BROKER): {users}"
    )
