"""What one run of the evaluation notebook computes besides the evaluation itself: the store check
(convert, verify, round trip), the run record and its verdict. The notebook only calls and shows these.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llm_workbook import schema as S
from llm_workbook.store import inventory
from llm_workbook.store.aios import AiosView, aios_view, convert_aios
from llm_workbook.workbook import tables
from llm_workbook.workbook.run_record import RunRecord
from llm_workbook.store.convert import HuggingFaceToParquetConverter, export_to_hf
from llm_workbook.store.gguf import export_gguf
from llm_workbook.store.loader import WeightLoaderV2
from llm_workbook.store.source import Kind, Source


@dataclass
class StoreCheck:
    """The candidate as stored: its Parquet file, whether every checksum verifies, whether it came back exactly."""

    parquet: Path
    source_kind: str  # "parquet" (given as a weight file), "gguf", "hf" or "aios" (an AI-OS V1/V2 file or model directory)
    convert_seconds: float | None
    checksum_problems: list[str]
    lossless: bool | None  # None: nothing to compare with (the candidate was a Parquet file already)
    lossless_detail: str = ""
    summary: dict = field(default_factory=dict)
    aios: "AiosView | None" = None  # an AI-OS file: what AI-OS's own loader makes of it

    @property
    def ok(self) -> bool:
        return not self.checksum_problems and self.lossless is not False


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def _hf_round_trip(source: Source, parquet: Path, scratch: Path) -> tuple[bool, str]:
    from llm_workbook.store.checkpoint import open_checkpoint

    exported = scratch / "exported"
    shutil.rmtree(exported, ignore_errors=True)
    export_to_hf(parquet, exported, progress=False)
    try:
        src = source.checkpoint()
        back = open_checkpoint(exported)
        mismatched = [n for n in src.tensors
                      if n not in back.tensors or not _same_bytes(src.read(n), back.read(n))]
        extra = set(back.tensors) - set(src.tensors)
    finally:
        shutil.rmtree(exported, ignore_errors=True)
    if mismatched or extra:
        return False, f"{len(mismatched)} tensors differ (first: {(mismatched or sorted(extra))[0]})"
    return True, f"all {len(src.tensors)} tensors bit for bit"


def _gguf_round_trip(source: Source, parquet: Path, scratch: Path) -> tuple[bool, str]:
    back = scratch / "back.gguf"
    back.unlink(missing_ok=True)
    try:
        differences = export_gguf(parquet, back)
        same = _sha256(back) == _sha256(source.gguf())
    finally:
        back.unlink(missing_ok=True)
    if same:
        return True, "GGUF rewritten byte for byte (same sha256)"
    return False, "GGUF rewritten with differences: " + ("; ".join(differences) or "bytes differ")


def _aios_round_trip(source: Source, parquet: Path) -> tuple[bool, str]:
    """Every tensor of the stored file equals the AI-OS file's as its writer meant it (codes, scales, floats)."""
    theirs, ours = WeightLoaderV2(source.aios_file), WeightLoaderV2(parquet)
    names = theirs.stored_keys()
    if sorted(names) != sorted(ours.stored_keys()):
        return False, "the stored file holds other tensors than the AI-OS file"
    for name in names:
        layer, weight = S.split_name(name)
        if not torch.equal(theirs.load_weight(layer, weight).float(), ours.load_weight(layer, weight).float()):
            return False, f"{name} differs from the AI-OS file's value"
    return True, f"{len(names)} tensors equal the AI-OS file's values as its writer meant them"


