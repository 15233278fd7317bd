"""runtime: loading models from Parquet / HF dirs, activation fake quantization, keep-packed Linears, embeddings."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from llm_workbook import HuggingFaceToParquetConverter, StoreError, WeightLoaderV2
from llm_workbook.runtime.model import model_from_parquet
from llm_workbook.runtime.activations import ActivationScheme, QuantInputLinear, declared_activation, fake_quantize_activation, layer_type
from llm_workbook.runtime.packed import PackedLinear
from llm_workbook.runtime.load import load_model, load_tokenizer
from llm_workbook.runtime.embeddings import sentence_embeddings

FP8_MAX = 448.0


def _fp8_format_available() -> bool:
    try:
        from llm_workbook.formats import get_format

        get_format("fp8")
        return True
    except Exception:
        return False


needs_fp8 = pytest.mark.skipif(not _fp8_format_available(), reason="llm_workbook.formats has no 'fp8' format module yet")


def _ids(n: int = 12, vocab: int = 96, seed: int = 3) -> torch.Tensor:
    return torch.randint(4, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- fake quant by hand


def test_int8_dynamic_per_token_equals_hand_computation():
    x = torch.tensor([
        [127.0, 63.5, -0.25, 0.5, 1.5, 2.5],  # absmax 127 -> scale 1: plain round-half-even
        [254.0, 3.0, 5.0, -7.0, 1.0, 0.0],  # absmax 254 -> scale 2
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # all zero stays zero
    ])
    expected = torch.tensor([
        [127.0, 64.0, -0.0, 0.0, 2.0, 2.0],
        [254.0, 4.0, 4.0, -8.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    ])
    got = fake_quantize_activation(x, ActivationScheme("int8", "token", True))
    assert torch.equal(got, expected)
    # one scale per token: the same rows quantized per tensor (scale 2 for all) differ in row 0
    per_tensor = fake_quantize_activation(x, ActivationScheme("int8", "tensor", True))
    assert torch.equal(per_tensor[0], torch.tensor([128.0, 64.0, -0.0, 0.0, 2.0, 2.0]))
    assert torch.equal(per_tensor[1:], expected[1:])


def test_int8_static_clamps_to_127_codes():
    x = torch.tensor([[1.3, 100.0, -100.0]])
    got = fake_quantize_activation(x, ActivationScheme("int8", "tensor", False), torch.tensor([0.5]))
    assert torch.equal(got, torch.tensor([[1.5, 63.5, -64.0]]))  # round(2.6)=3; 200 -> 127; -200 -> -128


def test_fp8_dynamic_per_tensor_scale_is_absmax_over_448():
    # with s = absmax/448 = 2 every value below lands exactly on an e4m3 grid point
    x = torch.tensor([[1.0, 2.0], [3.0, 896.0]])
    assert torch.equal(fake_quantize_activation(x, ActivationScheme("fp8", "tensor", True)), x)
    # e4m3 keeps 3 mantissa bits: 0.3 -> 0.3125; static scale 1 clamps 1000 to 448
    got = fake_quantize_activation(torch.tensor([0.3, 1000.0, -1000.0]), ActivationScheme("fp8", "tensor", False), torch.tensor([1.0]))
    assert torch.equal(got, torch.tensor([0.3125, 448.0, -448.0]))


def test_fp8_dynamic_group_scales_each_group():
    x = torch.tensor([[448.0, 0.3, 4.48, 0.03]])
    got = fake_quantize_activation(x, ActivationScheme("fp8", "group", True, group_size=2))
    # group 1 scale 1 -> 0.3 rounds to 0.3125; group 2 scale 0.01 -> 0.03/0.01 = 3 exactly
    assert got[0, 0] == 448.0 and got[0, 1] == 0.3125
    assert torch.allclose(got[0, 2:], torch.tensor([4.48, 0.03]), rtol=1e-6)


def test_activation_scheme_rejects_nonsense():
    with pytest.raises(ValueError, match="static"):
        ActivationScheme("fp8", "token", False)
    with pytest.raises(ValueError, match="kind"):
        ActivationScheme("fp4", "tensor", True)
    with pytest.raises(ValueError, match="input scale"):
        fake_quantize_activation(torch.ones(2), ActivationScheme("fp8", "tensor", False))


# --------------------------------------------------------------------------- what declares it


def _ct(weights: dict, acts: dict | None, fmt: str = "naive-quantized") -> dict:
    group = {"targets": ["Linear"], "weights": weights}
    if acts is not None:
        group["input_activations"] = acts
    return {"quant_method": "compressed-tensors", "format": fmt, "ignore": ["lm_head"], "config_groups": {"group_0": group}}


def test_declared_activation_from_configs_and_records():
    fp8_w = {"num_bits": 8, "type": "float", "strategy": "tensor"}
    static = _ct(fp8_w, {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False})
    dynamic = _ct(fp8_w, {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": True})
    int8 = _ct({"num_bits": 8, "type": "int", "strategy": "channel"},
               {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True}, "int-quantized")
    nvfp4 = _ct({"num_bits": 4, "type": "float", "group_size": 16},
                {"num_bits": 4, "type": "float", "group_size": 16, "dynamic": False})
    q = "model.layers.0.self_attn.q_proj"
    assert declared_activation(static, q, "fp8", True).name == "fp8-static-tensor"
    assert declared_activation(dynamic, q, "fp8", False).name == "fp8-dynamic-tensor"
    assert declared_activation(int8, q, "int8", False).name == "int8-dynamic-token"
    assert declared_activation(_ct(fp8_w, None), q, "fp8", False) is None  # weight-only group
    note = declared_activation(nvfp4, q, "nvfp4", True)
    assert isinstance(note, str) and "not simulated" in note
    block = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    assert declared_activation(block, q, "fp8", False).name == "fp8-dynamic-group128"
    assert declared_activation({"quant_method": "fp8", "activation_scheme": "static"}, q, "fp8", True).name == "fp8-static-tensor"
    w4a8 = {"quant_method": "w4a8_awq", "activation_scheme": "static",
            "ignored_quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}}
    assert declared_activation(w4a8, "model.layers.3.mlp.experts.0.up_proj", "w4a8", True).name == "fp8-static-tensor"
    assert declared_activation(w4a8, q, "fp8", False).name == "fp8-dynamic-group128"  # an ignored (FP8 block) layer
    assert declared_activation({"quant_method": "gptq", "bits": 4}, q, "gptq", False) is None
    assert declared_activation({"quant_method": "gptq"}, q, "int8", True).name == "int8-static-tensor"  # input_scale alone
    assert layer_type("model.layers.12.mlp.down_proj") == "model.layers.*.mlp.down_proj"


# --------------------------------------------------------------------------- an FP8-static checkpoint


def write_fp8_static(src: Path, dst: Path, with_input_scale: bool = True, static: bool = True) -> Path:
    """AngelSlim fp8_static layout: per-tensor F8_E4M3 weights, F32 weight_scale, BF16 input_scale
    (calibrated absmax/448 on random ids), compressed-tensors naive-quantized config."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    amax: dict[str, float] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            def hook(_m, args, _out, name=name):
                amax[name] = max(amax.get(name, 0.0), float(args[0].abs().max()))
            hooks.append(module.register_forward_hook(hook))
    with torch.inference_mode():
        model(torch.randint(4, 96, (2, 24), generator=torch.Generator().manual_seed(11)))
    for h in hooks:
        h.remove()
    shutil.copytree(src, dst)
    tensors = {}
    for name, t in load_file(src / "model.safetensors").items():
        layer = name.removesuffix(".weight")
        if layer in amax:
            w = t.to(torch.float32)
            scale = w.abs().max() / FP8_MAX
            tensors[name] = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
            tensors[f"{layer}.weight_scale"] = scale.reshape(1)
            if with_input_scale:
                tensors[f"{layer}.input_scale"] = torch.tensor([amax[layer] / FP8_MAX], dtype=torch.bfloat16)
        else:
            tensors[name] = t
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    acts = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": not static, "symmetric": True}
    config["quantization_config"] = _ct({"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False,
                                         "symmetric": True}, acts)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


