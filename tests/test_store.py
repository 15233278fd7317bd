"""The lossless store: convert -> Parquet -> export / WeightLoaderV2 / model, on real and seeded checkpoints."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from llm_workbook import HuggingFaceToParquetConverter, StoreError, WeightLoaderV2, export_to_hf
from llm_workbook import schema as S
from llm_workbook.runtime.model import model_from_parquet


LLMC = [sys.executable, "-m", "llm_workbook"]


def all_tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def assert_bit_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        assert torch.equal(a[name].contiguous().view(torch.uint8), b[name].contiguous().view(torch.uint8)), name


def convert(src, out) -> Path:
    HuggingFaceToParquetConverter(progress=False).convert(src, out)
    return Path(out)


@pytest.mark.parametrize("fixture", ["qwen3_dir", "llama_sharded_dir"])
def test_round_trip_bit_exact_and_self_contained(fixture, request, tmp_path):
    src: Path = request.getfixturevalue(fixture)
    parquet = convert(src, tmp_path / "m.parquet")
    out = export_to_hf(parquet, tmp_path / "exported", progress=False)
    assert_bit_equal(all_tensors(src), all_tensors(out))
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    if (src / "model.safetensors.index.json").exists():
        src_map = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
        out_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
        assert src_map == out_map and len(set(src_map.values())) > 1
    # the exported directory is a normal transformers checkpoint
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 2


@pytest.mark.parametrize("fixture", ["qwen3_dir", "llama_sharded_dir"])
def test_model_from_parquet_logits_equal_original(fixture, request, tmp_path):
    import transformers

    src = request.getfixturevalue(fixture)
    parquet = convert(src, tmp_path / "m.parquet")
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(3))
    for dtype in (torch.float32, torch.bfloat16):
        ref = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=dtype).eval()
        ours = model_from_parquet(parquet, dtype=dtype)
        with torch.inference_mode():
            diff = (ref(ids).logits - ours(ids).logits).abs().max().item()
        print(f"{fixture} {dtype}: max |logit diff| = {diff}")
        assert diff == 0.0


def test_tokenizer_travels_inside_the_file(qwen3_dir, tmp_path):
    parquet = convert(qwen3_dir, tmp_path / "m.parquet")
    loader = WeightLoaderV2(parquet)
    tok = loader.tokenizer()
    assert tok("w5 w6 w7")["input_ids"] == [5, 6, 7]
    assert loader.config["model_type"] == "qwen3"
    assert json.loads(loader.generation_config_text)["eos_token_id"] == 3


def test_minilm_real_weights_round_trip_and_embeddings(minilm_dir, tmp_path):
    import transformers

    parquet = convert(minilm_dir, tmp_path / "minilm.parquet")
    out = export_to_hf(parquet, tmp_path / "exported", progress=False)
    assert_bit_equal(all_tensors(minilm_dir), all_tensors(out))
    for side in ("modules.json", "sentence_bert_config.json", "vocab.txt", "tokenizer.json"):
        assert (out / side).read_bytes() == (minilm_dir / side).read_bytes()

    tok = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    batch = tok(["A cat sits on the mat.", "Parquet stores columns."], padding=True, return_tensors="pt")
    ref = transformers.AutoModel.from_pretrained(minilm_dir).eval()
    ours = model_from_parquet(parquet, task="base")
    with torch.inference_mode():
        a = ref(**batch).last_hidden_state
        b = ours(**batch).last_hidden_state
    assert a.shape[-1] == 384
    assert torch.equal(a, b)


def test_lazy_load_reads_only_that_tensor(qwen3_dir, tmp_path, monkeypatch):
    parquet = convert(qwen3_dir, tmp_path / "m.parquet")
    loader = WeightLoaderV2(parquet)
    calls = []
    original = WeightLoaderV2._read_payload

    def spy(self, tensor_name, info):
        calls.append(tensor_name)
        return original(self, tensor_name, info)

    monkeypatch.setattr(WeightLoaderV2, "_read_payload", spy)
    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", lambda *a, **k: pytest.fail("payload read through pyarrow"))
    w = loader.load_weight("model.layers.1.mlp.down_proj", "weight")
    assert calls == ["model.layers.1.mlp.down_proj.weight"]
    ref = load_file(qwen3_dir / "model.safetensors")["model.layers.1.mlp.down_proj.weight"]
    assert torch.equal(w, ref) and w.dtype == torch.bfloat16
    sd = loader.state_dict()
    assert len(calls) == 1  # building the mapping reads nothing
    assert loader.load_weight("model.layers.1.mlp.down_proj", "weight", dtype=torch.float32).dtype == torch.float32
    assert set(sd) == set(load_file(qwen3_dir / "model.safetensors"))


def test_large_tensor_split_into_chunks(qwen3_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(S, "CHUNK_BYTES", 10_000)
    parquet = convert(qwen3_dir, tmp_path / "m.parquet")
    loader = WeightLoaderV2(parquet)
    info = loader.rows["model.embed_tokens.weight"]
    assert len(info.row_groups) == -(-info.nbytes // 10_000) > 1
    assert_bit_equal(dict(loader.source_tensors()), all_tensors(qwen3_dir))
    assert pq.ParquetFile(parquet).schema_arrow.field(S.DATA).type == pa.binary()  # AI-OS V2 type


def test_hub_id_resolves_from_local_cache(qwen3_dir, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snapshot = cache / "models--acme--tiny-qwen3" / "snapshots" / ("a" * 40)
    shutil.copytree(qwen3_dir, snapshot)
    (cache / "models--acme--tiny-qwen3" / "refs").mkdir(parents=True)
    (cache / "models--acme--tiny-qwen3" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    parquet = convert("acme/tiny-qwen3", tmp_path / "hub.parquet")
    assert_bit_equal(dict(WeightLoaderV2(parquet).source_tensors()), all_tensors(qwen3_dir))
    with pytest.raises(StoreError, match="hf download acme/not-cached"):
        convert("acme/not-cached", tmp_path / "x.parquet")
    assert not (tmp_path / "x.parquet").exists()


# --- bad input: non-zero exit, one line naming the file (and tensor), no partial output ---------

def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(LLMC + [str(a) for a in args], capture_output=True, text=True, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})


def assert_clean_failure(result: subprocess.CompletedProcess, *must_name: str, out: Path | None = None):
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for text in must_name:
        assert text in lines[0], (text, lines[0])
    if out is not None:
        assert not out.exists()
        assert not list(out.parent.glob(f".{out.name}*"))


def test_bad_truncated_safetensors(qwen3_dir, tmp_path):
    src = tmp_path / "trunc"
    shutil.copytree(qwen3_dir, src)
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    out = tmp_path / "o.parquet"
    assert_clean_failure(run_cli("convert", src, out, "-q"), "model.safetensors", out=out)


def test_bad_missing_shard(llama_sharded_dir, tmp_path):
    src = tmp_path / "sharded"
    shutil.copytree(llama_sharded_dir, src)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (src / shard).unlink()
    out = tmp_path / "o.parquet"
    assert_clean_failure(run_cli("convert", src, out, "-q"), shard, "tensor", out=out)


def test_bad_config_not_json(qwen3_dir, tmp_path):
    src = tmp_path / "badcfg"
    shutil.copytree(qwen3_dir, src)
    (src / "config.json").write_text("{ not json")
    out = tmp_path / "o.parquet"
    assert_clean_failure(run_cli("convert", src, out, "-q"), "config.json", out=out)


def test_bad_output_directory_missing(qwen3_dir, tmp_path):
    out = tmp_path / "missing" / "o.parquet"
    assert_clean_failure(run_cli("convert", qwen3_dir, out, "-q"), str(out))
    assert not out.parent.exists()


def test_bad_pickle_refused_unless_allowed(qwen3_dir, tmp_path):
    src = tmp_path / "pickled"
    src.mkdir()
    shutil.copy(qwen3_dir / "config.json", src / "config.json")
    torch.save(load_file(qwen3_dir / "model.safetensors"), src / "pytorch_model.bin")
    out = tmp_path / "o.parquet"
    assert_clean_failure(run_cli("convert", src, out, "-q"), "pytorch_model.bin", "--allow-pickle", out=out)
    assert run_cli("convert", src, out, "-q", "--allow-pickle").returncode == 0
    assert_bit_equal(dict(WeightLoaderV2(out).source_tensors()), load_file(qwen3_dir / "model.safetensors"))


def test_bad_nan_weight(qwen3_dir, tmp_path):
    src = tmp_path / "nan"
    shutil.copytree(qwen3_dir, src)
    tensors = load_file(src / "model.safetensors")
    tensors["model.norm.weight"][3] = float("nan")
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "o.parquet"
    assert_clean_failure(run_cli("convert", src, out, "-q"), "model.norm.weight", "NaN", out=out)


def _rewrite(parquet: Path, dest: Path, edit) -> None:
    """Copy a store file row group by row group, applying ``edit(table) -> table``; keeps the metadata."""
    source = pq.ParquetFile(parquet)
    writer = pq.ParquetWriter(dest, S.STORE_SCHEMA, compression="none", use_dictionary=False)
    for i in range(source.num_row_groups):
        writer.write_table(edit(source.read_row_group(i)), row_group_size=1)
    writer.add_key_value_metadata({k.decode(): v.decode() for k, v in source.metadata.metadata.items() if k.startswith(b"llmc.")})
    writer.close()


def test_bad_checksum_mismatch(qwen3_dir, tmp_path):
    parquet = convert(qwen3_dir, tmp_path / "m.parquet")
    target = "model.layers.0.mlp.up_proj.weight"

    def flip(table):
        if table.column(S.LAYER_NAME)[0].as_py() != target:
            return table
        data = bytearray(table.column(S.DATA)[0].as_py())
        data[100] ^= 0x01
        return table.set_column(table.schema.get_field_index(S.DATA), S.DATA, pa.array([bytes(data)], pa.binary()))

    bad = tmp_path / "bad.parquet"
    _rewrite(parquet, bad, flip)
    with pytest.raises(StoreError, match="checksum mismatch for tensor 'model.layers.0.mlp.up_proj.weight'"):
        WeightLoaderV2(bad).load_weight("model.layers.0.mlp.up_proj", "weight")
    result = run_cli("inspect", bad, "--verify")
    assert result.returncode != 0 and target in result.stdout and "1 FAILED" in result.stdout
    assert run_cli("inspect", parquet, "--verify").returncode == 0
    out = tmp_path / "exported"
    assert_clean_failure(run_cli("export", bad, out, "-q"), str(bad), target)
    assert not out.exists()


def test_bad_corrupted_parquet_page(qwen3_dir, tmp_path):
    parquet = convert(qwen3_dir, tmp_path / "m.parquet")
    loader = WeightLoaderV2(parquet)
    target = "model.layers.1.mlp.gate_proj.weight"
    rg = loader.rows[target].row_groups[0]
    meta = pq.ParquetFile(parquet).metadata
    col = meta.row_group(rg).column(S.STORE_SCHEMA.get_field_index(S.DATA))
    offset = col.data_page_offset + col.total_compressed_size // 2
    raw = bytearray(parquet.read_bytes())
    raw[offset] ^= 0xFF
    bad = tmp_path / "corrupt.parquet"
    bad.write_bytes(bytes(raw))
    with pytest.raises(StoreError) as info:
        WeightLoaderV2(bad).load_weight("model.layers.1.mlp.gate_proj", "weight")
    assert str(bad) in str(info.value) and target in str(info.value)
    # every other tensor still reads
    other = WeightLoaderV2(bad).load_weight("model.layers.0.mlp.gate_proj", "weight")
    assert other.shape == (256, 128)


def test_bad_not_a_parquet_file(tmp_path):
    path = tmp_path / "junk.parquet"
    path.write_bytes(b"not parquet at all")
    result = run_cli("inspect", path)
    assert_clean_failure(result, str(path))


def test_cli_help_everywhere():
    for args in ([], ["convert"], ["export"], ["inspect"]):
        result = run_cli(*args, "--help")
        assert result.returncode == 0 and "usage: llmc" in result.stdout


def test_inspect_lists_every_tensor(qwen3_dir, tmp_path):
    parquet = convert(qwen3_dir, tmp_path / "m.parquet")
    result = run_cli("inspect", parquet, "--verify", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    with safe_open(qwen3_dir / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert {t["name"] for t in report["tensors"]} == names
    assert report["summary"]["checksums"] == "all verify"
    assert report["summary"]["bits_per_weight"] == 16.0


def test_loaded_tensors_are_private_copy_on_write(qwen3_dir, tmp_path):
    parquet = convert(qwen3_dir, tmp_path / "m.parquet")
    before = parquet.read_bytes()
    name = "model.layers.0.mlp.up_proj.weight"
    ref = load_file(qwen3_dir / "model.safetensors")[name]
    loader = WeightLoaderV2(parquet)
    first = loader.load_tensor(name)
    first.mul_(2)  # writable, like any tensor
    assert not torch.equal(first, ref)
    assert torch.equal(loader.load_tensor(name), ref)  # a second read does not see the write
    assert parquet.read_bytes() == before  # nor does the file


def test_payload_layouts_other_than_ours_still_load(tmp_path, monkeypatch):
    """Multi-chunk arrays, empty arrays and compressed files (written by other tools) read bit-exactly."""
    monkeypatch.setattr(S, "CHUNK_BYTES", 1000)
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "custom"}))
    torch.manual_seed(3)
    tensors = {"a.weight": torch.randn(37, 91).to(torch.bfloat16), "b.bias": torch.randn(3), "c.weight": torch.empty(0, 4)}
    save_file(tensors, src / "model.safetensors")
    parquet = convert(src, tmp_path / "m.parquet")
    assert len(WeightLoaderV2(parquet).rows["a.weight"].row_groups) == 7
    zstd = tmp_path / "zstd.parquet"
    source = pq.ParquetFile(parquet)
    writer = pq.ParquetWriter(zstd, S.STORE_SCHEMA, compression="zstd")
    for i in range(source.num_row_groups):
        writer.write_table(source.read_row_group(i), row_group_size=1)
    writer.add_key_value_metadata({k.decode(): v.decode() for k, v in source.metadata.metadata.items() if k.startswith(b"llmc.")})
    writer.close()
    for path in (parquet, zstd):
        loaded = {name: WeightLoaderV2(path).load_tensor(name) for name in tensors}
        assert_bit_equal(loaded, tensors)


def test_convert_does_not_import_pandas(qwen3_dir, tmp_path):
    code = (
        "import sys\n"
        "from llm_workbook import HuggingFaceToParquetConverter\n"
        f"HuggingFaceToParquetConverter(progress=False).convert({str(qwen3_dir)!r}, {str(tmp_path / 'm.parquet')!r})\n"
        "print('pandas' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
