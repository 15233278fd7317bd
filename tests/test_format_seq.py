"""AngelSlim's SEQ 2-bit serving (formats/seq.py): the formula on hand-worked values, the on-grid check,
malformed companions refused by name, and the state mapping a model is built from."""

from __future__ import annotations

import pytest
import torch

from llm_workbook.errors import StoreError
from llm_workbook.formats import seq


def test_seq_maps_each_value_to_its_level_as_angelslim_rounds():
    # alpha 2: w/alpha clamped to +-0.99, then round(2r - 0.5) (half to even) + 0.5, halved, times alpha
    weight = torch.tensor([[-10.0, -1.0, -0.4, 0.0, 0.3, 1.2, 5.0]])
    served = seq.seq_quantize(weight, torch.tensor([[2.0]]))
    assert served.tolist() == [[-1.5, -1.5, -0.5, 0.5, 0.5, 1.5, 1.5]]
    # idempotent on its grid, so serving an on-grid file changes nothing
    assert torch.equal(seq.seq_quantize(served, torch.tensor([[2.0]])), served)


def test_rows_on_the_grid_are_told_from_latent_rows():
    alpha = torch.tensor([[0.5], [1.0]])
    weight = torch.tensor([[0.375, -0.125, 0.125, -0.375], [0.75, 0.2, -0.25, 0.25]])
    assert seq.rows_on_grid("m.weight", weight, alpha).tolist() == [True, False]
    survey = seq.Survey()
    survey.add("m.weight", weight, alpha)
    assert survey.case == "mixed" and survey.describe() == "latent: 1/2 rows, served through SEQ"
    assert seq.Survey().describe() is None and seq.Survey().case is None


@pytest.mark.parametrize("clip, message", [
    (torch.ones(3, 1), "one α per row"),
    (torch.tensor([[1.0], [0.0]]), "finite and positive"),
    (torch.tensor([[1.0], [float("nan")]]), "finite and positive"),
])
def test_a_malformed_clip_value_is_refused_naming_the_tensor(clip, message):
    with pytest.raises(StoreError, match=rf"model.layers.0.mlp.up_proj.weight_clip_val: .*{message}"):
        seq.rows_on_grid("model.layers.0.mlp.up_proj.weight", torch.ones(2, 4), clip)


def test_served_state_applies_seq_in_float32_from_the_stored_tensors():
    state = {"a.weight": torch.tensor([[0.3, -0.9]]), "a.weight_clip_val": torch.tensor([[1.0]]),
             "b.weight": torch.tensor([[0.3, -0.9]]), "norm.weight": torch.ones(2)}
    plain = {"b.weight": state["b.weight"]}
    assert seq.served(plain) is plain  # nothing to serve differently
    served = seq.served(state)
    assert served["a.weight"].tolist() == [[0.25, -0.75]]
    assert torch.equal(served["b.weight"], state["b.weight"]) and set(served) == set(state)
    assert served.describe()["projections"] == 1
    # a bfloat16 evaluation: SEQ runs on the stored float32 weight, then the result is cast; rounding the weight
    # to bfloat16 first would move this value (just above the boundary at 0.5) onto the level below
    edge = {"a.weight": torch.tensor([[0.5001]]), "a.weight_clip_val": torch.tensor([[1.0]])}
    cast = {k: v.to(torch.bfloat16) for k, v in edge.items()}
    assert seq.served(cast, edge, torch.bfloat16)["a.weight"].item() == 0.75
    assert seq.served(cast)["a.weight"].item() == 0.25  # what the cast copy alone would give


def test_inspect_and_the_store_facts_say_which_seq_case_a_file_is(tmp_path):
    """A converted SEQ checkpoint: the store's summary (llmc inspect, the run report's store facts) names the
    case from the exact stored tensors; files without weight_clip_val say nothing."""
    import json
    import subprocess
    import sys

    from conftest import make_checkpoint
    from llm_workbook import HuggingFaceToParquetConverter
    from llm_workbook.synthetic.checkpoints import write_checkpoint
    from llm_workbook.store import inventory
    from llm_workbook.store.loader import WeightLoaderV2

    original = make_checkpoint(tmp_path / "original", "qwen3", seed=7)
    files = {}
    for latent in (False, True):
        hf = write_checkpoint(original, tmp_path / f"seq-{latent}", "seq_2bit", latent=latent, candidates=8)
        files[latent] = tmp_path / f"seq-{latent}.parquet"
        HuggingFaceToParquetConverter(progress=False).convert(hf, files[latent])
    on_grid = inventory.summary(WeightLoaderV2(files[False]))
    assert on_grid["seq"]["case"] == "on the grid" and on_grid["seq"]["layers"] == 14 and "grid" in on_grid["formats"]
    latent = inventory.summary(WeightLoaderV2(files[True]))
    assert latent["seq"]["case"] == "latent" and latent["seq"]["rows_on_grid"] == 0
    plain = tmp_path / "plain.parquet"
    HuggingFaceToParquetConverter(progress=False).convert(original, plain)
    assert inventory.summary(WeightLoaderV2(plain))["seq"] is None
    shown = subprocess.run([sys.executable, "-m", "llm_workbook", "inspect", str(files[True])], capture_output=True,
                           text=True, check=True).stdout
    assert "SEQ weights           latent: " in shown and "served through SEQ" in shown
    as_json = subprocess.run([sys.executable, "-m", "llm_workbook", "inspect", str(files[False]), "--json"],
                             capture_output=True, text=True, check=True).stdout
    assert json.loads(as_json)["summary"]["seq"]["case"] == "on the grid"
