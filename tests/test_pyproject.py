"""Project wiring: one source of truth for dependencies, and the console script."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib

import yaml

from conftest import REPO


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_lists_the_same_packages_as_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = {r for r in project["dependencies"]}
    for extra in project["optional-dependencies"].values():
        wanted |= set(extra)
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    assert "python=3.11" in env["dependencies"]
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    listed = {p for p in pip if not p.startswith("-e")}
    assert {_name(r): r for r in listed} == {_name(r): r for r in wanted}
    assert "-e ." in pip


def test_no_deps_wheels_agree_across_makefile_and_environment_yml():
    wanted = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["llmc"]["no-deps"]
    makefile = re.search(r"^NO_DEPS := (.*)$", (REPO / "Makefile").read_text(), re.M).group(1).split()
    assert makefile == wanted
    for requirement in wanted:
        assert f"pip install --no-deps {requirement}" in (REPO / "environment.yml").read_text()


def test_console_script_and_module_entry_point():
    result = subprocess.run([sys.executable, "-m", "llm_workbook", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "convert" in result.stdout and "inspect" in result.stdout
