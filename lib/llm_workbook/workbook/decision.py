"""The decision the planning report asks for, computed from the run records.

Phase 1 (``seed-angelslim-validation-report.md``) succeeds when one AngelSlim checkpoint is converted
into the store, ``WeightLoaderV2`` loads it, its cosine similarity to the original is above the
threshold (0.95 in the seed; each run's own ``cosine_threshold``) and inference works. Then the project
goes to Phase 2 (an isolated environment, AngelSlim installed, the full toolchain, ``--backend
angelslim`` in the CLI, documentation), which this module checks against what the project itself shows.
If Phase 1 fails, the recommendation is to keep AI-OS's PTQ INT8/INT2 (the planning report's "our PTQ": AI-OS is our users' system). Nothing here is written per model.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from llm_workbook.workbook.run_record import RunRecord
from llm_workbook.workbook.status import RunStatus

GO, NO_GO, NO_ANGELSLIM = "go", "no-go", "no AngelSlim run"


@dataclass
class Criterion:
    name: str
    met: bool
    evidence: str
    run: str | None = None  # the run whose report shows it


@dataclass
class Decision:
    outcome: str  # GO | NO_GO | NO_ANGELSLIM
    headline: str
    phase1: list[Criterion]
    phase2: list[Criterion]
    recommendations: dict[str, list[str]] = field(default_factory=dict)  # original model -> sentences
    in_words: list[str] = field(default_factory=list)  # the decision for the meeting, a sentence per point


def _number(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def format_ppl_delta(pct) -> str:
    """``+2.6 %``; an exploded perplexity as ``× 316,000`` instead of ``31633168.43 %``."""
    pct = _number(pct)
    if pct is None:
        return "—"
    if pct >= 1000:
        return f"× {1 + pct / 100:,.0f}"
    return f"{pct:+.1f} %"


def producer_of(record: RunRecord) -> str:
    return record.summary.get("producer") or record.candidate.get("producer") or ""


def is_angelslim(record: RunRecord) -> bool:
    return producer_of(record).startswith("angelslim")


def is_ours(record: RunRecord) -> bool:
    return producer_of(record).startswith("llmc ptq")


def is_aios(record: RunRecord) -> bool:
    """AI-OS's own PTQ (its ArrowQuantizer): the "keep our PTQ" option the decision weighs AngelSlim against."""
    return producer_of(record).startswith("AI-OS")


def _as_aios_reads(record: RunRecord) -> bool:
    return producer_of(record).endswith("as AI-OS reads it")


def bit_width(record: RunRecord) -> str | None:
    """The class a candidate competes in, from the bits per weight its quantized layers really take."""
    bits = _number(record.summary.get("quantized_bits_per_weight"))
    if bits is None:
        return None
    return "8-bit" if bits >= 7.5 else "4-bit" if bits >= 3.5 else "2-bit" if bits >= 1.5 else "below 2-bit"


def _label(record: RunRecord) -> str:
    """Who made it, short: ``AngelSlim int4_awq (group 64)``, ``our GPTQ int4``, ``nvfp4 (our writer)``; W8A8
    runs say so, since quantized activations make another comparison than weight-only."""
    producer = producer_of(record)
    if producer.startswith("angelslim"):
        label = "AngelSlim " + " ".join(producer.split()[2:])  # drop the version
    elif producer.startswith("AI-OS ArrowQuantizer"):
        label = "AI-OS " + producer.removeprefix("AI-OS ArrowQuantizer ")
    elif producer.startswith("llmc ptq"):
        label = "our " + producer.removeprefix("llmc ptq ").split(" g")[0].replace("gptq int4", "GPTQ int4")
    elif producer.startswith("llmc writer"):
        label = producer.removeprefix("llmc writer ") + " (our writer)"
    elif producer and not producer.startswith("external"):
        label = producer.split(" (")[0]
    else:
        label = record.run or "?"
    activations = record.summary.get("activations") or ""
    return label + (" (W8A8)" if activations.startswith(("W8A8", "activations quantized")) else "")  # today's and older records


