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
* optional ``to_hf(record) -> dict[suffix, torch.Tensor]``: the exact source tensors back, for
  export; by default the stored arrays as they are.
* optional ``hf_names(params, stored_names) -> list[suffix]``: the suffixes ``to_hf`` returns,
  when they differ from the stored rows' names (encoders such as ``grid``).
* optional ``encode_dense(name, tensor) -> list[Row] | None``: for encoders registered in
  ``_DENSE_ENCODERS``: rows that restore ``tensor`` bit-exactly, or None to store it dense.
* optional ``PER_TENSOR = True``: every stored array dequantizes on its own (no layer groups).
* optional ``affine(record) -> AffineWeight | None``: the layer as integer codes, scales and zero points
  (``(codes - zeros) * scales`` per group), for weight-only integer kernels; None where it is no such grid.

The registry hands out each module wrapped in :class:`Format`, which checks the required verbs once
and supplies the optional ones' defaults, so no caller probes a module with ``hasattr``.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch

from llm_workbook.errors import StoreError, UnsupportedFormatError  # noqa: F401 - re-exported for the formats

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
    # AI-OS's V2 quantization of the row, when AI-OS's loader can dequantize it (schema.AiosQuant).
    aios: Any = None


@dataclass
class QuantizedTensor:
    """A quantized weight as stored: its arrays (by weight name) and parameters.

    ``load_weight(..., dequantize=False)`` returns this for kernels that want the codes.
    """

    format: str
    layer_name: str
    tensors: dict[str, torch.Tensor]
    params: dict[str, Any]

    # The registry (formats/__init__) sets this when it loads: a record finds its format without importing up.
    format_of: ClassVar[Callable[[str], "Format"]]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.format_of(self.format).dequantize(self, dtype)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


@dataclass
class AffineWeight:
    """A weight on an integer grid: ``(codes - zeros[:, g]) * scales[:, g]``, ``g = g_idx[column]``.

    What weight-only integer kernels run (``runtime.kernels``). ``zeros`` are in code units and may be
    fractional (AWQ-style float zero points become ``zero / scale``).
    """

    codes: torch.Tensor  # int32 [out, in]
    scales: torch.Tensor  # float32 [out, G]
    zeros: torch.Tensor  # float32 [out, G]
    g_idx: torch.Tensor  # int64 [in]
    bits: int

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        g = self.g_idx
        return ((self.codes.to(torch.float32) - self.zeros[:, g]) * self.scales[:, g]).to(dtype)


def groups_of(in_: int, group_size: int) -> torch.Tensor:
    """The contiguous ``g_idx`` of ``in_`` columns in groups of ``group_size`` (-1 or 0: one group)."""
    return torch.arange(in_) // (group_size if group_size > 0 else max(in_, 1))


def module_params(record: QuantizedTensor, key: str, default: Any = None) -> Any:
    return record.params.get(key, default)


REQUIRED_VERBS = ("detect", "claim", "to_rows", "dequantize")


class Format:
    """One storage format: its module's verbs, with the defaults of the optional ones (module docstring).

    Other module attributes (constants, format-specific helpers) are reachable as attributes too.
    """

    def __init__(self, module):
        missing = [verb for verb in REQUIRED_VERBS if not callable(getattr(module, verb, None))]
        if missing or not isinstance(getattr(module, "NAME", None), str):
            raise TypeError(f"format module {module.__name__} lacks {missing or ['NAME']}")
        self.module = module
        self.NAME = module.NAME
        self.per_tensor = bool(getattr(module, "PER_TENSOR", False))
        self.detect, self.claim, self.to_rows, self.dequantize = (getattr(module, v) for v in REQUIRED_VERBS)
        self._to_hf = getattr(module, "to_hf", None)
        self._hf_names = getattr(module, "hf_names", None)
        self._encode_dense = getattr(module, "encode_dense", None)
        self._affine = getattr(module, "affine", None)

    def to_hf(self, record: QuantizedTensor) -> dict[str, torch.Tensor]:
        return self._to_hf(record) if self._to_hf else dict(record.tensors)

    def hf_names(self, params: dict, stored_names: list[str]) -> list[str]:
        return self._hf_names(params, stored_names) if self._hf_names else list(stored_names)

    def encode_dense(self, name: str, tensor: torch.Tensor) -> list[Row] | None:
        return self._encode_dense(name, tensor) if self._encode_dense else None

    def affine(self, record: QuantizedTensor) -> AffineWeight | None:
        return self._affine(record) if self._affine else None

    def __getattr__(self, name: str):
        if name.startswith("__") or name == "module":  # copy/pickle probe before __init__ ran
            raise AttributeError(name)
        return getattr(self.module, name)

    def __repr__(self) -> str:
        return f"Format({self.NAME!r})"

    def __copy__(self) -> "Format":
        return self  # one per format, never changed: a model holding one deep-copies cheaply

    def __deepcopy__(self, memo: dict) -> "Format":
        return self
