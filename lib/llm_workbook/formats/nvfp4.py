"""NVFP4 weights (E2M1 codes, FP8 E4M3 scales per 16 inputs, one float32 global scale), two layouts.

* ``modelopt`` (AngelSlim ``nvfp4`` PTQ, under a misleading compressed-tensors ``naive-quantized``
  config with 4-bit float weights, group_size 16, no strategy; also ``quant_method`` ``nvfp4`` or
  ``modelopt``): ``weight`` U8 [out, in/2], ``weight_scale`` F8_E4M3 [out, in/16], ``weight_scale_2``
  F32 scalar = amax/(6*448), optional ``input_scale``.
  ``W = e2m1(code) * float(weight_scale) * weight_scale_2``.
* ``compressed-tensors`` (``format: nvfp4-pack-quantized``): ``weight_packed`` U8 [out, in/2],
  ``weight_scale`` F8_E4M3 [out, in/16], ``weight_global_scale`` F32 [1] = 448*6/amax (the reciprocal
  convention), optional ``input_global_scale``.
  ``W = e2m1(code) * (float(weight_scale) / weight_global_scale)``.

Both pack two codes per byte, the even input index in the low nibble; a code is ``sign << 3 | index``
into {0, 0.5, 1, 1.5, 2, 3, 4, 6}. Which layout a module uses is read from its tensor names.
"""

from __future__ import annotations

from typing import Any

import torch

from llm_workbook.formats import _bitpack
from llm_workbook.formats.base import QuantizedTensor, Row, StoreError, TensorInfo, UnsupportedFormatError, is_ignored
from llm_workbook.formats._codec import E2M1_VALUES
from llm_workbook.formats.compressed_tensors import (
    CT_METHOD,
    ct_detect,
    ct_group_and_weight_args,
    ct_scheme_for,
    record_shape,
    require_dtype,
    require_members,
    require_scalar,
    rows_for,
)

NAME = "nvfp4"
MODELOPT = "modelopt"
COMPRESSED = CT_METHOD
DEFAULT_GROUP = 16
# suffix of the packed codes and of the global scale, per layout
LAYOUT_TENSORS = {MODELOPT: ("weight", "weight_scale_2"), COMPRESSED: ("weight_packed", "weight_global_scale")}
SUFFIXES = {
    MODELOPT: {"weight", "weight_scale", "weight_scale_2", "input_scale"},
    COMPRESSED: {"weight_packed", "weight_scale", "weight_global_scale", "input_global_scale"},
}


def _is_fp4_args(args: dict) -> bool:
    return args["type"] == "float" and args["num_bits"] == 4


def _quant_algo(qconfig: dict) -> str | None:
    nested = qconfig.get("quantization")
    algo = qconfig.get("quant_algo") or (nested.get("quant_algo") if isinstance(nested, dict) else None)
    return str(algo).upper() if algo else None


def _has_suffix(tensors: dict[str, TensorInfo], suffix: str) -> bool:
    return any(name.endswith("." + suffix) for name in tensors)


def detect(qconfig: dict | None, tensors: dict[str, TensorInfo]) -> bool:
    """compressed-tensors nvfp4-pack-quantized; AngelSlim's naive-quantized 4-bit float config with
    ModelOpt tensors (``weight_scale_2``); ``quant_method`` nvfp4 / modelopt NVFP4."""
    if not isinstance(qconfig, dict):
        return False
    method = qconfig.get("quant_method")
    ours = _has_suffix(tensors, "weight_scale_2") or _has_suffix(tensors, "weight_global_scale")
    if method == "nvfp4" or (method == MODELOPT and _quant_algo(qconfig) == "NVFP4"):
        return ours
    if ct_detect(qconfig, {"nvfp4-pack-quantized"}, _is_fp4_args):
        return True
    # AngelSlim: config says naive-quantized 4-bit float, tensors are ModelOpt's
    return ct_detect(qconfig, {"naive-quantized", "float-quantized"}, _is_fp4_args) and ours


def _layout_of(members) -> str | None:
    if "weight_packed" in members or "weight_global_scale" in members:
        return COMPRESSED
    if "weight_scale_2" in members:
        return MODELOPT
    return None


def claim(qconfig: dict | None, module: str, members: dict[str, TensorInfo]) -> set[str]:
    """The module's codes and scales in whichever layout its tensor names show; bias stays dense."""
    layout = _layout_of(members)
    if layout is None or is_ignored(qconfig, module):
        return set()
    if (qconfig or {}).get("quant_method") == CT_METHOD and ct_scheme_for(qconfig, module) is None:
        return set()
    return SUFFIXES[layout] & set(members)


