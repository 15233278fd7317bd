"""w4a8 format: AngelSlim W4A8-FP8 (TensorRT-LLM ``w4a8_awq`` and AngelSlim's dense QDQModule path).

References: tests/fixtures/reference/angelslim_vectors.safetensors, written by AngelSlim's own code
(script: make_angelslim_vectors.py):
* ``w4a8b``: ``weight_quantize.bf16_to_int4_pack`` (TRT-LLM layout: codes round(W / (absmax/8)), scale
  ``weight_scale.int4`` = group absmax / 8) and AngelSlim's unpacker ``unpack_weight_omni``;
* ``w4a8c``: ``helper_layer.QDQModule("w4a8_fp8")`` (dense path: codes with step absmax/7, stored
  ``weight_scale_int4`` = absmax/8), with its forward's weight and ``fake_quant_dequant``'s bf16 weight;
* ``fp8blk``: ``create_fp8_quantized_param`` + ``weight_dequant_torch`` (ignored layers' FP8 blocks);
plus a hand-checked nibble example and AngelSlim's w4a8_fp8 fixture vs the original weights.

Two store gaps are bridged here the way the proposed core changes would (see the helpers below):
``schema.split_name`` must keep ``weight_scale.int4`` whole, and ``w4a8`` must be detected before ``fp8``
(AngelSlim's dense-path config.json says compressed-tensors naive-quantized).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from format_fixtures import (
    ANGELSLIM,
    FIXTURES,
    config_dict,
    convert_fails,
    cosine,
    linear_names,
    max_abs_diff,
    parquet_and_reference_logits,
    read_tensors,
    round_trip,
    save_checkpoint,
    tiny_qwen3,
)
from llm_workbook import StoreError, WeightLoaderV2, formats
from llm_workbook import schema
from llm_workbook.formats import w4a8
from llm_workbook.formats.base import TensorInfo, UnsupportedFormatError

VECTORS = FIXTURES / "reference" / "angelslim_vectors.safetensors"
MODULE = "model.layers.0.mlp.experts.0.down_proj"
FP8_MODULE = "model.layers.0.self_attn.q_proj"
DENSE_PATH_QCONFIG = {  # what AngelSlim's PTQSaveVllmHF writes for w4a8_fp8 (see the w4a8_fp8 fixture)
    "quant_method": "compressed-tensors", "format": "naive-quantized", "quantization_status": "compressed",
    "ignore": ["lm_head"], "kv_cache_scheme": None,
    "config_groups": {"group_0": {"targets": ["Linear"], "output_activations": None,
                                  "weights": {"num_bits": 8, "strategy": "group", "dynamic": False, "type": "float"},
                                  "input_activations": {"num_bits": 8, "strategy": "tensor", "dynamic": False,
                                                        "type": "float"}}}}


def _trtllm_qconfig(block=(128, 128), **extra) -> dict:
    return {"quant_method": "w4a8_awq", "weight_group_size": 128, "activation_scheme": "static",
            "kv_cache_quant_method": "fp8", "ignored_layers": ["*self_attn*", "*gate_up_proj", "*down_proj", "*layers.61*"],
            "ignored_quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                            "kv_cache_quant_method": "fp8", "weight_block_size": list(block)}, **extra}


def _vectors() -> dict[str, torch.Tensor]:
    with safe_open(str(VECTORS), "pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys() if k.startswith(("w4a8", "fp8blk"))}


V = _vectors()


# ---------------------------------------------------------------- bridges for the two core gaps


def _split_keeping_dotted_suffix(name: str) -> tuple[str, str]:
    """The proposed ``schema.split_name``: ``X.weight_scale.int4`` -> (``X``, ``weight_scale.int4``)."""
    suffix = w4a8.DOTTED_INT4_SCALE
    if name.endswith("." + suffix):
        return name[: -len(suffix) - 1], suffix
    layer, _, weight = name.rpartition(".")
    return layer, weight


@pytest.fixture
def dotted_names(monkeypatch):
    """Store ``weight_scale.int4`` under its module (a no-op once schema.split_name does it itself)."""
    if schema.split_name(f"a.{w4a8.DOTTED_INT4_SCALE}") != ("a", w4a8.DOTTED_INT4_SCALE):
        monkeypatch.setattr(schema, "split_name", _split_keeping_dotted_suffix)


@pytest.fixture
def w4a8_before_fp8(monkeypatch):
    """Try w4a8 before fp8 (a no-op once the registry orders them so)."""
    order = list(formats._MODULES)
    if order.index("w4a8") > order.index("fp8"):
        order.remove("w4a8")
        order.insert(order.index("fp8"), "w4a8")
        monkeypatch.setattr(formats, "_MODULES", order)


def _write(directory: Path, groups: dict[str, dict[str, torch.Tensor]], qconfig: dict) -> Path:
    state = {f"{module}.{k}": v for module, tensors in groups.items() for k, v in tensors.items()}
    state["model.norm.weight"] = torch.ones(8, dtype=torch.bfloat16)
    return save_checkpoint(directory, state, {"model_type": "deepseek_v3", "quantization_config": qconfig})


def _group_b() -> dict[str, torch.Tensor]:
    return {"qweight": V["w4a8b.qweight"].clone(), "weight_scale": V["w4a8b.weight_scale"].clone(),
            "weight_scale.int4": V["w4a8b.weight_scale.int4"].clone(), "input_scale": torch.tensor([0.01])}


def _group_c() -> dict[str, torch.Tensor]:
    return {s: V[f"w4a8c.{s}"].clone() for s in ("qweight", "weight_scale", "weight_scale_int4", "input_scale")}


def _group_fp8() -> dict[str, torch.Tensor]:
    return {"weight": V["fp8blk.weight_fp8"].clone(), "weight_scale_inv": V["fp8blk.weight_scale_inv"].clone()}


# ---------------------------------------------------------- TRT-LLM layout (paths a/b) + FP8 blocks


def test_trtllm_layout_against_angelslim(tmp_path, dotted_names):
    src = _write(tmp_path / "src", {MODULE: _group_b(), FP8_MODULE: _group_fp8()}, _trtllm_qconfig(block=(16, 16)))
    loader = WeightLoaderV2(round_trip(src, tmp_path))
    assert loader.format_of(MODULE) == "w4a8" and loader.format_of(FP8_MODULE) == "w4a8"
    record = loader.record(MODULE)
    assert record.params["weight_shape"] == [8, 256] and record.params["int4_scale_factor"] == [1, 1]
    # Codes: ours == AngelSlim's unpack_weight_omni.
    assert torch.equal(w4a8.unpack_int4(record.tensors["qweight"]), V["w4a8b.codes"])
    # W = q * weight_scale.int4 (TRT-LLM's per-group dequant scale); the per-tensor fp8 scale does not enter.
    ours = loader.load_weight(MODULE, "weight", dtype=torch.float32)
    expected = V["w4a8b.codes"].float() * V["w4a8b.weight_scale.int4"].float().repeat_interleave(128, dim=1)
    print(f"int4 (trtllm) max |ours - q*s| = {max_abs_diff(ours, expected)}")
    assert torch.equal(ours, expected)
    # ...which is AngelSlim's bf16 weight to within one step (rounding, and the clamp of +8 to +7).
    step = V["w4a8b.weight_scale.int4"].float().repeat_interleave(128, dim=1)
    assert bool(((ours - V["w4a8b.weight"].float()).abs() <= step * 1.0001).all())
    # Ignored layer: FP8 128x128-style blocks (16x16 here), == AngelSlim's weight_dequant_torch.
    fp8_weight = loader.load_weight(FP8_MODULE, "weight", dtype=torch.float32)
    print(f"fp8 block max |ours - AngelSlim| = {max_abs_diff(fp8_weight, V['fp8blk.reference'])}")
    assert torch.equal(fp8_weight, V["fp8blk.reference"])


def test_fp8_block_squeezed_scale(tmp_path, dotted_names):
    """One block row: AngelSlim squeezes weight_scale_inv to 1-D; accepted, dequantized per block."""
    weight = torch.tensor([[1.0, -2.0, 0.5, 4.0], [3.0, 0.25, -1.5, 2.0]]).to(torch.float8_e4m3fn)
    scale = torch.tensor([0.5, 2.0])  # blocks [2 x 2]: columns 0-1 scale 0.5, columns 2-3 scale 2
    src = _write(tmp_path / "src", {FP8_MODULE: {"weight": weight, "weight_scale_inv": scale}}, _trtllm_qconfig(block=(2, 2)))
    ours = WeightLoaderV2(round_trip(src, tmp_path)).load_weight(FP8_MODULE, "weight")
    assert torch.equal(ours, torch.tensor([[0.5, -1.0, 1.0, 8.0], [1.5, 0.125, -3.0, 4.0]]))


def test_hand_checked_nibbles(tmp_path, dotted_names):
    """Bytes 0x7F, 0x80, 0x21, 0xEC: low nibble = even column, two's complement."""
    qweight = torch.tensor([[0x7F, 0x80 - 256, 0x21, 0xEC - 256]], dtype=torch.int8).repeat(2, 1)
    # Read off by hand: 0x7F -> (-1, 7); 0x80 -> (0, -8); 0x21 -> (1, 2); 0xEC -> (-4, -2).
    codes = [-1, 7, 0, -8, 1, 2, -4, -2]
    assert w4a8.unpack_int4(qweight)[0].tolist() == codes
    scale = torch.tensor([[0.5, 0.25], [2.0, 1.0]], dtype=torch.bfloat16)  # group size 4
    group = {"qweight": qweight, "weight_scale": torch.tensor(0.01), "weight_scale.int4": scale}
    src = _write(tmp_path / "src", {MODULE: group}, _trtllm_qconfig(weight_group_size=4))
    ours = WeightLoaderV2(round_trip(src, tmp_path)).load_weight(MODULE, "weight")
    expected = torch.tensor([[-0.5, 3.5, 0.0, -4.0, 0.25, 0.5, -1.0, -0.5],
                             [-2.0, 14.0, 0.0, -16.0, 1.0, 2.0, -4.0, -2.0]])
    print("hand-checked max abs diff", max_abs_diff(ours, expected))
    assert torch.equal(ours, expected)
    assert torch.equal(w4a8.pack_int4(torch.tensor([codes, codes])), qweight)


