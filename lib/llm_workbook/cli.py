"""`llmc`: the command line. Each subcommand parses, calls one library function, prints."""

from __future__ import annotations

import argparse
import json
import sys

from llm_workbook.store.atomic import exit_code, handle_stop_signals
from llm_workbook.errors import StoreError


def _cmd_convert(args) -> int:
    from llm_workbook.store.convert import HuggingFaceToParquetConverter

    report = HuggingFaceToParquetConverter(
        allow_pickle=args.allow_pickle,
        allow_nonfinite=args.allow_nonfinite,
        revision=args.revision,
        progress=not args.quiet,
        detect_grids=not args.no_grid_detection,
        gguf_file=args.gguf_file,
    ).convert(args.src, args.out)
    formats = ", ".join(f"{k}: {v}" for k, v in sorted(report.formats.items()))
    print(f"wrote {report.output} ({report.tensors} source tensors, {report.rows} row groups, "
          f"{report.bytes_written / 1e6:.1f} MB of arrays; {formats})")
    return 0


def _cmd_export(args) -> int:
    from llm_workbook.store.aios import export_aios
    from llm_workbook.store.convert import export_to_hf
    from llm_workbook.store.gguf import export_gguf

    if args.format == "aios-v2":
        result = export_aios(args.parquet, args.out_dir, progress=not args.quiet)
        print(f"wrote {result.output} (AI-OS V2: " + ", ".join(f"{k}: {v}" for k, v in sorted(result.rows.items())) + ")")
        if result.widened:
            print(f"{len(result.widened)} tensors have no exact AI-OS form and were written as float32 "
                  f"(equal values, 32 bits per weight), e.g. {', '.join(result.widened[:3])}")
        return 0
    if args.format == "gguf":
        differences = export_gguf(args.parquet, args.out_dir, progress=not args.quiet)
        print(f"wrote {args.out_dir}")
        if differences:
            print("key-values and tensors equal the source's; the layout differs: " + "; ".join(differences))
        else:
            print("layout identical to the source GGUF (byte for byte)")
        return 0
    out = export_to_hf(args.parquet, args.out_dir, progress=not args.quiet)
    print(f"wrote {out}")
    return 0


def _cmd_inspect(args) -> int:
    from llm_workbook.store import inventory
    from llm_workbook.store.loader import WeightLoaderV2

    loader = WeightLoaderV2(args.parquet)
    items = inventory.entries(loader)
    info = inventory.summary(loader)
    if args.verify:
        problems = loader.verify_all()
        checked = "all verify" if any(i.checksum for i in loader.rows.values()) else "none stored (AI-OS file); every tensor reads"
        info["checksums"] = checked if not problems else f"{len(problems)} FAILED"
        info["aios_loader"] = _aios_verdict(args.parquet, loader) if not problems else "not checked (file unreadable)"
    if args.json:
        print(json.dumps({"summary": info, "tensors": inventory.as_dicts(items), **({"problems": problems} if args.verify else {})}, indent=2))
        return 1 if args.verify and problems else 0
    width = max([len(e.name) for e in items] + [6])
    print(f"{'tensor':<{width}}  {'format':<10} {'dtype':<14} {'shape':<16} {'bytes':>12} {'bits/w':>7}")
    for e in items:
        print(f"{e.name:<{width}}  {e.format:<10} {e.dtype:<14} {str(list(e.shape)):<16} {e.bytes:>12,} {e.bits_per_weight:>7.3f}")
    print()
    print(f"schema version        {info['schema_version']}")
    print(f"tensors               {info['tensors']} ({info['stored_arrays']} stored arrays)")
    print(f"parameters            {info['parameters']:,}")
    print(f"stored bytes          {info['stored_bytes']:,} (file {info['file_bytes']:,})")
    print(f"bits per weight       {info['bits_per_weight']:.3f} (quantized tensors: "
          f"{info['quantized_bits_per_weight'] if info['quantized_bits_per_weight'] is None else round(info['quantized_bits_per_weight'], 3)})")
    print(f"compression vs bf16   {info['compression_vs_bf16']:.2f}x")
    print(f"formats               {', '.join(info['formats'])}")
    if info["seq"]:
        print(f"SEQ weights           {info['seq']['description']}")
    if args.verify:
        print(f"checksums             {info['checksums']}")
        for problem in problems:
            print(f"  {problem}")
        verdict = info["aios_loader"]
        if isinstance(verdict, dict):
            print(f"AI-OS's WeightLoader  {verdict['summary']}")
            for line in verdict["reads_wrong"]:
                print(f"  reads WRONG: {line}")
        else:
            print(f"AI-OS's WeightLoader  {verdict}")
        return 1 if problems else 0
    return 0


