"""Tests for llm_workbook.evaluation.metrics: expected values are worked out by hand or by an independent oracle."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from llm_workbook.evaluation import metrics
from llm_workbook.evaluation.metrics import (
    cosine_stats,
    embedding_cosine,
    generation_agreement,
    greedy_generate,
    kl_divergence_stats,
    perplexity,
    perplexity_from_logits,
    plan_perplexity_windows,
    ppl_delta_percent,
    token_kl_divergence,
    weight_error,
)
from llm_workbook.runtime.embeddings import l2_normalize, mean_pooling

# ----------------------------------------------------------------------------- toy models


class ZeroLogits(torch.nn.Module):
    """A uniform model: every next-token distribution is uniform over `vocab` tokens."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab))


class PositionModel(torch.nn.Module):
    """Logit of token 0 equals the position inside the window; all others 0. Records window lengths."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.window_lengths: list[int] = []

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        batch, length = input_ids.shape
        self.window_lengths.append(length)
        logits = torch.zeros(batch, length, self.vocab)
        logits[:, :, 0] = torch.arange(length, dtype=torch.float32)
        return SimpleNamespace(logits=logits)


class BigramModel(torch.nn.Module):
    """Logits depend only on the current token: logits[p] = table[ids[p]]."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.table[input_ids])


def position_nll(j: int, vocab: int) -> float:
    """-log p(token 0) at window position j for PositionModel: softmax with logit j vs (vocab-1) zeros."""
    return -(j - math.log(math.exp(j) + vocab - 1))


# ----------------------------------------------------------------------------- cosine


def test_cosine_identical_is_one() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    stats = cosine_stats(x, x.clone())
    assert stats.count == 10
    assert stats.mean == pytest.approx(1.0, abs=1e-12)
    assert stats.min == pytest.approx(1.0, abs=1e-12)
    assert stats.p5 == pytest.approx(1.0, abs=1e-12)


def test_cosine_orthogonal_negated_and_scaled() -> None:
    ref = torch.tensor([[1.0, 0.0, 0.0], [1.0, 2.0, 3.0], [0.0, 2.0, 0.0]])
    cand = torch.tensor([[0.0, 5.0, 0.0], [-1.0, -2.0, -3.0], [0.0, 7.0, 0.0]])
    values = metrics.token_cosine(ref, cand)
    assert values.tolist() == pytest.approx([0.0, -1.0, 1.0], abs=1e-12)
    stats = cosine_stats(ref, cand)
    assert stats.min == pytest.approx(-1.0, abs=1e-12)
    assert stats.mean == pytest.approx(0.0, abs=1e-12)


def test_cosine_zero_vectors() -> None:
    ref = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    cand = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    assert metrics.token_cosine(ref, cand).tolist() == [1.0, 0.0, 0.0]


def test_cosine_known_angles_and_p5() -> None:
    # 11 tokens with cosine exactly cos(theta_i); 5th percentile of 11 values sits halfway between
    # the two smallest (position 0.05 * 10 = 0.5).
    thetas = torch.linspace(0.0, math.pi, 11, dtype=torch.float64)
    ref = torch.stack([torch.ones(11, dtype=torch.float64), torch.zeros(11, dtype=torch.float64)], dim=-1)
    cand = torch.stack([torch.cos(thetas), torch.sin(thetas)], dim=-1)
    stats = cosine_stats(ref.unsqueeze(0), cand.unsqueeze(0))
    expected = sorted(math.cos(t) for t in thetas.tolist())
    assert stats.count == 11
    assert stats.min == pytest.approx(-1.0, abs=1e-12)
    assert stats.p5 == pytest.approx((expected[0] + expected[1]) / 2, abs=1e-12)
    assert stats.p5 == pytest.approx(float(np.percentile(expected, 5)), abs=1e-12)
    assert stats.mean == pytest.approx(sum(expected) / 11, abs=1e-12)


def test_cosine_mask_drops_padding() -> None:
    torch.manual_seed(0)
    ref = torch.randn(2, 4, 8)
    cand = ref.clone()
    cand[0, 3] = -ref[0, 3]  # padding positions hold garbage (cosine -1)
    cand[1, 2:] = -ref[1, 2:]
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    stats = cosine_stats(ref, cand, mask)
    assert stats.count == 5
    assert stats.min == pytest.approx(1.0, abs=1e-12)
    unmasked = cosine_stats(ref, cand)
    assert unmasked.count == 8
    assert unmasked.min == pytest.approx(-1.0, abs=1e-12)


