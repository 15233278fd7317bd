"""The decision table: one row per run (model/format) from the runs' JSON records.

Each record carries a flat ``summary`` block written by evaluate_model.ipynb (see
``summary_from_record``); failed runs carry only ``status``/``error``/``verdict``.
"""

from __future__ import annotations

import math

import pandas as pd

from llm_workbook.workbook.decision import first_line, format_ppl_delta
from llm_workbook.workbook.run_record import RunRecord
from llm_workbook.workbook.status import RunStatus

COLUMNS = {
    "run": "run",
    "producer": "produced by",
    "format": "format",
    "activations": "activations",
    "bits_per_weight": "bits/weight (all)",
    "quantized_bits_per_weight": "bits/weight (quantized)",
    "size_mb": "size (MB)",
    "compression_vs_bf16": "× vs bf16",
    "cosine": "cosine (mean)",
    "kld_mean": "KLD (mean)",
    "top1_agreement": "top-1 agree",
    "ppl_delta_pct": "PPL change [95 % interval]",
    "latency": "latency",
    "peak_rss_mb": "peak RSS, dequantized (MB)",
    "peak_rss_packed_mb": "peak RSS, packed (MB)",
    "verdict": "verdict",
    "why": "why (failed or undecided)",
}

INTERNAL = ["_passed", "_reference", "_order", "_ppl_low", "_ppl_high"]  # for sorting and plots, never shown
LABELS = {"pass": "PASS", "fail": "FAIL", "inconclusive": "UNDECIDED"}
ORDER = {"PASS": 0, "UNDECIDED": 1, "FAIL": 2, "ROUND TRIP": 3, "ERROR": 4}


def _number(value):
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def decision_table(records: list[RunRecord | dict]) -> pd.DataFrame:
    """Sorted: passing runs first, then by PPL change (smallest first), then by size."""
    records = [RunRecord.of(r) for r in records]
    rows = []
    for record in records:
        s = record.summary
        status = record.status or s.get("status")
        verdict = record.verdict
        passed = bool(verdict.get("passed")) and status != RunStatus.ERROR
        outcome = verdict.get("outcome") or ("pass" if passed else "fail")
        if status == RunStatus.ERROR:
            label = "ERROR"
        elif s.get("self_source"):
            label = "ROUND TRIP"  # the original's own source: a store check, never a quantization to recommend
        else:
            label = LABELS.get(outcome, "FAIL")
        low, high = (s.get("ppl_interval") or [None, None])[:2]
        rows.append({
            "run": record.run,
            "producer": s.get("producer") or "",
            "format": s.get("format", "?"),
            "activations": s.get("activations") or "",
            "bits_per_weight": _number(s.get("bits_per_weight")),
            "quantized_bits_per_weight": _number(s.get("quantized_bits_per_weight")),
            "size_mb": _number(s.get("size_mb")),
            "compression_vs_bf16": _number(s.get("compression_vs_bf16")),
            "cosine": _number(s.get("cosine")),
            "kld_mean": _number(s.get("kld_mean")),
            "top1_agreement": _number(s.get("top1_agreement")),
            "ppl_delta_pct": _number(s.get("ppl_delta_pct")),
            "latency": s.get("latency_label", ""),
            "peak_rss_mb": _number(s.get("peak_rss_mb")),
            "peak_rss_packed_mb": _number(s.get("peak_rss_packed_mb")),
            "verdict": label,
            "why": "; ".join(filter(None, [
                "" if passed else "; ".join(first_line(r) for r in verdict.get("reasons") or []) or first_line(
                    record.error or ""),
                s.get("as_aios_reads")])),  # an AI-OS file AI-OS's own loader reads otherwise
            "_passed": passed,
            "_reference": s.get("reference"),  # the original it was compared with (plots group by it)
            "_order": ORDER.get(label, 5),
            "_ppl_low": _number(low),
            "_ppl_high": _number(high),
        })
    table = pd.DataFrame(rows, columns=list(COLUMNS) + INTERNAL)
    if len(table):
        table = table.sort_values(["_order", "ppl_delta_pct", "size_mb"], ascending=[True, True, True], na_position="last")
    return table.reset_index(drop=True)


# Speed and memory: measured in few runs, so the index shows them in a table of their own (``perf_table``)
# and the all-runs table keeps to what every run has, within a 1,400 px page.
PERF_COLUMNS = ["latency", "peak_rss_mb", "peak_rss_packed_mb"]
WIDE_COLUMNS = ["bits_per_weight", "compression_vs_bf16"]  # derivable from size and the quantized bits


