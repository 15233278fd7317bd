"""The Parquet weight-store schema: columns, key-value metadata keys, dtype names, version detection.

Nothing else in the package spells a column name; import the constants from here.

Our files are AI-OS's ``WEIGHT_SCHEMA_V2`` with AI-OS's column meanings, plus columns for what V2
cannot hold (AI-OS: github.com/pallasting/ArrowQuant_V2, ``llm_compression/inference/quantization_schema.py``):

* AI-OS V1 (float weights): ``layer_name`` (the full tensor name), ``shape``, ``dtype`` (a torch dtype
  string), ``data`` (raw little-endian bytes), ``num_params``.
* AI-OS V2 (quantized): V1 + ``quant_type`` (int8 | int2 | fp16 | fp32), ``scales`` and ``zero_points``
  (float32 arrays as bytes), ``quant_axis``, ``group_size``; ``w = (q - zero_point) * scale``.
* Ours, schema 3: every V2 column, plus ``format``, ``params``, ``nbytes``, ``checksum``, ``chunk`` and
  ``num_chunks``, and the model's config, tokenizer and layout in the footer. A row AI-OS can read
  (float32/float16 arrays, AI-OS int8/int2 codes) says so in ``quant_type``; every other row carries our
  storage name there and null ``scales``, on which AI-OS's loader raises instead of misreading it.
* Ours, schema 2.1 (older releases of this project): ``layer_name`` = module path plus ``weight_name``,
  ``tensor_name``, safetensors dtype codes and ``data`` as large_binary. Read, never written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum

import numpy as np
import pyarrow as pa
import torch

# --- columns: AI-OS's V1 ------------------------------------------------------------------------
LAYER_NAME = "layer_name"  # the full tensor name, e.g. model.layers.0.self_attn.q_proj.weight
SHAPE = "shape"  # the tensor's shape (for int2 rows: the weight's, not the packed bytes')
DTYPE = "dtype"  # torch dtype string: of the stored array, or for int8/int2 rows the weight's before quantization
DATA = "data"  # this row's raw little-endian bytes
NUM_PARAMS = "num_params"  # elements of the whole tensor
# --- AI-OS's V2 additions -------------------------------------------------------------------------
QUANT_TYPE = "quant_type"  # int8 | int2 | fp16 | fp32 (AI-OS reads it); anything else: our storage name
SCALES = "scales"  # float32 array as bytes: one per tensor, per row of quant_axis, or per group
ZERO_POINTS = "zero_points"  # float32 array as bytes, as long as scales
QUANT_AXIS = "quant_axis"  # -1 per tensor, 0 per row (also with groups), 1 per column
GROUP_SIZE = "group_size"  # > 0: groups of this many consecutive elements of the flattened tensor
# --- ours ---------------------------------------------------------------------------------------------
FORMAT = "format"  # format module owning the row: dense, aios, fp8, gptq, awq, ...
PARAMS = "params"  # JSON object with format-specific parameters (group size, bits, ...)
NBYTES = "nbytes"  # bytes of the whole array (all chunks)
CHECKSUM = "checksum"  # "xxh3_64:<hex>" of the whole array's bytes; verified on every read
CHUNK = "chunk"  # index of this row's slice of the array's bytes
NUM_CHUNKS = "num_chunks"
# --- our schema 2.1 only ------------------------------------------------------------------------------
WEIGHT_NAME = "weight_name"  # 2.1: layer_name held the module path, weight_name the rest
TENSOR_NAME = "tensor_name"  # 2.1: the full name
WEIGHT_DATA = "weight_data"  # 2.1: always null

WEIGHT_SCHEMA_V1 = pa.schema(
    [
        pa.field(LAYER_NAME, pa.string()),
        pa.field(SHAPE, pa.list_(pa.int32())),
        pa.field(DTYPE, pa.string()),
        pa.field(DATA, pa.binary()),
        pa.field(NUM_PARAMS, pa.int64()),
    ]
)

WEIGHT_SCHEMA_V2 = pa.schema(
    list(WEIGHT_SCHEMA_V1)
    + [
        pa.field(QUANT_TYPE, pa.string()),
        pa.field(SCALES, pa.binary()),
        pa.field(ZERO_POINTS, pa.binary()),
        pa.field(QUANT_AXIS, pa.int32()),
        pa.field(GROUP_SIZE, pa.int32()),
    ]
)

STORE_SCHEMA = pa.schema(
    list(WEIGHT_SCHEMA_V2)
    + [
        pa.field(FORMAT, pa.string()),
        pa.field(PARAMS, pa.string()),
        pa.field(NBYTES, pa.int64()),
        pa.field(CHECKSUM, pa.string()),
        pa.field(CHUNK, pa.int32()),
        pa.field(NUM_CHUNKS, pa.int32()),
    ]
)

# The planning report's names.
V1_SCHEMA = WEIGHT_SCHEMA_V1
V2_SCHEMA = WEIGHT_SCHEMA_V2

# Every column except the payload: what listing / indexing a file reads.
INDEX_COLUMNS = [f.name for f in STORE_SCHEMA if f.name != DATA] + [WEIGHT_NAME, TENSOR_NAME]

# Arrays larger than this are split over several rows (one row group each): a Parquet page holds at
# most 2 GiB. The size trades writing against reading: Arrow's writer holds about two copies of a
# chunk before it reaches the disk (256 MiB chunks cost RTN on a 1.2 GB model 0.3 GB more peak RSS),
# while a tensor of several chunks is joined by one copy on load (with 64 MiB chunks, the store bench's
# 125 MiB embeddings loaded at half the speed). Readers take any chunking, so older files still read.
CHUNK_BYTES = 128 * 1024 * 1024

# --- key-value metadata (file footer) -------------------------------------------------------
META_SCHEMA_VERSION = "llmc.schema_version"
META_CONFIG = "llmc.config"  # config.json, verbatim text
META_GENERATION_CONFIG = "llmc.generation_config"  # generation_config.json, verbatim text
META_FILES = "llmc.files"  # JSON {filename: base64 bytes}: tokenizer files and other side files
META_LAYOUT = "llmc.layout"  # JSON: source shards, tensor order, safetensors __metadata__
META_SOURCE = "llmc.source"  # JSON: where the checkpoint came from, when, tool version
META_INDEX = "llmc.index"  # JSON {tensor_name: [row_group, ...]}
META_GGUF = "llmc.gguf"  # JSON: a GGUF source's version, alignment, typed key-values, tensor order/offsets
# int2 bit order of a file's int2 rows: "msb" (element 0 in the high bits, as AI-OS's loader reads)
# or "lsb" (as AI-OS's writer packs). A file without the key was written by AI-OS: "lsb".
META_INT2_ORDER = "llmc.int2_order"
SCHEMA_VERSION = "3"


class SchemaVersion(str, Enum):
    AIOS_V1 = "aios-v1"
    AIOS_V2 = "aios-v2"
    V2_1 = "2.1"
    V3 = SCHEMA_VERSION

    @property
    def is_aios(self) -> bool:
        return self in (SchemaVersion.AIOS_V1, SchemaVersion.AIOS_V2)


def detect_version(schema: pa.Schema) -> SchemaVersion:
    """Tell AI-OS V1/V2 files, our 2.1 and our 3 apart from their columns."""
    names = set(schema.names)
    if {TENSOR_NAME, WEIGHT_NAME, CHECKSUM, DATA} <= names:
        return SchemaVersion.V2_1
    v1 = {f.name for f in WEIGHT_SCHEMA_V1}
    if not v1 <= names:
        raise ValueError(f"not a weight-store file: columns {sorted(names)} lack {sorted(v1 - names)}")
    if {FORMAT, CHECKSUM, NBYTES} <= names:
        return SchemaVersion.V3
    if QUANT_TYPE in names:
        v2 = {f.name for f in WEIGHT_SCHEMA_V2} - {GROUP_SIZE}  # AI-OS reads group_size as 0 when absent
        if not v2 <= names:
            raise ValueError(f"not a weight-store file: V2 columns {sorted(v2 - names)} are missing")
        return SchemaVersion.AIOS_V2
    return SchemaVersion.AIOS_V1


# --- dtypes ------------------------------------------------------------------------------------
# safetensors dtype codes <-> torch dtypes: the codes name a row's stored array inside the package;
# files carry the torch dtype string AI-OS uses ("torch.bfloat16").
DTYPE_CODES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "BOOL": torch.bool,
}
TORCH_TO_CODE = {v: k for k, v in DTYPE_CODES.items()}


def dtype_code(dtype: torch.dtype) -> str:
    try:
        return TORCH_TO_CODE[dtype]
    except KeyError:
        raise ValueError(f"unsupported tensor dtype {dtype}; supported: {sorted(DTYPE_CODES)}") from None


def torch_dtype(code: str) -> torch.dtype:
    try:
        return DTYPE_CODES[code]
    except KeyError:
        raise ValueError(f"unknown dtype code {code!r}; supported: {sorted(DTYPE_CODES)}") from None


def dtype_name(code: str) -> str:
    """safetensors code -> the torch dtype string a file's ``dtype`` column holds (``BF16`` -> ``torch.bfloat16``)."""
    return str(torch_dtype(code))


