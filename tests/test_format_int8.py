"""int8 format: compressed-tensors int-quantized (AngelSlim INT8 W8A8), including the v0.1/v0.2 variant
whose integer codes are stored as BF16.

Reference: compressed-tensors' IntQuantizationCompressor writes the fixtures and its decompress is the
dequantization reference.
"""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.compressors import IntQuantizationCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme, preset_name_to_scheme

from format_fixtures import (
    ANGELSLIM,
    config_dict,
    convert,
    cosine,
    ct_compress_linears,
    ct_qparams,
    linear_names,
    logits,
    max_abs_diff,
    parquet_and_reference_logits,
    read_tensors,
    round_trip,
    save_checkpoint,
    tiny_qwen3,
    token_batch,
)
from llm_workbook import StoreError, WeightLoaderV2
from llm_workbook.formats import int8
from llm_workbook.formats.base import QuantizedTensor, TensorInfo
from llm_workbook.runtime.model import model_from_parquet

TOKEN_ACTS = {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True, "symmetric": True}
# AngelSlim's int8_dynamic quantization_config (docs/source/features/quantization/int8.md, save.py)
ANGELSLIM_INT8 = {
    "quant_method": "compressed-tensors", "format": "int-quantized", "ignore": ["lm_head"], "kv_cache_scheme": None,
    "quantization_status": "compressed",
    "config_groups": {"group_0": {"targets": ["Linear"],
                                  "weights": {"num_bits": 8, "strategy": "channel", "dynamic": False, "type": "int"},
                                  "input_activations": {"num_bits": 8, "strategy": "token", "dynamic": True, "type": "int"},
                                  "output_activations": None}},
}


def _qconfig(args: QuantizationArgs, acts: dict | None = TOKEN_ACTS) -> dict:
    return {"quant_method": "compressed-tensors", "format": "int-quantized",
            "config_groups": {"g": {"targets": ["Linear"], "weights": args.model_dump(), "input_activations": acts}}}


def _record(qconfig: dict, module: str, tensors: dict[str, torch.Tensor]) -> QuantizedTensor:
    rows = int8.to_rows(qconfig, module, tensors)
    assert all(r.format == "int8" and r.params == rows[0].params for r in rows)
    assert all(r.data is tensors[r.tensor_name.rpartition(".")[2]] for r in rows)
    return QuantizedTensor("int8", module, {r.tensor_name.rpartition(".")[2]: r.data for r in rows}, rows[0].params)


def _weight(out: int, in_: int, seed: int = 0, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(out, in_, generator=g) * 0.05 + shift).to(torch.bfloat16)