def first_line(text: str) -> str:
    """The first line of a failure, without the builtin-build preamble that names cache paths."""
    first = (text or "failed").splitlines()[0]
    return re.sub(r"^(run failed: )?BuiltinError: building builtin:\S+ from \S+ failed: ", "", first)[:300]


def _method(record: RunRecord) -> str:
    """The algorithm family, to pair AngelSlim's GPTQ with ours: gptq, awq or rtn."""
    producer = producer_of(record).lower()
    return "gptq" if "gptq" in producer else "awq" if "awq" in producer else "rtn"


def _inference_works(record: RunRecord) -> tuple[bool, str]:
    ppl = _number((record.metrics.get("ppl") or {}).get("candidate"))
    generation = record.metrics.get("generation") or {}
    cosine = _number(record.summary.get("cosine"))
    if ppl is not None:
        agree = generation.get("agreement")
        extra = f", greedy generation agrees on {agree:.0%} of tokens" if isinstance(agree, (int, float)) else ""
        return True, f"perplexity {ppl:.2f}{extra}"
    if cosine is not None:  # encoders: embeddings computed
        return True, f"embeddings computed (cosine {cosine:.4f})"
    return False, "no output measured"


def _phase1_for(record: RunRecord) -> list[Criterion]:
    run = record.run
    store = record.store
    status = record.status
    converted = status != RunStatus.ERROR and bool(store) and store.get("export_bit_exact") is not False
    detail = store.get("round_trip") or ("converted" if converted else (record.error or "not converted"))
    loads = converted and store.get("checksums_verify") is True
    threshold = _number(record.parameters.get("cosine_threshold")) or 0.95
    cosine = _number(record.summary.get("cosine"))
    interval = (record.metrics.get("intervals") or {}).get("cosine")
    if cosine is not None and interval:  # met only when the whole 95 % interval is above the threshold
        cosine_met = (_number(interval.get("low")) or -math.inf) > threshold
        cosine_text = f"{run}: cosine {cosine:.4f} [{interval['low']:.4f}, {interval['high']:.4f}]"
    else:
        cosine_met = cosine is not None and cosine > threshold
        cosine_text = f"{run}: cosine {cosine:.4f}" if cosine is not None else f"{run}: not measured"
    validator = _number(((record.metrics.get("aios_validator_cosine")) or {}).get("mean"))
    if validator is not None and cosine is not None:  # the planning report's "cosine > 0.95" is AI-OS's figure
        cosine_text += (f" (mean per-token hidden-state cosine, which this criterion uses; AI-OS's PrecisionValidator "
                        f"figure, normalised last-position logits: {validator:.4f})")
    works, evidence = _inference_works(record) if loads else (False, "not loaded")
    return [
        Criterion("an AngelSlim model is converted into the store", converted, f"{run}: {detail}", run),
        Criterion("WeightLoaderV2 loads it", loads,
                  f"{run}: every tensor read back, checksums verify" if loads else f"{run}: not loaded", run),
        Criterion(f"cosine similarity above {threshold:g}", cosine_met, cosine_text, run),
        Criterion("inference works", works, f"{run}: in transformers: {evidence}; in AI-OS's engine: "
                  f"{record.summary.get('aios_engine') or 'not checked'}", run),
    ]


def phase1(records: list[RunRecord | dict]) -> tuple[str, list[Criterion]]:
    """The outcome and, per criterion, the evidence of the best AngelSlim run (the first that meets all)."""
    records = [RunRecord.of(r) for r in records]
    angelslim = [r for r in records if is_angelslim(r)]
    if not angelslim:
        return NO_ANGELSLIM, [Criterion(name, False, "no AngelSlim run in this batch") for name in (
            "an AngelSlim model is converted into the store", "WeightLoaderV2 loads it",
            "cosine similarity above 0.95", "inference works")]
    scored = [(_phase1_for(r), r) for r in angelslim]
    scored.sort(key=lambda item: (-sum(c.met for c in item[0]),
                                  -(_number(item[1].summary.get("cosine")) or -1)))
    criteria, _ = scored[0]
    return (GO if all(c.met for c in criteria) else NO_GO), criteria