NAME_TO_CODE = {str(v): k for k, v in DTYPE_CODES.items()}


def code_of_name(name: str) -> str:
    """A ``dtype`` column value -> safetensors code; ValueError for strings that name no dtype we store."""
    try:
        return NAME_TO_CODE[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; known: {sorted(NAME_TO_CODE)}") from None


# --- AI-OS's quantization ------------------------------------------------------------------------
AIOS_FLOAT_TYPES = {"fp32": "F32", "fp16": "F16"}  # quant_type -> the code of the bytes AI-OS reads
AIOS_CODE_TYPES = {"int8": "I8", "int2": "U8"}  # quant_type -> the code of the stored codes
AIOS_QUANT_TYPES = tuple(AIOS_FLOAT_TYPES) + tuple(AIOS_CODE_TYPES)


@dataclass(frozen=True)
class AiosQuant:
    """AI-OS's V2 quantization of one row: ``w = (q - zero_point) * scale`` over ``quant_axis`` or groups."""

    quant_type: str  # int8 | int2
    scales: np.ndarray  # float32
    zero_points: np.ndarray  # float32
    quant_axis: int
    group_size: int
    shape: tuple[int, ...]  # the weight's shape
    original_dtype: str  # safetensors code of the weight before quantization


# Suffixes that contain a dot themselves (TensorRT-LLM's W4A8 group scales).
DOTTED_SUFFIXES = ("weight_scale.int4",)


def split_name(tensor_name: str) -> tuple[str, str]:
    """`model.layers.0.q_proj.weight` -> (`model.layers.0.q_proj`, `weight`); no dot -> ("", name)."""
    for suffix in DOTTED_SUFFIXES:
        if tensor_name.endswith("." + suffix):
            return tensor_name[: -len(suffix) - 1], suffix
    layer, _, weight = tensor_name.rpartition(".")
    return layer, weight


@dataclass(frozen=True)
class RowInfo:
    """Everything about one stored array except its bytes (one entry of the file index)."""

    tensor_name: str
    layer_name: str
    weight_name: str
    dtype: str  # safetensors code of the stored array
    shape: tuple[int, ...]  # the stored array's shape
    format: str
    params: dict
    nbytes: int
    checksum: str | None
    row_groups: tuple[int, ...]
    quant_type: str | None = None

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def params_json(params: dict) -> str:
    return json.dumps(params, sort_keys=True, separators=(",", ":"))
