"""Write lib/llm_workbook/workbook/builtin_digests.json from the builtins built here (run `make report` first).

Every later build compares its digest with the one recorded here and says in its provenance (and in every
run record that uses it) when it differs. Usage: .venv/bin/python tools/record_builtin_digests.py
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

from llm_workbook.store import atomic
from llm_workbook.workbook import builtins


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> int:
    recorded, missing = {}, []
    for name, entry in sorted(builtins.CATALOGUE.items()):
        if entry.kind == "base":
            continue
        facts = builtins.provenance(builtins.BUILTIN_PREFIX + name)
        if facts is None:
            missing.append(name)
            continue
        base = Path(builtins.resolve(builtins.BUILTIN_PREFIX + entry.base))
        machine = (f"{cpu_model()}, {facts['torch_threads']} torch threads, torch {facts['torch']}, "
                   f"flags {' '.join(facts['cpu_kernel_flags'])}")
        # recomputed, not copied from the provenance file: a build's digest is what content_digest says now
        recorded[name] = {"sha256": builtins.content_digest(builtins.root_target(entry, base)), "machine": machine}
    atomic.write_text(builtins.RECORDED_DIGESTS, json.dumps(recorded, indent=2, sort_keys=True) + "\n")
    print(f"recorded {len(recorded)} builtins in {builtins.RECORDED_DIGESTS}")
    if missing:
        print("not built here (no digest recorded): " + ", ".join(missing), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
