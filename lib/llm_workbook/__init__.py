"""llm_workbook: a lossless Parquet weight store for (pre-)quantized LLM checkpoints, and the
evaluation workbook that measures them against their originals."""

from llm_workbook.paths import CACHE_ENV, REPO_ROOT, REPORTS_ENV, __version__, cache_root, reports_root  # noqa: F401

from llm_workbook.errors import StoreError, UnsupportedFormatError  # noqa: E402
from llm_workbook.formats.base import QuantizedTensor  # noqa: E402
from llm_workbook.store.convert import HuggingFaceToParquetConverter, export_to_hf  # noqa: E402
from llm_workbook.store.loader import WeightLoaderV2  # noqa: E402
from llm_workbook.store.source import Source  # noqa: E402
from llm_workbook.workbook import builtins as _builtins  # noqa: E402, F401 - registers builtin: names with Source.of

_LAZY = {
    "PrecisionValidator": ("evaluation.validator", "PrecisionValidator"),
    "evaluate": ("evaluation.compare", "evaluate"),
    "load_model": ("runtime.load", "load_model"),
    "model_from_parquet": ("runtime.model", "model_from_parquet"),
}


def __getattr__(name: str):
    # The evaluation engine pulls in transformers; import it only when asked for.
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(name)


__all__ = [
    "PrecisionValidator",
    "evaluate",
    "load_model",
    "HuggingFaceToParquetConverter",
    "QuantizedTensor",
    "Source",
    "StoreError",
    "UnsupportedFormatError",
    "WeightLoaderV2",
    "export_to_hf",
    "__version__",
]
