"""Task accuracy and answer flips through lm-evaluation-harness, on the model a run loaded from Parquet.

Any lm-eval task can be named (``tasks=("hellaswag", ...)``): it runs when its dataset is reachable
(online, or a filled ``datasets`` cache). Offline, the default task is ``heldout_lambada``: the LAMBADA
protocol (predict the last word of a passage; correct when that word is the model's greedy continuation,
lm-eval's ``acc`` of a loglikelihood request) on passages of the corpus's held-out split. It is labelled
as such everywhere: it is not the LAMBADA dataset.

Per item the original and the candidate are each right or wrong; the figures, each with a 95 % interval
from a paired bootstrap over items (``uncertainty``): accuracy of both, recovery (candidate accuracy /
original accuracy, as AngelSlim's and llm-compressor's model cards report it) and flips (the share of items
whose answer changed, either way).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from llm_workbook import corpus
from llm_workbook.evaluation import uncertainty as U

HELDOUT_LAMBADA = "heldout_lambada"
PASSAGE_WORDS = (40, 120)  # a passage ends at the first eligible word after this many words, at most the second
LAST_WORD = re.compile(r"^[A-Za-z]{4,}$")  # a plain word to predict (not a symbol, number or keyword fragment)


def heldout_passages(limit: int | None = None, name: str = corpus.DEFAULT_CORPUS) -> list[dict]:
    """``{"text": passage}`` items from the held-out split, each ending in a plain word (deterministic order)."""
    items = []
    low, high = PASSAGE_WORDS
    for text in corpus.load_texts(name, "eval"):
        words = text.split()
        start = 0
        while start + low < len(words):
            end = next((i for i in range(start + low, min(start + high, len(words))) if LAST_WORD.match(words[i])), None)
            if end is None:
                start += high
                continue
            items.append({"text": " ".join(words[start : end + 1])})
            start = end + 1
            if limit is not None and len(items) >= limit:
                return items
    return items


def _task_dir(limit: int | None) -> Path:
    """An lm-eval include path holding the held-out LAMBADA task and its local JSONL."""
    directory = Path(tempfile.mkdtemp(prefix="llmc-tasks-"))
    data = directory / "heldout_lambada.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in heldout_passages(limit)), encoding="utf-8")
    (directory / "heldout_lambada.yaml").write_text(
        f"task: {HELDOUT_LAMBADA}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
        "output_type: loglikelihood\n"
        "test_split: test\n"
        "doc_to_text: \"{{text.split(' ')[:-1]|join(' ')}}\"\n"
        "doc_to_target: \"{{' '+text.split(' ')[-1]}}\"\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n",
        encoding="utf-8")
    return directory


def task_manager(tasks: tuple[str, ...], include: Path | None):
    """lm-eval's task index for ``tasks``: its own bundled tasks are indexed (about 13 s: it parses some 14,000
    YAML files) only when a task other than ours is named."""
    from lm_eval.tasks import TaskManager

    bundled = bool(set(tasks) - {HELDOUT_LAMBADA})
    return TaskManager(include_path=str(include) if include else None, include_defaults=bundled)


def run_tasks(model: Any, tokenizer: Any, tasks: tuple[str, ...], limit: int | None = None,
              batch_size: int = 8) -> dict[str, np.ndarray]:
    """Per task, each item's correctness (1.0 / 0.0) in document order, from lm-eval's logged samples."""
    import shutil

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    include = _task_dir(limit) if HELDOUT_LAMBADA in tasks else None
    try:
        with _quiet():
            manager = task_manager(tasks, include)
            lm = HFLM(pretrained=model, tokenizer=tokenizer, device="cpu", batch_size=batch_size,
                      dtype=next(model.parameters()).dtype)
            results = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit, log_samples=True,
                                      bootstrap_iters=0, random_seed=U.SEED, numpy_random_seed=U.SEED,
                                      torch_random_seed=U.SEED, fewshot_random_seed=U.SEED)
    finally:
        if include:
            shutil.rmtree(include, ignore_errors=True)
    out = {}
    for task in tasks:
        samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
        metric = "acc" if "acc" in samples[0] else next(k for k in ("exact_match", "acc_norm") if k in samples[0])
        out[task] = np.array([float(s[metric]) for s in samples])
    return out


@contextlib.contextmanager
def _quiet():
    """lm-eval and datasets write progress bars and notices to stderr, which a report shows as an error block:
    they go to a buffer, and lm-eval logs only errors. An exception still propagates with its message."""
    import datasets

    loggers = [logging.getLogger(name) for name in ("lm_eval", "datasets")]
    levels = [logger.level for logger in loggers]
    bars = datasets.is_progress_bar_enabled()
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        if bars:
            datasets.enable_progress_bars()


def compare_items(original: np.ndarray, candidate: np.ndarray) -> dict:
    """Accuracy of both, recovery and flips, each with its 95 % interval (paired bootstrap over items)."""
    if original.shape != candidate.shape or original.size == 0:
        raise ValueError(f"the two models answered different items ({original.size} and {candidate.size})")
    blocks = U.block_sums({"orig": original, "cand": candidate, "flip": (original != candidate).astype(float),
                           "lost": ((original == 1) & (candidate == 0)).astype(float),
                           "gained": ((original == 0) & (candidate == 1)).astype(float)}, block=1)
    ratio = lambda s: np.where(s["orig"] > 0, s["cand"] / np.maximum(s["orig"], 1e-12), np.nan)  # noqa: E731
    return {
        "items": int(original.size),
        "accuracy_original": U.bootstrap(blocks, U.mean_of("orig")).as_dict(),
        "accuracy_candidate": U.bootstrap(blocks, U.mean_of("cand")).as_dict(),
        "recovery": U.bootstrap(blocks, ratio).as_dict(),
        "flips": U.bootstrap(blocks, U.mean_of("flip")).as_dict(),
        "flips_lost": int(blocks["lost"].sum()),
        "flips_gained": int(blocks["gained"].sum()),
    }