def style_decision_table(table: pd.DataFrame, compact: bool = False):
    """A pandas Styler: failures highlighted, numbers rounded, internal columns hidden. ``compact``: without
    the speed and memory columns and the derivable size columns (the index's page width)."""
    ppl = [ppl_with_interval(v, lo, hi) for v, lo, hi in zip(table["ppl_delta_pct"], table["_ppl_low"], table["_ppl_high"])]
    dropped = INTERNAL + (PERF_COLUMNS + WIDE_COLUMNS if compact else [])
    shown = table.assign(ppl_delta_pct=ppl).drop(columns=dropped).rename(columns=COLUMNS)
    # columns no run fills (activations all weight-only, memory not measured...) only widen the page
    empty = [c for c in shown.columns if shown[c].isna().all() or (shown[c].astype(str).isin(["", "nan", "None", "weight-only"]).all())]
    shown = shown.drop(columns=[c for c in empty if c != COLUMNS["verdict"]])
    # the verdict next to the run's name: what a reader needs first stays on screen at any width
    first = [COLUMNS["run"], COLUMNS["verdict"]]
    shown = shown[[c for c in first if c in shown.columns] + [c for c in shown.columns if c not in first]]

    def highlight(row):
        verdict = row[COLUMNS["verdict"]]
        color = {"PASS": "#e6f4ea", "FAIL": "#fde2e1", "ERROR": "#f9c8c4", "UNDECIDED": "#fff4d6",
                 "ROUND TRIP": "#eeeeee"}.get(verdict, "")
        return [f"background-color: {color}" if color else "" for _ in row]

    fmt = {
        COLUMNS["bits_per_weight"]: "{:.2f}", COLUMNS["quantized_bits_per_weight"]: "{:.2f}", COLUMNS["size_mb"]: "{:.2f}", COLUMNS["compression_vs_bf16"]: "{:.2f}",
        COLUMNS["cosine"]: "{:.4f}", COLUMNS["kld_mean"]: "{:.4f}", COLUMNS["top1_agreement"]: "{:.3f}",
        COLUMNS["peak_rss_mb"]: "{:.0f}", COLUMNS["peak_rss_packed_mb"]: "{:.0f}",
    }
    fmt = {k: v for k, v in fmt.items() if k in shown.columns}
    styler = shown.style.apply(highlight, axis=1).format(fmt, na_rep="—", escape="html").hide(axis="index")
    # a producer is often a long path: it alone may break anywhere, so short words elsewhere stay whole
    if COLUMNS["producer"] in shown.columns:
        styler = styler.set_properties(subset=[COLUMNS["producer"]], **{"overflow-wrap": "anywhere", "min-width": "8em"})
    return styler


def perf_table(table: pd.DataFrame):
    """The runs that measured speed or memory, with their size: a Styler, or None when no run measured them."""
    measured = table[(table["latency"].astype(str) != "not measured") & (table["latency"].astype(str) != "")]
    if not len(measured):
        return None
    shown = measured[["run", "size_mb", *PERF_COLUMNS]].rename(columns=COLUMNS)
    fmt = {COLUMNS["size_mb"]: "{:.2f}", COLUMNS["peak_rss_mb"]: "{:.0f}", COLUMNS["peak_rss_packed_mb"]: "{:.0f}"}
    return shown.style.format(fmt, na_rep="—", escape="html").hide(axis="index")


def ppl_with_interval(value, low, high) -> str:
    """``+14.8 % [13.5, 16.2]``: the change and its 95 % interval (the interval left out where there is none)."""
    text = format_ppl_delta(value)
    if text == "—" or any(math.isnan(_number(x)) for x in (low, high)) or abs(_number(value)) >= 1000:
        return text
    return f"{text} [{low:+.1f}, {high:+.1f}]"


def _dig(data, *path, default=None):
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return default
        data = data[key]
    return data


def activation_label(candidate: dict) -> str:
    """``W8A8 simulated (fp8 static per tensor)`` where activations were quantized, else ``weight-only``:
    the two are different comparisons and every figure of such a run carries this label."""
    schemes = sorted(set((candidate.get("activation_schemes") or {}).values()))
    if candidate.get("activation_quant") and schemes:
        return "W8A8, simulated (" + ", ".join(schemes) + ")"
    return "weight-only"