def phase2(records: list[RunRecord | dict], environment: dict) -> list[Criterion]:
    """What the project shows for each Phase 2 item. ``environment``: ``angelslim_env`` (None when built,
    else why not), ``angelslim_version``, ``cli_backend`` (bool), ``readme`` (its text)."""
    records = [RunRecord.of(r) for r in records]
    runs = [r for r in records if is_angelslim(r)]
    works = sorted({_label(r) for r in runs if not r.is_error})
    fails = [(_label(r), first_line(r.error or "")) for r in runs if r.is_error]
    env_problem = environment.get("angelslim_env")
    version = environment.get("angelslim_version")
    toolchain = f"runs here: {', '.join(works) or 'none'}" + "".join(f"; fails: {name} ({why})" for name, why in fails)
    return [
        Criterion("an isolated virtual environment", env_problem is None,
                  ".venv-angelslim, built by `make angelslim-env` (tools/angelslim/build_env.sh)" if env_problem is None
                  else env_problem),
        Criterion("AngelSlim installed", version is not None,
                  f"angelslim {version} imports in .venv-angelslim" if version else "not installed"),
        Criterion("the full quantization toolchain", bool(works) and not fails, toolchain),
        Criterion("--backend angelslim in the CLI", bool(environment.get("cli_backend")),
                  "`llmc quantize SRC OUT --backend angelslim --method M`" if environment.get("cli_backend") else "missing"),
        Criterion("documentation", bool(environment.get("guide")),
                  f"{GUIDE} (how the environment is built and patched, what runs on CPU)" if environment.get("guide")
                  else f"missing: {GUIDE}"),
        _engine_criterion(runs),
    ]


def _outcome(record: RunRecord) -> str:
    """pass / fail / inconclusive / error (records written before verdicts had intervals: pass or fail)."""
    if record.is_error:
        return "error"
    verdict = record.verdict
    return verdict.get("outcome") or ("pass" if verdict.get("passed") else "fail")


def _self_source(record: RunRecord) -> bool:
    return bool(record.summary.get("self_source"))


def _ppl(record: RunRecord) -> float | None:
    return _number(record.summary.get("ppl_delta_pct"))


def _quality(record: RunRecord) -> str:
    s = record.summary
    if _ppl(record) is not None:
        low, high = (s.get("ppl_interval") or [None, None])[:2]
        exploded = abs(_ppl(record)) >= 1000  # "× 316,000" needs no interval in points
        around = f" [{low:+.1f}, {high:+.1f}]" if _number(low) is not None and _number(high) is not None and not exploded else ""
        return f"{format_ppl_delta(_ppl(record))}{around} PPL"
    cosine = _number(s.get("cosine"))
    return f"cosine {cosine:.4f}" if cosine is not None else "no figures"


def _rank(record: RunRecord) -> tuple:
    ppl = _ppl(record)
    cosine = _number(record.summary.get("cosine")) or 0.0
    return (ppl if ppl is not None else math.inf, -cosine)


def _blocks(record: RunRecord) -> dict | None:
    blocks = record.metrics.get("blocks")
    if not blocks or "nll_candidate" not in blocks:
        return None
    import numpy as np

    return {k: np.asarray(v, dtype=float) for k, v in blocks.items() if k != "block_tokens"}


OUTCOME_COLORS = {"pass": "#2e7d32", "inconclusive": "#e0a100", "fail": "#c62828", "round trip": "#9e9e9e",
                  "error": "#c62828"}


def compare_candidates(a: RunRecord, b: RunRecord) -> str:
    """Which of two candidates of one original has the smaller perplexity change, decided by the 95 % interval
    of their paired difference (same tokens, same blocks); "not distinguishable" when it contains 0."""
    from llm_workbook.evaluation.uncertainty import paired_difference

    first, second = _blocks(a), _blocks(b)
    head = f"{_label(a)} {_quality(a)} vs {_label(b)} {_quality(b)}"
    if first is not None and second is not None:  # scored on the same text from its start: compare the common part
        n = min(len(first["count"]), len(second["count"]))
        while n and first["count"][n - 1] != second["count"][n - 1]:
            n -= 1
        first, second = ({k: v[:n] for k, v in x.items()} for x in (first, second))
    if first is None or second is None or not len(first["count"]):
        better = "AngelSlim" if _rank(a) < _rank(b) else ("AI-OS's PTQ" if is_aios(b) else "our PTQ")  # no blocks: estimates
        return f"{head}: {better} is better."
    diff = paired_difference(first, second, "ppl_change_percent")
    tokens = int(first["count"].sum())
    around = f"difference {diff.estimate:+.2f} points [{diff.low:+.2f}, {diff.high:+.2f}]"
    if diff.low <= 0 <= diff.high:
        return f"{head}: not distinguishable at {tokens:,} tokens ({around})."
    better = _label(a) if diff.high < 0 else _label(b)
    return f"{head}: {better} is better ({around} at {tokens:,} tokens)."


