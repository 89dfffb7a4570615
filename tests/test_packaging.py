"""Install by extras: what each entry point imports is installed by its extra, and the images use them.

The import closure of an entry point is read from the source (every `import` in every project module
it reaches, including those inside functions), so a module that only one code path imports still
counts. Third-party modules map to distributions through this environment's metadata; an extra
provides its requirements and, transitively, theirs.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, packages_distributions, requires

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.helpers import ROOT

PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
NAME = canonicalize_name(PROJECT["project"]["name"])
PACKAGED = {p.rstrip("*") for p in PROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}
LOCAL = PACKAGED | {"bench", "tools", "tests"}
ENTRY_POINTS = {
    "client": ["client.cli"],
    "serve": ["service.main"],
    "train": ["training.cli", "training.export", "training.importer"],
}


def _module_file(module: str):
    path = ROOT.joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def import_closure(entry: str) -> tuple[set[str], set[str]]:
    """(project modules, third-party top-level modules) reachable from `entry`."""
    seen: set[str] = set()
    third: set[str] = set()
    todo = [entry]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        parts = module.split(".")
        for i in range(1, len(parts)):  # importing a.b.c runs a/__init__ and a/b/__init__
            todo.append(".".join(parts[:i]))
        tree = ast.parse(_module_file(module).read_text())
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                top = name.split(".")[0]
                if top in LOCAL:
                    if _module_file(name).exists():
                        todo.append(name)
                elif top not in sys.stdlib_module_names and top != "__future__":
                    third.add(top)
    return seen, third


def _provided(extra: str) -> set[str]:
    """Distributions installed by `pip install .[extra]`: its requirements and theirs."""
    optional = PROJECT["project"]["optional-dependencies"]
    todo = [Requirement(r) for r in PROJECT["project"]["dependencies"] + optional[extra]]
    provided: set[str] = set()
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name == NAME:
            todo += [Requirement(r) for e in req.extras for r in optional[e]]
            continue
        if name in provided:
            continue
        provided.add(name)
        try:
            sub = requires(req.name) or []
        except PackageNotFoundError:
            continue
        for line in sub:
            r = Requirement(line)
            if r.marker is None or any(r.marker.evaluate({"extra": e}) for e in req.extras or {""}):
                todo.append(r)
    return provided


@pytest.mark.parametrize("extra", sorted(ENTRY_POINTS))
def test_every_module_an_entry_point_imports_is_installed_by_its_extra(extra: str) -> None:
    distributions = packages_distributions()
    provided = _provided(extra)
    for entry in ENTRY_POINTS[extra]:
        modules, third = import_closure(entry)
        assert {m.split(".")[0] for m in modules} <= PACKAGED, f"{entry} imports an unpackaged module"
        for top in sorted(third):
            dists = {canonicalize_name(d) for d in distributions.get(top, [])}
            assert dists, f"{top} (imported by {entry}'s closure) is not installed here"
            assert dists & provided, f"{entry} imports {top} ({dists}), which .[{extra}] does not install"


def test_the_client_extra_is_httpx_only() -> None:
    _, third = import_closure("client.cli")
    assert third == {"httpx"}
    assert "torch" not in _provided("client")


def test_console_scripts_point_at_modules_their_extras_cover() -> None:
    covered = {m for entries in ENTRY_POINTS.values() for m in entries} | {"client.loadgen"}
    for script, target in PROJECT["project"]["scripts"].items():
        assert target.split(":")[0] in covered, script


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cuda"])
def test_images_install_the_project_by_its_extras(dockerfile: str) -> None:
    text = (ROOT / "docker" / dockerfile).read_text()
    stages = dict(re.findall(r"^FROM \S+ AS (\w+)\n(.*?)(?=^FROM |\Z)", text, re.M | re.S))
    assert '".[serve]"' in stages["serve"] and '".[train]"' in stages["train"]
    assert "requirements" not in text and "PYTHONPATH" not in text
    assert 'CMD ["python", "-m", "service.main"]' in stages["serve"]


def test_every_relative_link_of_the_documents_resolves() -> None:
    """README.md and docs/*.md link files of the repository by paths relative to themselves."""
    broken = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if not target.startswith(("http://", "https://", "mailto:")) and not (doc.parent / target).exists():
                broken.append(f"{doc.relative_to(ROOT)} → {target}")
    assert not broken, broken
