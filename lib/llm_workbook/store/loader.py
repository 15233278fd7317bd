"""WeightLoaderV2: lazy, per-tensor reads of our weight files (schema 3 and 2.1) and of AI-OS's V1/V2 files,
dequantizing on request."""

from __future__ import annotations

import base64
import faulthandler
import json
import math
import mmap
import os
import select
import signal
import tempfile
from collections.abc import Iterator, Mapping
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import xxhash

from llm_workbook import formats, names, schema as S
from llm_workbook.store import remote
from llm_workbook.errors import StoreError
from llm_workbook.formats import aios as aios_format
from llm_workbook.formats.base import QuantizedTensor, Row

DENSE = "dense"
# Bounds on what a file may claim relative to its real size (see _check_claims).
MIN_ROW_BYTES = 16  # a row carries at least a name, a shape and its data: no real file has fewer bytes per row
MAX_INFLATION = 32  # snappy, which AI-OS's writer uses, cannot inflate more than ~21x; ours store arrays uncompressed
SLACK_BYTES = 1 << 20  # headers and tiny files
_PROBED: set = set()  # local files whose column metadata a forked child has read without aborting
SHAPE_PARAMS = ("weight_shape", "gguf_shape", "shape")  # parameters that name a dequantized weight's shape
AIOS = aios_format.NAME
# torch dtype strings AI-OS's files carry -> safetensors codes (AI-OS's loader reads any other as float32)
NAME_CODES = S.NAME_TO_CODE