CASES = {
    "channel-sym": dict(strategy="channel"),
    "channel-asym": dict(strategy="channel", symmetric=False),
    "tensor-sym": dict(strategy="tensor"),
    "group-asym": dict(strategy="group", group_size=64, symmetric=False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_dequant_equals_compressed_tensors(case):
    args = QuantizationArgs(num_bits=8, type="int", **CASES[case])
    scheme = QuantizationScheme(targets=["Linear"], weights=args, input_activations=QuantizationArgs(**TOKEN_ACTS))
    weight = _weight(96, 256, shift=0.01)
    scale, zero_point = ct_qparams(weight, args)
    packed = IntQuantizationCompressor.compress(
        {"weight": weight, "weight_scale": scale.to(torch.bfloat16), "weight_zero_point": zero_point}, scheme)
    assert packed["weight"].dtype == torch.int8
    assert ("weight_zero_point" in packed) == (not args.symmetric)
    reference = IntQuantizationCompressor.decompress(dict(packed), scheme)["weight"]
    record = _record(_qconfig(args), "m", packed)
    ours = int8.dequantize(record, reference.dtype)
    diff = max_abs_diff(ours, reference)
    print(f"int8 {case}: max abs diff vs compressed-tensors = {diff}")
    assert ours.shape == (96, 256) and diff == 0.0
    assert torch.equal(int8.affine(record).dequantize(reference.dtype), reference)  # the kernels' integer form
    assert record.params["activation"] == "dynamic" and record.params["weight_dtype"] == "I8"


def test_bf16_held_codes_v01_v02():
    """AngelSlim v0.1/v0.2 saved the int8 codes without the cast: BF16 tensors holding integers."""
    args = QuantizationArgs(num_bits=8, type="int", strategy="channel")
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    weight = _weight(64, 128, seed=5)
    scale, _ = ct_qparams(weight, args)
    packed = IntQuantizationCompressor.compress({"weight": weight, "weight_scale": scale.to(torch.bfloat16)}, scheme)
    reference = IntQuantizationCompressor.decompress(dict(packed), scheme)["weight"]
    old = {"weight": packed["weight"].to(torch.bfloat16), "weight_scale": packed["weight_scale"]}
    record = _record(ANGELSLIM_INT8, "m", old)
    assert record.params["weight_dtype"] == "BF16"
    ours = int8.dequantize(record, torch.bfloat16)
    print(f"int8 bf16-held codes: max abs diff vs compressed-tensors = {max_abs_diff(ours, reference)}")
    assert torch.equal(ours, reference)


def test_hand_checked_channel_example():
    q = torch.tensor([[1, -2, 127], [-128, 0, 3]], dtype=torch.int8)
    scale = torch.tensor([[0.5], [0.25]], dtype=torch.bfloat16)
    expected = torch.tensor([[0.5, -1.0, 63.5], [-32.0, 0.0, 0.75]])
    ours = int8.dequantize(_record(ANGELSLIM_INT8, "m", {"weight": q, "weight_scale": scale}))
    assert torch.equal(ours, expected)


@pytest.mark.parametrize("values,match", [
    (torch.tensor([[1.5, 2.0]]), "fractional"),
    (torch.tensor([[200.0, 2.0]]), r"outside the 8-bit range"),
    (torch.tensor([[float("nan"), 2.0]]), "non-finite"),
])
def test_bf16_codes_must_be_integers_in_range(values, match):
    with pytest.raises(StoreError, match=rf"m\.weight.*{match}"):
        int8.to_rows(ANGELSLIM_INT8, "m", {"weight": values.to(torch.bfloat16), "weight_scale": torch.ones(1, 1)})


def test_bad_shapes_and_dtypes():
    q = torch.zeros(4, 8, dtype=torch.int8)
    with pytest.raises(StoreError, match=r"m\.weight_scale.*shape \[4, 2\]"):
        int8.to_rows(ANGELSLIM_INT8, "m", {"weight": q, "weight_scale": torch.ones(4, 2)})
    with pytest.raises(StoreError, match=r"m\.weight.*dtype I32"):
        int8.to_rows(ANGELSLIM_INT8, "m", {"weight": q.int(), "weight_scale": torch.ones(4, 1)})
    with pytest.raises(StoreError, match=r"m\.weight_zero_point.*symmetric"):
        int8.to_rows(ANGELSLIM_INT8, "m", {"weight": q, "weight_scale": torch.ones(4, 1), "weight_zero_point": q[:, :1]})
    with pytest.raises(StoreError, match=r"m\.weight_scale"):
        int8.to_rows(ANGELSLIM_INT8, "m", {"weight": q})
    with pytest.raises(StoreError, match=r"m\.weight_scale.*dtype I8"):
        int8.to_rows(ANGELSLIM_INT8, "m", {"weight": q, "weight_scale": q[:, :1]})


def test_claim():
    info = lambda code: TensorInfo("x", code, (1,))  # noqa: E731
    members = {"weight": info("I8"), "weight_scale": info("BF16"), "bias": info("BF16")}
    assert int8.claim(ANGELSLIM_INT8, "a.q_proj", members) == {"weight", "weight_scale"}
    assert int8.claim(ANGELSLIM_INT8, "a.q_proj", {"weight": info("I8")}) == {"weight"}  # to_rows then reports the missing scale
    assert int8.claim(ANGELSLIM_INT8, "lm_head", {"weight": info("I8"), "weight_scale": info("BF16")}) == set()
    assert int8.claim(ANGELSLIM_INT8, "a.norm", {"weight": info("BF16")}) == set()


# ------------------------------------------------------------------------- checkpoints and models


def _checkpoint(tmp_path, bf16_codes: bool = False, static: bool = False, ignore_key: str = "ignore"):
    model = tiny_qwen3(seed=2)
    state = model.state_dict()
    modules = linear_names(state)
    scheme = preset_name_to_scheme("W8A8", ["Linear"])
    compressed, reference = ct_compress_linears(state, modules, scheme, IntQuantizationCompressor, torch.bfloat16)
    qconfig = dict(ANGELSLIM_INT8)
    if ignore_key != "ignore":
        qconfig[ignore_key] = qconfig.pop("ignore")
    for module in modules:
        if bf16_codes:
            compressed[f"{module}.weight"] = compressed[f"{module}.weight"].to(torch.bfloat16)
        if static:
            compressed[f"{module}.input_scale"] = torch.tensor([0.02], dtype=torch.bfloat16)
    if static:
        acts = {"num_bits": 8, "strategy": "tensor", "dynamic": False, "type": "int"}
        qconfig["config_groups"] = {"group_0": {**qconfig["config_groups"]["group_0"], "input_activations": acts}}
    config = config_dict(model, qconfig)
    return save_checkpoint(tmp_path / "src", compressed, config), config, reference, modules


@pytest.mark.parametrize("bf16_codes,static,ignore_key", [
    (False, False, "ignore"), (True, False, "ignored_layers"), (False, True, "ignore")],
    ids=["v0.5-dynamic", "v0.1-bf16-codes", "static-input-scale"])
def test_checkpoint_round_trip_and_model(tmp_path, bf16_codes, static, ignore_key):
    src, config, reference, modules = _checkpoint(tmp_path, bf16_codes, static, ignore_key)
    parquet = round_trip(src, tmp_path)
    loader = WeightLoaderV2(parquet)
    assert {loader.format_of(m) for m in modules} == {"int8"} and loader.format_of("lm_head") == "dense"
    worst = max(max_abs_diff(loader.load_weight(m, "weight", dtype=torch.bfloat16), reference[f"{m}.weight"]) for m in modules)
    print(f"int8 checkpoint: worst layer max abs diff vs compressed-tensors = {worst}")
    assert worst == 0.0
    ours, ref = parquet_and_reference_logits(parquet, config, reference)
    print(f"int8 model logits cosine = {cosine(ours, ref)}")
    assert cosine(ours, ref) >= 0.9999


def test_bad_checkpoint_leaves_no_output(tmp_path):
    src, config, _, modules = _checkpoint(tmp_path)
    tensors = read_tensors(src)
    tensors[f"{modules[0]}.weight_scale"] = torch.ones(7, 1, dtype=torch.bfloat16)
    bad = save_checkpoint(tmp_path / "bad", tensors, config)
    out = tmp_path / "bad.parquet"
    with pytest.raises(StoreError, match=rf"{modules[0]}\.weight_scale.*shape \[7, 1\]"):
        convert(bad, out)
    assert not out.exists()


def test_angelslim_fixture(tmp_path):
    src, original = ANGELSLIM / "int8_dynamic", ANGELSLIM / "original"
    if not (src / "config.json").is_file() or not (original / "config.json").is_file():
        pytest.skip(f"AngelSlim fixture {src} (or original/) not generated yet (tools/angelslim/make_fixtures.py)")
    parquet = round_trip(src, tmp_path)
    loader = WeightLoaderV2(parquet)
    base = read_tensors(original)
    layers = [layer for layer in loader._groups if loader.format_of(layer) == "int8"]
    assert layers, "no int8 layers found"
    for layer in layers:
        ours = loader.load_weight(layer, "weight")
        scale = loader.load_tensor(f"{layer}.weight_scale").float().reshape(-1, 1)
        orig = base[f"{layer}.weight"].float()
        # round-to-nearest: at most half a step (plus bf16 rounding of the product)
        assert bool(((ours - orig).abs() <= scale * 0.5 + orig.abs() * 2.0**-8 + 1e-6).all()), layer
    print(f"AngelSlim int8_dynamic: {len(layers)} int8 layers within half a step of the original")
    from transformers import AutoModelForCausalLM

    base_model = AutoModelForCausalLM.from_pretrained(original, dtype=torch.float32).eval()
    ids = token_batch(base_model.config.vocab_size)
    similarity = cosine(logits(model_from_parquet(parquet, dtype=torch.float32), ids), logits(base_model, ids))
    print(f"AngelSlim int8_dynamic: logits cosine vs the original bf16 model = {similarity:.6f}")
    assert similarity >= 0.99
