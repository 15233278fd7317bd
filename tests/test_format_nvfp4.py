"""nvfp4 format: AngelSlim's ModelOpt-style NVFP4 tensors (weight / weight_scale / weight_scale_2) under
its compressed-tensors naive-quantized config, and compressed-tensors nvfp4-pack-quantized.

References: compressed-tensors' NVFP4PackedCompressor writes the compressed-tensors fixtures and its
decompress is the reference; the ModelOpt layout is checked with a hand-checked 2x32 example, and by
packing the same weight both ways (weight_scale_2 == 1 / weight_global_scale) and asking for the same
float tensor.
"""

from __future__ import annotations

import json

import pytest
import torch
from compressed_tensors.compressors import NVFP4PackedCompressor
from compressed_tensors.quantization import preset_name_to_scheme

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
from llm_workbook import StoreError, WeightLoaderV2, formats
from llm_workbook.formats import nvfp4
from llm_workbook.formats.base import QuantizedTensor, TensorInfo, UnsupportedFormatError

SCHEME = preset_name_to_scheme("NVFP4", ["Linear"])
CT_NVFP4 = ct_config(SCHEME, "nvfp4-pack-quantized")
# AngelSlim PTQ nvfp4 (save.py::PTQSaveVllmHF): compressed-tensors wrapper, naive-quantized, no strategy
ANGELSLIM_NVFP4 = {
    "quant_method": "compressed-tensors", "format": "naive-quantized", "ignore": ["lm_head"], "kv_cache_scheme": None,
    "quantization_status": "compressed",
    "config_groups": {"group_0": {"targets": ["Linear"],
                                  "weights": {"num_bits": 4, "group_size": 16, "type": "float", "dynamic": False},
                                  "input_activations": {"num_bits": 4, "group_size": 16, "type": "float", "dynamic": False},
                                  "output_activations": None}},
}
HF_QUANT_CONFIG = {"quantization": {"exclude_modules": ["lm_head"], "kv_cache_quant_algo": None, "quant_algo": "NVFP4",
                                    "group_size": 16}}


def _record(qconfig: dict, tensors: dict[str, torch.Tensor], module: str = "m") -> QuantizedTensor:
    rows = nvfp4.to_rows(qconfig, module, tensors)
    assert all(r.format == "nvfp4" and r.params == rows[0].params for r in rows)
    assert all(r.data is tensors[r.tensor_name.rpartition(".")[2]] for r in rows)
    return QuantizedTensor("nvfp4", module, {r.tensor_name.rpartition(".")[2]: r.data for r in rows}, rows[0].params)


def _weight(out: int, in_: int, seed: int = 0) -> torch.Tensor:
    return (torch.randn(out, in_, generator=torch.Generator().manual_seed(seed)) * 0.05).to(torch.bfloat16)


