"""Run AngelSlim PTQ on a local Qwen3 checkpoint on the CPU, through AngelSlim's own `Engine`.

Usage (with the isolated venv's python; this script never imports the project package):

    .venv-angelslim/bin/python tools/angelslim/run_ptq.py --model DIR --method fp8_static \
        --out DIR --calib calib.jsonl [--num-samples 16 --seq-len 128]

Steps are the ones AngelSlim's `tools/run.py` performs: parse a YAML config with `SlimConfigParser`, then
`Engine.prepare_model -> prepare_data (if the method needs data) -> prepare_compressor -> run -> convert
-> save`. The YAML used is written to `<out>/angelslim_ptq.yaml` (AngelSlim itself adds
`angelslim_config.json`), and `<out>/run_ptq_report.json` records timings and versions.
If an AngelSlim step raises, the script prints that exact exception and its traceback and exits with 2.
"""

from __future__ import annotations

import os

# Nothing may come from the Hugging Face Hub; set before transformers is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import yaml  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_workarounds import cuda_requests_go_to_cpu, patch_awq_search_copy_semantics  # noqa: E402

# Per-method `compression.quantization` sections, as in angelslim v0.5.0's configs/qwen3/ptq/*/qwen3-0_6b_*.yaml
# (w4a8_fp8 has no Qwen3 YAML there; its section follows utils/default_compress_config.py).
QUANTIZATION_SECTIONS: dict[str, dict[str, Any]] = {
    "fp8_static": {"bits": 8, "quant_method": {"weight": "per-tensor", "activation": "per-tensor"}},
    "fp8_dynamic": {"bits": 8, "quant_method": {"weight": "per-tensor", "activation": "per-tensor"}},
    "int8_dynamic": {"bits": 8, "quant_method": {"weight": "per-channel", "activation": "per-token"}},
    "int4_gptq": {"bits": 4, "quant_method": {"weight": "per-group", "group_size": 128}},
    "int4_awq": {
        "bits": 4,
        "quant_method": {"weight": "per-group", "group_size": 128, "zero_point": True, "mse_range": False},
    },
    "w4a8_fp8": {
        "bits": 4,
        "quant_method": {"weight": "per-group", "group_size": 128, "activation": "per-tensor"},
    },
}
# gptq/awq calibration hard-codes "cuda:…" devices in angelslim 0.5.0 (see cpu_workarounds.py).
METHODS_NEEDING_CPU_REDIRECT = {"int4_gptq", "int4_awq"}
EXIT_ANGELSLIM_FAILED = 2


class AngelSlimStepError(RuntimeError):
    """An AngelSlim step raised; the original exception is chained as __cause__."""

    def __init__(self, step: str, error: BaseException):
        super().__init__(f"AngelSlim step {step!r} failed: {type(error).__name__}: {error}")
        self.step = step
        self.error = error


def build_config(model: Path, method: str, out: Path, calib: Path, num_samples: int, seq_len: int,
                 group_size: int | None = None) -> dict:
    """The AngelSlim YAML config (as a dict) for one PTQ run on the CPU."""
    if method not in QUANTIZATION_SECTIONS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(QUANTIZATION_SECTIONS)}")
    section = json.loads(json.dumps(QUANTIZATION_SECTIONS[method]))
    if group_size is not None:
        if "group_size" not in section["quant_method"]:
            raise ValueError(f"method {method!r} takes no group size")
        section["quant_method"]["group_size"] = group_size
    quantization = {"name": method, **section, "ignore_layers": ["lm_head"]}
    return {
        "global": {"save_path": str(out)},
        "model": {
            "name": "Qwen",
            "model_path": str(model),
            "trust_remote_code": False,
            "low_cpu_mem_usage": True,
            "use_cache": False,
            "torch_dtype": "auto",
            "device_map": "cpu",
        },
        "compression": {"name": "PTQ", "quantization": quantization},
        "dataset": {
            "name": "TextDataset",
            "data_path": str(calib),
            "max_seq_length": seq_len,
            "num_samples": num_samples,
            "batch_size": 1,
            "shuffle": False,
        },
    }


