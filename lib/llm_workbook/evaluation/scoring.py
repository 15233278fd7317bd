"""Scoring a candidate against the original's side, window by window: causal-LM metrics (cosine, KL
divergence, top-1, perplexity, generation), encoder metrics, and per-tensor weight error.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from llm_workbook.paths import cache_root
from llm_workbook.evaluation import metrics as M
from llm_workbook.evaluation import reference
from llm_workbook.evaluation import uncertainty as U
from llm_workbook.evaluation.record import EvaluationFault
from llm_workbook.memory import return_freed_memory
from llm_workbook.runtime.embeddings import pool_embeddings
from llm_workbook.runtime.load import load_model
from llm_workbook.runtime.packed import PackedLinear
from llm_workbook.store.loader import WeightLoaderV2
from llm_workbook.store.source import Source

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
    # one sum is finite exactly when every logit is (short of an overflow, which the exact check clears)
    if not bool(torch.isfinite(logits.sum())) and not bool(torch.isfinite(logits).all()):
        raise EvaluationFault(f"the {who} computes {int((~torch.isfinite(logits)).sum())} NaN/Inf logits in the window "
                              f"at tokens {w.begin}-{w.end}: its weights or scales are broken")
    return logits, hidden[0, off:]


def _token_bar(who: str, ids: torch.Tensor, progress: bool):
    """Tokens scored and time left; tqdm.auto draws a widget in a notebook and text in a terminal."""
    return tqdm(total=ids.numel() - 1, desc=f"{who}: scoring", unit="token", disable=not progress)


def _reference_side(orig: nn.Module, ids: torch.Tensor, windows, prompts: list[torch.Tensor],
                    gen_tokens: int, writer: "reference.SideWriter", precision: str = "float32",
                    progress: bool = False) -> float:
    """The original's outputs on every window and prompt (see ``reference``), each window written as its own
    shard as soon as it is scored; returns the summed NLL."""
    nll = 0.0
    with _token_bar("original", ids, progress) as bar:
        for i, w in enumerate(windows):
            logits, hidden = _scored_outputs(orig, ids, w, "original")
            per_token = M.token_nll(logits, ids[w.score_from + 1 : w.end + 1])
            nll += float(per_token.sum())
            outputs = {**reference.window_outputs(logits, hidden, precision), "nll": per_token}
            writer.add(f"window-{i}", {f"{k}.{i}": v for k, v in outputs.items()})
            del logits, hidden, outputs
            bar.update(per_token.numel())
        if gen_tokens > 0:
            bar.set_description(f"original: generating {len(prompts)} x {gen_tokens} tokens")
            writer.add("generation", {f"gen.{j}": generated.to(torch.int64)
                                      for j, generated in enumerate(_greedy(orig, prompts, gen_tokens))})
    return nll


def _greedy(model: nn.Module, prompts: list[torch.Tensor], gen_tokens: int) -> list[torch.Tensor]:
    """Each prompt's greedy continuation; prompts of one length (the default's) decode as one batch, since a
    decoding step costs the same for one row as for four here."""
    if len({p.numel() for p in prompts}) == 1:
        return list(M.greedy_generate(model, torch.stack(prompts), gen_tokens))
    return [M.greedy_generate(model, p, gen_tokens) for p in prompts]


BLOCK_SERIES = ("nll_original", "nll_candidate", "kld", "top1", "cosine")


def causal_metrics(ref: "reference.ReferenceSide", cand: nn.Module, ids: torch.Tensor, windows,
                   prompts: list[torch.Tensor], gen_tokens: int, stage_tokens: int | None = None,
                   decided=None, progress: bool = False) -> dict:
    """The candidate scored against the original's stored side, window by window, token by token; every
    headline figure with its 95 % interval (``uncertainty``).

    With ``stage_tokens`` and ``decided`` (intervals -> bool), scoring stops at the first stage boundary
    (every ``stage_tokens`` scored tokens) where ``decided`` says the verdict no longer depends on more text;
    the rest of the windows are not scored (``ppl.stopped`` says where and why)."""
    series: dict[str, list[torch.Tensor]] = {}
    logit_cos, last_position = [], []
    scored, next_stage, stopped = 0, stage_tokens, None
    bar = _token_bar("candidate", ids, progress)
    for i, w in enumerate(windows):
        lb, hb = _scored_outputs(cand, ids, w, "candidate")
        side = ref.window(i)
        la = reference.logits_of(side)
        per_token = M.token_comparison(la, lb, ids[w.score_from + 1 : w.end + 1])
        per_token["nll_original"] = side["nll"]  # exact, whatever precision the stored logits have
        per_token["cosine"] = M.token_cosine(side["hidden"], hb.float())
        for key, values in per_token.items():
            series.setdefault(key, []).append(values)
        logit_cos.append(M.token_cosine(la, lb.float()))
        last_position.append(logit_cos[-1][-1:])  # AI-OS's PrecisionValidator: each text's last-position logits
        scored += per_token["kld"].numel()
        bar.update(per_token["kld"].numel())
        if decided is not None and next_stage and scored >= next_stage and i + 1 < len(windows):
            partial = U.block_sums({k: torch.cat(series[k]).to(torch.float64) for k in BLOCK_SERIES})
            if decided(U.intervals(partial)):
                stopped = f"decided at {scored:,} of {ids.numel() - 1:,} tokens"
                break
            next_stage += stage_tokens
    bar.close()
    tokens = {k: torch.cat(v) for k, v in series.items()}
    num_tokens = scored
    expected = ids.numel() - 1 if stopped is None else scored
    if tokens["kld"].numel() != expected:
        raise EvaluationFault(f"scored {tokens['kld'].numel()} tokens of {expected}: the windows do not cover the text")
    kld_stats = M.KLDStats.from_values(tokens["kld"], tokens["top1"])
    ppl_a = _safe_exp(float(tokens["nll_original"].sum()) / num_tokens)
    ppl_b = _safe_exp(float(tokens["nll_candidate"].sum()) / num_tokens)
    hidden = M.CosineStats.from_values(tokens["cosine"])
    blocks = U.block_sums({k: tokens[k].to(torch.float64) for k in BLOCK_SERIES})
    return {
        "cosine_similarity": hidden.mean,
        "cosine_basis": "last_hidden_state",
        "hidden_cosine": hidden.as_dict(),
        "logits_cosine": M.CosineStats.from_values(torch.cat(logit_cos)).as_dict(),
        # AI-OS's PrecisionValidator figure (its Phase 1 "cosine > 0.95"): the L2-normalised logits of the last
        # position of each input, averaged; here one input per window
        "aios_validator_cosine": M.CosineStats.from_values(torch.cat(last_position)).as_dict(),
        "kld": kld_stats.as_dict(),
        "top1_agreement": kld_stats.top1_agreement,
        "ppl": {
            "original": ppl_a,
            "candidate": ppl_b,
            "delta_percent": M.ppl_delta_percent(ppl_a, ppl_b) if math.isfinite(ppl_a) and ppl_a > 0 else math.nan,
            "num_tokens": num_tokens,
            "num_windows": len(series["kld"]),
            "text_tokens": ids.numel() - 1,
            "stopped": stopped or f"all {ids.numel() - 1:,} tokens of the text",
        },
        "intervals": U.intervals(blocks),
        "divergence": U.divergence_statistics(tokens["kld"], tokens["delta_p"], tokens["top1"]),
        "blocks": {"block_tokens": U.BLOCK_TOKENS, **{k: v.tolist() for k, v in blocks.items()}},
        "generation": _generation(ref, cand, prompts, gen_tokens),
    }


def is_causal(config: dict, task: str | None) -> bool:
    """As ``runtime.load.load_model`` decides: the task if given, else the architectures (none: a causal LM)."""
    if task is not None:
        return task == "causal-lm"
    architectures = config.get("architectures") or []
    return not architectures or any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)


def original_side(original: Source, ids: torch.Tensor, windows, prompts: list[torch.Tensor], gen_tokens: int,
                  load: dict, cache: str | os.PathLike | bool | None, precision: str = "float32",
                  tasks: tuple[str, ...] = (), task_limit: int | None = None, tokenizer=None, progress: bool = False):
    """The original's side: read from the cache when the same inputs were scored before, else computed
    (with only the original in memory) and stored. Its lm-eval answers are a cache entry of their own, so runs
    with and without tasks share the scored windows. Returns (side, the original's ModelInfo, cache note)."""
    from llm_workbook.runtime.load import ModelInfo

    common = {"original": reference.source_identity(original), "load": {k: str(v) for k, v in load.items()},
              "torch": torch.__version__}
    payload = {
        **common, "ids": reference.cache_key({"ids": ids.tolist()}),
        "windows": [(w.begin, w.end, w.score_from) for w in windows],
        "prompts": reference.cache_key({"p": [p.tolist() for p in prompts]}), "gen_tokens": gen_tokens,
        "precision": precision,
    }
    task_payload = {**common, "tasks": list(tasks), "task_limit": task_limit}
    root = None if cache is False else Path(cache) if cache not in (None, True) else _default_cache_dir()
    path = root / f"{reference.cache_key(payload)}.reference" if root else None
    task_path = root / f"{reference.cache_key(task_payload)}.tasks" if root and tasks else None
    side = reference.load(path) if path else None
    answers = reference.load(task_path) if task_path else None
    model = info = None
    if side is None or (tasks and answers is None):
        model, info = load_model(original, **load)
    if side is None:
        with reference.writing(path or _scratch_path()) as writer:
            nll = _reference_side(model, ids, windows, prompts, gen_tokens, writer, precision, progress)
            writer.finish({"nll_sum": nll, "original": info.as_dict(), "key": payload, "precision": precision})
        side = writer.side if path else _removed_with(writer.side)
        note = f"computed and stored {path}" if path else "computed, not kept"
    else:
        note = f"reused {path}"
    if tasks and answers is None:
        from llm_workbook.evaluation.tasks import run_tasks

        tensors = {f"task.{name}": torch.from_numpy(a) for name, a in run_tasks(model, tokenizer, tasks, task_limit).items()}
        with reference.writing(task_path or _scratch_path()) as writer:
            writer.add("tasks", tensors)
            writer.finish({"key": task_payload})
        answers = writer.side if task_path else _removed_with(writer.side)
    if model is not None:
        del model
        return_freed_memory()  # the candidate's load stands on a clean heap
    side.answers = answers
    return side, info or ModelInfo(**side.meta["original"]), note


def _scratch_path() -> Path:
    import tempfile

    return Path(tempfile.mkdtemp(prefix="llmc-reference-")) / "entry"


def _removed_with(side: "reference.ReferenceSide") -> "reference.ReferenceSide":
    """An uncached side's scratch directory goes when the side does (or at exit): not kept means not kept."""
    import shutil
    import weakref

    weakref.finalize(side, shutil.rmtree, side.path.parent, True)
    return side


def _default_cache_dir() -> Path:
    return cache_root() / "reference"


def _generation(ref: "reference.ReferenceSide", cand: nn.Module, prompts: list[torch.Tensor],
                gen_tokens: int) -> dict | None:
    if gen_tokens <= 0 or not prompts:
        return None
    per_prompt = [M.generation_agreement(ref.generation(j), got).as_dict()
                  for j, got in enumerate(_greedy(cand, prompts, gen_tokens))]
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


def encoder_metrics(orig: nn.Module, cand: nn.Module, tokenizer, sentences: list[str], max_length: int,
                     batch_size: int) -> dict:
    """One pass per batch and model: token-state cosine and sentence-embedding cosine (as
    ``runtime.embeddings.sentence_embeddings`` pools them)."""
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
        "embedding_cosine": {"mean": emb.mean, "min": emb.min, "max": max(emb.per_sentence),
                             "p5": M.CosineStats.from_values(torch.tensor(emb.per_sentence)).p5, "count": emb.count},
        "hidden_cosine": M.CosineStats.from_values(torch.cat(token_cos)).as_dict(),
        # sentences are independent passages: each is its own block
        "intervals": U.intervals(U.block_sums({"cosine": torch.tensor(emb.per_sentence, dtype=torch.float64)}, block=1)),
    }


