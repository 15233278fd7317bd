"""GGUF <-> Parquet: a GGUF file stored losslessly (GGML blocks as they are), and written back.

Reading uses gguf-py's ``GGUFReader``; the config, the tokenizer and the GGUF -> transformers tensor
names come from transformers' GGUF integration, so ``model_from_parquet`` and the evaluation run on
the file as they run on any checkpoint. Every key-value travels in the footer (``llmc.gguf``) with its
GGUF type, in file order, with the version, alignment and each tensor's offset; ``export_gguf`` feeds
them to gguf-py's ``GGUFWriter``, which reproduces a file laid out as gguf-py writes (v3, tensors
packed in order) byte for byte.
"""

from __future__ import annotations

import base64
import datetime as _dt
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llm_workbook.paths import __version__
from llm_workbook import schema as S
from llm_workbook.store.atomic import temp_path
from llm_workbook.formats import gguf as fmt
from llm_workbook.errors import StoreError
from llm_workbook.store.gguf_kv import (
    META_GGUF, gguf_metadata, gguf_package, kv_value, quiet_transformers, write_metadata_gguf,
)

HEADER_FIELDS = ("GGUF.version", "GGUF.tensor_count", "GGUF.kv_count")  # GGUFReader's pseudo-fields


@dataclass
class GGUFSource:
    """An opened GGUF file: reader, key-values, tensor plan, and what transformers makes of it."""

    path: Path
    reader: object
    kv: list[dict]
    tensors: list[dict]  # file order: gguf_name, hf_name, ggml_type, gguf_shape, offset, n_bytes
    config: dict
    version: int
    alignment: int
    data_offset: int  # where the tensor data section starts
    arch: str  # general.architecture
    processor_config: dict  # the config keys transformers' tensor processor reads


# ----------------------------------------------------------------------------- key-values


