"""What a user names as a model, classified once: its kind, where it is, and how to open it.

Each entry point (the CLI, the notebook, ``quantize``, ``evaluate``, a perf child) turns the text it was given into a
``Source`` with ``Source.of``; the layers below ask the value (``kind``, ``is_parquet``, ``root()``, ``config()``,
``loader()``) and never look at the text again. ``Source.of`` returns a ``Source`` it is given unchanged, so a
function may take either. Adding a kind of source is one branch in ``Source.of``.

Prefixed names (``builtin:<name>``) are resolved to a path by the layer that owns them, through ``RESOLVERS``
(the workbook registers its builtins there), so the store never imports upward.
"""

from __future__ import annotations

import enum
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from llm_workbook import schema as S
from llm_workbook.errors import SourceNotFoundError, StoreError
from llm_workbook.store import remote
from llm_workbook.store.checkpoint import Checkpoint, hub_snapshot, open_checkpoint

# prefix -> a function giving the local path the prefixed name stands for (built on first use)
RESOLVERS: dict[str, Callable[[str], str]] = {}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name
AIOS_MODEL_FILE = "weights.parquet"  # what an AI-OS model directory keeps its weights in


class Kind(enum.StrEnum):
    PARQUET = "parquet"  # a weight file of ours (schema 3), on this machine
    REMOTE = "remote"  # a weight file of ours at s3:// or hf://
    AIOS = "aios"  # an AI-OS V1/V2 weight file, or a model directory holding one as weights.parquet
    GGUF = "gguf"  # a .gguf file (or one named by gguf_file inside a directory or hub repository)
    HF_DIR = "hf-dir"  # a checkpoint directory: config.json and safetensors
    HUB = "hub"  # a hub id, resolved to a cached snapshot when opened


