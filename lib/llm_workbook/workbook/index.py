"""The index page (reports/index.html): the decision first, the table of every run, the speed panel and links
to each run's reports, computed from the records in the reports directory."""

from __future__ import annotations

import html
from pathlib import Path

from llm_workbook.paths import REPO_ROOT, __version__
from llm_workbook.store import atomic
from llm_workbook.workbook.run_record import RunRecord


def load_records(reports: Path, runs: list[str] | None = None) -> list[RunRecord]:
    """The run records in ``reports`` (files that are not one are passed over), of ``runs`` when given."""
    records = [RunRecord.read(path) for path in sorted(Path(reports).glob("*.json"))]
    return [r for r in records if r is not None and (runs is None or r.run in runs)]


def _figure_png(fig) -> str:
    import base64
    import io

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _criteria_html(criteria, reports: Path) -> str:
    rows = []
    for c in criteria:
        evidence = html.escape(c.evidence)
        if c.run and (reports / f"{c.run}.meeting.html").exists():
            evidence = f'<a href="{html.escape(c.run)}.meeting.html">{evidence}</a>'
        mark = '<span class="ok">yes</span>' if c.met else '<span class="no">NO</span>'
        rows.append(f"<tr><td>{html.escape(c.name)}</td><td>{mark}</td><td>{evidence}</td></tr>")
    return "<table><tr><th>criterion</th><th>met</th><th>evidence</th></tr>" + "".join(rows) + "</table>"


def decision_html(records: list[RunRecord], reports: Path) -> str:
    """The index's opening: the Phase 1 verdict with its evidence, the Phase 2 checklist, a recommendation
    per original model and the size/quality picture, all computed from the records (``phases``)."""
    from llm_workbook.workbook import decision

    decided = decision.decide(records, decision.project_environment(REPO_ROOT))
    css = {"go": "go", "no-go": "nogo"}.get(decided.outcome, "none")
    parts = [f'<div class="headline {css}">{html.escape(decided.headline)}</div>',
             "<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in decided.in_words) + "</ul>",
             "<h3>Phase 1: validate AngelSlim's checkpoints</h3>", _criteria_html(decided.phase1, reports),
             "<h3>Phase 2: integrate AngelSlim (what this project shows)</h3>", _criteria_html(decided.phase2, reports),
             "<h3>Recommendation per original model</h3>"]
    for model, lines in decided.recommendations.items():
        parts.append(f"<h4>{html.escape(model)}</h4><ul>" + "".join(f"<li>{html.escape(l)}</li>" for l in lines) + "</ul>")
    fig = decision.size_quality_figure(records)
    if fig is not None:
        parts.append("<h3>Size against quality</h3><p>Bits per weight of the quantized layers against the "
                     "perplexity change (cosine loss for the encoder); green passes, red fails.</p>"
                     f'<img alt="size against quality" style="max-width:100%" src="data:image/png;base64,{_figure_png(fig)}">')
    return '<section id="decision"><h2>Decision</h2>' + "".join(parts) + "</section>"


def _speed_html(records: list[dict], perf) -> str:
    """The index's speed and memory section: the serving runtimes side by side, then (collapsed) prefill
    latency and memory with the codes kept packed."""
    from llm_workbook.workbook.tables import speed_panel

    panel = speed_panel(records)
    bandwidth = next((r.summary["bandwidth_gb_per_s"] for r in records
                      if r.summary.get("bandwidth_gb_per_s")), None)
    parts = []
    if panel is not None:
        parts.append(
            "<h2>Speed and memory where it would run</h2><p>Every candidate in each runtime that applies, each figure "
            "in a process of its own (median of a decode's cached steps, or of repeats): <b>AI-OS as it is</b> "
            "dequantizes every weight to float32 at load, so a quantized file saves disk and download, not memory or "
            "time; <b>weight-only kernels</b> keep int8/int4 codes packed and run them with PyTorch's CPU kernels "
            "(bfloat16), where the format maps onto one, and dense where it does not (the run's report says why). "
            "Speed is decode tokens/s at batch 1 (sentences/s for an encoder), with the ratio to the original in the "
            "same runtime and, for decoding, the share of the limit this machine's memory bandwidth sets ("
            + (f"{bandwidth:.1f} GB/s copy" if bandwidth else "measured in the same run")
            + " / weight bytes read per token).</p>" + panel.to_html(index=False, na_rep="—", escape=True, justify="left"))
    if perf is not None:
        parts.append("<details><summary>Prefill latency and memory with the codes kept packed</summary>"
                     + perf.to_html() + "</details>")
    return "".join(parts)