def _string(raw: bytes):
    """Text where the bytes are valid UTF-8 (decode and encode then round-trip), else base64."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(raw).decode("ascii")}


def _scalar(part: np.ndarray, vtype, gguf):
    if vtype == gguf.GGUFValueType.STRING:
        return _string(bytes(part))
    value = part.tolist()[0]
    return bool(value) if vtype == gguf.GGUFValueType.BOOL else value


def _field_entry(path: Path, key: str, f, gguf) -> dict:
    T = gguf.GGUFValueType
    vtype = T(f.types[0])
    if vtype == T.ARRAY:
        if len(f.types) > 2 or (len(f.types) == 2 and f.types[1] == T.ARRAY):
            raise StoreError(f"{path}: key {key!r} is a nested array, which the store does not carry")
        sub = T(f.types[1]) if len(f.types) > 1 else None
        if sub is None:
            raise StoreError(f"{path}: key {key!r} is an empty array, which gguf-py cannot write back")
        if sub == T.STRING:
            values = [_string(bytes(f.parts[i])) for i in f.data]
        else:
            values = np.concatenate([f.parts[i] for i in f.data]).tolist() if f.data else []
            if sub == T.BOOL:
                values = [bool(v) for v in values]
        return {"key": key, "type": vtype.name, "sub_type": sub.name, "value": values}
    return {"key": key, "type": vtype.name, "sub_type": None, "value": _scalar(f.parts[f.data[0]], vtype, gguf)}


# ----------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Layout:
    """How one GGML type id lays out its weights: ``block`` weights in ``block_bytes`` bytes, or, for a
    per-row layout, ``row_extra`` bytes plus ``bits`` per weight in every row."""

    name: str
    producer: str
    block: int = 0
    block_bytes: int = 0
    row_extra: int = 0
    bits: int = 0

    def nbytes(self, dims: list[int]) -> int | None:
        n = math.prod(dims)
        if self.block:
            return n * self.block_bytes // self.block if n % self.block == 0 else None
        cols = dims[0] if dims else 1
        return (n // cols) * (self.row_extra + cols * self.bits // 8) if cols * self.bits % 8 == 0 else None


# Layouts written in the wild under ids that gguf-py knows differently, or not at all (gguf-notes.md).
FOREIGN_LAYOUTS: dict[int, list[Layout]] = {
    41: [Layout("Tencent 2-bit (custom Q1_0)", "Tencent's Hy-MT 2-bit GGUFs: an fp16 scale and 2-bit codes per row",
                row_extra=2, bits=2)],
    42: [Layout("Q2_0", "mainline ggml (64 weights in 18 bytes), newer than this gguf-py", block=64, block_bytes=18),
         Layout("STQ1_0", "Tencent's Sherry 1.25-bit GGUFs (llama.cpp PR #22836, early builds)", block=256,
                block_bytes=42)],
    43: [Layout("STQ1_0", "Tencent's Sherry 1.25-bit GGUFs (llama.cpp PR #22836)", block=256, block_bytes=42)],
}
# Layouts from unmerged branches whose id is not fixed: matched for any id whose size does not fit.
ANY_ID_LAYOUTS = [Layout("q2_0c", "AngelSlim's HY-1.8B-2Bit SEQ GGUF (llama.cpp PR #19357, unmerged)", block=512,
                         block_bytes=130)]


def _known_layout(type_id: int, gguf) -> Layout | None:
    """The layout gguf-py gives ``type_id`` (None when it does not know the id)."""
    try:
        qtype = gguf.GGMLQuantizationType(type_id)
    except ValueError:
        return None
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return Layout(qtype.name, f"gguf-py {_gguf_version()}", block=block, block_bytes=size)


def _gguf_version() -> str:
    from importlib.metadata import version

    return version("gguf")


def _fits(nbytes: int | None, span: int, alignment: int) -> bool:
    return nbytes is not None and nbytes <= span and span - nbytes < max(alignment, 1)


def _resolve_types(path: Path, infos: list[tuple[str, list[int], int, int]], data_offset: int, file_size: int,
                   alignment: int, file_type, gguf) -> None:
    """Check every tensor's type id against the bytes it occupies before anything is read.

    ``infos``: (name, dims, type id, offset in the data section). A type is established by its id together
    with the span between its offset and the next tensor's (or the file's end): a tensor is read only
    when gguf-py's layout for its id fills that span; otherwise one error names the layout that does fit
    and who writes it (ids 41-43 collide in the wild), or says that none does.
    """
    ordered = sorted(infos, key=lambda info: info[3])
    ends = [info[3] for info in ordered[1:]] + [file_size - data_offset]
    for (name, dims, type_id, offset), end in zip(ordered, ends):
        if any(d < 0 for d in dims) or offset < 0 or data_offset + offset > file_size:
            raise StoreError(f"{path}: tensor {name!r} claims offset {offset} and shape {dims}, past the file's "
                             f"{file_size} bytes (truncated or corrupt GGUF file)")
        span = end - offset
        known = _known_layout(type_id, gguf)
        if known is not None and _fits(known.nbytes(dims), span, alignment):
            continue
        foreign = [lay for lay in FOREIGN_LAYOUTS.get(type_id, []) + ANY_ID_LAYOUTS
                   if _fits(lay.nbytes(dims), span, alignment)]
        shape = "x".join(str(d) for d in reversed(dims))
        hint = f"; general.file_type {file_type}" if file_type is not None else ""
        claimed = (f"gguf-py {_gguf_version()} reads id {type_id} as {known.name} ({known.nbytes(dims)} bytes)"
                   if known else f"gguf-py {_gguf_version()} does not know id {type_id}")
        if foreign:
            lay = foreign[0]
            raise StoreError(
                f"{path}: tensor {name!r} ({shape}) has GGML type id {type_id} and {span} bytes: that is "
                f"{lay.name}, written by {lay.producer}; {claimed}{hint}. The store does not read {lay.name}: "
                f"refused rather than read with the wrong block size")
        if known is None:
            raise StoreError(f"{path}: tensor {name!r} ({shape}) has GGML type id {type_id}, which "
                             f"gguf-py {_gguf_version()} does not know and no known writer's layout fits its "
                             f"{span} bytes{hint} (truncated file, or a newer or unmerged GGML type)")
        raise StoreError(
            f"{path}: tensor {name!r} ({known.name}, {known.nbytes(dims)} bytes as gguf-py sizes it) has {span} "
            f"bytes before the next tensor or the file's end{hint}: truncated file, or its GGML type id "
            f"does not mean here what it means to gguf-py (see the README, GGUF limits)")


def _reader_class(gguf):
    """gguf-py's reader, checking each tensor's type id against its span before gguf-py sizes it."""

    class SpanCheckedReader(gguf.GGUFReader):
        def _build_tensors(self, start_offs, fields):
            infos = []
            for field in fields:
                _, name, _, dims, type_id, offset = field.parts
                infos.append((bytes(name).decode("utf-8", "replace"), [int(d) for d in dims], int(type_id[0]),
                              int(offset[0])))
            file_type = self.fields.get("general.file_type")
            file_type = int(file_type.parts[-1][0]) if file_type is not None and file_type.parts else None
            _resolve_types(Path(self.data.filename), infos, int(start_offs), int(self.data.shape[0]),
                           int(self.alignment), file_type, gguf)
            super()._build_tensors(start_offs, fields)

    return SpanCheckedReader


def _open_reader(path: Path, gguf):
    try:
        return _reader_class(gguf)(path)
    except StoreError:
        raise
    except ValueError as exc:
        # gguf-py raises while building its tensor list when a type id is unknown to it or data is missing.
        raise StoreError(f"{path}: gguf-py cannot read it (truncated, or a GGML type id it does not know: {exc})") from None
    except (OSError, IndexError, KeyError, TypeError) as exc:
        raise StoreError(f"{path}: truncated or corrupt GGUF file ({type(exc).__name__}: {exc})") from None


def _transformers_config(path: Path, kv: list[dict], tensor_names: list[str]):
    """The transformers config built from the GGUF's metadata (from a sanitized copy of the key-values
    when some strings are not UTF-8, which transformers' parser cannot read)."""
    from transformers import AutoConfig

    with quiet_transformers():
        try:
            try:
                return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
            except (OSError, UnicodeDecodeError) as exc:
                if not isinstance(exc.__context__ or exc, UnicodeDecodeError) and not isinstance(exc, UnicodeDecodeError):
                    raise
                with tempfile.TemporaryDirectory(prefix="llmc-gguf-cfg-") as tmp:
                    twin = write_metadata_gguf(Path(tmp) / "metadata.gguf", kv, tensor_names, sanitize=True)
                    return AutoConfig.from_pretrained(tmp, gguf_file=twin.name)
        except Exception as exc:  # transformers raises many kinds here (validation, parsing, unknown arch)
            raise StoreError(f"{path}: transformers cannot build a model config from this GGUF ({exc})") from None


