"""The gold rater is hidden from the learning code: nothing under services/ or shared/ imports demo.

One exception, checked to stay harmless: shared/cli.py, the `rlhf` command, dispatches `rlhf demo`
and `rlhf eval` to the demo package (lazily, inside those two commands). No service or shared
module imports shared.cli, so no service process can reach demo through it.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def demo_imports(path: Path) -> list[str]:
    """Every import of the demo package (or a module of it) in a Python file, as written."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name == "demo" or a.name.startswith("demo.")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "demo" or node.module.startswith("demo."):
                found.append(node.module)
    return found


def test_the_checker_sees_every_import_form(tmp_path):
    src = tmp_path / "x.py"
    src.write_text("import demo\nimport demo.gold_rater as g\nfrom demo import gold_rater\n"
                   "from demo.task import split_problems\nimport demonstration\nfrom .demo import x\n")
    assert demo_imports(src) == ["demo", "demo.gold_rater", "demo", "demo.task"]


CLI = ROOT / "shared" / "cli.py"


def learning_code() -> list[Path]:
    return [p for d in ("services", "shared") for p in (ROOT / d).rglob("*.py") if p != CLI]


def imports_module(path: Path, name: str) -> bool:
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import) and any(a.name == name for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (
                node.module == name or (node.module == name.rsplit(".", 1)[0]
                                        and any(a.name == name.rsplit(".", 1)[1] for a in node.names))):
            return True
    return False


def test_no_service_or_shared_module_imports_demo():
    files = learning_code()
    assert len(files) > 20
    offenders = {str(p.relative_to(ROOT)): demo_imports(p) for p in files if demo_imports(p)}
    assert not offenders, f"the learning code must not see the gold rater: {offenders}"


def test_the_cli_exception_is_unreachable_from_the_services():
    importers = [str(p.relative_to(ROOT)) for p in learning_code() if imports_module(p, "shared.cli")]
    assert not importers, f"these modules import shared.cli and so could reach demo: {importers}"
    # and the CLI imports demo only inside the demo and eval commands, never at module level
    tree = ast.parse(CLI.read_text(encoding="utf-8"))
    top_level = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not [n for n in top_level if demo_imports_node(n)]


def demo_imports_node(node) -> bool:
    if isinstance(node, ast.Import):
        return any(a.name == "demo" or a.name.startswith("demo.") for a in node.names)
    return bool(node.module) and (node.module == "demo" or node.module.startswith("demo."))


def test_no_service_or_shared_module_mentions_the_gold_rater_by_string():
    # importlib.import_module("demo.gold_rater") would dodge the AST checks above.
    assert not [p for p in learning_code() if "gold_rater" in p.read_text(encoding="utf-8")]