def _aios_verdict(path: str, loader) -> dict | str:
    """What AI-OS's own loader would make of the file, tensor by tensor (see store.aios)."""
    from llm_workbook.store.aios import aios_findings, summarize_findings

    if loader.remote:
        return "not checked for remote files"
    found = summarize_findings(aios_findings(path, loader))
    parts = [f"{found.get(k, 0)} {k}" for k in ("reads right", "raises", "reads wrong") if found.get(k)]
    raises = f" ({', '.join(found['raises_with'])})" if found["raises_with"] else ""
    return {"summary": ", ".join(parts) + raises + f" of {found['tensors']} rows", **found}


def _print_outcomes(outcomes, reports: str, pdf: bool) -> int:
    """Print one line per run and the index; return the exit status (see RUN_EXIT_CODES)."""
    from llm_workbook.workbook.run import exit_status

    width = max(len(o.run) for o in outcomes)
    for o in outcomes:
        message = o.message.splitlines()[0][:200] if o.message else ""
        status = "error (expected)" if o.expected else o.status
        took = f"{o.seconds:5.0f} s" if o.seconds is not None else " " * 7
        print(f"{o.run:<{width}}  {status:<12} {took}  {o.html or o.record}{'  ' + message if message else ''}")
    print(f"index: {reports}/index.html")
    if pdf:
        from llm_workbook.workbook.pdf import print_reports

        for path in print_reports(reports, [o.run for o in outcomes]):
            print(f"pdf: {path}")
    failed = [o.run for o in outcomes if not o.evaluated]
    if failed:
        print(f"{len(failed)} of {len(outcomes)} runs could not be evaluated ({', '.join(failed[:5])}"
              f"{', ...' if len(failed) > 5 else ''}): their reports say why", file=sys.stderr)
    return exit_status(outcomes)


RUN_EXIT_CODES = ("exit status: 0 every run reached a verdict (a failed check is a verdict, not an error); "
                  "1 a run could not be evaluated (its record and report say why); 2 bad input or usage "
                  "(one message names the file); 130 / 143 stopped by Ctrl-C / SIGTERM")


def _reports_dir(args) -> str:
    from llm_workbook.paths import reports_root

    return str(args.reports or reports_root())


def _cmd_run(args) -> int:
    from llm_workbook.workbook.executors import run_batch
    from llm_workbook.workbook.parameters import ParameterError, parse_overrides

    args.reports = _reports_dir(args)

    if args.pdf:
        from llm_workbook.workbook.pdf import find_chromium

        find_chromium()  # before hours of runs: say now how to get Chromium if it is missing
    try:
        outcomes = run_batch(args.parameters, reports=args.reports, force=args.force, progress=not args.quiet,
                             overrides=parse_overrides(args.param), executor=args.executor, address=args.address)
    except ParameterError as exc:
        raise StoreError(str(exc)) from None
    return _print_outcomes(outcomes, args.reports, args.pdf)


def _cmd_evaluate(args) -> int:
    from llm_workbook.workbook.executors import run_batch
    from llm_workbook.workbook.parameters import ParameterError, check_parameters, check_source, parse_overrides

    args.reports = _reports_dir(args)
    try:
        check_source("candidate", args.candidate)
        check_source("reference", args.reference)
        raw = {"model": args.candidate, "reference": args.reference,
               "run": args.run or _run_name(args.candidate)}
        params = check_parameters(raw, "llmc evaluate", parse_overrides(args.param))
        if args.pdf:
            from llm_workbook.workbook.pdf import find_chromium

            find_chromium()
        outcomes = run_batch([params], reports=args.reports, force=True, progress=not args.quiet)
    except ParameterError as exc:
        raise StoreError(str(exc)) from None
    return _print_outcomes(outcomes, args.reports, args.pdf)


def _cmd_publish(args) -> int:
    from llm_workbook.workbook.parameters import ParameterError
    from llm_workbook.workbook.run import publish_notebook

    args.reports = _reports_dir(args)
    try:
        outcomes = [publish_notebook(nb, args.reports) for nb in args.notebooks]
    except ParameterError as exc:
        raise StoreError(str(exc)) from None
    return _print_outcomes(outcomes, args.reports, args.pdf)


