"""workbook/executors.py: sweeps on Ray."""

from __future__ import annotations

import json
import time

import pytest

from conftest import REPO


@pytest.mark.slow
def test_ray_runs_two_default_files_in_parallel_with_the_verdicts_of_a_sequential_run(tmp_path):
    pytest.importorskip("ray")
    from llm_workbook.workbook.executors import run_batch

    files = [REPO / "parameters" / "default" / f"{name}.yaml" for name in ("minilm-ptq-int8", "minilm-ptq-int2")]
    small = {"max_eval_tokens": 512, "measure_perf": False}
    started = time.perf_counter()
    sequential = run_batch(files, reports=tmp_path / "seq", progress=False, overrides=small)
    seq_s = time.perf_counter() - started
    started = time.perf_counter()
    on_ray = run_batch(files, reports=tmp_path / "ray", progress=False, overrides=small, executor="ray")
    ray_s = time.perf_counter() - started
    print(f"two default runs: sequential {seq_s:.1f} s, Ray (2 CPUs) {ray_s:.1f} s")
    assert [o.status for o in on_ray] == [o.status for o in sequential] == ["passed", "failed-check"]
    for o in on_ray:
        ours = json.loads((tmp_path / "ray" / f"{o.run}.json").read_text())
        theirs = json.loads((tmp_path / "seq" / f"{o.run}.json").read_text())
        assert ours["verdict"]["passed"] == theirs["verdict"]["passed"]
        assert ours["summary"]["cosine"] == pytest.approx(theirs["summary"]["cosine"], abs=1e-9)
        for suffix in (".html", ".meeting.html", ".ipynb"):
            assert (tmp_path / "ray" / f"{o.run}{suffix}").is_file()
    assert (tmp_path / "ray" / "index.html").is_file()
    assert not [p for p in (tmp_path / "ray").iterdir() if p.name.endswith(".tmp")]


def test_ray_missing_says_how_to_install(monkeypatch, tmp_path):
    import builtins

    from llm_workbook.workbook import executors as cluster
    from llm_workbook.workbook import parameters
    from llm_workbook.workbook.executors import run_batch

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray":
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(parameters.ParameterError, match=r"pip install -e '\.\[cluster\]'"):
        cluster._ray()


def test_ray_task_resources_come_from_the_parameters():
    from llm_workbook.workbook.executors import _options

    assert _options({"resources": {"num_cpus": 2, "num_gpus": 1}}) == {"num_cpus": 2.0, "num_gpus": 1.0}
    assert _options({}) == {"num_cpus": 1.0, "num_gpus": 0.0}
    assert _options({"resources": {"num_cpus": 1, "accelerator_type:A100": 1}})["resources"] == {"accelerator_type:A100": 1.0}