def test_cosine_chunked_matches_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 20)  # several rows per chunk, several chunks
    torch.manual_seed(1)
    ref, cand = torch.randn(3, 7, 6), torch.randn(3, 7, 6)
    expected = torch.nn.functional.cosine_similarity(ref.double(), cand.double(), dim=-1).reshape(-1)
    assert torch.allclose(metrics.token_cosine(ref, cand), expected, atol=1e-12)


def test_cosine_bad_input() -> None:
    with pytest.raises(ValueError, match="ref.*cand"):
        cosine_stats(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="mask"):
        cosine_stats(torch.ones(2, 3, 4), torch.ones(2, 3, 4), torch.ones(3, 2))
    with pytest.raises(ValueError, match="no tokens"):
        cosine_stats(torch.ones(1, 2, 4), torch.ones(1, 2, 4), torch.zeros(1, 2))


# ----------------------------------------------------------------------------- embeddings


def test_mean_pooling_hand_example_with_padding() -> None:
    hidden = torch.tensor(
        [
            [[1.0, 2.0], [3.0, 4.0], [100.0, -100.0]],  # last token is padding
            [[2.0, 0.0], [4.0, 6.0], [6.0, 3.0]],  # no padding
            [[5.0, 5.0], [5.0, 5.0], [5.0, 5.0]],  # all padding: denominator clamped, result 0
        ]
    )
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    pooled = mean_pooling(hidden, mask)
    assert pooled.tolist() == [[2.0, 3.0], [4.0, 3.0], [0.0, 0.0]]
    assert pooled.dtype == hidden.dtype


def test_mean_pooling_bad_mask() -> None:
    with pytest.raises(ValueError, match="attention_mask"):
        mean_pooling(torch.zeros(2, 3, 4), torch.ones(2, 4))


def test_l2_normalize() -> None:
    out = l2_normalize(torch.tensor([[3.0, 4.0], [0.0, -2.0]]))
    assert torch.allclose(out, torch.tensor([[0.6, 0.8], [0.0, -1.0]]))


def test_embedding_cosine_per_sentence() -> None:
    ref = torch.tensor([[1.0, 0.0], [3.0, 4.0], [1.0, 1.0]])
    cand = torch.tensor([[2.0, 0.0], [-4.0, 3.0], [-1.0, -1.0]])  # scaled, orthogonal, negated
    result = embedding_cosine(ref, cand)
    assert result.per_sentence == pytest.approx([1.0, 0.0, -1.0], abs=1e-12)
    assert result.mean == pytest.approx(0.0, abs=1e-12)
    assert result.min == pytest.approx(-1.0, abs=1e-12)
    assert result.count == 3
    same = embedding_cosine(ref, ref * 5)
    assert same.mean == pytest.approx(1.0, abs=1e-12)


# ----------------------------------------------------------------------------- KL divergence


def test_kld_identical_is_zero() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 50) * 4
    stats = kl_divergence_stats(logits, logits.clone())
    assert stats.count == 12
    assert abs(stats.mean) < 1e-12 and abs(stats.max) < 1e-12 and abs(stats.median) < 1e-12
    assert stats.top1_agreement == 1.0


def test_kld_two_class_by_hand() -> None:
    ln3 = math.log(3.0)
    # token 0: P=(3/4, 1/4), Q=(1/4, 3/4) -> KL = 3/4 ln3 + 1/4 ln(1/3) = ln3 / 2, argmax differs
    # token 1: P=(1/2, 1/2), Q=(1/4, 3/4) -> KL = 1/2 ln2 + 1/2 ln(2/3) = ln(4/3) / 2
    # token 2: P = Q -> 0, argmax agrees
    # token 3: P=(1/4, 3/4), Q=(1/2, 1/2) -> KL = 1/4 ln(1/2) + 3/4 ln(3/2)
    ref = torch.tensor([[[ln3, 0.0], [0.0, 0.0], [2.0, 1.0], [0.0, ln3]]])
    cand = torch.tensor([[[0.0, ln3], [0.0, ln3], [2.0, 1.0], [0.0, 0.0]]])
    kl = [
        ln3 / 2,
        math.log(4 / 3) / 2,
        0.0,
        0.25 * math.log(0.5) + 0.75 * math.log(1.5),
    ]
    kld, match = token_kl_divergence(ref, cand)
    assert kld.tolist() == pytest.approx(kl, abs=1e-7)
    # argmax: ref (0, 0[tie], 0, 1) vs cand (1, 1, 0, 0[tie]) -> only token 2 agrees
    assert match.tolist() == [False, False, True, False]
    stats = kl_divergence_stats(ref, cand)
    ordered = sorted(kl)
    assert stats.count == 4
    assert stats.mean == pytest.approx(sum(kl) / 4, abs=1e-7)
    assert stats.median == pytest.approx((ordered[1] + ordered[2]) / 2, abs=1e-7)
    assert stats.p99 == pytest.approx(ordered[2] + 0.97 * (ordered[3] - ordered[2]), abs=1e-7)
    assert stats.max == pytest.approx(ln3 / 2, abs=1e-7)
    assert stats.top1_agreement == 0.25


