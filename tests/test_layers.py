"""Layers only call downward: api -> jobs -> inference. The composition root (wiring,
main, cli) may import anything; nothing imports it back."""

from __future__ import annotations

import ast
from pathlib import Path

APP = Path(__file__).resolve().parent.parent / "app"

# A module under the key may not import modules under any of the values.
FORBIDDEN = {
    "app.inference": ("app.jobs", "app.api", "app.wiring", "app.main", "app.cli", "app.settings"),
    "app.jobs": ("app.api", "app.wiring", "app.main", "app.cli"),
    "app.api": ("app.wiring", "app.main", "app.cli"),
}


def imports(path: Path, module: str) -> set[str]:
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                found.add(".".join(base + ([node.module] if node.module else [])))
            else:
                found.add(node.module)
    return found


def test_no_layer_imports_upward():
    violations = []
    for path in APP.rglob("*.py"):
        module = ".".join(("app", *path.relative_to(APP).with_suffix("").parts))
        for layer, forbidden in FORBIDDEN.items():
            if module == layer or module.startswith(layer + "."):
                for name in imports(path, module):
                    if any(name == f or name.startswith(f + ".") for f in forbidden):
                        violations.append(f"{module} imports {name}")
    assert violations == []


def test_the_check_sees_relative_imports():
    admission = APP / "jobs" / "admission.py"
    assert "app.jobs.queue" in imports(admission, "app.jobs.admission")
    assert "app.inference.model" in imports(admission, "app.jobs.admission")
    store = APP / "jobs" / "persistence" / "store.py"
    assert "app.jobs.domain" in imports(store, "app.jobs.persistence.store")  # `from ..domain import`
