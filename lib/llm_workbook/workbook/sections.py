"""The evaluation notebook's sections: each function does one section's work and returns what it shows (Markdown,
tables, figures), so the notebook's cells only call and display. The rules behind them are in ``report``."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from llm_workbook.paths import reports_root
from llm_workbook.store.source import Source
from llm_workbook.workbook import report

VERDICT_HEADINGS = {"pass": "PASS", "fail": "FAIL", "inconclusive": "UNDECIDED"}


def _markdown(text: str):
    from IPython.display import Markdown

    return Markdown(text)


def _style() -> None:
    """How the report's tables and figures look, and what it keeps quiet (progress bars, library chatter)."""
    import seaborn as sns
    import torch
    import transformers

    warnings.filterwarnings("ignore", message="IProgress not found")  # where ipywidgets is absent, tqdm prints text
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    sns.set_theme(style="whitegrid", context="notebook")
    pd.set_option("display.max_rows", 40)
    pd.set_option("display.float_format", lambda v: f"{v:.6g}")
    torch.manual_seed(0)


@dataclass
class Run:
    """One run of the notebook: its parameters (``DEFAULTS``' names), where it writes, and its two sources."""

    params: dict
    out_dir: Path
    artifacts: Path
    candidate: Source
    original: Source
    check: report.StoreCheck | None = None  # the candidate as stored (section 1)
    data: dict | None = None  # the evaluation record (section 2); None when the evaluation refused the pair
    stand_ins: tuple[str, ...] = ()  # the sources that are stand-ins (random weights), not the checkpoints named

    @classmethod
    def start(cls, namespace: dict) -> Run:
        """The run the notebook's parameters (its globals, after papermill's injection) describe: checked, with
        its output directories made and both sources resolved (builtins built on first use)."""
        from llm_workbook.workbook import builtins
        from llm_workbook.workbook.parameters import DEFAULTS, check_source, check_task

        params = {key: namespace.get(key, DEFAULTS[key]) for key in DEFAULTS}
        params["inputs_digest"] = namespace.get("inputs_digest")
        if params["device"] != "cpu":
            raise ValueError(f"device={params['device']!r}: this workbook runs on the CPU only")
        _style()
        params["producer"] = params["producer"] or builtins.producer(params["model"])
        out_dir = Path(params["output_dir"]) if params["output_dir"] else reports_root()
        artifacts = out_dir / "artifacts" / params["run"]
        artifacts.mkdir(parents=True, exist_ok=True)
        check_source("model", params["model"])
        check_source("reference", params["reference"])
        candidate, original = Source.of(params["model"]), Source.of(params["reference"])
        check_task(params["task"], original)
        return cls(params, out_dir, artifacts, candidate, original, stand_ins=report.stand_ins(candidate, original))

    def heading(self):
        from llm_workbook.workbook import builtins

        p = self.params
        return _markdown(
            f"## {p['title']}\n\n"
            f"- **Candidate:** `{p['model']}` — {builtins.describe(p['model'])} (produced by: {p['producer']})\n"
            f"- **Original:** `{p['reference']}` — {builtins.describe(p['reference'])}\n"
            f"- **Format:** {p['format_notes'] or 'see the table below'}\n"
            + (f"- **Stand-in, not the release:** {report.stand_in_sentence(self.stand_ins)}\n" if self.stand_ins else ""))

    # -- 1. the store --

    def store_candidate(self) -> list:
        """Convert, verify and round-trip the candidate; its facts and its storage formats."""
        from llm_workbook.store import inventory
        from llm_workbook.store.loader import WeightLoaderV2

        self.check = check = report.store_candidate(self.candidate, self.artifacts, reference=self.original,
                                                    progress=self.params["progress"])
        entries = pd.DataFrame(inventory.as_dicts(inventory.entries(WeightLoaderV2(check.parquet))))
        by_format = (entries.groupby("format")
                     .agg(tensors=("name", "count"), parameters=("numel", "sum"), bytes=("bytes", "sum"))
                     .assign(bits_per_weight=lambda t: 8 * t["bytes"] / t["parameters"]))
        shown = [pd.DataFrame({"value": report.store_facts(check)}), by_format]
        if check.aios is not None and check.aios.differs:  # an AI-OS file that AI-OS's own loader reads otherwise
            shown.append(_markdown(
                f"AI-OS's own loader reads **{len(check.aios.reads_wrong)} tensors wrong** and raises on "
                f"**{len(check.aios.raises)}** of this file: section 2 evaluates it as written and as AI-OS reads it."))
        return shown

    # -- 2. the comparison --

    def compare(self) -> list:
        """Evaluate the stored candidate against the original. A pair the evaluation refuses (NaN logits, another
        vocabulary...) fails with the reason in its record, and the batch goes on."""
        from llm_workbook.evaluation.compare import evaluate
        from llm_workbook.evaluation.record import EvaluationFault
        from llm_workbook.workbook.parameters import evaluation_settings

        settings = evaluation_settings(self.params)  # the parameters under evaluate()'s names
        try:
            record = evaluate(self.original, self.check.parquet, **settings)
        except EvaluationFault as fault:
            report.fault_record(self.params, str(fault), self.check).write(self.out_dir)
            return [_markdown(f"# FAIL: {self.params['title']}\n\nThe evaluation refused this candidate: {fault}")]
        self.data = data = report.evaluated(record, self.params)
        data["as_aios_reads"] = report.as_aios_reads(self.check, self.original, settings)
        shown = [pd.DataFrame(report.quality_rows(data)).set_index("check")]
        if data["as_aios_reads"]:
            shown += [_markdown("**As written and as AI-OS reads it** (the same text and checks; AI-OS computes with "
                                "the second):"), pd.DataFrame(report.as_written_and_as_read(data)).set_index("read")]
        tasks = report.task_rows(data)  # lm-eval accuracy, recovery and flips
        if tasks:
            shown += [_markdown("Task accuracy (lm-evaluation-harness, 95 % intervals):"),
                      pd.DataFrame(tasks).set_index("task")]
        divergence = report.divergence_rows(data)  # llama.cpp's --kl-divergence figures
        if divergence:
            shown += [_markdown("llama.cpp's divergence statistics (± standard errors over tokens):"),
                      pd.DataFrame(divergence).set_index("statistic")]
        schemes = data["candidate"].get("activation_schemes") or {}
        notes = data["candidate"].get("activation_notes") or []
        shown.append(_markdown("Activation quantization simulated: "
                               + (", ".join(f"**{k}**: {v}" for k, v in schemes.items()) or "**none**")
                               + "".join(f"\n- {n}" for n in notes)))
        return shown

    def layers(self) -> list:
        """The 20 quantized weights that lose most, by SQNR against the original's."""
        import matplotlib.pyplot as plt
        import seaborn as sns

        tensors = pd.DataFrame((self.data["metrics"].get("weight_error") or {}).get("tensors") or [])
        if len(tensors):  # the record spells non-finite numbers "inf"; unchanged tensors (SQNR inf) are not plotted
            tensors["sqnr_db"] = pd.to_numeric(tensors["sqnr_db"], errors="coerce").replace(math.inf, float("nan"))
        if not len(tensors) or not tensors["sqnr_db"].notna().any():
            return [_markdown("No quantized weight differs from the original (or none could be matched by name and shape).")]
        shown = tensors.dropna(subset=["sqnr_db"]).sort_values("sqnr_db").head(20)
        fig, ax = plt.subplots(figsize=(9, max(2.5, 0.3 * len(shown))))
        sns.barplot(data=shown, y="name", x="sqnr_db", ax=ax, color="#4C72B0")
        ax.set(title="Weight SQNR per layer (20 worst)", xlabel="SQNR (dB, higher is better)", ylabel="")
        fig.tight_layout()
        plt.close(fig)
        return [fig]

    def speed(self) -> list:
        """Size, load time, speed and memory of both models, and the runtimes that would serve the candidate."""
        import matplotlib.pyplot as plt

        data, shown = self.data, []
        perf = data.get("perf") or {}
        if not perf:
            shown.append(_markdown("Speed and memory were **not measured** in this run (`measure_perf: false` in its "
                                   "parameters file); only sizes are shown."))
        elif not {"original", "candidate"} <= set(perf):
            shown.append(_markdown(f"Speed and memory measured for the {' and '.join(sorted(perf))} model only "
                                   "(`perf_models`)."))
        table = pd.DataFrame(report.perf_rows(data)).set_index("model").dropna(axis=1, how="all")
        shown.append(table)
        if len(table.columns):  # horizontal bars: the models' names read along the y axis at any width
            columns = list(table.columns)
            fig, axes = plt.subplots(1, len(columns), figsize=(3.6 * len(columns), 0.5 * len(table) + 1.6),
                                     sharey=True, squeeze=False)
            for ax, column in zip(axes[0], columns):
                table[column].plot.barh(ax=ax, color=["#8c8c8c", "#4C72B0", "#55A868"][: len(table)])
                unit = column.split("(")[-1].rstrip(")") if "(" in column else ""
                ax.set(title=column.split(" (")[0], xlabel=unit, ylabel="")
                ax.invert_yaxis()  # the original on top, as in the table
            fig.suptitle("Original vs candidate")
            fig.tight_layout()
            plt.close(fig)
            shown.append(fig)
        runtimes = pd.DataFrame(report.runtime_rows(data))
        if len(runtimes):  # the same runs in the runtimes that would serve the checkpoint
            shown += [_markdown("**Where it would run:** " + report.speed_finding(data, self.params) + "."),
                      runtimes.set_index(["model", "runtime"])]
        return shown

    # -- the verdict --

    def verdict(self) -> list:
        """The run's record, written, and its verdict with the figures it rests on."""
        record = report.run_record(self.params, self.data, self.check)
        if self.stand_ins:
            record.summary["stand_in"] = list(self.stand_ins)
        record.write(self.out_dir)
        verdict = record.verdict
        heading = VERDICT_HEADINGS.get(verdict.get("outcome"), "FAIL")
        why = "All checks passed." if verdict["passed"] else "Why:\n\n" + "\n".join(f"- {r}" for r in verdict["reasons"])
        if self.stand_ins:
            why += f"\n\n**Stand-in:** {report.stand_in_sentence(self.stand_ins)}"
        return [_markdown(f"# {heading}: {self.params['title']}\n\n{why}"),
                pd.DataFrame({"value": report.summary_rows(record)})]

    def every_figure(self) -> list:
        """Every scalar of the evaluation's metrics, collapsed under one summary line."""
        from IPython.display import HTML

        metrics = self.data["metrics"]
        detail = {k: v for k, v in metrics.items()
                  if k not in ("weight_error", "blocks") and not isinstance(v, (dict, list))}
        for block in ("hidden_cosine", "logits_cosine", "kld", "ppl", "generation"):
            for k, v in (metrics.get(block) or {}).items() if isinstance(metrics.get(block), dict) else ():
                if not isinstance(v, (dict, list)):
                    detail[f"{block}.{k}"] = v
        return [HTML(f"<details><summary>All metrics ({len(detail)} rows)</summary>"
                     + pd.DataFrame({"value": detail}).to_html() + "</details>")]


__all__ = ["Run"]
