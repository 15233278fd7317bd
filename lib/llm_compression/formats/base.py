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

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from llm_compression.errors import StoreError, UnsupportedFormatError  # noqa: F401 - re-exported for the formats

# Keys under which quantization_configs list modules left unquantized: compressed-tensors (`ignore`),
# AngelSlim v0.1 / vLLM fp8 (`ignored_layers`), transformers GPTQ/AWQ (`modules_to_not_convert`),
# ModelOpt (`exclude_modules`).
IGNORE_KEYS = ("ignore", "ignored_layers", "modules_to_not_convert", "exclude_modules")


def ignore_entries(qconfig: dict | None) -> list[str]:
    """Every ignore-list entry of a quantization_config, whichever key spells it."""
    entries: list[str] = []
    for key in IGNORE_KEYS:
        value = (qconfig or {}).get(key)
        if isinstance(value, str):
            entries.append(value)
        elif isinstance(value, (list, tuple)):
            entries.extend(str(v) for v in value)
    return entries


def entry_matches(entry: str, module: str) -> bool:
    """Does one ignore/target entry name ``module``?"""
    if entry.startswith("re:"):  # compressed-tensors regex: re.match from the start of the name
        return re.match(entry[3:], module) is not None
    if any(ch in entry for ch in "*?["):  # ModelOpt wildcards
        return fnmatch.fnmatchcase(module, entry)
    # whole dotted path segments: the exact name, a suffix ("lm_head", "mlp.gate"), a parent module
    return f".{entry}." in f".{module}."


def is_ignored(qconfig: dict | None, module: str) -> bool:
    """Does any ignore list of the config name this module (left dense)?"""
    return any(entry_matches(entry, module) for entry in ignore_entries(qconfig))


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
        from llm_compression.formats import get_format

        return get_format(self.format).dequantize(self, dtype)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def module_params(record: QuantizedTensor, key: str, default: Any = None) -> Any:
    return record.params.get(key, default)
