"""PDFs for the meeting: the index and each run's meeting report, printed by headless Chromium."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from llm_workbook.store import atomic
from llm_workbook.errors import StoreError

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Without the background-networking flags Chromium keeps trying to reach Google's hosts, which this
# machine's closed network refuses; a fresh profile keeps runs independent.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-pdf-header-footer", "--run-all-compositor-stages-before-draw", "--virtual-time-budget=10000"]


def find_chromium() -> str:
    """The Chromium executable, or one error saying how to install it."""
    explicit = os.environ.get("LLMC_CHROMIUM")
    for name in ([explicit] if explicit else []) + list(CANDIDATES):
        path = shutil.which(name) if name else None
        if path:
            return path
    raise StoreError("printing PDFs needs headless Chromium: `make setup-browser` installs Debian's chromium "
                     "(apt-get install chromium), or set LLMC_CHROMIUM to a Chrome/Chromium executable")


def print_pdf(html_path: Path, pdf_path: Path, chromium: str | None = None, timeout: int = 120) -> Path:
    """``html_path`` printed to ``pdf_path`` (written atomically)."""
    chromium = chromium or find_chromium()
    with tempfile.TemporaryDirectory(prefix="llmc-chromium-") as profile, atomic.replacing(pdf_path) as tmp:
        completed = subprocess.run(
            [chromium, *FLAGS, f"--user-data-dir={profile}", f"--print-to-pdf={tmp}", Path(html_path).resolve().as_uri()],
            capture_output=True, text=True, timeout=timeout)
        if completed.returncode != 0 or not tmp.is_file() or tmp.stat().st_size == 0:
            raise StoreError(f"{html_path}: Chromium did not print it (exit {completed.returncode}): "
                             f"{completed.stderr.strip()[-300:]}")
    return pdf_path


def print_reports(reports: str | os.PathLike, runs: list[str]) -> list[Path]:
    """index.pdf and <run>.meeting.pdf for every run that has a meeting report."""
    reports = Path(reports)
    chromium = find_chromium()
    pages = [reports / "index.html"] + [reports / f"{run}.meeting.html" for run in runs]
    return [print_pdf(page, page.with_suffix(".pdf"), chromium) for page in pages if page.is_file()]