# ------------------------------------------------------------------------- AngelSlim dense path (c)


def test_dense_path_against_angelslim(tmp_path, w4a8_before_fp8):
    src = _write(tmp_path / "src", {MODULE: _group_c()}, DENSE_PATH_QCONFIG)
    loader = WeightLoaderV2(round_trip(src, tmp_path))
    assert loader.format_of(MODULE) == "w4a8"
    record = loader.record(MODULE)
    assert record.params["int4_scale_factor"] == [8, 7] and record.params["int4_scale"] == "weight_scale_int4"
    assert torch.equal(w4a8.unpack_int4(record.tensors["qweight"]), V["w4a8c.codes"])
    assert int(V["w4a8c.codes"].abs().max()) <= 7  # codes on the absmax/7 grid
    ours = loader.load_weight(MODULE, "weight", dtype=torch.bfloat16)
    fake = V["w4a8c.fakequant"]  # the bf16 weight AngelSlim rounded the codes from
    # One bf16 ulp at each reference value: 2^(exponent - 8) for |x| = mantissa * 2^exponent, mantissa in [0.5, 1).
    ulp = torch.ldexp(torch.ones_like(fake, dtype=torch.float32), torch.frexp(fake.float().abs().clamp(min=2.0**-120)).exponent - 8)
    diff = (ours.float() - fake.float()).abs()
    print(f"dense path: max |ours - AngelSlim fake-quant| = {float(diff.max()):.3g} ({float((diff / ulp).max()):.2f} ulp)")
    assert bool((diff <= ulp).all())
    # AngelSlim's own forward multiplies the codes by weight_scale_int4 alone: 7/8 of that weight.
    runtime = V["w4a8c.runtime"]
    ours32 = loader.load_weight(MODULE, "weight", dtype=torch.float32)
    assert torch.allclose(ours32 * 7 / 8, runtime, rtol=1e-6, atol=0)
    fit = float((runtime * V["w4a8c.weight"].float()).sum() / (V["w4a8c.weight"].float() ** 2).sum())
    print(f"AngelSlim runtime weight / original weight (least squares) = {fit:.3f}")
    assert 0.84 < fit < 0.90


