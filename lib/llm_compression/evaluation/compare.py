"""Measure a candidate (quantized) model against its original on the same text: one JSON record per run.

``evaluate(original, candidate)`` loads both (``runtime.load_model``: Parquet files, HF directories or
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
import json
import math
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from llm_compression import cache_root
from llm_compression.evaluation import metrics as M
from llm_compression.evaluation import reference
from llm_compression.runtime.embeddings import pool_embeddings, split_sentences
from llm_compression.runtime.load import (
    is_parquet,
    load_model,
    load_tokenizer,
    read_config,
)
from llm_compression.runtime.packed import PackedLinear
from llm_compression.store.loader import WeightLoaderV2

SCHEMA_VERSION = "1.0"
# Config fields that must agree for two checkpoints to be the same architecture.
ARCHITECTURE_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


# ============================================================================================
# Thresholds and verdict
# ============================================================================================


@dataclass
class Thresholds:
    """Pass/fail limits; None switches a check off.

    ``cosine``: minimum mean cosine (last hidden state for causal LMs, sentence embedding for
    encoders). ``ppl_increase``: maximum perplexity increase as a fraction (0.15 = 15 %).
    ``kld``: maximum mean KL divergence (nats). ``top1``: minimum top-1 agreement.
    """

    cosine: float | None = 0.95
    ppl_increase: float | None = 0.15
    kld: float | None = None
    top1: float | None = None


def _check(name: str, value: float | None, threshold: float | None, higher_is_better: bool, reason: str) -> dict:
    if threshold is None:
        return {"name": name, "value": value, "threshold": None, "passed": None, "note": "no threshold"}
    if value is None:
        return {"name": name, "value": None, "threshold": threshold, "passed": None, "note": "not applicable to this model"}
    ok = value >= threshold if higher_is_better else value <= threshold  # NaN fails both ways
    return {"name": name, "value": value, "threshold": threshold, "passed": bool(ok), "note": None if ok else reason}


def judge(metrics: dict, thresholds: Thresholds) -> dict:
    """The verdict: every check with its value and threshold, ``passed`` and one reason per failure."""
    cos = metrics.get("cosine_similarity")
    ppl = (metrics.get("ppl") or {}).get("delta_percent")
    ppl_frac = None if ppl is None else ppl / 100.0
    kld = (metrics.get("kld") or {}).get("mean")
    top1 = metrics.get("top1_agreement")
    basis = metrics.get("cosine_basis", "")
    checks = [
        _check("cosine", cos, thresholds.cosine, True, f"cosine {cos:.4f} < {thresholds.cosine} ({basis})" if cos is not None and thresholds.cosine is not None else ""),
        _check("ppl_increase", ppl_frac, thresholds.ppl_increase, False,
               f"ppl increase {_percent(100 * ppl_frac)} > {100 * thresholds.ppl_increase:.2f}%" if ppl_frac is not None and thresholds.ppl_increase is not None else ""),
        _check("kld", kld, thresholds.kld, False, f"kld mean {kld:.4g} > {thresholds.kld}" if kld is not None and thresholds.kld is not None else ""),
        _check("top1", top1, thresholds.top1, True, f"top-1 agreement {top1:.4f} < {thresholds.top1}" if top1 is not None and thresholds.top1 is not None else ""),
    ]
    reasons = [c["note"] for c in checks if c["passed"] is False]
    return {"passed": not reasons, "reasons": reasons, "checks": checks}


# ============================================================================================
# The record
# ============================================================================================


def _encode(value: Any) -> Any:
    """JSON-safe copy: non-finite floats become the strings "inf", "-inf", "nan"."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    return value


_NON_FINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def _decode(value: Any) -> Any:
    if isinstance(value, str) and value in _NON_FINITE:
        return _NON_FINITE[value]
    if isinstance(value, dict):
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