def _widths(runs: list[RunRecord]) -> list[str]:
    """The bit widths the runs take, widest first."""
    return sorted({w for r in runs if (w := bit_width(r))}, key=lambda w: -float(w.split("-")[0]) if w[0].isdigit() else 0)


def _model_of(record: RunRecord) -> str:
    s = record.summary
    return (s.get("original_model") or record.original.get("model") or s.get("reference")
            or record.reference or "?")


def recommendations(records: list[RunRecord | dict]) -> dict[str, list[str]]:
    """Per original model: the best passing candidate per bit width, what is undecided at the tokens scored,
    AngelSlim against our PTQ at the same width (by the interval of their paired difference), and what fails
    and why. A candidate that is the original's own source is a store round-trip check, never recommended."""
    records = [RunRecord.of(r) for r in records]
    by_model: dict[str, list[RunRecord]] = {}
    for r in records:
        by_model.setdefault(_model_of(r), []).append(r)
    out: dict[str, list[str]] = {}
    for model, all_runs in by_model.items():
        lines = []
        for r in all_runs:
            if _self_source(r):
                lines.append(f"Round trip, not a candidate: {_label(r)} is the file the original was made from "
                             f"({_quality(r)}; run {r.run}).")
        runs = [r for r in all_runs if not _self_source(r)]
        widths = _widths(runs)
        for width in widths:
            at = [r for r in runs if bit_width(r) == width]
            passing = sorted((r for r in at if r.passed), key=_rank)
            undecided = sorted((r for r in at if _outcome(r) == "inconclusive"), key=_rank)
            if passing:
                best = passing[0]
                lines.append(f"{width}: best passing is {_label(best)} ({_quality(best)}, run {best.run}).")
            elif undecided:
                lines.append(f"{width}: no candidate passes yet; undecided: "
                             + "; ".join(f"{_label(r)} ({_quality(r)})" for r in undecided) + ".")
            else:
                lines.append(f"{width}: no candidate passes.")
            theirs = sorted((r for r in at if is_angelslim(r) and not r.is_error and _quality(r) != "no figures"),
                            key=_rank)
            ours = sorted((r for r in at if is_ours(r) and _quality(r) != "no figures"), key=_rank)
            kept = [r for r in at if is_aios(r) and not _as_aios_reads(r) and _quality(r) != "no figures"]
            for a in theirs:  # each AngelSlim method against AI-OS's PTQ and our best at its width
                for b in sorted(kept, key=_rank)[:1]:
                    lines.append(f"{width}: {compare_candidates(a, b)}")
                same = [b for b in ours if _method(b) == _method(a)]
                b = (same or ours or [None])[0]
                if b is not None:
                    lines.append(f"{width}: {compare_candidates(a, b)}")
        for r in runs:
            if bit_width(r) is None and not r.is_error:
                lines.append(f"Not ranked by bit width: {_label(r)} has no quantized layer ({_quality(r)}, run {r.run}).")
        for r in runs:  # task accuracy where it was measured (lm-eval)
            for name, t in (r.metrics.get("tasks") or {}).items():
                rec, flips = t["recovery"], t["flips"]
                lines.append(f"Task {name} ({t['label']}, {t['items']} items): {_label(r)} keeps "
                             f"{rec['estimate']:.0%} of the original's accuracy [{rec['low']:.0%}, {rec['high']:.0%}]; "
                             f"{flips['estimate']:.0%} of answers flip [{flips['low']:.0%}, {flips['high']:.0%}].")
        for r in runs:
            if _outcome(r) == "inconclusive":
                why = (r.verdict.get("reasons") or ["undecided"])[0]
                lines.append(f"Undecided: {_label(r)} (run {r.run}): {first_line(why)}")
            elif not r.passed:
                why = (r.verdict.get("reasons") or [r.error or "failed"])[0]
                lines.append(f"Fails: {_label(r)} (run {r.run}): {first_line(why)}")
        out[model] = lines
    return out


