"""What every format module shares: the row and record types, and the errors.

A format module (one file per source format) exposes the same verbs:

* ``NAME``: the format's name, stored in each row's ``format`` column.
* ``detect(qconfig, tensors) -> bool``: does this checkpoint (its quantization_config and the
  ``{name: TensorInfo}`` of all tensors) use this format?
* ``claim(qconfig, module, members) -> set[str]``: which tensors of one module (``members`` maps
  suffix -> TensorInfo, e.g. ``{"qweight": ..., "scales": ..., "bias": ...}``) form a quantized
  group of this format; the rest of the module is stored dense. Empty set: not quantized.
* ``to_rows(qconfig, module, tensors) -> list[Row]``: the claimed tensors (suffix -> tensor) as
  stored rows, codes and parameters untouched.
* ``dequantize(record, dtype) -> torch.Tensor``: the float weight, shaped like ``nn.Linear.weight``.
* ``to_hf(record) -> dict[suffix, torch.Tensor]``: the exact source tensors back, for export.
* optional ``hf_names(params, stored_names) -> list[suffix]``: the suffixes ``to_hf`` returns,
  when they differ from the stored rows' names (encoders such as ``grid``).
* optional ``encode_dense(name, tensor) -> list[Row] | None``: for encoders registered in
  ``_DENSE_ENCODERS``: rows that restore ``tensor`` bit-exactly, or None to store it dense.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


class StoreError(ValueError):
    """Bad input or a broken file; the message names the file and the tensor."""


class UnsupportedFormatError(StoreError):
    """A checkpoint or tensor whose quantization format we do not read."""


@dataclass(frozen=True)
class TensorInfo:
    """A tensor known only by its header: enough to plan a conversion without reading data."""

    name: str
    dtype: str  # safetensors dtype code
    shape: tuple[int, ...]


@dataclass
class Row:
    """One array to store. ``data`` is kept bit for bit; ``params`` travels as JSON."""

    tensor_name: str
    data: torch.Tensor
    format: str
    params: dict[str, Any] = field(default_factory=dict)
    # V2 legacy columns, filled only where an old reader would understand the row.
    quant_type: str | None = None
    scales: list[float] | None = None
    zero_points: list[int] | None = None
    quant_axis: int | None = None


@dataclass
class QuantizedTensor:
    """A quantized weight as stored: its arrays (by weight name) and parameters.

    ``load_weight(..., dequantize=False)`` returns this for kernels that want the codes.
    """

    format: str
    layer_name: str
    tensors: dict[str, torch.Tensor]
    params: dict[str, Any]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        from . import get_format

        return get_format(self.format).dequantize(self, dtype)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def module_params(record: QuantizedTensor, key: str, default: Any = None) -> Any:
    return record.params.get(key, default)
