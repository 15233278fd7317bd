"""Integer weights one per element: compressed-tensors ``int-quantized`` (AngelSlim INT8 W8A8).

Stored per quantized Linear: ``weight`` [out, in] holding integers (I8; AngelSlim v0.1/v0.2 saved
the same integers in the model dtype, BF16, which we keep as is after checking they are integers in
range), ``weight_scale`` (per channel [out, 1] in the model dtype for W8A8; tensor, group and block
layouts are read too), optional ``weight_zero_point`` (asymmetric), ``weight_g_idx`` (group
act-order) and ``input_scale`` (static activations; W8A8 dynamic per-token has none).

Dequantization: ``W = (q - zero_point) * scale``, float32.
"""

from __future__ import annotations

from typing import Any

import torch

from llm_workbook.formats.base import AffineWeight, QuantizedTensor, Row, StoreError, TensorInfo, UnsupportedFormatError, is_ignored
from llm_workbook.formats.compressed_tensors import (
    affine_dequantize,
    ct_affine,
    CT_METHOD,
    FLOAT_CODES,
    INT_CODES,
    activation_kind,
    check_ct_extras,
    check_grid_shape,
    check_layout_args,
    ct_detect,
    ct_group_and_weight_args,
    ct_scheme_for,
    require_dtype,
    require_members,
    rows_for,
)

NAME = "int8"
SUFFIXES = {"weight", "weight_scale", "weight_zero_point", "weight_g_idx", "input_scale"}
# Weights saved in a float dtype that holds integer codes (AngelSlim v0.1 / v0.2 INT8).
FLOAT_WEIGHT_CODES = {"BF16", "F16", "F32"}


def _is_int_args(args: dict) -> bool:
    return args["type"] == "int" and 1 <= args["num_bits"] <= 8


def detect(qconfig: dict | None, tensors: dict[str, TensorInfo]) -> bool:
    """compressed-tensors int-quantized (or naive-quantized) configs with integer weights of <= 8 bits."""
    return ct_detect(qconfig, {"int-quantized", "naive-quantized"}, _is_int_args)


def claim(qconfig: dict | None, module: str, members: dict[str, TensorInfo]) -> set[str]:
    """A module's weight with its scale and optional zero point / g_idx / input scale; bias stays dense.

    An I8 weight without a scale is claimed too, so that ``to_rows`` reports the missing scale.
    """
    weight = members.get("weight")
    int_weight = weight is not None and weight.dtype == "I8"
    if is_ignored(qconfig, module) or not (int_weight or "weight_scale" in members):
        return set()
    if ct_scheme_for(qconfig, module) is None:
        return set()
    return SUFFIXES & set(members)


def _check_codes(name: str, weight: torch.Tensor, bits: int) -> None:
    """Integer codes within the signed range of ``bits``; float-held codes must be whole numbers."""
    low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if weight.is_floating_point():
        values = weight.to(torch.float32)
        if not bool(torch.isfinite(values).all()) or not torch.equal(values, values.round()):
            raise StoreError(
                f"tensor {name!r} ({weight.dtype}) should hold integer codes but has fractional or non-finite values"
            )
    if weight.numel() and (int(weight.min()) < low or int(weight.max()) > high):
        raise StoreError(
            f"tensor {name!r} holds values in [{int(weight.min())}, {int(weight.max())}], "
            f"outside the {bits}-bit range [{low}, {high}]"
        )


def to_rows(qconfig: dict | None, module: str, tensors: dict[str, torch.Tensor]) -> list[Row]:
    """Rows for one integer-quantized Linear; validates codes, dtypes and shapes against the config."""
    if (qconfig or {}).get("quant_method") != CT_METHOD:
        raise UnsupportedFormatError(f"{module}: quant_method {(qconfig or {}).get('quant_method')!r} is not compressed-tensors")
    group, args = ct_group_and_weight_args(qconfig, module)
    if not _is_int_args(args):
        raise StoreError(f"{module}: config group {group['name']!r} does not describe integer weights of <= 8 bits")
    require_members(module, tensors, ("weight", "weight_scale"))
    weight = tensors["weight"]
    name = f"{module}.weight"
    weight_code = require_dtype(name, weight, {"I8"} | FLOAT_WEIGHT_CODES)
    if weight.dim() != 2:
        raise StoreError(f"tensor {name!r} must be 2-D [out, in], has shape {list(weight.shape)}")
    _check_codes(name, weight, args["num_bits"])
    out, in_ = weight.shape
    layout = {"strategy": args["strategy"], "group_size": args["group_size"], "block_size": args["block_size"]}
    layout = {k: v for k, v in layout.items() if v is not None}
    check_layout_args(module, layout, in_)
    require_dtype(f"{module}.weight_scale", tensors["weight_scale"], FLOAT_CODES)
    check_grid_shape(f"{module}.weight_scale", tensors["weight_scale"], layout, out, in_)
    check_ct_extras(module, tensors, layout, out, in_, args["symmetric"], INT_CODES | FLOAT_CODES)
    params: dict[str, Any] = {
        **layout,
        "num_bits": args["num_bits"],
        "symmetric": args["symmetric"],
        "activation": activation_kind(group),
        "weight_dtype": weight_code,
        "weight_shape": [out, in_],
    }
    return rows_for(module, tensors, NAME, params)


def dequantize(record: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(q - zero_point) * scale`` in float32, scale broadcast per channel / tensor / group / block."""
    return affine_dequantize(record, "weight_scale", dtype)


def affine(record: QuantizedTensor) -> AffineWeight | None:
    zero = record.tensors.get("weight_zero_point")
    return ct_affine(record, record.tensors["weight"], 0.0 if zero is None else zero, int(record.params["num_bits"]))
