"""The layering of the packages, as import-linter's contracts in pyproject.toml state it: models/ imports
neither training/ nor service/, the server never imports training/, the app and the engine know nothing
of the process model, and no two modules or packages of service/ import each other (in a cycle)."""

from __future__ import annotations

import os

from importlinter.cli import lint_imports

from tests.helpers import ROOT


def test_the_import_contracts_hold(capsys) -> None:
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        code = lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True)
    finally:
        os.chdir(cwd)
    out = capsys.readouterr().out
    assert code == 0, out[-4000:]
    assert "4 kept, 0 broken" in out, out[-2000:]
