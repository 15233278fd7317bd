"""The format registry: name -> format module, and checkpoint-level detection.

Adding a format means one new module with the verbs listed in ``base`` and one entry in
``_MODULES`` below. Order matters: the first module whose ``detect`` accepts a checkpoint wins.
"""

from __future__ import annotations

import functools
import importlib

from llm_workbook.formats.base import Format, QuantizedTensor, Row, StoreError, TensorInfo, UnsupportedFormatError

# Most specific first; dense (no quantization_config) last.
_MODULES = [
    "w4a8",  # AngelSlim / TensorRT-LLM w4a8_awq (before fp8: AngelSlim's dense path mislabels it naive-quantized)
    "fp8",  # compressed-tensors FP8 (naive/float-quantized) and quant_method fp8 (per-tensor, block)
    "int8",  # compressed-tensors int-quantized W8A8
    "packed",  # compressed-tensors pack-quantized (W4A16 / W8A16)
    "nvfp4",  # AngelSlim ModelOpt-style NVFP4 and compressed-tensors nvfp4-pack-quantized
    "gptq",  # AutoGPTQ v1 layout
    "awq",  # AutoAWQ GEMM layout
    "grid",  # exact low-bit grids inside dense weights (encoder, see _DENSE_ENCODERS)
    "ptq",  # our own PTQ rows (llmc quantize); never detected in a source checkpoint
    "gguf",  # GGML blocks of a GGUF file (gguf_store); never detected among safetensors
    "aios",  # AI-OS's int8/int2 rows (AI-OS files, our AI-OS quantizer); never detected among safetensors
    "dense",
]

# Suffixes that only quantized checkpoints have: left unclaimed, they mean we misread the file.
QUANTIZED_SUFFIXES = {
    "qweight", "qzeros", "scales", "g_idx", "weight_scale", "weight_scale_inv", "weight_scale_2",
    "weight_scale_int4", "weight_packed", "weight_zero_point", "weight_global_scale",
    "weight_shape", "weight_g_idx", "input_scale", "input_global_scale", "weight_scale.int4",
}


@functools.cache
def _load(name: str) -> Format:
    return Format(importlib.import_module(f"{__name__}.{name}"))


def all_formats() -> list[Format]:
    return [_load(name) for name in _MODULES]


def get_format(name: str) -> Format:
    for module in all_formats():
        if module.NAME == name:
            return module
    raise UnsupportedFormatError(f"unknown storage format {name!r}; supported: {supported_names()}")


QuantizedTensor.format_of = staticmethod(get_format)


def is_per_tensor(name: str) -> bool:
    """Does every stored array of this format dequantize on its own (no layer groups)?"""
    try:
        return get_format(name).per_tensor
    except UnsupportedFormatError:
        return False


def supported_names() -> list[str]:
    return [m.NAME for m in all_formats()]


# Encoders tried on every unclaimed tensor (e.g. weights that sit exactly on a low-bit grid).
_DENSE_ENCODERS: list[str] = ["grid"]


def dense_rows(name: str, tensor, qconfig: dict | None, detect_grids: bool = True) -> list[Row]:
    """Rows for a tensor no quantized format claimed: an exact encoder's rows, else one dense row."""
    if detect_grids and not qconfig:
        for encoder in _DENSE_ENCODERS:
            rows = _load(encoder).encode_dense(name, tensor)
            if rows:
                return rows
    return [Row(name, tensor, "dense")]


def detect(qconfig: dict | None, tensors: dict[str, TensorInfo], source: str = "") -> Format:
    """The format module for a whole checkpoint, or one clear error listing what is supported."""
    for module in all_formats():
        if module.detect(qconfig, tensors):
            return module
    method = (qconfig or {}).get("quant_method")
    fmt = (qconfig or {}).get("format")
    detail = f"quant_method={method!r}" + (f", format={fmt!r}" if fmt else "")
    raise UnsupportedFormatError(
        f"{source}: unsupported quantization_config ({detail}); supported formats: {supported_names()}"
    )


__all__ = [
    "QUANTIZED_SUFFIXES", "Format", "QuantizedTensor", "Row", "StoreError", "TensorInfo",
    "UnsupportedFormatError", "all_formats", "dense_rows", "detect", "get_format", "is_per_tensor", "supported_names",
]
