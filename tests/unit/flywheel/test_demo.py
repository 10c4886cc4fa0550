"""The gold rater is hidden from the learning code: nothing under services/ or shared/ imports the demo.

The import contracts (pyproject.toml, checked by tests/unit/test_code_checks.py) forbid services/ and
shared/ to import flywheel/ at all; these checks add what a static import graph cannot see: a module
named in a string (importlib.import_module("flywheel.demo.gold_rater")) and the CLI importing the
demo only inside the `rlhf demo` and `rlhf eval` commands.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
DEMO = "flywheel.demo"


def _is_demo(name: str) -> bool:
    return name == DEMO or name.startswith(DEMO + ".")


def demo_imports_node(node: ast.AST) -> list[str]:
    """The demo modules one import statement names, as written."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if _is_demo(a.name)]
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        if _is_demo(node.module):
            return [node.module]
        return [f"{node.module}.{a.name}" for a in node.names if _is_demo(f"{node.module}.{a.name}")]
    return []


def demo_imports(path: Path) -> list[str]:
    """Every import of the demo package (or a module of it) in a Python file, as written."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    return [name for node in ast.walk(tree) for name in demo_imports_node(node)]


def test_the_checker_sees_every_import_form(tmp_path):
    src = tmp_path / "x.py"
    src.write_text(
        "import flywheel.demo\nimport flywheel.demo.gold_rater as g\nfrom flywheel.demo import gold_rater\n"
        "from flywheel.demo.task import split_problems\nimport flywheel.demonstration\nfrom .demo import x\n"
        "from flywheel import demo\n"
    )
    assert demo_imports(src) == [
        "flywheel.demo",
        "flywheel.demo.gold_rater",
        "flywheel.demo",
        "flywheel.demo.task",
        "flywheel.demo",
    ]


def learning_code() -> list[Path]:
    return [p for d in ("services", "shared") for p in (ROOT / d).rglob("*.py")]


def test_no_service_or_shared_module_imports_demo():
    files = learning_code()
    assert len(files) > 20
    offenders = {str(p.relative_to(ROOT)): demo_imports(p) for p in files if demo_imports(p)}
    assert not offenders, f"the learning code must not see the gold rater: {offenders}"


def test_the_cli_imports_the_demo_only_inside_its_commands():
    tree = ast.parse((ROOT / "flywheel" / "cli.py").read_text(encoding="utf-8"))
    top_level = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not [n for n in top_level if demo_imports_node(n)]


def test_no_service_or_shared_module_mentions_the_gold_rater_by_string():
    # importlib.import_module("flywheel.demo.gold_rater") would dodge the AST checks above.
    assert not [p for p in learning_code() if "gold_rater" in p.read_text(encoding="utf-8")]
