"""grid encoder: dense weights that sit exactly on a 2-bit grid (per-row SEQ levels, ternary / Sherry groups).

The reference here is the original tensor itself: every stored weight must come back bit for bit, and a
model run from the Parquet file must give exactly the original logits. The fake-quantizers below follow
AngelSlim's SEQ and Sherry formulas (reference notes §1.9), written out in this file.
"""

from __future__ import annotations

import time

import pytest
import torch

from format_fixtures import (
    config_dict,
    convert,
    linear_names,
    logits,
    read_tensors,
    round_trip,
    save_checkpoint,
    token_batch,
)
from llm_workbook import StoreError, WeightLoaderV2, export_to_hf, formats
from llm_workbook.store.inventory import entries
from llm_workbook.formats import grid
from llm_workbook.formats.base import QuantizedTensor
from llm_workbook.runtime.model import model_from_parquet

BUDGET_BITS = 2.3


# --------------------------------------------------------------------------------- fake quantizers


def seq_2bit(weight: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """AngelSlim SEQ, per channel: q = clamp(W/s, -0.99, 0.99); q = (round(2q - 0.5) + 0.5) / 2; W = q*s.

    ``s`` is a float32 per-row scale (learnable in QAT; drawn here), levels (s/2) * {-1.5, -0.5, 0.5, 1.5}.
    """
    gen = torch.Generator().manual_seed(seed)
    w = weight.float()
    scale = w.abs().amax(dim=1, keepdim=True) * (0.6 + 0.4 * torch.rand(w.shape[0], 1, generator=gen))
    q = torch.clamp(w / scale, -0.99, 0.99)
    q = (torch.round(q * 2 - 0.5) + 0.5) / 2
    return (q * scale).to(weight.dtype)


def sherry(weight: torch.Tensor, group: int = 128) -> torch.Tensor:
    """AngelSlim Sherry 3:4: per 4 inputs zero the smallest, value = sign(w) * mean(|kept|) per group."""
    w = weight.float()
    quads = w.reshape(w.shape[0], -1, 4)
    keep = torch.ones_like(quads).scatter_(-1, quads.abs().argmin(-1, keepdim=True), 0.0).reshape(w.shape)
    kept = (w * keep).reshape(w.shape[0], -1, group)
    scale = kept.abs().sum(-1, keepdim=True) / (group * 3 / 4)
    return (torch.sign(kept) * scale).reshape(w.shape).to(weight.dtype)


def _random(shape, seed=0, dtype=torch.bfloat16) -> torch.Tensor:
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.02).to(dtype)


def _restore(rows) -> torch.Tensor:
    record = QuantizedTensor("grid", "m", {r.tensor_name.rpartition(".")[2]: r.data for r in rows}, rows[0].params)
    return grid.to_hf(record)["weight"]


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


# ----------------------------------------------------------------------------------- model level


def _tiny_hunyuan(seed: int = 0, dtype: torch.dtype = torch.bfloat16):
    """A random hunyuan_v1_dense (HY-1.8B's architecture, tied embeddings), weights cast to ``dtype``."""
    from transformers import HunYuanDenseV1Config, HunYuanDenseV1ForCausalLM

    config = HunYuanDenseV1Config(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                                  max_position_embeddings=256, tie_word_embeddings=True, initializer_range=0.05)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = HunYuanDenseV1ForCausalLM(config)
    return model.to(dtype).eval()


def test_seq_2bit_model_is_stored_as_grid_and_runs_exactly(tmp_path):
    model = _tiny_hunyuan()
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied, as HY-1.8B
    modules = linear_names(state)
    for i, module in enumerate(modules):
        state[f"{module}.weight"] = seq_2bit(state[f"{module}.weight"], seed=i)
    src = save_checkpoint(tmp_path / "src", state, config_dict(model))
    parquet = round_trip(src, tmp_path)  # export is bit-exact
    loader = WeightLoaderV2(parquet)
    for module in modules:
        assert loader.format_of(module) == "grid", module
        assert loader.rows[f"{module}.grid_codes"].params["scheme"] == "row_levels"
        assert _bits_equal(loader.load_weight(module, "weight", dtype=torch.bfloat16), state[f"{module}.weight"])
    assert "model.embed_tokens.weight" in loader.rows and loader.rows["model.embed_tokens.weight"].format == "dense"
    assert loader.rows["model.norm.weight"].format == "dense"
    bits = {e.name: e.bits_per_weight for e in entries(loader) if e.format == "grid"}
    print("bits/weight of the tiny model's grid Linears:", sorted(set(round(b, 3) for b in bits.values())))
    assert max(bits.values()) <= 2.0 + 64 / 128 + 1e-9  # 2-bit codes + 4 bf16 levels per 128-wide row
    # The original weights in a float32 model built fresh (casting the bf16 model back would also round
    # its rotary inv_freq buffer, which is not a weight).
    original = _tiny_hunyuan(dtype=torch.float32)
    missing, unexpected = original.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    original.tie_weights()
    ids = token_batch(128, seed=0)
    ours = logits(model_from_parquet(parquet, torch.float32), ids)
    expected = logits(original, ids)
    print("max |logit diff| vs the original model:", float((ours - expected).abs().max()))
    assert torch.equal(ours, expected)


