"""packed format: compressed-tensors pack-quantized (W4A16, W8A16, 2-bit; group / channel / tensor;
symmetric with the 2^(bits-1) offset and asymmetric with packed zero points; act-order g_idx).

Reference: compressed-tensors' PackedQuantizationCompressor writes the fixtures and its decompress is
the dequantization reference. compressed-tensors 0.20 dropped g_idx, so act-order is checked against
its decompress of the column-permuted weight, and a hand-checked example.
"""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.compressors import PackedQuantizationCompressor
from compressed_tensors.compressors.pack_quantized import pack_to_int32, unpack_from_int32
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme, preset_name_to_scheme

from format_fixtures import (
    config_dict,
    convert,
    cosine,
    ct_compress_linears,
    ct_config,
    ct_qparams,
    linear_names,
    max_abs_diff,
    parquet_and_reference_logits,
    read_tensors,
    round_trip,
    save_checkpoint,
    tiny_qwen3,
)
from llm_workbook import StoreError, WeightLoaderV2
from llm_workbook.formats import packed
from llm_workbook.formats.base import QuantizedTensor, TensorInfo, UnsupportedFormatError


def _qconfig(args: QuantizationArgs) -> dict:
    return {"quant_method": "compressed-tensors", "format": "pack-quantized",
            "config_groups": {"g": {"targets": ["Linear"], "weights": args.model_dump()}}}


def _record(qconfig: dict, tensors: dict[str, torch.Tensor], module: str = "m") -> QuantizedTensor:
    rows = packed.to_rows(qconfig, module, tensors)
    assert all(r.format == "packed" and r.params == rows[0].params for r in rows)
    assert all(r.data is tensors[r.tensor_name.rpartition(".")[2]] for r in rows)
    return QuantizedTensor("packed", module, {r.tensor_name.rpartition(".")[2]: r.data for r in rows}, rows[0].params)


def _weight(out: int, in_: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(out, in_, generator=g) * 0.05 + 0.01).to(torch.bfloat16)


def _compress(weight: torch.Tensor, args: QuantizationArgs, scale_dtype=torch.bfloat16):
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    scale, zero_point = ct_qparams(weight, args)
    state = PackedQuantizationCompressor.compress(
        {"weight": weight, "weight_scale": scale.to(scale_dtype), "weight_zero_point": zero_point}, scheme)
    return state, PackedQuantizationCompressor.decompress(dict(state), scheme)["weight"]


