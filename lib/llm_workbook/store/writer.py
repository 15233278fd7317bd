"""Writing the store: rows to Parquet columns (AI-OS's V2 plus ours), atomically, and the checks every writer makes.

The converters (``convert``, ``gguf``, ``aios``) and the quantizers all write through ``StoreWriter``.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import xxhash

from llm_workbook import schema as S
from llm_workbook.errors import StoreError
from llm_workbook.formats.base import Row
from llm_workbook.store import remote
from llm_workbook.store.atomic import temp_path


def checksum(buffer) -> str:
    return "xxh3_64:" + xxhash.xxh3_64_hexdigest(buffer)


def tensor_bytes(tensor: torch.Tensor) -> np.ndarray:
    """The tensor's raw bytes (C order, native little-endian) as a uint8 array, without copying when possible."""
    t = tensor.detach().contiguous()
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    return t.reshape(-1).view(torch.uint8).numpy()


# One-value columns are built straight from buffers: pa.array() imports pandas on first use, which
# costs ~0.5-1.5 s and ~50 MB of RSS per converting process.
def _binary_value(part: np.ndarray | bytes | None) -> pa.Array:
    """A one-value binary array over ``part``'s memory, without copying it."""
    if part is None:
        return pa.nulls(1, pa.binary())
    size = part.nbytes if isinstance(part, np.ndarray) else len(part)
    offsets = pa.py_buffer(np.array([0, size], dtype=np.int32))
    return pa.Array.from_buffers(pa.binary(), 1, [None, offsets, pa.py_buffer(part)])


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


def check_finite(name: str, tensor: torch.Tensor, path: Path) -> None:
    if tensor.is_floating_point() and tensor.dtype.itemsize > 1 and not all_finite(tensor):
        bad = int((~torch.isfinite(tensor)).sum())
        raise StoreError(f"{path}: tensor {name!r} holds {bad} NaN/Inf values (pass allow_nonfinite to store it anyway)")


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