# ------------------------------------------------------------------------------------ model level


def _int4_trtllm(weight: torch.Tensor, group: int = 128):
    """AngelSlim's TRT-LLM recipe, written out: s = group absmax / 8 (bf16), q = clamp(round(W / s), -8, 7)."""
    w = weight.float()
    groups = w.reshape(w.shape[0], -1, group)
    scale = (groups.abs().amax(-1) / 8).clamp(min=1e-5).to(torch.bfloat16)
    codes = torch.clamp(torch.round(groups / scale.float().unsqueeze(-1)), -8, 7).reshape(w.shape)
    return codes.to(torch.int8), scale, codes * scale.float().repeat_interleave(group, dim=1)


def _fp8_block(weight: torch.Tensor, block: int = 128):
    """DeepSeek block FP8 written out: pad to whole blocks, scale = block absmax / 448, crop back."""
    rows, cols = weight.shape
    w = torch.nn.functional.pad(weight.float(), (0, -cols % block, 0, -rows % block))
    blocks = w.reshape(w.shape[0] // block, block, w.shape[1] // block, block)
    scale = blocks.abs().amax((1, 3)) / 448
    q = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn).reshape(w.shape)[:rows, :cols].contiguous()
    full = scale.repeat_interleave(block, 0).repeat_interleave(block, 1)[:rows, :cols]
    return q, scale, q.float() * full


