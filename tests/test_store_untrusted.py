"""A weight file is untrusted input: names inside it are not paths, its claimed sizes are checked before they
are believed, and the commands' exit codes say what happened."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from llm_workbook import names, schema as S
from llm_workbook.cli import main
from llm_workbook.errors import StoreError
from llm_workbook.store.convert import HuggingFaceToParquetConverter
from llm_workbook.store.loader import WeightLoaderV2

HOSTILE_NAMES = ["../escaped.txt", "/tmp/absolute.txt", "sub/dir.txt", "..", ".bashrc", "CON", "nul.txt",
                 "a\\b", "c:evil", "tab\tname", "", "x" * 300, "trailing.", " lead"]


def rewrite_footer(src: Path, dst: Path, update: dict[str, str]) -> Path:
    """A copy of ``src`` whose footer key-values are changed by ``update`` (row groups kept as they are)."""
    file = pq.ParquetFile(src)
    meta = {**{k.decode(): v.decode() for k, v in (file.schema_arrow.metadata or {}).items()}, **update}
    schema = file.schema_arrow.with_metadata(meta)
    with pq.ParquetWriter(dst, schema, compression="none", write_page_checksum=True) as writer:
        for i in range(file.num_row_groups):
            writer.write_table(file.read_row_group(i).replace_schema_metadata(meta))
    return dst


@pytest.fixture(scope="module")
def store_file(qwen3_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("untrusted") / "model.parquet"
    HuggingFaceToParquetConverter(progress=False).convert(qwen3_dir, out)
    return out


@pytest.fixture(scope="module")
def hostile_file(store_file, tmp_path_factory) -> Path:
    """The issue's case: side files named ``../escaped.txt`` and an absolute path, checksums intact."""
    directory = tmp_path_factory.mktemp("hostile")
    outside = directory / "outside"
    outside.mkdir()
    files = json.loads(WeightLoaderV2(store_file).metadata[S.META_FILES])
    files["../escaped.txt"] = base64.b64encode(b"pwned").decode()
    files[str(outside / "absolute.txt")] = base64.b64encode(b"pwned").decode()
    return rewrite_footer(store_file, directory / "hostile.parquet", {S.META_FILES: json.dumps(files)})


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_a_name_that_is_not_one_plain_file_name_is_refused(name):
    assert names.problem(name)
    with pytest.raises(StoreError, match="side file"):
        names.file_name(name, source="m.parquet", entry="side file")


@pytest.mark.parametrize("name", ["tokenizer.json", "merges.txt", "special_tokens_map.json", "chat_template.jinja",
                                  "model-00001-of-00002.safetensors", "vocab (1).txt"])
def test_plain_file_names_pass(name):
    assert names.file_name(name, source="m", entry="side file") == name


def test_safe_stem_never_starts_like_an_option_or_a_path():
    assert names.safe_stem("/tmp/x/model") == "tmp-x-model"
    assert names.safe_stem("--help") == "help"
    assert names.safe_stem("../..") == "run"
    assert not names.problem(names.safe_stem("a/../b:c"))


def _nothing_outside(directory: Path) -> None:
    assert not (directory.parent / "escaped.txt").exists()
    assert not (directory / "outside" / "absolute.txt").exists()


def test_export_of_a_file_with_path_side_files_writes_nothing_and_names_the_entry(hostile_file, tmp_path, capsys):
    out = tmp_path / "export"
    assert main(["export", str(hostile_file), str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert "hostile.parquet" in err and "'../escaped.txt'" in err and "side file" in err
    assert not out.exists() and not (tmp_path / "escaped.txt").exists()
    _nothing_outside(hostile_file.parent)


def test_the_tokenizer_of_a_hostile_file_is_refused_before_anything_is_written(hostile_file):
    loader = WeightLoaderV2(hostile_file)
    with pytest.raises(StoreError, match="escaped"):
        loader.tokenizer()
    _nothing_outside(hostile_file.parent)


def test_inspect_verify_reports_the_hostile_names(hostile_file, capsys):
    assert main(["inspect", str(hostile_file), "--verify"]) != 0
    out = capsys.readouterr()
    assert "../escaped.txt" in out.out + out.err


def test_a_shard_layout_naming_a_path_is_refused_on_export(store_file, tmp_path, capsys):
    layout = json.loads(WeightLoaderV2(store_file).metadata[S.META_LAYOUT])
    layout["shards"] = {"../../evil.safetensors": [n for names_ in layout["shards"].values() for n in names_]}
    bad = rewrite_footer(store_file, tmp_path / "bad.parquet", {S.META_LAYOUT: json.dumps(layout)})
    assert main(["export", str(bad), str(tmp_path / "out"), "-q"]) == 2
    assert "shard '../../evil.safetensors'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path.parent / "evil.safetensors").exists()


def test_an_index_naming_a_shard_outside_the_directory_is_refused(qwen3_dir, tmp_path):
    import shutil

    src = tmp_path / "model"
    shutil.copytree(qwen3_dir, src)
    (src / "model.safetensors").rename(tmp_path / "outside.safetensors")
    from safetensors import safe_open

    with safe_open(tmp_path / "outside.safetensors", "pt") as f:
        keys = list(f.keys())
    (src / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: "../outside.safetensors" for k in keys}}))
    with pytest.raises(StoreError, match="shard '../outside.safetensors'"):
        HuggingFaceToParquetConverter(progress=False).convert(src, tmp_path / "out.parquet")
    assert not (tmp_path / "out.parquet").exists()