def _group_size(qconfig: dict, module: str) -> int:
    if qconfig.get("quant_method") == CT_METHOD:
        group, args = ct_group_and_weight_args(qconfig, module)
        if not _is_fp4_args(args):
            raise StoreError(f"{module}: config group {group['name']!r} does not describe 4-bit float weights")
        if not args["symmetric"]:
            raise UnsupportedFormatError(f"{module}: asymmetric FP4 weights are not supported")
        size = group["weights"].get("group_size", DEFAULT_GROUP)
    else:
        nested = qconfig.get("quantization") if isinstance(qconfig.get("quantization"), dict) else {}
        size = qconfig.get("group_size", nested.get("group_size", DEFAULT_GROUP))
    if not isinstance(size, int) or size <= 0 or size % 2:
        raise StoreError(f"{module}: NVFP4 group_size must be a positive even integer, got {size!r}")
    return size


def to_rows(qconfig: dict | None, module: str, tensors: dict[str, torch.Tensor]) -> list[Row]:
    """Rows for one NVFP4 Linear; validates dtypes and shapes of codes and scales."""
    qconfig = qconfig or {}
    layout = _layout_of(tensors)
    if layout is None:
        raise StoreError(
            f"{module}: no tensor {module}.weight_scale_2 (ModelOpt layout) or {module}.weight_packed / "
            f"{module}.weight_global_scale (compressed-tensors layout)"
        )
    extra = set(tensors) - SUFFIXES[layout]
    if extra:
        raise StoreError(f"{module}: tensors {sorted(f'{module}.{s}' for s in extra)} do not belong to the {layout} NVFP4 layout")
    codes_name, global_name = LAYOUT_TENSORS[layout]
    require_members(module, tensors, (codes_name, "weight_scale", global_name))
    group_size = _group_size(qconfig, module)
    codes = tensors[codes_name]
    require_dtype(f"{module}.{codes_name}", codes, {"U8"})
    if codes.dim() != 2:
        raise StoreError(f"tensor {module + '.' + codes_name!r} must be 2-D [out, in/2], has shape {list(codes.shape)}")
    out, in_ = codes.shape[0], 2 * codes.shape[1]
    if in_ % group_size:
        raise StoreError(f"{module}: {in_} input features are not a multiple of the group size {group_size}")
    scale = tensors["weight_scale"]
    require_dtype(f"{module}.weight_scale", scale, {"F8_E4M3"})
    if list(scale.shape) != [out, in_ // group_size]:
        raise StoreError(
            f"tensor {module + '.weight_scale'!r} has shape {list(scale.shape)}, expected [{out}, {in_ // group_size}] "
            f"(one scale per {group_size} inputs of a [{out}, {in_}] weight)"
        )
    require_scalar(f"{module}.{global_name}", tensors[global_name])
    for name in ("input_scale", "input_global_scale"):
        if name in tensors:
            require_scalar(f"{module}.{name}", tensors[name])
    params: dict[str, Any] = {"layout": layout, "group_size": group_size, "weight_shape": [out, in_]}
    return rows_for(module, tensors, NAME, params)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """[rows, n/2] bytes -> [rows, n] float32 E2M1 values (low nibble = even index, bit 3 = sign)."""
    nibbles = _bitpack.unpack(packed, 4, 2 * packed.shape[-1]).long()
    magnitude = torch.tensor(E2M1_VALUES, dtype=torch.float32)[nibbles & 0x7]
    return torch.where((nibbles & 0x8).bool(), -magnitude, magnitude)


def dequantize(record: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """E2M1 value times its group's FP8 scale times the global scale (ModelOpt) or over it (compressed-tensors)."""
    out, in_ = record_shape(record)
    layout = record.params.get("layout")
    if layout not in LAYOUT_TENSORS:
        raise StoreError(f"{record.layer_name}: unknown NVFP4 layout {layout!r}")
    codes_name, global_name = LAYOUT_TENSORS[layout]
    group_size = int(record.params["group_size"])
    values = unpack_e2m1(record.tensors[codes_name])
    if tuple(values.shape) != (out, in_):
        raise StoreError(f"{record.layer_name}.{codes_name}: unpacks to {list(values.shape)}, not {[out, in_]}")
    scale = record.tensors["weight_scale"].to(torch.float32).repeat_interleave(group_size, dim=1)
    global_scale = record.tensors[global_name].to(torch.float32).reshape(())
    if layout == MODELOPT:
        weight = values * scale * global_scale
    else:
        weight = values * (scale / global_scale)  # the order compressed-tensors uses
    return weight.to(dtype)

