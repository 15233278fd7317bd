"""The AngelSlim backend: its PTQ run in ``.venv-angelslim`` on the same calibration windows, then
converted into the store."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llm_workbook.paths import REPO_ROOT, __version__
from llm_workbook import corpus
from llm_workbook.errors import AngelSlimError, QuantizeError
from llm_workbook.quantize.options import (
    ANGELSLIM_GROUP_METHODS,
    ANGELSLIM_METHODS,
    ANGELSLIM_PYTHON,
    ANGELSLIM_SCRIPT,
    CALIBRATION_CORPUS,
    PTQ_METHODS,
    QuantizeResult,
    calibration_record,
    check_output,
)
from llm_workbook.store.convert import (
    HuggingFaceToParquetConverter,
    export_to_hf,
)
from llm_workbook.store.loader import DENSE, WeightLoaderV2

# ==================================================================================================
# AngelSlim backend
# ==================================================================================================


def write_calibration_jsonl(tokenizer, path: Path, n_samples: int, seq_len: int, seed: int) -> int:
    """AngelSlim calibration lines from the same corpus windows our GPTQ uses; returns the line count.

    Each line is ``{"applied_message": text}``: AngelSlim's TextDataset tokenizes that text as it is
    (no chat template, which base models and our tiny tokenizers do not have).
    """
    ids = corpus.calibration_samples(tokenizer, n_samples, seq_len, seed, name=CALIBRATION_CORPUS)
    with path.open("w", encoding="utf-8") as handle:
        for row in ids:
            handle.write(json.dumps({"applied_message": tokenizer.decode(row.tolist())}, ensure_ascii=False) + "\n")
    return int(ids.shape[0])


ANGELSLIM_MODULES = ("angelslim", "torch", "transformers", "yaml")


def angelslim_missing(python: str | os.PathLike | None = None) -> str | None:
    """Why the AngelSlim backend cannot run here (None: its env looks complete). Fast: nothing is imported."""
    python = Path(python) if python else ANGELSLIM_PYTHON
    if not python.exists():
        return (f"{python} does not exist; build the isolated AngelSlim environment with `make angelslim-env`")
    if not ANGELSLIM_SCRIPT.is_file():
        return f"{ANGELSLIM_SCRIPT} is missing"
    probe = ("import importlib.util as u, sys; "
             f"print(','.join(m for m in {ANGELSLIM_MODULES!r} if u.find_spec(m) is None))")
    try:
        completed = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{python} does not run ({exc}); rebuild it with `make angelslim-env`"
    missing = completed.stdout.strip()
    if completed.returncode != 0 or missing:
        detail = f"missing modules: {missing}" if missing else completed.stderr.strip()[-300:]
        return f"the AngelSlim environment of {python} is incomplete ({detail}); rebuild it with `make angelslim-env`"
    return None


def _angelslim_failure(method: str, out_dir: Path, completed: subprocess.CompletedProcess) -> AngelSlimError:
    report_path = out_dir / "run_ptq_report.json"
    detail = None
    if report_path.is_file():
        try:
            error = json.loads(report_path.read_text()).get("error") or {}
            if error:
                detail = f"step {error.get('step')!r}: {error.get('type')}: {error.get('message')}"
        except json.JSONDecodeError:
            pass
    tail = "\n".join([line for line in (completed.stderr or "").splitlines() if line.strip()][-15:])
    return AngelSlimError(
        f"AngelSlim {method} failed (exit {completed.returncode})"
        + (f" at {detail}" if detail else "") + (f"\n--- AngelSlim stderr (last lines) ---\n{tail}" if tail else "")
    )


ANGELSLIM_TIMEOUT_S = 3600  # the slowest method on a 1-2 B model on this CPU takes well under this


def run_angelslim(src, out_dir: str | os.PathLike, method: str, calib_samples: int = 32, calib_seq_len: int = 256,
                  seed: int = 0, progress: bool = True, python: str | os.PathLike | None = None,
                  group_size: int | None = None, timeout_s: float = ANGELSLIM_TIMEOUT_S) -> Path:
    """Run AngelSlim's PTQ on SRC in ``.venv-angelslim`` and keep its own output directory at ``out_dir``
    (atomically: after an error nothing is there). Returns ``out_dir``. A run that is killed, takes longer
    than ``timeout_s`` or leaves an incomplete output fails with that reason (``AngelSlimError``)."""
    from transformers import AutoTokenizer

    from llm_workbook.store.source import Source
    from llm_workbook.store.checkpoint import open_checkpoint

    python = Path(python) if python else ANGELSLIM_PYTHON
    out_dir = Path(out_dir)
    if method not in ANGELSLIM_METHODS:
        hint = " (one of ours: pass backend='ptq')" if method in PTQ_METHODS else ""
        raise QuantizeError(f"unknown AngelSlim method {method!r}{hint}; supported: {list(ANGELSLIM_METHODS)}")
    if group_size is not None and method not in ANGELSLIM_GROUP_METHODS:
        raise QuantizeError(f"AngelSlim {method} takes no group size (only {sorted(ANGELSLIM_GROUP_METHODS)})")
    problem = angelslim_missing(python)
    if problem:
        raise QuantizeError(f"AngelSlim backend: {problem}")
    if calib_samples < 1 or calib_seq_len < 2:
        raise QuantizeError(f"calib_samples must be >= 1 and calib_seq_len >= 2, got {calib_samples}, {calib_seq_len}")
    check_output(out_dir, "gptq")  # a new or empty directory
    work = Path(tempfile.mkdtemp(prefix=".llmc-angelslim-", dir=out_dir.parent)).resolve()  # absolute: cwd differs
    try:
        source = Source.of(src)
        if source.is_parquet:
            model_dir = export_to_hf(source.location, work / "model", progress=progress)
        else:
            model_dir = source.root().resolve()  # the subprocess runs in the repo root
        if open_checkpoint(model_dir).quantization_config:
            raise QuantizeError(f"{src}: AngelSlim quantizes an unquantized checkpoint; this one already has a "
                                f"quantization_config")
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        except Exception as exc:
            raise QuantizeError(f"{src}: no usable tokenizer for AngelSlim's calibration data ({exc})") from None
        calib = work / "calib.jsonl"
        write_calibration_jsonl(tokenizer, calib, calib_samples, calib_seq_len, seed)
        result_dir = work / "angelslim"
        command = [str(python), str(ANGELSLIM_SCRIPT), "--model", str(model_dir), "--method", method,
                   "--out", str(result_dir), "--calib", str(calib), "--num-samples", str(calib_samples),
                   "--seq-len", str(calib_seq_len)] + (["--group-size", str(group_size)] if group_size else [])
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        env.pop("PYTHONPATH", None)  # the isolated env must not see this project's packages
        if progress:
            print(f"AngelSlim {method}: {' '.join(command)}", file=sys.stderr)
        try:
            completed = subprocess.run(command, capture_output=True, text=True, env=env, cwd=str(REPO_ROOT),
                                       timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise AngelSlimError(f"AngelSlim {method} did not finish within {timeout_s:g} s: stopped, its partial "
                                 f"output removed") from None
        if completed.returncode < 0:
            raise AngelSlimError(f"AngelSlim {method} was killed by {signal.Signals(-completed.returncode).name}; "
                                 f"its partial output removed")
        if completed.returncode != 0:
            raise _angelslim_failure(method, result_dir, completed)
        missing = [what for what, present in (("config.json", (result_dir / "config.json").is_file()),
                                              ("*.safetensors", any(result_dir.glob("*.safetensors")))) if not present]
        if missing:
            raise AngelSlimError(f"AngelSlim {method} exited 0 but its output is incomplete (no {', '.join(missing)} "
                                 f"in {result_dir.name}); removed")
        # Provenance travels with the output (and, converted, inside the Parquet file as a side file).
        (result_dir / "llmc_quantize.json").write_text(json.dumps(
            {"source": str(src), "backend": "angelslim", "method": method, "group_size": group_size,
             "calibration": calibration_record(calib_samples, calib_seq_len, seed), "llmc_version": __version__},
            indent=2) + "\n", encoding="utf-8")
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(result_dir, out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out_dir


def quantize_angelslim(src, out: Path, method: str, calib_samples: int, calib_seq_len: int, seed: int,
                        progress: bool, python: Path, group_size: int | None = None) -> QuantizeResult:
    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix=".llmc-angelslim-out-", dir=out.parent)).resolve()
    try:
        result_dir = run_angelslim(src, work / "angelslim", method, calib_samples, calib_seq_len, seed, progress,
                                   python, group_size)
        HuggingFaceToParquetConverter(progress=progress).convert(result_dir, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    options = {"method": method, "calibration": calibration_record(calib_samples, calib_seq_len, seed)}
    if group_size:
        options["group_size"] = group_size
    loader = WeightLoaderV2(out)
    layers = sorted({info.layer_name for info in loader.rows.values() if info.format != DENSE})
    from llm_workbook.store.inventory import summary

    return QuantizeResult(out, "angelslim", method, "parquet", options, layers,
                          summary(loader)["quantized_bits_per_weight"], time.perf_counter() - start)
