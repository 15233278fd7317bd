"""A GGUF file's key-values as the store keeps them (JSON in the file's metadata): back to gguf-py values, into a
metadata-only GGUF, and into the tokenizer transformers builds from them.

Below both the loader (which derives a GGUF file's tokenizer on request) and ``store/gguf`` (which converts and
exports GGUF files), so neither imports the other's way back.
"""

from __future__ import annotations

import base64
import json
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from llm_workbook import schema as S
from llm_workbook.errors import StoreError

META_GGUF = S.META_GGUF


def gguf_package():
    try:
        import gguf
    except ImportError:
        raise StoreError("reading GGUF needs the `gguf` package (pip install gguf)") from None
    return gguf


def text_bytes(value) -> bytes:
    return base64.b64decode(value["base64"]) if isinstance(value, dict) else value.encode("utf-8")


def kv_value(item: dict, gguf):
    T = gguf.GGUFValueType
    vtype = T[item["type"]]
    if vtype == T.STRING:
        return text_bytes(item["value"])
    if vtype == T.ARRAY:
        sub = T[item["sub_type"]]
        if sub == T.STRING:
            return [text_bytes(v) for v in item["value"]]
        return list(item["value"])
    return item["value"]


@contextmanager
def quiet_transformers():
    """transformers' logging at error level while it reads a GGUF (it logs every key it does not map)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def write_metadata_gguf(path: Path, kv: list[dict], tensor_names: list[str] = (), sanitize: bool = False) -> Path:
    """A GGUF holding the key-values (and, as 1-element placeholders, the tensor names) but no weights:
    what transformers reads to build a config or a tokenizer. ``sanitize`` replaces invalid UTF-8 in
    strings, which transformers' GGUF parser cannot decode."""
    gguf = gguf_package()
    T = gguf.GGUFValueType
    arch = next(item["value"] for item in kv if item["key"] == "general.architecture")
    writer = gguf.GGUFWriter(path, arch)
    writer.kv_data = [{}]
    for item in kv:
        value = kv_value(item, gguf)
        if sanitize and T[item["type"]] == T.STRING:
            value = value.decode("utf-8", "replace")
        elif sanitize and item["sub_type"] == "STRING":
            value = [v.decode("utf-8", "replace") for v in value]
        writer.add_key_value(item["key"], value, T[item["type"]],
                             sub_type=T[item["sub_type"]] if item["sub_type"] else None)
    for name in tensor_names:
        writer.add_tensor(name, np.zeros(1, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tokenizer_files(loader) -> dict[str, bytes]:
    """Tokenizer files (tokenizer.json, ...) that transformers builds from the stored GGUF key-values.

    They are derived on request instead of stored: the key-values already hold the vocabulary, and a
    second copy as tokenizer.json would add ~5 % to the file.
    """
    from transformers import AutoTokenizer

    meta = gguf_metadata(loader)
    with tempfile.TemporaryDirectory(prefix="llmc-gguf-tok-") as tmp:
        header = write_metadata_gguf(Path(tmp) / "metadata.gguf", meta["kv"], sanitize=True)
        out = Path(tmp) / "tokenizer"
        with quiet_transformers():
            try:
                AutoTokenizer.from_pretrained(tmp, gguf_file=header.name).save_pretrained(out)
            except Exception as exc:
                raise StoreError(f"{loader.path}: transformers builds no tokenizer from the GGUF metadata ({exc})") from None
        return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def gguf_metadata(loader) -> dict:
    text = loader.metadata.get(META_GGUF)
    if not text:
        raise StoreError(f"{loader.path}: not converted from a GGUF file (no {META_GGUF} metadata); "
                         f"export it as an HF directory instead")
    return json.loads(text)

