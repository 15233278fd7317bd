"""Weight-only kernels (runtime.kernels): each stored integer layer's integer form equals its dequantization,
PyTorch's int8/int4 kernels compute the layer's weight, and load_model(kernels=True) runs a whole model on them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llm_workbook import WeightLoaderV2, formats
from llm_workbook.errors import StoreError
from llm_workbook.quantize.run import quantize
from llm_workbook.runtime import kernels
from llm_workbook.runtime.load import load_model
from llm_workbook.store.loader import DENSE

from conftest import make_checkpoint

QUANTIZERS = {  # name -> quantize() arguments
    "ptq-int8": dict(method="int8"),
    "ptq-int4": dict(method="int4"),
    "ptq-int2": dict(method="int2"),
    "gptq-act-order": dict(method="gptq", act_order=True, calib_samples=8, calib_seq_len=32),
    "aios-int8": dict(method="int8", backend="aios"),
    "aios-int2": dict(method="int2", backend="aios"),
}
EXPECTED_KERNEL = {"ptq-int8": kernels.INT8_KERNEL, "ptq-int4": kernels.INT4_KERNEL, "ptq-int2": kernels.INT4_KERNEL,
                   "gptq-act-order": kernels.INT4_KERNEL, "aios-int8": kernels.INT8_KERNEL,
                   "aios-int2": kernels.INT4_KERNEL}


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    root = tmp_path_factory.mktemp("kernels")
    original = make_checkpoint(root / "original", "qwen3", seed=11)
    files = {}
    for name, args in QUANTIZERS.items():
        quantize(original, root / f"{name}.parquet", progress=False, **args)
        files[name] = root / f"{name}.parquet"
    return files


def _records(parquet):
    loader = WeightLoaderV2(parquet)
    layers = sorted({i.layer_name for i in loader.rows.values() if i.format != DENSE and i.params.get("weight_shape")})
    return [loader.load_weight(layer, "weight", dequantize=False) for layer in layers]


@pytest.mark.parametrize("name", list(QUANTIZERS))
def test_integer_form_is_the_stored_weight_and_the_kernel_computes_it(stored, name):
    records = [r for r in _records(stored[name]) if len(r.params["weight_shape"]) == 2]
    assert records
    x = torch.randn(3, 5, records[0].params["weight_shape"][1], generator=torch.Generator().manual_seed(1))
    for record in records:
        fmt = formats.get_format(record.format)
        integer = fmt.affine(record)
        assert torch.equal(integer.dequantize(), fmt.dequantize(record)), record.layer_name
        if x.shape[-1] != integer.codes.shape[1]:
            continue
        module, kernel = kernels.weight_only_linear(record, None)
        assert kernel == EXPECTED_KERNEL[name], (record.layer_name, kernel)
        expected = F.linear(x, fmt.dequantize(record))
        got = module(x.to(torch.bfloat16)).float()
        assert got.shape == expected.shape
        # bfloat16 activations and scales: about 3 significant digits
        assert float((got - expected).norm() / expected.norm()) < 1e-2, record.layer_name


def test_act_order_runs_with_the_input_permuted(stored):
    record = _records(stored["gptq-act-order"])[0]
    integer = formats.get_format(record.format).affine(record)
    assert not torch.equal(integer.g_idx, torch.sort(integer.g_idx).values)  # really act-order
    module, _ = kernels.weight_only_linear(record, None)
    assert module.perm is not None and torch.equal(torch.sort(module.perm).values, torch.arange(len(module.perm)))


def test_a_model_runs_on_the_kernels_and_says_which_layers_did(stored):
    model, info = load_model(stored["ptq-int4"], dtype=torch.bfloat16, kernels=True)
    reference, _ = load_model(stored["ptq-int4"], dtype=torch.float32)
    used = [m for m in model.modules() if isinstance(m, kernels.Int4WeightOnlyLinear)]
    assert used and len(used) == len(info.kernels) and set(info.kernels.values()) == {kernels.INT4_KERNEL}
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        a, b = model(ids).logits.float(), reference(ids).logits
    assert F.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.999
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9


def test_a_grid_no_kernel_takes_stays_dense_and_says_why(tmp_path):
    original = make_checkpoint(tmp_path / "original", "qwen3", seed=12)
    quantize(original, tmp_path / "g64.parquet", method="gptq", bits=8, group_size=64, calib_samples=4, calib_seq_len=16,
             progress=False)  # 8-bit codes in groups: the int8 kernel has one scale per row, the int4 one 4 bits
    model, info = load_model(tmp_path / "g64.parquet", dtype=torch.bfloat16, kernels=True)
    assert info.kernels and all(v.startswith("dense (") and "has no CPU kernel" in v for v in info.kernels.values())
    assert not any(isinstance(m, kernels.WEIGHT_ONLY) for m in model.modules())


def test_a_kernel_that_computes_another_weight_is_refused_naming_the_layer(stored, monkeypatch):
    record = _records(stored["ptq-int8"])[0]
    real = kernels.Int8WeightOnlyLinear

    def wrong(codes, scales, bias, dtype):
        return real(codes, scales * 2, bias, dtype)

    monkeypatch.setattr(kernels, "Int8WeightOnlyLinear", wrong)
    with pytest.raises(StoreError, match=record.layer_name):
        kernels.weight_only_linear(record, None)
