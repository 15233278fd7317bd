"""Checks the real AngelSlim fixture checkpoints in tests/fixtures/angelslim/ (made by
tools/angelslim/make_fixtures.py with angelslim 0.5.0 on CPU) against their MANIFEST.json and against the
on-disk formats documented in shared/reference/angelslim-on-cpu.md and angelslim-formats.md.

Expected layouts and dequantization rules below are written from those notes, not taken from the fixtures,
so a regenerated fixture that drifts from the documented format fails here. Runs without angelslim; only the
last test needs the isolated `.venv-angelslim` and is skipped when it is absent.
"""

from __future__ import annotations

import functools
import hashlib
import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures" / "angelslim"
ANGELSLIM_PYTHON = REPO / ".venv-angelslim" / "bin" / "python"
METHODS = ("fp8_static", "fp8_dynamic", "int8_dynamic", "int4_gptq", "int4_awq", "w4a8_fp8")
GROUP = 128
LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble slot k holds output column 8c + AWQ_ORDER[k]
MAX_FIXTURE_BYTES = 1_000_000


def expected_linear_tensors(method: str, out: int, inp: int) -> dict[str, tuple[str, list[int]]]:
    """Tensor suffix -> (safetensors dtype, shape) per quantized nn.Linear(inp, out), per the reference notes."""
    groups = inp // GROUP
    layouts = {
        "fp8_static": {"weight": ("F8_E4M3", [out, inp]), "weight_scale": ("F32", [1]), "input_scale": ("BF16", [1])},
        "fp8_dynamic": {"weight": ("F8_E4M3", [out, inp]), "weight_scale": ("F32", [1])},
        "int8_dynamic": {"weight": ("I8", [out, inp]), "weight_scale": ("BF16", [out, 1])},
        "int4_gptq": {
            "qweight": ("I32", [inp // 8, out]),
            "qzeros": ("I32", [groups, out // 8]),
            "scales": ("BF16", [groups, out]),
            "g_idx": ("I32", [inp]),
        },
        "int4_awq": {
            "qweight": ("I32", [inp, out // 8]),
            "qzeros": ("I32", [groups, out // 8]),
            "scales": ("F16", [groups, out]),
        },
        "w4a8_fp8": {
            "qweight": ("I8", [out, inp // 2]),
            "weight_scale": ("BF16", [1]),
            "weight_scale_int4": ("BF16", [out, groups]),
            "input_scale": ("BF16", [1]),
        },
    }
    return layouts[method]


def load_manifest() -> dict:
    return json.loads((FIXTURES / "MANIFEST.json").read_text())


def header(path: Path) -> dict[str, tuple[str, list[int]]]:
    """name -> (dtype, shape) of a safetensors file, via safe_open."""
    with safe_open(str(path), framework="pt") as handle:
        return {
            name: (handle.get_slice(name).get_dtype(), list(handle.get_slice(name).get_shape()))
            for name in handle.keys()
        }


def tensors(method: str) -> dict[str, torch.Tensor]:
    with safe_open(str(FIXTURES / method / "model.safetensors"), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


def quant_config(method: str) -> dict:
    return json.loads((FIXTURES / method / "config.json").read_text())["quantization_config"]


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def nibbles_along_rows(packed: torch.Tensor) -> torch.Tensor:
    """int32 [r, c] -> [8r, c]: row 8r+j sits in bits 4j..4j+3 (GPTQ qweight)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32).view(1, 8, 1)
    return ((packed.unsqueeze(1) >> shifts) & 15).reshape(packed.shape[0] * 8, packed.shape[1])


def nibbles_along_cols(packed: torch.Tensor, order: tuple[int, ...] = tuple(range(8))) -> torch.Tensor:
    """int32 [r, c] -> [r, 8c]: nibble slot k holds column 8c + order[k]."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    slots = (packed.unsqueeze(-1) >> shifts) & 15
    columns = torch.empty_like(slots)
    columns[..., list(order)] = slots
    return columns.reshape(packed.shape[0], packed.shape[1] * 8)


@functools.lru_cache(maxsize=1)
def original() -> dict[str, torch.Tensor]:
    """Tensors of the bf16 model the fixtures were quantized from (read once)."""
    return tensors("original")


# ---------------------------------------------------------------- manifest and files


def test_manifest_records_every_method_as_ok() -> None:
    manifest = load_manifest()
    assert manifest["angelslim"] == "0.5.0"
    assert manifest["torch"] and manifest["command"]
    assert set(manifest["methods"]) == set(METHODS)
    for method, entry in manifest["methods"].items():
        assert entry["status"] == "ok", f"{method}: {entry.get('error')}"
        assert (FIXTURES / method).is_dir()


@pytest.mark.parametrize("name", ("original", *METHODS))
def test_fixture_files_match_manifest_sha256(name: str) -> None:
    manifest = load_manifest()
    entry = manifest["original"] if name == "original" else manifest["methods"][name]
    on_disk = {path.name for path in (FIXTURES / name).iterdir()}
    assert on_disk == set(entry["files"]), f"{name}: files differ from MANIFEST.json"
    for file_name, digest in entry["files"].items():
        actual = hashlib.sha256((FIXTURES / name / file_name).read_bytes()).hexdigest()
        assert actual == digest, f"{name}/{file_name}: sha256 differs from MANIFEST.json"
    assert sum((FIXTURES / name / f).stat().st_size for f in on_disk) < MAX_FIXTURE_BYTES


@pytest.mark.parametrize("name", ("original", *METHODS))
def test_manifest_tensor_listing_matches_safetensors_header(name: str) -> None:
    manifest = load_manifest()
    entry = manifest["original"] if name == "original" else manifest["methods"][name]
    recorded = {
        tensor: (info["dtype"], info["shape"]) for tensor, info in entry["tensors"]["model.safetensors"].items()
    }
    assert recorded == header(FIXTURES / name / "model.safetensors")


# ---------------------------------------------------------------- layout per the reference notes


@pytest.mark.parametrize("method", METHODS)
def test_tensor_names_dtypes_shapes_follow_reference(method: str) -> None:
    source = header(FIXTURES / "original" / "model.safetensors")
    quantized_prefixes = {name[: -len(".weight")] for name in source if name.split(".")[-2].endswith("_proj")}
    layer_count = sum(1 for name in source if name.endswith("input_layernorm.weight"))
    assert len(quantized_prefixes) == len(LINEARS) * layer_count
    expected: dict[str, tuple[str, list[int]]] = {}
    for name, (dtype, shape) in source.items():
        prefix = name[: -len(".weight")]
        if prefix in quantized_prefixes:
            out, inp = shape
            for suffix, layout in expected_linear_tensors(method, out, inp).items():
                expected[f"{prefix}.{suffix}"] = layout
        else:  # embeddings, norms and lm_head stay in the model dtype
            expected[name] = (dtype, shape)
    assert header(FIXTURES / method / "model.safetensors") == expected


FP8_WEIGHTS = {"num_bits": 8, "strategy": "tensor", "type": "float"}
FP8_TENSOR_INPUT = {"strategy": "tensor", "type": "float"}


@pytest.mark.parametrize(
    ("method", "fmt", "weights", "activations"),
    [
        ("fp8_static", "naive-quantized", FP8_WEIGHTS, {**FP8_TENSOR_INPUT, "dynamic": False}),
        ("fp8_dynamic", "naive-quantized", FP8_WEIGHTS, {**FP8_TENSOR_INPUT, "dynamic": True}),
        (
            "int8_dynamic",
            "int-quantized",
            {"num_bits": 8, "strategy": "channel", "type": "int"},
            {"dynamic": True, "strategy": "token", "type": "int"},
        ),
        # w4a8_fp8's block does not describe its tensors (int4 groups + fp8 scale); recorded as AngelSlim writes it.
        (
            "w4a8_fp8",
            "naive-quantized",
            {**FP8_WEIGHTS, "strategy": "group"},
            {**FP8_TENSOR_INPUT, "dynamic": False},
        ),
    ],
)
def test_compressed_tensors_config(method: str, fmt: str, weights: dict, activations: dict) -> None:
    config = quant_config(method)
    assert config["quant_method"] == "compressed-tensors"
    assert config["format"] == fmt
    assert config["ignore"] == ["lm_head", "lm_head"]  # AngelSlim lists lm_head twice
    group = config["config_groups"]["group_0"]
    assert group["targets"] == ["Linear"]
    assert weights.items() <= group["weights"].items()
    assert activations.items() <= group["input_activations"].items()
    trtllm = json.loads((FIXTURES / method / "hf_quant_config.json").read_text())["quantization"]
    assert trtllm["quant_algo"] == ("INT8" if method == "int8_dynamic" else "FP8")


def test_gptq_and_awq_configs() -> None:
    gptq = quant_config("int4_gptq")
    assert gptq == {
        "bits": 4, "checkpoint_format": "gptq", "desc_act": True, "group_size": 128,
        "quant_method": "gptq", "static_groups": True, "sym": True, "true_sequential": True,
    }
    awq = quant_config("int4_awq")
    expected_awq = {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": 128, "zero_point": True}
    assert expected_awq.items() <= awq.items()
    assert json.loads((FIXTURES / "int4_awq" / "config.json").read_text())["dtype"] == "float16"
    for method in ("int4_gptq", "int4_awq"):
        assert not (FIXTURES / method / "hf_quant_config.json").exists()


# ---------------------------------------------------------------- values: dequantization rules from the notes


@pytest.mark.parametrize("method", ("fp8_static", "fp8_dynamic"))
def test_fp8_weight_is_per_tensor_absmax_over_448(method: str) -> None:
    quantized = tensors(method)
    for linear in LINEARS:
        prefix = f"model.layers.0.{linear}"
        w = original()[f"{prefix}.weight"].float()
        scale = quantized[f"{prefix}.weight_scale"].float()
        assert scale.item() == pytest.approx(w.abs().max().item() / 448, rel=1e-2)
        assert cosine(quantized[f"{prefix}.weight"].float() * scale, w) > 0.999
        if method == "fp8_static":
            assert quantized[f"{prefix}.input_scale"].item() > 0


def test_int8_weight_is_per_row_absmax_over_127() -> None:
    quantized = tensors("int8_dynamic")
    for linear in LINEARS:
        prefix = f"model.layers.0.{linear}"
        w = original()[f"{prefix}.weight"].float()
        scale = quantized[f"{prefix}.weight_scale"].float()
        torch.testing.assert_close(scale, w.abs().amax(dim=1, keepdim=True) / 127, rtol=1e-2, atol=0)
        assert cosine(quantized[f"{prefix}.weight"].float() * scale, w) > 0.9999


def test_gptq_symmetric_zero_stored_minus_one_and_trivial_g_idx() -> None:
    quantized = tensors("int4_gptq")
    for linear in LINEARS:
        prefix = f"model.layers.0.{linear}"
        w = original()[f"{prefix}.weight"].float()
        zeros = nibbles_along_cols(quantized[f"{prefix}.qzeros"]) + 1  # stored as zero - 1
        assert zeros.unique().tolist() == [8]
        g_idx = quantized[f"{prefix}.g_idx"].long()
        assert torch.equal(g_idx, torch.arange(w.shape[1]) // GROUP)
        codes = nibbles_along_rows(quantized[f"{prefix}.qweight"])  # [in, out]
        dequant = ((codes - zeros[g_idx]).float() * quantized[f"{prefix}.scales"].float()[g_idx]).T
        assert cosine(dequant, w) > 0.97


def test_awq_layout_and_norm_folding() -> None:
    """AWQ multiplies the Linear's input columns by s and divides the preceding norm by s, so the dequantized
    weight times (new norm / old norm) must match the original; and the norms differ from the original."""
    quantized = tensors("int4_awq")
    folds = {"input_layernorm": LINEARS[:3], "post_attention_layernorm": LINEARS[4:6]}
    for norm, linears in folds.items():
        name = f"model.layers.0.{norm}.weight"
        assert not torch.equal(quantized[name], original()[name]), f"{name} was not folded"
        ratio = quantized[name].float() / original()[name].float()
        for linear in linears:
            prefix = f"model.layers.0.{linear}"
            w = original()[f"{prefix}.weight"].float()
            codes = nibbles_along_cols(quantized[f"{prefix}.qweight"], AWQ_ORDER)  # [in, out]
            zeros = nibbles_along_cols(quantized[f"{prefix}.qzeros"], AWQ_ORDER)
            groups = torch.arange(w.shape[1]) // GROUP
            dequant = ((codes - zeros[groups]).float() * quantized[f"{prefix}.scales"].float()[groups]).T
            assert cosine(dequant * ratio, w) > 0.99, f"{prefix}: AWQ dequant does not match the original"


def test_w4a8_codes_use_step_absmax_over_7_but_store_absmax_over_8() -> None:
    quantized = tensors("w4a8_fp8")
    for linear in LINEARS:
        prefix = f"model.layers.0.{linear}"
        w = original()[f"{prefix}.weight"].float()
        packed = quantized[f"{prefix}.qweight"].to(torch.int32)
        low, high = ((packed & 15) ^ 8) - 8, (((packed >> 4) & 15) ^ 8) - 8  # signed nibbles, low = even column
        codes = torch.stack([low, high], dim=-1).reshape(w.shape).float()
        group_absmax = w.abs().reshape(w.shape[0], -1, GROUP).amax(dim=-1)
        scale_int4 = quantized[f"{prefix}.weight_scale_int4"].float()
        torch.testing.assert_close(scale_int4, group_absmax / 8, rtol=1e-2, atol=0)
        assert quantized[f"{prefix}.weight_scale"].item() == pytest.approx(w.abs().max().item() / 448, rel=1e-2)
        step = (group_absmax / 7).repeat_interleave(GROUP, dim=1)
        assert (codes == torch.clamp(torch.round(w / step), -8, 7)).float().mean() > 0.98
        assert codes.abs().max() <= 7


def test_non_awq_methods_keep_norms_and_embeddings_unchanged() -> None:
    kept = [name for name in original() if not name.split(".")[-2].endswith("_proj")]
    for method in ("fp8_static", "fp8_dynamic", "int8_dynamic", "int4_gptq", "w4a8_fp8"):
        quantized = tensors(method)
        for name in kept:
            assert torch.equal(quantized[name], original()[name]), f"{method}: {name} changed"


# ---------------------------------------------------------------- end to end with the isolated venv


@pytest.mark.slow
def test_rerun_fp8_dynamic_reproduces_fixture(tmp_path: Path) -> None:
    if not ANGELSLIM_PYTHON.exists():
        pytest.skip(f"{ANGELSLIM_PYTHON} missing: build it with `make angelslim-env`")
    calib = tmp_path / "calib.jsonl"
    subprocess.run(
        [str(ANGELSLIM_PYTHON), str(REPO / "tools/angelslim/make_calib.py"), "--out", str(calib)],
        check=True, capture_output=True, timeout=60,
    )
    out = tmp_path / "fp8_dynamic"
    completed = subprocess.run(
        [
            str(ANGELSLIM_PYTHON), str(REPO / "tools/angelslim/run_ptq.py"),
            "--model", str(FIXTURES / "original"), "--method", "fp8_dynamic",
            "--out", str(out), "--calib", str(calib),
        ],
        capture_output=True, text=True, timeout=240,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    with safe_open(str(out / "model.safetensors"), framework="pt") as fresh:
        reference = tensors("fp8_dynamic")
        assert set(fresh.keys()) == set(reference)
        for name in reference:
            assert torch.equal(fresh.get_tensor(name).view(torch.uint8), reference[name].view(torch.uint8)), name
    fresh_config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert fresh_config == quant_config("fp8_dynamic")
