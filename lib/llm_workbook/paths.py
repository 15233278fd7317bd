"""The package's version and where its files live: the bottom of the layers, so any module may import it."""

from __future__ import annotations

import os
from pathlib import Path

__version__ = "0.2.0"

# The checkout this package runs from (lib/llm_workbook/..): where .cache, .venv-angelslim,
# notebooks/ and parameters/ live.
REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE_ENV = "LLMC_CACHE_DIR"
REPORTS_ENV = "LLMC_REPORTS_DIR"


def cache_root() -> Path:
    """Where built models and the originals' stored sides live: ``$LLMC_CACHE_DIR`` or ``<repo>/.cache``."""
    return Path(os.environ.get(CACHE_ENV) or REPO_ROOT / ".cache")


def reports_root() -> Path:
    """Where runs write their records and reports unless told otherwise: ``$LLMC_REPORTS_DIR`` or
    ``<repo>/reports``, whatever the working directory (a notebook opened in Lab runs in notebooks/)."""
    return Path(os.environ.get(REPORTS_ENV) or REPO_ROOT / "reports")
