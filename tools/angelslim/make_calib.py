"""Write an AngelSlim calibration JSONL from Python's own `pydoc_data.topics` (offline, no downloads).

AngelSlim's `TextDataset` (angelslim 0.5.0, `data/text_dataset.py::_load_jsonl_data`) accepts a line only if
it has one of `messages`, `input`, `conversations` or `applied_message`; a `messages` line must contain an
assistant turn (lines without one are skipped) and is rendered with the tokenizer's chat template.
We use `messages`: the user asks about a help topic, the assistant answers with the topic's text.

The train-like part is the first 85 % of the sorted topic keys; the rest is left for evaluation elsewhere.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TRAIN_FRACTION = 0.85


def train_topics() -> list[tuple[str, str]]:
    """(key, text) for the first 85 % of `pydoc_data.topics.topics`, keys sorted."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    cut = int(len(keys) * TRAIN_FRACTION)
    return [(key, topics[key]) for key in keys[:cut]]


def calibration_lines(max_chars: int = 2000) -> list[dict]:
    """One chat sample per train topic; the answer is cut to `max_chars` to keep tokenizing cheap."""
    lines = []
    for key, text in train_topics():
        answer = text.strip()[:max_chars]
        if not answer:
            continue
        lines.append(
            {
                "messages": [
                    {"role": "user", "content": f"Explain the Python help topic '{key}'."},
                    {"role": "assistant", "content": answer},
                ]
            }
        )
    return lines


def write_calibration_jsonl(path: Path, max_chars: int = 2000) -> int:
    """Write the calibration JSONL to `path`; return the number of lines written."""
    lines = calibration_lines(max_chars)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for line in lines:
            handle.write(json.dumps(line, ensure_ascii=False) + "\n")
    return len(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSONL file to write")
    parser.add_argument("--max-chars", type=int, default=2000, help="cut each answer to this many chars")
    args = parser.parse_args()
    count = write_calibration_jsonl(args.out, args.max_chars)
    print(f"wrote {count} calibration lines to {args.out}")


if __name__ == "__main__":
    main()