@dataclass(frozen=True)
class Source:
    name: str  # as the user named it: messages and records say this
    kind: Kind
    path: Path | None = None  # where it is on this machine (None: a hub id or a URL)
    revision: str | None = None  # a hub id's revision
    gguf_file: str | None = None  # a GGUF file inside a directory or hub repository

    @classmethod
    def of(cls, value: Source | str | os.PathLike, revision: str | None = None,
           gguf_file: str | None = None) -> Source:
        """Classify ``value`` (a Source is returned as it is). One clear StoreError when it is none of the kinds."""
        if isinstance(value, Source):
            return value
        name = os.fspath(value)
        for prefix, resolver in RESOLVERS.items():
            if name.startswith(prefix):  # the Source of what the name stands for
                return cls.of(resolver(name), revision, gguf_file)
        if remote.is_remote(name):
            if not name.endswith(".parquet"):
                raise StoreError(f"{name}: a remote source must be a .parquet weight file")
            return cls(name, Kind.REMOTE)
        path = Path(name)
        if gguf_file is not None and not path.is_file():
            local = path if path.is_dir() else None
            if local is None and not HUB_ID.match(name):
                raise SourceNotFoundError(f"{name}: no such directory, and not a hub id of the form owner/name")
            return cls(name, Kind.GGUF, local, revision, gguf_file)
        if path.is_dir():
            if _is_aios_file(path / AIOS_MODEL_FILE):
                return cls(name, Kind.AIOS, path)
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            if ggufs and not any(path.glob("*.safetensors")):
                raise StoreError(f"{path}: holds GGUF files {ggufs} but no safetensors; pick one with --gguf-file NAME")
            return cls(name, Kind.HF_DIR, path)
        if path.is_file():
            if path.suffix == ".gguf" or _starts_with(path, b"GGUF"):
                return cls(name, Kind.GGUF, path)
            if path.suffix == ".parquet":
                return cls(name, Kind.AIOS if _is_aios_file(path) else Kind.PARQUET, path)
            raise StoreError(f"{name}: expected a checkpoint directory, a hub id, a .parquet or a .gguf file")
        if name.endswith(".parquet"):
            raise SourceNotFoundError(f"{name}: no such Parquet file")
        if HUB_ID.match(name):
            return cls(name, Kind.HUB, None, revision)
        raise SourceNotFoundError(f"{name}: no such directory, and not a hub id of the form owner/name")

    def __str__(self) -> str:
        return self.name

    def __fspath__(self) -> str:
        """Where it is, for code that opens paths (a URL or hub id as named)."""
        return str(self.path) if self.path is not None else self.name

    @property
    def is_parquet(self) -> bool:
        """A Parquet weight file the store's loader reads as it is (ours, remote, or an AI-OS file)."""
        return self.kind in (Kind.PARQUET, Kind.REMOTE) or (self.kind is Kind.AIOS and self.path.is_file())

    @property
    def is_checkpoint(self) -> bool:
        """An HF checkpoint: a directory or a hub id (safetensors and config.json)."""
        return self.kind in (Kind.HF_DIR, Kind.HUB)

    @property
    def location(self) -> str | Path:
        """What the loader opens: a URL as text, a local file as a path."""
        return self.name if self.kind is Kind.REMOTE else self.path

    @property
    def aios_file(self) -> Path:
        """The AI-OS weight file itself (a model directory's weights.parquet)."""
        if self.kind is not Kind.AIOS:
            raise StoreError(f"{self.name}: not an AI-OS weight file or model directory")
        return self.path / AIOS_MODEL_FILE if self.path.is_dir() else self.path

    def root(self) -> Path:
        """The checkpoint directory (a hub id's cached snapshot, fetched when missing and the hub is reachable)."""
        if self.kind is Kind.HF_DIR or (self.kind is Kind.GGUF and self.gguf_file and self.path is not None):
            return self.path
        if self.kind is Kind.HUB or (self.kind is Kind.GGUF and self.gguf_file):
            if "_snapshot" not in self.__dict__:  # looked up (or downloaded) once per Source, however often asked
                object.__setattr__(self, "_snapshot", hub_snapshot(self.name, revision=self.revision,
                                                                   gguf_file=self.gguf_file))
            return self.__dict__["_snapshot"]
        got = "an AI-OS model directory" if self.path is not None and self.path.is_dir() else "a file"
        raise StoreError(f"{self.name}: expected a checkpoint directory or a hub id, got {got}")

    def gguf(self) -> Path:
        """The GGUF file to read."""
        if self.kind is not Kind.GGUF:
            raise StoreError(f"{self.name}: not a GGUF file")
        if self.gguf_file is None:
            return self.path
        target = self.root() / self.gguf_file
        if not target.is_file():
            found = sorted(p.name for p in target.parent.glob("*.gguf"))
            raise StoreError(f"{target}: no such GGUF file in {self.name} (GGUF files there: {found})")
        return target

    def loader(self):
        """The store's reader of a Parquet weight file."""
        from llm_workbook.store.loader import WeightLoaderV2

        if not self.is_parquet:
            raise StoreError(f"{self.name}: not a Parquet weight file")
        return WeightLoaderV2(self.location)

    def checkpoint(self, allow_pickle: bool = False) -> Checkpoint:
        """An HF checkpoint's config, side files and tensor headers (tensors read on request)."""
        return open_checkpoint(self.root(), allow_pickle=allow_pickle)

    def config(self) -> dict:
        """config.json, without loading weights (from inside a weight file, or the checkpoint's own)."""
        if self.is_parquet:
            config = self.loader().config
            if not config:
                raise StoreError(f"{self.name}: no config.json inside the file")
            return config
        path = self.root() / "config.json"
        if not path.is_file():
            raise StoreError(f"{path}: missing (every checkpoint needs its config.json)")
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise StoreError(f"{path}: not valid JSON ({exc})") from None


def _starts_with(path: Path, magic: bytes) -> bool:
    with open(path, "rb") as handle:
        return handle.read(len(magic)) == magic


def _is_aios_file(path: Path) -> bool:
    if not path.is_file() or path.suffix != ".parquet":
        return False
    try:
        return S.detect_version(pq.read_schema(path)).is_aios
    except (pa.ArrowException, OSError, ValueError):
        return False