@dataclass
class EvaluationRecord:
    """One evaluation run (schema: docs/evaluation_record.md)."""

    schema_version: str
    created_at: str
    kind: str  # "causal-lm" or "encoder"
    original: dict  # ModelInfo of the original
    candidate: dict  # ModelInfo of the candidate
    settings: dict
    metrics: dict
    sizes: dict
    thresholds: dict
    verdict: dict
    perf: dict | None = None
    versions: dict = field(default_factory=dict)
    machine: dict = field(default_factory=dict)
    elapsed_seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return bool(self.verdict.get("passed"))

    def to_dict(self) -> dict:
        return _encode(asdict(self))

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """The record as JSON text (non-finite floats as "inf"/"-inf"/"nan"); also written to ``path`` if given."""
        text = json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "EvaluationRecord":
        """Read a record written by ``to_json`` (a path, or the JSON text itself)."""
        text = str(path)
        if not text.lstrip().startswith("{"):
            text = Path(path).read_text(encoding="utf-8")
        raw = _decode(json.loads(text))
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known) if isinstance(raw, dict) else []
        if not isinstance(raw, dict) or unknown:
            raise ValueError(f"{path}: not an evaluation record (unknown fields {unknown})")
        try:
            return cls(**raw)
        except TypeError as exc:
            raise ValueError(f"{path}: not an evaluation record ({exc})") from None


# ============================================================================================
# Input checks
# ============================================================================================


class EvaluationFault(ValueError):
    """The two models cannot be compared, or the candidate computes garbage (NaN/Inf): the run fails with this
    reason instead of raising out of the notebook."""


def _percent(pct: float) -> str:
    """``23.00%``, and an exploded perplexity as ``x 316,333`` rather than ``31633168.43%``."""
    return f"x {1 + pct / 100:,.0f}" if pct >= 1000 else f"{pct:.2f}%"


def check_compatible(original: str, candidate: str, orig_config: dict, cand_config: dict) -> None:
    """EvaluationFault naming both models when their architecture or vocabulary differ."""
    for key in ARCHITECTURE_FIELDS:
        a, b = orig_config.get(key), cand_config.get(key)
        if a is not None and b is not None and a != b:
            raise EvaluationFault(f"original {original!r} and candidate {candidate!r} are different architectures: "
                             f"{key} {a!r} vs {b!r}")
    arch_a, arch_b = orig_config.get("architectures"), cand_config.get("architectures")
    if arch_a and arch_b and arch_a[0] != arch_b[0]:
        raise EvaluationFault(f"original {original!r} and candidate {candidate!r} are different architectures: "
                         f"{arch_a[0]} vs {arch_b[0]}")
    va, vb = orig_config.get("vocab_size"), cand_config.get("vocab_size")
    if va != vb:
        raise EvaluationFault(f"original {original!r} has vocab_size {va} but candidate {candidate!r} has {vb}: "
                         "their outputs cannot be compared token by token")


def _check_tokenizers(original: str, candidate: str, tok_a, tok_b) -> None:
    if tok_a.get_vocab() != tok_b.get_vocab():
        raise EvaluationFault(f"original {original!r} and candidate {candidate!r} have different tokenizer vocabularies "
                         f"({len(tok_a)} vs {len(tok_b)} entries)")


def _check_texts(texts: Sequence[str] | None) -> list[str]:
    if texts is None:
        return []
    if isinstance(texts, str):
        raise ValueError("texts must be a list of strings, got a single string")
    texts = list(texts)
    if not texts:
        raise ValueError("texts is empty: give at least one text to evaluate on (or texts=None for the corpus)")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise ValueError(f"texts[{bad[0]}] is not a string")
    if not any(t.strip() for t in texts):
        raise ValueError("texts holds only empty strings: nothing to evaluate on")
    return texts


# ============================================================================================
# Running the models
# ============================================================================================


