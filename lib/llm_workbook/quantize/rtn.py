"""Round-to-nearest (RTN) weight quantization and the code container every method here shares.

Conventions (GPTQ-style, shared by every method here)
-----------------------------------------------------
A quantized Linear weight ``W [out, in]`` is stored as unsigned integer ``codes [out, in]`` in
``[0, 2**bits - 1]``, one float32 ``scale`` and one integer ``zero`` per (output row, group), and
``g_idx [in]`` telling which group each input column belongs to.  The weight is recovered as::

    W ~= scales[:, g_idx] * (codes - zeros[:, g_idx])

* Symmetric: ``scale = absmax / (2**(bits-1) - 1)`` and ``zero = 2**(bits-1)``.  For INT8 per channel
  this is exactly the old default: ``scale = absmax / 127`` per output row, ``q = round(w / scale)``
  in ``[-127, 127]``, stored as ``code = q + 128``.  RTN therefore only produces codes in
  ``[1, 2**bits - 1]``; GPTQ may also use code 0 (``-2**(bits-1)``) because error compensation can
  push a column slightly past the group's absmax.  INT2 symmetric is ternary ({-1, 0, 1} * scale).
* Asymmetric: the range ``[min(w_min, 0), max(w_max, 0)]`` (widened to contain 0 so the zero point is
  exactly representable and lies in range) gives ``scale = (max - min) / (2**bits - 1)`` and
  ``zero = clamp(round(-min / scale), 0, 2**bits - 1)``.
* A group whose values are all zero gets ``scale = 1`` and codes equal to ``zero`` (dequantizes to 0).
* Rounding is ``torch.round`` (half to even).
* ``group_size = -1`` means per channel: one group spanning all ``in`` columns.  ``in % group_size != 0``
  is supported: the last group is simply narrower.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from llm_workbook.formats._codec import trivial_g_idx

DEFAULT_SKIP: tuple[str, ...] = ("lm_head", "embed")
RTN_METHODS: dict[str, int] = {"int8": 8, "int4": 4, "int2": 2}
MIN_BITS, MAX_BITS = 2, 8


# --------------------------------------------------------------------------------------------------
# Container
# --------------------------------------------------------------------------------------------------


@dataclass
class QuantizedLinear:
    """Codes and parameters of one quantized Linear weight (GPTQ convention, see module docstring).

    ``codes`` is uint8 ``[out, in]`` in original column order, ``scales`` float32 ``[out, n_groups]``,
    ``zeros`` int32 ``[out, n_groups]`` (unsigned zero point), ``g_idx`` int32 ``[in]``.  ``perm`` is the
    act-order processing order used by GPTQ (informational only: codes are already un-permuted).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int
    symmetric: bool
    g_idx: torch.Tensor
    perm: torch.Tensor | None = None
    method: str = field(default="rtn")

    def __post_init__(self) -> None:
        if self.codes.dim() != 2:
            raise ValueError(f"QuantizedLinear.codes must be 2-D [out, in], got shape {tuple(self.codes.shape)}")
        out_features, in_features = self.codes.shape
        if self.scales.dim() != 2 or self.scales.shape[0] != out_features:
            raise ValueError(f"QuantizedLinear.scales must be [{out_features}, n_groups], got {tuple(self.scales.shape)}")
        if self.zeros.shape != self.scales.shape:
            raise ValueError(f"QuantizedLinear.zeros shape {tuple(self.zeros.shape)} != scales shape {tuple(self.scales.shape)}")
        if self.g_idx.shape != (in_features,):
            raise ValueError(f"QuantizedLinear.g_idx must be [{in_features}], got {tuple(self.g_idx.shape)}")
        if in_features and (int(self.g_idx.min()) < 0 or int(self.g_idx.max()) >= self.scales.shape[1]):
            raise ValueError("QuantizedLinear.g_idx points outside [0, n_groups)")

    @property
    def out_features(self) -> int:
        return int(self.codes.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.codes.shape[1])

    @property
    def n_groups(self) -> int:
        return int(self.scales.shape[1])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight ``[out, in]``: ``scales[:, g_idx] * (codes - zeros[:, g_idx])`` in float32, then cast."""
        g_idx = self.g_idx.long()
        scales = self.scales.to(torch.float32)[:, g_idx]
        zeros = self.zeros.to(torch.float32)[:, g_idx]
        return (scales * (self.codes.to(torch.float32) - zeros)).to(dtype)


# --------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------


def check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an int in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")


def check_group_size(group_size: int) -> None:
    if not isinstance(group_size, int) or (group_size != -1 and group_size < 1):
        raise ValueError(f"group_size must be -1 (per channel) or a positive int, got {group_size!r}")


def check_weight(weight: torch.Tensor, name: str) -> None:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"{name}: expected a 2-D weight [out, in], got {shape}")
    if not weight.is_floating_point():
        raise ValueError(f"{name}: expected a floating point weight, got {weight.dtype}")
    if weight.numel() == 0:
        raise ValueError(f"{name}: weight is empty {tuple(weight.shape)}")
    finite = torch.isfinite(weight)
    if not bool(finite.all()):
        n_nan = int(torch.isnan(weight).sum())
        n_inf = int((~finite).sum()) - n_nan
        raise ValueError(f"{name}: weight contains non-finite values ({n_nan} NaN, {n_inf} inf)")


def max_code(bits: int) -> int:
    return 2**bits - 1


def group_params(values: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and unsigned zero point along the last dim of float32 ``values`` (any leading shape)."""
    if symmetric:
        absmax = values.abs().amax(dim=-1)
        scale = absmax / (2 ** (bits - 1) - 1)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.full_like(scale, 2 ** (bits - 1))
        return scale, zero
    # Widen the range to contain 0 so that the zero point is an in-range integer.
    low = values.amin(dim=-1).clamp(max=0.0)
    high = values.amax(dim=-1).clamp(min=0.0)
    scale = (high - low) / max_code(bits)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-low / scale).clamp(0, max_code(bits))
    return scale, zero