def test_kld_mask_and_infinite_logits() -> None:
    inf = float("inf")
    ref = torch.tensor([[[0.0, -inf, 1.0], [10.0, 0.0, 0.0]]])
    cand = torch.tensor([[[0.0, -inf, 1.0], [0.0, 0.0, 10.0]]])
    stats = kl_divergence_stats(ref, cand, mask=torch.tensor([[1, 0]]))
    assert stats.count == 1
    assert stats.mean == 0.0  # -inf in both: P=0 entries contribute nothing (not NaN)
    assert stats.top1_agreement == 1.0
    assert kl_divergence_stats(ref, cand).max > 5.0  # the masked-out token really is far off


def test_kld_chunked_matches_torch_kl_div(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 30)
    torch.manual_seed(2)
    ref, cand = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    log_p = torch.log_softmax(ref.double(), -1)
    log_q = torch.log_softmax(cand.double(), -1)
    expected = torch.nn.functional.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1).reshape(-1)
    kld, match = token_kl_divergence(ref, cand)
    assert torch.allclose(kld, expected, atol=1e-12)
    assert match.tolist() == (ref.argmax(-1) == cand.argmax(-1)).reshape(-1).tolist()


def test_kld_bad_shapes() -> None:
    with pytest.raises(ValueError, match="ref_logits"):
        kl_divergence_stats(torch.zeros(1, 2, 5), torch.zeros(1, 2, 6))


# ----------------------------------------------------------------------------- perplexity


@pytest.mark.parametrize("stride", [None, 4, 3, 2, 1])
def test_uniform_model_perplexity_equals_vocab(stride: int | None) -> None:
    ids = torch.randint(0, 37, (23,), generator=torch.Generator().manual_seed(0))
    result = perplexity(ZeroLogits(37), ids, context_length=4, stride=stride)
    assert result.ppl == pytest.approx(37.0, rel=1e-12)
    assert result.mean_nll == pytest.approx(math.log(37), rel=1e-12)
    assert result.num_tokens == 22


def test_uniform_perplexity_from_logits() -> None:
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0]])
    result = perplexity_from_logits(torch.zeros(2, 4, 9), ids, attention_mask=torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]))
    assert result.num_tokens == 3 + 1
    assert result.ppl == pytest.approx(9.0, rel=1e-12)


def test_perplexity_from_logits_by_hand() -> None:
    # two targets: p=1/2 (logits 0,0) and p=3/4 (logits ln3, 0) -> ppl = exp(-(ln 1/2 + ln 3/4)/2) = sqrt(8/3)
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [5.0, 5.0]])
    result = perplexity_from_logits(logits, torch.tensor([0, 1, 0]))
    assert result.num_tokens == 2
    assert result.ppl == pytest.approx(math.sqrt(8 / 3), rel=1e-7)


def test_window_plan_half_overlap() -> None:
    windows = plan_perplexity_windows(10, context_length=4, stride=2)
    assert [(w.begin, w.end, w.score_from) for w in windows] == [(0, 4, 0), (2, 6, 4), (4, 8, 6), (6, 9, 8)]
    non_overlap = plan_perplexity_windows(10, context_length=4)
    assert [(w.begin, w.end, w.score_from) for w in non_overlap] == [(0, 4, 0), (4, 8, 4), (8, 9, 8)]