def _forward(model: nn.Module, **inputs) -> tuple[Any, torch.Tensor]:
    """Model output and the base model's last hidden state (captured by a hook, post final norm)."""
    captured: dict[str, torch.Tensor] = {}

    def hook(_module, _args, output):
        captured["h"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    handle = model.base_model.register_forward_hook(hook)
    try:
        with torch.inference_mode():
            output = model(**inputs)
    finally:
        handle.remove()
    return output, captured["h"]


def _window_nll(logits: torch.Tensor, targets_with_first: torch.Tensor) -> float:
    """Sum of NLL of ``targets_with_first[1:]`` under ``logits`` rows ``[n, V]`` (row i predicts target i+1).

    Uses ``metrics.perplexity_from_logits``: a copy of the last row is appended because that function
    scores inside one sequence and never reads its last row.
    """
    padded = torch.cat([logits, logits[-1:]], dim=0)
    result = M.perplexity_from_logits(padded, targets_with_first)
    return result.mean_nll * result.num_tokens


def _safe_exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def _scored_outputs(model: nn.Module, ids: torch.Tensor, w, who: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and last hidden state of the tokens a window scores; NaN/Inf logits are an evaluation fault."""
    out, hidden = _forward(model, input_ids=ids[w.begin : w.end].unsqueeze(0), use_cache=False)
    off = w.score_from - w.begin
    logits = out.logits[0, off:]
    if not bool(torch.isfinite(logits).all()):
        raise EvaluationFault(f"the {who} computes {int((~torch.isfinite(logits)).sum())} NaN/Inf logits in the window "
                              f"at tokens {w.begin}-{w.end}: its weights or scales are broken")
    return logits, hidden[0, off:]


def _reference_side(orig: nn.Module, ids: torch.Tensor, windows, prompts: list[torch.Tensor],
                    gen_tokens: int, precision: str = "float32") -> tuple[dict[str, torch.Tensor], float]:
    """The original's outputs on every window and prompt (see ``reference``), and its summed NLL."""
    tensors: dict[str, torch.Tensor] = {}
    nll = 0.0
    for i, w in enumerate(windows):
        logits, hidden = _scored_outputs(orig, ids, w, "original")
        nll += _window_nll(logits, ids[w.score_from : w.end + 1])
        tensors.update({f"{k}.{i}": v for k, v in reference.window_outputs(logits, hidden, precision).items()})
    if gen_tokens > 0:
        for j, prompt in enumerate(prompts):
            tensors[f"gen.{j}"] = M.greedy_generate(orig, prompt, gen_tokens).to(torch.int64)
    return tensors, nll


def _causal_metrics(ref: "reference.ReferenceSide", cand: nn.Module, ids: torch.Tensor, windows,
                    prompts: list[torch.Tensor], gen_tokens: int) -> dict:
    """The candidate scored against the original's stored side, window by window."""
    hidden_cos, logit_cos, klds, matches = [], [], [], []
    nll_cand = 0.0
    for i, w in enumerate(windows):
        lb, hb = _scored_outputs(cand, ids, w, "candidate")
        side = ref.window(i)
        la = reference.logits_of(side)
        hidden_cos.append(M.token_cosine(side["hidden"], hb.float()))
        logit_cos.append(M.token_cosine(la, lb.float()))
        kld, _ = M.token_kl_divergence(la, lb)
        klds.append(kld)
        matches.append(side["top1"].long() == lb.argmax(dim=-1))
        nll_cand += _window_nll(lb, ids[w.score_from : w.end + 1])
    num_tokens = ids.numel() - 1
    kld_stats = M.KLDStats.from_values(torch.cat(klds), torch.cat(matches))
    ppl_a = _safe_exp(ref.nll_sum / num_tokens)
    ppl_b = _safe_exp(nll_cand / num_tokens)
    hidden = M.CosineStats.from_values(torch.cat(hidden_cos))
    return {
        "cosine_similarity": hidden.mean,
        "cosine_basis": "last_hidden_state",
        "hidden_cosine": hidden.as_dict(),
        "logits_cosine": M.CosineStats.from_values(torch.cat(logit_cos)).as_dict(),
        "kld": kld_stats.as_dict(),
        "top1_agreement": kld_stats.top1_agreement,
        "ppl": {
            "original": ppl_a,
            "candidate": ppl_b,
            "delta_percent": M.ppl_delta_percent(ppl_a, ppl_b) if math.isfinite(ppl_a) and ppl_a > 0 else math.nan,
            "num_tokens": num_tokens,
            "num_windows": len(windows),
        },
        "generation": _generation(ref, cand, prompts, gen_tokens),
    }


def _is_causal(config: dict, task: str | None) -> bool:
    """As ``runtime.load_model`` decides: the task if given, else the architectures (none: a causal LM)."""
    if task is not None:
        return task == "causal-lm"
    architectures = config.get("architectures") or []
    return not architectures or any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)


def _original_side(original: str, ids: torch.Tensor, windows, prompts: list[torch.Tensor], gen_tokens: int,
                   load: dict, cache: str | os.PathLike | bool | None, precision: str = "float32"):
    """The original's side: read from the cache when the same inputs were scored before, else computed
    (with only the original in memory) and stored. Returns (side, the original's ModelInfo, cache note)."""
    from llm_compression.runtime.load import ModelInfo

    payload = {
        "original": reference.source_identity(original),
        "ids": reference.cache_key({"ids": ids.tolist()}),
        "windows": [(w.begin, w.end, w.score_from) for w in windows],
        "prompts": reference.cache_key({"p": [p.tolist() for p in prompts]}), "gen_tokens": gen_tokens,
        "load": {k: str(v) for k, v in load.items()}, "torch": torch.__version__, "precision": precision,
    }
    path = None
    if cache is not False:
        root = Path(cache) if cache not in (None, True) else _default_cache_dir()
        path = root / f"{reference.cache_key(payload)}.safetensors"
        side = reference.load(path)
        if side is not None:
            return side, ModelInfo(**side.meta["original"]), f"reused {path}"
    model, info = load_model(original, **load)
    tensors, nll = _reference_side(model, ids, windows, prompts, gen_tokens, precision)
    del model
    meta = {"nll_sum": nll, "original": info.as_dict(), "key": payload, "precision": precision}
    if path is None:
        import tempfile

        path = Path(tempfile.mkdtemp(prefix="llmc-reference-")) / "reference.safetensors"
        note = "computed, not kept"
    else:
        note = f"computed and stored {path}"
    return reference.save(path, tensors, meta), info, note


def _default_cache_dir() -> Path:
    return cache_root() / "reference"


def _generation(ref: "reference.ReferenceSide", cand: nn.Module, prompts: list[torch.Tensor],
                gen_tokens: int) -> dict | None:
    if gen_tokens <= 0 or not prompts:
        return None
    per_prompt = []
    for j, prompt in enumerate(prompts):
        expected = ref.generation(j)
        got = M.greedy_generate(cand, prompt, gen_tokens)
        per_prompt.append(M.generation_agreement(expected, got).as_dict())
    agreements = [p["agreement"] for p in per_prompt]
    return {
        "agreement": sum(agreements) / len(agreements),
        "min_agreement": min(agreements),
        "exact_matches": sum(p["first_divergence"] is None for p in per_prompt),
        "num_prompts": len(per_prompt),
        "gen_tokens": gen_tokens,
        "prompt_tokens": [int(p.numel()) for p in prompts],
        "per_prompt": per_prompt,
    }


def _encoder_metrics(orig: nn.Module, cand: nn.Module, tokenizer, sentences: list[str], max_length: int,
                     batch_size: int) -> dict:
    """One pass per batch and model: token-state cosine and sentence-embedding cosine (as
    ``runtime.sentence_embeddings`` pools them)."""
    emb_a, emb_b, token_cos = [], [], []
    for start in range(0, len(sentences), batch_size):
        batch = tokenizer(sentences[start : start + batch_size], padding=True, truncation=True,
                          max_length=max_length, return_tensors="pt")
        _, h_a = _forward(orig, **batch)
        _, h_b = _forward(cand, **batch)
        token_cos.append(M.token_cosine(h_a, h_b, batch["attention_mask"]))
        emb_a.append(pool_embeddings(h_a, batch["attention_mask"]))
        emb_b.append(pool_embeddings(h_b, batch["attention_mask"]))
    emb = M.embedding_cosine(torch.cat(emb_a), torch.cat(emb_b))
    return {
        "cosine_similarity": emb.mean,
        "cosine_basis": "sentence_embedding",
        "embedding_cosine": {"mean": emb.mean, "min": emb.min,
                             "p5": M.CosineStats.from_values(torch.tensor(emb.per_sentence)).p5, "count": emb.count},
        "hidden_cosine": M.CosineStats.from_values(torch.cat(token_cos)).as_dict(),
    }


class _OriginalWeights:
    """The original's weights by module name, read from its file one at a time (the model is not loaded)."""

    def __init__(self, source: str, dtype: torch.dtype):
        self.dtype = dtype
        if is_parquet(source):
            self.loader = WeightLoaderV2(source)
            self.names = set(self.loader.keys())
        else:
            from llm_compression.store.sources import open_checkpoint, resolve_source

            self.loader = open_checkpoint(resolve_source(source))
            self.names = set(self.loader.tensors)

    def get(self, module: str) -> torch.Tensor | None:
        prefixes = ("", "model.", "bert.")
        for name in [f"{p}{module}.weight" for p in prefixes] + [f"{module.split('.', 1)[-1]}.weight"]:
            if name in self.names:
                if isinstance(self.loader, WeightLoaderV2):
                    layer, weight = name.rsplit(".", 1)
                    return self.loader.load_weight(layer, weight, dtype=self.dtype)
                tensor = self.loader.read(name)
                return tensor.to(self.dtype) if tensor.is_floating_point() else None
        return None


def _weight_errors(orig: "nn.Module | _OriginalWeights", cand: nn.Module, cand_quantized: dict[str, str]) -> dict:
    """Relative error and SQNR of every quantized weight of the candidate against the original's weight
    of the same module (all Linear weights when the candidate stores none quantized)."""
    if isinstance(orig, nn.Module):
        orig_weights = {n: getattr(m, "weight", None) for n, m in orig.named_modules()}
        weight_of = orig_weights.get
    else:
        weight_of = orig.get
    cand_modules = dict(cand.named_modules())
    if cand_quantized:
        scope, names = "quantized", list(cand_quantized)
    else:
        scope = "linear"
        names = [n for n, m in cand_modules.items() if isinstance(m, (nn.Linear, PackedLinear))]
    tensors, skipped = [], []
    for name in names:
        wa, wb = weight_of(name), getattr(cand_modules.get(name), "weight", None)
        if wa is None or wb is None or tuple(wa.shape) != tuple(wb.shape):
            skipped.append(name)
            continue
        err = M.weight_error(wa.detach(), wb.detach())
        tensors.append({"name": f"{name}.weight", "shape": list(wb.shape), "format": cand_quantized.get(name, "dense"),
                        "relative_error": err.relative_frobenius, "max_abs_error": err.max_abs_error,
                        "sqnr_db": err.sqnr_db})
    summary: dict[str, Any] = {"scope": scope, "count": len(tensors), "skipped": skipped, "tensors": tensors}
    if tensors:
        sqnr = [t["sqnr_db"] for t in tensors]
        finite = [v for v in sqnr if math.isfinite(v)]
        summary.update({
            "min_sqnr_db": min(sqnr),
            "mean_sqnr_db": sum(finite) / len(finite) if finite else min(sqnr),  # over tensors that changed
            "exact_tensors": sum(v == math.inf for v in sqnr),
            "max_relative_error": max(t["relative_error"] for t in tensors),
        })
    return summary


# ============================================================================================
# evaluate
# ============================================================================================


def _token_stream(tokenizer, texts: list[str], max_eval_tokens: int, context_length: int) -> torch.Tensor:
    from llm_compression.corpus import TEXT_SEPARATOR, encode_text

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


def _sizes(orig_info, cand_info) -> dict:
    sizes = {"original": _size(orig_info), "candidate": _size(cand_info)}
    if sizes["original"].get("file_bytes"):
        sizes["candidate_vs_original_bytes"] = sizes["candidate"]["file_bytes"] / sizes["original"]["file_bytes"]
    return sizes


def _size(info) -> dict:
    """Size on disk of the model as given; bits per weight from the Parquet file when there is one
    (a quantized HF directory's temporary conversion counts quantized groups by their real shape)."""
    from llm_compression.evaluation import perf as perf_module

    size = perf_module.model_size(info.source)
    if info.converted and info.parquet and Path(info.parquet).is_file():
        exact = perf_module.model_size(info.parquet)
        for key in ("parameters", "bits_per_weight", "compression_vs_bf16", "quantized_bits_per_weight", "formats"):
            size[key] = exact[key]
    return size


def _versions() -> dict:
    import transformers

    from llm_compression import __version__

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "llm_compression": __version__}


