"""fp8 format: compressed-tensors naive/float-quantized FP8 and quant_method fp8 (per tensor, block-wise).

References: compressed-tensors' FloatQuantizationCompressor writes the fixtures and its decompress is
the dequantization reference; block-wise FP8 is checked against transformers' FineGrainedFP8 CPU
dequantization and a hand-checked 2x2-block example.
"""

from __future__ import annotations

import math

import pytest
import torch
from compressed_tensors.compressors import FloatQuantizationCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme, preset_name_to_scheme

from format_fixtures import (
    ANGELSLIM,
    config_dict,
    convert_fails,
    cosine,
    ct_compress_linears,
    ct_config,
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
from llm_workbook import StoreError, WeightLoaderV2, formats
from llm_workbook.formats import fp8
from llm_workbook.formats.base import QuantizedTensor, TensorInfo, UnsupportedFormatError
from llm_workbook.runtime.model import model_from_parquet

FP8_MAX = 448.0


def _record(qconfig: dict, module: str, tensors: dict[str, torch.Tensor]) -> QuantizedTensor:
    """What the store would hand back for one group: to_rows, then the rows as a record."""
    rows = fp8.to_rows(qconfig, module, tensors)
    assert all(r.format == "fp8" and r.params == rows[0].params for r in rows)
    for row in rows:
        suffix = row.tensor_name.rpartition(".")[2]
        assert row.data is tensors[suffix]  # stored unchanged
    return QuantizedTensor("fp8", module, {r.tensor_name.rpartition(".")[2]: r.data for r in rows}, rows[0].params)


def _ct_fp8_config(args: QuantizationArgs, fmt: str = "float-quantized") -> dict:
    return {"quant_method": "compressed-tensors", "format": fmt,
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": args.model_dump()}}}


def _weight(out: int, in_: int, seed: int = 0) -> torch.Tensor:
    return (torch.randn(out, in_, generator=torch.Generator().manual_seed(seed)) * 0.05).to(torch.bfloat16)


# ------------------------------------------------------------------------ compressed-tensors reference

STRATEGIES = {
    "tensor": {},
    "channel": {},
    "group": {"group_size": 100},
    "block": {"block_structure": [128, 128]},
}


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_ct_dequant_equals_compressed_tensors(strategy, scale_dtype):
    args = QuantizationArgs(num_bits=8, type="float", strategy=strategy, **STRATEGIES[strategy])
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    weight = _weight(200, 300)  # not a multiple of the 128x128 block in either dim
    scale, zero_point = ct_qparams(weight, args)
    packed = FloatQuantizationCompressor.compress(
        {"weight": weight, "weight_scale": scale.to(scale_dtype), "weight_zero_point": zero_point}, scheme)
    assert packed["weight"].dtype == torch.float8_e4m3fn and "weight_zero_point" not in packed
    reference = FloatQuantizationCompressor.decompress(dict(packed), scheme)["weight"]
    record = _record(_ct_fp8_config(args), "m", packed)
    ours = fp8.dequantize(record, reference.dtype)
    diff = max_abs_diff(ours, reference)
    print(f"fp8 ct {strategy} scale {scale_dtype}: max abs diff vs compressed-tensors = {diff}")
    assert ours.dtype == reference.dtype and ours.shape == (200, 300)
    assert diff == 0.0
    # the float32 result rounds to the reference when the reference computes in bf16
    assert torch.equal(fp8.dequantize(record, torch.float32).to(reference.dtype), reference)


def test_ct_asymmetric_zero_point_equals_compressed_tensors():
    args = QuantizationArgs(num_bits=8, type="float", strategy="channel", symmetric=False)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    weight = _weight(64, 128, seed=3) + 0.02  # off-centre rows
    scale, zero_point = ct_qparams(weight, args)
    local = {"weight": weight, "weight_scale": scale, "weight_zero_point": zero_point}
    packed = FloatQuantizationCompressor.compress(local, scheme)
    assert "weight_zero_point" in packed and bool(packed["weight_zero_point"].float().ne(0).any())
    reference = FloatQuantizationCompressor.decompress(dict(packed), scheme)["weight"]
    ours = fp8.dequantize(_record(_ct_fp8_config(args), "m", packed), reference.dtype)
    print(f"fp8 ct asym channel: max abs diff = {max_abs_diff(ours, reference)}")
    assert torch.equal(ours, reference)


def test_angelslim_squeezed_per_channel_scale():
    """AngelSlim's per-channel observer writes weight_scale as [out], not [out, 1]."""
    args = QuantizationArgs(num_bits=8, type="float", strategy="channel")
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    weight = _weight(96, 128, seed=1)
    scale, _ = ct_qparams(weight, args)
    packed = FloatQuantizationCompressor.compress({"weight": weight, "weight_scale": scale}, scheme)
    reference = FloatQuantizationCompressor.decompress(dict(packed), scheme)["weight"]
    squeezed = {"weight": packed["weight"], "weight_scale": packed["weight_scale"].reshape(-1)}
    ours = fp8.dequantize(_record(_ct_fp8_config(args, "naive-quantized"), "m", squeezed), reference.dtype)
    print(f"fp8 ct channel [out] scale: max abs diff = {max_abs_diff(ours, reference)}")
    assert torch.equal(ours, reference)


# ---------------------------------------------------------------------- block-wise (quant_method fp8)


def _blockwise_quantize(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 / AngelSlim block-wise FP8, written here from the published algorithm: pad to the
    block, per-block amax, q = fp8(W * 448/amax), crop, scale_inv = amax/448 squeezed."""
    rows, cols = weight.shape
    b0, b1 = block
    padded = torch.nn.functional.pad(weight.float(), (0, -cols % b1, 0, -rows % b0))
    blocks = padded.reshape(padded.shape[0] // b0, b0, padded.shape[1] // b1, b1)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    factor = (FP8_MAX / amax)[:, None, :, None]
    q = (blocks * factor).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).reshape(padded.shape)[:rows, :cols]
    return q.contiguous(), (amax / FP8_MAX).squeeze()


def _transformers_block_dequant(q: torch.Tensor, scale_inv: torch.Tensor, block: list[int]) -> torch.Tensor:
    """transformers' FineGrainedFP8 CPU dequantization (5.x): Fp8Dequantize for shapes that divide
    the block, the backward-pass helper (which handles partial blocks) otherwise."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize, _dequantize_fp8_weight

    rows, cols = q.shape
    grid = scale_inv.reshape(math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    if rows % block[0] == 0 and cols % block[1] == 0:
        return Fp8Dequantize(None)._dequantize_one(q, grid, output_dtype=torch.float32)
    return _dequantize_fp8_weight(q, grid, block, torch.float32)


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(256, 384), (200, 300), (96, 300), (300, 100)],
                         ids=["divisible", "partial-blocks", "one-block-row", "one-block-column"])
def test_blockwise_equals_transformers(shape, scale_dtype):
    block = [128, 128]
    q, scale_inv = _blockwise_quantize(_weight(*shape, seed=2), tuple(block))
    scale_inv = scale_inv.to(scale_dtype)
    if shape in ((96, 300), (300, 100)):
        assert scale_inv.dim() == 1  # AngelSlim's squeeze edge case
    qconfig = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": block,
               "modules_to_not_convert": ["lm_head"]}
    record = _record(qconfig, "m", {"weight": q, "weight_scale_inv": scale_inv})
    assert record.params["strategy"] == "block" and record.params["weight_shape"] == list(shape)
    ours = fp8.dequantize(record, torch.float32)
    reference = _transformers_block_dequant(q, scale_inv, block)
    diff = max_abs_diff(ours, reference)
    print(f"fp8 block {shape} scale {scale_dtype}: max abs diff vs transformers = {diff}")
    assert diff == 0.0


def test_blockwise_hand_checked_2x2_blocks():
    """A 3x3 weight in 2x2 blocks (so the last block row and column are partial); every value is
    exact in FP8 and the expected weight is worked out by hand: W[i, j] = q[i, j] * s[i // 2, j // 2]."""
    q = torch.tensor([[1.0, -2.0, 3.0], [0.5, 4.0, -1.0], [6.0, -0.25, 2.0]]).to(torch.float8_e4m3fn)
    scale_inv = torch.tensor([[2.0, 0.5], [4.0, 0.25]], dtype=torch.bfloat16)
    expected = torch.tensor([[2.0, -4.0, 1.5], [1.0, 8.0, -0.5], [24.0, -1.0, 0.5]])
    record = _record({"quant_method": "fp8", "weight_block_size": [2, 2]}, "m", {"weight": q, "weight_scale_inv": scale_inv})
    ours = fp8.dequantize(record)
    print(f"fp8 hand-checked 2x2 blocks: max abs diff = {max_abs_diff(ours, expected)}")
    assert torch.equal(ours, expected)


def test_fp8_method_per_tensor_static():
    """quant_method fp8, per-tensor weight_scale and input_scale: W = q * s (compressed-tensors' tensor strategy as reference)."""
    args = QuantizationArgs(num_bits=8, type="float", strategy="tensor")
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    weight = _weight(64, 256, seed=4)
    scale, _ = ct_qparams(weight, args)
    packed = FloatQuantizationCompressor.compress({"weight": weight, "weight_scale": scale}, scheme)
    reference = FloatQuantizationCompressor.decompress(dict(packed), scheme)["weight"]
    tensors = {"weight": packed["weight"], "weight_scale": packed["weight_scale"], "input_scale": torch.tensor([0.01])}
    record = _record({"quant_method": "fp8", "activation_scheme": "static", "ignored_layers": ["lm_head"]}, "m", tensors)
    assert record.params["strategy"] == "tensor" and record.params["activation"] == "static"
    assert torch.equal(fp8.dequantize(record), reference)


# ------------------------------------------------------------------------------------- detection


def _ct(weights: dict, fmt: str) -> dict:
    return {"quant_method": "compressed-tensors", "format": fmt,
            "config_groups": {"g": {"targets": ["Linear"], "weights": weights}}}


@pytest.mark.parametrize("qconfig,owner", [
    (_ct({"num_bits": 8, "type": "float", "strategy": "tensor"}, "naive-quantized"), "fp8"),
    (_ct({"num_bits": 8, "type": "float", "strategy": "channel"}, "float-quantized"), "fp8"),
    ({"quant_method": "fp8", "weight_block_size": [128, 128]}, "fp8"),
    (_ct({"num_bits": 8, "type": "int", "strategy": "channel"}, "int-quantized"), "int8"),
    (_ct({"num_bits": 8, "type": "int", "strategy": "channel"}, "naive-quantized"), "int8"),
    (_ct({"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128}, "pack-quantized"), "packed"),
    (_ct({"num_bits": 4, "type": "float", "group_size": 16}, "naive-quantized"), "nvfp4"),
    (_ct({"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16}, "nvfp4-pack-quantized"), "nvfp4"),
])
def test_registry_routes_compressed_tensors_configs(qconfig, owner):
    tensors = {"m.weight_scale_2": TensorInfo("m.weight_scale_2", "F32", ())} if owner == "nvfp4" else {}
    assert fp8.detect(qconfig, tensors) is (owner == "fp8")
    assert formats.detect(qconfig, tensors).NAME == owner


def test_detect_rejects_sparse_and_unknown():
    sparse = {**_ct({"num_bits": 8, "type": "float"}, "float-quantized"), "sparsity_config": {"format": "sparse-24-bitmask"}}
    assert not fp8.detect(sparse, {})
    assert not fp8.detect({"quant_method": "gptq", "bits": 4}, {})
    assert not fp8.detect(None, {})
    with pytest.raises(UnsupportedFormatError, match="unsupported quantization_config"):
        formats.detect({"quant_method": "mystery"}, {}, source="config.json")


def test_claim_honours_every_ignore_convention():
    members = {s: TensorInfo(s, "F32", (1,)) for s in ("weight", "weight_scale", "input_scale", "bias")}
    base = _ct({"num_bits": 8, "type": "float"}, "naive-quantized")
    assert fp8.claim(base, "model.layers.0.mlp.down_proj", members) == {"weight", "weight_scale", "input_scale"}
    for key, entry in [("ignore", "re:.*down_proj$"), ("ignored_layers", "model.layers.0.mlp.down_proj"),
                       ("ignore", "mlp.down_proj"), ("modules_to_not_convert", "model.layers.0")]:
        assert fp8.claim({**base, key: [entry]}, "model.layers.0.mlp.down_proj", members) == set(), (key, entry)
        assert fp8.claim({**base, key: [entry]}, "model.layers.1.mlp.up_proj", members) != set(), (key, entry)
    assert fp8.claim(base, "lm_head", {"weight": members["weight"]}) == set()  # no scale: dense


# ------------------------------------------------------------------------- checkpoints and models


def _ct_fp8_checkpoint(tmp_path, scale_dtype=torch.float32, ignore_key="ignore", static=True):
    """A tiny Qwen3 in AngelSlim's FP8 layout: compressed-tensors naive-quantized, per-tensor weight
    and (static) input scales in float32, lm_head ignored; plus the compressed-tensors reference weights."""
    model = tiny_qwen3(seed=0)
    state = model.state_dict()
    modules = linear_names(state)
    scheme = preset_name_to_scheme("FP8" if static else "FP8_DYNAMIC", ["Linear"])
    compressed, reference = ct_compress_linears(state, modules, scheme, FloatQuantizationCompressor, scale_dtype)
    if static:
        for i, module in enumerate(modules):
            compressed[f"{module}.input_scale"] = torch.tensor([0.01 + i / 1000], dtype=torch.float32)
    qconfig = ct_config(scheme, "naive-quantized", ["lm_head"], ignore_key)
    config = config_dict(model, qconfig)
    return save_checkpoint(tmp_path / "src", compressed, config), config, reference, modules


@pytest.mark.parametrize("ignore_key,scale_dtype,static", [
    ("ignore", torch.float32, True), ("ignored_layers", torch.bfloat16, False)],
    ids=["angelslim-v0.2-static", "angelslim-v0.1-dynamic-bf16-scales"])
def test_ct_checkpoint_round_trip_and_model(tmp_path, ignore_key, scale_dtype, static):
    src, config, reference, modules = _ct_fp8_checkpoint(tmp_path, scale_dtype, ignore_key, static)
    parquet = round_trip(src, tmp_path)
    loader = WeightLoaderV2(parquet)
    assert {loader.format_of(m) for m in modules} == {"fp8"}
    assert loader.format_of("lm_head") == "dense"
    worst = 0.0
    for module in modules:
        ours = loader.load_weight(module, "weight", dtype=reference[f"{module}.weight"].dtype)
        worst = max(worst, max_abs_diff(ours, reference[f"{module}.weight"]))
        assert loader.rows[f"{module}.weight"].params["weight_shape"] == list(reference[f"{module}.weight"].shape)
    print(f"fp8 checkpoint ({ignore_key}): worst layer max abs diff vs compressed-tensors = {worst}")
    assert worst == 0.0
    ours, ref = parquet_and_reference_logits(parquet, config, reference)
    print(f"fp8 model logits cosine = {cosine(ours, ref)}, max abs diff = {max_abs_diff(ours, ref)}")
    assert cosine(ours, ref) >= 0.9999


def test_blockwise_checkpoint_round_trip_and_model(tmp_path):
    """quant_method fp8 block-wise with BF16 weight_scale_inv (AngelSlim's tools script) and modules_to_not_convert."""
    model = tiny_qwen3(seed=1, intermediate=320)  # down_proj in=320: a partial 128-block
    state = dict(model.state_dict())
    reference = dict(state)
    modules = [m for m in linear_names(state) if not m.endswith("o_proj")]  # o_proj listed as not converted
    for module in modules:
        q, scale_inv = _blockwise_quantize(state.pop(f"{module}.weight"), (128, 128))
        state[f"{module}.weight"] = q
        state[f"{module}.weight_scale_inv"] = scale_inv.to(torch.bfloat16)
        reference[f"{module}.weight"] = _transformers_block_dequant(q, scale_inv.to(torch.bfloat16), [128, 128])
    qconfig = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
               "modules_to_not_convert": ["lm_head", "o_proj"], "weight_block_size": [128, 128]}
    config = config_dict(model, qconfig)
    src = save_checkpoint(tmp_path / "src", state, config)
    parquet = round_trip(src, tmp_path)
    loader = WeightLoaderV2(parquet)
    assert loader.format_of("model.layers.0.self_attn.o_proj") == "dense"
    for module in modules:
        assert torch.equal(loader.load_weight(module, "weight"), reference[f"{module}.weight"]), module
    ours, ref = parquet_and_reference_logits(parquet, config, reference)
    print(f"fp8 block model logits cosine = {cosine(ours, ref)}")
    assert cosine(ours, ref) >= 0.9999


# ----------------------------------------------------------------------------------- bad input


def _expect_failure(src, tmp_path, match: str, error=StoreError):
    convert_fails(src, tmp_path, error, match)


def test_bad_inputs_name_the_tensor(tmp_path):
    src, config, _, modules = _ct_fp8_checkpoint(tmp_path)
    good = read_tensors(src)
    target = modules[0]

    def variant(name: str, change) -> tuple:
        tensors = dict(good)
        change(tensors)
        return save_checkpoint(tmp_path / name, tensors, config)

    bad_scale = variant("scale", lambda t: t.__setitem__(f"{target}.weight_scale", torch.ones(3, 1)))
    _expect_failure(bad_scale, tmp_path, rf"{target}\.weight_scale.*shape")
    bad_dtype = variant("dtype", lambda t: t.__setitem__(f"{target}.weight", t[f"{target}.weight"].to(torch.bfloat16)))
    _expect_failure(bad_dtype, tmp_path, rf"{target}\.weight.*dtype BF16")
    bad_input = variant("input", lambda t: t.__setitem__(f"{target}.input_scale", torch.ones(2)))
    _expect_failure(bad_input, tmp_path, rf"{target}\.input_scale")
    stray = variant("stray", lambda t: t.__setitem__("lm_head.weight_scale", torch.ones(1)))
    _expect_failure(stray, tmp_path, r"lm_head\.weight_scale.*looks quantized")
    unknown = save_checkpoint(tmp_path / "unknown", good, {**config, "quantization_config": {"quant_method": "fp9"}})
    _expect_failure(unknown, tmp_path, "unsupported quantization_config", UnsupportedFormatError)


def test_blockwise_bad_scale_grid(tmp_path):
    q, _ = _blockwise_quantize(_weight(200, 300), (128, 128))
    qconfig = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    with pytest.raises(StoreError, match=r"m\.weight_scale_inv.*\[2, 3\]"):
        fp8.to_rows(qconfig, "m", {"weight": q, "weight_scale_inv": torch.ones(2, 2)})
    with pytest.raises(StoreError, match="both weight_scale and weight_scale_inv"):
        fp8.to_rows(qconfig, "m", {"weight": q, "weight_scale_inv": torch.ones(2, 3), "weight_scale": torch.ones(1)})


# ------------------------------------------------------------------------- AngelSlim's own outputs


@pytest.mark.parametrize("method", ["fp8_static", "fp8_dynamic"])
def test_angelslim_fixture(method, tmp_path):
    src = ANGELSLIM / method
    original = ANGELSLIM / "original"
    if not (src / "config.json").is_file() or not (original / "config.json").is_file():
        pytest.skip(f"AngelSlim fixture {src} (or original/) not generated yet (tools/angelslim/make_fixtures.py)")
    parquet = round_trip(src, tmp_path)
    loader = WeightLoaderV2(parquet)
    base = read_tensors(original)
    quantized = [layer for layer in loader._groups if loader.format_of(layer) == "fp8"]
    assert quantized, "no fp8 layers found"
    for layer in quantized:
        ours = loader.load_weight(layer, "weight")
        orig = base[f"{layer}.weight"].float()
        scale = loader.load_tensor(f"{layer}.weight_scale").float().max()
        # e4m3 keeps 3 mantissa bits: relative error <= 2^-4, plus half a subnormal step of the scale
        bound = orig.abs() * 2.0**-4 + scale * 2.0**-9 + 1e-6
        assert bool(((ours - orig).abs() <= bound).all()), layer
    print(f"AngelSlim {method}: {len(quantized)} fp8 layers within FP8 rounding of the original")
    _assert_close_to_original_model(parquet, original, method)


def _assert_close_to_original_model(parquet, original, method: str) -> None:
    from transformers import AutoModelForCausalLM

    base_model = AutoModelForCausalLM.from_pretrained(original, dtype=torch.float32).eval()
    ids = token_batch(base_model.config.vocab_size)
    similarity = cosine(logits(model_from_parquet(parquet, dtype=torch.float32), ids), logits(base_model, ids))
    print(f"AngelSlim {method}: logits cosine vs the original bf16 model = {similarity:.6f}")
    assert similarity >= 0.99


def test_fp8_weight_without_scale_is_reported():
    q = torch.zeros(4, 8).to(torch.float8_e4m3fn)
    assert fp8.claim({"quant_method": "fp8"}, "m", {"weight": TensorInfo("m.weight", "F8_E4M3", (4, 8))}) == {"weight"}
    with pytest.raises(StoreError, match=r"m\.weight_scale"):
        fp8.to_rows({"quant_method": "fp8"}, "m", {"weight": q})
    with pytest.raises(StoreError, match=r"m\.weight_scale"):
        fp8.to_rows(_ct({"num_bits": 8, "type": "float"}, "naive-quantized"), "m", {"weight": q})
