"""Stopped, killed, failing or concurrent writers: nothing half-written, nothing lost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import llm_workbook
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from llm_workbook import HuggingFaceToParquetConverter, StoreError, WeightLoaderV2, export_to_hf
from llm_workbook.store import atomic
from llm_workbook.workbook import parameters
from llm_workbook.workbook import run as workbook

LLMC = [sys.executable, "-m", "llm_workbook"]


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


# ----------------------------------------------------------------------------- property: convert -> load -> export

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2, torch.int8,
          torch.int32, torch.int64, torch.uint8, torch.bool]
SEGMENT = st.text(alphabet=st.sampled_from("abcxyz_0123456789éü层Ω"), min_size=1, max_size=6)


@st.composite
def tensor(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 5), min_size=0, max_size=3)))  # 0-d, empty and odd shapes
    n = 1
    for d in shape:
        n *= d
    raw = draw(st.binary(min_size=n * torch.empty(0, dtype=dtype).element_size(),
                         max_size=n * torch.empty(0, dtype=dtype).element_size()))
    if dtype == torch.bool:
        return torch.tensor([b & 1 for b in raw], dtype=torch.bool).reshape(shape)
    # any bytes, including NaN patterns in floats: the store keeps bytes, not values (int4 codes ride in uint8)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape) if n else torch.empty(shape, dtype=dtype)


@st.composite
def checkpoint(draw):
    names = draw(st.lists(st.lists(SEGMENT, min_size=1, max_size=3).map(".".join), min_size=1, max_size=6, unique=True))
    tensors = {name: draw(tensor()) for name in names}
    shards = draw(st.integers(1, min(3, len(names))))
    return tensors, shards


def write_checkpoint(directory: Path, tensors: dict[str, torch.Tensor], shards: int) -> None:
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({"model_type": "llama"}))
    names = list(tensors)
    weight_map = {}
    for k in range(shards):
        part = names[k::shards]
        if not part:
            continue
        shard = f"model-{k + 1:05d}-of-{shards:05d}.safetensors" if shards > 1 else "model.safetensors"
        save_file({n: tensors[n].contiguous() for n in part}, directory / shard, metadata={"format": "pt"})
        weight_map.update({n: shard for n in part})
    if shards > 1:
        (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(checkpoint())
def test_every_tensor_comes_back_bit_for_bit(tmp_path_factory, case):
    tensors, shards = case
    root = tmp_path_factory.mktemp("prop")
    write_checkpoint(root / "src", tensors, shards)
    HuggingFaceToParquetConverter(progress=False, allow_nonfinite=True).convert(root / "src", root / "m.parquet")
    loader = WeightLoaderV2(root / "m.parquet")
    source = loader.source_tensors()
    assert sorted(source) == sorted(tensors)
    for name, original in tensors.items():
        assert same_bytes(source[name], original), name
    export_to_hf(root / "m.parquet", root / "out", progress=False)
    back = {}
    for shard in sorted((root / "out").glob("*.safetensors")):
        back.update(load_file(shard))
    assert sorted(back) == sorted(tensors)
    for name, original in tensors.items():
        assert same_bytes(back[name], original), name
    if shards > 1:
        assert len(list((root / "out").glob("*.safetensors"))) == len(list((root / "src").glob("*.safetensors")))


# ----------------------------------------------------------------------------- failure injection, every writer


def FailAt(function, n: int):  # noqa: N802 - reads as a class at the call sites
    """``function``, except that its n-th call raises OSError (a full disk, a dead NFS server...); a plain
    function, so it also binds as a method when patched onto a class."""
    calls = [0]

    def failing(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            raise OSError(28, "No space left on device (injected)")
        return function(*args, **kwargs)

    return failing


@pytest.mark.parametrize("n", [1, 3, 7])
def test_parquet_writer_failing_at_the_nth_write_leaves_nothing(qwen3_dir, tmp_path, monkeypatch, n):
    import pyarrow.parquet as pq

    monkeypatch.setattr(pq.ParquetWriter, "write_table", FailAt(pq.ParquetWriter.write_table, n))
    out = tmp_path / "m.parquet"
    with pytest.raises(StoreError, match="disk full while writing tensor"):
        HuggingFaceToParquetConverter(progress=False).convert(qwen3_dir, out)
    assert not out.exists() and leftovers(tmp_path) == []


def test_hf_export_failing_at_the_second_shard_leaves_nothing(llama_sharded_dir, tmp_path, monkeypatch):
    import safetensors.torch

    HuggingFaceToParquetConverter(progress=False).convert(llama_sharded_dir, tmp_path / "m.parquet")
    monkeypatch.setattr(safetensors.torch, "save_file", FailAt(safetensors.torch.save_file, 2))
    with pytest.raises(OSError, match="injected"):
        export_to_hf(tmp_path / "m.parquet", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_gguf_export_failing_mid_write_leaves_nothing(tmp_path, monkeypatch):
    gguf = pytest.importorskip("gguf")
    from gguf_fixtures import write_tiny_llama

    from llm_workbook.store.gguf import export_gguf

    src = write_tiny_llama(tmp_path / "t.gguf")
    HuggingFaceToParquetConverter(progress=False).convert(src, tmp_path / "t.parquet")
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file",
                        FailAt(gguf.GGUFWriter.write_tensors_to_file, 1))
    with pytest.raises(StoreError, match="write failed"):
        export_gguf(tmp_path / "t.parquet", tmp_path / "back.gguf")
    assert not (tmp_path / "back.gguf").exists() and leftovers(tmp_path) == []


def test_atomic_text_write_failing_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "index.html"
    target.write_text("old")
    monkeypatch.setattr(os, "replace", FailAt(os.replace, 1))
    with pytest.raises(OSError, match="injected"):
        atomic.write_text(target, "new")
    assert target.read_text() == "old" and leftovers(tmp_path) == []


def test_report_publish_failing_keeps_the_previous_reports(tmp_path, monkeypatch):
    """A run stopped after executing but before publishing leaves the earlier record and HTML as they were."""
    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / "r.json").write_text('{"run": "r", "status": "passed"}')
    (reports / "r.html").write_text("old report")
    params = {**parameters.DEFAULTS, "run": "r", "title": "r", "model": "builtin:smollm2/ptq-int8",
              "reference": "builtin:smollm2"}

    def fake_execute(notebook, output, parameters, cwd):
        staging = Path(parameters["output_dir"])
        (staging / "r.json").write_text('{"run": "r", "status": "passed", "verdict": {"passed": true}}')
        output.write_text('{"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}')
        raise KeyboardInterrupt  # stopped right after the notebook finished

    monkeypatch.setattr(workbook, "execute", fake_execute)
    with pytest.raises(KeyboardInterrupt):
        workbook.run_one(params, reports, force=True)
    assert (reports / "r.html").read_text() == "old report"
    assert json.loads((reports / "r.json").read_text()) == {"run": "r", "status": "passed"}
    assert not [p for p in reports.iterdir() if p.name.startswith(".r.")]  # no staging directory left


def test_cache_entry_is_whole_or_absent(tiny_lm_h128_1layer_pos128, tmp_path, monkeypatch):
    from llm_workbook.workbook import builtins
    from llm_workbook.synthetic import checkpoints

    tiny = tiny_lm_h128_1layer_pos128
    monkeypatch.setenv(llm_workbook.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setitem(builtins.BASE_BUILDERS, "toy-lm", lambda root: tiny)
    import safetensors.torch

    monkeypatch.setattr(checkpoints, "save_file", FailAt(safetensors.torch.save_file, 1))
    with pytest.raises(builtins.BuiltinError, match="injected"):
        builtins.resolve("builtin:toy-lm/fp8_block")
    built = tmp_path / "cache" / "builtin"
    assert [p.name for p in built.iterdir() if not p.name.endswith(".lock")] == []


# ----------------------------------------------------------------------------- leftovers of dead processes


def test_temporary_of_a_dead_process_is_removed_by_the_next_write(qwen3_dir, tmp_path):
    out = tmp_path / "m.parquet"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".m.parquet.{dead.pid}.tmp"
    stale.write_bytes(b"half a file")
    alive = tmp_path / f".m.parquet.{os.getppid()}.tmp"  # a live process's temporary is not ours to remove
    alive.write_bytes(b"in progress")
    HuggingFaceToParquetConverter(progress=False).convert(qwen3_dir, out)
    assert out.is_file() and not stale.exists() and alive.exists()


# ----------------------------------------------------------------------------- stop signals


def many_tensor_checkpoint(directory: Path, count: int = 4000) -> Path:
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model_type": "llama"}))
    save_file({f"t.{i}.weight": torch.full((64,), float(i)) for i in range(count)}, directory / "model.safetensors",
              metadata={"format": "pt"})
    return directory


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_stop_signal_during_convert_cleans_up(tmp_path, sig):
    src = many_tensor_checkpoint(tmp_path / "src")
    out = tmp_path / "m.parquet"
    # Started as a background job of a non-interactive shell is: with SIGINT ignored (inherited).
    proc = subprocess.Popen([*LLMC, "convert", str(src), str(out), "-q", "--no-grid-detection"],
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    deadline = time.time() + 60
    while not leftovers(tmp_path) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "conversion finished before it could be stopped"
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig
    lines = [l for l in stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and f"interrupted by {signal.Signals(sig).name} while converting" in lines[0]
    assert not out.exists() and leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- concurrency


def test_second_batch_into_the_same_reports_waits_for_the_first(tmp_path, capsys):
    reports = tmp_path / "reports"
    reports.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time\n"
        f"f = open({str(reports / '.llmc-run.lock')!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX)\n"
        "f.write('pid 4242'); f.flush(); print('locked', flush=True); time.sleep(1.5)\n")],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    started = time.perf_counter()
    with workbook.batch_lock(reports):
        waited = time.perf_counter() - started
    holder.wait()
    assert waited > 0.5
    assert "waiting for another llmc run (pid 4242)" in capsys.readouterr().err
    with pytest.raises(parameters.ParameterError, match="another llmc run"):
        with workbook.batch_lock(reports):
            with workbook.batch_lock(reports, wait=False):
                pass


def test_two_builds_of_one_cache_entry_build_it_once(tiny_lm_h128_1layer_pos128, tmp_path, monkeypatch):
    from llm_workbook.workbook import builtins

    tiny = tiny_lm_h128_1layer_pos128
    monkeypatch.setenv(llm_workbook.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setitem(builtins.BASE_BUILDERS, "toy-lm", lambda root: tiny)
    builds = []
    real = builtins._build

    def counting(*args):
        builds.append(args[0].name)
        time.sleep(0.3)
        return real(*args)

    monkeypatch.setattr(builtins, "_build", counting)
    paths = []
    threads = [threading.Thread(target=lambda: paths.append(builtins.resolve("builtin:toy-lm/fp8_block")))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert builds == ["toy-lm/fp8_block"] and len(set(paths)) == 1


# ----------------------------------------------------------------------------- the AngelSlim subprocess


@pytest.fixture()
def fake_angelslim(tmp_path, qwen3_dir):
    """A stand-in for .venv-angelslim's python: answers the module probe, then behaves as $FAKE_MODE says."""
    script = tmp_path / "python"
    script.write_text(
        "#!/usr/bin/env bash\n"
        'if [ "$1" = "-c" ]; then echo ""; exit 0; fi\n'
        'out=""; while [ $# -gt 0 ]; do if [ "$1" = "--out" ]; then out="$2"; fi; shift; done\n'
        'mkdir -p "$out"; echo partial > "$out/model.safetensors.part"\n'
        'case "$FAKE_MODE" in\n'
        '  hang) sleep 30 ;;\n'
        '  kill) kill -9 $$ ;;\n'
        '  incomplete) exit 0 ;;\n'
        "esac\n")
    script.chmod(0o755)
    return script, qwen3_dir


@pytest.mark.parametrize("mode, message", [
    ("hang", "did not finish within 1 s"),
    ("kill", "was killed by SIGKILL"),
    ("incomplete", "output is incomplete"),
])
def test_angelslim_run_that_hangs_dies_or_half_writes_fails_cleanly(fake_angelslim, tmp_path, monkeypatch, mode, message):
    from llm_workbook.quantize import angelslim as quantize

    python, model = fake_angelslim
    monkeypatch.setenv("FAKE_MODE", mode)
    out = tmp_path / "out"
    with pytest.raises(quantize.AngelSlimError, match=message):
        quantize.run_angelslim(model, out, "fp8_dynamic", progress=False, python=python, timeout_s=1)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".llmc-angelslim")]