def run_summary(record: dict, params: dict) -> dict:
    """The flat block the decision table reads, from an evaluation record (``EvaluationRecord.to_dict()``)."""
    size = _dig(record, "sizes", "candidate", default={}) or {}
    perf = _dig(record, "perf", "candidate", default={}) or {}
    formats = size.get("formats") or _dig(record, "candidate", "formats", default=[]) or []
    fmt = "+".join(f for f in formats if f != "dense") or "dense"
    latency_label, latency_value, latency_metric = ("not measured" if not perf else ""), None, None
    prefill = _dig(perf, "prefill_ms_per_token", "median")
    if prefill is not None:
        latency_value, latency_label, latency_metric = prefill, f"{prefill:.2f} ms/token (prefill)", "prefill_ms_per_token"
    embed = _dig(perf, "embedding_sentences_per_s", "median")
    if embed is not None:
        latency_value, latency_label, latency_metric = embed, f"{embed:.1f} sentences/s (embedding)", "embedding_sentences_per_s"
    peak = _dig(perf, "memory", "inference_peak_rss_bytes")
    packed = _dig(record, "perf", "candidate_packed", "memory", "inference_peak_rss_bytes")
    return {
        "run": params.get("run"),
        "title": params.get("title"),
        "model": params.get("model"),
        "reference": params.get("reference"),
        "producer": _dig(record, "candidate", "producer"),
        "original_model": _dig(record, "original", "model"),
        "format": fmt,
        "activations": activation_label(record.get("candidate") or {}),
        "kind": record.get("kind"),
        "bits_per_weight": size.get("bits_per_weight"),
        "quantized_bits_per_weight": size.get("quantized_bits_per_weight"),
        "size_mb": (size.get("file_bytes") or 0) / 1e6 or None,
        "original_size_mb": (_dig(record, "sizes", "original", "file_bytes") or 0) / 1e6 or None,
        "compression_vs_bf16": size.get("compression_vs_bf16"),
        "cosine": _dig(record, "metrics", "cosine_similarity"),
        "kld_mean": _dig(record, "metrics", "kld", "mean"),
        "top1_agreement": _dig(record, "metrics", "top1_agreement"),
        "ppl_delta_pct": _dig(record, "metrics", "ppl", "delta_percent"),
        "ppl_interval": [_dig(record, "metrics", "intervals", "ppl_change_percent", "low"),
                         _dig(record, "metrics", "intervals", "ppl_change_percent", "high")],
        "kld_interval": [_dig(record, "metrics", "intervals", "kld_mean", "low"),
                         _dig(record, "metrics", "intervals", "kld_mean", "high")],
        "outcome": _dig(record, "verdict", "outcome"),
        "ppl_tokens": _dig(record, "metrics", "ppl", "num_tokens"),
        "latency": latency_value,
        "latency_label": latency_label,
        "latency_metric": latency_metric,  # what ``latency`` measures: prefill_ms_per_token | embedding_sentences_per_s
        "peak_rss_mb": peak / 1e6 if peak else None,
        "peak_rss_packed_mb": packed / 1e6 if packed else None,
        "passed": bool(_dig(record, "verdict", "passed")),
        "runtimes": runtime_figures(perf),  # the candidate's speed and memory in each serving runtime
        "original_runtimes": runtime_figures(_dig(record, "perf", "original", default={}) or {}),
        "bandwidth_gb_per_s": _dig(perf, "bandwidth", "copy_gb_per_s", "median"),
    }


RUNTIME_NAMES = {"aios": "AI-OS as it is (float32)", "kernels": "weight-only kernels (bfloat16)",
                 "llama.cpp": "llama.cpp (GGUF)", "gpu": "GPU (CUDA)"}


def _ran_as(m: dict) -> str | None:
    """How the quantized layers ran in one runtime: llama.cpp's blocks, the kernels used, or None (float32)."""
    if m.get("device"):
        return f"{m['engine']} on {m['device']}: {m.get('quantization')}"
    if m.get("engine"):
        return f"{m['engine']}: the GGUF blocks as stored"
    kernels = m.get("kernel_layers")
    if kernels is None:
        return None
    return ", ".join(f"{n} {k}" for k, n in sorted(kernels.items())) or "no quantized layer"  # named by perf.child_run


