"""gptq format: AutoGPTQ v1 checkpoints (qweight / qzeros stored zero-1 / scales / g_idx).

References:
* tests/fixtures/reference/gptq_autogptq_vectors.safetensors: tensors packed by AutoGPTQ 0.7.1's own
  ``QuantLinear.pack`` and dequantized by its CPU fallback (bits 2/3/4/8, sym/asym, act-order g_idx,
  per-channel, fp16/bf16; script next to it);
* a hand-packed 16x8 example whose words are read off by hand;
* AngelSlim's int4_gptq fixture (tests/fixtures/angelslim/int4_gptq) against the original bf16 weights.
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
from llm_workbook.formats import gptq
from llm_workbook.formats.base import UnsupportedFormatError

VECTORS = FIXTURES / "reference" / "gptq_autogptq_vectors.safetensors"
MODULE = "model.layers.0.mlp.down_proj"


def _load_vectors() -> tuple[dict, dict[str, torch.Tensor]]:
    with safe_open(str(VECTORS), "pt") as handle:
        meta = json.loads(handle.metadata()["cases"])
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    return meta, tensors


CASES, VECTOR_TENSORS = _load_vectors()


def _qconfig(bits: int, group_size: int, sym: bool = True, desc_act: bool = False, **extra) -> dict:
    return {"quant_method": "gptq", "checkpoint_format": "gptq", "bits": bits, "group_size": group_size,
            "sym": sym, "desc_act": desc_act, "static_groups": False, **extra}


def _write_single(directory: Path, tensors: dict[str, torch.Tensor], qconfig: dict, module: str = MODULE) -> Path:
    state = {f"{module}.{k}": v for k, v in tensors.items()}
    state["model.norm.weight"] = torch.ones(8, dtype=torch.bfloat16)  # a dense neighbour
    return save_checkpoint(directory, state, {"model_type": "qwen3", "quantization_config": qconfig})


# ------------------------------------------------------------------------ reference: AutoGPTQ itself


@pytest.mark.parametrize("case", sorted(CASES))
def test_dequantize_equals_autogptq(case, tmp_path):
    """Lossless store round trip, then our dequantization == AutoGPTQ's bit for bit (bits 2/3/4/8)."""
    meta = CASES[case]
    tensors = {s: VECTOR_TENSORS[f"{case}.{s}"] for s in ("qweight", "qzeros", "scales", "g_idx")}
    reference = VECTOR_TENSORS[f"{case}.reference"]
    src = _write_single(tmp_path / "src", tensors, _qconfig(meta["bits"], meta["group_size"], meta["sym"], meta["desc_act"]))
    parquet = round_trip(src, tmp_path)
    loader = WeightLoaderV2(parquet)
    assert loader.format_of(MODULE) == "gptq"
    assert loader.rows[f"{MODULE}.qweight"].params["weight_shape"] == list(reference.shape)
    weight = loader.load_weight(MODULE, "weight", dtype=reference.dtype)
    diff = max_abs_diff(weight, reference)
    print(f"{case}: max |ours - AutoGPTQ| = {diff}")
    assert weight.dtype == reference.dtype and weight.shape == reference.shape
    assert torch.equal(weight.view(torch.int16), reference.view(torch.int16))
    integer = gptq.affine(loader.load_weight(MODULE, "weight", dequantize=False))  # the kernels' integer form
    assert torch.equal(integer.dequantize(reference.dtype).view(torch.int16), reference.view(torch.int16))


@pytest.mark.parametrize("case", sorted(CASES))
def test_pack_gptq_reproduces_autogptq_bytes(case):
    """unpack -> pack_gptq gives AutoGPTQ's packed words back exactly (incl. its 3-bit layout)."""
    bits = CASES[case]["bits"]
    tensors = {s: VECTOR_TENSORS[f"{case}.{s}"] for s in ("qweight", "qzeros", "scales", "g_idx")}
    unpacked = gptq.unpack_gptq(tensors, bits)
    repacked = gptq.pack_gptq(unpacked.codes, unpacked.zeros, unpacked.scales, unpacked.g_idx, bits)
    for name, tensor in tensors.items():
        assert repacked[name].dtype == tensor.dtype and torch.equal(repacked[name], tensor), name


