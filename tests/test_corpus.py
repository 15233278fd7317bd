"""corpus.py: the offline pydoc corpus and its splits, text files, calibration windows."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from pydoc_data.topics import topics  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from llm_workbook import corpus  # noqa: E402

WINDOW = 200


# ----------------------------------------------------------------------------- corpus


def test_pydoc_splits_are_disjoint_and_cover_all_topics() -> None:
    keys = corpus.pydoc_split_keys()
    train, evals = set(keys["train"]), set(keys["eval"])
    assert train and evals
    assert not train & evals
    assert train | evals == set(topics)
    eval_chars = sum(len(topics[k]) for k in evals)
    share = eval_chars / sum(len(t) for t in topics.values())
    assert 0.10 <= share <= 0.16, share
    assert corpus.load_texts("pydoc", "eval") == [topics[k] for k in sorted(evals)]


def test_no_eval_passage_appears_in_train() -> None:
    train_text = corpus.load_text("pydoc", "train")
    eval_text = corpus.load_text("pydoc", "eval")
    assert len(eval_text) > 50_000 and len(train_text) > 5 * len(eval_text)
    train_windows = {train_text[i : i + WINDOW] for i in range(len(train_text) - WINDOW + 1)}
    leaked = [i for i in range(len(eval_text) - WINDOW + 1) if eval_text[i : i + WINDOW] in train_windows]
    assert not leaked, eval_text[leaked[0] : leaked[0] + WINDOW]


def test_overlapping_topics_are_grouped() -> None:
    # "customization" is a subsection of "specialnames" in the Python docs: they must share a split.
    groups = corpus._overlap_groups(topics, WINDOW)
    group_of = {k: i for i, g in enumerate(groups) for k in g}
    assert group_of["customization"] == group_of["specialnames"]
    texts = {"a": "x" * 50 + "shared passage " * 20, "b": "shared passage " * 20 + "y" * 50, "c": "z" * 400}
    assert corpus._overlap_groups(texts, WINDOW) == [["a", "b"], ["c"]]


def test_load_text_joins_with_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"text": "first"}) + "\n\n" + json.dumps({"text": "second", "id": 2}) + "\n")
    assert corpus.load_texts(str(path)) == ["first", "second"]
    assert corpus.load_text(str(path), "train") == "first\n\nsecond"
    txt = tmp_path / "c.txt"
    txt.write_text("plain text\nline two\n")
    assert corpus.load_texts(str(txt)) == ["plain text\nline two\n"]


@pytest.mark.parametrize(
    "content, message",
    [('{"text": "ok"}\nnot json\n', "line 2 is not valid JSON"), ('{"body": "x"}\n', "line 1 has no string field 'text'")],
)
def test_bad_jsonl_names_file_and_line(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as info:
        corpus.load_texts(str(path))
    assert "bad.jsonl" in str(info.value)


def test_bad_corpus_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="split"):
        corpus.load_texts("pydoc", "test")
    with pytest.raises(ValueError, match="does not exist"):
        corpus.load_texts(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match=r"\.txt or \.jsonl"):
        (tmp_path / "data.csv").write_text("a,b\n")
        corpus.load_texts(str(tmp_path / "data.csv"))


def test_hub_dataset_offline_gives_clear_error() -> None:
    # Either `datasets` is missing or HF_HUB_OFFLINE=1 is set: both must say how to get the corpus.
    with pytest.raises(corpus.CorpusUnavailableError, match="wikitext-2-raw-v1") as info:
        corpus.load_texts("wikitext-2-raw-v1", "eval")
    assert "datasets" in str(info.value) or "HF_HUB_OFFLINE" in str(info.value)


# ----------------------------------------------------------------------------- calibration windows


def test_calibration_samples_are_seeded_train_windows(tokenizer_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    a = corpus.calibration_samples(tok, n_samples=6, seq_len=32, seed=1)
    b = corpus.calibration_samples(tok, n_samples=6, seq_len=32, seed=1)
    c = corpus.calibration_samples(tok, n_samples=6, seq_len=32, seed=2)
    assert a.shape == (6, 32) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    train_ids = torch.tensor(tok(corpus.load_text("pydoc", "train"), add_special_tokens=False, verbose=False)["input_ids"])
    windows = train_ids.unfold(0, 32, 1)
    for row in a:
        assert (windows == row).all(dim=1).any()
    with pytest.raises(ValueError, match="seq_len"):
        corpus.calibration_samples(tok, n_samples=1, seq_len=10**7, seed=0)
