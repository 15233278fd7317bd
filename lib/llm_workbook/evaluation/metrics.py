"""Metrics that compare an original model with a quantized candidate on the same inputs.

Every function takes tensors (or, for perplexity and generation, a ``torch.nn.Module`` whose
``model(input_ids).logits`` is a ``[batch, tokens, vocab]`` tensor) and returns plain Python numbers
wrapped in small frozen dataclasses (``.as_dict()`` gives a JSON-ready dict).

Conventions shared by all functions:

* Reductions run in float64, in row chunks, so a ``[B, T, 151k]`` logits tensor never needs a full
  float64 copy.
* Percentiles use linear interpolation between the two nearest ranks (numpy's default method).
* NaN/inf in a candidate propagate into the statistics instead of raising: a broken quantization is
  a measurement, not a programming error.
* Bad shapes or arguments raise ``ValueError`` naming the offending argument.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import torch

from llm_workbook.runtime.embeddings import l2_normalize

__all__ = [
    "CosineStats",
    "EmbeddingCosine",
    "KLDStats",
    "PerplexityResult",
    "PerplexityWindow",
    "GenerationAgreement",
    "WeightError",
    "token_comparison",
    "token_nll",
    "token_cosine",
    "cosine_stats",
    "embedding_cosine",
    "token_kl_divergence",
    "kl_divergence_stats",
    "plan_perplexity_windows",
    "perplexity",
    "perplexity_from_logits",
    "ppl_delta_percent",
    "greedy_generate",
    "generation_agreement",
    "weight_error",
]

# Elements per float64 chunk (~32 MiB): bounds the temporary memory of the row-wise reductions.
_CHUNK_ELEMENTS = 1 << 22


class _Stats:
    def as_dict(self) -> dict:
        """The fields as a plain dict (JSON-ready)."""
        return asdict(self)  # type: ignore[call-overload]


# --------------------------------------------------------------------------------------------
# helpers


def _percentile(sorted_values: torch.Tensor, fraction: float) -> float:
    """Linear-interpolation percentile of an ascending 1-D tensor (numpy 'linear' method)."""
    n = sorted_values.numel()
    position = fraction * (n - 1)
    low = int(math.floor(position))
    high = min(low + 1, n - 1)
    weight = position - low
    lo_val = float(sorted_values[low])
    hi_val = float(sorted_values[high])
    if weight == 0.0:
        return lo_val
    return lo_val + weight * (hi_val - lo_val)


def _check_pair(ref: torch.Tensor, cand: torch.Tensor, ref_name: str, cand_name: str) -> None:
    if not isinstance(ref, torch.Tensor) or not isinstance(cand, torch.Tensor):
        raise ValueError(f"{ref_name} and {cand_name} must be torch tensors")
    if ref.shape != cand.shape:
        raise ValueError(
            f"{ref_name} has shape {tuple(ref.shape)} but {cand_name} has shape {tuple(cand.shape)}"
        )
    if ref.dim() < 1 or ref.shape[-1] == 0:
        raise ValueError(f"{ref_name} must have a non-empty last dimension, got shape {tuple(ref.shape)}")


def _rows(x: torch.Tensor, mask: torch.Tensor | None, name: str) -> torch.Tensor:
    """Flatten ``[..., D]`` to ``[N, D]``, keeping only the rows where ``mask`` is non-zero."""
    rows = x.reshape(-1, x.shape[-1])
    if mask is None:
        return rows
    if tuple(mask.shape) != tuple(x.shape[:-1]):
        raise ValueError(
            f"mask for {name} must have shape {tuple(x.shape[:-1])} (the tensor without its last dim), "
            f"got {tuple(mask.shape)}"
        )
    keep = mask.reshape(-1).to(device=x.device) != 0
    return rows[keep]


def _row_chunks(n_rows: int, row_width: int) -> Iterator[slice]:
    step = max(1, _CHUNK_ELEMENTS // max(1, row_width))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


def _require_tokens(count: int, what: str) -> None:
    if count == 0:
        raise ValueError(f"{what}: no tokens left to compare (empty input or the mask drops everything)")


# --------------------------------------------------------------------------------------------
# 1. per-token cosine similarity


@dataclass(frozen=True)
class CosineStats(_Stats):
    """Summary of per-token cosine similarities."""

    mean: float
    min: float
    p5: float  # 5th percentile: the bad tail, more stable than the single worst token
    count: int
    max: float = float("nan")

    @classmethod
    def from_values(cls, values: torch.Tensor) -> "CosineStats":
        """Summarize a 1-D tensor of per-token cosines (e.g. several batches concatenated)."""
        values = values.reshape(-1).to(torch.float64)
        _require_tokens(values.numel(), "cosine")
        ordered = torch.sort(values).values
        return cls(
            mean=float(values.mean()),
            min=float(ordered[0]),
            p5=_percentile(ordered, 0.05),
            count=int(values.numel()),
            max=float(ordered[-1]),
        )


def token_cosine(ref: torch.Tensor, cand: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Cosine similarity along the last dim for every position of ``[..., D]`` tensors.

    Args:
        ref: reference activations, e.g. hidden states ``[B, T, D]`` or logits ``[B, T, V]``.
        cand: candidate activations, same shape as ``ref``.
        mask: optional ``[...]`` (= ``ref.shape[:-1]``, e.g. an attention mask ``[B, T]``); positions
            where it is 0/False (padding) are dropped.

    Returns:
        1-D float64 tensor with one cosine per kept position, in row-major order.
        Two all-zero vectors count as identical (1.0); one zero vector against a non-zero one gives 0.0.
    """
    _check_pair(ref, cand, "ref", "cand")
    ref_rows = _rows(ref, mask, "ref")
    cand_rows = _rows(cand, mask, "cand")
    out = torch.empty(ref_rows.shape[0], dtype=torch.float64)
    for rows in _row_chunks(ref_rows.shape[0], ref_rows.shape[1]):
        a = ref_rows[rows].to(torch.float64)
        b = cand_rows[rows].to(torch.float64)
        dot = (a * b).sum(dim=-1)
        norm_a = a.norm(dim=-1)
        norm_b = b.norm(dim=-1)
        denom = norm_a * norm_b
        cos = dot / torch.where(denom > 0, denom, torch.ones_like(denom))
        both_zero = (norm_a == 0) & (norm_b == 0)
        cos = torch.where(both_zero, torch.ones_like(cos), cos)
        out[rows] = cos.cpu()
    return out