def task_metrics(ref: "reference.ReferenceSide", cand: nn.Module, tokenizer, tasks: tuple[str, ...],
                 limit: int | None) -> dict:
    """Per lm-eval task: both accuracies, recovery and flips with their intervals (``evaluation.tasks``)."""
    from llm_workbook.evaluation.tasks import HELDOUT_LAMBADA, compare_items, run_tasks

    answers = run_tasks(cand, tokenizer, tasks, limit)
    out = {}
    for name in tasks:
        original = ref.task(name).numpy()
        label = ("LAMBADA protocol on held-out corpus passages (not the LAMBADA dataset)" if name == HELDOUT_LAMBADA
                 else f"lm-eval task {name}")
        out[name] = {"label": label, **compare_items(original, answers[name])}
    return out


class OriginalWeights:
    """The original's weights by module name, read from its file one at a time (the model is not loaded)."""

    def __init__(self, source: Source | str, dtype: torch.dtype):
        self.dtype = dtype
        source = Source.of(source)
        if source.is_parquet:
            self.loader = source.loader()
            self.names = set(self.loader.keys())
        else:
            self.loader = source.checkpoint()
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


def weight_errors(orig: "nn.Module | OriginalWeights", cand: nn.Module, cand_quantized: dict[str, str]) -> dict:
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