def test_bit_budget_for_realistic_shapes(tmp_path):
    """HY-1.8B-like Linears (2048x2048, 6144x2048 and 2048x6144) take <= 2.3 bits/weight in the file."""
    state = {
        "model.layers.0.self_attn.q_proj.weight": seq_2bit(_random((2048, 2048), 1), 1),
        "model.layers.0.mlp.up_proj.weight": seq_2bit(_random((6144, 2048), 2), 2),
        "model.layers.0.mlp.down_proj.weight": seq_2bit(_random((2048, 6144), 3), 3),
    }
    src = save_checkpoint(tmp_path / "src", state, {"model_type": "hunyuan_v1_dense"})
    parquet = convert(src, tmp_path / "budget.parquet")
    loader = WeightLoaderV2(parquet)
    numel = sum(t.numel() for t in state.values())
    stored = sum(loader.rows[n].nbytes for n in loader.rows if loader.rows[n].format == "grid")
    file_bits = 8 * parquet.stat().st_size / numel
    print(f"grid rows: {8 * stored / numel:.4f} bits/weight; whole file: {file_bits:.4f} bits/weight")
    assert all(loader.format_of(n.rpartition('.')[0]) == "grid" for n in state)
    assert file_bits <= BUDGET_BITS
    out = read_tensors(export_to_hf(parquet, tmp_path / "exported", progress=False))
    for name, tensor in state.items():
        assert _bits_equal(out[name], tensor), name


def test_encode_6144x2048():
    """A full-size MLP weight encodes as grid rows. Its CPU time is printed, not asserted: a unit test on a shared
    machine is no benchmark."""
    weight = seq_2bit(_random((6144, 2048), 4), 4)
    grid.encode_dense("model.layers.0.mlp.up_proj.weight", weight[:64])  # warm up
    start = time.process_time()
    rows = grid.encode_dense("model.layers.0.mlp.up_proj.weight", weight)
    cpu = time.process_time() - start
    print(f"encode 6144x2048 bf16: {cpu:.2f} s CPU")
    assert rows is not None


# ------------------------------------------------------------------------------ schemes and rules


def test_ternary_sherry_groups_detected():
    weight = sherry(_random((512, 1024), 5))
    # Sherry's pattern: exactly one zero in every 4 inputs, {-d, +d} elsewhere, one d per 128-group.
    assert torch.equal((weight.reshape(512, -1, 4) == 0).sum(-1), torch.ones(512, 256, dtype=torch.int64))
    rows = grid.encode_dense("model.layers.3.mlp.gate_proj.weight", weight)
    assert rows is not None
    params = rows[0].params
    assert params["scheme"] == "group_ternary" and params["group_size"] == 128
    nbytes = sum(r.data.numel() * r.data.element_size() for r in rows)
    print(f"sherry 512x1024: {8 * nbytes / weight.numel():.4f} bits/weight")
    assert 8 * nbytes / weight.numel() <= BUDGET_BITS
    assert _bits_equal(_restore(rows), weight)


def test_ternary_keeps_signed_zeros():
    weight = sherry(_random((64, 256), 6))
    weight = torch.where(weight == 0, torch.where(torch.arange(256) % 2 == 0, -0.0, 0.0).to(weight.dtype), weight)
    assert bool((torch.signbit(weight) & (weight == 0)).any())  # there really are -0.0 entries
    rows = grid.encode_dense("model.layers.0.mlp.down_proj.weight", weight)
    assert rows is not None and _bits_equal(_restore(rows), weight)


def test_per_group_four_levels_detected():
    """Per-group 2-bit (4 levels per 128 inputs, more than 4 per row): stored with per-group tables."""
    base = _random((64, 512), 7)
    grouped = base.float().reshape(64, 4, 128)
    scale = grouped.abs().amax(-1, keepdim=True)
    q = (torch.round(torch.clamp(grouped / scale, -0.99, 0.99) * 2 - 0.5) + 0.5) / 2
    weight = (q * scale).reshape(64, 512).to(torch.bfloat16)
    rows = grid.encode_dense("model.layers.0.self_attn.o_proj.weight", weight)
    assert rows is not None and rows[0].params["scheme"] == "group_levels"
    assert tuple(rows[1].data.shape) == (64, 4, 4)
    assert _bits_equal(_restore(rows), weight)


def test_one_value_off_grid_is_stored_dense(tmp_path):
    weight = seq_2bit(_random((128, 256), 8))
    assert grid.encode_dense("model.layers.0.mlp.up_proj.weight", weight) is not None
    bad = weight.clone()
    bad.view(torch.int16)[17, 33] += 1  # the next bf16 value: one weight almost on the grid (5 per row)
    assert grid.encode_dense("model.layers.0.mlp.up_proj.weight", bad) is None
    src = save_checkpoint(tmp_path / "src", {"model.layers.0.mlp.up_proj.weight": bad}, {"model_type": "qwen3"})
    loader = WeightLoaderV2(round_trip(src, tmp_path))
    assert loader.rows["model.layers.0.mlp.up_proj.weight"].format == "dense"