def cosine_stats(ref: torch.Tensor, cand: torch.Tensor, mask: torch.Tensor | None = None) -> CosineStats:
    """Mean / min / 5th percentile of the per-token cosine (see :func:`token_cosine`)."""
    return CosineStats.from_values(token_cosine(ref, cand, mask))


# --------------------------------------------------------------------------------------------
# 2. sentence-embedding cosine (all-MiniLM-L6-v2 style)


@dataclass(frozen=True)
class EmbeddingCosine(_Stats):
    """Per-sentence cosine of normalized embeddings, with its mean and min."""

    per_sentence: list[float]
    mean: float
    min: float
    count: int


def embedding_cosine(ref_emb: torch.Tensor, cand_emb: torch.Tensor) -> EmbeddingCosine:
    """Cosine between L2-normalized sentence embeddings ``[N, D]`` (or a single ``[D]``), per sentence.

    Both inputs are normalized here (idempotent if they already are), then compared in float64.
    """
    _check_pair(ref_emb, cand_emb, "ref_emb", "cand_emb")
    if ref_emb.dim() > 2:
        raise ValueError(f"ref_emb must be [sentences, dim] or [dim], got shape {tuple(ref_emb.shape)}")
    a = l2_normalize(ref_emb.to(torch.float64).reshape(-1, ref_emb.shape[-1]))
    b = l2_normalize(cand_emb.to(torch.float64).reshape(-1, cand_emb.shape[-1]))
    per_sentence = (a * b).sum(dim=-1).cpu()
    _require_tokens(per_sentence.numel(), "embedding_cosine")
    return EmbeddingCosine(
        per_sentence=[float(v) for v in per_sentence],
        mean=float(per_sentence.mean()),
        min=float(per_sentence.min()),
        count=int(per_sentence.numel()),
    )


# --------------------------------------------------------------------------------------------
# 3. KL divergence of next-token distributions (llama.cpp --kl-divergence)