def _check_config_claims(config, path: Path, tensor_names: list[str]) -> None:
    """The key-values build a transformers model (on the meta device) to map names: a layer count or width
    far beyond any real model would take minutes to build from a few bytes of a hostile file."""
    for key, limit in (("num_hidden_layers", 1024), ("hidden_size", 1 << 17), ("intermediate_size", 1 << 19),
                       ("num_attention_heads", 1 << 12), ("num_key_value_heads", 1 << 12), ("vocab_size", 1 << 22)):
        value = getattr(config, key, None)
        if isinstance(value, int) and not 0 <= value <= limit:
            raise StoreError(f"{path}: GGUF key-values give {key} = {value}, beyond any real model (limit {limit})")
    blocks = {int(m.group(1)) for name in tensor_names if (m := re.match(r"blk\.(\d+)\.", name))}
    layers = getattr(config, "num_hidden_layers", None)
    if isinstance(layers, int) and layers > len(blocks) + 1:  # mapping names builds every claimed layer
        raise StoreError(f"{path}: GGUF key-values give {layers} layers, but the file holds tensors of "
                         f"{len(blocks)} blocks")


def _hf_names(config, arch: str, path: Path, tensor_names: list[str]) -> dict[str, str]:
    """GGUF tensor name -> transformers parameter name, by transformers' own mapping."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    cls = TENSOR_PROCESSORS.get(arch, TensorProcessor)
    if cls.__name__ not in fmt.ONE_TO_ONE_PROCESSORS:
        raise StoreError(f"{path}: GGUF architecture {arch!r} splits or merges tensors on load ({cls.__name__}); "
                         f"the store maps one GGUF tensor to one parameter")
    _check_config_claims(config, path, tensor_names)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ArithmeticError, ValueError, TypeError) as exc:  # e.g. a head count of 0 in the key-values
        raise StoreError(f"{path}: transformers cannot build a model from its key-values "
                         f"({type(exc).__name__}: {exc})") from None
    return get_gguf_hf_weights_map(model, cls(config=config.to_dict()))


def _check_heads(path: Path, kv: list[dict], arch: str, tensors) -> None:
    """llama.cpp's Q/K permutation needs rows divisible by 2 x heads; say which tensor breaks it."""
    if arch != "llama":
        return
    values = {item["key"]: item["value"] for item in kv}
    heads = values.get(f"{arch}.attention.head_count")
    kv_heads = values.get(f"{arch}.attention.head_count_kv") or heads
    for tensor in tensors:
        if ".attn_q." not in tensor.name and ".attn_k." not in tensor.name:
            continue
        n = heads if ".attn_q." in tensor.name else kv_heads
        rows = int(tensor.shape[-1]) if len(tensor.shape) > 1 else int(tensor.shape[0])
        if not isinstance(n, int) or n <= 0 or rows % (2 * n):
            raise StoreError(f"{path}: tensor {tensor.name!r} has {rows} rows, which does not split into "
                             f"{n} heads of an even size (head counts from the GGUF metadata)")


