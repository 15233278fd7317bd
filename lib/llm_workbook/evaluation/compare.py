"""Measure a candidate (quantized) model against its original on the same text: one JSON record per run.

``evaluate(original, candidate)`` loads both (``runtime.load.load_model``: Parquet files, HF directories or
hub ids), checks they are comparable, runs them window by window on held-out text and gathers:

* causal LMs: cosine of the last hidden state and of the logits per token, KL divergence and top-1
  agreement of the next-token distributions, perplexity of each and its change, greedy-generation
  agreement;
* encoders: cosine of the sentence embeddings (mean pooling + L2 norm) and of the token states;
* per-tensor weight error (relative error, SQNR) of the candidate's quantized weights;
* sizes, optional performance figures (``perf``), thresholds and a verdict with reasons, versions and
  the machine.

The record's fields are documented in ``docs/evaluation_record.md``.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from llm_workbook.evaluation import metrics as M
from llm_workbook.evaluation.record import (
    SCHEMA_VERSION,
    EvaluationFault,
    EvaluationRecord,
    Thresholds,
    check_compatible,
    check_texts,
    check_tokenizers,
    judge,
)
from llm_workbook.evaluation.uncertainty import INCONCLUSIVE
from llm_workbook.evaluation.scoring import (
    OriginalWeights,
    causal_metrics,
    encoder_metrics,
    is_causal,
    original_side,
    task_metrics,
    weight_errors,
)
from llm_workbook.memory import return_freed_memory
from llm_workbook.runtime.embeddings import split_sentences
from llm_workbook.store.source import Source
from llm_workbook.runtime.load import (
    load_model,
    load_tokenizer,
    read_config,
)

# ============================================================================================
# evaluate
# ============================================================================================


def _token_stream(tokenizer, texts: list[str], max_eval_tokens: int, context_length: int) -> torch.Tensor:
    from llm_workbook.corpus import TEXT_SEPARATOR, encode_text

    ids = encode_text(tokenizer, TEXT_SEPARATOR.join(texts))
    if len(ids) < context_length + 1:
        raise ValueError(
            f"the evaluation text has {len(ids)} tokens; one window of context_length={context_length} needs at least "
            f"{context_length + 1} tokens: give more text or a smaller context_length"
        )
    return torch.tensor(ids[: max(max_eval_tokens, context_length) + 1], dtype=torch.long)


def _default_prompts(ids: torch.Tensor, count: int, length: int) -> list[torch.Tensor]:
    """``count`` prompts of ``length`` tokens from evenly spaced offsets of the evaluation text."""
    length = min(length, ids.numel())
    if count <= 0 or length <= 0:
        return []
    last_start = ids.numel() - length
    starts = sorted({round(i * last_start / max(1, count - 1)) if count > 1 else 0 for i in range(count)})
    return [ids[s : s + length].clone() for s in starts]


def _sentences(texts: list[str], max_sentences: int) -> list[str]:
    """Encoder inputs given by the caller: each non-empty text is one input."""
    out = [t.strip() for t in texts if t.strip()]
    return out[:max_sentences]


def _sizes(original: Source, candidate: Source, orig_info, cand_info) -> dict:
    sizes = {"original": _size(original, orig_info), "candidate": _size(candidate, cand_info)}
    if sizes["original"].get("file_bytes"):
        sizes["candidate_vs_original_bytes"] = sizes["candidate"]["file_bytes"] / sizes["original"]["file_bytes"]
    return sizes


def _size(source: Source, info) -> dict:
    """Size on disk of the model as given; bits per weight from the Parquet file when there is one
    (a quantized HF directory's temporary conversion counts quantized groups by their real shape)."""
    from llm_workbook.evaluation import perf as perf_module

    size = perf_module.model_size(source)
    if info.converted and info.parquet and Path(info.parquet).is_file():
        exact = perf_module.model_size(info.parquet)
        for key in ("parameters", "bits_per_weight", "compression_vs_bf16", "quantized_bits_per_weight", "formats"):
            size[key] = exact[key]
    return size


def _versions() -> dict:
    import transformers

    from llm_workbook.paths import __version__

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "llm_workbook": __version__}


def _machine() -> dict:
    import psutil

    return {"cpu_count": os.cpu_count(), "ram_bytes": psutil.virtual_memory().total, "platform": platform.platform(),
            "machine": platform.machine(), "torch_threads": torch.get_num_threads()}


