"""Offline text corpora for training the toy LM, calibrating quantizers and measuring perplexity.

The default corpus ("pydoc") is the English reference text every CPython ships in
``pydoc_data.topics.topics`` (about 465k characters in 3.11), so nothing has to be downloaded.
Its topics overlap (e.g. "specialnames" contains "customization"), so topics that share any
``WINDOW_CHARS``-long passage are grouped first and whole groups go to one split: no topic and no
200-character passage of the eval split is in the train split.

``name`` may also be a local ``.txt`` / ``.jsonl`` file, or (online only, with the optional
``datasets`` package) a Hugging Face dataset id such as ``"wikitext-2-raw-v1"``.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

DEFAULT_CORPUS = "pydoc"
SPLITS = ("train", "eval")
# Two texts sharing a passage this long are treated as the same material.
WINDOW_CHARS = 200
# Share of the pydoc characters that goes to the eval split (greedy, never above this).
EVAL_FRACTION = 0.15
TEXT_SEPARATOR = "\n\n"

# Configs of the "wikitext" dataset, accepted as bare names.
_WIKITEXT_CONFIGS = ("wikitext-2-raw-v1", "wikitext-2-v1", "wikitext-103-raw-v1", "wikitext-103-v1")


class CorpusUnavailableError(RuntimeError):
    """A corpus that needs something not present here (a package, the network)."""


# ----------------------------------------------------------------------------- pydoc corpus


def _stable_rank(key: str) -> str:
    """A process-independent ordering key (Python's hash() is salted per process)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _overlap_groups(topics: dict[str, str], window: int) -> list[list[str]]:
    """Groups of topic keys linked by a shared passage of ``window`` chars or more (union-find).

    Any shared passage of ``window`` chars fully covers one ``window // 2``-char piece of the other
    topic that starts at a multiple of ``window // 2``; indexing only those pieces keeps memory small.
    Shorter shared passages may link topics too, which only makes the split more conservative.
    """
    keys = sorted(topics)
    parent = {k: k for k in keys}

    def find(k: str) -> str:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    piece_len = window // 2
    anchors: dict[str, set[str]] = {}
    for key in keys:
        text = topics[key]
        for start in range(0, len(text) - piece_len + 1, piece_len):
            anchors.setdefault(text[start : start + piece_len], set()).add(key)
    for key in keys:
        text = topics[key]
        for start in range(0, len(text) - piece_len + 1):
            owners = anchors.get(text[start : start + piece_len])
            if not owners:
                continue
            for other in owners:
                ra, rb = find(key), find(other)
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)
    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault(find(key), []).append(key)
    return sorted(groups.values())


@lru_cache(maxsize=1)
def pydoc_split_keys() -> dict[str, tuple[str, ...]]:
    """Topic keys of each split of the pydoc corpus: ``{"train": (...), "eval": (...)}``.

    Deterministic: overlap groups are visited in sha256 order of their first key and put in eval
    while eval stays within ``EVAL_FRACTION`` of all characters; everything else is train.
    """
    from pydoc_data.topics import topics

    groups = _overlap_groups(topics, WINDOW_CHARS)
    total = sum(len(t) for t in topics.values())
    budget = EVAL_FRACTION * total
    eval_keys: list[str] = []
    eval_chars = 0
    for group in sorted(groups, key=lambda g: _stable_rank(g[0])):
        size = sum(len(topics[k]) for k in group)
        if eval_chars + size <= budget:
            eval_keys.extend(group)
            eval_chars += size
    eval_set = set(eval_keys)
    return {
        "train": tuple(k for k in sorted(topics) if k not in eval_set),
        "eval": tuple(sorted(eval_set)),
    }


def _pydoc_texts(split: str) -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in pydoc_split_keys()[split]]


# ----------------------------------------------------------------------------- other sources


def _file_texts(path: Path) -> list[str]:
    """A .txt file is one text; a .jsonl file gives the "text" field of each line."""
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [path.read_text(encoding="utf-8")]
    if suffix == ".jsonl":
        texts = []
        with path.open(encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}: line {line_no} is not valid JSON ({exc})") from exc
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise ValueError(f"{path}: line {line_no} has no string field 'text'")
                texts.append(record["text"])
        return texts
    raise ValueError(f"corpus file {path}: expected a .txt or .jsonl file, got '{suffix}'")


