"""No function in product code is longer than a screen (STYLE.md: "functions under ~60 lines";
a long one becomes a list of named steps)."""

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("protocol", "actors", "rewarder", "learner", "pipeline", "deploy")
MAX_LINES = 60


def long_functions() -> list[str]:
    """`path:line name (n lines)` of every function over MAX_LINES lines, decorators included."""
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = path.relative_to(ROOT).as_posix()
            for node in ast.walk(ast.parse(path.read_text(), name)):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                    lines = node.end_lineno - first + 1
                    if lines > MAX_LINES:
                        found.append(f"{name}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_function_in_product_code_is_over_sixty_lines():
    assert long_functions() == []


def test_the_check_sees_a_long_function(tmp_path, monkeypatch):
    package = tmp_path / "learner"
    package.mkdir()
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_LINES))  # def line + 60 = 61 lines
    (package / "long.py").write_text(f"def long():\n{body}\n\ndef short():\n    return 1\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert long_functions() == ["learner/long.py:1 long (61 lines)"]
