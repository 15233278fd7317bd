"""HF checkpoint -> Parquet (streaming, atomic), and Parquet -> HF directory (export)."""

from __future__ import annotations

import base64
import datetime as _dt
import errno
import json
import math
import os
import shutil
import tempfile
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import xxhash
from tqdm.auto import tqdm

from llm_workbook.paths import __version__
from llm_workbook import formats, schema as S
from llm_workbook.store import remote
from llm_workbook.store.atomic import temp_path
from llm_workbook.errors import StoreError
from llm_workbook.formats.base import Row
from llm_workbook.store.aios import convert_aios, is_aios_source
from llm_workbook.store.gguf import convert_gguf, gguf_files, is_gguf_file
from llm_workbook.store.sources import Checkpoint, open_checkpoint, resolve_source


def checksum(buffer) -> str:
    return "xxh3_64:" + xxhash.xxh3_64_hexdigest(buffer)


def tensor_bytes(tensor: torch.Tensor) -> np.ndarray:
    """The tensor's raw bytes (C order, native little-endian) as a uint8 array, without copying when possible."""
    t = tensor.detach().contiguous()
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    return t.reshape(-1).view(torch.uint8).numpy()


def _binary_value(part: np.ndarray | bytes | None) -> pa.Array:
    """A one-value binary array over ``part``'s memory, without copying it."""
    if part is None:
        return pa.nulls(1, pa.binary())
    size = part.nbytes if isinstance(part, np.ndarray) else len(part)
    offsets = pa.py_buffer(np.array([0, size], dtype=np.int32))
    return pa.Array.from_buffers(pa.binary(), 1, [None, offsets, pa.py_buffer(part)])


# One-value columns are built straight from buffers: pa.array() imports pandas on first use, which
# costs ~0.5-1.5 s and ~50 MB of RSS per converting process.
def _string_value(text: str | None) -> pa.Array:
    if text is None:
        return pa.nulls(1, pa.string())
    data = text.encode("utf-8")
    offsets = pa.py_buffer(np.array([0, len(data)], dtype=np.int32))
    return pa.Array.from_buffers(pa.string(), 1, [None, offsets, pa.py_buffer(data)])


def _number_value(value: int | None, arrow_type: pa.DataType, np_dtype: type) -> pa.Array:
    if value is None:
        return pa.nulls(1, arrow_type)
    return pa.Array.from_buffers(arrow_type, 1, [None, pa.py_buffer(np.array([value], dtype=np_dtype))])


def _list_value(values, arrow_type: pa.ListType, np_dtype: type) -> pa.Array:
    if values is None:
        return pa.nulls(1, arrow_type)
    items = np.ascontiguousarray(np.asarray(values, dtype=np_dtype).reshape(-1))
    child = pa.Array.from_buffers(arrow_type.value_type, len(items), [None, pa.py_buffer(items)])
    offsets = pa.py_buffer(np.array([0, len(items)], dtype=np.int32))
    return pa.Array.from_buffers(arrow_type, 1, [None, offsets], children=[child])


def aios_columns(row: Row) -> dict:
    """AI-OS's V2 columns for one row, so that AI-OS's loader reads it right or raises.

    float32/float16 arrays are rows AI-OS reads as they are (``fp32``/``fp16``, empty scales, as its own
    writer leaves them); AI-OS int8/int2 codes carry their scales; every other row carries our storage
    name in ``quant_type`` and null scales, on which AI-OS's loader stops with a TypeError instead of
    reading the bytes as int8 codes (what it does with a quant_type it does not know).
    """
    quant = row.aios
    if quant is not None:
        return {"shape": list(quant.shape), "dtype": S.dtype_name(quant.original_dtype), "quant_type": quant.quant_type,
                "scales": np.ascontiguousarray(quant.scales, dtype="<f4").tobytes(),
                "zero_points": np.ascontiguousarray(quant.zero_points, dtype="<f4").tobytes(),
                "quant_axis": quant.quant_axis, "group_size": quant.group_size}
    code = S.dtype_code(row.data.dtype)
    columns = {"shape": list(row.data.shape), "dtype": S.dtype_name(code), "quant_type": None, "scales": None,
               "zero_points": None, "quant_axis": None, "group_size": None}
    if code in ("F32", "F16"):
        columns.update(quant_type="fp32" if code == "F32" else "fp16", scales=b"", zero_points=b"", quant_axis=-1,
                       group_size=0)
    else:
        columns["quant_type"] = code.lower() if row.format == "dense" else row.format
    return columns


