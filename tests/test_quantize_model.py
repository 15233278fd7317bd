"""Our PTQ algorithms over a whole model (quantize/model.py), on a tiny random Qwen3."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llm_workbook.quantize import fake_quantize_model, find_quantizable_linears, quantize_model, quantize_rtn
from llm_workbook.quantize.model import _LayerCall, _sequential_groups

pytestmark = pytest.mark.usefixtures("single_thread")


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# model level, on a tiny random Qwen3
# ---------------------------------------------------------------------------------------------

VOCAB = 128


@pytest.fixture(scope="module")
def tiny_qwen3():
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
    )
    torch.manual_seed(0)
    return transformers.Qwen3ForCausalLM(config).eval()


@pytest.fixture(scope="module")
def calibration_ids():
    return torch.randint(0, VOCAB, (32, 64), generator=_generator(1))


@pytest.fixture(scope="module")
def held_out_ids():
    return torch.randint(0, VOCAB, (8, 64), generator=_generator(2))


@pytest.fixture(scope="module")
def gptq_int4_g64(tiny_qwen3, calibration_ids):
    before = {name: t.clone() for name, t in tiny_qwen3.state_dict().items()}
    results = quantize_model(tiny_qwen3, "gptq", calibration_ids, bits=4, group_size=64, progress=False)
    return results, before


def _logits_mse(model, quantized_model, ids) -> float:
    with torch.no_grad():
        return float(((model(ids).logits - quantized_model(ids).logits) ** 2).mean())


def test_gptq_model_beats_rtn_on_held_out_logits(tiny_qwen3, gptq_int4_g64, held_out_ids):
    gptq_results, _ = gptq_int4_g64
    rtn_results = quantize_model(tiny_qwen3, "int4", group_size=64, progress=False)
    mse_gptq = _logits_mse(tiny_qwen3, fake_quantize_model(tiny_qwen3, gptq_results), held_out_ids)
    mse_rtn = _logits_mse(tiny_qwen3, fake_quantize_model(tiny_qwen3, rtn_results), held_out_ids)
    print(f"tiny Qwen3 int4 g64 held-out logits MSE: GPTQ {mse_gptq:.3e}  RTN {mse_rtn:.3e}")
    assert mse_gptq < 0.9 * mse_rtn


def test_gptq_model_quantizes_every_linear_but_lm_head_and_leaves_model_untouched(tiny_qwen3, gptq_int4_g64):
    results, before = gptq_int4_g64
    linears = {name for name, m in tiny_qwen3.named_modules() if isinstance(m, nn.Linear)}
    assert "lm_head" in linears
    assert set(results) == linears - {"lm_head"}
    assert len(results) == 2 * 7
    for name, q in results.items():
        weight = tiny_qwen3.get_submodule(name).weight
        assert (q.out_features, q.in_features) == tuple(weight.shape)
        assert q.bits == 4 and q.group_size == 64 and q.method == "gptq"
        assert not torch.equal(q.dequantize(weight.dtype), weight), name
    after = tiny_qwen3.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_gptq_model_with_act_order_all_at_once(tiny_qwen3, calibration_ids, held_out_ids):
    results = quantize_model(
        tiny_qwen3, "gptq", calibration_ids[:16], bits=4, group_size=32, act_order=True,
        true_sequential=False, progress=False,
    )
    rtn_results = quantize_model(tiny_qwen3, "int4", group_size=32, progress=False)
    trivial = [torch.equal(q.g_idx.long(), torch.arange(q.in_features) // 32) for q in results.values()]
    assert not any(trivial)
    assert all(q.perm is not None for q in results.values())
    mse_gptq = _logits_mse(tiny_qwen3, fake_quantize_model(tiny_qwen3, results), held_out_ids)
    mse_rtn = _logits_mse(tiny_qwen3, fake_quantize_model(tiny_qwen3, rtn_results), held_out_ids)
    print(f"tiny Qwen3 int4 g32 act-order held-out logits MSE: GPTQ {mse_gptq:.3e}  RTN {mse_rtn:.3e}")
    assert mse_gptq < 0.9 * mse_rtn


def test_true_sequential_groups_follow_the_decoder_layer(tiny_qwen3, calibration_ids):
    layer = tiny_qwen3.model.layers[0]
    linears = {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}
    states = tiny_qwen3.model.embed_tokens(calibration_ids[:2])
    position_ids = torch.arange(calibration_ids.shape[1]).unsqueeze(0)
    call = _LayerCall((), dict(position_embeddings=tiny_qwen3.model.rotary_emb(states, position_ids), attention_mask=None))
    with torch.no_grad():
        groups = _sequential_groups(layer, linears, states, call)
    assert [sorted(g) for g in groups] == [
        ["self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]


def test_rtn_model_matches_per_weight_rtn_and_honours_skip(tiny_qwen3):
    results = quantize_model(tiny_qwen3, "int8", skip=("lm_head", r"layers\.1\.mlp"), progress=False)
    assert "model.layers.1.mlp.down_proj" not in results and "lm_head" not in results
    assert "model.layers.1.self_attn.q_proj" in results and "model.layers.0.mlp.up_proj" in results
    assert len(results) == 2 * 7 - 3
    for name, q in results.items():
        expected = quantize_rtn(tiny_qwen3.get_submodule(name).weight, 8)
        assert torch.equal(q.codes, expected.codes) and torch.equal(q.scales, expected.scales)
    assert set(find_quantizable_linears(tiny_qwen3)) == set(quantize_model(tiny_qwen3, "int2", progress=False))


def test_fake_quantize_model_writes_a_copy(tiny_qwen3):
    results = quantize_model(tiny_qwen3, "int2", progress=False)
    name = "model.layers.0.mlp.down_proj"
    original = tiny_qwen3.get_submodule(name).weight.detach().clone()
    copy = fake_quantize_model(tiny_qwen3, results)
    assert torch.equal(copy.get_submodule(name).weight, results[name].dequantize())
    assert torch.equal(tiny_qwen3.get_submodule(name).weight, original)
    assert torch.equal(copy.lm_head.weight, tiny_qwen3.lm_head.weight)
    with pytest.raises(ValueError, match="not an nn.Linear"):
        fake_quantize_model(tiny_qwen3, {"model.nope": results[name]})
    with pytest.raises(ValueError, match="shape"):
        fake_quantize_model(tiny_qwen3, {"model.layers.0.mlp.up_proj": results[name]})


@pytest.mark.parametrize(
    "method,kwargs,message",
    [
        ("gptq", {}, "calibration_input_ids"),
        ("int3", {}, "unknown method"),
        ("int8", {"bits": 4}, "implies bits=8"),
        ("rtn", {}, "needs bits"),
        ("int4", {"skip": (".*",)}, "no nn.Linear"),
        ("gptq", {"calibration_input_ids": torch.full((1, 4), VOCAB)}, "token ids"),
        ("gptq", {"calibration_input_ids": torch.ones(1, 4, 2).long()}, r"\[n, seq\]"),
        ("gptq", {"calibration_input_ids": torch.zeros(1, 4).long(), "skip": ("embed",)}, "lm_head"),
    ],
)
def test_quantize_model_rejects_bad_calls(tiny_qwen3, method, kwargs, message):
    with pytest.raises(ValueError, match=message):
        quantize_model(tiny_qwen3, method, progress=False, **kwargs)