def test_vectors_cover_act_order_and_three_bits():
    """The reference file really exercises what the format claims to support."""
    assert {m["bits"] for m in CASES.values()} == {2, 3, 4, 8}
    permuted = [c for c, m in CASES.items() if m["desc_act"]]
    assert permuted
    for case in permuted:
        g_idx = VECTOR_TENSORS[f"{case}.g_idx"]
        size = CASES[case]["group_size"]
        assert not torch.equal(g_idx, torch.arange(g_idx.numel(), dtype=torch.int32) // size)


# ------------------------------------------------------------------------------- hand-checked vector


def _as_int32(value: int) -> int:
    return value - (1 << 32) if value >= 1 << 31 else value


def _hand_pack_4bit_rows(codes_in_out: list[list[int]]) -> torch.Tensor:
    """Pack [in][out] 4-bit codes along ``in``: word r of column o = sum_j code[8r+j][o] << 4j."""
    n_in, n_out = len(codes_in_out), len(codes_in_out[0])
    words = []
    for r in range(n_in // 8):
        row = []
        for o in range(n_out):
            value = 0
            for j in range(8):
                value |= codes_in_out[8 * r + j][o] << (4 * j)
            row.append(_as_int32(value))
        words.append(row)
    return torch.tensor(words, dtype=torch.int32)


def test_hand_checked_16x8_group8(tmp_path):
    """W[o,i] = s[g,o] * (q[o,i] - (stored_zero[g,o] + 1)) with codes we pack and read off by hand."""
    out_features, in_features, group = 8, 16, 8
    codes = [[(o + i) % 16 for o in range(out_features)] for i in range(in_features)]  # [in][out]
    stored_zero = [[(o + 3 * g) % 16 for o in range(out_features)] for g in range(2)]  # zero - 1
    qweight = _hand_pack_4bit_rows(codes)
    # Output column 0 holds codes 0..7 (rows 0..7): nibbles 0,1,...,7 read from the low end.
    assert int(qweight[0, 0]) == 0x76543210
    assert int(qweight[1, 0]) == (0xFEDCBA98 - (1 << 32))
    # qzeros packs the 8 output columns of a group into one word, column o at bits 4o.
    qzeros = torch.tensor([[_as_int32(sum(stored_zero[g][o] << (4 * o) for o in range(8)))] for g in range(2)],
                          dtype=torch.int32)
    scales = torch.tensor([[2.0 ** -(o % 4) for o in range(8)], [0.5 + 0.25 * o for o in range(8)]], dtype=torch.float16)
    tensors = {"qweight": qweight, "qzeros": qzeros, "scales": scales}
    src = _write_single(tmp_path / "src", tensors, _qconfig(4, group, sym=False))
    weight = WeightLoaderV2(round_trip(src, tmp_path)).load_weight(MODULE, "weight", dtype=torch.float32)
    expected = torch.tensor([[float(scales[i // group, o]) * (codes[i][o] - (stored_zero[i // group][o] + 1))
                              for i in range(in_features)] for o in range(out_features)])
    print("hand-checked max abs diff", max_abs_diff(weight, expected))
    assert torch.equal(weight, expected)
    # Two entries read off by hand: o=0,i=0: 1*(0-(0+1)) = -1; o=3,i=9 (group 1): 1.25*(12-(6+1)) = 6.25.
    assert float(weight[0, 0]) == -1.0 and float(weight[3, 9]) == 6.25


def test_missing_g_idx_means_input_over_group_size(tmp_path):
    case = "b4_g16_sym"
    tensors = {s: VECTOR_TENSORS[f"{case}.{s}"] for s in ("qweight", "qzeros", "scales")}
    src = _write_single(tmp_path / "src", tensors, _qconfig(4, 16))
    weight = WeightLoaderV2(round_trip(src, tmp_path)).load_weight(MODULE, "weight", dtype=torch.float16)
    assert torch.equal(weight, VECTOR_TENSORS[f"{case}.reference"])


# ------------------------------------------------------------------------------ pack / unpack helpers


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_unpack_round_trip_random(bits):
    gen = torch.Generator().manual_seed(bits)
    out_features, in_features, group = 64, 96, 32
    top = 2**bits - 1
    codes = torch.randint(0, top + 1, (out_features, in_features), generator=gen)
    zeros = torch.randint(1, top + 2, (in_features // group, out_features), generator=gen)  # includes 2^bits
    scales = torch.rand(in_features // group, out_features, generator=gen).to(torch.bfloat16)
    g_idx = (torch.randperm(in_features, generator=gen) // group).to(torch.int32)
    packed = gptq.pack_gptq(codes, zeros, scales, g_idx, bits)
    assert packed["qweight"].shape == (in_features * bits // 32, out_features)
    assert packed["qzeros"].shape == (in_features // group, out_features * bits // 32)
    back = gptq.unpack_gptq(packed, bits)
    assert torch.equal(back.codes, codes.to(torch.int32))
    assert torch.equal(back.zeros, zeros.to(torch.int32))
    assert torch.equal(back.g_idx, g_idx)
    # Dequantization agrees with the formula written out here.
    expected = scales.float()[g_idx.long()].t() * (codes.float() - zeros.float()[g_idx.long()].t())
    assert torch.equal(back.dequantize(torch.float32), expected)


def test_pack_gptq_rejects_bad_input():
    codes = torch.zeros(32, 64, dtype=torch.int64)
    scales = torch.ones(2, 32)
    with pytest.raises(ValueError, match="zero points"):
        gptq.pack_gptq(codes, torch.zeros(2, 32, dtype=torch.int64), scales, None, 4)  # zero 0: v1 cannot store it
    with pytest.raises(ValueError, match="codes"):
        gptq.pack_gptq(codes + 16, torch.ones(2, 32, dtype=torch.int64), scales, None, 4)
    with pytest.raises(ValueError, match="bits"):
        gptq.pack_gptq(codes, torch.ones(2, 32, dtype=torch.int64), scales, None, 5)
    with pytest.raises(ValueError, match="g_idx"):
        gptq.pack_gptq(codes, torch.ones(2, 32, dtype=torch.int64), scales, torch.full((64,), 2), 4)


# ---------------------------------------------------------------------------------------- model level


def _rtn(weight: torch.Tensor, bits: int, group: int, sym: bool, g_idx: torch.Tensor):
    """Independent round-to-nearest quantizer: codes [out,in], zeros [G,out] in [1, 2^bits], scales [G,out] bf16."""
    top = 2**bits - 1
    w = weight.float()
    n_groups = int(g_idx.max()) + 1
    scales = torch.empty(n_groups, w.shape[0])
    zeros = torch.empty(n_groups, w.shape[0])
    for g in range(n_groups):
        cols = w[:, g_idx == g]
        low, high = cols.amin(1).clamp(max=0), cols.amax(1).clamp(min=0)
        if sym:
            high = torch.maximum(-low, high)
            low = -high
        scale = ((high - low) / top).clamp(min=1e-8)
        scales[g] = scale
        zeros[g] = torch.full_like(scale, (top + 1) // 2) if sym else torch.round(-low / scale).clamp(1, top)
    scales = scales.to(torch.bfloat16)
    s_full = scales.float()[g_idx.long()].t()
    z_full = zeros[g_idx.long()].t()
    codes = torch.clamp(torch.round(w / s_full) + z_full, 0, top)
    return codes.to(torch.int64), zeros.to(torch.int64), scales, s_full * (codes - z_full)


@pytest.mark.parametrize("sym,act_order", [(True, False), (False, True)])
def test_model_logits_match_reference(sym, act_order, tmp_path):
    model = tiny_qwen3(seed=3)
    state = {k: v for k, v in model.state_dict().items()}
    bits, group = 4, 128
    gen = torch.Generator().manual_seed(7)
    checkpoint, reference = dict(state), dict(state)
    for module in linear_names(state):
        weight = checkpoint.pop(f"{module}.weight")
        in_features = weight.shape[1]
        g_idx = (torch.arange(in_features) // group).to(torch.int32)
        if act_order:
            g_idx = g_idx[torch.randperm(in_features, generator=gen)]
        codes, zeros, scales, dequant = _rtn(weight, bits, group, sym, g_idx)
        packed = gptq.pack_gptq(codes, zeros, scales, g_idx, bits)
        checkpoint.update({f"{module}.{k}": v for k, v in packed.items()})
        reference[f"{module}.weight"] = dequant
    qconfig = _qconfig(bits, group, sym=sym, desc_act=act_order)
    config = config_dict(model, qconfig)
    src = save_checkpoint(tmp_path / "src", checkpoint, config)
    parquet = round_trip(src, tmp_path)
    ours, ref = parquet_and_reference_logits(parquet, config, reference, seed=1)
    print(f"sym={sym} act_order={act_order}: cosine {cosine(ours, ref):.8f}, max |diff| {max_abs_diff(ours, ref):.3g}")
    assert cosine(ours, ref) >= 0.9999
    assert max_abs_diff(ours, ref) <= 1e-4


# ------------------------------------------------------------------------------------------ bad input


def _expect_failure(tmp_path: Path, tensors: dict, qconfig: dict, error, match: str) -> None:
    src = _write_single(tmp_path / "bad", tensors, qconfig)
    convert_fails(src, tmp_path, error, match)


def _good() -> dict[str, torch.Tensor]:
    return {s: VECTOR_TENSORS[f"b4_g16_sym.{s}"].clone() for s in ("qweight", "qzeros", "scales", "g_idx")}


def test_bad_scales_shape(tmp_path):
    tensors = _good()
    tensors["scales"] = tensors["scales"][:-1].contiguous()
    _expect_failure(tmp_path, tensors, _qconfig(4, 16), StoreError, r"down_proj\.scales")


def test_bad_qweight_dtype(tmp_path):
    tensors = _good()
    tensors["qweight"] = tensors["qweight"].to(torch.int64)
    _expect_failure(tmp_path, tensors, _qconfig(4, 16), StoreError, r"down_proj\.qweight")


def test_bad_qzeros_shape(tmp_path):
    tensors = _good()
    tensors["qzeros"] = torch.cat([tensors["qzeros"], tensors["qzeros"]], dim=1)
    _expect_failure(tmp_path, tensors, _qconfig(4, 16), StoreError, r"down_proj\.qzeros")


def test_g_idx_out_of_range(tmp_path):
    tensors = _good()
    tensors["g_idx"] = tensors["g_idx"] + 1
    _expect_failure(tmp_path, tensors, _qconfig(4, 16), StoreError, r"down_proj\.g_idx")


def test_group_size_not_matching(tmp_path):
    _expect_failure(tmp_path, _good(), _qconfig(4, 32), StoreError, r"down_proj\.scales")


def test_unknown_suffix_in_gptq_module(tmp_path):
    tensors = _good()
    tensors["weight_scale"] = torch.ones(1)
    _expect_failure(tmp_path, tensors, _qconfig(4, 16), UnsupportedFormatError, r"down_proj\.weight_scale")


@pytest.mark.parametrize("qconfig,match", [
    (_qconfig(4, 16, checkpoint_format="gptq_v2"), "checkpoint_format"),
    (_qconfig(5, 16), "bits"),
    ({"quant_method": "gptq-ish", "bits": 4}, "unsupported quantization_config"),
])
def test_unsupported_configs(qconfig, match, tmp_path):
    _expect_failure(tmp_path, _good(), qconfig, UnsupportedFormatError, match)


def test_detect_and_claim():
    infos = {"qweight": None, "qzeros": None, "scales": None, "g_idx": None, "bias": None}
    assert gptq.detect({"quant_method": "gptq", "bits": 4}, {})  # missing checkpoint_format = v1
    assert not gptq.detect({"quant_method": "awq", "bits": 4}, {})
    assert not gptq.detect(None, {})
    qconfig = _qconfig(4, 128, modules_to_not_convert=["lm_head"], dynamic={"-:.*\\.k_proj$": {}, ".*\\.v_proj$": {"bits": 8}})
    assert gptq.claim(qconfig, "model.layers.0.self_attn.q_proj", infos) == {"qweight", "qzeros", "scales", "g_idx"}
    assert gptq.claim(qconfig, "lm_head", infos) == set()
    assert gptq.claim(qconfig, "model.layers.0.self_attn.k_proj", infos) == set()
    assert gptq.module_config(qconfig, "model.layers.0.self_attn.v_proj")["bits"] == 8
    assert gptq.claim(qconfig, "model.layers.0.mlp.up_proj", {"weight": None}) == set()


# ------------------------------------------------------------------------------ AngelSlim fixture


def _independent_unpack_4bit_rows(words: torch.Tensor) -> torch.Tensor:
    """[n, m] int32 -> [8n, m] nibbles, input 8r+j at bits 4j of word r (written out, no shared code)."""
    parts = [((words >> (4 * j)) & 0xF) for j in range(8)]
    return torch.stack(parts, dim=1).reshape(words.shape[0] * 8, words.shape[1])


def test_angelslim_int4_gptq_fixture(tmp_path):
    src = ANGELSLIM / "int4_gptq"
    if not (src / "model.safetensors").is_file():
        pytest.skip("AngelSlim fixture tests/fixtures/angelslim/int4_gptq not generated yet")
    parquet = round_trip(src, tmp_path)
    loader = WeightLoaderV2(parquet)
    qconfig = json.loads((src / "config.json").read_text())["quantization_config"]
    original = read_tensors(ANGELSLIM / "original")
    stored = read_tensors(src)
    layers = sorted({n.rpartition(".")[0] for n in stored if n.endswith(".qweight")})
    assert layers and all(loader.format_of(layer) == "gptq" for layer in layers)
    for layer in layers:
        qweight, qzeros, scales = (stored[f"{layer}.{s}"] for s in ("qweight", "qzeros", "scales"))
        # Symmetric 4-bit: every zero point is 8, stored as 7 (GPTQ v1 keeps zero - 1).
        assert torch.equal(_independent_unpack_4bit_rows(qzeros.t().contiguous()), torch.full((qzeros.shape[1] * 8, qzeros.shape[0]), 7))
        # AngelSlim v0.5 static-group act-order: g_idx is trivial.
        g_idx = stored[f"{layer}.g_idx"]
        assert torch.equal(g_idx, (torch.arange(g_idx.numel()) // qconfig["group_size"]).to(torch.int32))
        codes = _independent_unpack_4bit_rows(qweight).float()  # [in, out]
        group = torch.arange(codes.shape[0]) // qconfig["group_size"]
        expected = (scales.float()[group] * (codes - 8)).t().to(torch.bfloat16)
        ours = loader.load_weight(layer, "weight", dtype=torch.bfloat16)
        assert torch.equal(ours, expected), layer
        orig = original[f"{layer}.weight"].float()
        cos = cosine(ours, orig)
        rel = float((ours.float() - orig).norm() / orig.norm())
        print(f"{layer}: cosine vs original {cos:.4f}, relative error {rel:.3f}")
        assert cos >= 0.97 and rel <= 0.25
    # The whole model: close to the original bf16 model (GPTQ error only, nothing folded).
    config = json.loads((ANGELSLIM / "original" / "config.json").read_text())
    ours, ref = parquet_and_reference_logits(parquet, config, original, seed=2)
    print(f"int4_gptq fixture logits vs original: cosine {cosine(ours, ref):.4f}")
    assert cosine(ours, ref) >= 0.95


def test_registry_picks_gptq():
    assert formats.detect(_qconfig(4, 128), {}).NAME == "gptq"