@dataclass(frozen=True)
class KLDStats(_Stats):
    """KL(P_ref || P_cand) per token, summarized like llama.cpp's ``--kl-divergence`` report (in nats)."""

    mean: float
    median: float
    p99: float
    max: float
    top1_agreement: float  # llama.cpp "Same top p": fraction of tokens whose argmax agrees
    count: int

    @classmethod
    def from_values(cls, kld: torch.Tensor, top1_match: torch.Tensor) -> "KLDStats":
        """Summarize per-token KLD values and top-1 matches (e.g. several batches concatenated)."""
        kld = kld.reshape(-1).to(torch.float64)
        top1_match = top1_match.reshape(-1)
        if kld.numel() != top1_match.numel():
            raise ValueError(f"kld has {kld.numel()} values but top1_match has {top1_match.numel()}")
        _require_tokens(kld.numel(), "kl_divergence")
        ordered = torch.sort(kld).values
        return cls(
            mean=float(kld.mean()),
            median=_percentile(ordered, 0.5),
            p99=_percentile(ordered, 0.99),
            max=float(ordered[-1]),
            top1_agreement=float(top1_match.to(torch.float64).mean()),
            count=int(kld.numel()),
        )


def token_kl_divergence(
    ref_logits: torch.Tensor, cand_logits: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token KL(P_ref || P_cand) and top-1 agreement for logits ``[..., V]``.

    ``P = softmax(logits)`` over the last dim, computed as ``log_softmax`` in float64;
    ``KL = sum_v P_ref(v) * (log P_ref(v) - log P_cand(v))``. Vocabulary entries with
    ``P_ref(v) == 0`` contribute 0 (so ``-inf`` logits in both are fine).

    Returns:
        ``(kld, top1_match)``: 1-D float64 tensor and 1-D bool tensor, one entry per kept position.
    """
    _check_pair(ref_logits, cand_logits, "ref_logits", "cand_logits")
    ref_rows = _rows(ref_logits, mask, "ref_logits")
    cand_rows = _rows(cand_logits, mask, "cand_logits")
    kld = torch.empty(ref_rows.shape[0], dtype=torch.float64)
    match = torch.empty(ref_rows.shape[0], dtype=torch.bool)
    for rows in _row_chunks(ref_rows.shape[0], ref_rows.shape[1]):
        ref_chunk = ref_rows[rows]
        cand_chunk = cand_rows[rows]
        log_p = torch.log_softmax(ref_chunk.to(torch.float64), dim=-1)
        log_q = torch.log_softmax(cand_chunk.to(torch.float64), dim=-1)
        p = log_p.exp()
        terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
        kld[rows] = terms.sum(dim=-1).cpu()
        match[rows] = (ref_chunk.argmax(dim=-1) == cand_chunk.argmax(dim=-1)).cpu()
    return kld, match


def _working(x: torch.Tensor) -> torch.Tensor:
    """Logits in the precision the vocabulary passes run in: float32, or float64 when given float64."""
    return x if x.dtype == torch.float64 else x.float()


def _logsumexp(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row-wise log-sum-exp of ``x`` [N, V] in float64 (the exponentials summed in float64), with
    ``exp(x - max)`` and its row sums, from which the probabilities follow without another log-softmax."""
    top = x.amax(dim=-1, keepdim=True)
    exps = (x - top).exp_()
    sums = exps.sum(dim=-1, dtype=torch.float64)
    return top.squeeze(-1).double() + sums.log(), exps, sums


def token_comparison(ref_logits: torch.Tensor, cand_logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per scored token: ``kld`` (KL(P_ref || P_cand)), ``top1`` (argmax agrees), ``nll_original`` /
    ``nll_candidate`` (``-log P(target)``) and ``delta_p`` (``P_cand(target) - P_ref(target)``, llama.cpp's
    Δp). ``*_logits`` are ``[N, V]``, ``targets`` ``[N]``.

    Float32 passes over the vocabulary with float64 sums: ``KL = Σ p·(a − b) − (lse_a − lse_b)`` for logits
    ``a``, ``b``, where ``a − b`` is exact when the two are close, so the result agrees with a float64
    log-softmax to ~1e-7 absolute (tested) at less than half its cost."""
    _check_pair(ref_logits, cand_logits, "ref_logits", "cand_logits")
    if ref_logits.dim() != 2 or targets.shape != ref_logits.shape[:1]:
        raise ValueError(f"expected logits [N, V] and targets [N], got {tuple(ref_logits.shape)} and {tuple(targets.shape)}")
    n = ref_logits.shape[0]
    out = {k: torch.empty(n, dtype=torch.float64) for k in ("kld", "nll_original", "nll_candidate", "delta_p")}
    out["top1"] = torch.empty(n, dtype=torch.bool)
    for rows in _row_chunks(n, ref_logits.shape[1]):
        a, b = _working(ref_logits[rows]), _working(cand_logits[rows])
        lse_a, p, sums = _logsumexp(a)
        lse_b = _logsumexp(b)[0]
        p.div_(sums.unsqueeze(-1).to(p.dtype))
        weighted = torch.where(p > 0, p * (a - b), torch.zeros((), dtype=p.dtype))  # 0·log 0 = 0
        # KL is never negative: what rounding leaves below 0 is 0
        out["kld"][rows] = (weighted.sum(dim=-1, dtype=torch.float64) - (lse_a - lse_b)).clamp_min_(0.0)
        out["top1"][rows] = a.argmax(dim=-1) == b.argmax(dim=-1)
        index = targets[rows].long().unsqueeze(-1)
        lp = a.gather(-1, index).squeeze(-1).double() - lse_a
        lq = b.gather(-1, index).squeeze(-1).double() - lse_b
        out["nll_original"][rows], out["nll_candidate"][rows] = -lp, -lq
        out["delta_p"][rows] = lq.exp() - lp.exp()
    return out


def kl_divergence_stats(
    ref_logits: torch.Tensor, cand_logits: torch.Tensor, mask: torch.Tensor | None = None
) -> KLDStats:
    """Mean / median / p99 / max KLD and top-1 agreement over all kept positions.

    Args:
        ref_logits: reference logits ``[..., V]`` (e.g. ``[B, T, V]``).
        cand_logits: candidate logits of the same shape, on the same inputs.
        mask: optional ``ref_logits.shape[:-1]`` mask; 0/False positions (padding) are dropped.
    """
    return KLDStats.from_values(*token_kl_divergence(ref_logits, cand_logits, mask))


# --------------------------------------------------------------------------------------------
# 4. perplexity


@dataclass(frozen=True)
class PerplexityResult(_Stats):
    """Perplexity ``exp(mean_nll)`` over ``num_tokens`` scored tokens (natural log)."""

    ppl: float
    mean_nll: float
    num_tokens: int
    num_windows: int


@dataclass(frozen=True)
class PerplexityWindow:
    """One model call: inputs ``ids[begin:end]``; positions ``score_from..end-1`` are scored.

    Position ``p`` predicts token ``p + 1``, so this window scores tokens ``score_from+1 .. end``.
    """

    begin: int
    end: int
    score_from: int


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def plan_perplexity_windows(num_tokens: int, context_length: int, stride: int | None = None) -> list[PerplexityWindow]:
    """The sliding windows :func:`perplexity` uses for a sequence of ``num_tokens`` tokens.

    See :func:`perplexity` for the convention. Raises ``ValueError`` for fewer than 2 tokens,
    ``context_length < 1``, ``stride <= 0`` or ``stride > context_length``.
    """
    if stride is None:
        stride = context_length
    if num_tokens < 2:
        raise ValueError(f"input_ids must hold at least 2 tokens to score one, got {num_tokens}")
    if context_length < 1:
        raise ValueError(f"context_length must be >= 1, got {context_length}")
    if stride <= 0:
        raise ValueError(f"stride must be > 0, got {stride}")
    if stride > context_length:
        raise ValueError(
            f"stride ({stride}) must not exceed context_length ({context_length}): tokens between windows would be skipped"
        )
    last_input = num_tokens - 1  # the last token is only ever a target
    windows: list[PerplexityWindow] = []
    scored_until = 0  # exclusive end of the input positions already scored
    begin = 0
    while scored_until < last_input:
        end = min(begin + context_length, last_input)
        windows.append(PerplexityWindow(begin=begin, end=end, score_from=max(begin, scored_until)))
        scored_until = end
        begin += stride
    return windows


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``-log softmax(logits)[target]`` per row, float64, for ``logits [N, V]`` and ``targets [N]``."""
    out = torch.empty(logits.shape[0], dtype=torch.float64)
    for rows in _row_chunks(logits.shape[0], logits.shape[1]):
        x = _working(logits[rows])
        picked = x.gather(-1, targets[rows].to(x.device).long().unsqueeze(-1)).squeeze(-1)
        out[rows] = (_logsumexp(x)[0] - picked.double()).cpu()  # as token_comparison computes it: same figures
    return out


def _nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Sum of ``-log softmax(logits)[target]`` in float64 for ``logits [N, V]``, ``targets [N]``."""
    total = 0.0
    for rows in _row_chunks(logits.shape[0], logits.shape[1]):
        log_probs = torch.log_softmax(logits[rows].to(torch.float64), dim=-1)
        picked = log_probs.gather(-1, targets[rows].to(log_probs.device).unsqueeze(-1))
        total -= float(picked.sum())
    return total


def _model_device(model: torch.nn.Module, fallback: torch.device) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else fallback


def _check_ids(input_ids: torch.Tensor, name: str = "input_ids") -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor):
        raise ValueError(f"{name} must be a torch tensor")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name} must hold integer token ids (int64), got dtype {input_ids.dtype}")
    return input_ids.long()


def perplexity(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    context_length: int,
    stride: int | None = None,
) -> PerplexityResult:
    """Sliding-window perplexity of one long token sequence.

    Convention (the HF "perplexity of fixed-length models" scheme, with every token but the first
    scored exactly once):

    * Logits at position ``p`` predict token ``p + 1``. Token 0 is never scored, so a sequence of
      ``L`` tokens always yields ``num_tokens == L - 1``, whatever the stride.
    * Window ``k`` feeds ``ids[k*stride : min(k*stride + context_length, L - 1)]`` (at most
      ``context_length`` tokens) to ``model(...).logits``; its last position predicts the token just
      after the window, so non-overlapping windows (``stride == context_length``) leave no token
      unscored. (The HF guide instead drops each window's first token when ``stride ==
      context_length``; here the previous window's last logits score it.)
    * A window scores only the tokens no earlier window scored (the HF guide's ``-100`` labels on the
      overlap), so with ``stride < context_length`` each scored token sees at least
      ``context_length - stride`` tokens of context (``stride = context_length // 2``: half-overlapping).
    * ``ppl = exp(sum(nll) / num_tokens)``, nll in nats, log-softmax in float64.

    Only ``model(ids[None, :]).logits`` is used, under ``torch.inference_mode``; put the model in
    ``eval()`` mode first (dropout would make the result random).

    Args:
        model: a causal LM (any HF ``*ForCausalLM`` or a module returning an object with ``.logits``).
        input_ids: 1-D LongTensor, the whole tokenized text.
        context_length: maximum tokens per model call.
        stride: window advance; defaults to ``context_length`` (non-overlapping).
    """
    input_ids = _check_ids(input_ids)
    if input_ids.dim() != 1:
        raise ValueError(f"input_ids must be a 1-D token sequence, got shape {tuple(input_ids.shape)}")
    windows = plan_perplexity_windows(input_ids.numel(), context_length, stride)
    device = _model_device(model, input_ids.device)
    total_nll = 0.0
    with torch.inference_mode():
        for window in windows:
            chunk = input_ids[window.begin : window.end].to(device).unsqueeze(0)
            logits = model(chunk).logits
            if logits.dim() != 3 or logits.shape[:2] != chunk.shape:
                raise ValueError(
                    f"model(...).logits must be [1, {chunk.shape[1]}, vocab], got {tuple(logits.shape)}"
                )
            offset = window.score_from - window.begin
            targets = input_ids[window.score_from + 1 : window.end + 1]
            total_nll += _nll_sum(logits[0, offset:], targets)
    num_tokens = input_ids.numel() - 1
    mean_nll = total_nll / num_tokens
    return PerplexityResult(ppl=_exp(mean_nll), mean_nll=mean_nll, num_tokens=num_tokens, num_windows=len(windows))


def perplexity_from_logits(
    logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> PerplexityResult:
    """Perplexity of ``input_ids`` under already-computed ``logits`` (one window per sequence).

    Standard next-token shift: ``logits[..., p, :]`` scores ``input_ids[..., p + 1]``; the first token
    of each row is not scored. With ``attention_mask`` (same shape as ``input_ids``), a target is scored
    only if both it and its predicting position are unmasked.

    Args:
        logits: ``[T, V]`` or ``[B, T, V]``.
        input_ids: ``[T]`` or ``[B, T]`` matching ``logits.shape[:-1]``.
        attention_mask: optional, shaped like ``input_ids``.
    """
    input_ids = _check_ids(input_ids)
    if tuple(logits.shape[:-1]) != tuple(input_ids.shape) or logits.dim() not in (2, 3):
        raise ValueError(
            f"logits must be [T, V] or [B, T, V] matching input_ids {tuple(input_ids.shape)}, got {tuple(logits.shape)}"
        )
    if logits.dim() == 2:
        logits = logits.unsqueeze(0)
        input_ids = input_ids.unsqueeze(0)
        attention_mask = None if attention_mask is None else attention_mask.unsqueeze(0)
    if input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must hold at least 2 tokens per row to score one, got {input_ids.shape[1]}")
    pred = logits[:, :-1, :].reshape(-1, logits.shape[-1])
    targets = input_ids[:, 1:].reshape(-1)
    if attention_mask is not None:
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"attention_mask must have shape {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}"
            )
        keep = ((attention_mask[:, :-1] != 0) & (attention_mask[:, 1:] != 0)).reshape(-1)
        pred = pred[keep.to(pred.device)]
        targets = targets[keep.to(targets.device)]
    _require_tokens(targets.numel(), "perplexity_from_logits")
    mean_nll = _nll_sum(pred, targets) / targets.numel()
    return PerplexityResult(ppl=_exp(mean_nll), mean_nll=mean_nll, num_tokens=int(targets.numel()), num_windows=1)


def ppl_delta_percent(ppl_ref: float, ppl_cand: float) -> float:
    """Relative perplexity change in percent: ``100 * (ppl_cand - ppl_ref) / ppl_ref``."""
    if not math.isfinite(ppl_ref) or ppl_ref <= 0:
        raise ValueError(f"ppl_ref must be a finite positive number, got {ppl_ref}")
    return 100.0 * (ppl_cand - ppl_ref) / ppl_ref


# --------------------------------------------------------------------------------------------
# 5. greedy generation and agreement


def cache_of(output: object) -> tuple[str, object] | None:
    """The KV cache a model output carries, with the keyword to pass it back under.

    transformers >= 5 names it ``cache``; 4.x names it ``past_key_values``.
    """
    # Ask for the old name only when the new one does not exist: on transformers 5 reading
    # `past_key_values` logs a deprecation warning.
    name = "cache" if hasattr(output, "cache") else "past_key_values"
    value = getattr(output, name, None)
    if value is not None:
        return name, value
    return None


def greedy_generate(model: torch.nn.Module, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy decoding with a plain loop: append ``argmax`` of the last logits ``max_new_tokens`` times.

    No stopping on EOS and no generation config (so two models are always compared on the same number
    of tokens). If the model output carries a KV cache (``cache`` or ``past_key_values``), the next call
    feeds only the new token with that cache; otherwise the whole sequence is recomputed.

    Args:
        model: causal LM; ``model(ids).logits`` must be ``[B, T, V]``.
        input_ids: prompt, ``[T]`` or ``[B, T]`` (rows of equal length, no padding).
        max_new_tokens: number of tokens to generate (>= 0).

    Returns:
        The generated tokens only: ``[max_new_tokens]`` for a 1-D prompt, else ``[B, max_new_tokens]``.
    """
    input_ids = _check_ids(input_ids)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    squeeze = input_ids.dim() == 1
    prompt = input_ids.unsqueeze(0) if squeeze else input_ids
    if prompt.dim() != 2 or prompt.shape[1] == 0:
        raise ValueError(f"input_ids must be a non-empty [T] or [B, T] prompt, got shape {tuple(input_ids.shape)}")
    prompt = prompt.to(_model_device(model, prompt.device))
    generated: list[torch.Tensor] = []
    with torch.inference_mode():
        sequence = prompt
        next_input = prompt
        cache: tuple[str, object] | None = None
        for _ in range(max_new_tokens):
            output = model(next_input) if cache is None else model(next_input, **{cache[0]: cache[1]})
            next_token = output.logits[:, -1, :].argmax(dim=-1, keepdim=True)
            generated.append(next_token)
            sequence = torch.cat([sequence, next_token], dim=1)
            cache = cache_of(output)
            next_input = next_token if cache is not None else sequence
    if generated:
        new_tokens = torch.cat(generated, dim=1)
    else:
        new_tokens = prompt.new_empty((prompt.shape[0], 0))
    return new_tokens[0] if squeeze else new_tokens


@dataclass(frozen=True)
class GenerationAgreement(_Stats):
    """How much of the reference generation the candidate reproduces, position by position."""

    agreement: float  # matching positions / num_compared
    first_divergence: int | None  # first index where they differ; None if all num_compared match
    num_compared: int  # = len(ref_tokens)


def _token_list(tokens: Sequence[int] | torch.Tensor, name: str) -> list[int]:
    if isinstance(tokens, torch.Tensor):
        if tokens.dim() != 1:
            raise ValueError(f"{name} must be a 1-D token sequence, got shape {tuple(tokens.shape)}")
        return [int(t) for t in tokens.tolist()]
    return [int(t) for t in tokens]


def generation_agreement(
    ref_tokens: Sequence[int] | torch.Tensor, cand_tokens: Sequence[int] | torch.Tensor
) -> GenerationAgreement:
    """Fraction of the first ``N = len(ref_tokens)`` generated tokens identical at the same position.

    A candidate shorter than the reference counts its missing positions as mismatches; extra candidate
    tokens are ignored.
    """
    ref = _token_list(ref_tokens, "ref_tokens")
    cand = _token_list(cand_tokens, "cand_tokens")
    if not ref:
        raise ValueError("ref_tokens is empty: nothing to compare")
    matches = [i < len(cand) and cand[i] == token for i, token in enumerate(ref)]
    first_divergence = next((i for i, ok in enumerate(matches) if not ok), None)
    return GenerationAgreement(
        agreement=sum(matches) / len(ref), first_divergence=first_divergence, num_compared=len(ref)
    )


# --------------------------------------------------------------------------------------------
# 6. weight error


@dataclass(frozen=True)
class WeightError(_Stats):
    """Error of a reconstructed weight ``Q`` against the original ``W`` (float64)."""

    relative_frobenius: float  # ||W - Q||_F / ||W||_F
    max_abs_error: float  # max |W - Q|
    sqnr_db: float  # 10 log10(sum W^2 / sum (W - Q)^2); +inf when identical


def weight_error(ref_weight: torch.Tensor, cand_weight: torch.Tensor) -> WeightError:
    """Relative Frobenius error, max abs error and SQNR (dB) of ``cand_weight`` against ``ref_weight``.

    Accumulated in float64 over chunks. Edge cases: identical tensors give error 0 and SQNR ``+inf``;
    a zero reference with a non-zero candidate gives relative error ``inf`` and SQNR ``-inf``.
    """
    _check_pair(ref_weight, cand_weight, "ref_weight", "cand_weight")
    if ref_weight.numel() == 0:
        raise ValueError(f"ref_weight is empty (shape {tuple(ref_weight.shape)})")
    ref_flat = ref_weight.reshape(-1)
    cand_flat = cand_weight.reshape(-1)
    signal = 0.0
    noise = 0.0
    max_abs = 0.0
    for part in _row_chunks(ref_flat.numel(), 1):
        w = ref_flat[part].to(torch.float64)
        diff = w - cand_flat[part].to(torch.float64)
        signal += float((w * w).sum())
        noise += float((diff * diff).sum())
        chunk_max = float(diff.abs().max())
        if chunk_max > max_abs or math.isnan(chunk_max):  # a NaN, once seen, sticks
            max_abs = chunk_max
    if noise == 0.0:
        return WeightError(relative_frobenius=0.0, max_abs_error=max_abs, sqnr_db=math.inf)
    if signal == 0.0:
        return WeightError(relative_frobenius=math.inf, max_abs_error=max_abs, sqnr_db=-math.inf)
    return WeightError(
        relative_frobenius=math.sqrt(noise / signal),
        max_abs_error=max_abs,
        sqnr_db=10.0 * math.log10(signal / noise),
    )
