"""The readers a hostile weight file reaches, as fuzz targets: bytes in, a correct read or one StoreError out.

Each target writes the bytes where its reader expects a file and reads everything a command would read
(index, footer names, every tensor, every dequantized weight). Any other exception is a bug: ``make fuzz``
(atheris, coverage-guided) reports it, and every input it ever found is kept under ``tests/fuzz_cases/``
and replayed by ``test_fuzz_cases.py``. Seeds are small real files of each kind, built deterministically.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from llm_workbook.errors import StoreError

HERE = Path(__file__).resolve().parent
CASES = HERE / "fuzz_cases"
AIOS_FIXTURES = HERE / "fixtures" / "aios"


# ----------------------------------------------------------------------------- targets


def _read_store(path: Path) -> None:
    from llm_workbook.store.loader import WeightLoaderV2

    loader = WeightLoaderV2(path)
    loader.files, loader.layout, loader.config  # noqa: B018 - what an export or a tokenizer load reads
    for name in loader.rows:
        loader.load_tensor(name)
    for layer in loader._groups:
        loader.load_weight(layer, "weight")
    for name in loader._per_tensor:
        layer, _, weight = name.rpartition(".")
        loader.load_weight(layer, weight)


def parquet(data: bytes) -> None:
    """Our weight-store files (schema 3 and 2.1)."""
    with _file(data, "model.parquet") as path:
        _read_store(path)


def aios(data: bytes) -> None:
    """AI-OS V1/V2 files, through our loader and through AI-OS's API (``llm_compression.inference``)."""
    from llm_compression.inference.weight_loader import WeightLoader

    with _file(data, "weights.parquet") as path:
        _read_store(path)
        loader = WeightLoader(str(path))
        loader.get_schema_version()
        loader.load_weights()


def gguf(data: bytes) -> None:
    """GGUF files, as ``llmc convert`` opens them."""
    from llm_workbook.store.gguf import open_gguf

    with _file(data, "model.gguf") as path:
        source = open_gguf(path)
        for tensor in source.reader.tensors:
            np.asarray(tensor.data).reshape(-1).view(np.uint8).sum()


def safetensors(data: bytes) -> None:
    """A checkpoint directory's safetensors file, as ``llmc convert`` opens it."""
    from llm_workbook.store.checkpoint import open_checkpoint

    with _file(data, "model.safetensors") as path:
        (path.parent / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
        checkpoint = open_checkpoint(path.parent)
        for name in checkpoint.tensors:
            checkpoint.read(name)


def inspect(data: bytes) -> None:
    """``llmc inspect --verify --json``: exit 0, 1 (problems found) or 2 (refused), never a traceback."""
    from llm_workbook.cli import main

    with _file(data, "model.parquet") as path, contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        code = main(["inspect", str(path), "--verify", "--json"])
    if code not in (0, 1, 2):
        raise AssertionError(f"llmc inspect exited {code}")


TARGETS = {"parquet": parquet, "aios": aios, "gguf": gguf, "safetensors": safetensors, "inspect": inspect}


def run(target: str, data: bytes) -> None:
    """One input through one target; StoreError is the correct refusal, anything else propagates."""
    try:
        TARGETS[target](data)
    except StoreError:
        pass


@contextlib.contextmanager
def _file(data: bytes, name: str):
    directory = Path(tempfile.mkdtemp(prefix="llmc-fuzz-"))
    try:
        path = directory / name
        path.write_bytes(data)
        yield path
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# ----------------------------------------------------------------------------- seeds


def seeds(target: str) -> list[bytes]:
    """Small valid inputs for a target (a few KB each: mutations reach headers and footers quickly)."""
    if target == "aios":
        return [p.read_bytes() for p in sorted(AIOS_FIXTURES.glob("*.parquet")) if p.stat().st_size < 64_000]
    if target == "gguf":
        return [_gguf_seed()]
    if target == "safetensors":
        return [_safetensors_seed()]
    return _store_seeds()


def _tensors() -> dict:
    import torch

    rng = np.random.default_rng(0)
    return {"model.embed_tokens.weight": torch.from_numpy(rng.standard_normal((16, 8)).astype(np.float32)).to(torch.bfloat16),
            "model.layers.0.mlp.up_proj.weight": torch.from_numpy(rng.standard_normal((8, 8)).astype(np.float32)),
            "model.norm.weight": torch.ones(8, dtype=torch.float16)}


def _safetensors_seed() -> bytes:
    from safetensors.torch import save

    return save(_tensors(), metadata={"format": "pt"})


def _store_seeds() -> list[bytes]:
    import torch

    from llm_workbook.formats import ptq as ptq_format
    from llm_workbook.formats.base import Row
    from llm_workbook.quantize.rtn import quantize_rtn
    from llm_workbook.store.convert import HuggingFaceToParquetConverter
    from llm_workbook.store.writer import StoreWriter

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "model"
        src.mkdir()
        (src / "model.safetensors").write_bytes(_safetensors_seed())
        (src / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 8}))
        (src / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
        dense = Path(tmp) / "dense.parquet"
        HuggingFaceToParquetConverter(progress=False).convert(src, dense)
        out = [dense.read_bytes()]
        codes = Path(tmp) / "ptq.parquet"
        with StoreWriter(codes) as writer:
            weight = _tensors()["model.layers.0.mlp.up_proj.weight"]
            for row in ptq_format.encode("model.layers.0.mlp.up_proj", quantize_rtn(weight, bits=4, group_size=4)):
                writer.write(row)
            writer.write(Row("model.norm.weight", torch.ones(8), "dense", {}))
            writer.commit({})
        out.append(codes.read_bytes())
    return out


def _gguf_seed() -> bytes:
    import gguf as gguf_py

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.gguf"
        writer = gguf_py.GGUFWriter(path, "llama")
        writer.add_block_count(1)
        writer.add_context_length(64)
        writer.add_embedding_length(32)
        writer.add_feed_forward_length(64)
        writer.add_head_count(2)
        writer.add_head_count_kv(1)
        writer.add_layer_norm_rms_eps(1e-5)
        writer.add_vocab_size(32)
        writer.add_file_type(7)
        q8 = gguf_py.quants.quantize(rng.standard_normal((32, 32)).astype(np.float32), gguf_py.GGMLQuantizationType.Q8_0)
        writer.add_tensor("token_embd.weight", q8, raw_dtype=gguf_py.GGMLQuantizationType.Q8_0)
        writer.add_tensor("output_norm.weight", np.ones(32, dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path.read_bytes()


def cases() -> list[tuple[str, Path]]:
    """Every input a fuzz run ever found, as (target, file)."""
    return [(d.name, f) for d in sorted(CASES.iterdir()) if d.is_dir() and d.name in TARGETS
            for f in sorted(d.iterdir()) if f.is_file()] if CASES.is_dir() else []

