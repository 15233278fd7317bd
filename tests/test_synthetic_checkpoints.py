"""writers.write_checkpoint: real on-disk quantized checkpoints from a bf16 original.

For each format: the directory converts losslessly (convert -> export -> bit-equal, same
quantization_config), the store reads it with the expected format module, tensor dtypes/shapes and
config keys are the ones AngelSlim writes (facts from shared/reference/angelslim-formats.md, written
out here literally), the codes match an independent implementation of AngelSlim's formula where one
exists, and the dequantized model's logits are close to the original's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from format_fixtures import cosine, round_trip  # noqa: E402
from llm_workbook import WeightLoaderV2  # noqa: E402
from llm_workbook.store import inventory as catalog
from llm_workbook.synthetic import toy_models
from llm_workbook.synthetic import checkpoints as writers
from llm_workbook.formats import awq  # noqa: E402
from llm_workbook.runtime.model import model_from_parquet  # noqa: E402

HIDDEN, INTERMEDIATE, HEAD_DIM = 128, 256, 64
K_PROJ = "model.layers.0.self_attn.k_proj"  # [64, 128]
DOWN_PROJ = "model.layers.1.mlp.down_proj"  # [128, 256]
# Small calibration so the whole file stays fast; the default set uses more.
CALIBRATION = {"n_samples": 8, "seq_len": 64}
OPTIONS = {"fp8_static": CALIBRATION, "gptq_int4": CALIBRATION, "nvfp4": CALIBRATION}
# Store format module that must read each writer's output.
STORE_FORMAT = {
    "fp8_static": "fp8", "fp8_dynamic": "fp8", "fp8_block": "fp8", "int8_w8a8": "int8",
    "gptq_int4": "gptq", "awq_int4": "awq", "seq_2bit": "grid", "nvfp4": "nvfp4",
}
# Logit cosine floors vs the bf16 original (brief: >= 0.99 for 8-bit, >= 0.9 for 4-bit; 2-bit reported only).
MIN_COSINE = {
    "fp8_static": 0.99, "fp8_dynamic": 0.99, "fp8_block": 0.99, "int8_w8a8": 0.99,
    "gptq_int4": 0.9, "awq_int4": 0.9, "nvfp4": 0.9, "seq_2bit": 0.5,
}


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    """A tiny random Qwen3 (hidden 128, intermediate 256, 2 layers) in bf16 with the BPE tokenizer.

    Linear weights drawn with std 0.05 (not 0.02) so the decoder layers, not the embeddings, shape
    the logits and quantization error shows in them.
    """
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("writers") / "src"
    toy_models.build_tokenizer(out)
    config = toy_models.tiny_config("qwen3", hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_layers=2,
                                    num_heads=2, num_kv_heads=1, head_dim=HEAD_DIM, max_position_embeddings=256)
    config.initializer_range = 0.05
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.to(torch.bfloat16).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def original_tensors(src: Path) -> dict[str, torch.Tensor]:
    return load_file(str(src / "model.safetensors"))


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(4, toy_models.TOKENIZER_VOCAB_SIZE, (2, 48), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def original_logits(src: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.fixture(scope="module")
def written(src: Path, tmp_path_factory) -> dict[str, Path]:
    """Every format written once from ``src`` (shared by the tests below)."""
    root = tmp_path_factory.mktemp("written")
    return {fmt: writers.write_checkpoint(src, root / fmt, fmt, **OPTIONS.get(fmt, {})) for fmt in writers.FORMATS}


def _config(directory: Path) -> dict:
    return json.loads((directory / "config.json").read_text())


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


# ----------------------------------------------------------------------------- every format


@pytest.mark.parametrize("fmt", writers.FORMATS)
def test_lossless_store_and_logits_close(fmt, written, original_logits, ids, tmp_path) -> None:
    parquet = round_trip(written[fmt], tmp_path)  # bit-equal tensors, identical quantization_config
    loader = WeightLoaderV2(parquet)
    formats = {info.format for info in loader.rows.values()}
    assert STORE_FORMAT[fmt] in formats, formats
    with torch.no_grad():
        logits = model_from_parquet(parquet, dtype=torch.float32)(input_ids=ids).logits.float()
    value = cosine(logits, original_logits)
    print(f"{fmt}: logit cosine vs bf16 original = {value:.5f}")
    assert value >= MIN_COSINE[fmt], (fmt, value)
    assert value < 1.0 - 1e-7, f"{fmt}: logits identical to the original, nothing was quantized"


@pytest.mark.parametrize("fmt", writers.FORMATS)
def test_side_files_copied_and_unquantized_tensors_untouched(fmt, written, src, original_tensors) -> None:
    out = written[fmt]
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    tensors = _tensors(out)
    for name in ("lm_head.weight", "model.embed_tokens.weight", "model.norm.weight",
                 "model.layers.0.input_layernorm.weight", "model.layers.0.self_attn.k_norm.weight"):
        if fmt == "seq_2bit":  # HY-1.8B-2Bit stores every tensor as float32: the same values, widened
            assert tensors[name].dtype == torch.float32 and torch.equal(tensors[name], original_tensors[name].float())
            continue
        assert tensors[name].dtype == torch.bfloat16
        assert torch.equal(tensors[name].view(torch.int16), original_tensors[name].view(torch.int16)), name


# ----------------------------------------------------------------------------- per format: layout


def test_fp8_static_layout_config_and_codes(written, original_tensors) -> None:
    out = written["fp8_static"]
    t = _tensors(out)
    assert (t[f"{K_PROJ}.weight"].dtype, t[f"{K_PROJ}.weight"].shape) == (torch.float8_e4m3fn, (64, 128))
    assert (t[f"{K_PROJ}.weight_scale"].dtype, t[f"{K_PROJ}.weight_scale"].shape) == (torch.float32, (1,))
    assert (t[f"{K_PROJ}.input_scale"].dtype, t[f"{K_PROJ}.input_scale"].shape) == (torch.bfloat16, (1,))
    assert float(t[f"{K_PROJ}.input_scale"]) > 0
    assert _config(out)["quantization_config"] == {
        "quant_method": "compressed-tensors", "ignore": ["lm_head", "lm_head"], "format": "naive-quantized",
        "config_groups": {"group_0": {
            "weights": {"num_bits": 8, "strategy": "tensor", "dynamic": False, "type": "float"},
            "input_activations": {"num_bits": 8, "strategy": "tensor", "dynamic": False, "type": "float"},
            "output_activations": None, "targets": ["Linear"]}},
        "kv_cache_scheme": None, "quantization_status": "compressed",
    }
    hf_quant = json.loads((out / "hf_quant_config.json").read_text())
    assert hf_quant["quantization"]["quant_algo"] == "FP8"
    # AngelSlim: scale = bf16 absmax / 448 in bf16; codes = fp8(clamp(W / scale)) with bf16 division.
    w = original_tensors[f"{K_PROJ}.weight"]
    scale = w.abs().amax() / torch.tensor(448.0, dtype=torch.bfloat16)
    expected = torch.clamp(w / scale, -448, 448).to(torch.float8_e4m3fn)
    assert float(t[f"{K_PROJ}.weight_scale"]) == float(scale)
    assert torch.equal(t[f"{K_PROJ}.weight"].view(torch.uint8), expected.view(torch.uint8))


def test_fp8_dynamic_has_no_input_scale(written) -> None:
    t = _tensors(written["fp8_dynamic"])
    assert not any(name.endswith("input_scale") for name in t)
    groups = _config(written["fp8_dynamic"])["quantization_config"]["config_groups"]["group_0"]
    assert groups["input_activations"]["dynamic"] is True


def test_fp8_block_layout_config_and_dequant(written, original_tensors) -> None:
    out = written["fp8_block"]
    t = _tensors(out)
    assert _config(out)["quantization_config"] == {
        "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
        "modules_to_not_convert": ["lm_head"], "weight_block_size": [128, 128],
    }
    down = t[f"{DOWN_PROJ}.weight_scale_inv"]
    # [128, 256] -> one block row, two block columns; AngelSlim squeezes the scale to 1-D
    assert (down.dtype, down.shape) == (torch.float32, (2,))
    # AngelSlim: q = fp8(clamp(w * (448 / block_absmax))), scale_inv = block_absmax / 448 (a multiplier)
    w = original_tensors[f"{DOWN_PROJ}.weight"].float()
    absmax = torch.stack([w[:, :128].abs().amax(), w[:, 128:].abs().amax()])
    multiplier = 448.0 / absmax
    expected = torch.cat([torch.clamp(w[:, :128] * multiplier[0], -448, 448), torch.clamp(w[:, 128:] * multiplier[1], -448, 448)], 1)
    assert torch.equal(t[f"{DOWN_PROJ}.weight"].view(torch.uint8), expected.to(torch.float8_e4m3fn).view(torch.uint8))
    assert torch.equal(down, multiplier.reciprocal())


def test_int8_layout_config_and_codes(written, original_tensors) -> None:
    out = written["int8_w8a8"]
    t = _tensors(out)
    assert (t[f"{K_PROJ}.weight"].dtype, t[f"{K_PROJ}.weight_scale"].dtype, t[f"{K_PROJ}.weight_scale"].shape) == (
        torch.int8, torch.bfloat16, (64, 1))
    qconfig = _config(out)["quantization_config"]
    assert qconfig["format"] == "int-quantized" and qconfig["ignore"] == ["lm_head", "lm_head"]
    assert qconfig["config_groups"]["group_0"]["weights"] == {"num_bits": 8, "strategy": "channel", "dynamic": False, "type": "int"}
    assert qconfig["config_groups"]["group_0"]["input_activations"] == {"num_bits": 8, "strategy": "token", "dynamic": True, "type": "int"}
    # AngelSlim quantize_weight_int: scale = absmax / 127, q = clamp(round(w / scale), -128, 127), all in bf16
    w = original_tensors[f"{K_PROJ}.weight"]
    scale = w.abs().amax(dim=1, keepdim=True) / 127
    assert torch.equal(t[f"{K_PROJ}.weight_scale"], scale)
    assert torch.equal(t[f"{K_PROJ}.weight"], torch.clamp(torch.round(w / scale), -128, 127).to(torch.int8))


def test_gptq_layout_and_config(written, original_tensors) -> None:
    out = written["gptq_int4"]
    t = _tensors(out)
    shapes = {s: (t[f"{DOWN_PROJ}.{s}"].dtype, tuple(t[f"{DOWN_PROJ}.{s}"].shape)) for s in ("qweight", "qzeros", "scales", "g_idx")}
    assert shapes == {"qweight": (torch.int32, (32, 128)), "qzeros": (torch.int32, (2, 16)),
                      "scales": (torch.bfloat16, (2, 128)), "g_idx": (torch.int32, (256,))}
    assert _config(out)["quantization_config"] == {
        "bits": 4, "checkpoint_format": "gptq", "desc_act": True, "group_size": 128, "quant_method": "gptq",
        "static_groups": True, "sym": True, "true_sequential": True,
    }
    # symmetric 4-bit: zero point 8, stored minus one -> every nibble 7 (0x77777777)
    assert bool((t[f"{DOWN_PROJ}.qzeros"] == 0x77777777).all())
    assert torch.equal(t[f"{DOWN_PROJ}.g_idx"], torch.arange(256, dtype=torch.int32) // 128)
    from llm_workbook.formats.gptq import unpack_gptq

    weight = unpack_gptq({s: t[f"{DOWN_PROJ}.{s}"] for s in ("qweight", "qzeros", "scales", "g_idx")}, 4, 128).dequantize()
    original = original_tensors[f"{DOWN_PROJ}.weight"].float()
    relative = float((weight - original).norm() / original.norm())
    print(f"gptq down_proj relative weight error {relative:.4f}")
    assert 0.01 < relative < 0.3


def test_awq_pack_hand_checked_vector() -> None:
    # codes 0..7 in columns 0..7: slot k holds column ORDER[k] = 0,2,4,6,1,3,5,7 -> nibbles read 0x75316420
    codes = torch.arange(8).view(1, 8)
    assert int(awq.pack_awq(codes)) == 0x75316420
    # column 7 alone at 15 lands in slot 7 (bits 28..31): the sign bit of the int32 word
    single = torch.zeros(1, 8, dtype=torch.int64)
    single[0, 7] = 15
    assert int(awq.pack_awq(single)) == -(1 << 31) + (7 << 28)


def test_awq_layout_config_and_reader_agree(written, original_tensors) -> None:
    from llm_workbook import quantize as ptq
    from llm_workbook.formats import awq

    out = written["awq_int4"]
    t = _tensors(out)
    shapes = {s: (t[f"{DOWN_PROJ}.{s}"].dtype, tuple(t[f"{DOWN_PROJ}.{s}"].shape)) for s in ("qweight", "qzeros", "scales")}
    assert shapes == {"qweight": (torch.int32, (256, 16)), "qzeros": (torch.int32, (2, 16)), "scales": (torch.float16, (2, 128))}
    config = _config(out)
    assert config["quantization_config"] == {"quant_method": "awq", "zero_point": True, "group_size": 128, "bits": 4,
                                             "version": "gemm", "modules_to_not_convert": None}
    assert config.get("dtype", config.get("torch_dtype")) == "float16"
    # formats.awq unpacks our packing back to ptq.quantize_rtn's codes and zero points
    rtn = ptq.quantize_rtn(original_tensors[f"{DOWN_PROJ}.weight"], 4, 128, symmetric=False)
    assert torch.equal(awq.unpack_awq(t[f"{DOWN_PROJ}.qweight"]).to(torch.int64), rtn.codes.t().to(torch.int64))
    assert torch.equal(awq.unpack_awq(t[f"{DOWN_PROJ}.qzeros"]).to(torch.int64), rtn.zeros.t().to(torch.int64))


def test_seq_2bit_rows_on_four_level_grid_and_stored_at_2_bits(written, original_tensors, tmp_path) -> None:
    """As HY-1.8B-2Bit's index lays it out: float32 throughout, each projection with its SEQ α
    (``weight_clip_val`` [out, 1]) and rows on that α's grid; the output head stored although tied."""
    from llm_workbook.formats import seq

    out = written["seq_2bit"]
    assert "quantization_config" not in _config(out)
    t = _tensors(out)
    assert {v.dtype for v in t.values()} == {torch.float32}
    assert "lm_head.weight" in t  # kept (the writer adds a copy of a tied embedding, as the release stores one)
    w, alpha = t[f"{DOWN_PROJ}.weight"], t[f"{DOWN_PROJ}.weight_clip_val"]
    assert alpha.shape == (w.shape[0], 1) and not torch.equal(w, original_tensors[f"{DOWN_PROJ}.weight"].float())
    assert seq.rows_on_grid(f"{DOWN_PROJ}.weight", w, alpha).all()
    for row, a in zip(w, alpha):
        assert set((torch.unique(row) / a).tolist()) <= {-0.75, -0.25, 0.25, 0.75}
    parquet = round_trip(out, tmp_path)
    for entry in catalog.entries(WeightLoaderV2(parquet)):
        if entry.name.endswith("_proj.weight"):
            in_features = entry.shape[1]
            # 2-bit codes plus one [4] float32 level table per row: 2 + 128 / in bits per weight
            assert entry.format == "grid" and entry.bits_per_weight <= 2 + 128 / in_features + 1e-9, entry
            if in_features >= 256:
                assert entry.bits_per_weight <= 2.5, entry


