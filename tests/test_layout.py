"""DESIGN.md's import rule: pd -> scheduler, cache_transfer, engine; cache_transfer
-> engine only for the KV-cache layout; scheduler and engine import none of the others."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pd", "scheduler", "cache_transfer", "engine")
ALLOWED = {
    "pd": {"scheduler", "cache_transfer", "engine"},
    "scheduler": set(),
    "cache_transfer": {"engine.kv_cache"},
    "engine": set(),
}


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def violations(package: str) -> list[str]:
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for module in imported_modules(path):
            top = module.split(".")[0]
            if top in PACKAGES and top != package:
                allowed = ALLOWED[package]
                if top not in allowed and module not in allowed:
                    found.append(f"{path.relative_to(ROOT)} imports {module}")
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_flow_one_way(package):
    assert violations(package) == []


def test_the_checker_sees_a_violation(tmp_path, monkeypatch):
    (tmp_path / "engine").mkdir()
    (tmp_path / "engine" / "bad.py").write_text("from pd.llm import LLM\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["ROOT"]), "ROOT", tmp_path)
    assert violations("engine") == ["engine/bad.py imports pd.llm"]
