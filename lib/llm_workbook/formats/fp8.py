"""8-bit float weights: compressed-tensors naive/float-quantized, and ``quant_method: fp8``.

Stored per quantized Linear (source tensors unchanged):

* compressed-tensors (``format`` naive-quantized or float-quantized, 8-bit ``float`` weights):
  ``weight`` F8 [out, in], ``weight_scale`` (tensor [1], channel [out, 1] or AngelSlim's squeezed
  [out], group [out, in/gs], block [ceil(out/b0), ceil(in/b1)]), optional ``weight_zero_point``
  (asymmetric), ``input_scale`` (static activations).
* ``quant_method: fp8`` (vLLM / DeepSeek-V3 / transformers FineGrainedFP8): ``weight`` F8 with
  ``weight_scale`` (per tensor, or per channel) or, with ``weight_block_size``,
  ``weight_scale_inv`` [ceil(out/b0), ceil(in/b1)] (1-D when AngelSlim squeezed a single block row
  or column), optional ``input_scale``.

Dequantization: ``W = (q - zero_point) * scale`` with the scale broadcast over its tensor, row,
group or block (``weight_scale_inv`` is a multiplier despite its name), computed in float32.

The compressed-tensors helpers it shares with ``int8``, ``packed`` and ``nvfp4`` live in ``compressed_tensors``.
"""

from __future__ import annotations

from typing import Any

import torch

from llm_workbook.formats.base import QuantizedTensor, Row, StoreError, TensorInfo, UnsupportedFormatError, is_ignored
from llm_workbook.formats.compressed_tensors import (
    CT_METHOD,
    FLOAT_CODES,
    FP8_CODES,
    activation_kind,
    affine_dequantize,
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

NAME = "fp8"

# ============================================================================================
# The fp8 format
# ============================================================================================

FP8_SUFFIXES = {"weight", "weight_scale", "weight_scale_inv", "weight_zero_point", "weight_g_idx", "input_scale"}
SCALE_SUFFIXES = ("weight_scale", "weight_scale_inv")


def _is_fp8_args(args: dict) -> bool:
    return args["type"] == "float" and args["num_bits"] == 8


def detect(qconfig: dict | None, tensors: dict[str, TensorInfo]) -> bool:
    """compressed-tensors naive/float-quantized configs with 8-bit float weights, or ``quant_method: fp8``."""
    if not isinstance(qconfig, dict):
        return False
    if qconfig.get("quant_method") == "fp8":
        return True
    return ct_detect(qconfig, {"naive-quantized", "float-quantized"}, _is_fp8_args)


def claim(qconfig: dict | None, module: str, members: dict[str, TensorInfo]) -> set[str]:
    """A module's weight and its scales (bias stays dense); nothing for ignored or plain-float modules.

    An FP8 weight without a scale is claimed too, so that ``to_rows`` reports the missing scale.
    """
    weight = members.get("weight")
    fp8_weight = weight is not None and weight.dtype in FP8_CODES
    if is_ignored(qconfig, module) or not (fp8_weight or any(s in members for s in SCALE_SUFFIXES)):
        return set()
    if (qconfig or {}).get("quant_method") == CT_METHOD and ct_scheme_for(qconfig, module) is None:
        return set()
    return FP8_SUFFIXES & set(members)


def _fp8_method_layout(qconfig: dict, module: str, tensors: dict[str, torch.Tensor]) -> dict:
    """Layout of a ``quant_method: fp8`` group, from its scale tensor and ``weight_block_size``."""
    if "weight_scale" in tensors and "weight_scale_inv" in tensors:
        raise StoreError(f"{module}: has both weight_scale and weight_scale_inv; expected one")
    if "weight_scale" not in tensors and "weight_scale_inv" not in tensors:
        raise StoreError(f"{module}: FP8 weight without a scale (no tensor {module}.weight_scale or {module}.weight_scale_inv)")
    block = qconfig.get("weight_block_size")
    if "weight_scale_inv" in tensors:
        name = "weight_scale_inv"
        if block is not None:
            if not (isinstance(block, list) and len(block) == 2):
                raise StoreError(f"{module}: weight_block_size must be [rows, cols], got {block!r}")
            return {"strategy": "block", "block_size": [int(b) for b in block], "scale_name": name}
        # transformers' FineGrainedFP8 writes a per-tensor weight_scale_inv when weight_block_size is None
        return {"strategy": "tensor", "scale_name": name}
    scale = tensors["weight_scale"]
    # vLLM fp8: per tensor; AngelSlim's per-channel observer keeps [out] (or [out, 1])
    strategy = "tensor" if scale.numel() == 1 else "channel"
    return {"strategy": strategy, "scale_name": "weight_scale"}


def to_rows(qconfig: dict | None, module: str, tensors: dict[str, torch.Tensor]) -> list[Row]:
    """Rows for one FP8 Linear; validates dtypes and shapes against the config."""
    qconfig = qconfig or {}
    require_members(module, tensors, ("weight",))
    weight = tensors["weight"]
    require_dtype(f"{module}.weight", weight, FP8_CODES)
    if weight.dim() != 2:
        raise StoreError(f"tensor {module + '.weight'!r} must be 2-D [out, in], has shape {list(weight.shape)}")
    out, in_ = weight.shape
    if qconfig.get("quant_method") == "fp8":
        layout = _fp8_method_layout(qconfig, module, tensors)
        params: dict[str, Any] = {"source": "fp8", "symmetric": True, "activation": qconfig.get("activation_scheme")}
    elif qconfig.get("quant_method") == CT_METHOD:
        group, args = ct_group_and_weight_args(qconfig, module)
        if not _is_fp8_args(args):
            raise StoreError(f"{module}: config group {group['name']!r} does not describe 8-bit float weights")
        if "weight_scale_inv" in tensors:
            raise StoreError(f"{module}: compressed-tensors names its scale weight_scale, found weight_scale_inv")
        layout = {"strategy": args["strategy"], "group_size": args["group_size"], "block_size": args["block_size"],
                  "scale_name": "weight_scale"}
        params = {"source": CT_METHOD, "symmetric": args["symmetric"], "activation": activation_kind(group)}
    else:
        raise UnsupportedFormatError(f"{module}: quant_method {qconfig.get('quant_method')!r} is not an fp8 format")
    layout = {k: v for k, v in layout.items() if v is not None}
    check_layout_args(module, layout, in_)
    scale_name = layout["scale_name"]
    require_members(module, tensors, (scale_name,))
    require_dtype(f"{module}.{scale_name}", tensors[scale_name], FLOAT_CODES)
    check_grid_shape(f"{module}.{scale_name}", tensors[scale_name], layout, out, in_)
    check_ct_extras(module, tensors, layout, out, in_, params["symmetric"], FP8_CODES | FLOAT_CODES)
    params.update(layout)
    params["weight_shape"] = [out, in_]
    return rows_for(module, tensors, NAME, params)


def dequantize(record: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(q - zero_point) * scale`` in float32, scale broadcast per tensor / channel / group / block."""
    return affine_dequantize(record, record.params["scale_name"], dtype)
