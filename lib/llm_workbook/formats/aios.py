"""AI-OS's V2 quantized rows: int8 or int2 codes with float32 scales and zero points.

One row per tensor (``PER_TENSOR``): ``<name>`` holds the codes, the V2 columns their parameters
(AI-OS: github.com/pallasting/ArrowQuant_V2, ``llm_compression/inference/arrow_quantizer.py``):

* ``int8``: one int8 per element, in the tensor's shape. ``int2``: four codes in ``[-2, 1]`` per byte,
  stored as ``code + 2``, the flattened tensor padded with zeros to a multiple of four.
* ``w = (q - zero_point) * scale`` in float32, with one (scale, zero point) per tensor
  (``quant_axis -1``), per index of ``quant_axis`` 0 or 1, or, with ``group_size > 0``, per run of
  ``group_size`` consecutive elements of the flattened tensor (the last run may be shorter).

int2 bit order: AI-OS's writer puts element 0 in the **low** bits of each byte and its loader reads it
from the **high** bits, so every int2 file AI-OS wrote reads back wrong in AI-OS. A file says which
order its rows use (``params["int2_order"]``): ``lsb`` for files AI-OS wrote, ``msb`` for ours, which
AI-OS's loader therefore reads right.

``params``: ``quant_type``, ``scales`` and ``zero_points`` (float32 arrays), ``quant_axis``,
``group_size``, ``weight_shape``, ``original_dtype`` (safetensors code), and for int2 ``int2_order``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from llm_workbook.formats.base import AffineWeight, QuantizedTensor, Row, StoreError, TensorInfo, groups_of
from llm_workbook.schema import AiosQuant

NAME = "aios"
PER_TENSOR = True
INT2_OFFSET = 2  # int2 codes [-2, 1] are stored as [0, 3]
QRANGE = {"int8": (-128, 127), "int2": (-2, 1)}
ORDERS = ("lsb", "msb")


def detect(qconfig: dict | None, tensors: dict[str, TensorInfo]) -> bool:
    return False  # AI-OS rows come from AI-OS files or our AI-OS quantizer, never from a safetensors checkpoint


def claim(qconfig: dict | None, module: str, members: dict[str, TensorInfo]) -> set[str]:
    return set()


def to_rows(qconfig: dict | None, module: str, tensors: dict[str, torch.Tensor]) -> list[Row]:
    raise NotImplementedError("AI-OS rows are made by formats.aios.encode")


# --- int2 packing ----------------------------------------------------------------------------------------


def pack_int2(codes: np.ndarray, order: str = "msb") -> np.ndarray:
    """Signed codes in [-2, 1] (any shape) -> uint8 bytes, four per byte in ``order``; the last byte is
    padded with code 0 (stored 2), as AI-OS's writer pads."""
    if order not in ORDERS:
        raise ValueError(f"int2 order must be one of {ORDERS}, got {order!r}")
    flat = np.asarray(codes, dtype=np.int8).reshape(-1)
    if flat.size and (flat.min() < -2 or flat.max() > 1):
        raise ValueError("int2 codes must lie in [-2, 1]")
    padded = np.full(-(-flat.size // 4) * 4, INT2_OFFSET, dtype=np.uint8)
    padded[: flat.size] = (flat + INT2_OFFSET).astype(np.uint8)
    quads = padded.reshape(-1, 4)
    shifts = (0, 2, 4, 6) if order == "lsb" else (6, 4, 2, 0)
    out = np.zeros(quads.shape[0], dtype=np.uint8)
    for k, shift in enumerate(shifts):
        out |= quads[:, k] << shift
    return out


def unpack_int2(packed: np.ndarray, numel: int, order: str = "msb") -> np.ndarray:
    """Inverse of :func:`pack_int2`: the first ``numel`` signed codes, flat int8."""
    if order not in ORDERS:
        raise ValueError(f"int2 order must be one of {ORDERS}, got {order!r}")
    data = np.asarray(packed, dtype=np.uint8).reshape(-1)
    shifts = (0, 2, 4, 6) if order == "lsb" else (6, 4, 2, 0)
    quads = np.stack([(data >> s) & 0x03 for s in shifts], axis=1).reshape(-1)
    return quads[:numel].astype(np.int8) - INT2_OFFSET


def code_bytes(quant_type: str, numel: int) -> int:
    """Bytes the codes of ``numel`` elements take."""
    return numel if quant_type == "int8" else -(-numel // 4)


def parameter_count(quant_type: str, shape: tuple[int, ...], quant_axis: int, group_size: int) -> int:
    """How many scales (and zero points) a tensor of ``shape`` has; ValueError for a layout AI-OS does not define."""
    numel = math.prod(shape)
    if group_size > 0:
        return -(-numel // group_size)
    if quant_axis == -1:
        return 1
    if quant_axis in (0, 1) and len(shape) > quant_axis:
        return shape[quant_axis]
    raise ValueError(f"quant_axis {quant_axis} does not fit shape {list(shape)}")


def check(name: str, quant: AiosQuant, nbytes: int | None = None) -> None:
    """One clear error when the codes' byte count or the parameters disagree with the shape and layout."""
    numel = math.prod(quant.shape)
    if quant.quant_type not in QRANGE:
        raise StoreError(f"tensor {name!r}: quant_type {quant.quant_type!r} has no codes (int8 or int2 expected)")
    if nbytes is not None and nbytes != code_bytes(quant.quant_type, numel):
        raise StoreError(f"tensor {name!r}: {nbytes} bytes of {quant.quant_type} codes for shape {list(quant.shape)} "
                         f"(expected {code_bytes(quant.quant_type, numel)})")
    try:
        expected = parameter_count(quant.quant_type, quant.shape, quant.quant_axis, quant.group_size)
    except ValueError as exc:
        raise StoreError(f"tensor {name!r}: {exc}") from None
    if quant.scales.size != expected or quant.zero_points.size != expected:
        layout = f"group_size {quant.group_size}" if quant.group_size > 0 else f"quant_axis {quant.quant_axis}"
        raise StoreError(f"tensor {name!r}: {quant.scales.size} scales and {quant.zero_points.size} zero points for "
                         f"shape {list(quant.shape)} with {layout} (expected {expected} of each)")


# --- rows and records ------------------------------------------------------------------------------------


def encode(name: str, codes: np.ndarray, quant: AiosQuant) -> Row:
    """One row holding signed codes (int8 in the tensor's shape) with their AI-OS parameters; int2 packed msb-first."""
    check(name, quant)
    if quant.quant_type == "int2":
        data = torch.from_numpy(pack_int2(codes, "msb"))
    else:
        data = torch.from_numpy(np.ascontiguousarray(codes, dtype=np.int8).reshape(quant.shape))
    params = {"weight_shape": list(quant.shape), "original_dtype": quant.original_dtype}
    if quant.quant_type == "int2":
        params["int2_order"] = "msb"
    return Row(name, data, NAME, params, aios=quant)


def quant_of(record: QuantizedTensor) -> AiosQuant:
    p = record.params
    return AiosQuant(p["quant_type"], np.asarray(p["scales"], dtype=np.float32),
                     np.asarray(p["zero_points"], dtype=np.float32), int(p["quant_axis"]), int(p["group_size"]),
                     tuple(p["weight_shape"]), p.get("original_dtype") or "F32")


def codes_of(record: QuantizedTensor) -> np.ndarray:
    """The signed codes, flat int8."""
    quant = quant_of(record)
    (stored,) = (t.contiguous().numpy() for t in record.tensors.values())
    check(record.layer_name, quant, stored.nbytes)
    if quant.quant_type == "int2":
        return unpack_int2(stored, math.prod(quant.shape), record.params.get("int2_order", "lsb"))
    return stored.reshape(-1).view(np.int8)


def dequantize_codes(codes: np.ndarray, quant: AiosQuant) -> np.ndarray:
    """``(q - zero_point) * scale`` in float32 with AI-OS's layouts; ``codes`` flat int8."""
    q = codes.astype(np.float32)
    if quant.group_size > 0:
        index = np.arange(q.size) // quant.group_size
        return ((q - quant.zero_points[index]) * quant.scales[index]).reshape(quant.shape)
    q = q.reshape(quant.shape)
    if quant.quant_axis == -1:
        return (q - quant.zero_points[0]) * quant.scales[0]
    view = [1] * len(quant.shape)
    view[quant.quant_axis] = -1
    return (q - quant.zero_points.reshape(view)) * quant.scales.reshape(view)


def dequantize(record: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    weight = dequantize_codes(codes_of(record), quant_of(record))
    return torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32)).to(dtype)


def affine(record: QuantizedTensor) -> AffineWeight | None:
    """A 2-D row per output channel (quant_axis 0), per tensor, or in groups that never cross a row."""
    quant = quant_of(record)
    if len(quant.shape) != 2:
        return None
    out, in_ = quant.shape
    codes = torch.from_numpy(codes_of(record).astype(np.int32)).reshape(out, in_)
    scales, zeros = (torch.from_numpy(np.array(a, dtype=np.float32)) for a in (quant.scales, quant.zero_points))
    if quant.group_size > 0:
        if in_ % quant.group_size:
            return None
        shape, g_idx = (out, in_ // quant.group_size), groups_of(in_, quant.group_size)
    elif quant.quant_axis == 0:
        shape, g_idx = (out, 1), groups_of(in_, -1)
    elif quant.quant_axis == -1:
        scales, zeros = scales.expand(out), zeros.expand(out)
        shape, g_idx = (out, 1), groups_of(in_, -1)
    else:
        return None
    bits = 2 if quant.quant_type == "int2" else 8
    return AffineWeight(codes, scales.reshape(shape).contiguous(), zeros.reshape(shape).contiguous(), g_idx, bits)


def to_hf(record: QuantizedTensor) -> dict[str, torch.Tensor]:
    # AI-OS's codes have no safetensors form a loader understands: export writes the float32 weight.
    return {"weight": dequantize(record)}
