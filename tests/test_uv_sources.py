"""The environments are installed by uv with the package sources pip is configured with (tools/uv_sources.py)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from conftest import REPO

_spec = importlib.util.spec_from_file_location("uv_sources", REPO / "tools" / "uv_sources.py")
uv_sources = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(uv_sources)
UV = REPO / ".venv" / "bin" / "uv"


def _options(arguments: list[str]) -> list[tuple[str, str]]:
    return list(zip(arguments[::2], arguments[1::2]))


def test_pip_settings_become_uv_options_with_pips_precedence():
    listed = "\n".join([
        "global.cert='/etc/ssl/certs/ca-certificates.crt'",
        "global.find-links='/opt/wheels'",
        "global.extra-index-url='file:///a/simple file:///b/simple'",
        "install.extra-index-url='file:///c/simple'",
        ":env:.find-links='/env/wheels'",
        ":env:.default-timeout='180'",
        "global.constraint='/etc/caps.txt'",
    ])
    options = _options(uv_sources.uv_arguments(listed))
    assert ("--index-strategy", "unsafe-best-match") in options  # pip's best version across indexes
    assert ("--find-links", "/env/wheels") in options and ("--find-links", "/opt/wheels") not in options
    assert [v for o, v in options if o == "--extra-index-url"] == ["file:///c/simple"]  # [install] over [global]
    assert ("--constraint", "/etc/caps.txt") in options
    assert ("--cert", "/etc/ssl/certs/ca-certificates.crt") in options
    assert not any(v == "180" for _, v in options)  # settings uv has no counterpart for are left out


def test_reads_what_pip_itself_prints_for_a_config_file_and_the_environment(tmp_path):
    config = tmp_path / "pip.conf"
    config.write_text("[global]\nextra-index-url = file:///x/simple file:///y/simple\nconstraint = /caps.txt\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=str(config), PIP_FIND_LINKS=str(tmp_path / "wheels"))
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], env=env, capture_output=True,
                            text=True, check=True).stdout
    options = _options(uv_sources.uv_arguments(listed))
    assert [v for o, v in options if o == "--extra-index-url"] == ["file:///x/simple", "file:///y/simple"]
    assert ("--find-links", str(tmp_path / "wheels")) in options
    assert ("--constraint", "/caps.txt") in options


@pytest.mark.skipif(not UV.exists(), reason="uv is not in .venv (make setup installs it)")
def test_uv_accepts_the_options(tmp_path):
    """uv parses what the script prints (a dry run, offline, of a package already installed)."""
    (tmp_path / "caps.txt").write_text("# no caps\n")
    certifi = pytest.importorskip("certifi")  # a CA bundle that exists wherever requests is installed
    arguments = uv_sources.uv_arguments(f"global.find-links='{tmp_path}'\nglobal.constraint='{tmp_path}/caps.txt'\n"
                                        f"global.cert='{certifi.where()}'")
    done = subprocess.run([str(UV), "pip", "install", "--dry-run", "--offline", "--python", sys.executable,
                           *arguments, "--no-deps", "pip"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_makefile_and_angelslim_build_install_through_it():
    makefile = (REPO / "Makefile").read_text()
    assert "tools/uv_sources.py" in makefile and "--compile-bytecode" in makefile
    assert "tools/uv_sources.py" in makefile.split("$(STAMP):", 1)[1].splitlines()[0]  # a change rebuilds .venv
    assert "uv_sources.py" in (REPO / "tools" / "angelslim" / "build_env.sh").read_text()
