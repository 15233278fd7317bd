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

from llm_compression import cache_root
from llm_compression.evaluation import metrics as M
from llm_compression.evaluation import reference
from llm_compression.evaluation.record import EvaluationFault
from llm_compression.memory import return_freed_memory
from llm_compression.runtime.embeddings import pool_embeddings
from llm_compression.runtime.load import (
    is_parquet,
    load_model,
)
from llm_compression.runtime.packed import PackedLinear
from llm_compression.store.loader import WeightLoaderV2

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


def causal_metrics(ref: "reference.ReferenceSide", cand: nn.Module, ids: torch.Tensor, windows,
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


def is_causal(config: dict, task: str | None) -> bool:
    """As ``runtime.load.load_model`` decides: the task if given, else the architectures (none: a causal LM)."""
    if task is not None:
        return task == "causal-lm"
    architectures = config.get("architectures") or []
    return not architectures or any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)


def original_side(original: str, ids: torch.Tensor, windows, prompts: list[torch.Tensor], gen_tokens: int,
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
    return_freed_memory()  # the candidate's load stands on a clean heap
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
    }


class OriginalWeights:
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
