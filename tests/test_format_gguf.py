"""GGUF as a lossless source and target, checked against gguf-py and transformers' own GGUF loading."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from gguf_fixtures import LAYER_TYPES, write_tiny_llama

gguf = pytest.importorskip("gguf")
pytest.importorskip("accelerate", reason="transformers' GGUF loading needs accelerate")

from llm_workbook import HuggingFaceToParquetConverter, StoreError, WeightLoaderV2  # noqa: E402
from llm_workbook.store.inventory import entries, summary  # noqa: E402
from llm_workbook.cli import main  # noqa: E402
from llm_workbook.store.gguf import export_gguf  # noqa: E402
from llm_workbook.runtime.model import model_from_parquet  # noqa: E402


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def convert(src: Path, out: Path, **kwargs) -> WeightLoaderV2:
    HuggingFaceToParquetConverter(progress=False, **kwargs).convert(src, out)
    return WeightLoaderV2(out)


def transformers_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, WeightLoaderV2]:
    root = tmp_path_factory.mktemp("gguf")
    src = write_tiny_llama(root / "tiny.gguf")
    return src, convert(src, root / "tiny.parquet")


def test_weights_equal_transformers_gguf_loading(tiny):
    src, loader = tiny
    reference = transformers_model(src).state_dict()
    types = set()
    for name in loader.keys():
        layer, weight = name.rsplit(".", 1)
        ours = loader.load_weight(layer, weight)
        assert ours.dtype == torch.float32
        assert torch.equal(ours, reference[name]), name
        types.add(loader.rows[name].params["ggml_type_name"])
    expected = {t for layer in LAYER_TYPES for t in layer.values()} | {"F32", "Q8_0", "Q6_K"}
    assert types == expected
    assert "lm_head.weight" in loader.keys()  # untied output stored under its transformers name


def test_qk_permutation_reversed_as_transformers_does(tiny):
    src, loader = tiny
    record = loader.load_weight("model.layers.0.self_attn.q_proj", "weight", dequantize=False)
    assert record.format == "gguf" and record.params["ggml_type_name"] == "Q4_0"
    raw = record.tensors["weight"]
    assert raw.dtype == torch.uint8 and raw.numel() == 256 * 256 // 32 * 18  # Q4_0: 18 bytes per 32 weights
    plain = gguf.quants.dequantize(raw.numpy().reshape(256, -1), gguf.GGMLQuantizationType.Q4_0)
    assert not np.array_equal(plain, loader.load_weight("model.layers.0.self_attn.q_proj", "weight").numpy())


def test_logits_equal_transformers(tiny):
    src, loader = tiny
    ids = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model_from_parquet(loader)(ids).logits
        theirs = transformers_model(src)(ids).logits
    assert torch.equal(ours, theirs)


def test_export_gguf_is_byte_identical(tiny, tmp_path):
    src, loader = tiny
    out = tmp_path / "back.gguf"
    assert export_gguf(loader.path, out) == []
    assert sha256(out) == sha256(src)


def test_invalid_utf8_strings_round_trip(tmp_path):
    src = write_tiny_llama(tmp_path / "bytes.gguf", invalid_utf8=True)
    loader = convert(src, tmp_path / "bytes.parquet")
    meta = json.loads(loader.metadata["llmc.gguf"])
    raw = next(item for item in meta["kv"] if item["key"] == "test.raw_bytes")
    assert raw["type"] == "STRING" and "base64" in raw["value"]
    assert loader.config["model_type"] == "llama"  # built from a sanitized copy transformers can parse
    assert main(["export", str(loader.path), str(tmp_path / "back.gguf"), "--format", "gguf", "-q"]) == 0
    assert sha256(tmp_path / "back.gguf") == sha256(src)


def test_inspect_shows_ggml_type_and_real_bits(tiny, capsys):
    _, loader = tiny
    by_name = {e.name: e for e in entries(loader)}
    assert by_name["model.layers.0.self_attn.q_proj.weight"].dtype == "Q4_0"
    assert by_name["model.layers.0.self_attn.q_proj.weight"].bits_per_weight == pytest.approx(4.5)
    assert by_name["model.layers.1.self_attn.k_proj.weight"].bits_per_weight == pytest.approx(6.5625)  # Q6_K
    assert by_name["model.norm.weight"].bits_per_weight == 32.0
    info = summary(loader)
    assert info["formats"] == ["gguf"] and info["quantized_tensors"] == 14  # 21 less 5 F32 norms, F16 and BF16
    assert main(["inspect", str(loader.path), "--verify"]) == 0
    assert "Q4_K" in capsys.readouterr().out


def test_parquet_overhead_is_small(tiny):
    src, loader = tiny  # a fixed ~3 KB per tensor (row group, index entry) plus the key-values
    assert loader.path.stat().st_size <= src.stat().st_size + 100_000


def test_hf_export_loads_in_transformers(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    src, loader = tiny
    assert main(["export", str(loader.path), str(tmp_path / "hf"), "-q"]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    reference = transformers_model(src).state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reference[name]), name


def test_gguf_file_inside_directory_and_hub_cache(tiny, tmp_path, monkeypatch):
    src, loader = tiny
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(src, repo / "model-Q4.gguf")
    with pytest.raises(StoreError, match="--gguf-file"):
        convert(repo, tmp_path / "a.parquet")
    assert not (tmp_path / "a.parquet").exists()
    first = convert(repo, tmp_path / "b.parquet", gguf_file="model-Q4.gguf")
    assert first.stored_keys() == loader.stored_keys()
    # A hub id resolved offline from a filled Hugging Face cache (snapshot_download's real code path).
    cache = tmp_path / "hub"
    snapshot = cache / "models--owner--tiny-GGUF" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    shutil.copy(src, snapshot / "model-Q4.gguf")
    (cache / "models--owner--tiny-GGUF" / "refs").mkdir()
    (cache / "models--owner--tiny-GGUF" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    hub = convert("owner/tiny-GGUF", tmp_path / "c.parquet", gguf_file="model-Q4.gguf")
    assert hub.source["source"] == "owner/tiny-GGUF"
    assert torch.equal(hub.load_tensor("model.layers.1.self_attn.q_proj.weight"),
                       loader.load_tensor("model.layers.1.self_attn.q_proj.weight"))


# ----------------------------------------------------------------------------- bad input


def _tensor_type_offset(path: Path, name: str) -> int:
    """File offset of one tensor's GGML type id in the tensor-info table."""
    reader = gguf.GGUFReader(path)
    for tensor in reader.tensors:
        if tensor.name == name:
            return int(tensor.field.offset) + sum(p.nbytes for p in tensor.field.parts[:4])
    raise KeyError(name)


