"""Unquantized tensors (any dtype), stored as they are."""

from __future__ import annotations

import torch

from llm_workbook.formats.base import QuantizedTensor, Row, TensorInfo

NAME = "dense"


def detect(qconfig: dict | None, tensors: dict[str, TensorInfo]) -> bool:
    return not qconfig


def claim(qconfig: dict | None, module: str, members: dict[str, TensorInfo]) -> set[str]:
    return set()


def to_rows(qconfig: dict | None, module: str, tensors: dict[str, torch.Tensor]) -> list[Row]:
    return [Row(f"{module}.{s}" if module else s, t, NAME) for s, t in tensors.items()]


def dequantize(record: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    (tensor,) = record.tensors.values()
    return tensor.to(dtype)

