"""Packaging rules: pinned dependencies, and torch only where it is needed."""

from __future__ import annotations

import re
import tomllib

from tests.support import REPO_ROOT

PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]


def test_every_dependency_is_pinned() -> None:
    groups = {"core": PROJECT["dependencies"], **PROJECT["optional-dependencies"]}
    for group, requirements in groups.items():
        for requirement in requirements:
            if requirement.startswith("feedrank["):
                continue
            assert re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[0-9][\w.]*", requirement), (
                f"{group}: {requirement} is not pinned"
            )


def test_only_the_trainer_installs_torch() -> None:
    for group, requirements in PROJECT["optional-dependencies"].items():
        names = {re.split(r"[=\[<>]", r)[0].lower() for r in requirements}
        if group in {"trainer", "all"}:
            continue
        assert "torch" not in names, f"the {group} install group must not pull torch"
    assert "torch" not in {re.split(r"[=\[<>]", r)[0] for r in PROJECT["dependencies"]}


def test_ruff_bans_torch_imports_outside_the_trainer() -> None:
    banned = PYPROJECT["tool"]["ruff"]["lint"]["flake8-tidy-imports"]["banned-api"]
    assert "torch" in banned