def _group_by_module(names: list[str]) -> "OrderedDict[str, dict[str, str]]":
    modules: OrderedDict[str, dict[str, str]] = OrderedDict()
    for name in names:
        layer, weight = S.split_name(name)
        modules.setdefault(layer, {})[weight] = name
    return modules


@dataclass
class ConversionReport:
    output: Path
    tensors: int
    rows: int
    bytes_written: int
    formats: dict[str, int] = field(default_factory=dict)


class StoreWriter:
    """Writes rows to a temp file, one row group per array chunk; ``commit`` renames it into place."""

    def __init__(self, output: str | os.PathLike):
        self.url = str(output) if remote.is_remote(output) else None
        if self.url:  # written here, then uploaded to its key in one step by commit
            remote.check_writable(self.url)
            self.output = Path(tempfile.mkdtemp(prefix="llmc-upload-")) / Path(self.url).name
        else:
            self.output = Path(output)
        if not self.output.parent.is_dir():
            raise StoreError(f"{self.output}: output directory {self.output.parent} does not exist")
        self.tmp = temp_path(self.output)
        try:  # a signal between creating the file and returning must not leave it behind
            small = [f.name for f in S.STORE_SCHEMA if f.name not in (S.DATA, S.SCALES, S.ZERO_POINTS, S.SHAPE)]
            self.writer = pq.ParquetWriter(
                self.tmp,
                S.STORE_SCHEMA,
                compression="none",  # weights do not compress; decoding speed matters more
                use_dictionary=False,
                write_statistics=small,  # never compute min/max over the payload
                # No page CRC: Arrow computes it at ~0.1 GB/s, and every array already carries an xxh3
                # checksum that the loader verifies end to end.
                write_page_checksum=False,
                data_page_size=8 * 1024 * 1024,
            )
        except BaseException:
            self.tmp.unlink(missing_ok=True)
            raise
        self.index: dict[str, list[int]] = {}
        self.row_groups = 0
        self.bytes_written = 0
        self.formats: dict[str, int] = {}

    def write(self, row: Row) -> None:
        data = row.data
        if not isinstance(data, torch.Tensor):
            raise StoreError(f"{row.tensor_name}: row data must be a tensor")
        raw = tensor_bytes(data)
        digest = checksum(raw)
        n = raw.nbytes
        num_chunks = max(1, -(-n // S.CHUNK_BYTES))
        v2 = aios_columns(row)
        params = S.params_json(row.params)
        for chunk in range(num_chunks):
            part = raw[chunk * S.CHUNK_BYTES : (chunk + 1) * S.CHUNK_BYTES]
            first = chunk == 0
            table = pa.Table.from_arrays(
                [
                    _string_value(row.tensor_name),
                    _list_value(v2["shape"], pa.list_(pa.int32()), np.int32),
                    _string_value(v2["dtype"]),
                    _binary_value(part),
                    _number_value(math.prod(v2["shape"]), pa.int64(), np.int64),
                    _string_value(v2["quant_type"]),
                    _binary_value(v2["scales"] if first else None),
                    _binary_value(v2["zero_points"] if first else None),
                    _number_value(v2["quant_axis"], pa.int32(), np.int32),
                    _number_value(v2["group_size"], pa.int32(), np.int32),
                    _string_value(row.format),
                    _string_value(params),
                    _number_value(n, pa.int64(), np.int64),
                    _string_value(digest),
                    _number_value(chunk, pa.int32(), np.int32),
                    _number_value(num_chunks, pa.int32(), np.int32),
                ],
                schema=S.STORE_SCHEMA,
            )
            self.writer.write_table(table, row_group_size=1)
            self.index.setdefault(row.tensor_name, []).append(self.row_groups)
            self.row_groups += 1
        self.bytes_written += n
        self.formats[row.format] = self.formats.get(row.format, 0) + 1

    def commit(self, metadata: dict[str, str]) -> None:
        metadata = dict(metadata)
        metadata[S.META_SCHEMA_VERSION] = S.SCHEMA_VERSION
        metadata[S.META_INT2_ORDER] = "msb"
        metadata[S.META_INDEX] = json.dumps(self.index, separators=(",", ":"))
        self.writer.add_key_value_metadata(metadata)
        self.writer.close()
        with open(self.tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(self.tmp, self.output)
        if self.url:
            try:
                remote.upload(self.output, self.url)
            finally:
                shutil.rmtree(self.output.parent, ignore_errors=True)

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    def abort(self) -> None:
        self.tmp.unlink(missing_ok=True)  # first: the name must go even if closing fails or is interrupted
        try:
            self.writer.close()
        except BaseException:
            pass
        self.tmp.unlink(missing_ok=True)
        if self.url:
            shutil.rmtree(self.output.parent, ignore_errors=True)


def write_error(output, tensor: str, exc: OSError) -> StoreError:
    """The one error a failed write gives: the output, the tensor it was writing, and why."""
    if exc.errno == errno.ENOSPC:
        return StoreError(f"{output}: disk full while writing tensor {tensor!r}; no output written")
    return StoreError(f"{output}: write failed at tensor {tensor!r}: {exc}")


def all_finite(tensor: torch.Tensor) -> bool:
    # min/max propagate NaN and expose +-Inf: one pass, no temporary (isfinite().all() allocates a
    # bool tensor as large as the weight and is ~10x slower on bf16).
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def _check_finite(name: str, tensor: torch.Tensor, path: Path) -> None:
    if tensor.is_floating_point() and tensor.dtype.itemsize > 1 and not all_finite(tensor):
        bad = int((~torch.isfinite(tensor)).sum())
        raise StoreError(f"{path}: tensor {name!r} holds {bad} NaN/Inf values (pass allow_nonfinite to store it anyway)")


def source_metadata(ckpt: Checkpoint, source: str) -> dict[str, str]:
    files = {name: base64.b64encode(data).decode("ascii") for name, data in ckpt.side_files.items()}
    layout = {
        "shards": ckpt.shard_layout,
        "shard_metadata": ckpt.shard_metadata,
        "index_metadata": ckpt.index_metadata,
        "sharded": len(ckpt.shard_layout) > 1 or ckpt.index_metadata is not None,
    }
    meta = {
        S.META_CONFIG: ckpt.config_text,
        S.META_FILES: json.dumps(files),
        S.META_LAYOUT: json.dumps(layout),
        S.META_SOURCE: json.dumps(
            {
                "source": source,
                "resolved": str(ckpt.root),
                "converted_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "llmc_version": __version__,
            }
        ),
    }
    if ckpt.generation_config_text is not None:
        meta[S.META_GENERATION_CONFIG] = ckpt.generation_config_text
    return meta


class HuggingFaceToParquetConverter:
    """Convert an HF checkpoint (directory or hub id) into a self-contained weight file (schema 3: AI-OS's V2, extended).

    Tensors are read one module at a time and written as they go, so peak memory stays near the
    largest module. A failed or interrupted conversion leaves no output file.
    """

    def __init__(
        self,
        allow_pickle: bool = False,
        allow_nonfinite: bool = False,
        revision: str | None = None,
        progress: bool = True,
        detect_grids: bool = True,
        gguf_file: str | None = None,
    ):
        self.allow_pickle = allow_pickle
        self.allow_nonfinite = allow_nonfinite
        self.revision = revision
        self.progress = progress
        self.detect_grids = detect_grids
        self.gguf_file = gguf_file

    def convert(self, hf_model_path: str | os.PathLike, output_parquet: str | os.PathLike) -> ConversionReport:
        if is_aios_source(hf_model_path):
            return convert_aios(hf_model_path, output_parquet, progress=self.progress)
        gguf_path = self._gguf_source(hf_model_path)
        if gguf_path is not None:
            return convert_gguf(gguf_path, output_parquet, progress=self.progress, label=str(hf_model_path))
        root = resolve_source(hf_model_path, revision=self.revision)
        ckpt = open_checkpoint(root, allow_pickle=self.allow_pickle)
        qconfig = ckpt.quantization_config
        fmt = formats.detect(qconfig, ckpt.tensors, source=str(root / "config.json"))
        self._current = "(none)"  # the tensor being written, for the error message
        try:
            with StoreWriter(output_parquet) as writer:  # removed again on any failure or stop signal
                self._write_rows(ckpt, fmt, qconfig, writer, root)
                writer.commit(source_metadata(ckpt, str(hf_model_path)))
        except OSError as exc:
            raise write_error(output_parquet, self._current, exc) from None
        return ConversionReport(writer.url or Path(output_parquet), len(ckpt.tensors), writer.row_groups,
                                writer.bytes_written, writer.formats)

    def _write_rows(self, ckpt: Checkpoint, fmt, qconfig: dict | None, writer: StoreWriter, root: Path) -> None:
        """One module's tensors at a time: the format's quantized groups, then the rest dense."""
        modules = _group_by_module(list(ckpt.tensors))
        bar = tqdm(total=len(ckpt.tensors), desc=f"convert {root.name}", unit="tensor", disable=not self.progress)
        for module, members in modules.items():
            infos = {suffix: ckpt.tensors[name] for suffix, name in members.items()}
            claimed = fmt.claim(qconfig, module, infos)
            for suffix in members:
                if suffix not in claimed and suffix in formats.QUANTIZED_SUFFIXES:
                    self._current = members[suffix]
                    raise formats.UnsupportedFormatError(
                        f"{ckpt.tensor_file[self._current]}: tensor {self._current!r} looks quantized (suffix {suffix!r}) but "
                        f"the checkpoint's quantization_config ({(qconfig or {}).get('quant_method')}) does not "
                        f"describe it; supported formats: {formats.supported_names()}"
                    )
            if claimed:
                self._current = members[sorted(claimed)[0]]
                group = {s: ckpt.read(members[s]) for s in members if s in claimed}
                try:
                    rows = fmt.to_rows(qconfig, module, group)
                except StoreError as exc:
                    raise StoreError(f"{ckpt.tensor_file[self._current]}: module {module!r}: {exc}") from None
                for row in rows:
                    writer.write(row)
                bar.update(len(group))
                del group, rows
            for suffix, name in members.items():
                if suffix in claimed:
                    continue
                self._current = name
                tensor = ckpt.read(name)
                if not self.allow_nonfinite:
                    _check_finite(name, tensor, ckpt.tensor_file[name])
                for row in formats.dense_rows(name, tensor, qconfig, detect_grids=self.detect_grids):
                    writer.write(row)
                bar.update(1)
                del tensor
        bar.close()

    def _gguf_source(self, src: str | os.PathLike) -> Path | None:
        """The GGUF file to convert: ``src`` itself, or ``gguf_file`` inside a directory or hub repo."""
        path = Path(src)
        if path.is_file() and (path.suffix == ".gguf" or is_gguf_file(path)):
            return path
        if self.gguf_file is None:
            if path.is_dir() and not any(path.glob("*.safetensors")) and gguf_files(path):
                raise StoreError(f"{path}: holds GGUF files {gguf_files(path)} but no safetensors; "
                                 f"pick one with --gguf-file NAME")
            return None
        root = resolve_source(src, revision=self.revision, gguf_file=self.gguf_file)
        target = root / self.gguf_file
        if not target.is_file():
            raise StoreError(f"{target}: no such GGUF file in {src} (GGUF files there: {gguf_files(root)})")
        return target


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


@contextmanager
def staged_directory(out: Path) -> Iterator[Path]:
    """A staging directory beside ``out``; it replaces ``out`` (missing or empty, checked by the caller) when
    the block succeeds and is removed when it fails, so a failed write leaves no partial output."""
    staging = temp_path(out)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def export_to_hf(parquet_path: str | os.PathLike, out_dir: str | os.PathLike, progress: bool = True,
                 dtype: torch.dtype | None = None) -> Path:
    """Write an HF directory (safetensors shards, config, tokenizer and side files) from a Parquet file.

    The tensors equal the source checkpoint's bit for bit; shards follow the source layout. GGUF rows
    have no safetensors form and are written dequantized (float32). ``dtype`` casts every floating
    tensor (and config.json's dtype) to it, e.g. to make a bf16 original of a GGUF release.
    """
    from safetensors.torch import save_file

    from llm_workbook.store.loader import WeightLoaderV2

    loader = WeightLoaderV2(parquet_path)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise StoreError(f"{out}: output directory exists and is not empty")
    if not out.parent.is_dir():
        raise StoreError(f"{out}: parent directory {out.parent} does not exist")
    with staged_directory(out) as tmp:
        tensors = loader.source_tensors()
        layout = loader.layout
        shards = layout.get("shards") if layout else None
        if not shards:
            shards = {"model.safetensors": list(tensors)}
        weight_map = {}
        for shard, names in tqdm(shards.items(), desc="export", unit="shard", disable=not progress):
            part = {name: _cast(tensors[name], dtype).contiguous() for name in names}
            metadata = (layout or {}).get("shard_metadata", {}).get(shard) or {"format": "pt"}
            save_file(part, str(tmp / shard), metadata=metadata)
            weight_map.update({name: shard for name in names})
            del part
        if layout and layout.get("sharded"):
            index = {"metadata": layout.get("index_metadata") or {}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        if loader.config_text is not None:
            text = loader.config_text
            if dtype is not None:
                config = json.loads(text)
                config["dtype"] = str(dtype).removeprefix("torch.")
                config.pop("torch_dtype", None)
                text = json.dumps(config, indent=2) + "\n"
            (tmp / "config.json").write_text(text, encoding="utf-8")
        if loader.generation_config_text is not None:
            (tmp / "generation_config.json").write_text(loader.generation_config_text, encoding="utf-8")
        for name, data in loader.files.items():
            (tmp / name).write_bytes(data)
    return out
