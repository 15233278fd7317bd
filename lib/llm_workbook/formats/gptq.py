"""AutoGPTQ "v1" checkpoints (``quant_method: gptq``, ``checkpoint_format: gptq`` or absent).

Per quantized Linear (``in`` input features, ``out`` output features, ``G = ceil(in / group_size)``):

* ``qweight`` int32 ``[in * bits / 32, out]``: the codes of each output column, packed along the
  input dim as one little-endian bit stream, LSB first (input ``i`` sits at bits ``[i*bits, (i+1)*bits)``
  of its column's stream). For 2/4/8 bits a value never crosses a word; AutoGPTQ's 3-bit layout is
  the same stream, 32 values per 3 words.
* ``qzeros`` int32 ``[G, out * bits / 32]``: zero points minus one, packed the same way along ``out``.
* ``scales`` ``[G, out]`` (F16, BF16 or F32).
* ``g_idx`` int32 ``[in]`` (optional): the group of each input; absent means ``i // group_size``.

Dequantization: ``W[o, i] = scales[g, o] * (q[o, i] - (z[g, o] + 1))`` with ``g = g_idx[i]``, where
``z`` is the stored (zero − 1) field. Products of a float16/bfloat16 scale and a small integer are
exact in float32, so computing in float32 and casting once equals AutoGPTQ's float16 arithmetic.

``pack_gptq`` is the inverse of ``unpack_gptq``: our own PTQ writes v1 directories with it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from llm_workbook.formats.base import AffineWeight, QuantizedTensor, Row, StoreError, TensorInfo, UnsupportedFormatError, is_ignored
from llm_workbook.formats import _bitpack
from llm_workbook.formats._codec import trivial_g_idx

NAME = "gptq"
SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
SUPPORTED_BITS = (2, 3, 4, 8)
SCALE_DTYPES = {torch.float16, torch.bfloat16, torch.float32}
INDEX_DTYPES = {torch.int32, torch.int64}
# v1 stores zero - 1; the dequant adds it back.
ZERO_OFFSET = 1


# --------------------------------------------------------------------------------------------------
# Bit packing (shared by qweight, along dim 0, and qzeros, along dim 1)
# --------------------------------------------------------------------------------------------------

def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ``bits``-wide integers along dim 0 into int32 words, LSB first, as one bit stream.

    ``values`` is ``[n, m]`` with ``n * bits`` a multiple of 32; returns int32 ``[n * bits / 32, m]``.
    """
    n = values.shape[0]
    if (n * bits) % 32:
        raise ValueError(f"cannot pack {n} values of {bits} bits into whole 32-bit words")
    return _bitpack.pack(values.t(), bits, 32).t().contiguous()


