"""AngelSlim output -> Parquet -> evaluation against the original, for all six PTQ methods.

The checkpoints are AngelSlim 0.5.0's own outputs committed in tests/fixtures/angelslim/ (made on this
CPU by tools/angelslim/make_fixtures.py from the tiny random Qwen3 in ``original/``), so this runs in CI
without AngelSlim installed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from llm_workbook import HuggingFaceToParquetConverter, WeightLoaderV2
from llm_workbook.evaluation.compare import evaluate

FIXTURES = Path(__file__).parent / "fixtures" / "angelslim"
SMALL = dict(context_length=64, max_eval_tokens=192, gen_tokens=4, generation_prompts=2, prompt_tokens=8, perf=False)
LINEARS = [f"model.layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")] + \
          [f"model.layers.0.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]

# method -> (storage format of the Linears, activation quantization the runtime must simulate, min cosine)
EXPECTED = {
    "fp8_static": ("fp8", "fp8-static-tensor", 0.995),
    "fp8_dynamic": ("fp8", "fp8-dynamic-tensor", 0.995),
    "int8_dynamic": ("int8", "int8-dynamic-token", 0.999),
    "int4_gptq": ("gptq", None, 0.98),
    "int4_awq": ("awq", None, 0.98),
    "w4a8_fp8": ("w4a8", "fp8-static-tensor", 0.98),
}


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    out_dir = tmp_path_factory.mktemp("angelslim_e2e")
    done = {}
    for method in EXPECTED:
        parquet = out_dir / f"{method}.parquet"
        HuggingFaceToParquetConverter(progress=False).convert(FIXTURES / method, parquet)
        done[method] = parquet, evaluate(FIXTURES / "original", parquet, **SMALL).to_dict()
    return done


def test_manifest_lists_exactly_these_methods() -> None:
    manifest = json.loads((FIXTURES / "MANIFEST.json").read_text())
    assert set(manifest["methods"]) == set(EXPECTED)


@pytest.mark.parametrize("method", list(EXPECTED))
def test_angelslim_checkpoint_runs_from_parquet_against_the_original(records, method: str) -> None:
    parquet, record = records[method]
    fmt, activation, min_cosine = EXPECTED[method]
    loader = WeightLoaderV2(parquet)
    assert {loader.format_of(module) for module in LINEARS} == {fmt}
    assert loader.format_of("lm_head") == "dense"

    schemes = record["candidate"].get("activation_schemes") or {}
    if activation is None:
        assert schemes == {}
    else:
        assert len(schemes) == len(LINEARS) and set(schemes.values()) == {activation}

    metrics = record["metrics"]
    assert metrics["cosine_similarity"] >= min_cosine
    assert metrics["cosine_similarity"] < 1.0 and metrics["kld"]["mean"] > 0  # really quantized, not a copy
    assert math.isfinite(metrics["ppl"]["delta_percent"]) and abs(metrics["ppl"]["delta_percent"]) < 5
    assert record["verdict"]["passed"], record["verdict"]["reasons"]
    json.dumps(record)  # the record is plain JSON


def test_eight_bit_methods_stay_closer_to_the_original_than_four_bit_ones(records) -> None:
    kld = {method: record["metrics"]["kld"]["mean"] for method, (_, record) in records.items()}
    eight_bit = ("fp8_static", "fp8_dynamic", "int8_dynamic")
    four_bit = ("int4_gptq", "int4_awq", "w4a8_fp8")
    assert max(kld[m] for m in eight_bit) < min(kld[m] for m in four_bit), kld
