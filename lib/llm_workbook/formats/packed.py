"""compressed-tensors ``pack-quantized``: integer codes packed into int32 words (W4A16, W8A16, ...).

Stored per quantized Linear:

* ``weight_packed`` I32 [out, in*bits/32]: the signed codes offset by 2^(bits-1) to unsigned and packed
  along the input dim, least significant bits first (element k of a word at bits k*bits);
* ``weight_shape`` [2] = [out, in];
* ``weight_scale`` [out, in/gs] (group), [out, 1] (channel) or [1] (tensor), in the model dtype;
* ``weight_zero_point`` (asymmetric only) I32, its unsigned codes packed the same way but along the
  **output** dim: [ceil(out*bits/32), in/gs];
* optional ``weight_g_idx`` I32 [in] (act-order "group": column i uses group g_idx[i]).

Dequantization: ``W = (u - zero) * scale``, with ``u`` the unsigned code and ``zero`` = 2^(bits-1)
(symmetric) or the unpacked unsigned zero point.

Only bit widths that divide 32 (1, 2, 4, 8) are read: for them every compressed-tensors version
packs identically; for 3/5/6/7 bits older versions wasted the high bits of each word while 0.20
packs densely, and a checkpoint does not say which one it used.
"""

from __future__ import annotations

from typing import Any

import torch

from llm_workbook.formats import _bitpack
from llm_workbook.formats.base import AffineWeight, QuantizedTensor, Row, StoreError, TensorInfo, UnsupportedFormatError, is_ignored
from llm_workbook.formats.compressed_tensors import (
    ct_affine,
    CT_METHOD,
    FLOAT_CODES,
    check_ct_extras,
    check_grid_shape,
    check_layout_args,
    ct_detect,
    ct_group_and_weight_args,
    ct_scheme_for,
    expand_grid,
    record_shape,
    require_dtype,
    require_members,
    rows_for,
    scale_grid,
)

NAME = "packed"
SUFFIXES = {"weight_packed", "weight_shape", "weight_scale", "weight_zero_point", "weight_g_idx", "input_scale"}
SUPPORTED_BITS = (1, 2, 4, 8)
# Zero points are packed only for these strategies; for the others they stay one value per element.
PACKED_ZP_STRATEGIES = ("group", "channel")


def _is_packable_args(args: dict) -> bool:
    return args["type"] == "int" and 1 <= args["num_bits"] <= 8


def detect(qconfig: dict | None, tensors: dict[str, TensorInfo]) -> bool:
    """compressed-tensors configs whose weight groups are all ``pack-quantized`` integers."""
    return ct_detect(qconfig, {"pack-quantized"}, _is_packable_args)


def claim(qconfig: dict | None, module: str, members: dict[str, TensorInfo]) -> set[str]:
    """A module's packed weight and its companions; bias stays dense."""
    if is_ignored(qconfig, module) or "weight_packed" not in members or ct_scheme_for(qconfig, module) is None:
        return set()
    return SUFFIXES & set(members)


def packed_width(count: int, bits: int) -> int:
    """int32 words holding ``count`` codes of ``bits`` bits."""
    return _bitpack.words_for(count, bits, 32)