def test_side_files_that_are_not_base64_are_one_clear_error(store_file, tmp_path):
    bad = rewrite_footer(store_file, tmp_path / "b64.parquet", {S.META_FILES: json.dumps({"tokenizer.json": "%%%"})})
    with pytest.raises(StoreError, match="tokenizer.json.*base64"):
        WeightLoaderV2(bad).files


# --- run names and exit codes ---------------------------------------------------------------------------


def test_a_run_name_that_is_a_path_is_refused_before_anything_runs(tmp_path):
    from llm_workbook.workbook.parameters import ParameterError, check_parameters

    for bad in ("../../x", "/abs", "-rf", "a/b"):
        with pytest.raises(ParameterError, match="run name"):
            check_parameters({"run": bad, "model": "builtin:smollm2", "reference": "builtin:smollm2"}, "p.yaml")


def test_a_run_name_made_from_a_path_is_a_safe_file_name():
    from llm_workbook.cli import _run_name

    assert _run_name("/tmp/x/model.parquet") == "tmp-x-model"
    assert _run_name("builtin:smollm2/ptq-int4") == "smollm2-ptq-int4"
    assert not _run_name("-tmp/--x").startswith("-")


def test_evaluate_exits_non_zero_when_its_only_run_could_not_be_evaluated(tmp_path, capsys):
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"PAR1 this is not a parquet file PAR1")
    code = main(["evaluate", str(junk), "--reference", str(junk), "--run", "junk", "--reports", str(tmp_path / "reports"), "-q",
                 "-p", "measure_perf", "false"])
    out = capsys.readouterr()
    assert code == 1, out
    assert "could not be evaluated" in out.err
    record = json.loads((tmp_path / "reports" / "junk.json").read_text())
    assert record["status"] == "error" and "not a readable weight-store Parquet file" in record["error"]


def test_an_unknown_model_id_is_exit_status_2(tmp_path, capsys):
    assert main(["evaluate", "builtin:no-such-model", "--reference", "builtin:smollm2",
                 "--reports", str(tmp_path)]) == 2
    assert "no-such-model" in capsys.readouterr().err


def test_exit_status_counts_documented_errors_as_evaluated():
    from llm_workbook.workbook.run import RunOutcome, exit_status

    def outcome(status, expected=False):
        return RunOutcome("r", status, Path("r.ipynb"), None, Path("r.json"), "", expected)

    assert exit_status([outcome("passed"), outcome("failed-check"), outcome("skipped")]) == 0
    assert exit_status([outcome("passed"), outcome("error")]) == 1
    assert exit_status([outcome("error", expected=True)]) == 0


# --- sizes are checked before they are believed ---------------------------------------------------------


def rewrite_rows(src: Path, dst: Path, change) -> Path:
    """A copy of ``src`` with ``change(table, row_group) -> table`` applied to every row group (footer kept)."""
    file = pq.ParquetFile(src)
    with pq.ParquetWriter(dst, file.schema_arrow, compression="none", write_page_checksum=True) as writer:
        for i in range(file.num_row_groups):
            writer.write_table(change(file.read_row_group(i), i))
    return dst


def _set(table, column: str, row: int, value):
    import pyarrow as pa

    values = table.column(column).to_pylist()
    values[row] = value
    index = table.schema.get_field_index(column)
    return table.set_column(index, table.schema.field(index), pa.array(values, table.schema.field(index).type))