@dataclass(frozen=True)
class EvaluationSettings:
    """How ``evaluate`` compares two models; every field is also a keyword of ``evaluate``.

    texts: evaluation texts; None takes the eval split of ``corpus`` (``corpus.load_texts``).
    context_length, stride: perplexity windows (tokens per model call; stride defaults to context_length).
        For encoders, the truncation length of each sentence.
    max_eval_tokens: tokens scored at most (the text is cut after that many).
    generation_prompts: prompt strings, or how many prompts of ``prompt_tokens`` tokens to take from the
        evaluation text; ``gen_tokens`` greedy tokens are compared for each (0: skip).
    dtype, activation_quant, keep_packed, task: passed to ``runtime.load.load_model`` for both models.
    perf: True, False or a ``perf.PerfSettings``: measure load time, latency and memory, each figure in a
        fresh subprocess, of the models named in ``perf_models``, in each serving runtime (``perf.RUNTIMES``:
        AI-OS as it is, weight-only kernels). ``perf_packed``: the candidate also with ``PackedLinear``
        (``perf["candidate_packed"]``; codes kept packed and dequantized on every call), where it has
        quantized layers.
    thresholds: ``Thresholds`` (or a dict of its fields) for the verdict; default cosine >= 0.95 and
        perplexity increase <= 15 %.
    max_sentences, batch_size: encoder sentences used at most, and the batch size for them.
    reference_cache: where the original's side of a causal-LM comparison is kept (``reference``): None
        takes ``<cache>/reference`` (``$LLMC_CACHE_DIR`` or the repository's ``.cache``), False computes it
        without storing it. ``reference_precision``: ``float32`` logits (exact) or ``float16`` log-probs
        (half the disk; KL divergence within 1e-3 relative).
    lm_eval_tasks: lm-evaluation-harness tasks run on both models (causal LMs), e.g. ``("heldout_lambada",)``,
        the offline LAMBADA-protocol task on held-out passages (``evaluation.tasks``), or any task whose
        dataset is reachable; ``lm_eval_limit`` items per task at most (None: all). The original's answers
        are kept with its stored side.
    stage_tokens: score in stages of this many tokens and stop at the first stage where every threshold's
        interval is decided (pass or fail) instead of scoring all ``max_eval_tokens``: the text a verdict
        needs, no more (None: always all).
    progress: show what is being done (tqdm bars: the step, tokens scored, time left); in Lab they are
        notebook widgets, in a terminal text.
    """

    texts: Sequence[str] | None = None
    corpus: str = "pydoc"
    context_length: int = 256
    stride: int | None = None
    max_eval_tokens: int = 2048
    generation_prompts: Sequence[str] | int = 4
    gen_tokens: int = 16
    prompt_tokens: int = 32
    dtype: torch.dtype = torch.float32
    activation_quant: bool = True
    keep_packed: bool = False
    perf: bool | Any = True
    thresholds: Thresholds | dict | None = None
    task: str | None = None
    max_sentences: int = 128
    batch_size: int = 16
    perf_models: Sequence[str] = ("original", "candidate")
    reference_cache: str | os.PathLike | bool | None = None
    reference_precision: str = "float32"
    perf_packed: bool = False
    lm_eval_tasks: Sequence[str] = ()
    lm_eval_limit: int | None = 200
    stage_tokens: int | None = None
    progress: bool = False

    @property
    def load(self) -> dict:
        """How ``runtime.load.load_model`` loads both models."""
        return dict(dtype=self.dtype, task=self.task, activation_quant=self.activation_quant,
                    keep_packed=self.keep_packed)


