"""Reading a Hugging Face checkpoint directory (a hub id's is its cached snapshot), one tensor at a time.

Weights come from safetensors (single file or shards with ``model.safetensors.index.json``);
``pytorch_model.bin`` (pickle) only with ``allow_pickle``. config.json, generation_config.json,
tokenizer files and other small side files are kept verbatim so the Parquet file is self-contained.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from llm_workbook import names
from llm_workbook.errors import StoreError
from llm_workbook.formats.base import TensorInfo
from llm_workbook.schema import dtype_code

INDEX_FILE = "model.safetensors.index.json"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".onnx", ".msgpack", ".h5", ".ckpt")
SKIP_SUFFIXES = (".md", ".lock", ".gitattributes", ".png", ".jpg", ".jpeg", ".gif")
SIDE_FILE_MAX_BYTES = 64 * 1024 * 1024
# What a hub download needs: weights, configs, tokenizer files (no other frameworks' weights, no images).
HUB_PATTERNS = [
    "*.safetensors", "*.json", "*.model", "*.tiktoken", "*.txt", "*.jinja", "tokenizer*", "*.py",
]


def hub_snapshot(repo_id: str, revision: str | None = None, gguf_file: str | None = None) -> Path:
    """A hub repository's local snapshot directory, downloaded with ``snapshot_download`` if needed.

    With ``HF_HUB_OFFLINE=1`` it must already be in the local cache (``HF_HUB_CACHE``).
    ``gguf_file``: a repository of GGUF files, of which only that one (and the configs) is fetched.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        patterns = [gguf_file, "*.json", "*.jinja"] if gguf_file else HUB_PATTERNS
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except LocalEntryNotFoundError as exc:
        raise StoreError(
            f"{repo_id}: not in the local Hugging Face cache and the hub cannot be reached "
            f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}). Download it where the network is "
            f"available with `hf download {repo_id}` (or `huggingface-cli download {repo_id} --local-dir DIR`) "
            f"and pass that directory, or copy the cache into HF_HUB_CACHE ({exc.__class__.__name__})"
        ) from None
    except (HfHubHTTPError, OSError) as exc:
        raise StoreError(f"{repo_id}: hub download failed: {exc}") from None


def _read_json(path: Path) -> tuple[dict, str]:
    try:
        text = path.read_text(encoding="utf-8")
        value = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StoreError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise StoreError(f"{path}: expected a JSON object")
    return value, text


@dataclass
class Checkpoint:
    """A checkpoint directory, read lazily: headers now, tensor data on request."""

    root: Path
    config: dict
    config_text: str
    generation_config_text: str | None
    side_files: dict[str, bytes]
    tensors: dict[str, TensorInfo]  # in source order (shard by shard)
    tensor_file: dict[str, Path]
    shard_layout: dict[str, list[str]]  # shard filename -> tensor names in file order
    shard_metadata: dict[str, dict | None]  # shard filename -> safetensors __metadata__
    index_metadata: dict | None = None
    pickled: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def quantization_config(self) -> dict | None:
        return self.config.get("quantization_config")

    def read(self, name: str) -> torch.Tensor:
        """One tensor, read from its shard (bit-exact, original dtype)."""
        if self.pickled is not None:
            return self.pickled[name]
        path = self.tensor_file[name]
        try:
            with safe_open(str(path), framework="pt") as handle:
                return handle.get_tensor(name)
        except Exception as exc:  # safetensors raises its own error types
            raise StoreError(f"{path}: cannot read tensor {name!r}: {exc}") from None


def _safetensors_header(path: Path) -> tuple[list[TensorInfo], dict | None]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
            infos = []
            for name in handle.keys():
                view = handle.get_slice(name)
                infos.append(TensorInfo(name, _code(view.get_dtype(), path, name), tuple(view.get_shape())))
    except StoreError:
        raise
    except Exception as exc:
        raise StoreError(f"{path}: not a readable safetensors file ({exc})") from None
    return infos, metadata


def _code(st_dtype: str, path: Path, name: str) -> str:
    # safe_open reports codes like "BF16", "F8_E4M3"; check they are ones we can store.
    from llm_workbook.schema import DTYPE_CODES

    if st_dtype not in DTYPE_CODES:
        raise StoreError(f"{path}: tensor {name!r} has dtype {st_dtype}, which the store does not support")
    return st_dtype


