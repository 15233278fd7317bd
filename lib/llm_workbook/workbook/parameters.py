"""A run's parameters: the one vocabulary from a YAML file to the record.

Every key a parameters file (or ``llmc run -p KEY VALUE``, or the notebook's parameters cell) may set is in
``DEFAULTS`` with its default; ``check_parameters`` applies today's checks; ``evaluation_settings`` hands the
evaluation's keys to ``evaluate`` (the only renaming: ``ppl_threshold`` is the verdict's ``ppl_increase``);
the record keeps them under these names (``run_record.KEPT_PARAMETERS``). The parameters travel as a plain
mapping because papermill injects them as one.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from llm_workbook import names

# Every parameter the evaluation notebook takes, with its default.
DEFAULTS: dict = {
    "run": None,  # name of the run: reports/<run>.*
    "title": None,
    "model": None,  # candidate: HF dir, hub id, .parquet, or builtin:<name>
    "reference": None,  # original: same kinds of source
    "format_notes": "",
    "task": None,  # causal-lm | encoder; null: from the checkpoints' architectures
    "corpus": "pydoc",  # offline default; a .txt/.jsonl path or (online) a datasets id
    "context_length": 256,  # the evaluation's defaults are EvaluationSettings' (a test holds them equal)
    "stride": None,  # null: the context length
    "max_eval_tokens": 2048,  # tokens of the held-out text scored at most
    "stage_tokens": None,  # score in stages of this many tokens, stopping once every check is decided (null: all)
    "reference_precision": "float32",  # the original's stored logits: float32 (exact) or float16 (half the disk)
    "gen_tokens": 16,
    "dtype": "float32",
    "device": "cpu",
    "activation_quant": True,
    "keep_packed": False,
    "measure_perf": True,
    "perf_models": "original,candidate",  # whose speed and memory to measure (each costs a process per runtime)
    "perf_hf_load": True,  # also time loading from HF safetensors, for the Parquet/HF load-time ratio
    "perf_packed": False,  # also measure the candidate with PackedLinear (codes dequantized per call; the kernels runtime is how an engine holds them)
    "cosine_threshold": 0.95,
    "ppl_threshold": 0.15,
    "kld_threshold": None,
    "top1_threshold": None,
    "lm_eval_tasks": "",  # lm-evaluation-harness tasks, comma-separated: heldout_lambada (offline) or any reachable task
    "lm_eval_limit": 200,  # items per task at most (null: all)
    "output_dir": None,  # None: reports_root(), the checkout's reports/ wherever the notebook runs
    "producer": None,  # who made the candidate; default from the builtin catalogue (builtins.producer)
    "model_name": None,  # the original model's name; default from the builtin catalogue (builtins.model_name)
    "overrides": None,  # set by `llmc run -p KEY VALUE`: what the command line changed
    "expect_error": None,  # text of a known failure this run documents (a producer's bug): it then does not fail `llmc run`
    "resources": {"num_cpus": 1},  # what one run asks of a Ray cluster (`llmc run --executor ray`), e.g. num_gpus: 1
    "progress": True,  # progress bars in the notebook (Lab); llmc run turns them off, its own bar shows the batch
}


TASKS = (None, "causal-lm", "encoder")


class ParameterError(ValueError):
    pass


def parse_overrides(pairs: list[tuple[str, str]] | None) -> dict:
    """``-p KEY VALUE`` pairs, each value parsed as YAML (as papermill's ``-p``/``-y`` do): ``0.9`` is a
    number, ``true`` a bool, ``null`` None, anything else a string."""
    out = {}
    for key, value in pairs or []:
        try:
            out[key] = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError:
            out[key] = value
    return out


def check_parameters(raw: dict, origin: str, overrides: dict | None = None) -> dict:
    """Parameters from a mapping, merged over DEFAULTS with ``overrides`` last; unknown keys are an error."""
    if not isinstance(raw, dict):
        raise ParameterError(f"{origin}: expected a mapping of parameters")
    overrides = dict(overrides or {})
    unknown = sorted((set(raw) | set(overrides)) - set(DEFAULTS))
    if unknown:
        raise ParameterError(f"{origin}: unknown parameters {unknown}; known: {sorted(DEFAULTS)}")
    params = {**DEFAULTS, **raw, **overrides}
    if overrides:
        params["overrides"] = overrides  # travels into the record and the inputs digest
    params["run"] = params["run"] or names.safe_stem(Path(origin).stem)
    why = names.problem(params["run"]) or ("starts with '-'" if str(params["run"]).startswith("-") else None)
    if why:  # the run name is a file name in the reports directory
        raise ParameterError(f"{origin}: run name {params['run']!r} {why}; use letters, digits, '.', '_' or '-'")
    for key in ("model", "reference"):
        if not params[key]:
            raise ParameterError(f"{origin}: parameter {key!r} is required")
    if params["task"] not in TASKS:
        raise ParameterError(f"{origin}: task {params['task']!r} is not one of {list(TASKS)}")
    params["title"] = params["title"] or params["run"]
    return params


def load_parameters(path: str | os.PathLike, overrides: dict | None = None) -> dict:
    """A run's parameters: the YAML merged over DEFAULTS (then ``overrides``), checked for unknown keys and
    required ones."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ParameterError(f"{path}: cannot read parameters ({exc})") from None
    return check_parameters(raw, str(path), overrides)


def check_source(key: str, source: str) -> None:
    """One clear error naming a source that does not exist or is no kind of model (builtins are only looked up
    here, not built; hub ids are checked where resolved)."""
    from llm_workbook.errors import SourceNotFoundError, StoreError
    from llm_workbook.store.source import Source
    from llm_workbook.workbook import builtins

    if builtins.is_builtin(source):
        builtins.describe(source)  # an unknown builtin name raises, listing the known ones
        return
    try:
        Source.of(source)
    except SourceNotFoundError:
        raise ParameterError(f"{key}: {source} does not exist (not a file, directory, hub id or builtin:<name>)") from None
    except StoreError as exc:
        raise ParameterError(f"{key}: {exc}") from None


# A run's parameters that say what the run is, where it writes and how it is scheduled, not how it evaluates.
RUN_KEYS = ("run", "title", "model", "reference", "format_notes", "task", "device", "output_dir", "producer",
            "model_name", "overrides", "expect_error", "resources")


def check_task(task: str | None, reference_src) -> None:
    """A run's ``task``, when given, is what its original is (read from its config): a parameters file that
    says ``encoder`` for a causal LM is one clear error, not a silently different evaluation."""
    if task is None:
        return
    from llm_workbook.evaluation.scoring import is_causal
    from llm_workbook.runtime.load import CAUSAL_LM, ENCODER, read_config

    kind = CAUSAL_LM if is_causal(read_config(reference_src), None) else ENCODER
    if kind != task:
        raise ParameterError(f"task: {task!r}, but the original {reference_src} is a {kind} model "
                             f"(set task: {kind}, or leave it out to follow the checkpoint)")


def _names(text: str | None) -> tuple[str, ...]:
    return tuple(t.strip() for t in (text or "").split(",") if t.strip())


def evaluation_settings(params: dict) -> dict:
    """``evaluate``'s keywords from a run's parameters (their YAML names: ``ppl_threshold`` is the verdict's
    ``ppl_increase``, ``measure_perf`` / ``perf_hf_load`` make its ``PerfSettings``, comma lists become tuples)."""
    import torch

    from llm_workbook.evaluation.perf import PerfSettings
    from llm_workbook.evaluation.record import Thresholds

    same = ("corpus", "context_length", "stride", "max_eval_tokens", "stage_tokens", "reference_precision", "gen_tokens",
            "activation_quant", "keep_packed", "perf_packed", "lm_eval_limit", "progress")
    return {
        **{key: params[key] for key in same},
        "dtype": getattr(torch, params["dtype"]),
        "perf": PerfSettings(compare_hf_load=params["perf_hf_load"]) if params["measure_perf"] else False,
        "perf_models": _names(params["perf_models"]),
        "thresholds": Thresholds(cosine=params["cosine_threshold"], ppl_increase=params["ppl_threshold"],
                                 kld=params["kld_threshold"], top1=params["top1_threshold"]),
        "lm_eval_tasks": _names(params["lm_eval_tasks"]),
    }