def runtime_figures(perf: dict) -> dict:
    """Per runtime of one measured model: its speed (decode tokens/s at batch 1, or an encoder's sentences/s;
    median, IQR), decode tokens/s at batch 1 and at the larger batch,
    its share of the bandwidth limit, peak RSS while decoding, weight MB read per token, the kernels used."""
    from llm_workbook.evaluation.perf import NOT_GGUF

    out = {}
    for name, m in (perf.get("runtimes") or {}).items():
        if "error" in m or "unavailable" in m:
            if m.get("unavailable") != NOT_GGUF:
                out[name] = {"error": m["error"]} if "error" in m else {"unavailable": m["unavailable"]}
            continue
        decode = m.get("decode_tokens_per_s") or {}
        # the speed a meeting compares: decode tokens/s of a causal LM, sentences/s embedded by an encoder
        speed, unit = (decode, "tokens/s") if decode else (m.get("embedding_sentences_per_s") or {}, "sentences/s")
        out[name] = {
            "speed": speed.get("median"), "speed_iqr": [speed.get("q1"), speed.get("q3")], "unit": unit,
            "decode_tps": decode.get("median"), "decode_iqr": [decode.get("q1"), decode.get("q3")],
            "batch": m.get("decode_batch"), "batch_tps": _dig(m, "decode_batch_tokens_per_s", "median"),
            "fraction_of_limit": m.get("fraction_of_limit"), "limit_tps": m.get("limit_tokens_per_s"),
            # on a GPU the memory is the device's (``memory.device_memory`` says which figure)
            "peak_rss_mb": (_dig(m, "memory", "inference_peak_rss_bytes") or _dig(m, "memory", "device_peak_bytes")
                            or 0) / 1e6 or None,
            "weight_mb_per_token": (m.get("weight_bytes_per_token") or 0) / 1e6 or None,
            "kernels": _ran_as(m),
        }
    return out


def _ratio(value, reference) -> str:
    return f"{value / reference:.2f}x" if value and reference else "—"


def speed_panel(records: list[RunRecord | dict]) -> pd.DataFrame | None:
    """The meeting's speed and memory table: per candidate measured in the serving runtimes, its size on disk
    and, per runtime, decode tokens/s at batch 1 and peak memory, each relative to the original in the same
    runtime (measured in this run, or in another run against the same original), and the finding in words."""
    records = [RunRecord.of(r) for r in records]
    originals = {}
    for r in records:
        s = r.summary
        if s.get("original_runtimes"):
            originals.setdefault(s.get("reference"), (s["original_runtimes"], r.run, s.get("original_size_mb")))

    def shown(name: str) -> bool:  # llama.cpp where a GGUF was measured; the GPU where a device was there
        figures = [(r.summary.get("runtimes") or {}).get(name) for r in records]
        if name == "llama.cpp":
            return any(f is not None for f in figures)
        return name != "gpu" or any(f and "unavailable" not in f for f in figures)

    shown_runtimes = [name for name in RUNTIME_NAMES if shown(name)]

    def cells(mine: dict, theirs: dict) -> dict:
        row = {}
        for name in shown_runtimes:
            label = RUNTIME_NAMES[name]
            a, b = mine.get(name) or {}, theirs.get(name) or {}
            if "unavailable" in a or (not a and name == "llama.cpp"):
                row[f"{label}: speed"] = a.get("unavailable", "—")
                continue
            if "error" in a or not a:
                row[f"{label}: speed"] = "failed: " + first_line(a.get("error", "not measured"))[:80]
                continue
            ratio = f" ({_ratio(a['speed'], b.get('speed'))})" if a is not b and b else ""
            limit = f"; {a['fraction_of_limit']:.0%} of the bandwidth limit" if a.get("fraction_of_limit") else ""
            row[f"{label}: speed"] = f"{a['speed']:.1f} {a['unit']}{ratio}{limit}"
            ratio = f" ({_ratio(a['peak_rss_mb'], b.get('peak_rss_mb'))})" if a is not b and b else ""
            row[f"{label}: peak RSS MB"] = f"{a['peak_rss_mb']:.0f}{ratio}"
        return row

    rows, shown = [], set()
    for r in records:
        s = r.summary
        if not s.get("runtimes"):
            continue
        base, measured_in, original_size = originals.get(s.get("reference"), ({}, None, None))
        if base and s.get("reference") not in shown:  # the original first, as the yardstick of its candidates
            shown.add(s.get("reference"))
            size = f"{original_size:.1f}" if original_size else "—"
            rows.append({"run": f"original: {s.get('reference')}", "size (MB)": size, **cells(base, base),
                         "finding": f"the yardstick (measured in {measured_in})"})
        rows.append({"run": r.run, "size (MB)": f"{s['size_mb']:.1f}" if s.get("size_mb") else "—",
                     **cells(s["runtimes"], base), "finding": speed_finding(s, base, measured_in)})
    return pd.DataFrame(rows) if rows else None


