"""AutoAWQ GEMM checkpoints (``quant_method: awq``, ``version: gemm``), as AngelSlim's int4_awq writes them.

Per quantized Linear (``in`` inputs, ``out`` outputs, ``G = in / group_size``):

* ``qweight`` int32 ``[in, out / 8]``: packed along the OUTPUT dim; nibble slot ``k`` (bits ``4k..4k+3``) of
  word ``c`` holds output column ``8c + ORDER[k]`` with ``ORDER = [0, 2, 4, 6, 1, 3, 5, 7]``.
* ``qzeros`` int32 ``[G, out / 8]``: zero points as they are (no −1), same interleave.
* ``scales`` ``[G, out]`` (float16 from AutoAWQ/AngelSlim; bfloat16/float32 accepted).

Dequantization: ``W^T[i, o] = (q[i, o] − z[i // group_size, o]) * s[i // group_size, o]``; returned transposed,
``[out, in]`` like ``nn.Linear.weight``. ``(q − z)`` is a small integer, so the float32 product is exact and a
single cast equals AutoAWQ's float16 arithmetic.
"""

from __future__ import annotations


import torch

from llm_workbook.formats.base import AffineWeight, QuantizedTensor, Row, StoreError, TensorInfo, UnsupportedFormatError, is_ignored
from llm_workbook.formats import _bitpack

NAME = "awq"
SUFFIXES = ("qweight", "qzeros", "scales")
BITS = 4
PACK = 32 // BITS
# Slot k of a packed word holds column ORDER[k] of its group of 8; READ_ORDER[j] is the slot of column j.
ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
READ_ORDER = tuple(ORDER.index(j) for j in range(PACK))  # (0, 4, 1, 5, 2, 6, 3, 7)
SCALE_DTYPES = {torch.float16, torch.bfloat16, torch.float32}
SUPPORTED_VERSIONS = ("gemm",)


def _is_awq(qconfig: dict | None) -> bool:
    return bool(qconfig) and str(qconfig.get("quant_method", "")).lower() == "awq"


def detect(qconfig: dict | None, tensors: dict[str, TensorInfo]) -> bool:
    """quant_method awq with version gemm (absent means gemm); other AWQ layouts raise UnsupportedFormatError."""
    if not _is_awq(qconfig):
        return False
    version = str(qconfig.get("version") or "gemm").lower()
    if version not in SUPPORTED_VERSIONS:
        raise UnsupportedFormatError(
            f"AWQ version {qconfig.get('version')!r} is not supported (its packing differs); supported: {list(SUPPORTED_VERSIONS)}")
    bits = qconfig.get("bits", qconfig.get("w_bit", BITS))
    if bits != BITS:
        raise UnsupportedFormatError(f"AWQ bits={bits!r} is not supported; AutoAWQ GEMM packs {BITS}-bit codes only")
    return True


def claim(qconfig: dict | None, module: str, members: dict[str, TensorInfo]) -> set[str]:
    if not _is_awq(qconfig) or "qweight" not in members or is_ignored(qconfig, module):
        return set()
    return {s for s in SUFFIXES if s in members}


def _group_size(qconfig: dict) -> int:
    size = qconfig.get("group_size", qconfig.get("q_group_size", 128))
    return -1 if size in (None, 0) else int(size)