def unpack_bits(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: int32 ``[n_words, m]`` -> int32 ``[n_words * 32 / bits, m]`` in [0, 2^bits)."""
    return _bitpack.unpack(words.t(), bits, words.shape[0] * 32 // bits, 32).t()


# --------------------------------------------------------------------------------------------------
# Public pack / unpack
# --------------------------------------------------------------------------------------------------


@dataclass
class GPTQUnpacked:
    """Unpacked GPTQ tensors: ``codes`` [out, in], true ``zeros`` [G, out], ``scales`` [G, out], ``g_idx`` [in]."""

    codes: torch.Tensor
    zeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        g = self.g_idx.long()
        scales = self.scales.to(torch.float32)[g]  # [in, out]
        diff = (self.codes.t().to(torch.int32) - self.zeros.to(torch.int32)[g]).to(torch.float32)
        return (scales * diff).t().contiguous().to(dtype)


def unpack_gptq(tensors: dict[str, torch.Tensor], bits: int, group_size: int = -1) -> GPTQUnpacked:
    """Codes, true zero points (stored + 1), scales and g_idx from v1 tensors (``qweight``, ``qzeros``, ``scales``[, ``g_idx``])."""
    codes = unpack_bits(tensors["qweight"], bits).t().contiguous()  # [out, in]
    zeros = unpack_bits(tensors["qzeros"].t().contiguous(), bits).t().contiguous() + ZERO_OFFSET
    in_features = codes.shape[1]
    g_idx = tensors.get("g_idx")
    if g_idx is None:
        g_idx = trivial_g_idx(in_features, group_size)
    return GPTQUnpacked(codes, zeros, tensors["scales"], g_idx)


def pack_gptq(
    codes: torch.Tensor,
    zeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None,
    bits: int,
) -> dict[str, torch.Tensor]:
    """GPTQ v1 tensors from unpacked ones (the inverse of ``unpack_gptq``).

    ``codes``: unsigned codes ``[out, in]`` in [0, 2^bits); ``zeros``: true zero points ``[G, out]`` in
    [1, 2^bits] (v1 stores zero − 1, so a zero point of 0 cannot be written); ``scales``: ``[G, out]``,
    written as given (cast it to the model dtype first); ``g_idx``: ``[in]`` group of each input, or
    None to omit the tensor (readers then use ``i // group_size``). Returns ``qweight``, ``qzeros``,
    ``scales`` and, if given, ``g_idx`` (int32).
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"pack_gptq: bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    if codes.dim() != 2 or zeros.dim() != 2 or scales.dim() != 2:
        raise ValueError(f"pack_gptq: codes, zeros and scales must be 2-D, got {tuple(codes.shape)}, "
                         f"{tuple(zeros.shape)}, {tuple(scales.shape)}")
    out_features, in_features = codes.shape
    n_groups = scales.shape[0]
    if tuple(zeros.shape) != (n_groups, out_features) or scales.shape[1] != out_features:
        raise ValueError(f"pack_gptq: zeros {tuple(zeros.shape)} and scales {tuple(scales.shape)} must both be "
                         f"[n_groups, out={out_features}]")
    if (in_features * bits) % 32 or (out_features * bits) % 32:
        raise ValueError(f"pack_gptq: in ({in_features}) and out ({out_features}) features times {bits} bits "
                         "must be multiples of 32")
    if codes.is_floating_point() or zeros.is_floating_point():
        raise ValueError("pack_gptq: codes and zeros must be integer tensors")
    if not scales.is_floating_point():
        raise ValueError(f"pack_gptq: scales must be floating point, got {scales.dtype}")
    top = (1 << bits) - 1
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > top):
        raise ValueError(f"pack_gptq: codes must lie in [0, {top}]")
    if zeros.numel() and (int(zeros.min()) < 1 or int(zeros.max()) > top + 1):
        raise ValueError(f"pack_gptq: zero points must lie in [1, {top + 1}] (GPTQ v1 stores zero - 1; "
                         f"got [{int(zeros.min())}, {int(zeros.max())}])")
    packed = {
        "qweight": pack_bits(codes.t().contiguous(), bits),
        "qzeros": pack_bits((zeros.to(torch.int64) - ZERO_OFFSET).t().contiguous(), bits).t().contiguous(),
        "scales": scales.contiguous(),
    }
    if g_idx is not None:
        if tuple(g_idx.shape) != (in_features,):
            raise ValueError(f"pack_gptq: g_idx must be [{in_features}], got {tuple(g_idx.shape)}")
        if in_features and (int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups):
            raise ValueError(f"pack_gptq: g_idx values must lie in [0, {n_groups})")
        packed["g_idx"] = g_idx.to(torch.int32).contiguous()
    return packed


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


def _is_gptq(qconfig: dict | None) -> bool:
    return bool(qconfig) and str(qconfig.get("quant_method", "")).lower() == "gptq"


def detect(qconfig: dict | None, tensors: dict[str, TensorInfo]) -> bool:
    """quant_method gptq in the v1 layout; other GPTQ layouts raise UnsupportedFormatError."""
    if not _is_gptq(qconfig):
        return False
    fmt = qconfig.get("checkpoint_format")
    if fmt not in (None, "gptq") or qconfig.get("is_marlin_format"):
        raise UnsupportedFormatError(
            f"GPTQ checkpoint_format {fmt or 'marlin'!r} is not supported; supported: 'gptq' (v1, zero - 1 stored)")
    bits = qconfig.get("bits")
    if bits not in SUPPORTED_BITS:
        raise UnsupportedFormatError(f"GPTQ bits={bits!r} is not supported; supported: {list(SUPPORTED_BITS)}")
    return True


def module_config(qconfig: dict, module: str) -> dict[str, Any] | None:
    """bits / group_size / sym / desc_act for one module, or None when it is not quantized.

    Honours ignore lists and GPTQModel's ``dynamic`` overrides (``-:regex`` skips a module,
    ``regex`` or ``+:regex`` overrides its settings).
    """
    if is_ignored(qconfig, module):
        return None
    cfg = {
        "bits": qconfig.get("bits"),
        "group_size": qconfig.get("group_size", -1),
        "sym": bool(qconfig.get("sym", True)),
        "desc_act": bool(qconfig.get("desc_act", False)),
    }
    for pattern, override in (qconfig.get("dynamic") or {}).items():
        negative = pattern.startswith("-:")
        regex = pattern[2:] if pattern.startswith(("-:", "+:")) else pattern
        if re.match(regex, module):
            if negative:
                return None
            cfg.update({k: v for k, v in (override or {}).items() if k in cfg})
            break
    if cfg["bits"] not in SUPPORTED_BITS:
        raise UnsupportedFormatError(f"module {module!r}: GPTQ bits={cfg['bits']!r} is not supported; "
                                     f"supported: {list(SUPPORTED_BITS)}")
    if cfg["group_size"] in (None, 0):
        cfg["group_size"] = -1
    return cfg


def claim(qconfig: dict | None, module: str, members: dict[str, TensorInfo]) -> set[str]:
    if not _is_gptq(qconfig) or "qweight" not in members or module_config(qconfig, module) is None:
        return set()
    return {s for s in SUFFIXES if s in members}


# --------------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------------


def _geometry(module: str, tensors: dict[str, torch.Tensor], cfg: dict[str, Any]) -> tuple[int, int, int]:
    """(out, in, n_groups) after checking every tensor's dtype and shape; StoreError names the tensor."""
    bits, group_size = cfg["bits"], cfg["group_size"]
    for suffix in ("qweight", "qzeros", "scales"):
        if suffix not in tensors:
            raise StoreError(f"tensor {module}.{suffix} is missing (GPTQ needs qweight, qzeros and scales)")
    qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise StoreError(f"tensor {module}.qweight: expected 2-D int32, got {qweight.dtype} {tuple(qweight.shape)}")
    if (qweight.shape[0] * 32) % bits:
        raise StoreError(f"tensor {module}.qweight: {qweight.shape[0]} rows do not hold whole {bits}-bit values")
    in_features, out_features = qweight.shape[0] * 32 // bits, qweight.shape[1]
    size = in_features if group_size == -1 else int(group_size)
    if size <= 0:
        raise StoreError(f"module {module}: bad group_size {group_size!r}")
    n_groups = math.ceil(in_features / size)
    if scales.dtype not in SCALE_DTYPES:
        raise StoreError(f"tensor {module}.scales: expected F16/BF16/F32, got {scales.dtype}")
    if tuple(scales.shape) != (n_groups, out_features):
        raise StoreError(f"tensor {module}.scales: shape {tuple(scales.shape)} does not match qweight "
                         f"{tuple(qweight.shape)} with group_size {group_size} (expected {[n_groups, out_features]})")
    if (out_features * bits) % 32:
        raise StoreError(f"tensor {module}.qzeros: out features {out_features} times {bits} bits is not a multiple of 32")
    if qzeros.dtype != torch.int32 or tuple(qzeros.shape) != (n_groups, out_features * bits // 32):
        raise StoreError(f"tensor {module}.qzeros: expected int32 {[n_groups, out_features * bits // 32]}, "
                         f"got {qzeros.dtype} {tuple(qzeros.shape)}")
    g_idx = tensors.get("g_idx")
    if g_idx is not None:
        if g_idx.dtype not in INDEX_DTYPES or tuple(g_idx.shape) != (in_features,):
            raise StoreError(f"tensor {module}.g_idx: expected int32 [{in_features}], got {g_idx.dtype} {tuple(g_idx.shape)}")
        if in_features and (int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups):
            raise StoreError(f"tensor {module}.g_idx: values [{int(g_idx.min())}, {int(g_idx.max())}] fall outside "
                             f"[0, {n_groups})")
    return out_features, in_features, n_groups


def to_rows(qconfig: dict | None, module: str, tensors: dict[str, torch.Tensor]) -> list[Row]:
    unknown = set(tensors) - set(SUFFIXES)
    if unknown:
        raise StoreError(f"module {module}: unexpected GPTQ tensors {sorted(unknown)}")
    cfg = module_config(qconfig or {}, module)
    if cfg is None:
        raise StoreError(f"module {module}: not a GPTQ module under this quantization_config")
    out_features, in_features, _ = _geometry(module, tensors, cfg)
    params = {
        "bits": cfg["bits"],
        "group_size": cfg["group_size"],
        "sym": cfg["sym"],
        "desc_act": cfg["desc_act"],
        "checkpoint_format": "gptq",
        "zero_offset": ZERO_OFFSET,
        "weight_shape": [out_features, in_features],
    }
    return [Row(f"{module}.{s}", tensors[s], NAME, dict(params)) for s in SUFFIXES if s in tensors]


def dequantize(record: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``scales[g, o] * (q[o, i] - (qzeros_field[g, o] + 1))`` in float32, cast to ``dtype``: [out, in]."""
    params = record.params
    cfg = {"bits": int(params["bits"]), "group_size": int(params.get("group_size", -1))}
    out_features, in_features, _ = _geometry(record.layer_name, record.tensors, cfg)
    unpacked = unpack_gptq(record.tensors, cfg["bits"], cfg["group_size"])
    if params.get("zero_offset", ZERO_OFFSET) != ZERO_OFFSET:
        raise StoreError(f"layer {record.layer_name}: unsupported zero_offset {params.get('zero_offset')!r}")
    weight = unpacked.dequantize(dtype)
    if tuple(weight.shape) != (out_features, in_features):
        raise StoreError(f"layer {record.layer_name}: dequantized shape {tuple(weight.shape)} != {[out_features, in_features]}")
    return weight


def affine(record: QuantizedTensor) -> AffineWeight:
    params = record.params
    cfg = {"bits": int(params["bits"]), "group_size": int(params.get("group_size", -1))}
    _geometry(record.layer_name, record.tensors, cfg)
    if params.get("zero_offset", ZERO_OFFSET) != ZERO_OFFSET:
        raise StoreError(f"layer {record.layer_name}: unsupported zero_offset {params.get('zero_offset')!r}")
    u = unpack_gptq(record.tensors, cfg["bits"], cfg["group_size"])
    return AffineWeight(u.codes.to(torch.int32), u.scales.to(torch.float32).t().contiguous(),
                        u.zeros.to(torch.float32).t().contiguous(), u.g_idx.long(), cfg["bits"])