def _hf_dataset_texts(name: str, split: str) -> list[str]:
    """Texts of a Hugging Face dataset (needs the optional `datasets` package and the network)."""
    try:
        import datasets  # noqa: PLC0415 - optional, heavy, only for online corpora
    except ImportError as exc:
        raise CorpusUnavailableError(
            f"corpus '{name}' is not a built-in corpus or a local file, so it would be loaded as a "
            "Hugging Face dataset, but the optional package `datasets` is not installed. "
            "Install it with `pip install datasets` (needs network access to the Hub), or use "
            f"name='{DEFAULT_CORPUS}' or a local .txt/.jsonl file."
        ) from exc
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise CorpusUnavailableError(
            f"corpus '{name}' is a Hugging Face dataset but HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set; "
            f"unset it on a machine with Hub access, or use name='{DEFAULT_CORPUS}' or a local file."
        )
    path, config = ("wikitext", name) if name in _WIKITEXT_CONFIGS else (name, None)
    # Our "eval" is the held-out split; datasets call it "test" or "validation".
    candidates = ["train"] if split == "train" else ["test", "validation"]
    last_error: Exception | None = None
    for hf_split in candidates:
        try:
            data = datasets.load_dataset(path, config, split=hf_split)
        except ValueError as exc:  # unknown split name: try the next one
            last_error = exc
            continue
        except Exception as exc:  # network, auth, unknown dataset
            raise CorpusUnavailableError(f"could not load Hugging Face dataset '{name}': {exc}") from exc
        if "text" not in data.column_names:
            raise ValueError(f"Hugging Face dataset '{name}' has no 'text' column ({data.column_names})")
        return [t for t in data["text"] if t.strip()]
    raise CorpusUnavailableError(f"Hugging Face dataset '{name}' has none of the splits {candidates}: {last_error}")


# ----------------------------------------------------------------------------- public API


def load_texts(name: str = DEFAULT_CORPUS, split: str = "eval") -> list[str]:
    """The texts of one split of a corpus.

    ``name``: "pydoc" (offline default), a path to a local ``.txt``/``.jsonl`` file (used whole,
    whatever ``split`` says: the caller picked the file for that purpose), or a Hugging Face
    dataset id such as "wikitext-2-raw-v1" (online only, optional ``datasets`` package).
    ``split``: "train" or "eval".
    """
    if split not in SPLITS:
        raise ValueError(f"corpus split must be one of {SPLITS}, got {split!r}")
    if name == DEFAULT_CORPUS:
        return _pydoc_texts(split)
    path = Path(name)
    if path.suffix.lower() in (".txt", ".jsonl") or path.exists():
        if not path.is_file():
            raise ValueError(f"corpus file {path} does not exist or is not a file")
        return _file_texts(path)
    return _hf_dataset_texts(name, split)


def load_text(name: str = DEFAULT_CORPUS, split: str = "eval") -> str:
    """One string: the split's texts joined with blank lines."""
    return TEXT_SEPARATOR.join(load_texts(name, split))


def corpus_fingerprint(name: str = DEFAULT_CORPUS, split: str = "train") -> str:
    """sha256 of ``load_text(name, split)``; pydoc text differs between Python releases."""
    return hashlib.sha256(load_text(name, split).encode("utf-8")).hexdigest()


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens, for a transformers or a `tokenizers` tokenizer."""
    if hasattr(tokenizer, "encode_batch"):  # tokenizers.Tokenizer
        return list(tokenizer.encode(text, add_special_tokens=False).ids)
    # verbose=False: the whole corpus is longer than model_max_length, and that is intended here.
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def calibration_samples(
    tokenizer: Any,
    n_samples: int = 128,
    seq_len: int = 256,
    seed: int = 0,
    name: str = DEFAULT_CORPUS,
) -> torch.Tensor:
    """``n_samples`` random windows of ``seq_len`` tokens from the train split, as LongTensor [n, seq_len].

    Start positions come from a torch.Generator seeded with ``seed``, so the same inputs give the
    same tensor.
    """
    if n_samples < 1 or seq_len < 1:
        raise ValueError(f"calibration_samples: n_samples and seq_len must be >= 1, got {n_samples}, {seq_len}")
    ids = torch.tensor(encode_text(tokenizer, load_text(name, "train")), dtype=torch.long)
    if ids.numel() < seq_len:
        raise ValueError(
            f"calibration_samples: corpus '{name}' train split has {ids.numel()} tokens, fewer than seq_len={seq_len}"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (n_samples,), generator=generator)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