def _machine() -> dict:
    import psutil

    return {"cpu_count": os.cpu_count(), "ram_bytes": psutil.virtual_memory().total, "platform": platform.platform(),
            "machine": platform.machine(), "torch_threads": torch.get_num_threads()}


def evaluate(
    original: str | os.PathLike,
    candidate: str | os.PathLike,
    texts: Sequence[str] | None = None,
    corpus: str = "pydoc",
    context_length: int = 256,
    stride: int | None = None,
    max_eval_tokens: int = 2048,
    generation_prompts: Sequence[str] | int = 4,
    gen_tokens: int = 16,
    prompt_tokens: int = 32,
    dtype: torch.dtype = torch.float32,
    activation_quant: bool = True,
    keep_packed: bool = False,
    perf: bool | Any = True,
    thresholds: Thresholds | dict | None = None,
    task: str | None = None,
    max_sentences: int = 128,
    batch_size: int = 16,
    perf_models: Sequence[str] = ("original", "candidate"),
    reference_cache: str | os.PathLike | bool | None = None,
    reference_precision: str = "float32",
    perf_packed: bool = True,
) -> EvaluationRecord:
    """Compare ``candidate`` with ``original`` on the same text; return the full record.

    Args:
        original, candidate: Parquet files, HF directories or hub ids (same architecture and vocabulary).
        texts: evaluation texts; None takes the eval split of ``corpus`` (``corpus.load_texts``).
        context_length, stride: perplexity windows (tokens per model call; stride defaults to
            context_length). For encoders, the truncation length of each sentence.
        max_eval_tokens: tokens scored at most (the text is cut after that many).
        generation_prompts: prompt strings, or how many prompts of ``prompt_tokens`` tokens to take
            from the evaluation text; ``gen_tokens`` greedy tokens are compared for each (0: skip).
        dtype, activation_quant, keep_packed, task: passed to ``runtime.load_model`` for both models.
        perf: True, False or a ``perf.PerfSettings``: measure load time, latency and memory, each
            figure in a fresh subprocess, of the models named in ``perf_models``. ``perf_packed``: the
            candidate also with its weights kept packed (``perf["candidate_packed"]``), where it has
            quantized layers: the memory it would really take, beside the dequantized runtime's.
        thresholds: ``Thresholds`` (or a dict of its fields) for the verdict; default cosine >= 0.95
            and perplexity increase <= 15 %.
        max_sentences, batch_size: encoder sentences used at most, and the batch size for them.
        reference_cache: where the original's side of a causal-LM comparison is kept (``reference``):
            None takes ``<cache>/reference`` (``$LLMC_CACHE_DIR`` or the repository's ``.cache``), False
            computes it without storing it. ``reference_precision``: ``float32`` logits (exact) or
            ``float16`` log-probs (half the disk; KL divergence within 1e-3 relative).

    Raises:
        ValueError: different architectures or vocabularies (naming both models), empty texts, or
            an evaluation text shorter than one window (saying how many tokens are needed).
    """
    start = time.perf_counter()
    if isinstance(thresholds, dict):
        thresholds = Thresholds(**thresholds)
    thresholds = thresholds or Thresholds()
    user_texts = _check_texts(texts)
    unknown = set(perf_models) - {"original", "candidate"}
    if unknown:
        raise ValueError(f"perf_models may name 'original' and 'candidate', got {sorted(unknown)}")
    if context_length < 1:
        raise ValueError(f"context_length must be >= 1, got {context_length}")
    original, candidate = str(original), str(candidate)
    orig_config = read_config(original)
    check_compatible(original, candidate, orig_config, read_config(candidate))
    load = dict(dtype=dtype, task=task, activation_quant=activation_quant, keep_packed=keep_packed)

    from llm_compression import corpus as corpus_module

    source_texts = user_texts or corpus_module.load_texts(corpus, "eval")
    settings: dict[str, Any] = {
        "corpus": None if user_texts else corpus, "num_texts": len(source_texts), "dtype": str(dtype).removeprefix("torch."),
        "activation_quant": activation_quant, "keep_packed": keep_packed, "task": task,
    }
    if _is_causal(orig_config, task):
        # One model in memory at a time: the original's side comes from the cache (or is computed and
        # stored first), then the candidate is loaded and scored against it.
        tokenizer = load_tokenizer(original)
        _check_tokenizers(original, candidate, tokenizer, load_tokenizer(candidate))
        ids = _token_stream(tokenizer, source_texts, max_eval_tokens, context_length)
        if isinstance(generation_prompts, int):
            prompts = _default_prompts(ids, generation_prompts, prompt_tokens)
        else:
            from llm_compression.corpus import encode_text

            prompts = [torch.tensor(encode_text(tokenizer, p), dtype=torch.long) for p in generation_prompts]
            empty = [i for i, p in enumerate(prompts) if p.numel() == 0]
            if empty:
                raise ValueError(f"generation_prompts[{empty[0]}] encodes to no tokens")
        windows = M.plan_perplexity_windows(ids.numel(), context_length, stride)
        settings.update({"context_length": context_length, "stride": stride or context_length,
                         "max_eval_tokens": max_eval_tokens, "eval_tokens": int(ids.numel()), "gen_tokens": gen_tokens,
                         "num_prompts": len(prompts)})
        ref, orig_info, settings["reference_cache"] = _original_side(original, ids, windows, prompts, gen_tokens, load,
                                                                     reference_cache, reference_precision)
        settings["reference_precision"] = reference_precision
        cand_model, cand_info = load_model(candidate, **load)
        if orig_info.kind != cand_info.kind or orig_info.architecture != cand_info.architecture:
            raise EvaluationFault(f"original {original!r} loads as {orig_info.architecture} but candidate {candidate!r} "
                                  f"as {cand_info.architecture}: different architectures")
        metrics = _causal_metrics(ref, cand_model, ids, windows, prompts, gen_tokens)
        metrics["weight_error"] = _weight_errors(_OriginalWeights(original, dtype), cand_model, cand_info.quantized_layers)
        sizes = _sizes(orig_info, cand_info)  # while the candidate (and any temporary conversion of it) exists
        del cand_model
    else:
        orig_model, orig_info = load_model(original, **load)
        cand_model, cand_info = load_model(candidate, **load)
        if orig_info.kind != cand_info.kind or orig_info.architecture != cand_info.architecture:
            raise EvaluationFault(f"original {original!r} loads as {orig_info.architecture} but candidate {candidate!r} "
                                  f"as {cand_info.architecture}: different architectures")
        tokenizer = load_tokenizer(original, orig_model)
        _check_tokenizers(original, candidate, tokenizer, load_tokenizer(candidate, cand_model))
        sentences = _sentences(user_texts, max_sentences) if user_texts else split_sentences(source_texts)[:max_sentences]
        if not sentences:
            raise ValueError("no usable sentences to embed")
        settings.update({"max_length": context_length, "num_sentences": len(sentences), "batch_size": batch_size})
        metrics = _encoder_metrics(orig_model, cand_model, tokenizer, sentences, context_length, batch_size)
        metrics["weight_error"] = _weight_errors(orig_model, cand_model, cand_info.quantized_layers)
        sizes = _sizes(orig_info, cand_info)
        del orig_model, cand_model  # free memory before the perf subprocesses run

    from llm_compression.evaluation import perf as perf_module


    perf_block = None
    if perf:
        perf_settings = perf if isinstance(perf, perf_module.PerfSettings) else perf_module.PerfSettings()
        perf_block = {name: perf_module.measure(src, dtype=dtype, task=task, activation_quant=activation_quant,
                                                keep_packed=keep_packed, settings=perf_settings)
                      for name, src in (("original", original), ("candidate", candidate)) if name in perf_models}
        if perf_packed and "candidate" in perf_models and not keep_packed and cand_info.quantized_layers:
            # Memory as a deployment would hold it: the stored codes stay packed, each Linear dequantizes
            # its weight per call (its latency cost shows here too).
            packed_settings = dataclasses.replace(perf_settings, compare_hf_load=False)
            perf_block["candidate_packed"] = perf_module.measure(candidate, dtype=dtype, task=task,
                                                                 activation_quant=activation_quant, keep_packed=True,
                                                                 settings=packed_settings)

    return EvaluationRecord(
        schema_version=SCHEMA_VERSION,
        created_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        kind=orig_info.kind,
        original=orig_info.as_dict(),
        candidate=cand_info.as_dict(),
        settings=settings,
        metrics=metrics,
        sizes=sizes,
        thresholds=asdict(thresholds),
        verdict=judge(metrics, thresholds),
        perf=perf_block,
        versions=_versions(),
        machine=_machine(),
        elapsed_seconds=time.perf_counter() - start,
    )


__all__ = ["EvaluationFault", "EvaluationRecord", "SCHEMA_VERSION", "Thresholds", "check_compatible", "evaluate", "judge"]
