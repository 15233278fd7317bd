"""The original's side of a causal-LM comparison, computed once and kept on disk.

Ten candidates of one original read the same windows of the same text; the original's outputs on them
do not change, so they are computed once (as llama.cpp's ``llama-perplexity --kl-divergence-base``
saves the base model's logits) and each candidate is scored against the file. Stored per window:

* the last hidden state (float32, exact): the cosine basis;
* the logits, in float32 by default (every metric then equals the direct computation exactly), or with
  ``precision="float16"`` as float16 log-probabilities (``logits - logsumexp``) plus the float32
  logsumexp, half the disk. Log-probs rather than logits, because float16 is fine-grained near 0, where
  the probable tokens are: KL divergence from them agrees with float32 to 1e-3 relative (tested), and
  logits are recovered as ``logprobs + logsumexp`` for the logits cosine;
* the top-1 token (int32, exact) and each scored token's negative log-likelihood (float64, exact), whose
  sum is also in the metadata;
* the greedy generation of each prompt (token ids, exact).

An entry (``<key>.reference/``) is keyed by everything that determines it: the original's identity (config,
weight files' names, sizes and mtimes), the token ids, windows, prompts, dtype and package versions. It is a
directory of safetensors shards, one per window (and one for the generations), written as each window is
scored, so computing it holds one window's outputs, not the whole text's (16,384 tokens of a 151,936-word
vocabulary are 5 GB of float16 log-probs); ``meta.json`` lists each array's shard and xxh3, verified on load.
The directory is staged and renamed into place when complete. The original's lm-eval answers are an entry of
their own (``<key>.tasks/``, keyed by the original, the tasks and their limit), so runs with and without tasks
share the scored windows.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import xxhash
from safetensors import safe_open
from safetensors.torch import save_file

from llm_workbook.paths import __version__
from llm_workbook.store.source import Kind, Source

FORMAT_VERSION = 3  # 2: per-token NLL of the original (nll.<i>); 3: a directory of shards


def _checksum(tensor: torch.Tensor) -> str:
    return xxhash.xxh3_64_hexdigest(tensor.contiguous().view(torch.uint8).numpy())


def source_identity(source: Source | str | os.PathLike) -> dict:
    """What changes when the original's weights change: its files' names, sizes and mtimes, and config.json."""
    from llm_workbook.store.remote import identity

    source = Source.of(source)
    if source.kind is Kind.REMOTE:
        return identity(source.name)
    path = source.path or Path(source.name)  # a hub id: no local files to follow (its revision is in its name)
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else []
    identity = {"source": source.name}
    for p in files:
        stat = p.stat()
        identity[p.name] = [stat.st_size, stat.st_mtime_ns]
    if path.is_dir() and (path / "config.json").is_file():
        identity["config"] = hashlib.sha256((path / "config.json").read_bytes()).hexdigest()
    return identity


def cache_key(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


@dataclass
class ReferenceSide:
    """The original's outputs on every window, read lazily from the cache entry's shards."""

    path: Path
    meta: dict  # nll_sum, original (its ModelInfo), key payload, and each array's shard and checksum
    answers: "ReferenceSide | None" = None  # the original's lm-eval answers, a cache entry of their own

    def _get(self, name: str) -> torch.Tensor:
        shard = self.path / f"{self.meta['shards'][name]}.safetensors"
        with safe_open(str(shard), framework="pt") as handle:
            tensor = handle.get_tensor(name)
        expected = self.meta["checksums"].get(name)
        if expected != _checksum(tensor):
            raise ValueError(f"{self.path}: checksum mismatch for {name!r}; delete the file to recompute it")
        return tensor

    def window(self, i: int) -> dict[str, torch.Tensor]:
        keys = ("hidden", "logits", "top1", "nll") if self.meta.get("precision", "float32") == "float32" else (
            "hidden", "logprobs", "lse", "top1", "nll")
        return {k: self._get(f"{k}.{i}") for k in keys}

    def generation(self, j: int) -> torch.Tensor:
        return self._get(f"gen.{j}")

    def task(self, name: str) -> torch.Tensor:
        """The original's per-item correctness on one lm-eval task."""
        if self.answers is None:
            raise ValueError(f"{self.path}: the original's lm-eval answers were not computed")
        return self.answers._get(f"task.{name}")

    @property
    def nll_sum(self) -> float:
        return float(self.meta["nll_sum"])


def load(path: Path) -> ReferenceSide | None:
    """The cached side, or None when missing or unreadable (then it is recomputed)."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        return None
    return ReferenceSide(path, meta)


class SideWriter:
    """Writes an entry's shards into its staging directory (``writing``); ``finish`` adds ``meta.json``."""

    def __init__(self, path: Path, staging: Path):
        self.path, self.staging = path, staging
        self.shards: dict[str, str] = {}
        self.checksums: dict[str, str] = {}
        self.side: ReferenceSide | None = None

    def add(self, shard: str, tensors: dict[str, torch.Tensor]) -> None:
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        save_file(tensors, str(self.staging / f"{shard}.safetensors"))
        for name, tensor in tensors.items():
            self.shards[name], self.checksums[name] = shard, _checksum(tensor)

    def finish(self, meta: dict[str, Any]) -> None:
        meta = {**meta, "format_version": FORMAT_VERSION, "llmc_version": __version__, "shards": self.shards,
                "checksums": self.checksums}
        (self.staging / "meta.json").write_text(json.dumps(meta, default=str))
        self.side = ReferenceSide(self.path, meta)


@contextmanager
def writing(path: Path) -> Iterator[SideWriter]:
    """An entry written shard by shard (``store.writer.staged_directory``): renamed into place when the block
    ends, gone when it fails. An entry already there is one ``load`` refused (outdated or damaged)."""
    from llm_workbook.store.writer import staged_directory

    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(path, ignore_errors=True)
    with staged_directory(path) as staging:
        yield SideWriter(path, staging)


PRECISIONS = ("float32", "float16")


def window_outputs(logits: torch.Tensor, hidden: torch.Tensor, precision: str = "float32") -> dict[str, torch.Tensor]:
    """What is kept of one window: hidden state, logits (or float16 log-probs and logsumexp), top-1."""
    if precision not in PRECISIONS:
        raise ValueError(f"reference precision must be one of {PRECISIONS}, got {precision!r}")
    out = {"hidden": hidden.float().contiguous(), "top1": logits.argmax(dim=-1).to(torch.int32)}
    if precision == "float32":
        out["logits"] = logits.float().contiguous()
    else:
        lse = torch.logsumexp(logits.float(), dim=-1)
        out.update(logprobs=(logits.float() - lse.unsqueeze(-1)).to(torch.float16), lse=lse)
    return out


def logits_of(window: dict[str, torch.Tensor]) -> torch.Tensor:
    if "logits" in window:
        return window["logits"]
    return window["logprobs"].float() + window["lse"].unsqueeze(-1)