def unpack_int32(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Unsigned codes (int32) from words packed along the last dim, LSB first; ``count`` codes per row."""
    return _bitpack.unpack(packed.to(torch.int32), bits, count, 32)


def _weight_shape(module: str, tensor: torch.Tensor) -> tuple[int, int]:
    name = f"{module}.weight_shape"
    require_dtype(name, tensor, {"I32", "I64"})
    if tensor.numel() != 2:
        raise StoreError(f"tensor {name!r} must hold [out, in], has shape {list(tensor.shape)}")
    out, in_ = (int(v) for v in tensor.reshape(-1).tolist())
    if out <= 0 or in_ <= 0:
        raise StoreError(f"tensor {name!r} holds a non-positive shape [{out}, {in_}]")
    return out, in_


def to_rows(qconfig: dict | None, module: str, tensors: dict[str, torch.Tensor]) -> list[Row]:
    """Rows for one pack-quantized Linear; validates packing, dtypes and shapes against the config."""
    if (qconfig or {}).get("quant_method") != CT_METHOD:
        raise UnsupportedFormatError(f"{module}: quant_method {(qconfig or {}).get('quant_method')!r} is not compressed-tensors")
    group, args = ct_group_and_weight_args(qconfig, module)
    bits = args["num_bits"]
    if not _is_packable_args(args):
        raise StoreError(f"{module}: config group {group['name']!r} does not describe integer weights of <= 8 bits")
    if bits not in SUPPORTED_BITS:
        raise UnsupportedFormatError(
            f"{module}: pack-quantized {bits}-bit weights are not supported (packing differs between "
            f"compressed-tensors versions); supported bits: {list(SUPPORTED_BITS)}"
        )
    require_members(module, tensors, ("weight_packed", "weight_shape", "weight_scale"))
    out, in_ = _weight_shape(module, tensors["weight_shape"])
    packed = tensors["weight_packed"]
    name = f"{module}.weight_packed"
    require_dtype(name, packed, {"I32"})
    if list(packed.shape) != [out, packed_width(in_, bits)]:
        raise StoreError(
            f"tensor {name!r} has shape {list(packed.shape)}, expected [{out}, {packed_width(in_, bits)}] "
            f"for a [{out}, {in_}] weight of {bits}-bit codes"
        )
    layout = {"strategy": args["strategy"], "group_size": args["group_size"], "block_size": args["block_size"]}
    layout = {k: v for k, v in layout.items() if v is not None}
    check_layout_args(module, layout, in_)
    require_dtype(f"{module}.weight_scale", tensors["weight_scale"], FLOAT_CODES)
    check_grid_shape(f"{module}.weight_scale", tensors["weight_scale"], layout, out, in_)
    zp_packed = "weight_zero_point" in tensors and args["strategy"] in PACKED_ZP_STRATEGIES
    check_ct_extras(module, tensors, layout, out, in_, args["symmetric"],
                    None if zp_packed else {"I8", "I32", "I64"} | FLOAT_CODES)
    if zp_packed:  # checked here: packed along the output dim, unlike every other grid
        zp_name, zp = f"{module}.weight_zero_point", tensors["weight_zero_point"]
        require_dtype(zp_name, zp, {"I32"})
        cols = scale_grid(layout, out, in_)[1]
        if list(zp.shape) != [packed_width(out, bits), cols]:
            raise StoreError(
                f"tensor {zp_name!r} has shape {list(zp.shape)}, expected [{packed_width(out, bits)}, {cols}] "
                f"(zero points packed along the output dim)"
            )
    params: dict[str, Any] = {
        **layout,
        "num_bits": bits,
        "symmetric": args["symmetric"],
        "zero_point_packed": zp_packed,
        "weight_shape": [out, in_],
    }
    if args["actorder"] is not None:
        params["actorder"] = args["actorder"]
    return rows_for(module, tensors, NAME, params)


def dequantize(record: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Unpack the codes, subtract the zero point (2^(bits-1) when symmetric), multiply by the scale (float32)."""
    out, in_ = record_shape(record)
    params = record.params
    bits = int(params["num_bits"])
    if bits not in SUPPORTED_BITS:
        raise UnsupportedFormatError(f"{record.layer_name}: {bits}-bit packing is not supported")
    g_idx = record.tensors.get("weight_g_idx")
    codes = unpack_int32(record.tensors["weight_packed"], bits, in_).to(torch.float32)
    if tuple(codes.shape) != (out, in_):
        raise StoreError(f"{record.layer_name}.weight_packed: unpacks to {list(codes.shape)}, not {[out, in_]}")
    zp = record.tensors.get("weight_zero_point")
    if zp is None:
        zero: torch.Tensor | float = float(1 << (bits - 1))
    elif params.get("zero_point_packed"):
        cols = scale_grid(params, out, in_)[1]
        zero_codes = unpack_int32(zp.t(), bits, out).t()  # packed along the output dim
        zero = expand_grid(zero_codes.reshape(out, cols), params, out, in_, g_idx)
    else:
        # unpacked zero points are signed like the codes: shift them to the unsigned code range
        zero = expand_grid(zp, params, out, in_, g_idx) + float(1 << (bits - 1))
    scale = expand_grid(record.tensors["weight_scale"], params, out, in_, g_idx)
    return ((codes - zero) * scale).to(dtype)


def affine(record: QuantizedTensor) -> AffineWeight | None:
    """Unsigned codes; the zero point as ``dequantize`` reads it (2^(bits-1) when symmetric)."""
    out, in_ = record_shape(record)
    bits = int(record.params["num_bits"])
    if bits not in SUPPORTED_BITS:
        return None
    codes = unpack_int32(record.tensors["weight_packed"], bits, in_)
    zp = record.tensors.get("weight_zero_point")
    if zp is None:
        zero: torch.Tensor | float = float(1 << (bits - 1))
    elif record.params.get("zero_point_packed"):
        cols = scale_grid(record.params, out, in_)[1]
        zero = unpack_int32(zp.t(), bits, out).t().reshape(out, cols)
    else:
        zero = zp.to(torch.float32) + float(1 << (bits - 1))
    return ct_affine(record, codes, zero, bits)
