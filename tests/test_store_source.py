"""A source is classified once, by store/source.py: its kinds, its errors, and no second classifier elsewhere."""

import ast
import shutil
from pathlib import Path

import pytest

from llm_workbook import Source
from llm_workbook.errors import SourceNotFoundError, StoreError
from llm_workbook.store import source as source_module
from llm_workbook.store.convert import HuggingFaceToParquetConverter
from llm_workbook.store.source import Kind

from gguf_fixtures import write_tiny_llama

AIOS = Path(__file__).parent / "fixtures" / "aios"
LIB = Path(source_module.__file__).parents[1]


def test_each_kind_is_recognised_from_what_is_there(qwen3_dir, tmp_path):
    ours = HuggingFaceToParquetConverter(progress=False).convert(qwen3_dir, tmp_path / "ours.parquet").output
    gguf = write_tiny_llama(tmp_path / "tiny.gguf")
    aios_dir = tmp_path / "aios-model"
    aios_dir.mkdir()
    shutil.copy(AIOS / "v1_fp32.parquet", aios_dir / "weights.parquet")
    cases = {
        str(qwen3_dir): Kind.HF_DIR,
        str(ours): Kind.PARQUET,
        str(gguf): Kind.GGUF,
        str(AIOS / "v2_int8_group64.parquet"): Kind.AIOS,
        str(aios_dir): Kind.AIOS,
        "s3://bucket/model.parquet": Kind.REMOTE,
        "AngelSlim/HY-1.8B-2Bit": Kind.HUB,
    }
    for name, kind in cases.items():
        source = Source.of(name)
        assert source.kind is kind, name
        assert str(source) == name  # messages and records name it as the user did
        assert Source.of(source) is source  # a Source passes through unchanged
    assert Source.of(aios_dir).aios_file == aios_dir / "weights.parquet"
    assert Source.of(str(AIOS / "v1_fp32.parquet")).is_parquet
    assert not Source.of(aios_dir).is_parquet
    assert Source.of(str(qwen3_dir)).config()["model_type"] == "qwen3"
    assert Source.of(ours).config()["model_type"] == "qwen3"


def test_gguf_inside_a_directory_or_hub_repo_is_named_by_gguf_file(tmp_path):
    write_tiny_llama(tmp_path / "a.gguf")
    with pytest.raises(StoreError, match="--gguf-file"):
        Source.of(tmp_path)
    picked = Source.of(tmp_path, gguf_file="a.gguf")
    assert picked.kind is Kind.GGUF and picked.gguf() == tmp_path / "a.gguf"
    with pytest.raises(StoreError, match=r"no such GGUF file.*a\.gguf"):
        Source.of(tmp_path, gguf_file="b.gguf").gguf()
    assert Source.of("owner/repo", gguf_file="x.gguf").kind is Kind.GGUF


@pytest.mark.parametrize("name, error, message", [
    ("missing.parquet", SourceNotFoundError, "no such Parquet file"),
    ("./no/such/dir", SourceNotFoundError, "not a hub id"),
    ("s3://bucket/model.bin", StoreError, "must be a .parquet weight file"),
])
def test_what_is_none_of_the_kinds_is_one_clear_error(name, error, message):
    with pytest.raises(error, match=message):
        Source.of(name)


def test_a_file_of_another_kind_is_refused_by_name(tmp_path):
    other = tmp_path / "weights.bin"
    other.write_bytes(b"\0" * 16)
    with pytest.raises(StoreError, match="weights.bin: expected a checkpoint directory"):
        Source.of(other)
    with pytest.raises(StoreError, match="not a Parquet weight file"):
        Source.of(str(AIOS.parent / "angelslim" / "original")).loader()


def test_a_hub_id_is_looked_up_once_however_often_its_root_is_asked(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(source_module, "hub_snapshot", lambda *args, **kwargs: calls.append(args) or tmp_path)
    source = Source.of("owner/model")
    assert source.root() == source.root() == tmp_path and len(calls) == 1
    assert source == Source.of("owner/model")  # the looked-up snapshot is not part of the value


def test_a_resolver_prefix_classifies_what_it_stands_for(qwen3_dir, monkeypatch):
    monkeypatch.setitem(source_module.RESOLVERS, "test:", lambda name: str(qwen3_dir))
    source = Source.of("test:anything")
    assert source.kind is Kind.HF_DIR and source.path == Path(qwen3_dir)


# Where a source string may still be looked at: the classifier itself, the URL helpers, and the store's own
# I/O (a loader or writer opening a URL it was handed).
CLASSIFIERS = {"store/source.py", "store/remote.py", "store/loader.py", "store/writer.py"}
SIGNS = ("HUB_ID", "is_remote", "is_gguf_file", "resolve_source", "is_aios_source")


def test_no_module_but_the_classifier_classifies_a_source_string():
    found = []
    for path in sorted(LIB.rglob("*.py")):
        relative = path.relative_to(LIB).as_posix()
        if relative in CLASSIFIERS:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Name, ast.Attribute)):
                name = node.id if isinstance(node, ast.Name) else node.attr
                if name in SIGNS:
                    found.append(f"{relative}:{node.lineno} {name}")
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "endswith"
                    and node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value in (".parquet", ".gguf")):
                found.append(f"{relative}:{node.lineno} endswith({node.args[0].value!r})")
    assert not found, "classify sources in store/source.py only:\n" + "\n".join(found)
