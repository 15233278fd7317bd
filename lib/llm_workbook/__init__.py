"""llm_workbook: a lossless Parquet weight store for (pre-)quantized LLM checkpoints, and the
evaluation workbook that measures them against their originals."""

__version__ = "0.2.0"

from pathlib import Path as _Path

# The checkout this package runs from (lib/llm_workbook/..): where .cache, .venv-angelslim,
# notebooks/ and parameters/ live.
REPO_ROOT = _Path(__file__).resolve().parents[2]
CACHE_ENV = "LLMC_CACHE_DIR"
REPORTS_ENV = "LLMC_REPORTS_DIR"


def cache_root() -> _Path:
    """Where built models and the originals' stored sides live: ``$LLMC_CACHE_DIR`` or ``<repo>/.cache``."""
    import os

    return _Path(os.environ.get(CACHE_ENV) or REPO_ROOT / ".cache")


def reports_root() -> _Path:
    """Where runs write their records and reports unless told otherwise: ``$LLMC_REPORTS_DIR`` or
    ``<repo>/reports``, whatever the working directory (a notebook opened in Lab runs in notebooks/)."""
    import os

    return _Path(os.environ.get(REPORTS_ENV) or REPO_ROOT / "reports")

from llm_workbook.errors import StoreError, UnsupportedFormatError  # noqa: E402
from llm_workbook.formats.base import QuantizedTensor  # noqa: E402
from llm_workbook.store.convert import HuggingFaceToParquetConverter, export_to_hf  # noqa: E402
from llm_workbook.store.loader import WeightLoaderV2  # noqa: E402

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
    "StoreError",
    "UnsupportedFormatError",
    "WeightLoaderV2",
    "export_to_hf",
    "__version__",
]
