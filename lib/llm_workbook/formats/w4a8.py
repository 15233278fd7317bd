"""AngelSlim W4A8-FP8 checkpoints: int4 weights (two per int8) with FP8 activations.

Two flavours, told apart by config.json:

* ``quant_method: w4a8_awq`` (TensorRT-LLM, AngelSlim's DeepSeek/Kimi save and its mixed-precision tool, paths
  (a)/(b) of the reference notes). Quantized Linears hold
  ``qweight`` int8 ``[out, in/2]`` (two's-complement int4 nibbles, low nibble = even input column),
  ``weight_scale`` (per-tensor, absmax/448), ``weight_scale.int4`` ``[out, in/group]`` (group absmax/8) and
  ``input_scale``. AngelSlim rounds the codes as ``clamp(round(W / weight_scale.int4), -8, 7)``, and
  TensorRT-LLM's W4A8 MoE loader uses the group scale as the weight's per-group dequant scale, while the
  per-tensor ``weight_scale`` only moves the int4 product into the FP8 range (it cancels in the output), and
  ``input_scale`` scales activations. So ``W = q * weight_scale.int4``.
  Ignored layers (``ignored_layers`` globs, aimed at TensorRT-LLM's module names) keep DeepSeek FP8 block
  tensors described by ``ignored_quantization_config``: ``weight`` F8_E4M3 + ``weight_scale_inv``
  ``[ceil(out/b0), ceil(in/b1)]`` (possibly squeezed to 1-D), ``W[block] = weight * weight_scale_inv[block]``.
* AngelSlim's generic dense path (``QDQModule`` with ``w4a8`` in the algorithm, saved by ``PTQSaveVllmHF``):
  config.json says ``compressed-tensors`` (``naive-quantized``, 8-bit float, strategy group), which does not
  describe these tensors; they are recognised by ``qweight`` int8 + ``weight_scale_int4`` (underscore).
  Its codes are rounded with step ``absmax/7`` (``quantize_weight_int(..., bits=4)`` on the group-wise
  fake-quantized weight, codes in [-7, 7]) while the stored ``weight_scale_int4`` is ``absmax/8``. The weight
  the codes stand for is therefore ``q * weight_scale_int4 * 8/7`` (= AngelSlim's fake-quantized weight);
  AngelSlim's own ``QDQModule.forward`` multiplies by ``weight_scale_int4`` alone and so runs 7/8 of it.
  We dequantize to the former (``int4_scale_factor = [8, 7]`` in the row params).

Which tensors a module has decides its kind (int4 or FP8 block); anything else stays dense. The FP8 block
scales expand through ``formats.compressed_tensors.expand_grid``, as compressed-tensors' block scales do.
"""

from __future__ import annotations

import math

import torch

from llm_workbook.formats import _bitpack
from llm_workbook.formats.base import QuantizedTensor, Row, StoreError, TensorInfo
from llm_workbook.formats.compressed_tensors import expand_grid

NAME = "w4a8"
TRTLLM_METHOD = "w4a8_awq"
DOTTED_INT4_SCALE = "weight_scale.int4"  # paths (a)/(b)
FLAT_INT4_SCALE = "weight_scale_int4"  # path (c) (QDQModule's parameter name)
INT4_SUFFIXES = ("qweight", "weight_scale", DOTTED_INT4_SCALE, FLAT_INT4_SCALE, "input_scale")
FP8_SUFFIXES = ("weight", "weight_scale_inv", "input_scale")
FLOAT_DTYPES = {torch.float16, torch.bfloat16, torch.float32}
PACKED_DTYPES = {torch.int8, torch.uint8}
DEFAULT_BLOCK = (128, 128)


def _method(qconfig: dict | None) -> str:
    return str((qconfig or {}).get("quant_method", "")).lower()


def _dense_path_tensors(tensors: dict[str, TensorInfo]) -> bool:
    """AngelSlim's dense W4A8 path: some ``X.qweight`` int8 next to ``X.weight_scale_int4``."""
    for name, info in tensors.items():
        if name.endswith(".qweight") and info.dtype in ("I8", "U8"):
            module = name[: -len(".qweight")]
            if f"{module}.{FLAT_INT4_SCALE}" in tensors or f"{module}.{DOTTED_INT4_SCALE}" in tensors:
                return True
    return False


def detect(qconfig: dict | None, tensors: dict[str, TensorInfo]) -> bool:
    method = _method(qconfig)
    if method == TRTLLM_METHOD:
        return True
    return method == "compressed-tensors" and _dense_path_tensors(tensors)