def _pack_pairs(codes: torch.Tensor) -> torch.Tensor:
    """Independent packer: byte k = (code[2k] & 15) | (code[2k+1] << 4), as int8."""
    c = codes.to(torch.int32) & 0xF
    byte = c[:, 0::2] | (c[:, 1::2] << 4)
    return torch.where(byte >= 128, byte - 256, byte).to(torch.int8)


def test_model_logits_match_reference(tmp_path, dotted_names):
    model = tiny_qwen3(seed=11)
    state = dict(model.state_dict())
    checkpoint, reference = dict(state), dict(state)
    for module in linear_names(state):
        weight = checkpoint.pop(f"{module}.weight")
        if "self_attn" in module:  # ignored layers keep FP8 blocks
            q, scale, dequant = _fp8_block(weight)
            checkpoint.update({f"{module}.weight": q, f"{module}.weight_scale_inv": scale})
        else:
            codes, scale, dequant = _int4_trtllm(weight)
            checkpoint.update({f"{module}.qweight": _pack_pairs(codes),
                               f"{module}.weight_scale": (weight.float().abs().max() / 448).to(torch.bfloat16),
                               f"{module}.weight_scale.int4": scale,
                               f"{module}.input_scale": torch.tensor([0.02])})
        reference[f"{module}.weight"] = dequant
    config = config_dict(model, _trtllm_qconfig())
    src = save_checkpoint(tmp_path / "src", checkpoint, config)
    parquet = round_trip(src, tmp_path)
    ours, ref = parquet_and_reference_logits(parquet, config, reference, seed=5)
    print(f"w4a8 model: cosine {cosine(ours, ref):.8f}, max |diff| {max_abs_diff(ours, ref):.3g}")
    assert cosine(ours, ref) >= 0.9999
    assert max_abs_diff(ours, ref) <= 1e-4


# -------------------------------------------------------------------------------------- bad input


def _expect_failure(tmp_path: Path, groups: dict, qconfig: dict, error, match: str) -> None:
    src = _write(tmp_path / "bad", groups, qconfig)
    convert_fails(src, tmp_path, error, match)


def test_bad_int4_scale_shape(tmp_path, dotted_names):
    group = _group_b()
    group["weight_scale.int4"] = group["weight_scale.int4"][:, :1].contiguous()
    _expect_failure(tmp_path, {MODULE: group}, _trtllm_qconfig(), StoreError, r"down_proj\.weight_scale\.int4")


def test_group_size_disagrees_with_config(tmp_path, dotted_names):
    _expect_failure(tmp_path, {MODULE: _group_b()}, _trtllm_qconfig(weight_group_size=64), StoreError,
                    r"down_proj\.weight_scale\.int4")


def test_qweight_wrong_dtype(tmp_path, dotted_names):
    group = _group_b()
    group["qweight"] = group["qweight"].to(torch.int32)
    _expect_failure(tmp_path, {MODULE: group}, _trtllm_qconfig(), StoreError, r"down_proj\.qweight")


def test_bad_block_scale_shape(tmp_path, dotted_names):
    group = _group_fp8()
    group["weight_scale_inv"] = group["weight_scale_inv"][:2].contiguous()
    _expect_failure(tmp_path, {FP8_MODULE: group}, _trtllm_qconfig(block=(16, 16)), StoreError,
                    r"q_proj\.weight_scale_inv")