def _engine_criterion(runs: list[RunRecord]) -> Criterion:
    """Can AI-OS's engine, as it stands, run the AngelSlim checkpoints that pass? If not, what it must add."""
    passing = [r for r in runs if r.passed] or [r for r in runs if not r.is_error]
    needs: dict[str, list[str]] = {}
    for r in passing:
        verdict = r.aios_engine
        for reason in verdict.get("reasons") or []:
            needs.setdefault(reason.split(":")[0], []).append(_label(r))
    runs_ok = [r for r in passing if r.aios_engine.get("runs")]
    if not passing:
        return Criterion("AI-OS's engine runs the checkpoint", False, "no AngelSlim run to check")
    if runs_ok:
        return Criterion("AI-OS's engine runs the checkpoint", True, "runs as it stands: " + ", ".join(_label(r) for r in runs_ok))
    evidence = "AI-OS would have to add: " + "; ".join(f"{need} ({', '.join(sorted(set(who))[:3])})" for need, who in needs.items())
    return Criterion("AI-OS's engine runs the checkpoint", False, evidence)


LABEL_OF_OUTCOME = {"pass": "PASS", "fail": "FAIL", "inconclusive": "UNDECIDED"}


def in_words(records: list[RunRecord | dict], phase2_criteria: list[Criterion]) -> list[str]:
    """What passes, what AI-OS's own PTQ really delivers (as AI-OS reads its files), what AI-OS's engine runs
    today, and what adopting AngelSlim would ask of AI-OS: the decision as a meeting acts on it."""
    records = [RunRecord.of(r) for r in records]
    runs = [r for r in records if not _self_source(r) and not r.is_error]
    lines = []
    for model in sorted({_model_of(r) for r in runs}):
        at = sorted((r for r in runs if _model_of(r) == model), key=_rank)
        widths = _widths(at)
        lines.append(f"What passes for {model}: " + ("; ".join(
            f"{w}: {', '.join(_label(r) for r in at if bit_width(r) == w and r.passed) or 'nothing'}" for w in widths)
            or "no candidate has quantized layers") + ".")
    kept = [r for r in runs if is_aios(r)]
    if kept:
        lines.append("AI-OS's own PTQ, the option to keep: " + "; ".join(
            f"{_label(r)} {_quality(r)}, {LABEL_OF_OUTCOME.get(_outcome(r), 'FAIL')}" for r in sorted(kept, key=_rank)) + ".")
    engine = next((c for c in phase2_criteria if c.name == "AI-OS's engine runs the checkpoint"), None)
    if engine is not None:
        lines.append("AI-OS's engine runs the AngelSlim checkpoints as it stands." if engine.met else
                     "AI-OS's engine cannot run the AngelSlim checkpoints as it stands. " + engine.evidence + ".")
    missing = [c for c in phase2_criteria if not c.met and c is not engine]
    if missing:
        lines.append("Adopting AngelSlim also needs: " + "; ".join(c.name for c in missing) + " (Phase 2 below).")
    return lines


def decide(records: list[RunRecord | dict], environment: dict) -> Decision:
    records = [RunRecord.of(r) for r in records]
    outcome, criteria = phase1(records)
    if outcome == GO:
        headline = "Phase 1 passed: go to Phase 2 (integrate AngelSlim through its isolated environment)."
    elif outcome == NO_GO:
        missing = ", ".join(c.name for c in criteria if not c.met)
        headline = f"Phase 1 failed ({missing}): keep AI-OS's PTQ INT8/INT2."
    else:
        headline = "No AngelSlim run in this batch: Phase 1 cannot be decided; add an AngelSlim candidate."
    second = phase2(records, environment)
    return Decision(outcome, headline, criteria, second, recommendations(records), in_words(records, second))


GUIDE = "tools/angelslim/README.md"  # the AngelSlim backend's guide, beside its build script