def write_index(reports: Path, outcomes: list) -> Path:
    """reports/index.html: the decision, the decision table and links to every run's reports (``outcomes``:
    this batch's ``run.RunOutcome``s; runs of earlier batches are listed from their records)."""
    from llm_workbook.workbook.tables import decision_table, perf_table, style_decision_table

    records = load_records(reports)  # every run in the directory, not only this batch's
    table = decision_table(records)
    this_batch = {o.run: o for o in outcomes}
    listed = [(o.run, o.status, o.message) for o in outcomes] + [
        (r.run, r.status or "?", "from an earlier batch") for r in records if r.run not in this_batch]
    table_html = style_decision_table(table, compact=True).to_html() if len(table) else "<p>No runs.</p>"
    speed_html = _speed_html(records, perf_table(table) if len(table) else None)
    items = []
    for run, status, message in listed:
        links = []
        for suffix, label in ((".html", "full report"), (".meeting.html", "meeting version"), (".json", "record")):
            target = reports / f"{run}{suffix}"
            if target.exists():
                links.append(f'<a href="{html.escape(target.name)}">{label}</a>')
        message = message.splitlines()[0][:300] if message else ""
        items.append(f"<li><b>{html.escape(run)}</b> — {html.escape(status)}"
                     f"{' (' + html.escape(message) + ')' if message else ''}: {' · '.join(links)}</li>")
    stand_ins = [r.run for r in records if r.summary.get("stand_in")]
    banner = (f'<div class="headline none">{len(stand_ins)} of {len(records)} runs compare stand-ins (random weights '
              "in the releases' layouts, built by <code>make seed-models</code>): their sizes, layouts, round trips, "
              "time and memory are the releases'; their quality figures, and the decision below, say nothing about "
              "the releases.</div>") if stand_ins else ""
    compare = '<p><a href="compare_models.html">Comparison notebook (plots)</a></p>' if (reports / "compare_models.html").exists() else ""
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Quantized checkpoint evaluation</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1250px}} table{{border-collapse:collapse;margin-bottom:1em}}
td,th{{padding:4px 8px;border:1px solid #ccc;vertical-align:top;overflow-wrap:break-word}} .scroll{{max-width:100%;overflow-x:auto}} .headline{{font-size:1.3em;font-weight:bold;padding:.6em;
border-radius:4px}} .go{{background:#e6f4ea}} .nogo{{background:#fde2e1}} .none{{background:#fff4d6}}
.ok{{color:#2e7d32;font-weight:bold}} .no{{color:#c62828;font-weight:bold}}
@media print{{body{{margin:0;max-width:none;font-size:10px}} table{{font-size:9px}} img{{max-width:100%}}
#decision-table td,#decision-table th{{padding:2px 3px}} h2,h3{{break-after:avoid}} tr{{break-inside:avoid}}}}</style></head>
<body><h1>Is this quantized checkpoint fit for our Parquet weight store?</h1>
{banner}
{decision_html(records, reports) if records else ""}
<h2>All runs</h2>
<p>One row per model/format, sorted by verdict then PPL change. Failures are highlighted. Runs whose activations
are quantized (W8A8) are a different comparison from weight-only runs: the activations column says which.</p>
<div id="decision-table" class="scroll">{table_html}</div>
<div class="scroll">{speed_html}</div>
{compare}
<h2>Reports</h2><ul>{''.join(items)}</ul>
<p><small>llm_workbook {__version__}</small></p>
</body></html>"""
    index = reports / "index.html"
    atomic.write_text(index, page)
    return index
