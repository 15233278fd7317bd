"""evaluation.evaluate: metrics end to end through Parquet, the JSON record, the verdict, bad input."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from llm_workbook import HuggingFaceToParquetConverter
from llm_workbook.evaluation.record import EvaluationRecord, Thresholds, judge
from llm_workbook.evaluation.compare import evaluate

SMALL = dict(context_length=64, max_eval_tokens=192, gen_tokens=4, generation_prompts=2, prompt_tokens=8, perf=False)


def _parquet(src: Path, out: Path) -> Path:
    HuggingFaceToParquetConverter(progress=False).convert(src, out)
    return out


def test_identical_models_through_parquet(tiny_lm, tmp_path):
    a = _parquet(tiny_lm, tmp_path / "a.parquet")
    b = _parquet(tiny_lm, tmp_path / "b.parquet")
    record = evaluate(a, b, **SMALL)
    m = record.metrics
    assert record.kind == "causal-lm" and record.passed and record.verdict["reasons"] == []
    assert abs(m["hidden_cosine"]["mean"] - 1.0) < 1e-12 and abs(m["hidden_cosine"]["min"] - 1.0) < 1e-12
    assert abs(m["logits_cosine"]["min"] - 1.0) < 1e-12
    assert m["kld"]["mean"] == 0.0 and m["kld"]["max"] == 0.0 and m["top1_agreement"] == 1.0
    assert m["ppl"]["delta_percent"] == 0.0 and m["ppl"]["original"] == m["ppl"]["candidate"]
    # every token but the first is scored exactly once, windows of 64 tokens
    assert m["ppl"]["num_tokens"] == 192 and m["ppl"]["num_windows"] == 3 and m["hidden_cosine"]["count"] == 192
    assert m["generation"]["agreement"] == 1.0 and m["generation"]["num_prompts"] == 2
    # random init: perplexity sits near the 4096-token vocabulary
    assert 1000 < m["ppl"]["original"] < 20000
    we = m["weight_error"]
    assert we["scope"] == "linear" and we["count"] == 15 and we["exact_tensors"] == 15  # 14 layers + lm_head
    assert all(t["sqnr_db"] == math.inf and t["relative_error"] == 0.0 for t in we["tensors"])
    assert record.sizes["original"]["bits_per_weight"] == pytest.approx(16.0)
    assert record.settings["eval_tokens"] == 193 and record.settings["corpus"] == "pydoc"
    for key in ("python", "torch", "transformers", "llm_workbook"):
        assert record.versions[key]
    assert record.machine["cpu_count"] >= 1 and record.machine["ram_bytes"] > 0


def test_perplexity_matches_metrics_reference_with_overlapping_windows(tiny_lm):
    """The single pass that also gathers cosine/KLD scores the same tokens as metrics.perplexity."""
    from llm_workbook.evaluation import metrics
    from llm_workbook.corpus import TEXT_SEPARATOR, encode_text, load_texts
    from llm_workbook.runtime.load import load_model, load_tokenizer

    texts = load_texts("pydoc", "eval")[:3]
    record = evaluate(tiny_lm, tiny_lm, texts=texts, **{**SMALL, "stride": 40})
    model, _ = load_model(tiny_lm)
    ids = torch.tensor(encode_text(load_tokenizer(tiny_lm), TEXT_SEPARATOR.join(texts))[:193])
    reference = metrics.perplexity(model, ids, context_length=64, stride=40)
    ppl = record.metrics["ppl"]
    assert ppl["num_windows"] == reference.num_windows > 3 and ppl["num_tokens"] == reference.num_tokens == 192
    assert ppl["original"] == pytest.approx(reference.ppl, rel=1e-9)
    assert record.metrics["kld"]["count"] == 192 and record.settings["stride"] == 40


def test_record_json_round_trip(tiny_lm, tmp_path):
    record = evaluate(tiny_lm, tiny_lm, texts=["def f(x):\n    return x + 1\n" * 40], **SMALL)
    path = tmp_path / "record.json"
    record.to_json(path)
    raw = json.loads(path.read_text())  # strict JSON: infinities are spelled as strings
    assert raw["metrics"]["weight_error"]["tensors"][0]["sqnr_db"] == "inf"
    assert raw["schema_version"] == "1.1" and raw["settings"]["corpus"] is None and raw["settings"]["num_texts"] == 1
    back = EvaluationRecord.from_json(path)
    assert back == record
    assert back.metrics["weight_error"]["min_sqnr_db"] == math.inf
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="not an evaluation record"):
        EvaluationRecord.from_json(bad)


def test_quantized_candidate_weight_error_and_sizes(tiny_lm, tmp_path):
    """An FP8 (e4m3, per tensor) candidate: every quantized weight compared, SQNR near e4m3's ~31 dB."""
    from test_runtime import write_fp8_static  # the AngelSlim fp8_static layout, built by hand

    fp8 = write_fp8_static(tiny_lm, tmp_path / "fp8")
    record = evaluate(tiny_lm, fp8, **SMALL)
    we = record.metrics["weight_error"]
    assert we["scope"] == "quantized" and we["count"] == 14 and we["skipped"] == []
    assert {t["format"] for t in we["tensors"]} == {"fp8"}
    assert all(25.0 < t["sqnr_db"] < 40.0 for t in we["tensors"])
    assert record.candidate["activation_schemes"]["model.layers.*.mlp.gate_proj"] == "fp8-static-tensor"
    assert record.candidate["converted"] and record.candidate["activation_quant"]
    cand = record.sizes["candidate"]
    assert cand["quantized_bits_per_weight"] == pytest.approx(8.0, abs=0.01)
    assert cand["bits_per_weight"] < record.sizes["original"]["bits_per_weight"]
    assert cand["path"] == str(fp8)