def _base64(data: object, path, name: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (TypeError, ValueError):
        raise StoreError(f"{path}: side file {name!r} is not valid base64") from None


class WeightLoaderV2:
    """Read one tensor at a time from a weight-store Parquet file.

    ``load_weight(layer, "weight")`` returns the float weight (dequantized for quantized layers);
    ``dequantize=False`` returns the stored codes with their parameters (``QuantizedTensor``).
    Every read of our files is checked against the stored xxh3 checksum; AI-OS's files have none.
    """

    def __init__(self, path: str | os.PathLike, verify: bool = True):
        self.remote = remote.is_remote(path)
        self.path = str(path) if self.remote else Path(path)  # s3:// and hf:// stay URLs
        self.verify = verify
        if not self.remote and not self.path.is_file():
            raise StoreError(f"{self.path}: no such file")
        if self.remote:  # ranged reads: the footer, the index columns, then one tensor's bytes at a time
            self._remote_file = remote.open_read(self.path)  # a missing object or bucket: its own clear error
        try:
            if self.remote:
                self._file = pq.ParquetFile(self._remote_file, page_checksum_verification=True)
            else:
                self._file = pq.ParquetFile(self.path, memory_map=True, page_checksum_verification=True)
            arrow_schema = self._file.schema_arrow
            self.version = S.detect_version(arrow_schema)
        except (pa.ArrowException, OSError, ValueError, RuntimeError) as exc:  # pyarrow's, on a corrupt footer
            raise StoreError(f"{self.path}: not a readable weight-store Parquet file ({exc})") from None
        raw_meta = self._file.metadata.metadata or {}
        try:
            self.metadata = {k.decode(): v.decode() for k, v in raw_meta.items() if k.startswith(b"llmc.")}
        except UnicodeDecodeError as exc:
            raise StoreError(f"{self.path}: a footer key-value is not UTF-8 text ({exc})") from None
        self.rows: dict[str, S.RowInfo] = {}
        self._row_offsets: dict[str, tuple[int, int]] = {}  # AI-OS files: name -> (row group, row)
        self._aios: dict[str, S.AiosQuant] = {}  # our rows that AI-OS's loader dequantizes: their V2 parameters
        self._row_group_data: tuple[int, pa.ChunkedArray] | None = None  # AI-OS files: the last row group's data
        self._spans: dict[str, list[tuple[int, int]] | None] = {}  # V2.1, filled on first read: see _payload_spans
        try:
            self._build_index()
        except (pa.ArrowException, OSError, UnicodeDecodeError, RuntimeError) as exc:  # pyarrow, corrupt footer/page
            raise StoreError(f"{self.path}: not a readable weight-store Parquet file ({type(exc).__name__}: "
                             f"{exc})") from None
        # Rows of formats whose every array dequantizes on its own (GGUF): name -> its format.
        self._per_tensor = {name for name, info in self.rows.items() if formats.is_per_tensor(info.format)}
        self._groups = self._build_groups()

    # --- index ---------------------------------------------------------------------------------
    def _probe_column_metadata(self) -> None:
        """Touch every column chunk's metadata in a forked child first: on some corrupt footers (size statistics
        or codec ids out of range) pyarrow's metadata accessors abort the whole process instead of raising
        (apache/arrow#45283 family); in a child that is one clear error here instead of a dead kernel."""
        if not hasattr(os, "fork"):
            return
        key = None if self.remote else (str(self.path), *(lambda st: (st.st_size, st.st_mtime_ns, st.st_ino))(
            self.path.stat()))
        if key in _PROBED:
            return  # a fork costs ~30 ms in a large process: once per file version is enough
        meta = self._file.metadata
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: no Python-level cleanup, only the accessors, then _exit
            code = 0
            try:
                os.close(read_end)
                os.dup2(write_end, 2)
                faulthandler.disable()  # pyarrow's abort message is the answer, not the child's traceback
                for rg in range(meta.num_row_groups):
                    group = meta.row_group(rg)
                    for c in range(group.num_columns):
                        chunk = group.column(c)
                        (chunk.path_in_schema, chunk.compression, chunk.has_dictionary_page, chunk.num_values,
                         chunk.data_page_offset, chunk.dictionary_page_offset, chunk.total_compressed_size,
                         chunk.total_uncompressed_size)
            except BaseException:
                code = 3  # a Python exception: the parent's own accessors raise it again, with context
            os._exit(code)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            ready, _, _ = select.select([pipe], [], [], 120)
            message = pipe.read().decode("utf-8", "replace") if ready else ""
        if not ready:
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            why = next((line.split("what():", 1)[1].strip() for line in message.splitlines() if "what():" in line),
                       f"signal {os.WTERMSIG(status)}")
            raise StoreError(f"{self.path}: corrupt column metadata in the footer ({why}); pyarrow would abort "
                             f"reading it")
        if key is not None:
            _PROBED.add(key)

    def _check_claims(self) -> None:
        """What the footer claims (rows, values, byte spans, sizes after decompression), checked against the
        file's real size before anything is read: a hostile footer is refused with bounded memory."""
        meta, size = self._file.metadata, self.file_bytes
        if meta.num_rows > size // MIN_ROW_BYTES + 1:
            raise StoreError(f"{self.path}: the footer claims {meta.num_rows} rows in a {size}-byte file")
        for rg in range(meta.num_row_groups):
            group = meta.row_group(rg)
            for c in range(group.num_columns):
                chunk = group.column(c)
                start = min(o for o in (chunk.dictionary_page_offset, chunk.data_page_offset) if o is not None)
                column = chunk.path_in_schema
                if start < 0 or chunk.total_compressed_size < 0 or start + chunk.total_compressed_size > size:
                    raise StoreError(f"{self.path}: column {column!r} of row group {rg} claims bytes "
                                     f"{start}..{start + chunk.total_compressed_size}, past the file's {size}")
                if chunk.total_uncompressed_size > MAX_INFLATION * chunk.total_compressed_size + SLACK_BYTES:
                    raise StoreError(
                        f"{self.path}: column {column!r} of row group {rg} claims to inflate from "
                        f"{chunk.total_compressed_size} to {chunk.total_uncompressed_size} bytes (more than "
                        f"{MAX_INFLATION}x: a compression bomb or a corrupt footer)")
                if chunk.num_values < 0 or 8 * chunk.num_values > MAX_INFLATION * size + SLACK_BYTES:
                    raise StoreError(f"{self.path}: column {column!r} of row group {rg} claims {chunk.num_values} "
                                     f"values in a {size}-byte file")

    def _index_table(self, columns: list[str]) -> pa.Table:
        """The index columns, strings kept dictionary-encoded until their decoded size is known to be sane."""
        strings = [c for c in columns if pa.types.is_string(self._file.schema_arrow.field(c).type)
                   or pa.types.is_binary(self._file.schema_arrow.field(c).type)]
        try:
            reader = pq.ParquetFile(self._remote_file if self.remote else self.path, metadata=self._file.metadata,
                                    read_dictionary=strings, memory_map=not self.remote,
                                    page_checksum_verification=True)
            table = reader.read(columns=columns)
        except (pa.ArrowException, OSError) as exc:
            raise StoreError(f"{self.path}: cannot read the tensor index ({exc})") from None
        decoded = 0
        for name in strings:
            for chunk in table.column(name).chunks:
                if pa.types.is_dictionary(chunk.type):
                    lengths = pc.binary_length(chunk.dictionary).fill_null(0)
                    decoded += pc.sum(pc.take(lengths, chunk.indices.drop_null())).as_py() or 0
        if decoded > MAX_INFLATION * self.file_bytes + SLACK_BYTES:
            raise StoreError(f"{self.path}: its tensor index would decode to {decoded} bytes from a "
                             f"{self.file_bytes}-byte file (a dictionary bomb or a corrupt file)")
        return table

    def _build_index(self) -> None:
        meta = self._file.metadata
        names = set(self._file.schema_arrow.names)
        columns = [c for c in S.INDEX_COLUMNS if c in names]
        # The index first: pyarrow's reader raises on corrupt column metadata, while its metadata accessors,
        # which _check_claims uses, abort the process (apache/arrow#45283's SizeStatistics validation).
        table = self._index_table(columns)
        self._probe_column_metadata()
        self._check_claims()
        cols = {c: table.column(c).to_pylist() for c in columns}
        sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        if any(n < 0 for n in sizes) or sum(sizes) != table.num_rows:
            raise StoreError(f"{self.path}: the footer's row counts {sizes[:8]} disagree with its index "
                             f"({table.num_rows} rows)")
        row_group_of = np.repeat(np.arange(meta.num_row_groups), sizes)
        starts = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
        chunks: dict[str, list[int]] = {}
        for i in range(table.num_rows):
            try:
                self._index_row(cols, i, int(row_group_of[i]), int(starts[row_group_of[i]]), chunks)
            except StoreError:
                raise
            except (ValueError, TypeError, KeyError, IndexError, OverflowError, AttributeError) as exc:
                # a malformed entry of an untrusted index: say which row, whatever the entry got wrong
                name = cols.get(S.LAYER_NAME, [None] * table.num_rows)[i]
                raise StoreError(f"{self.path}: index row {i} ({name!r}) is malformed "
                                 f"({type(exc).__name__}: {exc})") from None
        for name, rgs in chunks.items():
            info = self.rows.get(name)
            if info is None or len(rgs) != self._expected_chunks(info):
                raise StoreError(f"{self.path}: tensor {name!r} has missing or extra chunks")
            self.rows[name] = S.RowInfo(**{**info.__dict__, "row_groups": tuple(rgs)})

    def _index_row(self, cols: dict, i: int, rg: int, start: int, chunks: dict[str, list[int]]) -> None:
        if self.version.is_aios:
            info = self._aios_row(cols, i, rg)
            if info.tensor_name in self.rows:
                raise StoreError(f"{self.path}: tensor {info.tensor_name!r} appears twice")
            self.rows[info.tensor_name] = info
            self._row_offsets[info.tensor_name] = (rg, i - start)
            return
        name = cols[S.TENSOR_NAME][i] if self.version is S.SchemaVersion.V2_1 else cols[S.LAYER_NAME][i]
        if not isinstance(name, str) or not name:
            raise StoreError(f"{self.path}: index row {i} has no tensor name")
        chunks.setdefault(name, []).append(rg)
        if cols[S.CHUNK][i] == 0:
            if name in self.rows:
                raise StoreError(f"{self.path}: tensor {name!r} appears twice")
            self.rows[name] = self._checked(self._store_row(cols, i, name))

    def _checked(self, info: S.RowInfo) -> S.RowInfo:
        """A row whose shape, dtype and byte count agree, so that reading it cannot reshape into nonsense."""
        if not all(isinstance(d, int) and d >= 0 for d in info.shape):
            raise StoreError(f"{self.path}: tensor {info.tensor_name!r} has an invalid shape {list(info.shape)}")
        try:
            itemsize = S.torch_dtype(info.dtype).itemsize
        except (KeyError, ValueError, TypeError):
            raise StoreError(f"{self.path}: tensor {info.tensor_name!r} has an unknown dtype {info.dtype!r}") from None
        if not isinstance(info.nbytes, int) or info.nbytes != math.prod(info.shape) * itemsize:
            raise StoreError(f"{self.path}: tensor {info.tensor_name!r} claims {info.nbytes} bytes, but shape "
                             f"{list(info.shape)} of {info.dtype} takes {math.prod(info.shape) * itemsize}")
        return info

    def _store_row(self, cols: dict, i: int, name: str) -> S.RowInfo:
        """A row of our own files: schema 3 (AI-OS's V2 columns plus ours) or 2.1."""
        layer, weight = S.split_name(name)
        params = self._json(cols[S.PARAMS][i] or "{}", f"tensor {name!r}: params", dict)
        fmt, quant_type, shape = cols[S.FORMAT][i], cols[S.QUANT_TYPE][i], tuple(cols[S.SHAPE][i])
        if self.version is S.SchemaVersion.V2_1:
            return S.RowInfo(name, layer, weight, cols[S.DTYPE][i], shape, fmt, params, cols[S.NBYTES][i],
                             cols[S.CHECKSUM][i], (), quant_type)
        try:
            dtype = S.code_of_name(cols[S.DTYPE][i])
        except ValueError as exc:
            raise StoreError(f"{self.path}: tensor {name!r}: {exc}") from None
        scales = cols[S.SCALES][i]
        if quant_type in S.AIOS_CODE_TYPES and scales is not None:
            # AI-OS's codes: the dtype column names the weight's dtype before quantization.
            quant = self._aios_quant(name, quant_type, shape, dtype, scales, cols[S.ZERO_POINTS][i],
                                     cols[S.QUANT_AXIS][i], cols[S.GROUP_SIZE][i])
            self._aios[name] = quant
            dtype = S.AIOS_CODE_TYPES[quant_type]
            if quant_type == "int2":
                shape = (cols[S.NBYTES][i],)
            if fmt == AIOS:
                params.update(self._aios_params(quant, params.get("int2_order", "lsb")))
        return S.RowInfo(name, layer, weight, dtype, shape, fmt, params, cols[S.NBYTES][i], cols[S.CHECKSUM][i], (),
                         quant_type)

    def _aios_row(self, cols: dict, i: int, rg: int) -> S.RowInfo:
        """A row of a file AI-OS wrote: what its writer meant, checked where its loader would not check."""
        name = cols[S.LAYER_NAME][i]
        if not isinstance(name, str) or not name:
            raise StoreError(f"{self.path}: row {i} has no layer_name")
        layer, weight = S.split_name(name)
        shape = tuple(cols[S.SHAPE][i] or ())
        if any(d is None or d < 0 for d in shape):
            raise StoreError(f"{self.path}: tensor {name!r} has an invalid shape {list(shape)}")
        numel = math.prod(shape)
        tag = cols[S.DTYPE][i]
        quant_type = cols[S.QUANT_TYPE][i] if self.version is S.SchemaVersion.AIOS_V2 else None
        if quant_type in S.AIOS_CODE_TYPES:
            group = cols[S.GROUP_SIZE][i] if S.GROUP_SIZE in cols else 0
            original = NAME_CODES.get(tag, "F32")
            quant = self._aios_quant(name, quant_type, shape, original, cols[S.SCALES][i], cols[S.ZERO_POINTS][i],
                                     cols[S.QUANT_AXIS][i], group or 0)
            nbytes = aios_format.code_bytes(quant_type, numel)
            stored_shape = shape if quant_type == "int8" else (nbytes,)
            params = {"weight_shape": list(shape), "original_dtype": original, "int2_order": self._int2_order,
                      **self._aios_params(quant, self._int2_order)}
            return S.RowInfo(name, layer, weight, S.AIOS_CODE_TYPES[quant_type], stored_shape, AIOS, params, nbytes,
                             None, (rg,), quant_type)
        if quant_type is not None and quant_type not in S.AIOS_FLOAT_TYPES:
            raise StoreError(f"{self.path}: tensor {name!r} has quant_type {quant_type!r}, which AI-OS does not define "
                             f"(its loader would read the bytes as int8 codes)")
        if quant_type is not None:  # fp16 / fp32 rows: quant_type says what the bytes are, whatever the dtype tag
            code = S.AIOS_FLOAT_TYPES[quant_type]
        elif tag == "torch.bfloat16":
            code = "F32"  # AI-OS's converter casts bf16 to float32 and keeps the tag: the bytes are float32
        else:
            code = NAME_CODES.get(tag)
            if code is None:
                raise StoreError(f"{self.path}: tensor {name!r} has dtype {tag!r}, which names no dtype we read")
        params = {"dtype_tag": tag} if tag != S.dtype_name(code) else {}
        return S.RowInfo(name, layer, weight, code, shape, DENSE, params, numel * S.torch_dtype(code).itemsize, None,
                         (rg,), quant_type)

    def _aios_quant(self, name, quant_type, shape, original, scales, zero_points, axis, group) -> S.AiosQuant:
        if scales is None or zero_points is None:
            raise StoreError(f"{self.path}: tensor {name!r} ({quant_type}) has no scales or zero points")
        if len(scales) % 4 or len(zero_points) % 4:
            raise StoreError(f"{self.path}: tensor {name!r}: scales/zero points are not float32 arrays "
                             f"({len(scales)} and {len(zero_points)} bytes)")
        quant = S.AiosQuant(quant_type, np.frombuffer(scales, dtype="<f4"), np.frombuffer(zero_points, dtype="<f4"),
                            -1 if axis is None else int(axis), int(group or 0), tuple(shape), original)
        try:
            aios_format.check(name, quant)
        except StoreError as exc:
            raise StoreError(f"{self.path}: {exc}") from None
        return quant

    @staticmethod
    def _aios_params(quant: S.AiosQuant, order: str) -> dict:
        return {"quant_type": quant.quant_type, "scales": quant.scales, "zero_points": quant.zero_points,
                "quant_axis": quant.quant_axis, "group_size": quant.group_size, "int2_order": order}

    @cached_property
    def _int2_order(self) -> str:
        return self.metadata.get(S.META_INT2_ORDER, "lsb")

    def _payload_spans(self, info: S.RowInfo) -> list[tuple[int, int]] | None:
        """(file offset, length) of each chunk's bytes, or None when they cannot be mapped directly.

        An uncompressed, plain-encoded ``data`` column chunk holding one value ends with that value's
        bytes, preceded by their 4-byte little-endian length. Chunks that do not look like that
        (other writers, compression) are read through pyarrow instead.
        """
        meta = self._file.metadata
        spans = []
        for k, rg in enumerate(info.row_groups):
            size = min(S.CHUNK_BYTES, info.nbytes - k * S.CHUNK_BYTES)
            chunk = meta.row_group(rg).column(self._data_leaf)
            if chunk.compression != "UNCOMPRESSED" or chunk.has_dictionary_page or chunk.num_values != 1:
                return None
            start = chunk.data_page_offset + chunk.total_compressed_size - size
            if start - 4 < chunk.data_page_offset:
                return None
            if int.from_bytes(self._pread(start - 4, 4), "little") != size:
                return None
            spans.append((start, size))
        return spans

    @cached_property
    def _data_leaf(self) -> int:
        """Index of the ``data`` column among the file's leaf columns."""
        schema = self._file.metadata.schema
        return next(i for i in range(len(schema)) if schema.column(i).path == S.DATA)

    @cached_property
    def _handle(self):
        return open(self.path, "rb")

    def _pread(self, offset: int, size: int) -> bytes:
        if not self.remote:
            return os.pread(self._handle.fileno(), size, offset)
        self._remote_file.seek(offset)
        data = self._remote_file.read(size)
        if len(data) != size:
            raise StoreError(f"{self.path}: short read ({len(data)} of {size} bytes at offset {offset})")
        return data

    def _fetch(self, start: int, size: int) -> torch.Tensor:
        """``size`` bytes at ``start`` of a remote file, read by one range request."""
        return torch.frombuffer(bytearray(self._pread(start, size)), dtype=torch.uint8)

    @property
    def file_bytes(self) -> int:
        return remote.size(self.path) if self.remote else self.path.stat().st_size

    def _map(self, start: int, size: int) -> torch.Tensor:
        """``size`` bytes at ``start`` as a uint8 tensor over a private copy-on-write mapping (like
        safetensors): it shares the page cache, and writing to it reaches neither the file nor any
        other tensor loaded from it."""
        aligned = start - start % mmap.ALLOCATIONGRANULARITY
        try:
            region = mmap.mmap(self._handle.fileno(), size + start - aligned, access=mmap.ACCESS_COPY, offset=aligned)
        except (OSError, ValueError) as exc:
            raise StoreError(f"{self.path}: cannot map {size} bytes at offset {start} ({exc})") from None
        return torch.frombuffer(region, dtype=torch.uint8, count=size, offset=start - aligned)

    def _read_payload(self, tensor_name: str, info: S.RowInfo) -> torch.Tensor:
        """The array's bytes as a flat uint8 tensor: mapped from the file, or copied out through pyarrow."""
        if tensor_name not in self._spans:
            self._spans[tensor_name] = self._payload_spans(info)
        spans = self._spans[tensor_name]
        if spans is not None:
            # Local files are mapped copy-on-write; remote ones read by one range request per chunk.
            chunk = self._fetch if self.remote else self._map
            if len(spans) == 1 and spans[0][1] > 0:
                return chunk(*spans[0])
            out = torch.empty(info.nbytes, dtype=torch.uint8)  # several chunks: one copy joins them
            pos = 0
            for start, size in spans:
                if size:
                    out[pos : pos + size] = chunk(start, size)
                pos += size
            return out
        meta = self._file.metadata
        held = sum(meta.row_group(rg).column(self._data_leaf).total_uncompressed_size for rg in info.row_groups)
        if info.nbytes > held:
            raise StoreError(f"{self.path}: tensor {tensor_name!r} claims {info.nbytes} bytes, but its data "
                             f"column holds at most {held}")
        try:
            table = self._file.read_row_groups(list(info.row_groups), columns=[S.DATA])
        except (pa.ArrowException, OSError) as exc:
            raise StoreError(f"{self.path}: tensor {tensor_name!r} is unreadable ({exc})") from None
        column = table.column(S.DATA)
        out = np.empty(info.nbytes, dtype=np.uint8)  # bounded: _check_claims and _expected_chunks
        pos = 0
        for chunk in column.chunks:
            for i in range(len(chunk)):
                buf = chunk[i].as_buffer()
                n = buf.size
                if pos + n > info.nbytes:
                    raise StoreError(f"{self.path}: tensor {tensor_name!r} has more bytes than its header says")
                out[pos : pos + n] = np.frombuffer(buf, dtype=np.uint8)
                pos += n
        if pos != info.nbytes:
            raise StoreError(f"{self.path}: tensor {tensor_name!r} is truncated ({pos} of {info.nbytes} bytes)")
        # from_numpy gives an empty array stride 0, which view(dtype) rejects
        return torch.from_numpy(out) if info.nbytes else torch.empty(0, dtype=torch.uint8)

    @staticmethod
    def _expected_chunks(info: S.RowInfo) -> int:
        return max(1, -(-info.nbytes // S.CHUNK_BYTES))

    def _build_groups(self) -> dict[str, list[str]]:
        """Quantized layers: layer name -> the stored rows that together make its weight."""
        groups: dict[str, list[str]] = {}
        for name, info in self.rows.items():
            if info.format != DENSE and name not in self._per_tensor:
                groups.setdefault(info.layer_name, []).append(name)
        return groups

    # --- file-level accessors -----------------------------------------------------------------
    def _json(self, text: str, what: str, kind: type):
        """JSON from inside the file, of the expected kind, or one StoreError naming the file and the entry."""
        try:
            value = json.loads(text)
        except (json.JSONDecodeError, TypeError, RecursionError) as exc:
            raise StoreError(f"{self.path}: {what} is not valid JSON ({exc})") from None
        if not isinstance(value, kind):
            raise StoreError(f"{self.path}: {what} is not a JSON {kind.__name__}")
        return value

    @cached_property
    def config(self) -> dict:
        text = self.config_text
        return self._json(text, S.META_CONFIG, dict) if text else {}

    @property
    def config_text(self) -> str | None:
        return self.metadata.get(S.META_CONFIG)

    @property
    def generation_config_text(self) -> str | None:
        return self.metadata.get(S.META_GENERATION_CONFIG)

    @cached_property
    def files(self) -> dict[str, bytes]:
        raw = self._json(self.metadata.get(S.META_FILES, "{}"), S.META_FILES, dict)
        files = {names.file_name(name, source=self.path, entry="side file"): _base64(data, self.path, name)
                 for name, data in raw.items()}
        if not files and S.META_GGUF in self.metadata:
            from llm_workbook.store.gguf_kv import tokenizer_files  # GGUF files derive theirs from the stored key-values

            try:
                files = tokenizer_files(self)
            except StoreError:
                files = {}  # a GGUF without a tokenizer transformers can build; tokenizer() says so
        return files

    @cached_property
    def layout(self) -> dict | None:
        text = self.metadata.get(S.META_LAYOUT)
        layout = self._json(text, S.META_LAYOUT, dict) if text else None
        if layout is not None:
            shards = layout.get("shards")
            if not isinstance(shards, (dict, type(None))):
                raise StoreError(f"{self.path}: its shard layout ({S.META_LAYOUT}) is not a mapping")
            for shard in shards or {}:
                names.file_name(shard, source=self.path, entry="shard")
        return layout

    @cached_property
    def source(self) -> dict:
        return self._json(self.metadata.get(S.META_SOURCE, "{}"), S.META_SOURCE, dict)

    @cached_property
    def quantization_config(self) -> dict | None:
        return self.config.get("quantization_config")

    def materialize_hf_files(self, directory: str | os.PathLike | None = None) -> Path:
        """Write config, generation config and side files (tokenizer...) to a directory; return it."""
        target = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="llmc-files-"))
        target.mkdir(parents=True, exist_ok=True)
        if self.config_text is not None:
            (target / "config.json").write_text(self.config_text, encoding="utf-8")
        if self.generation_config_text is not None:
            (target / "generation_config.json").write_text(self.generation_config_text, encoding="utf-8")
        for name, data in self.files.items():
            (target / name).write_bytes(data)
        return target

    def tokenizer(self):
        """The tokenizer that travelled inside the file (transformers ``AutoTokenizer``)."""
        from transformers import AutoTokenizer

        if not hasattr(self, "_tokenizer"):
            import shutil

            directory = self.materialize_hf_files()
            try:
                self._tokenizer = AutoTokenizer.from_pretrained(directory)
            except Exception as exc:
                raise StoreError(f"{self.path}: no usable tokenizer inside the file ({exc})") from None
            finally:
                shutil.rmtree(directory, ignore_errors=True)
        return self._tokenizer

    # --- tensor names -----------------------------------------------------------------------------
    def keys(self) -> list[str]:
        """Names of the model's (dequantized) parameters: what a plain transformers model expects."""
        names = []
        seen_groups = set()
        for name, info in self.rows.items():
            if info.format == DENSE or name in self._per_tensor:
                names.append(name)
            elif info.layer_name not in seen_groups:
                seen_groups.add(info.layer_name)
                names.append(f"{info.layer_name}.weight" if info.layer_name else "weight")
        return names

    def stored_keys(self) -> list[str]:
        """Names of the stored arrays (codes, scales, ... as in the source checkpoint)."""
        return list(self.rows)

    def format_of(self, layer_name: str) -> str:
        rows = self._groups.get(layer_name)
        if not rows and f"{layer_name}.weight" in self._per_tensor:
            return self.rows[f"{layer_name}.weight"].format
        return self.rows[rows[0]].format if rows else DENSE

    # --- reads ------------------------------------------------------------------------------------
    def load_tensor(self, tensor_name: str) -> torch.Tensor:
        """One stored array, bit-exact, in its stored dtype and shape (checksum verified)."""
        info = self.rows.get(tensor_name)
        if info is None:
            raise StoreError(f"{self.path}: no tensor {tensor_name!r}")
        tensor = self._read_aios(info) if self.version.is_aios else self._read_payload(tensor_name, info)
        if self.verify and info.checksum:
            digest = "xxh3_64:" + xxhash.xxh3_64_hexdigest(tensor.numpy())
            if digest != info.checksum:
                raise StoreError(f"{self.path}: checksum mismatch for tensor {tensor_name!r} (stored {info.checksum}, read {digest})")
        dtype = S.torch_dtype(info.dtype)
        if dtype == torch.bool:
            return tensor.view(torch.uint8).to(torch.bool).reshape(info.shape)
        return tensor.view(dtype).reshape(info.shape)

    def _read_aios(self, info: S.RowInfo) -> torch.Tensor:
        """A row of an AI-OS file. Its writer puts the whole file in one compressed row group, so the
        first read decodes that row group's ``data`` column, which later reads then share."""
        rg, row = self._row_offsets[info.tensor_name]
        if self._row_group_data is None or self._row_group_data[0] != rg:
            self._row_group_data = None
            try:
                column = self._file.read_row_group(rg, columns=[S.DATA]).column(S.DATA)
            except (pa.ArrowException, OSError) as exc:
                raise StoreError(f"{self.path}: tensor {info.tensor_name!r} is unreadable ({exc})") from None
            self._row_group_data = (rg, column)
        value = self._row_group_data[1][row]
        if not value.is_valid:
            raise StoreError(f"{self.path}: tensor {info.tensor_name!r} has no data")
        buf = value.as_buffer()
        if buf.size != info.nbytes:
            what = info.quant_type or info.params.get("dtype_tag") or S.dtype_name(info.dtype)
            raise StoreError(f"{self.path}: tensor {info.tensor_name!r} holds {buf.size} bytes, but shape "
                             f"{list(info.params.get('weight_shape') or info.shape)} as {what} takes {info.nbytes}")
        return torch.frombuffer(bytearray(buf), dtype=torch.uint8) if buf.size else torch.empty(0, dtype=torch.uint8)

    def stored_row(self, tensor_name: str) -> Row:
        """The array as our writer stores it again: bytes, format, params and AI-OS's parameters. AI-OS
        int2 codes come back packed in the order AI-OS's loader reads (msb first)."""
        info = self.rows[tensor_name]
        if info.format == AIOS:
            record = self.tensor_record(tensor_name)
            return aios_format.encode(tensor_name, aios_format.codes_of(record), aios_format.quant_of(record))
        params = {k: v for k, v in info.params.items() if k != "dtype_tag"}
        return Row(tensor_name, self.load_tensor(tensor_name), info.format, params, aios=self._aios.get(tensor_name))

    def tensor_record(self, tensor_name: str) -> QuantizedTensor:
        """One array of a per-tensor format (GGUF) with its parameters."""
        info = self.rows[tensor_name]
        return QuantizedTensor(info.format, info.layer_name, {info.weight_name: self.load_tensor(tensor_name)},
                               dict(info.params))

    def record(self, layer_name: str) -> QuantizedTensor:
        """The stored arrays and parameters of one quantized layer."""
        if layer_name not in self._groups and f"{layer_name}.weight" in self._per_tensor:
            return self.tensor_record(f"{layer_name}.weight")
        names = self._groups.get(layer_name)
        if not names:
            raise StoreError(f"{self.path}: layer {layer_name!r} is not quantized")
        fmt = self.rows[names[0]].format
        params: dict = {}
        tensors = {}
        for name in names:
            info = self.rows[name]
            if info.format != fmt:
                raise StoreError(f"{self.path}: layer {layer_name!r} mixes formats {fmt} and {info.format}")
            params.update(info.params)
            tensors[info.weight_name] = self.load_tensor(name)
        return QuantizedTensor(fmt, layer_name, tensors, params)

    def _check_output_claim(self, name: str, record: QuantizedTensor) -> None:
        """A shape in the parameters must not promise more weights than the stored bytes can code (one bit
        each at least): a hostile row cannot make dequantization allocate far beyond what was read."""
        stored = sum(t.numel() * t.element_size() for t in record.tensors.values())
        for key in SHAPE_PARAMS:
            shape = record.params.get(key)
            if key in record.tensors and record.tensors[key].numel() <= 8:  # compressed-tensors stores it as a tensor
                shape = [int(d) for d in record.tensors[key].reshape(-1).tolist()]
            if isinstance(shape, (list, tuple)) and shape:
                if not all(isinstance(d, int) and d >= 0 for d in shape):
                    raise StoreError(f"{self.path}: tensor {name!r} has an invalid {key} {list(shape)}")
                if math.prod(shape) > 8 * stored + 4096:
                    raise StoreError(f"{self.path}: tensor {name!r} claims {key} {list(shape)} "
                                     f"({math.prod(shape)} weights) from {stored} stored bytes")

    def load_weight(
        self,
        layer_name: str,
        weight_name: str,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        dequantize: bool = True,
    ) -> torch.Tensor | QuantizedTensor:
        """One parameter of one layer, read lazily.

        For a quantized layer, ``weight_name="weight"`` gives the dequantized float weight
        (``dtype``, default float32) or, with ``dequantize=False``, the stored record. Any stored
        array (``qweight``, ``weight_scale``, ...) can also be read by its own name.
        """
        name = f"{layer_name}.{weight_name}" if layer_name else weight_name
        if name in self._per_tensor or (weight_name == "weight" and layer_name in self._groups):
            record = self.tensor_record(name) if name in self._per_tensor else self.record(layer_name)
            if not dequantize:
                return record
            self._check_output_claim(name, record)
            try:
                tensor = formats.get_format(record.format).dequantize(record, dtype or torch.float32)
            except StoreError:
                raise
            except Exception as exc:
                raise StoreError(f"{self.path}: cannot dequantize {name!r} ({record.format}): {exc}") from None
            return tensor.to(device)
        if name not in self.rows:
            raise StoreError(f"{self.path}: no tensor {name!r}")
        tensor = self.load_tensor(name)
        if dtype is not None:
            tensor = tensor.to(dtype)
        return tensor.to(device)

    def state_dict(self, dtype: torch.dtype | None = None) -> "LazyStateDict":
        """A lazy mapping of parameter name -> tensor; quantized weights are dequantized to ``dtype``."""
        return LazyStateDict(self, dtype)

    def source_tensors(self) -> "SourceTensors":
        """A lazy mapping of the source checkpoint's exact tensors (what export writes)."""
        return SourceTensors(self)

    def verify_all(self) -> list[str]:
        """Read every array; return one message per problem (empty list: all checksums verify)."""
        problems = []
        for check in (lambda: self.files, lambda: self.layout):  # names a later export would write
            try:
                check()
            except StoreError as exc:  # _json and names.file_name say what is wrong
                problems.append(str(exc))
        for name in self.rows:
            try:
                self.load_tensor(name)
            except StoreError as exc:
                problems.append(str(exc))
        return problems

    def __repr__(self) -> str:
        return f"WeightLoaderV2({str(self.path)!r}, version={self.version.value}, tensors={len(self.rows)})"


class LazyStateDict(Mapping):
    def __init__(self, loader: WeightLoaderV2, dtype: torch.dtype | None):
        self._loader = loader
        self._dtype = dtype
        self._keys = loader.keys()

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        layer, weight = S.split_name(key)
        tensor = self._loader.load_weight(layer, weight, dtype=None if weight != "weight" else self._dtype)
        if self._dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(self._dtype)
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


class SourceTensors(Mapping):
    """Exact source tensors: dense rows as stored, quantized groups through their format's ``to_hf``."""

    def __init__(self, loader: WeightLoaderV2):
        self._loader = loader
        self._owner: dict[str, str | None] = {}
        self._names: list[str] = []
        for name, info in loader.rows.items():
            if info.format == DENSE:
                self._owner[name] = None
                self._names.append(name)
            elif name in loader._per_tensor:  # dequantized: its blocks have no safetensors form
                self._owner[name] = name
                self._names.append(name)
        self._hf_names: dict[str, list[str]] = {}
        for layer in loader._groups:
            fmt = formats.get_format(loader.format_of(layer))
            params: dict = {}
            for row in loader._groups[layer]:
                params.update(loader.rows[row].params)
            suffixes = fmt.hf_names(params, [loader.rows[r].weight_name for r in loader._groups[layer]])
            for suffix in suffixes:
                full = f"{layer}.{suffix}" if layer else suffix
                self._owner[full] = layer
                self._names.append(full)
        self._cache: tuple[str, dict] | None = None

    def __getitem__(self, key: str) -> torch.Tensor:
        layer = self._owner[key]
        if layer is None:
            return self._loader.load_tensor(key)
        if layer == key:
            record = self._loader.tensor_record(key)
            return next(iter(formats.get_format(record.format).to_hf(record).values()))
        if self._cache is None or self._cache[0] != layer:
            record = self._loader.record(layer)
            tensors = formats.get_format(record.format).to_hf(record)
            self._cache = (layer, tensors)
        return self._cache[1][key[len(layer) + 1 :] if layer else key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)