def test_missing_int4_scale(tmp_path, dotted_names):
    group = _group_b()
    del group["weight_scale.int4"]
    _expect_failure(tmp_path, {MODULE: group}, _trtllm_qconfig(), StoreError, r"down_proj\.weight_scale\.int4")


def test_dotted_scale_name_without_core_support_fails_clearly(tmp_path, monkeypatch):
    """Today's split_name cuts ``weight_scale.int4`` at its last dot: a clear error, not a silent dense row."""
    monkeypatch.setattr(schema, "split_name", lambda name: (name.rpartition(".")[0], name.rpartition(".")[2]))
    _expect_failure(tmp_path, {MODULE: _group_b()}, _trtllm_qconfig(), StoreError, "split_name")


def test_unknown_suffix(tmp_path, dotted_names):
    group = _group_b()
    group["qzeros"] = torch.zeros(2, 2, dtype=torch.int32)
    _expect_failure(tmp_path, {MODULE: group}, _trtllm_qconfig(), UnsupportedFormatError, r"down_proj\.qzeros")


def test_detect_and_claim():
    infos = {"m.qweight": TensorInfo("m.qweight", "I8", (8, 128)), "m.weight_scale_int4": TensorInfo("m.weight_scale_int4", "BF16", (8, 2))}
    assert w4a8.detect(_trtllm_qconfig(), {})
    assert w4a8.detect(DENSE_PATH_QCONFIG, infos)
    assert not w4a8.detect(DENSE_PATH_QCONFIG, {"m.weight": TensorInfo("m.weight", "F8_E4M3", (8, 8))})
    assert not w4a8.detect({"quant_method": "awq"}, infos)
    int4 = {"qweight": TensorInfo("qweight", "I8", (8, 128)), "weight_scale": None, "weight_scale.int4": None,
            "input_scale": None, "bias": None}
    assert w4a8.claim(_trtllm_qconfig(), MODULE, int4) == {"qweight", "weight_scale", "weight_scale.int4", "input_scale"}
    fp8 = {"weight": TensorInfo("weight", "F8_E4M3", (8, 8)), "weight_scale_inv": None}
    assert w4a8.claim(_trtllm_qconfig(), FP8_MODULE, fp8) == {"weight", "weight_scale_inv"}
    assert w4a8.claim(_trtllm_qconfig(), "model.embed_tokens", {"weight": TensorInfo("weight", "BF16", (8, 8))}) == set()


# ------------------------------------------------------------------------------ AngelSlim fixture


def test_angelslim_w4a8_fp8_fixture(tmp_path, w4a8_before_fp8):
    src = ANGELSLIM / "w4a8_fp8"
    if not (src / "model.safetensors").is_file():
        pytest.skip("AngelSlim fixture tests/fixtures/angelslim/w4a8_fp8 not generated yet")
    parquet = round_trip(src, tmp_path)
    loader = WeightLoaderV2(parquet)
    stored, original = read_tensors(src), read_tensors(ANGELSLIM / "original")
    layers = sorted({n.rpartition(".")[0] for n in stored if n.endswith(".qweight")})
    assert layers and all(loader.format_of(layer) == "w4a8" for layer in layers)
    for layer in layers:
        orig = original[f"{layer}.weight"].float()
        scale = stored[f"{layer}.weight_scale_int4"].float()
        group = orig.shape[1] // scale.shape[1]
        # The stored scale is exactly the group absmax / 8 of the original weight...
        assert torch.equal(scale * 8, orig.reshape(orig.shape[0], -1, group).abs().amax(-1))
        # ...while the codes sit on the absmax/7 grid.
        assert int(w4a8.unpack_int4(stored[f"{layer}.qweight"]).abs().max()) == 7
        ours = loader.load_weight(layer, "weight", dtype=torch.float32)
        rel = float((ours - orig).norm() / orig.norm())
        fit = float((ours * orig).sum() / (orig * orig).sum())
        print(f"{layer}: relative error {rel:.3f}, least-squares gain vs original {fit:.3f}")
        assert rel <= 0.2 and 0.95 <= fit <= 1.02  # without the 8/7 factor the gain would be ~0.86
    config = json.loads((ANGELSLIM / "original" / "config.json").read_text())
    ours, ref = parquet_and_reference_logits(parquet, config, original, seed=6)
    print(f"w4a8_fp8 fixture logits vs original: cosine {cosine(ours, ref):.4f}")
    assert cosine(ours, ref) >= 0.95