# --------------------------------------------------------------------------- verdict


def test_judge_reasons_name_each_failed_check():
    metrics = {"cosine_similarity": 0.91, "cosine_basis": "last_hidden_state", "ppl": {"delta_percent": 23.0},
               "kld": {"mean": 0.12}, "top1_agreement": 0.8}
    verdict = judge(metrics, Thresholds(cosine=0.95, ppl_increase=0.15, kld=0.05, top1=0.9))
    assert not verdict["passed"]
    assert verdict["reasons"] == ["cosine 0.9100 < 0.95 (last_hidden_state)", "ppl increase 23.00% > 15.00%",
                                  "kld mean 0.12 > 0.05", "top-1 agreement 0.8000 < 0.9"]
    ok = judge(metrics, Thresholds(cosine=0.9, ppl_increase=0.25, kld=None, top1=None))
    assert ok["passed"] and ok["reasons"] == []
    assert [c["passed"] for c in ok["checks"]] == [True, True, None, None]
    encoder = judge({"cosine_similarity": 0.99, "cosine_basis": "sentence_embedding"}, Thresholds())
    assert encoder["passed"] and encoder["checks"][1]["note"] == "not applicable to this model"
    nan = judge({"cosine_similarity": float("nan"), "ppl": {"delta_percent": float("nan")}}, Thresholds())
    assert not nan["passed"] and len(nan["reasons"]) == 2  # NaN never passes


# --------------------------------------------------------------------------- bad input


def test_mismatched_vocabulary_names_both(tiny_lm, tmp_path):
    other = tmp_path / "other_vocab"
    shutil.copytree(tiny_lm, other)
    config = json.loads((other / "config.json").read_text())
    config["vocab_size"] = 4000
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"vocab_size 4096 but candidate .*other_vocab.* has 4000") as exc:
        evaluate(tiny_lm, other, **SMALL)
    assert str(tiny_lm) in str(exc.value)


def test_mismatched_architecture_names_both(qwen3_dir, llama_sharded_dir):
    with pytest.raises(ValueError, match="different architectures: model_type 'qwen3' vs 'llama'") as exc:
        evaluate(qwen3_dir, llama_sharded_dir, **SMALL)
    assert str(qwen3_dir) in str(exc.value) and str(llama_sharded_dir) in str(exc.value)


def test_mismatched_size_is_an_architecture_error(tiny_lm, qwen3_dir):
    with pytest.raises(ValueError, match="different architectures: hidden_size 256 vs 128"):
        evaluate(tiny_lm, qwen3_dir, **SMALL)


def test_empty_texts_rejected(tiny_lm):
    with pytest.raises(ValueError, match="texts is empty"):
        evaluate(tiny_lm, tiny_lm, texts=[], **SMALL)
    with pytest.raises(ValueError, match="only empty strings"):
        evaluate(tiny_lm, tiny_lm, texts=["", "  "], **SMALL)
    with pytest.raises(ValueError, match="single string"):
        evaluate(tiny_lm, tiny_lm, texts="just one string", **SMALL)