def evaluate(
    original: Source | str | os.PathLike,
    candidate: Source | str | os.PathLike,
    settings: EvaluationSettings | None = None,
    **options: Any,
) -> EvaluationRecord:
    """Compare ``candidate`` with ``original`` on the same text; return the full record.

    ``original``, ``candidate``: Parquet files, HF directories or hub ids (same architecture and
    vocabulary). ``settings`` and ``options`` (the fields of :class:`EvaluationSettings` as keywords,
    which override ``settings``) say how.

    Raises:
        ValueError: different architectures or vocabularies (naming both models), empty texts, or
            an evaluation text shorter than one window (saying how many tokens are needed).
    """
    start = time.perf_counter()
    s = dataclasses.replace(settings or EvaluationSettings(), **options)
    thresholds = Thresholds(**s.thresholds) if isinstance(s.thresholds, dict) else s.thresholds or Thresholds()
    user_texts = check_texts(s.texts)
    unknown = set(s.perf_models) - {"original", "candidate"}
    if unknown:
        raise ValueError(f"perf_models may name 'original' and 'candidate', got {sorted(unknown)}")
    if s.context_length < 1:
        raise ValueError(f"context_length must be >= 1, got {s.context_length}")
    original, candidate = Source.of(original), Source.of(candidate)
    orig_config = read_config(original)
    check_compatible(original, candidate, orig_config, read_config(candidate))

    from llm_workbook import corpus as corpus_module

    source_texts = user_texts or corpus_module.load_texts(s.corpus, "eval")
    recorded: dict[str, Any] = {
        "corpus": None if user_texts else s.corpus, "num_texts": len(source_texts),
        "dtype": str(s.dtype).removeprefix("torch."), "activation_quant": s.activation_quant,
        "keep_packed": s.keep_packed, "task": s.task,
    }
    if s.perf:  # the speed runs' process server imports while the models are scored
        from llm_workbook.evaluation.measure import start_child_server

        start_child_server()
    scored = _score_causal if is_causal(orig_config, s.task) else _score_encoder
    metrics, orig_info, cand_info, sizes = scored(original, candidate, s, source_texts, user_texts, recorded)
    return EvaluationRecord(
        schema_version=SCHEMA_VERSION,
        created_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        kind=orig_info.kind,
        original=orig_info.as_dict(),
        candidate=cand_info.as_dict(),
        settings=recorded,
        metrics=metrics,
        sizes=sizes,
        thresholds=asdict(thresholds),
        verdict=judge(metrics, thresholds),
        perf=_perf_block(original, candidate, s, cand_info) if s.perf else None,
        versions=_versions(),
        machine=_machine(),
        elapsed_seconds=time.perf_counter() - start,
    )


def _estimates(intervals: dict) -> dict:
    """The metrics ``judge`` reads, from the intervals alone (for deciding whether to score on)."""
    def est(name):
        return (intervals.get(name) or {}).get("estimate")

    ppl = est("ppl_change_percent")
    return {"cosine_similarity": est("cosine"), "ppl": {"delta_percent": ppl} if ppl is not None else {},
            "kld": {"mean": est("kld_mean")}, "top1_agreement": est("top1_agreement"), "intervals": intervals}


def _check_same_kind(original: Source, candidate: Source, orig_info, cand_info) -> None:
    if orig_info.kind != cand_info.kind or orig_info.architecture != cand_info.architecture:
        raise EvaluationFault(f"original '{original}' loads as {orig_info.architecture} but candidate '{candidate}' "
                              f"as {cand_info.architecture}: different architectures")


def _prompts(tokenizer, ids: torch.Tensor, s: EvaluationSettings) -> list[torch.Tensor]:
    if isinstance(s.generation_prompts, int):
        return _default_prompts(ids, s.generation_prompts, s.prompt_tokens)
    from llm_workbook.corpus import encode_text

    prompts = [torch.tensor(encode_text(tokenizer, p), dtype=torch.long) for p in s.generation_prompts]
    empty = [i for i, p in enumerate(prompts) if p.numel() == 0]
    if empty:
        raise ValueError(f"generation_prompts[{empty[0]}] encodes to no tokens")
    return prompts