@pytest.mark.parametrize(
    ("stride", "positions", "n_windows"),
    [
        # non-overlapping, context 4, 10 tokens: windows [0,4) [4,8) [8,9) score window positions 0-3, 0-3, 0
        (4, [0, 1, 2, 3, 0, 1, 2, 3, 0], 3),
        # half-overlapping: [0,4) scores 0-3, [2,6) 2-3, [4,8) 2-3, [6,9) 2
        (2, [0, 1, 2, 3, 2, 3, 2, 3, 2], 4),
        # stride 1: after the first window each call scores only its last position
        (1, [0, 1, 2, 3, 3, 3, 3, 3, 3], 6),
    ],
)
def test_perplexity_windows_score_each_token_once(stride: int, positions: list[int], n_windows: int) -> None:
    vocab = 5
    model = PositionModel(vocab)
    ids = torch.zeros(10, dtype=torch.long)  # every target is token 0
    result = perplexity(model, ids, context_length=4, stride=stride)
    expected_nll = sum(position_nll(j, vocab) for j in positions) / len(positions)
    assert result.num_tokens == 9
    assert result.num_windows == n_windows
    assert result.mean_nll == pytest.approx(expected_nll, rel=1e-12)
    assert result.ppl == pytest.approx(math.exp(expected_nll), rel=1e-12)
    assert max(model.window_lengths) <= 4
    assert len(model.window_lengths) == n_windows


def test_bigram_perplexity_independent_of_windowing() -> None:
    gen = torch.Generator().manual_seed(3)
    table = torch.randn(7, 7, generator=gen) * 2
    ids = torch.randint(0, 7, (31,), generator=gen)
    log_probs = torch.log_softmax(table.double(), dim=-1)
    expected = -sum(float(log_probs[a, b]) for a, b in zip(ids[:-1].tolist(), ids[1:].tolist())) / 30
    for context, stride in [(8, 8), (8, 4), (5, 3), (31, 31), (64, 64)]:
        result = perplexity(BigramModel(table), ids, context_length=context, stride=stride)
        assert result.num_tokens == 30
        assert result.mean_nll == pytest.approx(expected, rel=1e-9), (context, stride)


def test_perplexity_bad_arguments() -> None:
    model = ZeroLogits(5)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(model, torch.tensor([3]), context_length=4)
    with pytest.raises(ValueError, match="stride must be > 0"):
        perplexity(model, torch.arange(5), context_length=4, stride=0)
    with pytest.raises(ValueError, match="must not exceed context_length"):
        perplexity(model, torch.arange(5), context_length=4, stride=5)
    with pytest.raises(ValueError, match="1-D"):
        perplexity(model, torch.arange(6).reshape(2, 3), context_length=4)
    with pytest.raises(ValueError, match="integer"):
        perplexity(model, torch.arange(6, dtype=torch.float32), context_length=4)


def test_ppl_delta_percent() -> None:
    assert ppl_delta_percent(12.5, 12.5) == 0.0
    assert ppl_delta_percent(10.0, 12.0) == pytest.approx(20.0)
    assert ppl_delta_percent(8.0, 6.0) == pytest.approx(-25.0)
    with pytest.raises(ValueError, match="ppl_ref"):
        ppl_delta_percent(0.0, 3.0)


# ----------------------------------------------------------------------------- generation


@pytest.fixture(scope="module")
def tiny_qwen3() -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.Qwen3Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
    )
    return transformers.Qwen3ForCausalLM(config).eval()


