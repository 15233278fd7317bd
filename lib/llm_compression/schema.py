"""The Parquet weight-store schema: columns, key-value metadata keys, dtype codes, version detection.

Nothing else in the package spells a column name; import the constants from here.

Three schemas exist:

* V1 (old, float weights): layer_name, weight_name, weight_data list<float16>, shape.
* V2 (old, quantized weights): V1 + quant_type, scales, zero_points, quant_axis; weight_data list<int8>.
* V2.1 (what we write now): every V2 column, plus the columns below. The payload moved from the
  list-typed ``weight_data`` (null in new files) to ``data`` (large_binary, the tensor's raw
  little-endian bytes): Parquet's list<int8> encoding writes and reads ~50x slower than a binary
  value, and cannot hold dtypes such as bf16 or float8 bit-exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum

import pyarrow as pa
import torch

# --- columns ---------------------------------------------------------------------------------
LAYER_NAME = "layer_name"  # module path, e.g. model.layers.0.self_attn.q_proj
WEIGHT_NAME = "weight_name"  # name inside the module, e.g. weight, bias, qweight, weight_scale
WEIGHT_DATA = "weight_data"  # V1/V2 payload (list<float16> / list<int8>); null in V2.1 rows
SHAPE = "shape"
QUANT_TYPE = "quant_type"  # V2: int8 | int2 | fp16; V2.1: the row's storage format
SCALES = "scales"  # V2 per-tensor / per-channel scales; filled only for rows old readers understand
ZERO_POINTS = "zero_points"
QUANT_AXIS = "quant_axis"
# V2.1 additions
TENSOR_NAME = "tensor_name"  # full name of the stored array, as in the source checkpoint
DTYPE = "dtype"  # safetensors dtype code of the stored array (BF16, F8_E4M3, I32, ...)
FORMAT = "format"  # format module owning the row: dense, fp8, gptq, awq, ...
PARAMS = "params"  # JSON object with format-specific parameters (group size, bits, ...)
NBYTES = "nbytes"  # bytes of the whole array (all chunks)
CHECKSUM = "checksum"  # "xxh3_64:<hex>" of the whole array's bytes; verified on every read
CHUNK = "chunk"  # index of this row's slice of the array's bytes
NUM_CHUNKS = "num_chunks"
DATA = "data"  # this chunk's raw bytes

V1_SCHEMA = pa.schema(
    [
        pa.field(LAYER_NAME, pa.string()),
        pa.field(WEIGHT_NAME, pa.string()),
        pa.field(WEIGHT_DATA, pa.list_(pa.float16())),
        pa.field(SHAPE, pa.list_(pa.int32())),
    ]
)

V2_SCHEMA = pa.schema(
    [
        pa.field(LAYER_NAME, pa.string()),
        pa.field(WEIGHT_NAME, pa.string()),
        pa.field(WEIGHT_DATA, pa.list_(pa.int8())),
        pa.field(SHAPE, pa.list_(pa.int32())),
        pa.field(QUANT_TYPE, pa.string()),
        pa.field(SCALES, pa.list_(pa.float32())),
        pa.field(ZERO_POINTS, pa.list_(pa.int8())),
        pa.field(QUANT_AXIS, pa.int32()),
    ]
)

STORE_SCHEMA = pa.schema(
    list(V2_SCHEMA)
    + [
        pa.field(TENSOR_NAME, pa.string()),
        pa.field(DTYPE, pa.string()),
        pa.field(FORMAT, pa.string()),
        pa.field(PARAMS, pa.string()),
        pa.field(NBYTES, pa.int64()),
        pa.field(CHECKSUM, pa.string()),
        pa.field(CHUNK, pa.int32()),
        pa.field(NUM_CHUNKS, pa.int32()),
        pa.field(DATA, pa.large_binary()),
    ]
)

# Every column except the payload: what listing / indexing a file reads.
INDEX_COLUMNS = [f.name for f in STORE_SCHEMA if f.name not in (DATA, WEIGHT_DATA)]

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
SCHEMA_VERSION = "2.1"


class SchemaVersion(str, Enum):
    V1 = "1"
    V2 = "2"
    V2_1 = SCHEMA_VERSION


def detect_version(schema: pa.Schema) -> SchemaVersion:
    """Tell V1, V2 and V2.1 files apart from their columns (V2 has quant_type, V2.1 has data)."""
    names = set(schema.names)
    if not {LAYER_NAME, WEIGHT_NAME, SHAPE} <= names:
        raise ValueError(f"not a weight-store file: columns {sorted(names)}")
    if DATA in names and CHECKSUM in names:
        return SchemaVersion.V2_1
    if QUANT_TYPE in names:
        return SchemaVersion.V2
    return SchemaVersion.V1


# --- dtypes ------------------------------------------------------------------------------------
# safetensors dtype codes <-> torch dtypes. Codes are what we store, so files don't depend on torch.
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
    dtype: str
    shape: tuple[int, ...]
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