def store_candidate(candidate_src: Source | str | Path, scratch: Path, reference: Source | str | Path | None = None,
                    progress: bool = False) -> StoreCheck:
    """Convert the candidate into the store (unless it is a weight file already), verify every checksum and
    check the round trip: HF directories export back tensor for tensor, GGUF files byte for byte. An AI-OS
    V1/V2 file or model directory is converted as its writer meant it, with the config and tokenizer of
    ``reference`` (AI-OS keeps none), and viewed as AI-OS's own loader reads it (``StoreCheck.aios``)."""
    source = Source.of(candidate_src)
    if source.kind is Kind.AIOS:
        parquet = scratch / "candidate.parquet"
        parquet.unlink(missing_ok=True)
        started = time.perf_counter()
        convert_aios(source.path, parquet, progress=progress, config_source=reference)
        seconds = time.perf_counter() - started
        view = aios_view(source.path, parquet, scratch / "candidate-as-aios-reads.parquet")
        lossless, detail = _aios_round_trip(source, parquet)
        loader = WeightLoaderV2(parquet)
        return StoreCheck(parquet, "aios", seconds, loader.verify_all(), lossless, detail, inventory.summary(loader), view)
    if source.is_parquet:
        parquet, kind, seconds = source.location, "parquet", None
    else:
        kind = "gguf" if source.kind is Kind.GGUF else "hf"
        parquet = scratch / "candidate.parquet"
        parquet.unlink(missing_ok=True)
        started = time.perf_counter()
        HuggingFaceToParquetConverter(progress=progress).convert(source, parquet)
        seconds = time.perf_counter() - started
    loader = WeightLoaderV2(parquet)
    problems = loader.verify_all()
    lossless, detail = None, "n/a (given as a Parquet weight file)"
    if kind == "hf":
        lossless, detail = _hf_round_trip(source, parquet, scratch)
    elif kind == "gguf":
        lossless, detail = _gguf_round_trip(source, parquet, scratch)
    return StoreCheck(parquet, kind, seconds, problems, lossless, detail, inventory.summary(loader))


def as_aios_reads(check: StoreCheck, reference_src, settings: dict) -> dict | None:
    """For an AI-OS file that AI-OS's own loader reads differently from how its writer wrote it: the same
    evaluation (``settings``, the keywords the run passed to ``evaluate``; no speed or task runs) of what AI-OS
    computes with, beside the run's figures as written. None when AI-OS reads the file as written."""
    from llm_workbook.evaluation.compare import evaluate

    view = check.aios
    if view is None or not view.differs:
        return None
    out = {"view": "as AI-OS's own loader reads the file", **view.as_dict()}
    if view.parquet is None:
        out["verdict"] = {"outcome": "fail", "passed": False,
                          "reasons": [f"AI-OS's loader raises on {len(view.raises)} tensors: the model does not load in AI-OS "
                                      f"(first: {view.raises[0]})"]}
        return out
    record = evaluate(reference_src, view.parquet, **{**settings, "perf": False, "lm_eval_tasks": ()}).to_dict()
    metrics = record["metrics"]
    out.update(verdict=record["verdict"], cosine=metrics.get("cosine_similarity"),
               aios_validator_cosine=(metrics.get("aios_validator_cosine") or {}).get("mean"),
               kld_mean=(metrics.get("kld") or {}).get("mean"), top1_agreement=metrics.get("top1_agreement"),
               ppl=metrics.get("ppl"), intervals=metrics.get("intervals"))
    return out


def as_read_line(read: dict | None) -> str | None:
    """One line for the index: what the run's verdict becomes as AI-OS reads the file (None: it reads it as written)."""
    if not read:
        return None
    outcome = tables.LABELS.get((read.get("verdict") or {}).get("outcome"), "FAIL")
    if not read.get("loads_in_aios", True):
        return f"as AI-OS reads the file: {outcome}, it does not load ({read['raises']} tensors raise)"
    ppl = (read.get("ppl") or {}).get("delta_percent")
    return f"as AI-OS reads the file ({read['reads_wrong']} tensors read wrong): {outcome}, PPL {tables.format_ppl_delta(ppl)}"


def as_written_and_as_read(data: dict) -> list[dict]:
    """The table beside each other: the file as its writer meant it, and as AI-OS reads it."""
    read = data.get("as_aios_reads")
    if not read:
        return []
    metrics = data["metrics"]

    def row(label, outcome, cosine, validator, kld, top1, ppl, iv):
        iv = iv or {}
        return {"read": label, "verdict": outcome, "cosine": cosine, "AI-OS validator cosine": validator,
                "KLD mean": kld, "top-1 agreement": top1,
                "PPL change [95 %]": tables.ppl_with_interval(ppl, iv.get("low"), iv.get("high"))}

    return [
        row("as written (its writer's values)", data["verdict"].get("outcome"), metrics.get("cosine_similarity"),
            (metrics.get("aios_validator_cosine") or {}).get("mean"), metrics["kld"]["mean"], metrics.get("top1_agreement"),
            metrics["ppl"].get("delta_percent"), (metrics.get("intervals") or {}).get("ppl_change_percent")),
        row("as AI-OS's loader reads it", read["verdict"].get("outcome"), read.get("cosine"), read.get("aios_validator_cosine"),
            read.get("kld_mean"), read.get("top1_agreement"), (read.get("ppl") or {}).get("delta_percent"),
            (read.get("intervals") or {}).get("ppl_change_percent")),
    ]


