"""Rows of our old V2 files: int8 / int2 codes (one per int8) with per-tensor or per-channel scales."""

from __future__ import annotations

import torch

from llm_compression.formats.base import QuantizedTensor, Row, TensorInfo

NAME = "v2_int"


def detect(qconfig: dict | None, tensors: dict[str, TensorInfo]) -> bool:
    return False  # only found in old files, never in a source checkpoint


def claim(qconfig: dict | None, module: str, members: dict[str, TensorInfo]) -> set[str]:
    return set()


def to_rows(qconfig: dict | None, module: str, tensors: dict[str, torch.Tensor]) -> list[Row]:
    raise NotImplementedError("old V2 rows are read, never written")


def dequantize(record: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """w = (q - zero_point) * scale, per tensor (quant_axis -1) or per row of axis 0."""
    q = record.tensors["weight"].to(torch.float32)
    scales = torch.tensor(record.params.get("scales") or [1.0], dtype=torch.float32)
    zeros = torch.tensor(record.params.get("zero_points") or [0] * len(scales), dtype=torch.float32)
    axis = record.params.get("quant_axis")
    if axis in (None, -1) or len(scales) == 1:
        return ((q - zeros[0]) * scales[0]).to(dtype)
    view = [-1] + [1] * (q.dim() - 1)
    return ((q - zeros.view(view)) * scales.view(view)).to(dtype)


def to_hf(record: QuantizedTensor) -> dict[str, torch.Tensor]:
    return {"weight": record.tensors["weight"]}
