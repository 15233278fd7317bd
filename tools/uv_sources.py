"""Print the uv arguments that make `uv pip install` see the package sources (and trust the certificates) pip is
configured with.

The environments are installed with uv (seconds instead of minutes), but only pip reads pip.conf and PIP_*
variables, and a machine may keep its wheels there (here: the CPU build of torch in a find-links directory;
without it torch==2.13.0 resolves to a CUDA build of several GB). uv is also told to pick the best version
across all indexes, as pip does, so both install the same versions.

Usage: python tools/uv_sources.py   (reads `python -m pip config list` of the interpreter running it)
"""

from __future__ import annotations

import shlex
import subprocess
import sys

# pip setting -> uv option; each pip value may hold several whitespace-separated entries.
OPTIONS = {
    "index-url": "--index-url",
    "extra-index-url": "--extra-index-url",
    "find-links": "--find-links",
    "constraint": "--constraint",
    "cert": "--cert",  # the CA bundle pip trusts (a registry behind a proxy needs it)
}
# pip reads [global], then [install], then PIP_* variables, each overriding the one before.
PRECEDENCE = ("global", "install", ":env:")


def uv_arguments(pip_config_list: str) -> list[str]:
    """uv options for the output of `pip config list` (lines like global.find-links='/opt/wheels')."""
    settings: dict[str, tuple[int, str]] = {}
    for line in pip_config_list.splitlines():
        key, sep, value = line.partition("=")
        section, _, name = key.rpartition(".")
        if not sep or section not in PRECEDENCE or name not in OPTIONS:
            continue
        rank = PRECEDENCE.index(section)
        if name not in settings or rank >= settings[name][0]:
            settings[name] = (rank, shlex.split(value)[0] if value else "")
    arguments = ["--index-strategy", "unsafe-best-match"]
    for name, (_, value) in settings.items():
        for entry in value.split():
            arguments += [OPTIONS[name], entry]
    return arguments


def main() -> None:
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                            check=True).stdout
    print(shlex.join(uv_arguments(listed)))


if __name__ == "__main__":
    main()