def _peak_growth_mb(fn) -> float:
    """MB the process's peak RSS grew while ``fn`` ran (ru_maxrss only rises: a lower bound of use)."""
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024


def test_a_row_claiming_a_terabyte_is_refused_before_memory_is_allocated(store_file, tmp_path):
    loader = WeightLoaderV2(store_file)
    name = next(n for n, i in loader.rows.items() if i.nbytes > 1000)

    def claim_a_terabyte(table, _):
        names_ = table.column(S.LAYER_NAME).to_pylist()
        return _set(table, S.NBYTES, names_.index(name), 2**40) if name in names_ else table

    bad = rewrite_rows(store_file, tmp_path / "tb.parquet", claim_a_terabyte)

    def read():
        with pytest.raises(StoreError, match=f"tb.parquet: tensor {name!r}"):
            WeightLoaderV2(bad).load_tensor(name)

    assert _peak_growth_mb(read) < 200


def test_a_compression_bomb_is_refused_from_the_footer(tmp_path):
    import pyarrow as pa

    from llm_workbook.store.writer import StoreWriter
    from llm_workbook.formats.base import Row
    import torch

    good = tmp_path / "good.parquet"
    with StoreWriter(good) as writer:
        writer.write(Row("model.zeros.weight", torch.zeros(4 << 20, dtype=torch.uint8), "dense", {}))
        writer.commit({})
    file = pq.ParquetFile(good)
    bomb = tmp_path / "bomb.parquet"
    with pq.ParquetWriter(bomb, file.schema_arrow, compression="zstd") as writer:
        writer.write_table(file.read().replace_schema_metadata(file.schema_arrow.metadata))
    assert bomb.stat().st_size < 100_000
    with pytest.raises(StoreError, match="bomb.parquet: column 'data' of row group 0 claims to inflate"):
        WeightLoaderV2(bomb)
    assert pa.total_allocated_bytes() < 64 << 20


def test_a_quantized_row_whose_shape_promises_more_weights_than_its_bytes_is_refused(tmp_path, qwen3_dir):
    from llm_workbook.quantize.run import quantize

    out = tmp_path / "int4.parquet"
    quantize(qwen3_dir, out, method="int4", progress=False)
    loader = WeightLoaderV2(out)
    layer = next(i.layer_name for i in loader.rows.values() if "weight_shape" in i.params)

    def claim_more(table, _):
        for row, name in enumerate(table.column(S.LAYER_NAME).to_pylist()):
            if name.startswith(layer + ".") and "weight_shape" in (params := json.loads(table.column(S.PARAMS)[row].as_py())):
                table = _set(table, S.PARAMS, row, S.params_json({**params, "weight_shape": [10**6, 10**6]}))
        return table

    bad = rewrite_rows(out, tmp_path / "claims.parquet", claim_more)
    with pytest.raises(StoreError, match=r"claims weight_shape \[1000000, 1000000\]"):
        WeightLoaderV2(bad).load_weight(layer, "weight")


def test_a_safetensors_header_claiming_more_than_the_file_is_one_error(qwen3_dir, tmp_path):
    import shutil
    import struct

    src = tmp_path / "model"
    shutil.copytree(qwen3_dir, src)
    data = bytearray((src / "model.safetensors").read_bytes())
    data[:8] = struct.pack("<Q", 2**40)  # a 1 TB header
    (src / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(StoreError, match="model.safetensors: not a readable safetensors file"):
        HuggingFaceToParquetConverter(progress=False).convert(src, tmp_path / "o.parquet")


def test_an_aios_row_whose_shape_disagrees_with_its_bytes_names_the_tensor(tmp_path):
    src = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "aios" / "v1_fp32.parquet"
    if not src.exists():
        pytest.skip("AI-OS fixtures not present")
    table = pq.read_table(src)
    shapes = table.column("shape").to_pylist()
    shapes[0] = [2**20, 2**20]
    import pyarrow as pa

    index = table.schema.get_field_index("shape")
    table = table.set_column(index, table.schema.field(index), pa.array(shapes, table.schema.field(index).type))
    bad = tmp_path / "v1.parquet"
    pq.write_table(table, bad)
    name = table.column("layer_name")[0].as_py()
    with pytest.raises(StoreError, match=f"v1.parquet: tensor {name!r} holds .* bytes, but shape"):
        WeightLoaderV2(bad).load_tensor(name)