@pytest.fixture(scope="module")
def fp8_parquet(qwen3_dir, tmp_path_factory) -> Path:
    if not _fp8_format_available():
        pytest.skip("llm_workbook.formats has no 'fp8' format module yet")
    work = tmp_path_factory.mktemp("fp8")
    hf = write_fp8_static(qwen3_dir, work / "fp8_static")
    out = work / "fp8_static.parquet"
    HuggingFaceToParquetConverter(progress=False).convert(hf, out)
    return out


@needs_fp8
def test_fp8_static_activation_quant_changes_outputs_slightly_and_switches_off(fp8_parquet):
    ids = _ids()
    weight_only = model_from_parquet(fp8_parquet)
    on, info_on = load_model(fp8_parquet)
    off, info_off = load_model(fp8_parquet, activation_quant=False)
    assert info_on.activation_quant and not info_off.activation_quant
    assert info_on.activation_schemes["model.layers.*.self_attn.q_proj"] == "fp8-static-tensor"
    assert set(info_on.activation_schemes.values()) == {"fp8-static-tensor"} and len(info_on.activation_schemes) == 7
    assert any("switched off" in n for n in info_off.activation_notes)
    assert isinstance(on.model.layers[0].mlp.down_proj, QuantInputLinear)
    with torch.inference_mode():
        ref = weight_only(ids).logits
        got_off = off(ids).logits
        got_on = on(ids).logits
    assert torch.equal(got_off, ref)  # switching it off restores the weight-only model exactly
    rel = float((got_on - ref).norm() / ref.norm())
    print(f"fp8 static activations: relative logits change {rel:.4g}")
    # e4m3 keeps 3 mantissa bits (<= 6.25 % per input); 8 quantized matmuls in a row add up to a few percent
    assert 1e-4 < rel < 0.15

    # one Linear by hand: y = W @ (fp8(x / s) * s), with s the stored input_scale
    stored = WeightLoaderV2(fp8_parquet)
    layer = "model.layers.0.self_attn.q_proj"
    s = stored.load_tensor(f"{layer}.input_scale").to(torch.float32)
    w = stored.load_weight(layer, "weight", dtype=torch.float32)
    x = torch.randn(1, 5, w.shape[1], generator=torch.Generator().manual_seed(5))
    xq = (x / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(torch.float32) * s
    with torch.inference_mode():
        assert torch.equal(on.model.layers[0].self_attn.q_proj(x), F.linear(xq, w))
    # the input error stays within e4m3's half-ulp (2^-4 relative) plus the subnormal step
    assert bool(((xq - x).abs() <= x.abs() * 2**-4 + s * 2**-10).all())


@needs_fp8
def test_keep_packed_logits_equal_dequantized(fp8_parquet):
    ids = _ids(16)
    for activation_quant in (True, False):
        packed, info = load_model(fp8_parquet, keep_packed=True, activation_quant=activation_quant)
        dense, _ = load_model(fp8_parquet, keep_packed=False, activation_quant=activation_quant)
        assert info.keep_packed
        module = packed.model.layers[1].self_attn.o_proj
        assert isinstance(module, PackedLinear) and module.record.tensors["weight"].dtype == torch.float8_e4m3fn
        assert (module.input_quantizer is not None) == activation_quant
        names = {n for n, _ in packed.named_parameters()}
        assert "model.layers.1.self_attn.o_proj.weight" not in names  # no cached float weight
        assert "model.layers.1.self_attn.o_proj.weight" in {n for n, _ in dense.named_parameters()}
        with torch.inference_mode():
            assert torch.equal(packed(ids).logits, dense(ids).logits)
    packed_params = sum(p.numel() * p.element_size() for p in packed.parameters())
    dense_params = sum(p.numel() * p.element_size() for p in dense.parameters())
    assert packed_params < dense_params  # the quantized Linears hold codes, not float32 weights


@needs_fp8
def test_static_config_without_input_scale_is_a_clear_error(qwen3_dir, tmp_path):
    hf = write_fp8_static(qwen3_dir, tmp_path / "no_scale", with_input_scale=False)
    with pytest.raises(StoreError, match=r"model\.layers\.0\.\w+\.\w+\.input_scale"):
        load_model(hf)


@needs_fp8
def test_quantized_hf_dir_goes_through_parquet(qwen3_dir, tmp_path):
    hf = write_fp8_static(qwen3_dir, tmp_path / "dyn", with_input_scale=False, static=False)
    model, info = load_model(hf)
    assert info.converted and info.parquet.endswith(".parquet") and info.formats == ["dense", "fp8"]
    assert info.activation_schemes["model.layers.*.mlp.up_proj"] == "fp8-dynamic-tensor"
    assert len(info.quantized_layers) == 14 and set(info.quantized_layers.values()) == {"fp8"}


# --------------------------------------------------------------------------- plain loads


def test_hf_dir_and_parquet_give_the_same_model(qwen3_dir, tmp_path):
    parquet = tmp_path / "m.parquet"
    HuggingFaceToParquetConverter(progress=False).convert(qwen3_dir, parquet)
    hf_model, hf_info = load_model(qwen3_dir)
    pq_model, pq_info = load_model(parquet)
    assert hf_info.parquet is None and hf_info.kind == "causal-lm" and hf_info.quantized_layers == {}
    assert pq_info.parquet == str(parquet) and pq_info.formats == ["dense"] and not pq_info.activation_quant
    ids = _ids()
    with torch.inference_mode():
        assert torch.equal(hf_model(ids).logits, pq_model(ids).logits)
    assert load_tokenizer(parquet, pq_model)("w5 w6")["input_ids"] == [5, 6]


def test_missing_sources_are_clear_errors(tmp_path):
    with pytest.raises(StoreError, match="no such Parquet file"):
        load_model(tmp_path / "missing.parquet")
    with pytest.raises(StoreError, match="no such directory"):
        load_model(tmp_path / "missing_dir")


# --------------------------------------------------------------------------- encoders


def test_sentence_embeddings_minilm(minilm_dir):
    model, info = load_model(minilm_dir)
    assert info.kind == "encoder" and info.architecture == "BertModel"
    tok = load_tokenizer(minilm_dir)
    texts = ["A cat sits on the mat.", "A kitten is resting on the rug.", "Parquet stores tables by column on disk."]
    emb = sentence_embeddings(model, tok, texts, batch_size=3)
    assert emb.shape == (3, 384)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    # padding must not change an embedding: one at a time equals the padded batch
    single = torch.cat([sentence_embeddings(model, tok, [t]) for t in texts])
    assert torch.allclose(emb, single, atol=1e-5)
    sims = emb @ emb.T
    assert sims[0, 1] > sims[0, 2] + 0.2  # paraphrases are closer than unrelated text
    with pytest.raises(ValueError, match="empty"):
        sentence_embeddings(model, tok, [])


# --------------------------------------------------------------------------- real AngelSlim checkpoints

ANGELSLIM = Path(__file__).parent / "fixtures" / "angelslim"
EXPECTED_SCHEMES = {
    "fp8_static": {"fp8-static-tensor"},
    "fp8_dynamic": {"fp8-dynamic-tensor"},
    "int8_dynamic": {"int8-dynamic-token"},
    "int4_gptq": set(),  # weight-only
    "int4_awq": set(),
    "w4a8_fp8": {"fp8-static-tensor"},
}


@pytest.mark.parametrize("name", sorted(EXPECTED_SCHEMES))
def test_angelslim_fixture_schemes_and_keep_packed(name):
    from llm_workbook import UnsupportedFormatError

    path = ANGELSLIM / name
    if not (path / "config.json").is_file():
        pytest.skip(f"AngelSlim fixture {path} is not in this checkout")
    try:
        dense, info = load_model(path)
    except UnsupportedFormatError as exc:
        pytest.skip(f"the converter does not read {name} yet: {exc}")
    packed, packed_info = load_model(path, keep_packed=True)
    weight_only, off_info = load_model(path, activation_quant=False)
    assert info.converted and set(info.activation_schemes.values()) == EXPECTED_SCHEMES[name]
    assert info.activation_quant == bool(EXPECTED_SCHEMES[name]) and not off_info.activation_quant
    assert any(isinstance(m, PackedLinear) for m in packed.modules())
    ids = _ids(24, vocab=320)
    with torch.inference_mode():
        ref = dense(ids).logits
        assert torch.equal(packed(ids).logits, ref)
        rel = float((ref - weight_only(ids).logits).norm() / ref.norm())
    # simulated activation quantization moves the logits a little; weight-only formats not at all
    assert (0 < rel < 0.1) if EXPECTED_SCHEMES[name] else rel == 0.0


def test_group_activation_quantization_takes_a_shorter_last_group():
    from llm_workbook.runtime.activations import ActivationScheme, fake_quantize_activation

    scheme = ActivationScheme("fp8", "group", dynamic=True, group_size=128)
    x = torch.randn(3, 576) * torch.linspace(0.1, 10, 576)  # 576 = 4 full groups and one of 64
    y = fake_quantize_activation(x, scheme)
    assert y.shape == x.shape
    for start, stop in ((0, 128), (512, 576)):  # each group quantized on its own absmax, the short one too
        alone = fake_quantize_activation(torch.nn.functional.pad(x[:, start:stop], (0, 128 - (stop - start))), scheme)
        assert torch.equal(y[:, start:stop], alone[:, : stop - start])


def test_an_unquantized_checkpoint_loads_tensor_by_tensor_with_from_pretrained_s_weights(tiny_lm_tied):
    """runtime.model.model_from_checkpoint (what load_model uses for an HF directory) gives exactly the
    parameters and buffers from_pretrained gives, for a causal LM with tied embeddings and for an encoder."""
    from transformers import AutoModel, AutoModelForCausalLM

    from llm_workbook.runtime.model import model_from_checkpoint
    from llm_workbook.workbook import builtins

    cases = [
        (tiny_lm_tied, AutoModelForCausalLM, None),
        (Path(builtins.resolve("builtin:minilm")), AutoModel, "base"),
    ]
    for root, auto, task in cases:
        ours = model_from_checkpoint(root, torch.float32, task)
        theirs = auto.from_pretrained(str(root), dtype=torch.float32).eval()
        mine, reference = dict(ours.state_dict()), dict(theirs.state_dict())
        assert mine.keys() == reference.keys(), root
        for name, tensor in reference.items():
            assert mine[name].dtype == tensor.dtype and torch.equal(mine[name], tensor), (root, name)
        assert not ours.training