def package_version(name: str) -> str | None:
    """Installed version of a distribution, or None."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def run_step(step: str, timings: dict[str, float], action: Callable[[], Any]) -> Any:
    """Run one AngelSlim step, timing it and wrapping any exception it raises."""
    start = time.perf_counter()
    try:
        return action()
    except Exception as error:  # we re-raise with the step name; the original stays chained
        raise AngelSlimStepError(step, error) from error
    finally:
        timings[step] = round(time.perf_counter() - start, 3)


def run_ptq(
    config_path: Path,
    method: str,
    timings: dict[str, float],
    counter: dict[str, int],
    redirect_cuda: bool = True,
    fix_awq_copy: bool = True,
) -> None:
    """Drive AngelSlim's Engine through the PTQ steps for the YAML at `config_path`.

    `redirect_cuda` and `fix_awq_copy` switch the two CPU workarounds of cpu_workarounds.py (for gptq/awq);
    `counter` receives how often each one acted.
    """
    import torch
    from angelslim.engine import Engine
    from angelslim.utils.config_parser import SlimConfigParser

    torch.manual_seed(0)
    if fix_awq_copy and method == "int4_awq":
        patch_awq_search_copy_semantics(counter)
    config = SlimConfigParser().parse(str(config_path))
    model_config = config.model_config
    dataset_config = config.dataset_config
    compress_config = config.compression_config
    global_config = config.global_config

    engine = Engine()
    run_step(
        "prepare_model",
        timings,
        lambda: engine.prepare_model(
            model_name=model_config.name,
            model_path=model_config.model_path,
            torch_dtype=model_config.torch_dtype,
            device_map=model_config.device_map,
            trust_remote_code=model_config.trust_remote_code,
            low_cpu_mem_usage=model_config.low_cpu_mem_usage,
            use_cache=model_config.use_cache,
            deploy_backend=global_config.deploy_backend,
        ),
    )
    if compress_config.need_dataset:  # dynamic methods calibrate nothing, as in AngelSlim's tools/run.py
        run_step(
            "prepare_data",
            timings,
            lambda: engine.prepare_data(
                data_path=dataset_config.data_path,
                data_type=dataset_config.name,
                max_length=dataset_config.max_seq_length,
                batch_size=dataset_config.batch_size,
                num_samples=dataset_config.num_samples,
                shuffle=dataset_config.shuffle,
                model_name=model_config.name,
                quantization_config=compress_config.quantization,
                dtype=engine.slim_model.model.dtype,
            ),
        )
    run_step(
        "prepare_compressor",
        timings,
        lambda: engine.prepare_compressor(
            compress_name=compress_config.name,
            compress_config=compress_config,
            global_config=global_config,
        ),
    )
    # Engine.run/convert/save index `self.only_inference[idx]`. prepare_compressor copies it from
    # `compress_config.only_inference`, a list on this YAML path, but leaves it a bare bool (False) when no
    # compress_config is given (the `default_method=` path), which makes run() raise TypeError. Make sure
    # it is a list, one flag per compressor, so either path works.
    if isinstance(engine.only_inference, bool):
        engine.only_inference = [engine.only_inference] * len(engine.compress_type)

    def calibrate_convert_save() -> None:
        run_step("run", timings, engine.run)
        run_step("convert", timings, engine.convert)
        run_step("save", timings, lambda: engine.save(global_config.save_path, config))

    if redirect_cuda and method in METHODS_NEEDING_CPU_REDIRECT:
        with cuda_requests_go_to_cpu(counter):
            calibrate_convert_save()
    else:
        calibrate_convert_save()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Run AngelSlim PTQ on CPU through its Engine.")
    parser.add_argument("--model", type=Path, required=True, help="local HF Qwen3 checkpoint dir")
    parser.add_argument("--method", required=True, choices=sorted(QUANTIZATION_SECTIONS))
    parser.add_argument("--out", type=Path, required=True, help="output dir (created)")
    parser.add_argument("--calib", type=Path, required=True, help="calibration JSONL (messages lines)")
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--group-size", type=int, help="group size of int4_gptq / int4_awq / w4a8_fp8 (default 128)")
    parser.add_argument(
        "--no-cuda-redirect",
        action="store_true",
        help="do not redirect gptq/awq's hard-coded CUDA devices to the CPU (shows AngelSlim's own error)",
    )
    parser.add_argument(
        "--no-awq-copy-fix",
        action="store_true",
        help="do not give AWQ's scale search GPU copy semantics (reproduces the CPU weight corruption)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Write the config, run PTQ, write the report; return the process exit code."""
    args = parse_args(argv)
    if not (args.model / "config.json").is_file():
        raise ValueError(f"--model {args.model} has no config.json")
    if not args.calib.is_file():
        raise ValueError(f"--calib {args.calib} does not exist")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    config = build_config(args.model.resolve(), args.method, out, args.calib.resolve(), args.num_samples, args.seq_len,
                          args.group_size)
    config_path = out / "angelslim_ptq.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")

    timings: dict[str, float] = {}
    counter: dict[str, int] = {"redirected": 0, "copied": 0}
    report: dict[str, Any] = {
        "method": args.method,
        "angelslim": package_version("angelslim"),
        "torch": package_version("torch"),
        "transformers": package_version("transformers"),
        "python": sys.version.split()[0],
        "timings_s": timings,
    }
    exit_code = 0
    try:
        run_ptq(
            config_path,
            args.method,
            timings,
            counter,
            redirect_cuda=not args.no_cuda_redirect,
            fix_awq_copy=not args.no_awq_copy_fix,
        )
        report["status"] = "ok"
    except AngelSlimStepError as failure:
        exit_code = EXIT_ANGELSLIM_FAILED
        report["status"] = "failed"
        report["error"] = {"step": failure.step, "type": type(failure.error).__name__, "message": str(failure.error)}
        traceback.print_exception(failure.error, file=sys.stderr)
        print(f"run_ptq.py: {failure}", file=sys.stderr)
    report["cuda_calls_redirected_to_cpu"] = counter["redirected"]
    report["awq_search_to_calls_copied"] = counter["copied"]
    (out / "run_ptq_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(report))
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
