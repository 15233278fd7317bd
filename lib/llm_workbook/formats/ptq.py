"""Our own PTQ storage (``llmc quantize``): a Linear's codes packed at their real bit width.

Rows of one quantized Linear ``<module>`` (``out`` x ``in`` weight, ``G`` groups, GPTQ conventions of
``llm_workbook.ptq``: unsigned codes in ``[0, 2**bits)``, one scale and one zero point per
(output row, group), ``g_idx`` mapping each input column to its group):

* ``<module>.weight``: the codes.

  - ``code_storage = "packed"`` (every case but the one below): uint8 ``[out, ceil(in * bits / 8)]``,
    each output row one bit stream, LSB first, along the input dim: column ``i`` sits at bits
    ``[i * bits, (i + 1) * bits)`` of its row. For 2/4/8 bits that is ``8 / bits`` codes per byte
    (INT2 takes 2 bits per weight, INT4 4, INT8 8); 3/5/6/7 bits cross byte boundaries.
  - ``code_storage = "int8"`` (8 bits, one group per row): int8 ``[out, in]`` holding
    ``q = code - 128``, and the row ALSO fills AI-OS's V2 columns: ``quant_type = "int8"``,
    ``scales`` = the per-row scales, ``zero_points`` = ``zero - 128`` per row (0 for symmetric INT8,
    whose zero point is 128), ``quant_axis = 0``. AI-OS's loader computing ``(q - zp) * scale`` per
    row therefore gets ``scale * (code - zero)``, the same float32 weight as ours: both offsets are
    128, so they cancel.

* ``<module>.weight_scale``: float32 ``[out, G]``. Float32, not the model dtype, because the
  quantizer computed its fake-quant weights with these exact float32 scales: storing them rounded to
  bf16 would make the stored model differ from the one the quantizer evaluated. Cost: 32 / group_size
  bits per weight (0.25 at group 128).
* ``<module>.weight_zero``: uint8 ``[out, G]`` zero points. Omitted when every zero point equals
  ``2**(bits-1)`` (always the case for symmetric quantization); ``params["zero_point"]`` then holds it.
* ``<module>.weight_g_idx``: int32 ``[in]``, only when it differs from ``i // group_size`` (GPTQ with
  act-order and dynamic groups).

``params`` (identical on every row): ``bits``, ``group_size`` (-1: per channel), ``symmetric``,
``method`` (``rtn`` / ``gptq``), ``act_order``, ``weight_shape`` ``[out, in]``, ``n_groups``,
``code_storage``, ``original_dtype`` (safetensors code of the float weight that was quantized) and,
when ``weight_zero`` is omitted, ``zero_point``.

Dequantization: ``W = scales[:, g_idx] * (codes - zeros[:, g_idx])`` in float32, then cast: the same
arithmetic as ``ptq.QuantizedLinear.dequantize``, so the stored model equals the quantizer's fake-quant
model bit for bit.

There is no Hugging Face format for these rows: ``detect`` never accepts a checkpoint and ``to_rows``
refuses (rows come from :func:`encode`, called by ``llm_workbook.quantize.run``). ``to_hf`` returns the
stored arrays, so ``llmc export`` of a ``ptq`` file writes them as they are, with the config.json
``quantization_config`` ``{"quant_method": "llmc-ptq", ...}`` that ``quantize`` put in the file; that
directory documents the rows but no HF loader reads it. For a checkpoint transformers/AutoGPTQ can
load, quantize with ``out_format="gptq"`` instead (GPTQ v1 layout).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from llm_workbook.formats import _bitpack
from llm_workbook.formats.base import AffineWeight, QuantizedTensor, Row, StoreError, TensorInfo
from llm_workbook.formats._codec import trivial_g_idx
from llm_workbook.schema import AiosQuant

NAME = "ptq"
SUFFIXES = ("weight", "weight_scale", "weight_zero", "weight_g_idx")
MIN_BITS, MAX_BITS = 2, 8
INT8_OFFSET = 128  # int8 rows store code - 128
HF_QUANT_METHOD = "llmc-ptq"


# --------------------------------------------------------------------------------------------------
# Bit packing: one LSB-first bit stream per output row
# --------------------------------------------------------------------------------------------------


def packed_row_bytes(in_features: int, bits: int) -> int:
    """Bytes one output row of ``in_features`` codes takes at ``bits`` bits each."""
    return _bitpack.words_for(in_features, bits)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes ``[out, in]`` in ``[0, 2**bits)`` -> uint8 ``[out, ceil(in * bits / 8)]``, LSB first per row."""
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"pack_codes: bits must lie in [{MIN_BITS}, {MAX_BITS}], got {bits}")
    if codes.dim() != 2 or codes.dtype != torch.uint8:
        raise ValueError(f"pack_codes: expected uint8 [out, in], got {codes.dtype} {tuple(codes.shape)}")
    if codes.numel() and int(codes.max()) >= 1 << bits:
        raise ValueError(f"pack_codes: codes must lie in [0, {(1 << bits) - 1}], max is {int(codes.max())}")
    return _bitpack.pack(codes, bits)