CASES = {
    "w4-group128-sym": dict(num_bits=4, strategy="group", group_size=128),
    "w4-group64-asym": dict(num_bits=4, strategy="group", group_size=64, symmetric=False),
    "w4-channel-sym": dict(num_bits=4, strategy="channel"),
    "w4-channel-asym": dict(num_bits=4, strategy="channel", symmetric=False),
    "w8-group128-sym": dict(num_bits=8, strategy="group", group_size=128),
    "w8-channel-asym": dict(num_bits=8, strategy="channel", symmetric=False),
    "w2-group32-asym": dict(num_bits=2, strategy="group", group_size=32, symmetric=False),
    "w4-tensor-asym": dict(num_bits=4, strategy="tensor", symmetric=False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_dequant_equals_compressed_tensors(case):
    args = QuantizationArgs(type="int", **CASES[case])
    state, reference = _compress(_weight(200, 256), args)  # 200 rows: zero points pad their last word
    record = _record(_qconfig(args), state)
    ours = packed.dequantize(record, reference.dtype)
    diff = max_abs_diff(ours, reference)
    print(f"packed {case}: max abs diff vs compressed-tensors = {diff}")
    assert ours.shape == (200, 256) and diff == 0.0
    assert torch.equal(packed.dequantize(record, torch.float32).to(reference.dtype), reference)
    # the integer form the weight-only kernels take computes the same weight
    assert torch.equal(packed.affine(record).dequantize(reference.dtype), reference)


def test_float32_scales_exact():
    args = QuantizationArgs(num_bits=4, type="int", strategy="group", group_size=128)
    state, reference = _compress(_weight(64, 384, seed=1), args, torch.float32)
    assert reference.dtype == torch.float32
    assert torch.equal(packed.dequantize(_record(_qconfig(args), state)), reference)


def test_act_order_g_idx_matches_permuted_reference():
    """Column i uses group g_idx[i]. Quantize the column-permuted weight (contiguous groups) with
    compressed-tensors, then undo the permutation on its codes and on its decompressed weight."""
    gs, out, in_ = 64, 96, 256
    args = QuantizationArgs(num_bits=4, type="int", strategy="group", group_size=gs, symmetric=False)
    weight = _weight(out, in_, seed=7)
    perm = torch.randperm(in_, generator=torch.Generator().manual_seed(3))
    inverse = torch.argsort(perm)
    state, permuted_ref = _compress(weight[:, perm], args)
    codes = unpack_from_int32(state["weight_packed"], 4, torch.Size([out, in_]))[:, inverse]
    tensors = dict(state)
    tensors["weight_packed"] = pack_to_int32(codes.contiguous(), 4)
    tensors["weight_g_idx"] = (torch.arange(in_) // gs)[inverse].to(torch.int32)
    qconfig = _qconfig(args)
    qconfig["config_groups"]["g"]["weights"]["actorder"] = "group"  # as compressed-tensors < 0.20 wrote it
    record = _record(qconfig, tensors)
    assert record.params["actorder"] == "group"
    ours = packed.dequantize(record, torch.bfloat16)
    reference = permuted_ref[:, inverse]
    print(f"packed act-order g_idx: max abs diff vs permuted compressed-tensors = {max_abs_diff(ours, reference)}")
    assert torch.equal(ours, reference)
    assert torch.equal(packed.affine(record).dequantize(torch.bfloat16), reference)
    without_g_idx = {k: v for k, v in tensors.items() if k != "weight_g_idx"}
    assert not torch.equal(ours, packed.dequantize(QuantizedTensor("packed", "m", without_g_idx, record.params), torch.bfloat16))


def test_hand_checked_words_with_g_idx():
    """Two rows of 8 four-bit codes in one int32 word each (LSB first), groups of 4, g_idx swapping the groups.

    Row 0 word 0x76543210 holds codes 0..7 -> q = code - 8 = -8..-1; row 1 word 0xFEDCBA98 (negative as
    int32) holds codes 8..15 -> q = 0..7. g_idx sends columns 0-3 to group 1 (scale 0.5) and 4-7 to group 0 (scale 1).
    """
    words = torch.tensor([[0x76543210], [0xFEDCBA98 - (1 << 32)]], dtype=torch.int32)
    tensors = {
        "weight_packed": words,
        "weight_shape": torch.tensor([2, 8], dtype=torch.int64),
        "weight_scale": torch.tensor([[1.0, 0.5], [1.0, 0.5]], dtype=torch.bfloat16),
        "weight_g_idx": torch.tensor([1, 1, 1, 1, 0, 0, 0, 0], dtype=torch.int32),
    }
    expected = torch.tensor([[-4.0, -3.5, -3.0, -2.5, -4.0, -3.0, -2.0, -1.0], [0.0, 0.5, 1.0, 1.5, 4.0, 5.0, 6.0, 7.0]])
    args = QuantizationArgs(num_bits=4, type="int", strategy="group", group_size=4)
    assert torch.equal(packed.dequantize(_record(_qconfig(args), tensors)), expected)


# ------------------------------------------------------------------------------------ bad input


def test_bad_inputs_name_the_tensor():
    args = QuantizationArgs(num_bits=4, type="int", strategy="group", group_size=64, symmetric=False)
    state, _ = _compress(_weight(64, 256), args)
    qconfig = _qconfig(args)

    def fails(change: dict, match: str, error=StoreError):
        with pytest.raises(error, match=match):
            packed.to_rows(qconfig, "m", {**state, **change})

    fails({"weight_packed": state["weight_packed"][:, :-1]}, r"m\.weight_packed.*shape \[64, 31\]")
    fails({"weight_packed": state["weight_packed"].long()}, r"m\.weight_packed.*dtype I64")
    fails({"weight_shape": torch.tensor([64, 192])}, r"m\.weight_packed.*\[64, 24\]")
    fails({"weight_shape": torch.tensor([64, 256, 1])}, r"m\.weight_shape")
    fails({"weight_scale": state["weight_scale"][:, :2]}, r"m\.weight_scale.*\[64, 4\]")
    fails({"weight_zero_point": state["weight_zero_point"][:, :2]}, r"m\.weight_zero_point")
    fails({"weight_g_idx": torch.full((256,), 4, dtype=torch.int32)}, r"m\.weight_g_idx.*outside")
    with pytest.raises(StoreError, match=r"m: asymmetric scheme but no tensor 'm\.weight_zero_point'"):
        packed.to_rows(qconfig, "m", {k: v for k, v in state.items() if k != "weight_zero_point"})
    three_bit = _qconfig(QuantizationArgs(num_bits=3, type="int", strategy="group", group_size=64))
    with pytest.raises(UnsupportedFormatError, match="3-bit"):
        packed.to_rows(three_bit, "m", state)


def test_claim_and_detect():
    info = TensorInfo("x", "I32", (1,))
    qconfig = {**_qconfig(QuantizationArgs(num_bits=4, type="int", group_size=128)), "ignore": ["lm_head", "re:.*mlp.gate$"]}
    members = {"weight_packed": info, "weight_shape": info, "weight_scale": info, "bias": info}
    assert packed.claim(qconfig, "model.layers.0.self_attn.q_proj", members) == {"weight_packed", "weight_shape", "weight_scale"}
    assert packed.claim(qconfig, "model.layers.0.mlp.gate", members) == set()
    assert packed.claim(qconfig, "model.norm", {"weight": info}) == set()
    assert packed.detect(qconfig, {})
    assert not packed.detect({**qconfig, "format": "int-quantized"}, {})


# ------------------------------------------------------------------------- checkpoints and models


@pytest.mark.parametrize("preset", ["W4A16", "W4A16_ASYM", "W8A16"])
def test_checkpoint_round_trip_and_model(tmp_path, preset):
    model = tiny_qwen3(seed=3)
    state = model.state_dict()
    modules = linear_names(state)
    scheme = preset_name_to_scheme(preset, ["Linear"])
    compressed, reference = ct_compress_linears(state, modules, scheme, PackedQuantizationCompressor, torch.bfloat16)
    config = config_dict(model, ct_config(scheme, "pack-quantized", ["lm_head"]))
    src = save_checkpoint(tmp_path / "src", compressed, config)
    parquet = round_trip(src, tmp_path)
    loader = WeightLoaderV2(parquet)
    assert {loader.format_of(m) for m in modules} == {"packed"}
    worst = max(max_abs_diff(loader.load_weight(m, "weight", dtype=torch.bfloat16), reference[f"{m}.weight"]) for m in modules)
    print(f"packed {preset} checkpoint: worst layer max abs diff vs compressed-tensors = {worst}")
    assert worst == 0.0
    ours, ref = parquet_and_reference_logits(parquet, config, reference)
    print(f"packed {preset} model logits cosine = {cosine(ours, ref)}")
    assert cosine(ours, ref) >= 0.9999


def test_bad_checkpoint_leaves_no_output(tmp_path):
    model = tiny_qwen3(seed=3)
    state = model.state_dict()
    modules = linear_names(state)
    scheme = preset_name_to_scheme("W4A16", ["Linear"])
    compressed, _ = ct_compress_linears(state, modules, scheme, PackedQuantizationCompressor, torch.bfloat16)
    compressed[f"{modules[1]}.weight_shape"] = torch.tensor([5, 5])
    src = save_checkpoint(tmp_path / "src", compressed, config_dict(model, ct_config(scheme, "pack-quantized")))
    out = tmp_path / "out.parquet"
    with pytest.raises(StoreError, match=rf"{modules[1]}\.weight_packed"):
        convert(src, out)
    assert not out.exists()
    assert read_tensors(src)  # the source is untouched