def _run_name(source: str) -> str:
    """A run name from a source: a safe file name (``/tmp/x/model.parquet`` -> ``tmp-x-model``)."""
    from llm_workbook.names import safe_stem

    name = str(source).rstrip("/").removeprefix("builtin:")
    return safe_stem(name.removesuffix(".parquet").removesuffix(".gguf"))


def _cmd_quantize(args) -> int:
    from llm_workbook.quantize.options import ComparisonResult
    from llm_workbook.quantize.run import quantize

    backends = [b.strip() for b in args.compare_backends.split(",") if b.strip()] if args.compare_backends else None
    result = quantize(
        args.src, args.out, method=args.method, bits=args.bits, group_size=args.group_size, symmetric=args.symmetric,
        skip=args.skip, act_order=args.act_order, calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len,
        seed=args.seed, out_format=args.format, backend=args.backend, progress=not args.quiet,
        compare_backends=backends,
    )
    results = result.results if isinstance(result, ComparisonResult) else {result.backend: result}
    for backend, r in results.items():
        bpw = "n/a" if r.quantized_bits_per_weight is None else f"{r.quantized_bits_per_weight:.3f}"
        print(f"wrote {r.output} ({backend} {r.method}, {len(r.layers)} Linears quantized, "
              f"{bpw} bits/weight stored for them, {r.seconds:.1f} s)")
    if isinstance(result, ComparisonResult):
        print(result.note)
        for backend, record in (result.evaluations or {}).items():
            verdict = getattr(record, "verdict", None) or {}
            checks = ", ".join(f"{c['name']} {c['value']:.4g}" for c in verdict.get("checks", []) if c.get("value") is not None)
            print(f"{backend}: passed={verdict.get('passed')} ({checks})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmc", description="Lossless Parquet weight store and quantized-model evaluation workbook.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("convert", help="convert an HF checkpoint (directory or hub id) or a GGUF into a Parquet weight file",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Convert an HF checkpoint or a GGUF file into a self-contained Parquet V2.1 weight file, bit-exactly.",
                       epilog="examples:\n"
                              "  llmc convert path/to/hf-model model.parquet\n"
                              "  llmc convert tencent/Hunyuan-1.8B-Instruct-FP8 hy-fp8.parquet      # hub id (or its local cache)\n"
                              "  llmc convert model.Q4_K_M.gguf model.parquet\n"
                              "  llmc convert owner/repo-GGUF model.parquet --gguf-file model-Q4_K_M.gguf\n"
                              "  llmc convert path/to/hf-model s3://bucket/models/model.parquet   # AWS_ENDPOINT_URL etc.")
    p.add_argument("src", help="local HF directory, hub id (owner/name) or .gguf file")
    p.add_argument("out", help="output .parquet path (written atomically)")
    p.add_argument("--gguf-file", metavar="NAME", help="the GGUF file to convert inside an HF directory or hub repo")
    p.add_argument("--revision", help="hub revision (branch, tag or commit)")
    p.add_argument("--allow-pickle", action="store_true", help="accept pytorch_model.bin (pickle: only for trusted sources)")
    p.add_argument("--allow-nonfinite", action="store_true", help="store tensors holding NaN/Inf instead of refusing them")
    p.add_argument("--no-grid-detection", action="store_true", help="store low-bit-grid weights dense instead of as codes")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("export", help="write an HF directory (safetensors + config + tokenizer) or a GGUF from a Parquet file",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  llmc export model.parquet exported/\n"
                              "  llmc export model.parquet back.gguf --format gguf\n  llmc export model.parquet aios.parquet --format aios-v2\n"
                              "  llmc export s3://bucket/m.parquet exported/",
                       description="Export a Parquet weight file back to an HF directory (tensors equal the source bit for bit; "
                                   "a GGUF-derived file gives dense float32 weights) or, with --format gguf, to the GGUF it came from.")
    p.add_argument("parquet")
    p.add_argument("out_dir", metavar="out", help="new (or empty) directory; with --format gguf a new .gguf file")
    p.add_argument("--format", choices=["hf", "gguf", "aios-v2"], default="hf",
                   help="hf (default), gguf (files converted from a GGUF), or aios-v2: AI-OS's V2 file (OUT.parquet) "
                        "or model directory (weights.parquet, metadata.json, tokenizer.json)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("inspect", help="list a Parquet file's tensors, formats, bits per weight and totals",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  llmc inspect model.parquet\n  llmc inspect model.parquet --verify --json\n"
                              "  llmc inspect s3://bucket/m.parquet --verify",
                       description="Table of tensors (name, format, dtype, shape, bytes, bits/weight) and totals.")
    p.add_argument("parquet")
    p.add_argument("--verify", action="store_true", help="read every tensor and verify its checksum")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_inspect)

    examples = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("run", help="execute the evaluation notebook once per parameters file, then the comparison",
                       formatter_class=examples,
                       description="Run evaluate_model.ipynb (papermill) for each parameters YAML, then compare_models.ipynb; "
                                   "render HTML reports and reports/index.html (the decision first). Runs whose inputs did "
                                   "not change are skipped.",
                       epilog="examples:\n"
                              "  llmc run parameters/default/*.yaml\n"
                              "  llmc run parameters/default/smollm2-ptq-int8.yaml -p max_eval_tokens 1024 -p measure_perf false\n"
                              "  llmc run parameters/default/*.yaml --pdf        # also reports/*.pdf (headless Chromium)\n"
                              "  llmc run parameters/default/*.yaml --executor ray [--address auto]   # runs as Ray tasks\n\n"
                              + RUN_EXIT_CODES)
    p.add_argument("parameters", nargs="+", help="parameters/*.yaml files")
    p.add_argument("-p", "--param", nargs=2, action="append", metavar=("KEY", "VALUE"),
                   help="override a parameter of every run; VALUE is parsed as YAML (0.9, true, null, text)")
    p.add_argument("--reports", help="output directory (default: the checkout's reports/, or $LLMC_REPORTS_DIR)")
    p.add_argument("--force", action="store_true", help="re-run even when inputs are unchanged")
    p.add_argument("--pdf", action="store_true", help="print the index and each meeting report to PDF (headless Chromium)")
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local: one run after another (default); ray: each run a Ray task (pip install -e '.[cluster]')")
    p.add_argument("--address", help="Ray cluster to join: auto, or ray://HOST:10001 (default: start a local Ray)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("evaluate", help="evaluate one candidate against its original, without a parameters file",
                       formatter_class=examples,
                       description="One run of the evaluation notebook for CANDIDATE against --reference, writing the same "
                                   "record, HTML reports and index as llmc run.",
                       epilog="examples:\n"
                              "  llmc evaluate builtin:smollm2/ptq-int4 --reference builtin:smollm2\n"
                              "  llmc evaluate model-int4.parquet --reference path/to/bf16-model -p context_length 512 "
                              "-p ppl_threshold 0.05\n"
                              "  llmc evaluate AngelSlim/Qwen3-0_6B_int4_awq --reference Qwen/Qwen3-0.6B --reports reports/qwen3\n\n"
                              + RUN_EXIT_CODES)
    p.add_argument("candidate", help="HF directory, hub id, .parquet, .gguf or builtin:<name>")
    p.add_argument("--reference", required=True, help="the original it is compared with (same kinds of source)")
    p.add_argument("-p", "--param", nargs=2, action="append", metavar=("KEY", "VALUE"),
                   help="set a parameter (see llm_workbook.workbook.parameters.DEFAULTS); VALUE is parsed as YAML")
    p.add_argument("--run", help="name of the run (default: from the candidate)")
    p.add_argument("--reports", help="output directory (default: the checkout's reports/, or $LLMC_REPORTS_DIR)")
    p.add_argument("--pdf", action="store_true", help="also print the index and the meeting report to PDF")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("publish", help="render evaluation notebooks run and saved in JupyterLab into reports/ and the index",
                       formatter_class=examples,
                       description="For each executed evaluate_model.ipynb (run to its end and saved, e.g. in JupyterLab): "
                                   "copy it to REPORTS/<run>.ipynb beside the record it wrote, render its full and meeting "
                                   "HTML reports and rewrite REPORTS/index.html, as llmc run leaves a run.",
                       epilog="examples:\n  llmc publish notebooks/evaluate_model.ipynb\n"
                              "  llmc publish my-run.ipynb --reports reports/qwen3 --pdf\n\n" + RUN_EXIT_CODES)
    p.add_argument("notebooks", nargs="+", help="executed evaluation notebooks (.ipynb)")
    p.add_argument("--reports", help="where their records are (default: the checkout's reports/, or $LLMC_REPORTS_DIR)")
    p.add_argument("--pdf", action="store_true", help="also print the index and the meeting reports to PDF")
    p.set_defaults(func=_cmd_publish)

    p = sub.add_parser(
        "quantize", help="quantize a model with our PTQ (INT8/INT4/INT2 RTN, GPTQ) or AngelSlim into a weight file",
        description="Quantize SRC (HF directory, hub id or .parquet) into OUT. Backend ptq writes a Parquet file whose "
                    "quantized Linears hold codes packed at their real bit width (format 'ptq'), or with --format gptq "
                    "an AutoGPTQ v1 HF directory. Backend angelslim runs AngelSlim's PTQ in .venv-angelslim "
                    "(make angelslim-env) and converts its output. Calibration text: the offline corpus's train split.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  llmc quantize path/to/bf16-model int4.parquet --method int4\n"
               "  llmc quantize path/to/bf16-model gptq.parquet --method gptq --act-order --calib-samples 128\n"
               "  llmc quantize path/to/bf16-model awq.parquet --backend angelslim --method int4_awq --group-size 64\n"
               "  llmc quantize path/to/bf16-model cmp.parquet --method int8 --compare-backends ptq,angelslim\n"
               "  llmc quantize model.parquet aios-int2.parquet --backend aios --method int2",
    )
    p.add_argument("src", help="HF checkpoint directory, hub id (owner/name, from the local cache) or .parquet file")
    p.add_argument("out", help="output .parquet file, or with --format gptq a new (or empty) directory; written atomically")
    p.add_argument("--method", required=True,
                   choices=["int8", "int4", "int2", "gptq", "fp8_static", "fp8_dynamic", "int8_dynamic", "int4_gptq",
                            "int4_awq", "w4a8_fp8"], metavar="METHOD",
                   help="ptq: int8 (per channel, symmetric), int4 (group 128, symmetric), int2 (group 128, asymmetric), "
                        "gptq (4 bits, group 128, symmetric); angelslim: fp8_static, fp8_dynamic, int8_dynamic, "
                        "int4_gptq, int4_awq, w4a8_fp8")
    p.add_argument("--bits", type=int, help="code width for --method gptq (2-8; default 4)")
    p.add_argument("--group-size", type=int, metavar="N", help="input columns per scale group; -1 = per channel "
                                                               "(default: int8 -1, others 128)")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--symmetric", dest="symmetric", action="store_const", const=True,
                     help="symmetric codes (zero point 2^(bits-1)); default for int8, int4, gptq")
    sym.add_argument("--asymmetric", dest="symmetric", action="store_const", const=False,
                     help="asymmetric codes (min/max range with a zero point); default for int2")
    p.add_argument("--skip", nargs="+", metavar="PATTERN",
                   help="module names (substring or regex) left unquantized; replaces the default: lm_head embed (put it after SRC OUT)")
    p.add_argument("--act-order", action="store_true", help="GPTQ: process columns by descending Hessian diagonal")
    p.add_argument("--calib-samples", type=int, default=128, metavar="N", help="calibration windows (default 128)")
    p.add_argument("--calib-seq-len", type=int, default=256, metavar="N", help="tokens per calibration window (default 256)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration window choice (default 0)")
    p.add_argument("--format", choices=["parquet", "gptq"], default="parquet",
                   help="parquet: weight file with packed 'ptq' rows (default); gptq: AutoGPTQ v1 HF directory")
    p.add_argument("--backend", choices=["ptq", "angelslim", "aios"], default="ptq",
                   help="ptq: our quantizer (default); angelslim: AngelSlim in .venv-angelslim; aios: AI-OS's "
                        "ArrowQuantizer exactly (--method int8 per channel, or int2 in groups of 128)")
    p.add_argument("--compare-backends", metavar="B1,B2",
                   help="e.g. ptq,angelslim: quantize with each (method mapped, int8<->int8_dynamic, gptq<->int4_gptq) "
                        "into OUT with the backend name before the suffix, then evaluate both against SRC")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_quantize)

    return parser


# What each command was doing, for the one line printed when a signal stops it.
_DOING = {"convert": "converting", "export": "exporting", "inspect": "reading", "run": "running the workbook",
          "quantize": "quantizing", "evaluate": "evaluating"}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handle_stop_signals()  # SIGTERM / SIGHUP clean up like Ctrl-C: schedulers stop jobs that way
    try:
        return args.func(args)
    except StoreError as exc:
        print(f"llmc {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        name = getattr(exc, "args", None) and str(exc) or "SIGINT"
        target = getattr(args, "out", None) or getattr(args, "out_dir", None) or getattr(args, "reports", None) or ""
        print(f"llmc {args.command}: interrupted by {name} while {_DOING.get(args.command, args.command)}"
              f"{' ' + str(target) if target else ''}; temporary files removed, nothing half-written left",
              file=sys.stderr)
        return exit_code(exc)


if __name__ == "__main__":
    raise SystemExit(main())