def quantize_values(values: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes (as float) of ``values`` with broadcastable ``scale``/``zero``."""
    return torch.clamp(torch.round(values / scale) + zero, 0, max_code(bits))


# --------------------------------------------------------------------------------------------------
# Round to nearest
# --------------------------------------------------------------------------------------------------


def quantize_rtn(
    weight: torch.Tensor,
    bits: int,
    group_size: int = -1,
    symmetric: bool = True,
    name: str = "weight",
) -> QuantizedLinear:
    """Round-to-nearest quantization of a Linear weight ``[out, in]`` (conventions in the module docstring).

    ``name`` only labels error messages.  Raises ValueError on non-finite weights or bad options.
    """
    check_bits(bits)
    check_group_size(group_size)
    check_weight(weight, name)
    w = weight.detach().to(torch.float32)
    out_features, in_features = w.shape
    size = in_features if group_size == -1 else group_size
    n_groups = math.ceil(in_features / size)
    # Zero padding never changes a group's parameters: both conventions include 0 in the range.
    padded = torch.nn.functional.pad(w, (0, n_groups * size - in_features)).view(out_features, n_groups, size)
    scale, zero = group_params(padded, bits, symmetric)
    codes = quantize_values(padded, scale.unsqueeze(-1), zero.unsqueeze(-1), bits)
    codes = codes.view(out_features, n_groups * size)[:, :in_features]
    return QuantizedLinear(
        codes=codes.to(torch.uint8),
        scales=scale.to(torch.float32),
        zeros=zero.to(torch.int32),
        bits=bits,
        group_size=group_size,
        symmetric=symmetric,
        g_idx=trivial_g_idx(in_features, group_size),
        method="rtn",
    )