def test_text_shorter_than_one_window_says_how_many_tokens(tiny_lm):
    with pytest.raises(ValueError, match=r"has \d+ tokens; one window of context_length=64 needs at least 65 tokens"):
        evaluate(tiny_lm, tiny_lm, texts=["A short sentence."], **SMALL)


def test_angelslim_int8_dynamic_fixture_end_to_end():
    """A real AngelSlim int8_dynamic checkpoint (W8A8, per-token activations) against its original."""
    root = Path(__file__).parent / "fixtures" / "angelslim"
    if not (root / "int8_dynamic" / "config.json").is_file():
        pytest.skip(f"AngelSlim fixtures are not in this checkout ({root})")
    record = evaluate(root / "original", root / "int8_dynamic", **{**SMALL, "context_length": 128, "max_eval_tokens": 512})
    m = record.metrics
    assert record.passed and m["cosine_similarity"] > 0.99 and abs(m["ppl"]["delta_percent"]) < 2.0
    assert record.candidate["activation_schemes"]["model.layers.*.mlp.down_proj"] == "int8-dynamic-token"
    assert m["weight_error"]["scope"] == "quantized" and m["weight_error"]["count"] == 7
    assert all(t["format"] == "int8" and t["sqnr_db"] > 35 for t in m["weight_error"]["tensors"])


# ----------------------------------------------------------------------------- the original's side, cached


def _int4_candidate(tiny_lm: Path, out: Path) -> Path:
    from llm_workbook.quantize.run import quantize

    quantize(tiny_lm, out, method="int4", progress=False)
    return out


def test_original_side_is_computed_once_and_gives_the_same_metrics(tiny_lm, tmp_path, monkeypatch):
    import gc
    import tempfile

    candidate = _int4_candidate(tiny_lm, tmp_path / "int4.parquet")
    cache = tmp_path / "reference"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    direct = evaluate(tiny_lm, candidate, reference_cache=False, **SMALL)
    gc.collect()
    assert not list(scratch.glob("llmc-reference-*"))  # not kept: its scratch entry went with the evaluation
    monkeypatch.undo()
    first = evaluate(tiny_lm, candidate, reference_cache=cache, **SMALL)
    again = evaluate(tiny_lm, candidate, reference_cache=cache, **SMALL)
    assert direct.settings["reference_cache"] == "computed, not kept"
    assert first.settings["reference_cache"].startswith("computed and stored")
    assert again.settings["reference_cache"].startswith("reused")
    assert len(list(cache.glob("*.reference"))) == 1 and not [p for p in cache.iterdir() if p.name.startswith(".")]
    for record in (first, again):  # float32 logits: every figure equals the direct computation exactly
        assert record.metrics["kld"] == direct.metrics["kld"]
        assert record.metrics["ppl"] == direct.metrics["ppl"]
        assert record.metrics["hidden_cosine"] == direct.metrics["hidden_cosine"]
        assert record.metrics["generation"] == direct.metrics["generation"]
    assert direct.metrics["kld"]["mean"] > 0  # a real difference, not two identical models
    # another window plan is another entry, never a stale one
    evaluate(tiny_lm, candidate, reference_cache=cache, **{**SMALL, "stride": 32})
    assert len(list(cache.glob("*.reference"))) == 2


