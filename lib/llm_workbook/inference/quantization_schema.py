"""AI-OS's ``llm_compression.inference.quantization_schema``: the V1/V2 schemas and their row helpers,
with AI-OS's names and behaviour. Our own files have every V2 column, so they detect as V2."""

from __future__ import annotations

from typing import Literal

import pyarrow as pa

from llm_workbook import schema as S
from llm_workbook.logger import logger

WEIGHT_SCHEMA_V1 = S.WEIGHT_SCHEMA_V1
WEIGHT_SCHEMA_V2 = S.WEIGHT_SCHEMA_V2
V1_SCHEMA = S.V1_SCHEMA  # the planning report's names
V2_SCHEMA = S.V2_SCHEMA
STORE_SCHEMA = S.STORE_SCHEMA  # ours: V2 plus the columns V2 cannot hold

QuantType = Literal["int8", "int2", "fp16", "fp32"]
V1_COLUMNS = set(WEIGHT_SCHEMA_V1.names)
V2_COLUMNS = set(WEIGHT_SCHEMA_V2.names)


def detect_schema_version(table: pa.Table) -> int:
    """2 when the table has a ``quant_type`` column, else 1."""
    return 2 if S.QUANT_TYPE in table.schema.names else 1


def _validate(table: pa.Table, required: set[str], version: int) -> bool:
    missing = required - set(table.schema.names)
    if missing:
        logger.error(f"Schema V{version} validation failed: missing columns {missing}")
        return False
    return True


def validate_schema_v1(table: pa.Table) -> bool:
    return _validate(table, V1_COLUMNS, 1)


def validate_schema_v2(table: pa.Table) -> bool:
    return _validate(table, V2_COLUMNS, 2)


def get_schema_for_version(version: int) -> pa.Schema:
    if version == 1:
        return WEIGHT_SCHEMA_V1
    if version == 2:
        return WEIGHT_SCHEMA_V2
    raise ValueError(f"Invalid schema version: {version}. Must be 1 or 2.")


def is_quantized_layer(table: pa.Table, row_idx: int) -> bool:
    """Does row ``row_idx`` hold int8/int2 codes?"""
    if S.QUANT_TYPE not in table.schema.names:
        return False
    return table[S.QUANT_TYPE][row_idx].as_py() in ("int8", "int2")


def get_quantization_info(table: pa.Table, row_idx: int) -> dict:
    if S.QUANT_TYPE not in table.schema.names:
        raise ValueError("Table is not Schema V2 (no quant_type column)")
    return {
        "quant_type": table[S.QUANT_TYPE][row_idx].as_py(),
        "scales": table[S.SCALES][row_idx].as_py(),
        "zero_points": table[S.ZERO_POINTS][row_idx].as_py(),
        "quant_axis": table[S.QUANT_AXIS][row_idx].as_py(),
        "group_size": table[S.GROUP_SIZE][row_idx].as_py() if S.GROUP_SIZE in table.schema.names else 0,
    }


def create_v1_row(layer_name: str, shape: list, dtype: str, data: bytes, num_params: int) -> dict:
    return {"layer_name": layer_name, "shape": shape, "dtype": dtype, "data": data, "num_params": num_params}


def create_v2_row(layer_name: str, shape: list, dtype: str, data: bytes, num_params: int, quant_type: QuantType,
                  scales: bytes, zero_points: bytes, quant_axis: int, group_size: int = 0) -> dict:
    return {**create_v1_row(layer_name, shape, dtype, data, num_params), "quant_type": quant_type, "scales": scales,
            "zero_points": zero_points, "quant_axis": quant_axis, "group_size": group_size}


__all__ = [
    "QuantType", "STORE_SCHEMA", "V1_SCHEMA", "V2_SCHEMA", "WEIGHT_SCHEMA_V1", "WEIGHT_SCHEMA_V2", "create_v1_row",
    "create_v2_row", "detect_schema_version", "get_quantization_info", "get_schema_for_version", "is_quantized_layer",
    "validate_schema_v1", "validate_schema_v2",
]
