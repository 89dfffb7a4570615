"""The model registry: no import cycle inside models/, builders registered by name."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from models import build_model, list_models, register_model
from models.registry import _REGISTRY

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = {"resnet", "vgg", "wide_resnet", "resnext", "pyramidnet", "testing"}


def _imports(path: Path) -> set[str]:
    """The models.* modules that `path` imports (at any level, TYPE_CHECKING blocks included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("models."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.ImportFrom) and node.module == "models":
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("models."))
    return found


def test_no_two_modules_in_models_import_each_other() -> None:
    graph = {p.stem: _imports(p) for p in (ROOT / "models").glob("*.py") if p.stem != "__init__"}
    assert not graph["registry"] & FAMILIES, "the registry must import no family"

    def reaches(start: str, target: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, set()):
            if nxt == target or (nxt not in seen and reaches(nxt, target, seen | {nxt})):
                return True
        return False

    cycles = [m for m in graph if reaches(m, m, {m})]
    assert not cycles, f"import cycles through {cycles}"


def test_the_registry_imports_on_its_own_and_models_registers_every_family() -> None:
    # Importing a submodule runs models/__init__.py first, which imports the families: the
    # registry is complete whichever module a program imports first.
    code = "import models.registry as r; print(len(r.list_models()))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == len(list_models()) >= 20


def test_register_under_another_name_and_refuse_duplicates() -> None:
    try:

        @register_model(name="test_alias_of_tiny")
        def _builder(**kwargs):
            return build_model("test_tiny", **kwargs)

        assert "test_alias_of_tiny" in list_models()
        assert build_model("test_alias_of_tiny", 3).num_exits == 3
        with pytest.raises(ValueError, match="already registered"):
            register_model(name="test_alias_of_tiny")(_builder)
    finally:
        _REGISTRY.pop("test_alias_of_tiny", None)


def test_test_networks_all_live_in_models_testing() -> None:
    tests_elsewhere = [
        p.name for p in (ROOT / "models").glob("*.py") if p.stem != "testing" and "def test_" in p.read_text()
    ]
    assert tests_elsewhere == []
    assert {"test_tiny", "test_sleepy", "test_faulty"} <= set(list_models())
