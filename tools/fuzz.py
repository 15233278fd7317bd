"""Coverage-guided fuzzing of the weight-file readers (atheris / libFuzzer), each target for a bounded time.

    python tools/fuzz.py [TARGET ...] [--seconds N]   # targets: parquet, aios, gguf, safetensors, inspect

Each target starts from small real files of its kind (tests/fuzz_targets.py) and mutates them, guided by the
coverage of our code and of gguf-py's and safetensors' Python layers. A finding is anything but a correct
read or one StoreError: another exception, a native crash, a hang (--timeout) or memory beyond
--rss-limit-mb. libFuzzer stops at a finding; this script keeps the input under tests/fuzz_cases/TARGET/
(replayed by tests/test_fuzz_cases.py), restarts on the grown corpus and goes on until the time is used.
Every kept case is then replayed in a fresh process and classified; the exit status is 1 when a case is
still a bug, 0 when each is refused cleanly or is pyarrow's known abort (see the README's threat model).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def fuzz_once(target: str, corpus: Path, seconds: int, timeout: int, rss_limit_mb: int) -> int:
    """The child: atheris on ``target`` until the time is up or the first finding (written as an artifact)."""
    import atheris

    with atheris.instrument_imports(include=["llm_workbook", "gguf", "safetensors", "fuzz_targets"]):
        import fuzz_targets
        import llm_workbook.cli  # noqa: F401 - every module a target reaches, instrumented on import
        import llm_compression.inference.weight_loader  # noqa: F401
        import llm_workbook.store.gguf  # noqa: F401
        import llm_workbook.store.loader  # noqa: F401
        import llm_workbook.store.checkpoint  # noqa: F401
    found = fuzz_targets.CASES / target
    found.mkdir(parents=True, exist_ok=True)
    atheris.Setup([sys.argv[0], str(corpus), f"-max_total_time={seconds}", f"-timeout={timeout}",
                   f"-rss_limit_mb={rss_limit_mb}", f"-artifact_prefix={found}/", "-max_len=65536"],
                  lambda data: fuzz_targets.run(target, data))
    atheris.Fuzz()
    return 0


def classify(target: str, case: Path) -> str:
    """Replay one kept case in a fresh process: 'refused' (a correct read or one StoreError), 'pyarrow-abort'
    (pyarrow's metadata validation aborting the process), or 'bug: ...'."""
    code = f"import fuzz_targets; fuzz_targets.run({target!r}, open({str(case)!r}, 'rb').read())"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "tests", capture_output=True, text=True,
                            timeout=300)
    if result.returncode == 0:
        return "refused"
    if result.returncode < 0 and "parquet::ParquetException" in result.stderr:
        return "pyarrow-abort"
    last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
    return f"bug: {last[:200]}"


def fuzz_target(args, target: str) -> None:
    import fuzz_targets

    corpus = Path(tempfile.mkdtemp(prefix=f"llmc-fuzz-{target}-"))
    for i, seed in enumerate(fuzz_targets.seeds(target)):
        fuzz_targets.TARGETS[target](seed)  # every seed must read cleanly: a broken seed fuzzes nothing
        (corpus / f"seed-{i}").write_bytes(seed)
    deadline = time.monotonic() + args.seconds
    restarts = 0
    while (left := int(deadline - time.monotonic())) > 5:
        child = subprocess.run([sys.executable, __file__, "--child", target, "--corpus", str(corpus),
                                "--seconds", str(left), "--timeout", str(args.timeout),
                                "--rss-limit-mb", str(args.rss_limit_mb)], capture_output=True, text=True)
        stats = [line for line in child.stderr.splitlines() if line.startswith("#")]
        if stats:
            print(f"  {target}: {stats[-1]}", flush=True)
        if child.returncode == 0:
            break
        restarts += 1
    print(f"{target}: {args.seconds} s, {len(list(corpus.iterdir()))} corpus inputs, {restarts} findings this run",
          flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="*", help="default: all")
    parser.add_argument("--seconds", type=int, default=120, help="fuzzing time per target (default 120)")
    parser.add_argument("--timeout", type=int, default=30, help="seconds one input may take (default 30)")
    parser.add_argument("--rss-limit-mb", type=int, default=3072, help="memory that counts as runaway (default 3072)")
    parser.add_argument("--child", metavar="TARGET", help=argparse.SUPPRESS)
    parser.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    try:
        import atheris  # noqa: F401
    except ImportError:
        print("tools/fuzz.py needs atheris: `make fuzz` installs it (pip install atheris)", file=sys.stderr)
        return 2
    if args.child:
        return fuzz_once(args.child, args.corpus, args.seconds, args.timeout, args.rss_limit_mb)
    import fuzz_targets

    targets = args.targets or list(fuzz_targets.TARGETS)
    unknown = sorted(set(targets) - set(fuzz_targets.TARGETS))
    if unknown:
        parser.error(f"unknown targets {unknown}; choose from {sorted(fuzz_targets.TARGETS)}")
    for target in targets:
        fuzz_target(args, target)
    bugs = 0
    for target, case in fuzz_targets.cases():
        verdict = classify(target, case)
        bugs += verdict.startswith("bug")
        print(f"{target}/{case.name}: {verdict}")
    print(f"fuzz: {len(fuzz_targets.cases())} kept cases, {bugs} still bugs")
    return 1 if bugs else 0


if __name__ == "__main__":
    raise SystemExit(main())