def _fp8_block(qconfig: dict | None) -> tuple[int, int]:
    ignored = (qconfig or {}).get("ignored_quantization_config") or {}
    block = ignored.get("weight_block_size") or (qconfig or {}).get("weight_block_size") or DEFAULT_BLOCK
    if len(block) != 2 or min(int(b) for b in block) <= 0:
        raise StoreError(f"weight_block_size {block!r} must be two positive ints")
    return int(block[0]), int(block[1])


def claim(qconfig: dict | None, module: str, members: dict[str, TensorInfo]) -> set[str]:
    """int4 groups (``qweight`` int8) and FP8 block groups (``weight`` F8 + ``weight_scale_inv``); else dense."""
    if _method(qconfig) not in (TRTLLM_METHOD, "compressed-tensors"):
        return set()
    if "qweight" in members:  # to_rows checks its dtype and names it if it is not int8
        return {s for s in INT4_SUFFIXES if s in members}
    weight = members.get("weight")
    if weight is not None and weight.dtype == "F8_E4M3" and "weight_scale_inv" in members:
        return {s for s in FP8_SUFFIXES if s in members}
    return set()


# --------------------------------------------------------------------------------------------------
# int4
# --------------------------------------------------------------------------------------------------


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """int8/uint8 ``[out, in/2]`` -> int8 codes ``[out, in]`` in [-8, 7]; low nibble = even column."""
    nibbles = _bitpack.unpack(packed, 4, 2 * packed.shape[-1])
    return (nibbles - ((nibbles & 0x8) << 1)).to(torch.int8)  # sign-extend 4 bits


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Inverse of ``unpack_int4``: int codes ``[out, in]`` in [-8, 7] -> int8 ``[out, in/2]``."""
    if codes.dim() != 2 or codes.shape[1] % 2:
        raise ValueError(f"pack_int4: expected [out, in] with even in, got {tuple(codes.shape)}")
    if codes.numel() and (int(codes.min()) < -8 or int(codes.max()) > 7):
        raise ValueError("pack_int4: codes must lie in [-8, 7]")
    return _bitpack.pack(codes.to(torch.int16) & 0xF, 4).view(torch.int8)


def _int4_geometry(module: str, tensors: dict[str, torch.Tensor], group_size: int | None) -> tuple[int, int, int, str]:
    """(out, in, group size, int4 scale suffix) after checking the int4 group; StoreError names the tensor."""
    qweight = tensors["qweight"]
    if qweight.dtype not in PACKED_DTYPES or qweight.dim() != 2:
        raise StoreError(f"tensor {module}.qweight: expected 2-D int8 [out, in/2], got {qweight.dtype} {tuple(qweight.shape)}")
    scale_name = next((s for s in (DOTTED_INT4_SCALE, FLAT_INT4_SCALE) if s in tensors), None)
    if scale_name is None:
        raise StoreError(
            f"tensor {module}.{DOTTED_INT4_SCALE} (or {module}.{FLAT_INT4_SCALE}) is missing for {module}.qweight. "
            f"If the checkpoint has '{module}.{DOTTED_INT4_SCALE}', the store split its name at the last dot "
            f"(schema.split_name must keep the suffix '{DOTTED_INT4_SCALE}' whole)")
    out_features, in_features = qweight.shape[0], qweight.shape[1] * 2
    scale = tensors[scale_name]
    if scale.dtype not in FLOAT_DTYPES or scale.dim() != 2 or scale.shape[0] != out_features or scale.shape[1] == 0:
        raise StoreError(f"tensor {module}.{scale_name}: expected float [{out_features}, in/group], "
                         f"got {scale.dtype} {tuple(scale.shape)}")
    if in_features % scale.shape[1]:
        raise StoreError(f"tensor {module}.{scale_name}: {scale.shape[1]} groups do not divide in_features {in_features}")
    size = in_features // scale.shape[1]
    if group_size not in (None, -1) and size != group_size:
        raise StoreError(f"tensor {module}.{scale_name}: shape {tuple(scale.shape)} means group size {size}, "
                         f"the config says {group_size}")
    for suffix in ("weight_scale", "input_scale"):
        value = tensors.get(suffix)
        if value is not None and (value.dtype not in FLOAT_DTYPES or value.numel() != 1):
            raise StoreError(f"tensor {module}.{suffix}: expected one float (per-tensor scale), got "
                             f"{value.dtype} {tuple(value.shape)}")
    return out_features, in_features, size, scale_name


def _int4_rows(qconfig: dict, module: str, tensors: dict[str, torch.Tensor]) -> list[Row]:
    unknown = set(tensors) - set(INT4_SUFFIXES)
    if unknown:
        raise StoreError(f"module {module}: unexpected W4A8 tensors {sorted(unknown)}")
    trtllm = _method(qconfig) == TRTLLM_METHOD
    group_size = qconfig.get("weight_group_size") if trtllm else None
    out_features, in_features, size, scale_name = _int4_geometry(module, tensors, group_size)
    params = {
        "kind": "int4",
        "variant": "trtllm" if trtllm else "angelslim_qdq",
        "group_size": size,
        "int4_scale": scale_name,
        # W = q * int4_scale * num / den (see the module docstring for why the dense path is 8/7).
        "int4_scale_factor": [1, 1] if trtllm else [8, 7],
        "weight_shape": [out_features, in_features],
    }
    return [Row(f"{module}.{s}", tensors[s], NAME, dict(params)) for s in INT4_SUFFIXES if s in tensors]


def _dequantize_int4(record: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    params = record.params
    _, _, size, scale_name = _int4_geometry(record.layer_name, record.tensors, int(params["group_size"]))
    num, den = params.get("int4_scale_factor", [1, 1])
    codes = unpack_int4(record.tensors["qweight"]).to(torch.float32)
    scale = record.tensors[scale_name].to(torch.float32)
    if (num, den) != (1, 1):
        scale = scale * num / den
    return (codes * scale.repeat_interleave(size, dim=1)).to(dtype)


# --------------------------------------------------------------------------------------------------
# FP8 block (ignored layers)
# --------------------------------------------------------------------------------------------------


def _fp8_geometry(module: str, tensors: dict[str, torch.Tensor], block: tuple[int, int]) -> tuple[int, int]:
    weight = tensors.get("weight")
    if weight is None or weight.dtype != torch.float8_e4m3fn or weight.dim() != 2:
        got = "missing" if weight is None else f"{weight.dtype} {tuple(weight.shape)}"
        raise StoreError(f"tensor {module}.weight: expected 2-D F8_E4M3, got {got}")
    scale = tensors.get("weight_scale_inv")
    out_features, in_features = weight.shape
    grid = (math.ceil(out_features / block[0]), math.ceil(in_features / block[1]))
    if scale is None or scale.dtype not in FLOAT_DTYPES or scale.numel() != grid[0] * grid[1] or scale.dim() > 2:
        got = "missing" if scale is None else f"{scale.dtype} {tuple(scale.shape)}"
        raise StoreError(f"tensor {module}.weight_scale_inv: expected float {list(grid)} for blocks {list(block)}, got {got}")
    if scale.dim() == 2 and tuple(scale.shape) != grid:
        raise StoreError(f"tensor {module}.weight_scale_inv: shape {tuple(scale.shape)} != {list(grid)} for blocks {list(block)}")
    value = tensors.get("input_scale")
    if value is not None and (value.dtype not in FLOAT_DTYPES or value.numel() != 1):
        raise StoreError(f"tensor {module}.input_scale: expected one float, got {value.dtype} {tuple(value.shape)}")
    return out_features, in_features


def _fp8_rows(qconfig: dict, module: str, tensors: dict[str, torch.Tensor]) -> list[Row]:
    unknown = set(tensors) - set(FP8_SUFFIXES)
    if unknown:
        raise StoreError(f"module {module}: unexpected FP8 block tensors {sorted(unknown)}")
    block = _fp8_block(qconfig)
    out_features, in_features = _fp8_geometry(module, tensors, block)
    params = {"kind": "fp8_block", "block": list(block), "weight_shape": [out_features, in_features]}
    return [Row(f"{module}.{s}", tensors[s], NAME, dict(params)) for s in FP8_SUFFIXES if s in tensors]


def dequantize_fp8_block(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """DeepSeek-style block FP8: ``weight * scale_inv[block]`` in float32 (edge blocks cropped)."""
    out_features, in_features = weight.shape
    layout = {"strategy": "block", "block_size": list(block)}
    return weight.to(torch.float32) * expand_grid(scale_inv, layout, out_features, in_features)


# --------------------------------------------------------------------------------------------------
# Verbs
# --------------------------------------------------------------------------------------------------


def to_rows(qconfig: dict | None, module: str, tensors: dict[str, torch.Tensor]) -> list[Row]:
    if "qweight" in tensors:
        return _int4_rows(qconfig or {}, module, tensors)
    return _fp8_rows(qconfig or {}, module, tensors)


def dequantize(record: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    kind = record.params.get("kind")
    if kind == "int4":
        return _dequantize_int4(record, dtype)
    if kind == "fp8_block":
        block = tuple(int(b) for b in record.params["block"])
        _fp8_geometry(record.layer_name, record.tensors, block)
        return dequantize_fp8_block(record.tensors["weight"], record.tensors["weight_scale_inv"], block).to(dtype)
    raise StoreError(f"layer {record.layer_name}: unknown w4a8 kind {kind!r}")

