"""PrecisionValidator end to end: INT8 per-channel copies pass, INT2 per-tensor copies fail, with reasons."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llm_workbook import HuggingFaceToParquetConverter
from llm_workbook.evaluation.validator import PrecisionValidator, ValidationResult

FAST = dict(context_length=64, max_eval_tokens=256, gen_tokens=4, generation_prompts=2, prompt_tokens=8)
SENTENCES = [
    "A cat sits on the mat.", "The weather is sunny and warm today.", "Python lists are mutable sequences.",
    "She plays the violin every evening.", "Parquet stores tables column by column.", "The train leaves at noon.",
    "Quantization maps floats to a few integer levels.", "He forgot his umbrella at the station.",
    "Dictionaries map keys to values.", "The river flows slowly through the valley.",
    "Our team won the match after extra time.", "Bread is baked from flour, water, salt and yeast.",
]


def fake_quant_copy(src: Path, dst: Path, bits: int, per_channel: bool) -> Path:
    """Copy a checkpoint with every 2-D weight inside the transformer blocks replaced by its symmetric
    round-to-nearest ``bits``-bit reconstruction (scale absmax/qmax per row or per tensor), saved dense
    in the source dtype. Embeddings, norms and lm_head stay as they are."""
    shutil.copytree(src, dst)
    tensors = load_file(src / "model.safetensors")
    qmax = 2 ** (bits - 1) - 1
    for name, t in tensors.items():
        if t.dim() == 2 and name.endswith(".weight") and (".layers." in name or ".layer." in name):
            w = t.to(torch.float32)
            absmax = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().max()
            scale = absmax.clamp(min=1e-12) / qmax
            tensors[name] = (torch.round(w / scale).clamp(-qmax - 1, qmax) * scale).to(t.dtype)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def tiny_copies(tiny_lm, tmp_path_factory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("copies")
    return {"int8": fake_quant_copy(tiny_lm, work / "int8", 8, per_channel=True),
            "int2": fake_quant_copy(tiny_lm, work / "int2", 2, per_channel=False)}


def test_tiny_causal_int8_passes_int2_fails(tiny_lm, tiny_copies, tmp_path):
    validator = PrecisionValidator(**FAST)
    convert = HuggingFaceToParquetConverter(progress=False).convert
    original_pq = tmp_path / "orig.parquet"
    int8_pq = tmp_path / "int8.parquet"
    convert(tiny_lm, original_pq)
    convert(tiny_copies["int8"], int8_pq)

    good = validator.validate(original_pq, int8_pq, None)  # through Parquet, pydoc eval split
    print(f"int8: cosine {good.cosine_similarity:.5f}, ppl +{100 * good.ppl_increase:.3f}%, kld {good.kld_mean:.3g}")
    assert isinstance(good, ValidationResult) and good.passed and good.reasons == []
    assert good.cosine_similarity > 0.99 and abs(good.ppl_increase) < 0.01
    assert good.record.kind == "causal-lm" and good.record.verdict["passed"]
    assert good.ppl_original == good.record.metrics["ppl"]["original"] and good.top1_agreement is not None

    bad = validator.validate(tiny_lm, tiny_copies["int2"], None)  # HF directories
    print(f"int2: cosine {bad.cosine_similarity:.5f}, ppl +{100 * bad.ppl_increase:.3f}%, reasons {bad.reasons}")
    assert not bad.passed and not bad
    assert bad.cosine_similarity < 0.95
    assert bad.reasons and bad.reasons[0].startswith(f"cosine {bad.cosine_similarity:.4f} < 0.95")
    assert bad.kld_mean > good.kld_mean


def test_extra_thresholds_add_reasons(tiny_lm, tiny_copies):
    strict = PrecisionValidator(kld_threshold=0.0, ppl_threshold=-1.0, **FAST)
    result = strict.validate(tiny_lm, tiny_copies["int8"], None)
    assert not result.passed
    assert any(r.startswith("kld mean ") and r.endswith(" > 0.0") for r in result.reasons)
    assert any(r.startswith("ppl increase ") and r.endswith("> -100.00%") for r in result.reasons)
    assert not any(r.startswith("cosine") for r in result.reasons)


def test_minilm_int8_passes_int2_fails(minilm_dir, tmp_path):
    validator = PrecisionValidator()
    int8 = fake_quant_copy(minilm_dir, tmp_path / "int8", 8, per_channel=True)
    int2 = fake_quant_copy(minilm_dir, tmp_path / "int2", 2, per_channel=False)
    good = validator.validate(minilm_dir, int8, SENTENCES)
    bad = validator.validate(minilm_dir, int2, SENTENCES)
    print(f"minilm embedding cosine: int8 {good.cosine_similarity:.5f}, int2 {bad.cosine_similarity:.5f}")
    assert good.passed and good.cosine_similarity > 0.99
    assert good.record.kind == "encoder" and good.record.metrics["cosine_basis"] == "sentence_embedding"
    assert good.record.metrics["embedding_cosine"]["count"] == len(SENTENCES)
    assert good.ppl_increase is None and good.kld_mean is None  # no next-token distribution for encoders
    assert not bad.passed and bad.cosine_similarity < 0.95
    assert bad.reasons == [f"cosine {bad.cosine_similarity:.4f} < 0.95 (sentence_embedding)"]


def test_hub_id_paths(tiny_lm, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snapshot = cache / "models--acme--tiny-lm" / "snapshots" / ("b" * 40)
    shutil.copytree(tiny_lm, snapshot)
    (cache / "models--acme--tiny-lm" / "refs").mkdir(parents=True)
    (cache / "models--acme--tiny-lm" / "refs" / "main").write_text("b" * 40)
    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    result = PrecisionValidator(**FAST).validate("acme/tiny-lm", tiny_lm, None)
    assert result.passed and abs(result.cosine_similarity - 1.0) < 1e-12 and result.ppl_increase == 0.0
    assert result.record.original["source"] == "acme/tiny-lm"


def test_bad_validator_arguments():
    with pytest.raises(ValueError, match="cosine_threshold"):
        PrecisionValidator(cosine_threshold="high")
    with pytest.raises(ValueError, match="thresholds"):
        PrecisionValidator(thresholds={"cosine": 0.9})