def _side_files(root: Path) -> dict[str, bytes]:
    files = {}
    for entry in sorted(root.iterdir()):
        name = entry.name
        if not entry.is_file() or name.startswith("."):
            continue
        if name in ("config.json", "generation_config.json", INDEX_FILE) or name in PICKLE_FILES:
            continue
        if name.endswith(WEIGHT_SUFFIXES) or name.endswith(SKIP_SUFFIXES):
            continue
        if entry.stat().st_size > SIDE_FILE_MAX_BYTES:
            continue
        files[name] = entry.read_bytes()
    return files


def open_checkpoint(root: Path, allow_pickle: bool = False) -> Checkpoint:
    """Read config, side files and tensor headers of a checkpoint directory."""
    config_path = root / "config.json"
    if not config_path.is_file():
        raise StoreError(f"{config_path}: missing (every checkpoint needs its config.json)")
    config, config_text = _read_json(config_path)
    gen_path = root / "generation_config.json"
    generation_text = None
    if gen_path.is_file():
        _, generation_text = _read_json(gen_path)

    tensors: dict[str, TensorInfo] = {}
    tensor_file: dict[str, Path] = {}
    layout: dict[str, list[str]] = {}
    shard_meta: dict[str, dict | None] = {}
    index_meta = None
    pickled = None

    index_path = root / INDEX_FILE
    if index_path.is_file():
        index, _ = _read_json(index_path)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise StoreError(f"{index_path}: no weight_map")
        index_meta = index.get("metadata")
        shards = list(dict.fromkeys(weight_map.values()))
        for shard in shards:
            names.file_name(shard, source=index_path, entry="shard")  # read from root only, never beside it
            if not (root / shard).is_file():
                example = next(n for n, s in weight_map.items() if s == shard)
                raise StoreError(f"{root / shard}: shard named in {INDEX_FILE} is missing (holds tensor {example!r})")
    else:
        shards = sorted(p.name for p in root.glob("*.safetensors"))
        weight_map = None

    if shards:
        for shard in shards:
            infos, metadata = _safetensors_header(root / shard)
            shard_meta[shard] = metadata
            layout[shard] = []
            for info in infos:
                if weight_map is not None and weight_map.get(info.name) != shard:
                    if info.name not in weight_map:
                        raise StoreError(f"{root / shard}: tensor {info.name!r} is not listed in {INDEX_FILE}")
                    continue
                if info.name in tensors:
                    raise StoreError(f"{root / shard}: tensor {info.name!r} appears in two shards")
                tensors[info.name] = info
                tensor_file[info.name] = root / shard
                layout[shard].append(info.name)
        if weight_map is not None:
            missing = [n for n in weight_map if n not in tensors]
            if missing:
                raise StoreError(f"{root / weight_map[missing[0]]}: tensor {missing[0]!r} named in {INDEX_FILE} is missing")
    elif (root / "pytorch_model.bin").is_file():
        path = root / "pytorch_model.bin"
        if not allow_pickle:
            raise StoreError(
                f"{path}: pickle checkpoints can run arbitrary code when loaded; refusing "
                "(pass --allow-pickle if you trust the source)"
            )
        try:
            pickled = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise StoreError(f"{path}: cannot load ({exc})") from None
        layout["model.safetensors"] = []
        shard_meta["model.safetensors"] = {"format": "pt"}
        for name, tensor in pickled.items():
            tensors[name] = TensorInfo(name, dtype_code(tensor.dtype), tuple(tensor.shape))
            tensor_file[name] = path
            layout["model.safetensors"].append(name)
    else:
        raise StoreError(f"{root}: no *.safetensors weights found")

    return Checkpoint(
        root=root,
        config=config,
        config_text=config_text,
        generation_config_text=generation_text,
        side_files=_side_files(root),
        tensors=tensors,
        tensor_file=tensor_file,
        shard_layout=layout,
        shard_metadata=shard_meta,
        index_metadata=index_meta,
        pickled=pickled,
    )