def test_the_original_side_is_written_window_by_window_and_a_stopped_one_leaves_nothing(tiny_lm, tmp_path,
                                                                                        monkeypatch):
    from llm_workbook.evaluation import scoring

    candidate = _int4_candidate(tiny_lm, tmp_path / "int4.parquet")
    cache = tmp_path / "ref"
    record = evaluate(tiny_lm, candidate, reference_cache=cache, **SMALL)
    (entry,) = cache.glob("*.reference")
    # one shard per window: computing the side holds one window's outputs, never the whole text's
    assert len(list(entry.glob("window-*.safetensors"))) == record.metrics["ppl"]["num_windows"] >= 3
    # an entry this version cannot read (an older format) is recomputed in its place
    meta = json.loads((entry / "meta.json").read_text())
    (entry / "meta.json").write_text(json.dumps({**meta, "format_version": 2}))
    again = evaluate(tiny_lm, candidate, reference_cache=cache, **SMALL)
    assert again.settings["reference_cache"].startswith("computed and stored") and again.metrics["kld"] == record.metrics["kld"]
    assert json.loads((entry / "meta.json").read_text())["format_version"] == meta["format_version"]
    # stopped while scoring the original's second window: no entry, no staging directory
    real, calls = scoring._scored_outputs, []

    def stopped(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(scoring, "_scored_outputs", stopped)
    fresh = tmp_path / "fresh"
    with pytest.raises(KeyboardInterrupt):
        evaluate(tiny_lm, candidate, reference_cache=fresh, **SMALL)
    assert not list(fresh.iterdir())


def test_float16_reference_stays_within_its_stated_tolerance(tiny_lm, tmp_path):
    candidate = _int4_candidate(tiny_lm, tmp_path / "int4.parquet")
    exact = evaluate(tiny_lm, candidate, reference_cache=False, **SMALL)
    half = evaluate(tiny_lm, candidate, reference_cache=tmp_path / "ref", reference_precision="float16", **SMALL)
    assert half.metrics["kld"]["mean"] == pytest.approx(exact.metrics["kld"]["mean"], rel=1e-3)
    assert half.metrics["top1_agreement"] == exact.metrics["top1_agreement"]  # top-1 stored exactly
    assert half.metrics["ppl"] == exact.metrics["ppl"]  # the original's NLL is stored exactly
    assert half.metrics["logits_cosine"]["mean"] == pytest.approx(exact.metrics["logits_cosine"]["mean"], abs=1e-4)


def test_corrupted_reference_file_is_refused(tiny_lm, tmp_path):
    candidate = _int4_candidate(tiny_lm, tmp_path / "int4.parquet")
    cache = tmp_path / "ref"
    evaluate(tiny_lm, candidate, reference_cache=cache, **SMALL)
    (entry,) = cache.glob("*.reference")
    path = max(entry.glob("window-*.safetensors"), key=lambda p: int(p.stem.split("-")[1]))
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # inside the last window's arrays
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum mismatch"):
        evaluate(tiny_lm, candidate, reference_cache=cache, **SMALL)


def test_nan_candidate_is_an_evaluation_fault(tiny_lm, tmp_path):
    from safetensors.torch import load_file, save_file

    from llm_workbook.evaluation.record import EvaluationFault

    broken = tmp_path / "nan"
    shutil.copytree(tiny_lm, broken)
    tensors = load_file(broken / "model.safetensors")
    name = next(n for n in tensors if n.endswith("mlp.down_proj.weight"))
    tensors[name][0, 0] = float("nan")
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    HuggingFaceToParquetConverter(progress=False, allow_nonfinite=True).convert(broken, tmp_path / "nan.parquet")
    with pytest.raises(EvaluationFault, match="candidate computes .* NaN/Inf logits"):
        evaluate(tiny_lm, tmp_path / "nan.parquet", reference_cache=False, **SMALL)


def test_lm_eval_runs_on_the_parquet_loaded_models_with_accuracy_recovery_and_flips(tiny_lm, tmp_path):
    """lm-evaluation-harness scores both models (loaded from Parquet) on the offline LAMBADA-protocol task;
    the original's answers are kept with its stored side, so a second candidate reuses them."""
    candidate = _int4_candidate(tiny_lm, tmp_path / "int4.parquet")
    record = evaluate(tiny_lm, candidate, reference_cache=tmp_path / "ref", lm_eval_tasks=("heldout_lambada",),
                      lm_eval_limit=24, **SMALL)
    task = record.metrics["tasks"]["heldout_lambada"]
    assert task["items"] == 24 and "not the LAMBADA dataset" in task["label"]
    for key in ("accuracy_original", "accuracy_candidate", "flips"):
        iv = task[key]
        assert 0.0 <= iv["low"] <= iv["estimate"] <= iv["high"] <= 1.0, key
    assert task["flips"]["estimate"] == pytest.approx((task["flips_lost"] + task["flips_gained"]) / 24)
    same = evaluate(tiny_lm, tiny_lm, reference_cache=tmp_path / "ref", lm_eval_tasks=("heldout_lambada",),
                    lm_eval_limit=24, **SMALL)
    flips = same.metrics["tasks"]["heldout_lambada"]["flips"]
    assert flips["estimate"] == 0.0 and "reused" in same.settings["reference_cache"]


def test_runs_with_and_without_tasks_share_the_originals_scored_windows(tiny_lm, tmp_path):
    """The original's lm-eval answers are a cache entry of their own: adding a task to a run does not
    recompute the original's windows, and the answers are computed once."""
    candidate = _int4_candidate(tiny_lm, tmp_path / "int4.parquet")
    cache = tmp_path / "ref"
    plain = evaluate(tiny_lm, candidate, reference_cache=cache, **SMALL)
    with_tasks = evaluate(tiny_lm, candidate, reference_cache=cache, lm_eval_tasks=("heldout_lambada",),
                          lm_eval_limit=8, **SMALL)
    assert plain.settings["reference_cache"].startswith("computed and stored")
    assert with_tasks.settings["reference_cache"].startswith("reused")
    assert with_tasks.metrics["kld"] == plain.metrics["kld"]
    assert len(list(cache.glob("*.tasks"))) == 1 and len(list(cache.glob("*.reference"))) == 1
    answers = next(cache.glob("*.tasks")) / "tasks.safetensors"
    stamp = answers.stat().st_mtime_ns
    again = evaluate(tiny_lm, candidate, reference_cache=cache, lm_eval_tasks=("heldout_lambada",), lm_eval_limit=8, **SMALL)
    assert answers.stat().st_mtime_ns == stamp  # reused, not recomputed
    assert json.dumps(again.metrics["tasks"], sort_keys=True) == json.dumps(with_tasks.metrics["tasks"], sort_keys=True)


def test_lm_eval_task_items_come_from_the_held_out_split_only():
    from llm_workbook import corpus
    from llm_workbook.evaluation.tasks import heldout_passages

    items = heldout_passages(50)
    train = corpus.load_text("pydoc", "train")
    assert len(items) == 50 and all(item["text"].split()[-1].isalpha() for item in items)
    assert not any(item["text"][-200:] in train for item in items)


def test_staged_scoring_stops_once_every_check_is_decided_and_scores_on_while_undecided(tiny_lm, tmp_path, monkeypatch):
    settings = dict(SMALL, max_eval_tokens=512, gen_tokens=0)
    same = evaluate(tiny_lm, tiny_lm, reference_cache=tmp_path / "ref", stage_tokens=128, **settings)
    ppl = same.metrics["ppl"]
    assert ppl["num_tokens"] == 128 and ppl["stopped"] == f"decided at 128 of {ppl['text_tokens']:,} tokens"
    assert same.verdict["outcome"] == "pass"
    # while no stage can decide, the whole text is scored
    from llm_workbook.evaluation import uncertainty

    monkeypatch.setattr(uncertainty, "classify", lambda *a, **k: uncertainty.INCONCLUSIVE)
    edge = evaluate(tiny_lm, tiny_lm, reference_cache=tmp_path / "ref", stage_tokens=128, **settings)
    assert edge.verdict["outcome"] == "inconclusive"
    assert edge.metrics["ppl"]["num_tokens"] == edge.metrics["ppl"]["text_tokens"]
    assert edge.metrics["ppl"]["stopped"].startswith("all ")
    # AI-OS's PrecisionValidator figure rides along: last-position logits, one per window
    assert edge.metrics["aios_validator_cosine"]["count"] == edge.metrics["ppl"]["num_windows"]
    assert edge.metrics["aios_validator_cosine"]["mean"] == pytest.approx(1.0)


def test_lm_eval_runs_quietly(tiny_lm, capsys):
    """lm-eval's progress bars and notices would read as an error block in a report."""
    from llm_workbook.evaluation.tasks import run_tasks
    from llm_workbook.runtime.load import load_model, load_tokenizer

    model, _ = load_model(tiny_lm)
    answers = run_tasks(model, load_tokenizer(tiny_lm), ("heldout_lambada",), 8)
    assert answers["heldout_lambada"].shape == (8,)
    captured = capsys.readouterr()
    assert "Running loglikelihood requests" not in captured.err and "already-initialized" not in captured.err


def test_lm_eval_indexes_its_own_tasks_only_when_one_is_named():
    """Indexing lm-eval's bundled tasks costs about 13 s a run: the offline task alone skips it, and a bundled
    task named beside it still resolves."""
    from llm_workbook.evaluation.tasks import _task_dir, task_manager

    include = _task_dir(4)
    try:
        ours = task_manager(("heldout_lambada",), include)
        assert "heldout_lambada" in ours.all_tasks and "hellaswag" not in ours.all_tasks
        both = task_manager(("heldout_lambada", "hellaswag"), include)
        assert {"heldout_lambada", "hellaswag"} <= set(both.all_tasks)
    finally:
        shutil.rmtree(include)