def open_gguf(path: str | os.PathLike) -> GGUFSource:
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"{path}: no such GGUF file")
    gguf = gguf_package()
    reader = _open_reader(path, gguf)
    if reader.byte_order != "I":
        raise StoreError(f"{path}: big-endian GGUF files are not supported")
    kv = [_field_entry(path, key, f, gguf) for key, f in reader.fields.items() if key not in HEADER_FIELDS]
    version = int(reader.fields["GGUF.version"].parts[-1][0])
    arch = next((item["value"] for item in kv if item["key"] == "general.architecture"), None)
    if not isinstance(arch, str):
        raise StoreError(f"{path}: no general.architecture key")
    _check_heads(path, kv, arch, reader.tensors)
    config = _transformers_config(path, kv, [t.name for t in reader.tensors])
    names = _hf_names(config, arch, path, [t.name for t in reader.tensors])
    raw_config = config.to_dict()
    proc_config = {k: raw_config[k] for k in fmt.PROCESSOR_KEYS if k in raw_config}
    tensors = []
    for t in reader.tensors:
        tensors.append({
            "gguf_name": t.name, "hf_name": names.get(t.name), "ggml_type": int(t.tensor_type),
            "gguf_shape": [int(d) for d in t.shape], "offset": int(t.data_offset - reader.data_offset),
            "n_bytes": int(t.n_bytes),
        })
    hf = [t["hf_name"] for t in tensors if t["hf_name"]]
    if len(set(hf)) != len(hf):
        raise StoreError(f"{path}: two GGUF tensors map to the same transformers parameter")
    from transformers import AutoModelForCausalLM

    config_dict = json.loads(config.to_json_string(use_diff=False))
    config_dict.pop("_name_or_path", None)  # where transformers read it from: this machine's path
    if not config_dict.get("architectures"):
        config_dict["architectures"] = [AutoModelForCausalLM._model_mapping[type(config)].__name__]
    return GGUFSource(path, reader, kv, tensors, config_dict, version, int(reader.alignment),
                      int(reader.data_offset), arch, proc_config)


# ----------------------------------------------------------------------------- GGUF -> Parquet


def _raw_bytes(tensor) -> np.ndarray:
    """A tensor's bytes as gguf-py maps them, copied out of the read-only mapping."""
    return np.array(np.asarray(tensor.data).reshape(-1).view(np.uint8), copy=True)


def convert_gguf(path: str | os.PathLike, output: str | os.PathLike, progress: bool = True, label: str | None = None):
    """Store every tensor of a GGUF file as its GGML blocks, with the file's metadata in the footer."""
    from tqdm.auto import tqdm

    from llm_workbook.store.writer import ConversionReport, StoreWriter, write_error

    src = open_gguf(path)
    current = "(none)"
    try:
        with StoreWriter(output) as writer:  # removed again on any failure or stop signal
            for info, tensor in tqdm(list(zip(src.tensors, src.reader.tensors)), desc=f"convert {src.path.name}",
                                     unit="tensor", disable=not progress):
                current = info["gguf_name"]
                params = {
                    "gguf_name": info["gguf_name"], "ggml_type": info["ggml_type"],
                    "ggml_type_name": fmt.ggml_type(info["ggml_type"]).name, "gguf_shape": info["gguf_shape"],
                    "arch": src.arch, "processor_config": src.processor_config,
                }
                writer.write(fmt.make_row(info["hf_name"] or info["gguf_name"], _raw_bytes(tensor), params))
            writer.commit(_metadata(src, label or str(path)))
    except OSError as exc:
        raise write_error(output, current, exc) from None
    return ConversionReport(writer.url or Path(output), len(src.tensors), writer.row_groups, writer.bytes_written, writer.formats)


