"""`llmc`: the command line. Each subcommand parses, calls one library function, prints."""

from __future__ import annotations

import argparse
import json
import sys

from .formats.base import StoreError


def _cmd_convert(args) -> int:
    from .converter import HuggingFaceToParquetConverter

    report = HuggingFaceToParquetConverter(
        allow_pickle=args.allow_pickle,
        allow_nonfinite=args.allow_nonfinite,
        revision=args.revision,
        progress=not args.quiet,
        detect_grids=not args.no_grid_detection,
    ).convert(args.src, args.out)
    formats = ", ".join(f"{k}: {v}" for k, v in sorted(report.formats.items()))
    print(f"wrote {report.output} ({report.tensors} source tensors, {report.rows} row groups, "
          f"{report.bytes_written / 1e6:.1f} MB of arrays; {formats})")
    return 0


def _cmd_export(args) -> int:
    from .converter import export_to_hf

    out = export_to_hf(args.parquet, args.out_dir, progress=not args.quiet)
    print(f"wrote {out}")
    return 0


def _cmd_inspect(args) -> int:
    from . import catalog
    from .loader import WeightLoaderV2

    loader = WeightLoaderV2(args.parquet)
    items = catalog.entries(loader)
    info = catalog.summary(loader)
    if args.verify:
        problems = loader.verify_all()
        info["checksums"] = "all verify" if not problems else f"{len(problems)} FAILED"
    if args.json:
        print(json.dumps({"summary": info, "tensors": catalog.as_dicts(items), **({"problems": problems} if args.verify else {})}, indent=2))
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
    if args.verify:
        print(f"checksums             {info['checksums']}")
        for problem in problems:
            print(f"  {problem}")
        return 1 if problems else 0
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmc", description="Lossless Parquet weight store and quantized-model evaluation workbook.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("convert", help="convert an HF checkpoint (directory or hub id) into a Parquet weight file",
                       description="Convert an HF checkpoint into a self-contained Parquet V2.1 weight file, bit-exactly.")
    p.add_argument("src", help="local HF directory or hub id (owner/name)")
    p.add_argument("out", help="output .parquet path (written atomically)")
    p.add_argument("--revision", help="hub revision (branch, tag or commit)")
    p.add_argument("--allow-pickle", action="store_true", help="accept pytorch_model.bin (pickle: only for trusted sources)")
    p.add_argument("--allow-nonfinite", action="store_true", help="store tensors holding NaN/Inf instead of refusing them")
    p.add_argument("--no-grid-detection", action="store_true", help="store low-bit-grid weights dense instead of as codes")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("export", help="write an HF directory (safetensors + config + tokenizer) from a Parquet file",
                       description="Export a Parquet weight file back to an HF directory; tensors equal the source bit for bit.")
    p.add_argument("parquet")
    p.add_argument("out_dir", help="new (or empty) directory")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("inspect", help="list a Parquet file's tensors, formats, bits per weight and totals",
                       description="Table of tensors (name, format, dtype, shape, bytes, bits/weight) and totals.")
    p.add_argument("parquet")
    p.add_argument("--verify", action="store_true", help="read every tensor and verify its checksum")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_inspect)

    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except StoreError as exc:
        print(f"llmc {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"llmc {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
