"""A run's parameters: the one vocabulary from a YAML file to evaluate() and the record."""

from __future__ import annotations

import json

import pytest

from llm_workbook.workbook import parameters
from llm_workbook.workbook.run import EVALUATE_NOTEBOOK

from conftest import REPO


def test_override_values_parse_as_yaml():
    assert parameters.parse_overrides([("a", "0.9"), ("b", "true"), ("c", "null"), ("d", "text"), ("e", "[1, 2]")]) == {
        "a": 0.9, "b": True, "c": None, "d": "text", "e": [1, 2]}


def test_notebook_parameters_cell_matches_the_defaults():
    import ast

    nb = json.loads(EVALUATE_NOTEBOOK.read_text())
    cell = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    assigned = {node.targets[0].id: ast.literal_eval(node.value) for node in ast.parse("".join(cell["source"])).body}
    examples = {"run", "title", "model", "reference"}
    assert set(assigned) == set(parameters.DEFAULTS) | {"inputs_digest"}
    assert {k: v for k, v in assigned.items() if k not in examples | {"inputs_digest"}} == {
        k: v for k, v in parameters.DEFAULTS.items() if k not in examples}


def test_a_run_and_the_api_share_one_set_of_defaults():
    """The parameters' defaults, under evaluate()'s names, are EvaluationSettings' own; only what a notebook
    run does on purpose differs (it shows progress and measures speed with explicit PerfSettings)."""
    import torch

    from llm_workbook.evaluation.compare import EvaluationSettings
    from llm_workbook.evaluation.perf import PerfSettings
    from llm_workbook.evaluation.record import Thresholds

    params = {**parameters.DEFAULTS, "model": "m", "reference": "r"}
    settings = parameters.evaluation_settings(params)
    api = EvaluationSettings(thresholds=EvaluationSettings().thresholds or Thresholds())  # None: the default limits
    assert {key for key, value in settings.items() if getattr(api, key) != value} == {"perf", "progress"}
    assert settings["perf"] == PerfSettings(compare_hf_load=True) and settings["dtype"] is torch.float32
    # every parameter either says what the run is (RUN_KEYS) or changes what evaluate() is given
    changed = {"corpus": "other.txt", "context_length": 64, "stride": 32, "max_eval_tokens": 99, "stage_tokens": 512,
               "reference_precision": "float16", "gen_tokens": 0, "dtype": "bfloat16", "activation_quant": False,
               "keep_packed": True, "measure_perf": False, "perf_models": "candidate", "perf_hf_load": False,
               "perf_packed": True, "cosine_threshold": 0.9, "ppl_threshold": 0.3, "kld_threshold": 0.1,
               "top1_threshold": 0.8, "lm_eval_tasks": "heldout_lambada", "lm_eval_limit": 10, "progress": False}
    assert set(changed) | set(parameters.RUN_KEYS) == set(parameters.DEFAULTS)
    for key, value in changed.items():
        assert parameters.evaluation_settings({**params, key: value}) != settings, key


def test_a_task_that_contradicts_the_original_is_one_error(qwen3_dir, tmp_path):

    parameters.check_task(None, qwen3_dir)
    parameters.check_task("causal-lm", qwen3_dir)
    with pytest.raises(parameters.ParameterError, match="is a causal-lm model"):
        parameters.check_task("encoder", qwen3_dir)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: x\nreference: y\ntask: decoder\n")
    with pytest.raises(parameters.ParameterError, match="task 'decoder' is not one of"):
        parameters.load_parameters(bad)


def test_unknown_parameter_is_an_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: x\nreference: y\ncontext_lenght: 3\n")
    with pytest.raises(parameters.ParameterError, match="context_lenght"):
        parameters.load_parameters(bad)


def test_shipped_parameter_files_are_valid():
    files = sorted((REPO / "parameters").rglob("*.yaml"))
    assert files
    for path in files:
        params = parameters.load_parameters(path)
        assert params["model"] and params["reference"]