def _metadata(src: GGUFSource, label: str) -> dict[str, str]:
    gguf_meta = {
        "version": src.version, "alignment": src.alignment, "data_offset": src.data_offset,
        "file_size": src.path.stat().st_size, "kv": src.kv,
        "tensors": [{"gguf_name": t["gguf_name"], "hf_name": t["hf_name"], "offset": t["offset"]} for t in src.tensors],
    }
    return {
        S.META_CONFIG: json.dumps(src.config, indent=2) + "\n",
        S.META_SOURCE: json.dumps({
            "source": label, "resolved": str(src.path), "format": "gguf",
            "converted_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "llmc_version": __version__,
        }),
        META_GGUF: json.dumps(gguf_meta, separators=(",", ":")),
    }


# ----------------------------------------------------------------------------- Parquet -> GGUF


def export_gguf(parquet_path: str | os.PathLike, out_path: str | os.PathLike, progress: bool = True) -> list[str]:
    """Write the GGUF file back; returns how its layout differs from the source's (empty: identical).

    Key-values (order, types, bytes) and tensors (names, types, shapes, blocks) always equal the
    source's; the layout equals it when the source was written the way gguf-py writes.
    """
    from llm_workbook.store.loader import WeightLoaderV2

    gguf = gguf_package()
    T = gguf.GGUFValueType
    loader = WeightLoaderV2(parquet_path)
    meta = gguf_metadata(loader)
    out = Path(out_path)
    if not out.parent.is_dir():
        raise StoreError(f"{out}: output directory {out.parent} does not exist")
    if out.exists():
        raise StoreError(f"{out}: exists; refusing to overwrite")
    tmp = temp_path(out)
    arch = next(item["value"] for item in meta["kv"] if item["key"] == "general.architecture")
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.kv_data = [{}]  # the constructor adds general.architecture; keep the source's order instead
        writer.data_alignment = meta["alignment"]
        for item in meta["kv"]:
            sub = T[item["sub_type"]] if item["sub_type"] else None
            writer.add_key_value(item["key"], kv_value(item, gguf), T[item["type"]], sub_type=sub)
        for entry in meta["tensors"]:
            name = entry["hf_name"] or entry["gguf_name"]
            info = loader.rows.get(name)
            if info is None:
                raise StoreError(f"{loader.path}: tensor {name!r} ({entry['gguf_name']}) is missing")
            raw = loader.load_tensor(name).numpy()
            view = fmt.reader_view(raw, info.params["ggml_type"], info.params["gguf_shape"])
            writer.add_tensor(entry["gguf_name"], view, raw_dtype=fmt.ggml_type(info.params["ggml_type"]))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        differences = _layout_differences(tmp, meta, gguf)
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StoreError(f"{out}: write failed: {exc}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return differences


def _layout_differences(path: Path, meta: dict, gguf) -> list[str]:
    reader = gguf.GGUFReader(path)
    found = []
    version = int(reader.fields["GGUF.version"].parts[-1][0])
    if version != meta["version"]:
        found.append(f"GGUF version {version} (source: {meta['version']})")
    if int(reader.data_offset) != meta["data_offset"]:
        found.append(f"tensor data starts at byte {reader.data_offset} (source: {meta['data_offset']})")
    moved = [e["gguf_name"] for e, t in zip(meta["tensors"], reader.tensors)
             if int(t.data_offset - reader.data_offset) != e["offset"]]
    if moved:
        found.append(f"{len(moved)} tensors at other offsets (first: {moved[0]}): the source is not packed in order")
    size = path.stat().st_size
    if size != meta["file_size"]:
        found.append(f"{size} bytes (source: {meta['file_size']})")
    return found
