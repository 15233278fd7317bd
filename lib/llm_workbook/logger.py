"""The package logger, under AI-OS's import path (``from llm_compression.logger import logger``)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

FORMAT = "%(asctime)s - %(name)s - %(levelname)s - %(message)s"


def setup_logger(name: str = "llm_workbook", level: str = "INFO", log_file: str | None = None,
                 log_dir: str = "logs") -> logging.Logger:
    """A named logger at ``level``; on first setup a stdout handler and, with ``log_file``, a file in ``log_dir``."""
    log = logging.getLogger(name)
    log.setLevel(getattr(logging, str(level).upper(), logging.INFO))
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter(FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))
        log.addHandler(handler)
        if log_file:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            file_handler = logging.FileHandler(Path(log_dir) / log_file)
            file_handler.setFormatter(logging.Formatter(FORMAT))
            log.addHandler(file_handler)
    return log


# AI-OS sets up its logger on import; ours stays quiet (WARNING) until an application configures it.
logger = logging.getLogger("llm_workbook")