def test_seq_2bit_latent_weights_are_served_through_seq_never_as_they_are(src, written, tmp_path) -> None:
    """The release may hold latent weights: stored as they are, they evaluate as the model AngelSlim serves
    (SEQ applied), equal to the on-grid file's; a plain transformers load drops ``weight_clip_val`` and
    silently runs the latent weights instead."""
    from transformers import AutoModelForCausalLM

    from llm_workbook.runtime.load import load_model

    latent = writers.write_checkpoint(src, tmp_path / "latent", "seq_2bit", latent=True, **OPTIONS.get("seq_2bit", {}))
    ids = torch.randint(4, toy_models.TOKENIZER_VOCAB_SIZE, (1, 24), generator=torch.Generator().manual_seed(2))
    logits = {}
    for name, path in (("grid", written["seq_2bit"]), ("latent", latent), ("latent-parquet", round_trip(latent, tmp_path))):
        model, info = load_model(path, dtype=torch.float32)
        with torch.no_grad():
            logits[name] = model(ids).logits
        logits[name + "-info"] = info.seq
    assert torch.equal(logits["grid"], logits["latent"]) and torch.equal(logits["latent"], logits["latent-parquet"])
    assert logits["latent-info"] == logits["grid-info"] == {
        "projections": 14, "description": "AngelSlim SEQ applied to 14 projections (their weight_clip_val)"}
    plain = AutoModelForCausalLM.from_pretrained(str(latent), dtype=torch.float32).eval()
    with torch.no_grad():
        assert not torch.allclose(plain(ids).logits, logits["latent"], atol=1e-3)


