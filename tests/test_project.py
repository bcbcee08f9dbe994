"""Project hygiene that CI would otherwise not notice: README commands, CI script, layout and import rules."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ci_installs_with_the_readme_pip_line():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci/run").read_text()
    install = re.search(r"\.venv/bin/pip install (.+)", readme).group(1).strip()
    assert re.search(r'PIP_LINE="(.+)"', ci).group(1) == install
    test_command = re.search(r"\.venv/bin/python -m pytest[^\n]*", readme).group(0).strip()
    assert test_command in ci


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
            elif node.level >= 2 and node.module:
                names.add(node.module.split(".")[0])  # from ..bolid import x
    return names


def test_dependency_rule():
    """bolid/ imports neither ComfyUI nor nodes/training; nodes/ and training/ never import each other."""
    comfy = {"comfy", "folder_paths", "comfy_extras", "execution", "server"}
    for path in (REPO / "bolid").rglob("*.py"):
        assert not _imports(path) & (comfy | {"nodes", "training"}), path
    for path in (REPO / "training").rglob("*.py"):
        assert not _imports(path) & (comfy | {"nodes"}), path
    for path in (REPO / "nodes").rglob("*.py"):
        assert "training" not in _imports(path), path


def test_no_print_in_library_code():
    """Library code logs; only a command-line ``main()`` may print its result."""
    for folder in ("bolid", "nodes"):
        for path in (REPO / folder).rglob("*.py"):
            tree = ast.parse(path.read_text())
            cli = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name == "main"
                   for n in ast.walk(f)}
            calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "print"
                     and id(n) not in cli]
            assert not calls, f"{path}: use logging, not print"