class NoCache(torch.nn.Module):
    """Hides the KV cache, forcing greedy_generate to recompute the whole sequence; records input lengths."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.lengths: list[int] = []

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        self.lengths.append(input_ids.shape[1])
        return SimpleNamespace(logits=self.model(input_ids, use_cache=False).logits)


def test_greedy_generate_matches_hf_generate(tiny_qwen3: torch.nn.Module) -> None:
    prompt = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(0))
    n_new = 12
    with torch.inference_mode():
        reference = tiny_qwen3.generate(prompt, max_new_tokens=n_new, do_sample=False)[0, prompt.shape[1] :]
    assert reference.numel() == n_new
    ours = greedy_generate(tiny_qwen3, prompt[0], n_new)  # 1-D prompt -> 1-D result, cached path
    assert ours.tolist() == reference.tolist()
    no_cache = NoCache(tiny_qwen3)
    recomputed = greedy_generate(no_cache, prompt, n_new)
    assert recomputed.shape == (1, n_new)
    assert recomputed[0].tolist() == reference.tolist()
    assert no_cache.lengths == list(range(6, 6 + n_new))  # the full sequence every step


def test_greedy_generate_uses_cache(tiny_qwen3: torch.nn.Module) -> None:
    lengths: list[int] = []
    handle = tiny_qwen3.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(args[0].shape[1] if args else kwargs["input_ids"].shape[1]),
        with_kwargs=True,
    )
    try:
        greedy_generate(tiny_qwen3, torch.tensor([1, 2, 3]), 4)
    finally:
        handle.remove()
    assert lengths == [3, 1, 1, 1]


def test_greedy_generate_zero_tokens_and_errors() -> None:
    assert greedy_generate(ZeroLogits(4), torch.tensor([1, 2]), 0).tolist() == []
    assert greedy_generate(ZeroLogits(4), torch.tensor([1, 2]), 3).tolist() == [0, 0, 0]  # argmax tie -> 0
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_generate(ZeroLogits(4), torch.tensor([1, 2]), -1)


def test_generation_agreement() -> None:
    same = generation_agreement([5, 6, 7, 8], torch.tensor([5, 6, 7, 8]))
    assert (same.agreement, same.first_divergence, same.num_compared) == (1.0, None, 4)
    diff = generation_agreement([5, 6, 7, 8], [5, 6, 9, 8])
    assert (diff.agreement, diff.first_divergence) == (0.75, 2)
    short = generation_agreement([5, 6, 7, 8], [5])
    assert (short.agreement, short.first_divergence) == (0.25, 1)
    longer = generation_agreement([5, 6], [5, 6, 1, 2])
    assert (longer.agreement, longer.first_divergence, longer.num_compared) == (1.0, None, 2)
    with pytest.raises(ValueError, match="ref_tokens"):
        generation_agreement([], [1])


# ----------------------------------------------------------------------------- weight error


def test_weight_error_identical() -> None:
    torch.manual_seed(0)
    w = torch.randn(8, 16)
    err = weight_error(w, w.clone())
    assert err.sqnr_db == math.inf
    assert err.relative_frobenius == 0.0 and err.max_abs_error == 0.0
    fp8 = w.to(torch.float8_e4m3fn)
    assert weight_error(fp8, fp8.clone()).sqnr_db == math.inf


def test_weight_error_known_noise_energy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 7)  # odd chunk size: sums cross chunk borders
    # W = 1 everywhere, noise = +-1/8: sum W^2 / sum N^2 = 64 -> SQNR 10 log10 64 dB, relative error 1/8
    w = torch.ones(6, 10, dtype=torch.bfloat16)
    signs = torch.tensor([1.0, -1.0]).repeat(30).reshape(6, 10)
    q = (w.float() + signs / 8).to(torch.bfloat16)  # 1.125 and 0.875 are exact in bf16
    err = weight_error(w, q)
    assert err.sqnr_db == pytest.approx(10 * math.log10(64), abs=1e-12)
    assert err.relative_frobenius == pytest.approx(0.125, abs=1e-12)
    assert err.max_abs_error == 0.125


def test_weight_error_noise_on_half_the_entries() -> None:
    # W = 2 (energy 4 per entry, 100 entries = 400), noise 0.5 on 10 entries (energy 2.5): SQNR = 10 log10 160
    w = torch.full((10, 10), 2.0)
    q = w.clone()
    q[3] += 0.5
    err = weight_error(w, q)
    assert err.sqnr_db == pytest.approx(10 * math.log10(160), abs=1e-12)
    assert err.relative_frobenius == pytest.approx(math.sqrt(2.5 / 400), abs=1e-12)
    assert err.max_abs_error == 0.5


def test_weight_error_edge_cases() -> None:
    zero = torch.zeros(3, 3)
    err = weight_error(zero, torch.eye(3))
    assert err.relative_frobenius == math.inf and err.sqnr_db == -math.inf
    nan_err = weight_error(torch.ones(3, 3), torch.full((3, 3), float("nan")))
    assert math.isnan(nan_err.max_abs_error) and math.isnan(nan_err.sqnr_db)
    with pytest.raises(ValueError, match="ref_weight.*cand_weight"):
        weight_error(torch.zeros(3, 4), torch.zeros(4, 3))


def test_results_are_plain_dicts() -> None:
    stats = kl_divergence_stats(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3)).as_dict()
    assert stats == {"mean": 0.0, "median": 0.0, "p99": 0.0, "max": 0.0, "top1_agreement": 1.0, "count": 2}


def test_single_window_perplexity_matches_hf_loss(tiny_qwen3: torch.nn.Module) -> None:
    # One window covering the sequence scores the same 15 targets as the HF loss with labels=input_ids.
    ids = torch.randint(0, 64, (16,), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        hf_loss = float(tiny_qwen3(ids.unsqueeze(0), labels=ids.unsqueeze(0)).loss)
    result = perplexity(tiny_qwen3, ids, context_length=16)
    assert result.num_tokens == 15 and result.num_windows == 1
    assert result.mean_nll == pytest.approx(hf_loss, rel=1e-5)