def _ct_compress(weight: torch.Tensor, global_scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    from compressed_tensors.quantization.utils import generate_gparam

    if global_scale is None:
        global_scale = generate_gparam(weight.float().amin(), weight.float().amax())
    scale, _ = ct_qparams(weight, SCHEME.weights, global_scale)
    return NVFP4PackedCompressor.compress({"weight": weight, "weight_scale": scale, "weight_global_scale": global_scale}, SCHEME)


def _as_modelopt(ct: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same codes and block scales under ModelOpt names, with weight_scale_2 = 1 / global scale."""
    return {"weight": ct["weight_packed"], "weight_scale": ct["weight_scale"],
            "weight_scale_2": (1.0 / ct["weight_global_scale"].float()).reshape(()), "input_scale": torch.tensor(0.002)}


def test_compressed_tensors_layout_equals_compressed_tensors():
    state = _ct_compress(_weight(64, 256))
    assert state["weight_packed"].dtype == torch.uint8 and state["weight_scale"].dtype == torch.float8_e4m3fn
    reference = NVFP4PackedCompressor.decompress(dict(state), SCHEME)["weight"]
    record = _record(CT_NVFP4, state)
    assert record.params == {"layout": "compressed-tensors", "group_size": 16, "weight_shape": [64, 256]}
    ours = nvfp4.dequantize(record, reference.dtype)
    diff = max_abs_diff(ours, reference)
    print(f"nvfp4 compressed-tensors layout: max abs diff vs compressed-tensors = {diff}")
    assert diff == 0.0
    assert torch.equal(nvfp4.dequantize(record, torch.float32).to(reference.dtype), reference)


def test_modelopt_hand_checked_2x32():
    """Row 0: bytes 0x10 0x32 ... 0xFE read as codes 0..15 (low nibble first) in both groups; row 1: bytes 0x7F
    read as codes 15 (-6) then 7 (+6). Block scales [[1, 2], [0.5, 448]], weight_scale_2 = 0.25."""
    row0 = torch.tensor([0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE] * 2, dtype=torch.uint8)
    row1 = torch.full((16,), 0x7F, dtype=torch.uint8)
    tensors = {
        "weight": torch.stack([row0, row1]),
        "weight_scale": torch.tensor([[1.0, 2.0], [0.5, 448.0]]).to(torch.float8_e4m3fn),
        "weight_scale_2": torch.tensor(0.25),
    }
    g0 = [0.0, 0.125, 0.25, 0.375, 0.5, 0.75, 1.0, 1.5, -0.0, -0.125, -0.25, -0.375, -0.5, -0.75, -1.0, -1.5]
    g1 = [0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, -0.0, -0.25, -0.5, -0.75, -1.0, -1.5, -2.0, -3.0]
    expected = torch.tensor([g0 + g1, [-0.75, 0.75] * 8 + [-672.0, 672.0] * 8])
    record = _record(ANGELSLIM_NVFP4, tensors)
    assert record.params["layout"] == "modelopt" and record.params["weight_shape"] == [2, 32]
    ours = nvfp4.dequantize(record)
    print(f"nvfp4 modelopt hand-checked: max abs diff = {max_abs_diff(ours, expected)}")
    assert torch.equal(ours, expected)
    assert torch.equal(torch.signbit(ours), torch.signbit(expected))  # -0.0 codes keep their sign


@pytest.mark.parametrize("global_scale", [torch.tensor([4096.0]), None], ids=["power-of-two", "amax-derived"])
def test_both_layouts_agree(global_scale):
    """The same weight packed both ways dequantizes to the same tensor when weight_scale_2 == 1/weight_global_scale:
    bit-exact when that reciprocal is exact (a power of two), else within an ulp of float32."""
    ct = _ct_compress(_weight(96, 128, seed=1), global_scale)
    from_ct = nvfp4.dequantize(_record(CT_NVFP4, ct))
    from_modelopt = nvfp4.dequantize(_record(ANGELSLIM_NVFP4, _as_modelopt(ct)))
    diff = max_abs_diff(from_ct, from_modelopt)
    kind = "power-of-two" if global_scale is not None else "amax-derived"
    print(f"nvfp4 modelopt vs compressed-tensors layout ({kind} global scale): max abs diff = {diff}")
    if global_scale is not None:
        assert torch.equal(from_ct, from_modelopt)
        reference = NVFP4PackedCompressor.decompress(dict(ct), SCHEME)["weight"]
        assert torch.equal(from_modelopt.to(torch.bfloat16), reference)
    else:
        assert torch.allclose(from_ct, from_modelopt, rtol=2.0**-22, atol=0.0)


# ------------------------------------------------------------------------------------- detection


def test_detect_by_config_and_tensor_names():
    modelopt = {"m.weight": TensorInfo("m.weight", "U8", (2, 16)), "m.weight_scale_2": TensorInfo("m.weight_scale_2", "F32", ())}
    assert nvfp4.detect(ANGELSLIM_NVFP4, modelopt)
    assert not nvfp4.detect(ANGELSLIM_NVFP4, {"m.weight": TensorInfo("m.weight", "U8", (2, 16))})
    with pytest.raises(UnsupportedFormatError):
        formats.detect(ANGELSLIM_NVFP4, {"m.weight": TensorInfo("m.weight", "U8", (2, 16))})
    assert nvfp4.detect(CT_NVFP4, {})
    assert nvfp4.detect({"quant_method": "nvfp4"}, modelopt)
    assert nvfp4.detect({"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16}, modelopt)
    assert not nvfp4.detect({"quant_method": "modelopt", "quant_algo": "FP8"}, modelopt)
    for other in ("fp8", "int8", "packed"):
        assert not formats.get_format(other).detect(ANGELSLIM_NVFP4, modelopt)
        assert not formats.get_format(other).detect(CT_NVFP4, {})
    assert formats.detect(ANGELSLIM_NVFP4, modelopt).NAME == "nvfp4"


def test_claim_by_layout():
    info = TensorInfo("x", "U8", (1,))
    modelopt = {s: info for s in ("weight", "weight_scale", "weight_scale_2", "input_scale", "bias")}
    compressed = {s: info for s in ("weight_packed", "weight_scale", "weight_global_scale", "input_global_scale", "bias")}
    assert nvfp4.claim(ANGELSLIM_NVFP4, "a.q_proj", modelopt) == set(modelopt) - {"bias"}
    assert nvfp4.claim(CT_NVFP4, "a.q_proj", compressed) == set(compressed) - {"bias"}
    assert nvfp4.claim(ANGELSLIM_NVFP4, "lm_head", modelopt) == set()
    assert nvfp4.claim(ANGELSLIM_NVFP4, "a.norm", {"weight": info}) == set()


def test_bad_inputs_name_the_tensor():
    good = _as_modelopt(_ct_compress(_weight(32, 64)))

    def fails(change: dict, match: str, qconfig=ANGELSLIM_NVFP4):
        with pytest.raises(StoreError, match=match):
            nvfp4.to_rows(qconfig, "m", {**good, **change})

    fails({"weight_scale": good["weight_scale"].float()}, r"m\.weight_scale.*dtype F32")
    fails({"weight_scale": good["weight_scale"][:, :3]}, r"m\.weight_scale.*\[32, 4\]")
    fails({"weight": good["weight"].view(torch.int8)}, r"m\.weight.*dtype I8")
    fails({"weight_scale_2": torch.ones(2)}, r"m\.weight_scale_2.*one value")
    fails({"weight_packed": good["weight"]}, r"do not belong")
    fails({"weight": good["weight"][:, :12]}, r"24 input features are not a multiple of the group size 16")
    with pytest.raises(StoreError, match=r"m\.weight_scale_2"):
        nvfp4.to_rows(ANGELSLIM_NVFP4, "m", {k: v for k, v in good.items() if k != "weight_scale_2"})


# ------------------------------------------------------------------------- checkpoints and models


@pytest.mark.parametrize("layout", ["compressed-tensors", "angelslim-modelopt"])
def test_checkpoint_round_trip_and_model(tmp_path, layout):
    model = tiny_qwen3(seed=4)
    state = model.state_dict()
    modules = linear_names(state)
    compressed, reference = ct_compress_linears(state, modules, SCHEME, NVFP4PackedCompressor)
    files = {}
    if layout == "compressed-tensors":
        qconfig = CT_NVFP4
        for module in modules:
            compressed[f"{module}.input_global_scale"] = torch.tensor([1000.0])
    else:
        qconfig = ANGELSLIM_NVFP4
        files = {"hf_quant_config.json": json.dumps(HF_QUANT_CONFIG, indent=2)}
        for module in modules:
            ct = {s: compressed.pop(f"{module}.{s}") for s in ("weight_packed", "weight_scale", "weight_global_scale")}
            compressed.update({f"{module}.{s}": t for s, t in _as_modelopt(ct).items()})
    config = config_dict(model, qconfig)
    src = save_checkpoint(tmp_path / "src", compressed, config, files)
    parquet = round_trip(src, tmp_path)
    for name in files:
        assert (tmp_path / "exported" / name).read_bytes() == (src / name).read_bytes()
    loader = WeightLoaderV2(parquet)
    assert {loader.format_of(m) for m in modules} == {"nvfp4"} and loader.format_of("lm_head") == "dense"
    worst = max(max_abs_diff(loader.load_weight(m, "weight", dtype=torch.bfloat16), reference[f"{m}.weight"]) for m in modules)
    print(f"nvfp4 {layout} checkpoint: worst layer max abs diff vs compressed-tensors = {worst}")
    if layout == "compressed-tensors":
        assert worst == 0.0
    ours, ref = parquet_and_reference_logits(parquet, config, reference)
    print(f"nvfp4 {layout} model logits cosine = {cosine(ours, ref)}")
    assert cosine(ours, ref) >= 0.9999


def test_bad_checkpoint_leaves_no_output(tmp_path):
    model = tiny_qwen3(seed=4)
    state = model.state_dict()
    modules = linear_names(state)
    compressed, _ = ct_compress_linears(state, modules, SCHEME, NVFP4PackedCompressor)
    compressed[f"{modules[2]}.weight_scale"] = compressed[f"{modules[2]}.weight_scale"].float()
    src = save_checkpoint(tmp_path / "src", compressed, config_dict(model, CT_NVFP4))
    out = tmp_path / "out.parquet"
    with pytest.raises(StoreError, match=rf"{modules[2]}\.weight_scale.*F32"):
        convert(src, out)
    assert not out.exists() and read_tensors(src)