def stand_ins(*sources: Source) -> tuple[str, ...]:
    """The names of the sources whose model card says they are stand-ins (``make seed-models``: random weights
    in a release's layout), so the report does not pass their quality figures off as the release's."""
    from llm_workbook.synthetic.seed_models import stand_in_of

    return tuple(s.name for s in sources
                 if s.kind in (Kind.HUB, Kind.HF_DIR) and stand_in_of(s.root()) is not None)


def stand_in_sentence(names) -> str:
    return (f"{' and '.join(f'`{n}`' for n in names)} {'is a stand-in' if len(names) == 1 else 'are stand-ins'} "
            "built by `make seed-models`: random weights in the release's architecture, shapes and layout. Sizes, "
            "layouts, round trip, time and memory are the release's; quality figures and the verdict say nothing "
            "about it.")


def store_facts(check: StoreCheck) -> dict:
    store = check.summary
    return {
        "file size (MB)": round(store["file_bytes"] / 1e6, 3),
        "parameters": f"{store['parameters']:,}",
        "bits per weight (all tensors)": round(store["bits_per_weight"], 3),
        "bits per weight (quantized tensors)": "none quantized" if store["quantized_bits_per_weight"] is None
        else round(store["quantized_bits_per_weight"], 3),
        "compression vs bf16": f"{store['compression_vs_bf16']:.2f}x",
        "storage formats": ", ".join(store["formats"]),
        **({"SEQ weights (weight_clip_val)": store["seq"]["description"]} if store.get("seq") else {}),
        "checksums": "all verify" if not check.checksum_problems else f"{len(check.checksum_problems)} FAILED",
        "round trip": {True: "exact: ", False: "NOT exact: ", None: ""}[check.lossless] + check.lossless_detail,
        "conversion time (s)": "none (given as a weight file)" if check.convert_seconds is None
        else round(check.convert_seconds, 2),
    }


def run_record(params: dict, data: dict, check: StoreCheck) -> RunRecord:
    """The run's record: the evaluation record, the store check, and the verdict (which also fails when the
    file is not a bit-exact, verified copy of the checkpoint)."""
    verdict = dict(data["verdict"])
    reasons = list(verdict.get("reasons") or [])
    if not check.ok:
        reasons.append("the Parquet file is not a bit-exact copy of the checkpoint"
                       + (f" ({check.lossless_detail})" if check.lossless is False else " (checksums fail)"))
    passed = bool(verdict.get("passed")) and check.ok
    outcome = "fail" if not check.ok else verdict.get("outcome") or ("pass" if passed else "fail")
    verdict.update(passed=passed, reasons=reasons, outcome=outcome)
    summary = tables.run_summary({**data, "verdict": verdict}, params)
    summary["passed"] = passed
    from llm_workbook.runtime import aios_engine
    from llm_workbook.workbook import builtins

    summary["self_source"] = builtins.is_own_source(params.get("model", ""), params.get("reference", ""))
    engine = aios_engine.verdict(WeightLoaderV2(check.parquet))
    summary["aios_engine"] = aios_engine.summary_line(engine)
    summary["as_aios_reads"] = as_read_line(data.get("as_aios_reads"))
    store = {**check.summary, "checksums_verify": not check.checksum_problems, "export_bit_exact": check.lossless,
             "round_trip": check.lossless_detail}
    evaluation = {k: v for k, v in data.items() if k != "verdict"}
    return RunRecord.evaluated(params, evaluation, store, verdict, summary, engine)


SUMMARY_ROWS = {"producer": "produced by", "format": "format", "activations": "activations",
                "bits_per_weight": "bits per weight (all tensors)", "size_mb": "size on disk (MB)",
                "cosine": "cosine similarity (mean)", "kld_mean": "KL divergence (mean)",
                "top1_agreement": "top-1 agreement", "ppl_delta_pct": "perplexity change (%)",
                "latency_label": "latency", "peak_rss_mb": "peak memory, dequantized (MB)"}


def summary_rows(result: RunRecord | dict) -> dict[str, str]:
    """The verdict's summary as a reader sees it: a figure, or why there is none (never ``None``)."""
    result = RunRecord.of(result)
    summary, perf = result.summary, result.perf
    measured = bool(perf.get("candidate"))
    rows = {}
    for key, label in SUMMARY_ROWS.items():
        value = summary.get(key)
        if value in (None, "", "not measured") or (isinstance(value, float) and math.isnan(value)):
            if key in ("latency_label", "peak_rss_mb"):
                value = ("not measured for the candidate (perf_models)" if perf else
                         "not measured (measure_perf: false)") if not measured else "not recorded"
            elif key in ("kld_mean", "top1_agreement", "ppl_delta_pct"):
                value = "not computed (a sentence encoder has no next-token output)"
            else:
                value = "not known"
        elif isinstance(value, float):
            value = f"{value:.4g}"
        rows[label] = str(value)
    return rows