def _score_causal(original: Source, candidate: Source, s: EvaluationSettings, source_texts: list[str],
                  user_texts: list[str] | None, recorded: dict):
    """One model in memory at a time: the original's side comes from the cache (or is computed and stored
    first), then the candidate is loaded and scored against it."""
    tokenizer = load_tokenizer(original)
    check_tokenizers(original, candidate, tokenizer, load_tokenizer(candidate))
    ids = _token_stream(tokenizer, source_texts, s.max_eval_tokens, s.context_length)
    prompts = _prompts(tokenizer, ids, s)
    windows = M.plan_perplexity_windows(ids.numel(), s.context_length, s.stride)
    recorded.update({"context_length": s.context_length, "stride": s.stride or s.context_length,
                     "max_eval_tokens": s.max_eval_tokens, "eval_tokens": int(ids.numel()), "gen_tokens": s.gen_tokens,
                     "num_prompts": len(prompts)})
    tasks = tuple(s.lm_eval_tasks)
    recorded.update({"lm_eval_tasks": list(tasks), "lm_eval_limit": s.lm_eval_limit})
    ref, orig_info, recorded["reference_cache"] = original_side(original, ids, windows, prompts, s.gen_tokens, s.load,
                                                                s.reference_cache, s.reference_precision,
                                                                tasks=tasks, task_limit=s.lm_eval_limit,
                                                                tokenizer=tokenizer, progress=s.progress)
    recorded["reference_precision"] = s.reference_precision
    cand_model, cand_info = load_model(candidate, **s.load)
    return_freed_memory()  # what loading it left behind (dequantization temporaries)
    _check_same_kind(original, candidate, orig_info, cand_info)
    thresholds = Thresholds(**s.thresholds) if isinstance(s.thresholds, dict) else s.thresholds or Thresholds()

    def decided(intervals: dict) -> bool:
        return judge(_estimates(intervals), thresholds)["outcome"] != INCONCLUSIVE

    metrics = causal_metrics(ref, cand_model, ids, windows, prompts, s.gen_tokens, s.stage_tokens,
                             decided if s.stage_tokens else None, progress=s.progress)
    recorded["stage_tokens"] = s.stage_tokens
    if tasks:
        metrics["tasks"] = task_metrics(ref, cand_model, tokenizer, tasks, s.lm_eval_limit)
    metrics["weight_error"] = weight_errors(OriginalWeights(original, s.dtype), cand_model, cand_info.quantized_layers)
    sizes = _sizes(original, candidate, orig_info, cand_info)  # while the candidate (and any temporary conversion of it) exists
    return metrics, orig_info, cand_info, sizes


def _score_encoder(original: Source, candidate: Source, s: EvaluationSettings, source_texts: list[str],
                   user_texts: list[str] | None, recorded: dict):
    orig_model, orig_info = load_model(original, **s.load)
    cand_model, cand_info = load_model(candidate, **s.load)
    _check_same_kind(original, candidate, orig_info, cand_info)
    tokenizer = load_tokenizer(original, orig_model)
    check_tokenizers(original, candidate, tokenizer, load_tokenizer(candidate, cand_model))
    sentences = _sentences(user_texts, s.max_sentences) if user_texts else split_sentences(source_texts)[:s.max_sentences]
    if not sentences:
        raise ValueError("no usable sentences to embed")
    recorded.update({"max_length": s.context_length, "num_sentences": len(sentences), "batch_size": s.batch_size})
    metrics = encoder_metrics(orig_model, cand_model, tokenizer, sentences, s.context_length, s.batch_size)
    metrics["weight_error"] = weight_errors(orig_model, cand_model, cand_info.quantized_layers)
    return metrics, orig_info, cand_info, _sizes(original, candidate, orig_info, cand_info)  # the models go before perf runs


def _perf_block(original: Source, candidate: Source, s: EvaluationSettings, cand_info) -> dict:
    from llm_workbook.evaluation import perf as perf_module

    settings = s.perf if isinstance(s.perf, perf_module.PerfSettings) else perf_module.PerfSettings()
    # the Parquet-vs-HF load comparison is the candidate's question; the original is measured for reference
    original_settings = dataclasses.replace(settings, compare_hf_load=False)
    jobs = [(name, src, s.load, how) for name, src, how in (("original", original, original_settings),
                                                            ("candidate", candidate, settings))
            if name in s.perf_models]
    if s.perf_packed and "candidate" in s.perf_models and not s.keep_packed and cand_info.quantized_layers:
        # Memory as a deployment would hold it: the stored codes stay packed, each Linear dequantizes
        # its weight per call (its latency cost shows here too).
        jobs.append(("candidate_packed", candidate, {**s.load, "keep_packed": True},
                     dataclasses.replace(settings, compare_hf_load=False)))
    block = {}
    for name, src, load, how in tqdm(jobs, desc="speed and memory (a process per figure)", unit="model",
                                     disable=not s.progress):
        block[name] = perf_module.measure(src, **load, settings=how)
    return block


__all__ = ["EvaluationSettings", "evaluate"]