def speed_finding(summary: dict, original: dict, measured_in: str | None) -> str:
    """One sentence a meeting can repeat: what the checkpoint saves on disk and buys in each runtime,
    against the original in the same runtime."""
    mine = summary.get("runtimes") or {}
    if not original:
        return ("the original was not measured here (perf_models: candidate): the index compares with the original "
                "measured in another run of the batch, or measure both with perf_models original,candidate")
    size, original_size = summary.get("size_mb"), summary.get("original_size_mb")
    disk = f"{1 - size / original_size:.0%} less disk" if size and original_size else "disk not compared"
    parts = []
    for name, label in (("aios", "in AI-OS as it is"), ("kernels", "with weight-only kernels")):
        a, b = mine.get(name) or {}, original.get(name) or {}
        if "error" in a or not a.get("speed") or not b.get("speed"):
            parts.append(f"{label} not measured")
            continue
        speed, memory = a["speed"] / b["speed"], a["peak_rss_mb"] / b["peak_rss_mb"]
        same = abs(speed - 1) < 0.1 and abs(memory - 1) < 0.1
        figures = f"{'decode' if a['decode_tps'] else 'embedding'} {speed:.2f}x, peak memory {memory:.2f}x"
        parts.append(f"{label} nothing else ({figures})" if same else f"{label} {figures}")
    where = f", measured in {measured_in}" if measured_in and measured_in != summary.get("run") else ""
    gpu, gpu_original = mine.get("gpu") or {}, original.get("gpu") or {}
    if gpu.get("decode_tps"):
        against = f", {gpu['decode_tps'] / gpu_original['decode_tps']:.2f}x the original's" if gpu_original.get("decode_tps") else ""
        parts.append(f"on the GPU ({gpu['kernels']}) it decodes {gpu['decode_tps']:.1f} tokens/s{against} "
                     f"({gpu['fraction_of_limit']:.0%} of the device's bandwidth limit)")
    llama = mine.get("llama.cpp") or {}
    if llama.get("decode_tps"):  # the original is no GGUF file: llama.cpp's figure stands against its own limit
        parts.append(f"in llama.cpp it decodes {llama['decode_tps']:.1f} tokens/s ({llama['fraction_of_limit']:.0%} "
                     f"of its bandwidth limit)")
    return f"{disk}; " + "; ".join(parts) + f" (against the original in the same runtime{where})"


LATENCY_PANELS = {
    "prefill_ms_per_token": "prefill latency (ms per token, lower is better)",
    "embedding_sentences_per_s": "embedding throughput (sentences per second, higher is better)",
}


def latency_table(records: list[RunRecord | dict]) -> pd.DataFrame:
    """run, value, panel: one row per measured run, the panel naming the unit and what was measured."""
    records = [RunRecord.of(r) for r in records]
    rows = []
    for r in records:
        s = r.summary
        metric = s.get("latency_metric")
        value = _number(s.get("latency"))
        if metric in LATENCY_PANELS and not math.isnan(value):
            rows.append({"run": r.run, "value": value, "panel": LATENCY_PANELS[metric]})
    return pd.DataFrame(rows, columns=["run", "value", "panel"])


def sqnr_by_layer_type(records: list[RunRecord | dict]) -> pd.DataFrame:
    """Mean weight SQNR (dB) per run and layer type (q_proj, down_proj, ...), unchanged tensors left out."""
    records = [RunRecord.of(r) for r in records]
    cells = []
    for record in records:
        for t in (record.metrics.get("weight_error") or {}).get("tensors") or []:
            value = _number(t.get("sqnr_db"))  # the record spells infinity "inf": an unchanged tensor
            if math.isnan(value) or math.isinf(value):
                continue
            parts = t["name"].split(".")
            cells.append({"run": record.run, "layer type": parts[-2] if len(parts) > 1 else t["name"],
                          "sqnr_db": value})
    if not cells:
        return pd.DataFrame()
    return pd.DataFrame(cells).pivot_table(index="run", columns="layer type", values="sqnr_db", aggfunc="mean")