def test_seq_2bit_search_beats_absmax_scale() -> None:
    torch.manual_seed(0)
    w = torch.randn(16, 256)
    fake, scale = writers.seq_2bit_fake_quantize(w)
    absmax_scale = w.abs().amax(dim=1, keepdim=True) / 0.75
    naive = writers._seq_levels(w, absmax_scale / 4)
    assert float(((w - fake) ** 2).sum()) < 0.7 * float(((w - naive) ** 2).sum())
    assert scale.shape == (16,)


def test_nvfp4_layout_and_shared_global_scale(written) -> None:
    out = written["nvfp4"]
    t = _tensors(out)
    q = "model.layers.0.self_attn.q_proj"
    shapes = {s: (t[f"{K_PROJ}.{s}"].dtype, tuple(t[f"{K_PROJ}.{s}"].shape)) for s in ("weight", "weight_scale", "weight_scale_2", "input_scale")}
    assert shapes == {"weight": (torch.uint8, (64, 64)), "weight_scale": (torch.float8_e4m3fn, (64, 8)),
                      "weight_scale_2": (torch.float32, ()), "input_scale": (torch.float32, ())}
    assert torch.equal(t[f"{q}.weight_scale_2"], t[f"{K_PROJ}.weight_scale_2"])  # q/k/v share it
    group = _config(out)["quantization_config"]["config_groups"]["group_0"]
    assert group["weights"] == {"num_bits": 4, "group_size": 16, "dynamic": False, "type": "float"}
    assert json.loads((out / "hf_quant_config.json").read_text())["quantization"]["quant_algo"] == "NVFP4"


# ----------------------------------------------------------------------------- bad input


def test_bad_input_raises_one_clear_error(src, tmp_path, written) -> None:
    with pytest.raises(ValueError, match="unknown checkpoint format 'int3'.*fp8_static"):
        writers.write_checkpoint(src, tmp_path / "a", "int3")
    with pytest.raises(ValueError, match="takes no option.*'bogus'"):
        writers.write_checkpoint(src, tmp_path / "b", "awq_int4", bogus=1)
    with pytest.raises(ValueError, match="already has a quantization_config"):
        writers.write_checkpoint(written["int8_w8a8"], tmp_path / "c", "fp8_dynamic")
    with pytest.raises(ValueError, match="config.json: missing"):
        writers.write_checkpoint(tmp_path, tmp_path / "d", "fp8_dynamic")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not an empty directory"):
        writers.write_checkpoint(src, busy, "fp8_dynamic")
    assert sorted(p.name for p in busy.iterdir()) == ["keep.txt"]
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