def _assert_refused(src: Path, out: Path, match: str) -> None:
    with pytest.raises(StoreError, match=match):
        HuggingFaceToParquetConverter(progress=False).convert(src, out)
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*"))
    assert main(["convert", str(src), str(out), "-q"]) == 2


def test_unknown_type_id_is_one_error(tmp_path):
    src = write_tiny_llama(tmp_path / "t.gguf")
    data = bytearray(src.read_bytes())
    at = _tensor_type_offset(src, "blk.0.attn_q.weight")
    data[at:at + 4] = struct.pack("<I", 99)
    src.write_bytes(bytes(data))
    _assert_refused(src, tmp_path / "t.parquet", "t.gguf: tensor 'blk.0.attn_q.weight' .*type id 99, which gguf-py .* does not know")


def test_reused_type_id_with_other_block_size_is_caught(tmp_path):
    # The Hy-MT 2-bit trap: a type id whose size gguf-py computes differently from the writer's.
    # Relabel a Q8_0 tensor (34 bytes per 32) as Q4_0 (18 bytes per 32): gguf-py opens the file and hands
    # out a truncated array unless the offsets are checked.
    src = write_tiny_llama(tmp_path / "t.gguf")
    data = bytearray(src.read_bytes())
    at = _tensor_type_offset(src, "blk.0.ffn_gate.weight")
    data[at:at + 4] = struct.pack("<I", int(gguf.GGMLQuantizationType.Q4_0))
    src.write_bytes(bytes(data))
    gguf.GGUFReader(src)  # gguf-py itself does not notice
    _assert_refused(src, tmp_path / "t.parquet", "'blk.0.ffn_gate.weight' \\(Q4_0, .* bytes before the next tensor")


def test_truncated_file_is_one_error(tmp_path):
    src = write_tiny_llama(tmp_path / "t.gguf")
    src.write_bytes(src.read_bytes()[:-5000])
    _assert_refused(src, tmp_path / "t.parquet", "t.gguf: .*truncated")


def test_shape_disagreeing_with_head_count_is_one_error(tmp_path):
    src = write_tiny_llama(tmp_path / "t.gguf", head_count=3)  # 256 rows do not split into 3 heads
    _assert_refused(src, tmp_path / "t.parquet", "'blk.0.attn_q.weight' has 256 rows.*3 heads")


def test_export_refuses_a_non_gguf_file(qwen3_dir, tmp_path):
    convert(qwen3_dir, tmp_path / "q.parquet")
    with pytest.raises(StoreError, match="not converted from a GGUF"):
        export_gguf(tmp_path / "q.parquet", tmp_path / "q.gguf")
    assert not (tmp_path / "q.gguf").exists()


# ----------------------------------------------------------------------------- the real SmolLM2 file


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> tuple[Path, WeightLoaderV2]:
    from llm_workbook.workbook.builtins import BuiltinError, smollm2_gguf_path

    try:
        src = smollm2_gguf_path()
    except BuiltinError as exc:
        pytest.skip(str(exc))
    return src, convert(src, tmp_path_factory.mktemp("smol") / "smollm2.parquet")


