"""Installed beside AI-OS: AI-OS's distribution and top-level package are both named ``llm_compression``.

Ours is the distribution ``llm-workbook`` with the package ``llm_workbook``; AI-OS's import paths for our
code come from ``llm_workbook_aios_api/``, which the wheel's ``.pth`` appends to ``sys.path`` last. These tests
build the wheel, unpack it into a site directory as pip does, and import from a bare interpreter in three
environments: without AI-OS, with AI-OS installed beside it, and with AI-OS installed editable.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

from conftest import REPO

PTH = "llm_workbook_aios_api.pth"
AIOS_MARKER = "AI-OS stand-in"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Built from a copy, so the checkout gets no build/ or egg-info.
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "lib", src / "lib", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(out), str(src)], check=True, capture_output=True)
    return next(out.glob("llm_workbook-*.whl"))


def _site(tmp_path: Path, wheel: Path) -> Path:
    site = tmp_path / "site-packages"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)  # what pip does with a pure-Python wheel's files
    return site


def _write_aios(root: Path) -> None:
    """A stand-in for AI-OS's package: its top-level name and the module our layer also provides."""
    (root / "llm_compression" / "inference").mkdir(parents=True)
    (root / "llm_compression" / "__init__.py").write_text(f'AIOS = "{AIOS_MARKER}"\n')
    (root / "llm_compression" / "inference" / "__init__.py").write_text("")
    (root / "llm_compression" / "inference" / "weight_loader.py").write_text("class WeightLoader:\n    AIOS = True\n")


def _imports(site: Path, code: str) -> str:
    """Run ``code`` in an interpreter whose only site directory is ``site`` (its .pth files processed);
    our dependencies come from this environment's site-packages, added without processing its .pth files
    (they would put the checkout's editable paths first)."""
    deps = sysconfig.get_paths()["purelib"]
    prelude = f"import site, sys; site.addsitedir({str(site)!r}); sys.path.append({deps!r}); "
    done = subprocess.run([sys.executable, "-S", "-c", prelude + code], capture_output=True, text=True, cwd=site.parent)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_wheel_ships_our_package_and_the_aios_paths_but_no_top_level_llm_compression(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert PTH in names
    assert "llm_workbook/__init__.py" in names
    assert "llm_workbook_aios_api/llm_compression/inference/weight_loader.py" in names
    assert not [n for n in names if n.startswith("llm_compression/")]
    pth = zipfile.ZipFile(wheel).read(PTH).decode().split()
    assert pth == ["llm_workbook_aios_api"]  # a path line only: nothing runs at interpreter start


def test_distribution_name_differs_from_aios(wheel):
    # AI-OS's setup.py names its distribution llm_compression; pip normalises names, so equal names would
    # make installing one uninstall the other.
    name = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["name"]
    assert name.lower().replace("_", "-") != "llm-compression"


def test_without_aios_its_import_paths_reach_our_modules(tmp_path, wheel):
    site = _site(tmp_path, wheel)
    out = _imports(site, "import llm_compression.inference.weight_loader as a, llm_workbook.inference.weight_loader as b, "
                         "llm_compression; print(a is b, llm_compression.PROVIDED_BY, b.__file__)")
    same, provided_by, where = out.split()
    assert (same, provided_by) == ("True", "llm_workbook")
    assert Path(where).is_relative_to(site)


def test_with_aios_installed_aios_keeps_its_package_and_ours_still_works(tmp_path, wheel):
    site = _site(tmp_path, wheel)
    _write_aios(site)  # installed into the same site-packages, as pip would
    out = _imports(site, "import llm_compression, llm_compression.inference.weight_loader as w; "
                         "from llm_workbook.inference.weight_loader import WeightLoader; import llm_workbook.store.loader; "
                         "print(llm_compression.AIOS, w.WeightLoader.AIOS, WeightLoader.__module__, sep='|')")
    assert out.split("|") == [AIOS_MARKER, "True", "llm_workbook.inference.weight_loader"]


FINDER = """import importlib.util, sys
class AiosFinder:
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name == "llm_compression":
            return importlib.util.spec_from_file_location(name, {init!r}, submodule_search_locations=[{pkg!r}])
def install():
    sys.meta_path.append(AiosFinder)
"""


@pytest.mark.parametrize("how", ["path line", "finder"])
def test_with_aios_installed_editable_aios_keeps_its_package(tmp_path, wheel, how):
    site = _site(tmp_path, wheel)
    checkout = tmp_path / "ArrowQuant_V2"
    _write_aios(checkout)
    pth = site / "__editable__.llm_compression-0.1.0.pth"
    if how == "path line":  # older setuptools: the checkout on sys.path
        pth.write_text(f"{checkout}\n")
    else:  # setuptools >= 64 on AI-OS's flat setup.py: a finder appended to sys.meta_path, after sys.path
        package = checkout / "llm_compression"
        (site / "aios_editable_finder.py").write_text(FINDER.format(init=str(package / "__init__.py"), pkg=str(package)))
        pth.write_text("import aios_editable_finder; aios_editable_finder.install()\n")
    out = _imports(site, "import llm_compression, llm_compression.inference.weight_loader as w; "
                         "print(llm_compression.AIOS, w.__file__, sep='|')")
    marker, loader = out.split("|")
    assert marker == AIOS_MARKER
    assert Path(loader).is_relative_to(checkout)


def test_our_package_never_imports_llm_compression():
    # Where AI-OS is installed, llm_compression is AI-OS's: our code must not depend on which one it gets.
    for path in (REPO / "lib" / "llm_workbook").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not [n for n in names if n.split(".")[0] == "llm_compression"], path
