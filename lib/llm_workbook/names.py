"""Names that come from inside a weight file (side files, shards, run names) are names, not paths.

A hostile file can list a side file called ``../../.bashrc`` or ``/etc/cron.d/x``; joined to an output
directory, that writes outside it. Every such name is checked here before it touches the file system.
"""

from __future__ import annotations

import re

from llm_workbook.errors import StoreError

# Names Windows reserves for devices, with or without an extension (a file shared from there must not be one).
_DEVICES = re.compile(r"^(con|prn|aux|nul|com[0-9]|lpt[0-9]|conin\$|conout\$)(\..*)?$", re.IGNORECASE)
_FORBIDDEN = set('/\\:*?"<>|\0')
MAX_NAME_BYTES = 255  # the usual file-system limit for one path component


def problem(name: object) -> str | None:
    """Why ``name`` is not one plain file name, or None when it is."""
    if not isinstance(name, str) or not name:
        return "is not a non-empty string"
    if name in (".", ".."):
        return "is a directory reference"
    if name.startswith("."):
        return "is a hidden name"
    bad = sorted({c for c in name if c in _FORBIDDEN or ord(c) < 32})
    if bad:
        return f"contains {', '.join(repr(c) for c in bad)} (a path, not a file name)"
    if name != name.strip() or name.endswith("."):
        return "has leading/trailing spaces or a trailing dot"
    if _DEVICES.match(name):
        return "is a device name"
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        return f"is longer than {MAX_NAME_BYTES} bytes"
    return None


def file_name(name: object, *, source: object, entry: str) -> str:
    """``name`` when it is one plain file name; otherwise a StoreError naming the file and the entry."""
    why = problem(name)
    if why:
        raise StoreError(f"{source}: {entry} {name!r} {why}; refused, nothing written")
    return name  # type: ignore[return-value]


def safe_stem(text: str) -> str:
    """A file name made from free text (a path, a hub id): path separators and odd characters become '-',
    and it never starts with '-' or '.' (so a shell or a CLI does not take it for an option)."""
    stem = re.sub(r"[^A-Za-z0-9._+=-]+", "-", text).strip("-.")
    stem = stem[:120].rstrip("-.")
    return stem or "run"