def test_ternary_with_off_grid_values():
    """One outlier in a ternary group leaves 4 values there: no longer ternary, but still exactly 4 levels
    per group (stored losslessly with per-group tables). A second outlier in that group makes 5: dense."""
    weight = sherry(_random((128, 256), 8))
    one_off = weight.clone()
    one_off.view(torch.int16)[17, 33] += 1
    rows = grid.encode_dense("model.layers.0.mlp.up_proj.weight", one_off)
    assert rows is not None and rows[0].params["scheme"] == "group_levels"
    assert _bits_equal(_restore(rows), one_off)
    two_off = one_off.clone()
    two_off[17, 40] = 0.123  # a fifth distinct value in group 0 of row 17
    assert grid.encode_dense("model.layers.0.mlp.up_proj.weight", two_off) is None


def test_not_candidates():
    weight = seq_2bit(_random((64, 128), 9))
    assert grid.encode_dense("model.embed_tokens.weight", weight) is None  # embeddings stay dense
    assert grid.encode_dense("model.layers.0.mlp.up_proj.bias", weight) is None
    assert grid.encode_dense("weight", weight) is None
    assert grid.encode_dense("model.norm.weight", weight[0]) is None  # 1-D
    assert grid.encode_dense("model.layers.0.mlp.up_proj.weight", (weight.float() * 64).to(torch.int16)) is None
    assert grid.encode_dense("model.layers.0.mlp.up_proj.weight", weight[:, :4]) is None  # too small to pay off
    assert grid.encode_dense("model.layers.0.mlp.up_proj.weight", _random((64, 128), 10)) is None  # plain weights


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_other_float_dtypes(dtype):
    weight = seq_2bit(_random((64, 256), 11, dtype=dtype))
    rows = grid.encode_dense("model.layers.0.mlp.up_proj.weight", weight)
    assert rows is not None and rows[1].data.dtype == dtype
    assert rows[0].params["dtype"] == {torch.float16: "F16", torch.float32: "F32"}[dtype]
    assert _bits_equal(_restore(rows), weight)


def test_rows_carry_shape_dtype_checksum():
    weight = seq_2bit(_random((32, 128), 12))
    rows = grid.encode_dense("model.layers.0.self_attn.q_proj.weight", weight)
    assert [r.tensor_name for r in rows] == ["model.layers.0.self_attn.q_proj.grid_codes",
                                             "model.layers.0.self_attn.q_proj.grid_levels"]
    params = rows[0].params
    assert rows[1].params == params and all(r.format == "grid" for r in rows)
    assert params["weight_shape"] == [32, 128] and params["dtype"] == "BF16" and params["bits"] == 2
    assert params["checksum"].startswith("xxh3_64:")
    assert rows[0].data.dtype == torch.uint8 and tuple(rows[0].data.shape) == (32, 32)
    assert grid.hf_names(params, ["grid_codes", "grid_levels"]) == ["weight"]


def test_corrupted_rows_are_refused():
    weight = seq_2bit(_random((32, 128), 13))
    rows = grid.encode_dense("model.layers.0.self_attn.q_proj.weight", weight)
    tensors = {r.tensor_name.rpartition(".")[2]: r.data.clone() for r in rows}
    tensors["grid_levels"].view(torch.int16)[0, 0] += 1
    with pytest.raises(StoreError, match="checksum"):
        grid.to_hf(QuantizedTensor("grid", "layer", tensors, rows[0].params))
    tensors = {r.tensor_name.rpartition(".")[2]: r.data for r in rows}
    tensors["grid_codes"] = tensors["grid_codes"][:, :-1]
    with pytest.raises(StoreError, match="grid_codes"):
        grid.dequantize(QuantizedTensor("grid", "layer", tensors, rows[0].params))
    tensors = {r.tensor_name.rpartition(".")[2]: r.data for r in rows}
    tensors["grid_levels"] = tensors["grid_levels"][:, :3]
    with pytest.raises(StoreError, match="grid_levels"):
        grid.to_hf(QuantizedTensor("grid", "layer", tensors, rows[0].params))


def test_encoder_never_owns_a_checkpoint():
    assert not grid.detect(None, {}) and grid.claim(None, "m", {}) == set()
    with pytest.raises(StoreError):
        grid.to_rows(None, "m", {})
    # With a quantization_config the converter does not offer tensors to the encoder.
    weight = seq_2bit(_random((32, 128), 14))
    assert [r.format for r in formats.dense_rows("m.weight", weight, {"quant_method": "gptq"})] == ["dense"]
    assert [r.format for r in formats.dense_rows("m.weight", weight, None)] == ["grid", "grid"]