def fault_record(params: dict, reason: str, check: StoreCheck | None = None) -> RunRecord:
    """The record of a run the evaluation refused (NaN logits, another vocabulary or architecture...): it
    fails with that reason, and the batch goes on."""
    store = {**check.summary, "checksums_verify": not check.checksum_problems,
             "export_bit_exact": check.lossless} if check else None
    return RunRecord.fault(params, reason, store)


def evaluated(record, params: dict) -> dict:
    """The evaluation record as the run keeps it: who produced the candidate and which model the original is
    (from the parameters, else the builtin catalogue)."""
    from llm_workbook.workbook import builtins

    data = record.to_dict()
    data["candidate"]["producer"] = params.get("producer") or builtins.producer(params["model"])
    data["original"]["model"] = params.get("model_name") or builtins.model_name(params["reference"])
    data["candidate"]["build"] = builtins.provenance(params["model"])
    return data


CHECK_LABELS = {"cosine": "cosine similarity (at least)", "ppl_increase": "perplexity increase, fraction (at most)",
                "kld": "KL divergence, mean (at most)", "top1": "top-1 agreement (at least)"}


def quality_rows(data: dict) -> list[dict]:
    """One row per verdict check: what it measures, the value with its 95 % interval, its threshold, and the
    outcome (yes / NO / undecided, with the tokens that would decide it)."""
    rows = []
    for c in data["verdict"]["checks"]:
        scale = 100.0 if c["name"] == "ppl_increase" else 1.0
        iv = c.get("interval")
        value = c["value"]
        shown = value if iv is None or value is None else (
            f"{value:.4g} [{iv['low'] / scale:.4g}, {iv['high'] / scale:.4g}]")
        outcome = {"pass": "yes", "fail": "NO", "inconclusive": "undecided"}.get(c.get("outcome"),
                                                                               {True: "yes", False: "NO", None: "—"}[c["passed"]])
        if c.get("outcome") == "inconclusive" and c.get("tokens_to_decide"):
            outcome += f" (about {c['tokens_to_decide']:,} tokens would decide)"
        rows.append({"check": CHECK_LABELS.get(c["name"], c["name"]), "value [95 % interval]": shown,
                     "threshold": "none set" if c["threshold"] is None else c["threshold"], "passed": outcome})
    return rows


def task_rows(data: dict) -> list[dict]:
    """One row per lm-eval task: both accuracies, recovery and flips, each with its 95 % interval."""
    def shown(iv: dict, percent: bool = True) -> str:
        f = (lambda v: f"{100 * v:.1f} %") if percent else (lambda v: f"{v:.3f}")
        return f"{f(iv['estimate'])} [{f(iv['low'])}, {f(iv['high'])}]"

    rows = []
    for name, t in ((data.get("metrics") or {}).get("tasks") or {}).items():
        rows.append({"task": name, "what": t["label"], "items": t["items"],
                     "accuracy, original": shown(t["accuracy_original"]),
                     "accuracy, candidate": shown(t["accuracy_candidate"]),
                     "recovery": shown(t["recovery"], percent=False),
                     "flips": f"{shown(t['flips'])} ({t['flips_lost']} lost, {t['flips_gained']} gained)"})
    return rows


def divergence_rows(data: dict) -> list[dict]:
    """llama.cpp's --kl-divergence figures (KLD and Δp percentiles, RMS Δp, same top-1), to read against its tables."""
    d = (data.get("metrics") or {}).get("divergence")
    if not d:
        return []
    k, dp, top = d["kld"], d["delta_p"], d["same_top1"]
    rows = [{"statistic": "Mean KLD", "value": f"{k['mean']:.6f} ± {k['mean_se']:.6f}"},
            *({"statistic": f"KLD {q}", "value": f"{k[key]:.6f}"} for q, key in
              (("99.9%", "p99.9"), ("99.0%", "p99"), ("90.0%", "p90"), ("median", "p50"), ("10.0%", "p10"),
               ("5.0%", "p5"), ("1.0%", "p1"), ("max", "max"))),
            {"statistic": "Mean Δp", "value": f"{100 * dp['mean']:+.3f} ± {100 * dp['mean_se']:.3f} %"},
            {"statistic": "RMS Δp", "value": f"{100 * dp['rms']:.3f} ± {100 * dp['rms_se']:.3f} %"},
            *({"statistic": f"Δp {q}", "value": f"{100 * dp[key]:+.3f} %"} for q, key in
              (("max", "max"), ("99.9%", "p99.9"), ("99.0%", "p99"), ("95.0%", "p95"), ("90.0%", "p90"),
               ("median", "p50"), ("10.0%", "p10"), ("5.0%", "p5"), ("1.0%", "p1"), ("0.1%", "p0.1"),
               ("min", "min"))),
            {"statistic": "Same top p", "value": f"{100 * top['mean']:.3f} ± {100 * top['se']:.3f} %"}]
    return rows


