"""Our PTQ algorithms per weight (quantize/rtn.py, quantize/gptq.py): round-to-nearest and GPTQ."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from llm_workbook.quantize import (
    GPTQError,
    HessianAccumulator,
    QuantizedLinear,
    gptq_quantize,
    quantize_rtn,
    run_gptq,
)

# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("single_thread")


OUT, IN, N_CALIB = 96, 256, 2048


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mixing_matrix() -> torch.Tensor:
    """Fixed random A: activations X = Z @ A are strongly correlated across features."""
    return torch.randn(IN, IN, generator=_generator(100)) / math.sqrt(IN)


def _activations(seed: int, n: int = N_CALIB) -> torch.Tensor:
    g = _generator(seed)
    z = torch.randn(n, IN, generator=g)
    return z @ _mixing_matrix() + 0.05 * torch.randn(n, IN, generator=g)


def _weight(seed: int = 7) -> torch.Tensor:
    return 0.02 * torch.randn(OUT, IN, generator=_generator(seed))


def _hessian(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return (2.0 / x.shape[0]) * x.t() @ x


def _output_error(x: torch.Tensor, weight: torch.Tensor, approx: torch.Tensor) -> float:
    return float(torch.linalg.norm(x @ weight.t() - x @ approx.t()))


# ---------------------------------------------------------------------------------------------
# round to nearest
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("in_features,group_size", [(64, -1), (64, 16), (100, 32), (20, 64)])
def test_rtn_codes_in_range_and_error_within_half_scale(bits, symmetric, in_features, group_size):
    weight = torch.randn(12, in_features, generator=_generator(bits + in_features)) * 0.1
    weight[3, 5] = 1.5  # an outlier so groups differ
    q = quantize_rtn(weight, bits, group_size, symmetric)

    n_groups = 1 if group_size == -1 else math.ceil(in_features / group_size)
    assert q.codes.shape == (12, in_features)
    assert q.scales.shape == (12, n_groups) and q.zeros.shape == (12, n_groups)
    assert q.scales.dtype == torch.float32
    assert torch.equal(q.g_idx.long(), torch.arange(in_features) // (in_features if group_size == -1 else group_size))
    low = 1 if symmetric else 0  # symmetric RTN never needs code 0
    assert int(q.codes.min()) >= low and int(q.codes.max()) <= 2**bits - 1
    if symmetric:
        assert bool((q.zeros == 2 ** (bits - 1)).all())

    error = (weight - q.dequantize()).abs()
    bound = q.scales[:, q.g_idx.long()] / 2
    assert bool((error <= bound * (1 + 1e-5) + 1e-7).all()), float((error - bound).max())


def test_rtn_int8_per_channel_matches_hand_computed_example():
    weight = torch.tensor([[1.0, -0.4, 0.25, 0.0], [-2.54, 1.0, 0.0, 0.062]])
    q = quantize_rtn(weight, bits=8, group_size=-1, symmetric=True)
    # scale = absmax / 127 per row; code = round(w / scale) + 128
    assert torch.allclose(q.scales[:, 0], torch.tensor([1.0 / 127, 2.54 / 127]))
    assert torch.equal(q.zeros[:, 0], torch.tensor([128, 128], dtype=torch.int32))
    # row 0: 127, round(-50.8) = -51, round(31.75) = 32, 0; row 1: -127, 50, 0, round(3.1) = 3
    expected = torch.tensor([[255, 77, 160, 128], [1, 178, 128, 131]])
    assert torch.equal(q.codes.long(), expected)
    assert torch.allclose(q.dequantize(), torch.tensor([[1.0, -51 / 127, 32 / 127, 0.0], [-2.54, 1.0, 0.0, 0.06]]))
    assert q.dequantize(torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_zero_rows_and_groups_dequantize_to_zero(symmetric):
    weight = torch.randn(4, 64, generator=_generator(3))
    weight[1] = 0.0  # whole row
    weight[2, 32:] = 0.0  # one group of the row
    q = quantize_rtn(weight, bits=4, group_size=32, symmetric=symmetric)
    assert bool(torch.isfinite(q.scales).all()) and bool((q.scales > 0).all())
    assert torch.equal(q.codes[1].long(), q.zeros[1, q.g_idx.long()].long())
    deq = q.dequantize()
    assert bool((deq[1] == 0).all()) and bool((deq[2, 32:] == 0).all())
    assert float((deq[0] - weight[0]).abs().max()) > 0  # the other rows are really quantized


@pytest.mark.parametrize("bad,word", [(float("nan"), "NaN"), (float("inf"), "inf")])
def test_rtn_and_gptq_reject_non_finite_weights(bad, word):
    weight = torch.randn(4, 8)
    weight[2, 3] = bad
    with pytest.raises(ValueError, match=word) as info:
        quantize_rtn(weight, 4, name="layers.0.q_proj.weight")
    assert "layers.0.q_proj.weight" in str(info.value)
    with pytest.raises(ValueError, match=word):
        gptq_quantize(weight, torch.eye(8), bits=4, group_size=-1)


@pytest.mark.parametrize("kwargs", [dict(bits=1), dict(bits=9), dict(bits=4, group_size=0), dict(bits=4, group_size=-2)])
def test_rtn_rejects_bad_options(kwargs):
    with pytest.raises(ValueError):
        quantize_rtn(torch.randn(4, 8), **kwargs)


def test_rtn_rejects_non_matrix_weight():
    with pytest.raises(ValueError, match="2-D"):
        quantize_rtn(torch.randn(8), 4)


def test_quantized_linear_rejects_inconsistent_shapes():
    good = quantize_rtn(torch.randn(4, 8), 4, group_size=4)
    with pytest.raises(ValueError, match="g_idx"):
        QuantizedLinear(good.codes, good.scales, good.zeros, 4, 4, True, g_idx=torch.zeros(7, dtype=torch.int32))
    with pytest.raises(ValueError, match="zeros"):
        QuantizedLinear(good.codes, good.scales, good.zeros[:, :1], 4, 4, True, g_idx=good.g_idx)
    with pytest.raises(ValueError, match="g_idx"):
        QuantizedLinear(good.codes, good.scales, good.zeros, 4, 4, True, g_idx=torch.full((8,), 2, dtype=torch.int32))


# ---------------------------------------------------------------------------------------------
# GPTQ building blocks
# ---------------------------------------------------------------------------------------------


def test_hessian_accumulator_matches_direct_formula_over_batches():
    linear = nn.Linear(16, 4)
    accumulator = HessianAccumulator(16)
    handle = accumulator.attach(linear)
    batches = [torch.randn(3, 5, 16, generator=_generator(i)) for i in range(3)] + [torch.randn(7, 16)]
    with torch.no_grad():
        for batch in batches:
            linear(batch)
    handle.remove()
    linear(torch.randn(2, 16))  # after removal: ignored
    rows = torch.cat([b.reshape(-1, 16) for b in batches]).double()
    assert accumulator.n_samples == rows.shape[0] == 52
    assert torch.allclose(accumulator.hessian.double(), 2.0 / 52 * rows.t() @ rows, rtol=1e-5, atol=1e-6)


def test_hessian_accumulator_rejects_wrong_width_and_nan():
    accumulator = HessianAccumulator(8, name="mlp.down_proj")
    with pytest.raises(ValueError, match="mlp.down_proj"):
        accumulator.add_batch(torch.randn(2, 9))
    with pytest.raises(ValueError, match="NaN"):
        accumulator.add_batch(torch.full((2, 8), float("nan")))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [-1, 32, 48])
def test_gptq_with_uncorrelated_inputs_reduces_to_rtn(symmetric, group_size):
    # H = c * I: no off-diagonal terms, so no error is spread and every column rounds to nearest.
    weight = _weight()
    gptq = gptq_quantize(weight, 3.0 * torch.eye(IN), bits=4, group_size=group_size, symmetric=symmetric)
    rtn = quantize_rtn(weight, 4, group_size, symmetric)
    assert torch.equal(gptq.codes, rtn.codes)
    assert torch.allclose(gptq.scales, rtn.scales) and torch.equal(gptq.zeros, rtn.zeros)


@pytest.mark.parametrize(
    "bits,group_size,symmetric,margin",
    [
        (4, 128, True, 0.95),
        (4, 128, False, 0.95),
        (2, 128, False, 0.95),
        # Symmetric INT2 is ternary ({-1, 0, 1} * absmax): most weights round to 0, little to gain.
        (2, 128, True, 1.0),
        (8, -1, True, 0.95),
    ],
)
def test_gptq_beats_rtn_on_correlated_inputs(bits, group_size, symmetric, margin):
    weight = _weight()
    calibration, held_out = _activations(1), _activations(2)
    result = run_gptq(weight, _hessian(calibration), bits=bits, group_size=group_size, symmetric=symmetric)
    rtn = quantize_rtn(weight, bits, group_size, symmetric).dequantize()
    gptq = result.quantized.dequantize()
    for name, x in (("calibration", calibration), ("held-out", held_out)):
        e_gptq, e_rtn = _output_error(x, weight, gptq), _output_error(x, weight, rtn)
        print(f"int{bits} g{group_size} sym={symmetric} {name}: GPTQ {e_gptq:.4f}  RTN {e_rtn:.4f}")
        assert e_gptq < margin * e_rtn
    assert torch.equal(result.dequantized, gptq)
    assert int(result.quantized.codes.max()) <= 2**bits - 1
    assert result.quantized.method == "gptq" and result.quantized.perm is None


def test_gptq_is_independent_of_block_size():
    # Lazy batch updates are an exact reordering; groups start mid-block for block 48 and 7.
    weight, hessian = _weight(), _hessian(_activations(1))
    reference = run_gptq(weight, hessian, bits=4, group_size=32, block_size=128)
    for block_size in (48, 7, 1):
        other = run_gptq(weight, hessian, bits=4, group_size=32, block_size=block_size)
        agreement = float((other.quantized.codes == reference.quantized.codes).float().mean())
        assert agreement > 0.999, (block_size, agreement)
        assert other.loss == pytest.approx(reference.loss, rel=1e-3)


def test_gptq_act_order_reports_g_idx_and_perm():
    weight = _weight()
    calibration, held_out = _activations(1), _activations(2)
    # Uneven feature scales make the act-order permutation matter.
    feature_scale = torch.linspace(0.2, 3.0, IN)[torch.randperm(IN, generator=_generator(5))]
    calibration, held_out = calibration * feature_scale, held_out * feature_scale
    hessian = _hessian(calibration)
    group_size = 32

    result = run_gptq(weight, hessian, bits=4, group_size=group_size, act_order=True)
    q = result.quantized
    trivial = torch.arange(IN) // group_size
    assert not torch.equal(q.g_idx.long(), trivial)
    assert torch.equal(torch.bincount(q.g_idx.long()), torch.full((IN // group_size,), group_size))
    assert torch.equal(q.perm, torch.argsort(torch.diagonal(hessian), descending=True, stable=True))
    # Groups are consecutive runs of the act-order permutation.
    assert torch.equal(q.g_idx.long()[q.perm], trivial)
    assert torch.equal(q.dequantize(), result.dequantized)

    rtn = quantize_rtn(weight, 4, group_size).dequantize()
    e_gptq, e_rtn = _output_error(held_out, weight, q.dequantize()), _output_error(held_out, weight, rtn)
    print(f"act-order int4 g{group_size} held-out: GPTQ {e_gptq:.4f}  RTN {e_rtn:.4f}")
    assert e_gptq < 0.95 * e_rtn

    static = run_gptq(weight, hessian, bits=4, group_size=group_size, act_order=True, static_groups=True)
    assert torch.equal(static.quantized.g_idx.long(), trivial)
    assert torch.equal(static.quantized.dequantize(), static.dequantized)
    assert _output_error(held_out, weight, static.dequantized) < 0.95 * e_rtn


def test_gptq_dead_columns_keep_their_rounded_weight():
    weight = _weight()
    x = _activations(1)
    dead = [0, 17, 200]
    x[:, dead] = 0.0
    result = run_gptq(weight, _hessian(x), bits=4, group_size=-1)
    rtn = quantize_rtn(weight, 4, -1)
    assert result.dead_columns == len(dead)
    assert bool(torch.isfinite(result.dequantized).all())
    # Dead columns neither receive error nor are zeroed: they round to nearest like RTN.
    assert torch.equal(result.quantized.codes[:, dead], rtn.codes[:, dead])
    assert float(result.dequantized[:, dead].abs().sum()) > 0


def test_gptq_raises_instead_of_falling_back_when_cholesky_fails():
    with pytest.raises(GPTQError, match="layers.3.mlp.up_proj"):
        gptq_quantize(_weight(), -torch.eye(IN), bits=4, group_size=128, name="layers.3.mlp.up_proj")


def test_gptq_rejects_bad_hessian():
    with pytest.raises(ValueError, match="Hessian"):
        gptq_quantize(_weight(), torch.eye(IN - 1), bits=4)
    h = torch.eye(IN)
    h[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        gptq_quantize(_weight(), h, bits=4)
