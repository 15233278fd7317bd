"""llm_compression: a lossless Parquet weight store for (pre-)quantized LLM checkpoints, and the
evaluation workbook that measures them against their originals."""

__version__ = "0.2.0"

from .formats.base import QuantizedTensor, StoreError, UnsupportedFormatError  # noqa: E402
from .converter import HuggingFaceToParquetConverter, export_to_hf  # noqa: E402
from .loader import WeightLoaderV2  # noqa: E402

__all__ = [
    "HuggingFaceToParquetConverter",
    "QuantizedTensor",
    "StoreError",
    "UnsupportedFormatError",
    "WeightLoaderV2",
    "export_to_hf",
    "__version__",
]