def project_environment(repo: Path) -> dict:
    """What the project shows for Phase 2, read off this checkout (no AngelSlim import in this process)."""
    import subprocess

    from llm_workbook.quantize.angelslim import ANGELSLIM_PYTHON, angelslim_missing

    problem = angelslim_missing()
    version = None
    if problem is None:
        probe = subprocess.run([str(ANGELSLIM_PYTHON), "-c", "import importlib.metadata as m; print(m.version('angelslim'))"],
                               capture_output=True, text=True, timeout=120)
        version = probe.stdout.strip() or None
    from llm_workbook.quantize.options import BACKENDS  # the backends `llmc quantize --backend` offers

    return {"angelslim_env": problem, "angelslim_version": version, "cli_backend": "angelslim" in BACKENDS,
            "guide": (repo / GUIDE).is_file()}


MARKERS = {"AngelSlim": "^", "our PTQ": "o", "our writer": "s", "other": "D"}


def _family(record: RunRecord) -> str:
    producer = producer_of(record)
    if producer.startswith("angelslim"):
        return "AngelSlim"
    if producer.startswith("llmc ptq"):
        return "our PTQ"
    if producer.startswith("llmc writer"):
        return "our writer"
    return "other"


def size_quality_figure(records: list[RunRecord | dict]):
    """Bits per weight of the quantized layers against PPL change (cosine loss for encoders), one panel per
    original model, AngelSlim and our runs told apart by marker, a symmetric log scale where a run explodes,
    labels kept apart by adjustText. Returns a matplotlib Figure, or None when no run has figures."""
    records = [RunRecord.of(r) for r in records]
    import matplotlib.pyplot as plt
    from adjustText import adjust_text

    by_model: dict[str, list[RunRecord]] = {}
    for r in records:
        s = r.summary
        if _number(s.get("quantized_bits_per_weight")) is None:
            continue
        model = s.get("original_model") or s.get("reference") or "?"
        by_model.setdefault(model, []).append(r)
    if not by_model:
        return None
    fig, axes = plt.subplots(1, len(by_model), figsize=(7.5 * len(by_model), 5.2), squeeze=False)
    for ax, (model, runs) in zip(axes[0], sorted(by_model.items())):
        causal = any(_ppl(r) is not None for r in runs)
        texts = []
        for r in runs:
            s = r.summary
            x = _number(s["quantized_bits_per_weight"])
            y = _ppl(r) if causal else (1 - (_number(s.get("cosine")) or 0)) * 100
            if y is None:
                continue
            family = _family(r)
            color = OUTCOME_COLORS["round trip" if _self_source(r) else _outcome(r)]
            low, high = ((s.get("ppl_interval") or [None, None])[:2]) if causal else (None, None)
            if _number(low) is not None and _number(high) is not None:  # the 95 % interval as an error bar
                ax.errorbar([x], [y], yerr=[[y - low], [high - y]], fmt="none", ecolor=color, elinewidth=1.2,
                            capsize=3, zorder=2)
            ax.scatter([x], [y], marker=MARKERS[family], s=70, color=color, edgecolor="black", linewidth=0.6, zorder=3)
            texts.append(ax.text(x, y, _label(r), fontsize=8))
        values = [abs(t.get_position()[1]) for t in texts] or [1]
        if max(values) > 100:  # a run exploded: linear near zero, logarithmic beyond 10 %
            ax.set_yscale("symlog", linthresh=10)
        ax.axhline(0, color="#888", linewidth=0.8)
        ax.set(title=model, xlabel="bits per weight of the quantized layers",
               ylabel="perplexity change (%)" if causal else "cosine loss (1 - cosine, %)")
        ax.grid(True, which="both", alpha=0.3)
        adjust_text(texts, ax=ax, arrowprops=dict(arrowstyle="-", color="#999", lw=0.5))
    handles = [plt.Line2D([], [], marker=m, linestyle="", color="#777", markeredgecolor="black", label=f)
               for f, m in MARKERS.items()]
    handles += [plt.Line2D([], [], marker="o", linestyle="", color=c, label=l)
                for l, c in OUTCOME_COLORS.items() if l != "error"]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig
