"""AI-OS's ``llm_compression.inference.model_converter``, with AI-OS's names and arguments.

``HuggingFaceToParquetConverter().convert(hf_model_path, output_parquet)`` writes our file (AI-OS's V2
columns plus ours), which AI-OS's loader reads right for float32/float16 and AI-OS-quantized tensors
and refuses (never misreads) for the rest. Where we differ from AI-OS on purpose: bf16 is stored as
bf16 (AI-OS widens it to float32 bytes under a bf16 tag); quantized checkpoints (FP8, GPTQ, AWQ,
compressed-tensors, NVFP4, GGUF) are stored losslessly in their own layout (AI-OS's quantized path
cannot write its rows); and the reverse direction exists (AI-OS raises NotImplementedError).
"""

from __future__ import annotations

import os

from llm_workbook.errors import CompressionError, StoreError
from llm_workbook.store import convert as _store_convert


class ModelConverterError(CompressionError):
    """A conversion failed; ``original_exception`` holds our error, which names the file and tensor."""


class HuggingFaceToParquetConverter(_store_convert.HuggingFaceToParquetConverter):
    """HF checkpoint (directory, hub id, GGUF) -> one self-contained weight file."""

    def convert(self, hf_model_path: str | os.PathLike, output_parquet: str | os.PathLike,
                auto_detect_quantization: bool = True):
        """``auto_detect_quantization`` is accepted for AI-OS's callers; the format is always detected."""
        try:
            return super().convert(hf_model_path, output_parquet)
        except StoreError as exc:
            raise ModelConverterError(f"Failed to convert model: {exc}", original_exception=exc) from None


class ParquetToHuggingFaceConverter:
    """Weight file -> HF directory (safetensors shards, config, tokenizer), the source's tensors bit for bit."""

    def convert(self, input_parquet: str | os.PathLike, output_hf_path: str | os.PathLike):
        try:
            return _store_convert.export_to_hf(input_parquet, output_hf_path)
        except StoreError as exc:
            raise ModelConverterError(f"Failed to export model: {exc}", original_exception=exc) from None


def convert_hf_to_parquet(hf_model_path: str, output_parquet: str, auto_detect_quantization: bool = True) -> None:
    HuggingFaceToParquetConverter().convert(hf_model_path, output_parquet, auto_detect_quantization)


def convert_parquet_to_hf(input_parquet: str, output_hf_path: str) -> None:
    ParquetToHuggingFaceConverter().convert(input_parquet, output_hf_path)


__all__ = ["HuggingFaceToParquetConverter", "ModelConverterError", "ParquetToHuggingFaceConverter",
           "convert_hf_to_parquet", "convert_parquet_to_hf"]