def _geometry(module: str, tensors: dict[str, torch.Tensor], group_size: int) -> tuple[int, int, int]:
    """(out, in, group size in use) after checking every tensor; StoreError names the tensor."""
    for suffix in SUFFIXES:
        if suffix not in tensors:
            raise StoreError(f"tensor {module}.{suffix} is missing (AWQ GEMM needs qweight, qzeros and scales)")
    qweight, qzeros, scales = (tensors[s] for s in SUFFIXES)
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise StoreError(f"tensor {module}.qweight: expected 2-D int32 [in, out/8], got {qweight.dtype} {tuple(qweight.shape)}")
    in_features, out_features = qweight.shape[0], qweight.shape[1] * PACK
    size = in_features if group_size == -1 else group_size
    if size <= 0 or in_features % size:
        raise StoreError(f"tensor {module}.qweight: group_size {group_size} does not divide in_features {in_features}")
    n_groups = in_features // size
    if scales.dtype not in SCALE_DTYPES:
        raise StoreError(f"tensor {module}.scales: expected F16/BF16/F32, got {scales.dtype}")
    if tuple(scales.shape) != (n_groups, out_features):
        raise StoreError(f"tensor {module}.scales: shape {tuple(scales.shape)} does not match qweight {tuple(qweight.shape)} "
                         f"with group_size {group_size} (expected {[n_groups, out_features]})")
    if qzeros.dtype != torch.int32 or tuple(qzeros.shape) != (n_groups, out_features // PACK):
        raise StoreError(f"tensor {module}.qzeros: expected int32 {[n_groups, out_features // PACK]}, "
                         f"got {qzeros.dtype} {tuple(qzeros.shape)}")
    return out_features, in_features, size


def to_rows(qconfig: dict | None, module: str, tensors: dict[str, torch.Tensor]) -> list[Row]:
    unknown = set(tensors) - set(SUFFIXES)
    if unknown:
        raise StoreError(f"module {module}: unexpected AWQ tensors {sorted(unknown)}")
    group_size = _group_size(qconfig or {})
    out_features, in_features, _ = _geometry(module, tensors, group_size)
    params = {
        "bits": BITS,
        "group_size": group_size,
        "version": "gemm",
        "zero_point": bool((qconfig or {}).get("zero_point", True)),
        "weight_shape": [out_features, in_features],
    }
    return [Row(f"{module}.{s}", tensors[s], NAME, dict(params)) for s in SUFFIXES]


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """int32 ``[rows, cols/8]`` in AWQ interleaved order -> int32 codes ``[rows, cols]`` in natural column order."""
    slots = _bitpack.unpack(packed, BITS, packed.shape[-1] * PACK, 32).view(packed.shape[0], -1, PACK)
    return slots[..., list(READ_ORDER)].reshape(packed.shape[0], -1)


def pack_awq(codes: torch.Tensor) -> torch.Tensor:
    """Inverse of ``unpack_awq``: int codes ``[rows, cols]`` in [0, 15] -> int32 ``[rows, cols/8]`` (AWQ order)."""
    if codes.dim() != 2 or codes.shape[1] % PACK:
        raise ValueError(f"pack_awq: expected [rows, cols] with cols a multiple of {PACK}, got {tuple(codes.shape)}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 15):
        raise ValueError("pack_awq: codes must lie in [0, 15]")
    slots = codes.reshape(codes.shape[0], -1, PACK)[..., list(ORDER)]
    return _bitpack.pack(slots.reshape(codes.shape[0], -1), BITS, 32)


def dequantize(record: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(q − z) * s`` per group, in float32, as ``[out, in]`` cast to ``dtype``."""
    group_size = int(record.params.get("group_size", 128))
    _, _, size = _geometry(record.layer_name, record.tensors, group_size)
    q = unpack_awq(record.tensors["qweight"])  # [in, out]
    z = unpack_awq(record.tensors["qzeros"]).repeat_interleave(size, dim=0)
    s = record.tensors["scales"].to(torch.float32).repeat_interleave(size, dim=0)
    return ((q - z).to(torch.float32) * s).t().contiguous().to(dtype)


def affine(record: QuantizedTensor) -> AffineWeight:
    group_size = int(record.params.get("group_size", 128))
    _, in_, size = _geometry(record.layer_name, record.tensors, group_size)
    codes = unpack_awq(record.tensors["qweight"]).t().contiguous()  # [out, in]
    zeros = unpack_awq(record.tensors["qzeros"]).t().to(torch.float32).contiguous()  # [out, G]
    scales = record.tensors["scales"].to(torch.float32).t().contiguous()
    return AffineWeight(codes.to(torch.int32), scales, zeros, torch.arange(in_) // size, BITS)