def perf_rows(data: dict) -> list[dict]:
    """Size, load time, speed and peak memory per measured model (the candidate twice when it was also run
    with its codes kept packed)."""
    perf = data.get("perf") or {}
    rows = []
    for who in ("original", "candidate", "candidate_packed"):
        measured = perf.get(who) or {}
        if who == "candidate_packed" and not measured:
            continue
        size = data["sizes"]["candidate" if who == "candidate_packed" else who]
        rows.append({
            "model": {"candidate_packed": "candidate (packed)"}.get(who, who),
            "size on disk (MB)": (size.get("file_bytes") or 0) / 1e6,
            "load time (s)": ((measured.get("load") or {}).get("parquet_s") or (measured.get("load") or {}).get("hf_s")
                              or {}).get("median"),
            "prefill (ms/token)": (measured.get("prefill_ms_per_token") or {}).get("median"),
            "decode (tokens/s)": (measured.get("decode_tokens_per_s") or {}).get("median"),
            "embedding (sentences/s)": (measured.get("embedding_sentences_per_s") or {}).get("median"),
            "peak RSS (MB)": ((measured.get("memory") or {}).get("inference_peak_rss_bytes") or 0) / 1e6 or None,
        })
    return rows


def runtime_rows(data: dict) -> list[dict]:
    """Speed and memory of each measured model in each serving runtime (``perf.RUNTIMES``), with the decode
    speed this machine's memory bandwidth allows for the weight bytes a token reads."""
    rows = []
    for who in ("original", "candidate"):
        for name, f in tables.runtime_figures((data.get("perf") or {}).get(who) or {}).items():
            row = {"model": who, "runtime": tables.RUNTIME_NAMES.get(name, name)}
            if "error" in f or "unavailable" in f:
                why = f.get("unavailable") or "failed: " + tables.first_line(f["error"])[:120]
                rows.append({**row, "decode tokens/s (batch 1)": why})
                continue
            low, high = f["speed_iqr"]
            if not f["decode_tps"]:  # an encoder embeds sentences: no decode, so no bandwidth limit per token
                rows.append({**row, "embedding sentences/s": f"{f['speed']:.1f} [IQR {low:.1f}, {high:.1f}]",
                             "peak memory (MB)": f"{f['peak_rss_mb']:.0f} RSS" if f["peak_rss_mb"] else "—",
                             "quantized layers run as": f["kernels"] or "float32 (dequantized at load)"})
                continue
            rows.append({**row,
                         "decode tokens/s (batch 1)": f"{f['decode_tps']:.1f} [IQR {low:.1f}, {high:.1f}]",
                         f"decode tokens/s (batch {f['batch'] or 8})": f"{f['batch_tps']:.1f}" if f["batch_tps"] else "—",
                         "bandwidth limit (tokens/s)": f"{f['limit_tps']:.0f}" if f["limit_tps"] else "—",
                         "share of the limit": f"{f['fraction_of_limit']:.0%}" if f["fraction_of_limit"] else "—",
                         "weights read per token (MB)": f"{f['weight_mb_per_token']:.0f}",
                         "peak memory decoding (MB)": f"{f['peak_rss_mb']:.0f}" + (" on the device" if name == "gpu" else " RSS"),
                         "quantized layers run as": f["kernels"] or "float32 (dequantized at load)"})
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return [{key: row.get(key, "—") for key in columns} for row in rows]  # a runtime without figures reads "—"


def speed_finding(data: dict, params: dict) -> str:
    """The run's speed and memory finding in one sentence (``tables.speed_finding``)."""
    summary = tables.run_summary(data, params)
    return tables.speed_finding(summary, summary["original_runtimes"], None)