def unpack_codes(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 ``[out, ceil(in * bits / 8)]`` -> uint8 codes ``[out, in]``."""
    return _bitpack.unpack(packed, bits, in_features).to(torch.uint8)


# --------------------------------------------------------------------------------------------------
# Writing (from a ptq.QuantizedLinear)
# --------------------------------------------------------------------------------------------------


def uses_int8_rows(bits: int, n_groups: int) -> bool:
    """8-bit codes with one group per output row are stored as int8 rows AI-OS reads."""
    return bits == 8 and n_groups == 1


def encode(module: str, quantized: Any, original_dtype: str | None = None) -> list[Row]:
    """The rows storing one ``ptq.QuantizedLinear`` of ``module`` (layout in the module docstring).

    ``original_dtype``: safetensors dtype code of the float weight before quantization (informational).
    """
    codes, scales, zeros, g_idx = quantized.codes, quantized.scales, quantized.zeros, quantized.g_idx
    bits, group_size = int(quantized.bits), int(quantized.group_size)
    if not MIN_BITS <= bits <= MAX_BITS:
        raise StoreError(f"tensor {module}.weight: bits must lie in [{MIN_BITS}, {MAX_BITS}], got {bits}")
    if codes.dtype != torch.uint8 or codes.dim() != 2:
        raise StoreError(f"tensor {module}.weight: codes must be uint8 [out, in], got {codes.dtype} {tuple(codes.shape)}")
    out_features, in_features = codes.shape
    n_groups = scales.shape[1]
    if tuple(scales.shape) != (out_features, n_groups) or tuple(zeros.shape) != (out_features, n_groups):
        raise StoreError(f"tensor {module}.weight_scale: scales {tuple(scales.shape)} / zeros {tuple(zeros.shape)} "
                         f"must both be [{out_features}, n_groups]")
    if not bool(torch.isfinite(scales).all()):
        raise StoreError(f"tensor {module}.weight_scale: scales contain NaN/inf")
    top = (1 << bits) - 1
    if zeros.numel() and (int(zeros.min()) < 0 or int(zeros.max()) > top):
        raise StoreError(f"tensor {module}.weight_zero: zero points must lie in [0, {top}]")
    if codes.numel() and int(codes.max()) > top:
        raise StoreError(f"tensor {module}.weight: codes must lie in [0, {top}]")

    params: dict[str, Any] = {
        "bits": bits,
        "group_size": group_size,
        "symmetric": bool(quantized.symmetric),
        "method": str(quantized.method),
        "act_order": quantized.perm is not None,
        "weight_shape": [out_features, in_features],
        "n_groups": n_groups,
        "original_dtype": original_dtype,
    }
    midpoint = 1 << (bits - 1)
    omit_zero = bool((zeros == midpoint).all())
    if omit_zero:
        params["zero_point"] = midpoint
    int8_rows = uses_int8_rows(bits, n_groups)
    params["code_storage"] = "int8" if int8_rows else "packed"

    scales32 = scales.to(torch.float32).contiguous()
    if int8_rows:
        signed = (codes.to(torch.int16) - INT8_OFFSET).to(torch.int8)
        aios = AiosQuant("int8", scales32[:, 0].numpy().copy(),
                         (zeros[:, 0].to(torch.float32) - INT8_OFFSET).numpy(), 0, 0, (out_features, in_features),
                         original_dtype or "F32")
        codes_row = Row(f"{module}.weight", signed, NAME, dict(params), aios=aios)
    else:
        codes_row = Row(f"{module}.weight", pack_codes(codes, bits), NAME, dict(params))
    rows = [codes_row, Row(f"{module}.weight_scale", scales32, NAME, dict(params))]
    if not omit_zero:
        rows.append(Row(f"{module}.weight_zero", zeros.to(torch.uint8).contiguous(), NAME, dict(params)))
    if not torch.equal(g_idx.to(torch.int32), trivial_g_idx(in_features, group_size)):
        rows.append(Row(f"{module}.weight_g_idx", g_idx.to(torch.int32).contiguous(), NAME, dict(params)))
    return rows


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def decode(record: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes uint8 [out, in], scales f32 [out, G], zeros int32 [out, G], g_idx int32 [in])`` of a stored layer.

    Every array is checked against ``params``; a mismatch raises StoreError naming the tensor.
    """
    layer, params, tensors = record.layer_name, record.params, record.tensors
    try:
        bits = int(params["bits"])
        group_size = int(params["group_size"])
        out_features, in_features = (int(d) for d in params["weight_shape"])
        storage = params["code_storage"]
    except (KeyError, TypeError, ValueError) as exc:
        raise StoreError(f"layer {layer}: ptq params are incomplete ({exc!r}): {params}") from None
    if not MIN_BITS <= bits <= MAX_BITS:
        raise StoreError(f"tensor {layer}.weight: bits {bits} outside [{MIN_BITS}, {MAX_BITS}]")
    if group_size != -1 and group_size < 1:
        raise StoreError(f"layer {layer}: bad group_size {group_size}")
    unknown = set(tensors) - set(SUFFIXES)
    if unknown or "weight" not in tensors or "weight_scale" not in tensors:
        raise StoreError(f"layer {layer}: ptq rows must be weight + weight_scale [+ weight_zero, weight_g_idx], "
                         f"got {sorted(tensors)}")
    size = in_features if group_size == -1 else group_size
    n_groups = math.ceil(in_features / size) if in_features else 0

    stored = tensors["weight"]
    if storage == "int8":
        if stored.dtype != torch.int8 or tuple(stored.shape) != (out_features, in_features):
            raise StoreError(f"tensor {layer}.weight: expected int8 {[out_features, in_features]}, "
                             f"got {stored.dtype} {list(stored.shape)}")
        codes = (stored.to(torch.int16) + INT8_OFFSET).to(torch.uint8)
    elif storage == "packed":
        expected = (out_features, packed_row_bytes(in_features, bits))
        if stored.dtype != torch.uint8 or tuple(stored.shape) != expected:
            raise StoreError(f"tensor {layer}.weight: expected uint8 {list(expected)} ({bits}-bit codes of "
                             f"{[out_features, in_features]}), got {stored.dtype} {list(stored.shape)}")
        codes = unpack_codes(stored, bits, in_features)
    else:
        raise StoreError(f"tensor {layer}.weight: unknown code_storage {storage!r}")

    scales = tensors["weight_scale"]
    if scales.dtype != torch.float32 or tuple(scales.shape) != (out_features, n_groups):
        raise StoreError(f"tensor {layer}.weight_scale: expected float32 {[out_features, n_groups]}, "
                         f"got {scales.dtype} {list(scales.shape)}")
    if "weight_zero" in tensors:
        zeros = tensors["weight_zero"]
        if zeros.dtype != torch.uint8 or tuple(zeros.shape) != (out_features, n_groups):
            raise StoreError(f"tensor {layer}.weight_zero: expected uint8 {[out_features, n_groups]}, "
                             f"got {zeros.dtype} {list(zeros.shape)}")
        zeros = zeros.to(torch.int32)
    elif "zero_point" in params:
        zeros = torch.full((out_features, n_groups), int(params["zero_point"]), dtype=torch.int32)
    else:
        raise StoreError(f"tensor {layer}.weight_zero is missing and params give no zero_point")
    if "weight_g_idx" in tensors:
        g_idx = tensors["weight_g_idx"]
        if g_idx.dtype != torch.int32 or tuple(g_idx.shape) != (in_features,):
            raise StoreError(f"tensor {layer}.weight_g_idx: expected int32 [{in_features}], got {g_idx.dtype} {list(g_idx.shape)}")
        if in_features and (int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups):
            raise StoreError(f"tensor {layer}.weight_g_idx: values outside [0, {n_groups})")
    else:
        g_idx = trivial_g_idx(in_features, group_size)
    return codes, scales, zeros, g_idx


def detect(qconfig: dict | None, tensors: dict[str, TensorInfo]) -> bool:
    return False  # written by `llmc quantize`, never found in a source checkpoint


def claim(qconfig: dict | None, module: str, members: dict[str, TensorInfo]) -> set[str]:
    return set()


def to_rows(qconfig: dict | None, module: str, tensors: dict[str, torch.Tensor]) -> list[Row]:
    raise StoreError(f"module {module}: ptq rows are written by `llmc quantize` (formats.ptq.encode), not converted")


def dequantize(record: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``scales[:, g_idx] * (codes - zeros[:, g_idx])`` in float32, then cast: ``[out, in]``."""
    codes, scales, zeros, g_idx = decode(record)
    g = g_idx.long()
    return (scales[:, g] * (codes.to(torch.float32) - zeros.to(torch.float32)[:, g])).to(dtype)


def affine(record: QuantizedTensor) -> AffineWeight:
    codes, scales, zeros, g_idx = decode(record)
    return AffineWeight(codes.to(torch.int32), scales.to(torch.float32), zeros.to(torch.float32), g_idx.long(),
                        int(record.params["bits"]))