@pytest.mark.slow
def test_real_smollm2_round_trips_byte_for_byte(smollm2, tmp_path):
    src, loader = smollm2
    assert main(["export", str(loader.path), str(tmp_path / "back.gguf"), "--format", "gguf", "-q"]) == 0
    assert sha256(tmp_path / "back.gguf") == sha256(src)
    assert loader.path.stat().st_size <= 1.02 * src.stat().st_size


@pytest.mark.slow
def test_real_smollm2_matches_transformers(smollm2):
    src, loader = smollm2
    model = transformers_model(src)
    reference = model.state_dict()
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                 "model.layers.0.self_attn.k_proj.weight", "model.layers.29.mlp.down_proj.weight", "model.norm.weight"):
        layer, weight = name.rsplit(".", 1)
        assert torch.equal(loader.load_weight(layer, weight), reference[name]), name
    tokenizer = loader.tokenizer()
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model_from_parquet(loader)(ids).logits, model(ids).logits)


# ----------------------------------------------------------------------------- type ids that collide


def _file_with_type(path: Path, type_id: int, rows: int, cols: int, nbytes: int) -> Path:
    """A GGUF whose first tensor (rows x cols) has type id ``type_id`` and ``nbytes`` bytes of data, followed by
    an F32 tensor: written by gguf-py as raw int8 bytes, then relabelled in the tensor-info table."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_file_type(7)
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((rows, nbytes // rows), dtype=np.int8))
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(cols, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reader = gguf.GGUFReader(path)
    field = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight").field
    dims_at = int(field.offset) + sum(p.nbytes for p in field.parts[:3])
    data = bytearray(path.read_bytes())
    data[dims_at:dims_at + 8] = struct.pack("<Q", cols)
    type_at = dims_at + field.parts[3].nbytes
    data[type_at:type_at + 4] = struct.pack("<I", type_id)
    path.write_bytes(bytes(data))
    return path


ROWS, COLS = 256, 2048
COLLISIONS = [  # (type id, bytes the writer used, what the error must name)
    (41, ROWS * (2 + COLS // 4), "Tencent 2-bit .*Hy-MT.*reads id 41 as Q1_0"),
    (42, ROWS * COLS // 64 * 18, "Q2_0, written by mainline ggml"),
    (42, ROWS * COLS // 256 * 42, "STQ1_0, written by Tencent's Sherry"),
    (43, ROWS * COLS // 256 * 42, "STQ1_0, written by Tencent's Sherry"),
    (44, ROWS * COLS // 512 * 130, "q2_0c, written by AngelSlim's HY-1.8B-2Bit"),
    (41, ROWS * COLS // 512 * 130, "q2_0c"),
]


@pytest.mark.parametrize("type_id, nbytes, names", COLLISIONS)
def test_a_type_id_is_established_by_its_span_and_a_foreign_layout_is_refused_by_name(tmp_path, type_id, nbytes,
                                                                                        names):
    from llm_workbook.store.gguf import open_gguf

    src = _file_with_type(tmp_path / "t.gguf", type_id, ROWS, COLS, nbytes)
    with pytest.raises(StoreError, match=f"t.gguf: tensor 'blk.0.attn_q.weight' \\(256x2048\\) has GGML type id "
                                         f"{type_id} and {nbytes} bytes: that is {names}.*general.file_type 7"):
        open_gguf(src)
    _assert_refused(src, tmp_path / "t.parquet", "refused rather than read with the wrong block size")


def test_id_41_with_mainline_q1_0_spans_is_read_as_q1_0(tmp_path):
    from llm_workbook.store.gguf import _open_reader

    src = _file_with_type(tmp_path / "t.gguf", 41, ROWS, COLS, ROWS * COLS // 128 * 18)
    reader = _open_reader(src, gguf)
    assert reader.tensors[0].tensor_type.name == "Q1_0" and int(reader.tensors[0].n_bytes) == ROWS * COLS // 128 * 18


def test_a_tensor_claiming_more_bytes_than_the_file_has_is_refused_without_reading(tmp_path):
    src = _file_with_type(tmp_path / "t.gguf", 8, ROWS, COLS, ROWS * COLS // 32 * 34)  # Q8_0
    data = bytearray(src.read_bytes())
    reader = gguf.GGUFReader(src)
    field = reader.tensors[0].field
    dims_at = int(field.offset) + sum(p.nbytes for p in field.parts[:3])
    data[dims_at + 8:dims_at + 16] = struct.pack("<Q", 2**40)  # 2^40 rows: petabytes claimed
    src.write_bytes(bytes(data))
    _assert_refused(src, tmp_path / "t.parquet", "t.gguf: tensor 'blk.0.attn_q.weight'")
