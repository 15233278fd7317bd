"""``llmc quantize``: our own PTQ baselines (RTN INT8/INT4/INT2, GPTQ) written as real, packed storage,
and the AngelSlim backend (its PTQ run in its own environment, then converted).

Backends
--------
* ``ptq`` (ours): every ``nn.Linear`` of the source (HF directory / hub id, a Parquet file, or an already
  quantized HF checkpoint read through our formats) not matched by ``skip`` is quantized by
  ``quantize.model.quantize_model``. RTN streams one weight at a time; GPTQ (calibrated on
  ``corpus.calibration_samples``: random windows of the offline corpus's *train* split, disjoint from the
  eval text) builds the model without weights and reads one decoder layer at a time
  (``quantize.sources``). The result is written as

  - ``out_format="parquet"``: a self-contained Parquet V2.1 file (config with a ``quantization_config``
    ``{"quant_method": "llmc-ptq", ...}``, generation config and tokenizer files of the source);
    quantized Linears as ``ptq`` rows (``formats/ptq.py``: codes packed at their bit width, float32
    scales), every other tensor copied from the source untouched (same dtype, same bits);
  - ``out_format="gptq"``: an HF directory in the AutoGPTQ v1 layout (``qweight``/``qzeros``/``scales``/
    ``g_idx``, ``quantization_config`` ``{quant_method: gptq, checkpoint_format: gptq, ...}``), scales in
    the model dtype. ``formats/gptq.py`` reads it back to exactly ``QuantizedLinear.dequantize`` with
    those scales.

* ``angelslim``: ``tools/angelslim/run_ptq.py`` runs in ``.venv-angelslim`` (``make angelslim-env``)
  on the source checkpoint with a calibration JSONL written from the same offline corpus windows; its
  output directory is converted into OUT with ``HuggingFaceToParquetConverter``. A failing AngelSlim
  step raises :class:`AngelSlimError` carrying AngelSlim's own exception text.

Outputs are atomic: a failure leaves no OUT file or directory behind.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Sequence

import torch

from llm_workbook import corpus
from llm_workbook import quantize as ptq
from llm_workbook.errors import AngelSlimError, QuantizeError
from llm_workbook.quantize.angelslim import (
    angelslim_missing, quantize_angelslim, run_angelslim, write_calibration_jsonl,
)
from llm_workbook.quantize.options import (
    AIOS_METHODS, ANGELSLIM_GROUP_METHODS, ANGELSLIM_METHODS, ANGELSLIM_PYTHON, BACKENDS, CALIBRATION_CORPUS,
    COUNTERPARTS, OUT_FORMATS, PTQ_METHODS, ComparisonResult, Options, QuantizeResult, check_output,
    ptq_options,
)
from llm_workbook.quantize.sources import QuantizeSource, SourceLayers, meta_model, open_source, skeleton_model, source_weight
from llm_workbook.quantize.write import write_gptq_dir, write_parquet

# ==================================================================================================
# Our PTQ backend
# ==================================================================================================


def _calibration_ids(source: QuantizeSource, options: Options) -> torch.Tensor:
    tokenizer = source.tokenizer()
    try:
        return corpus.calibration_samples(tokenizer, options.calib_samples, options.calib_seq_len, options.seed,
                                          name=CALIBRATION_CORPUS)
    except ValueError as exc:
        raise QuantizeError(f"{source.label}: calibration data: {exc}") from None


def _quantizable_linears(source: QuantizeSource, model: torch.nn.Module, options: Options) -> dict:
    """The Linears to quantize (not skipped), refusing one that shares its weight with the input embeddings."""
    targets = ptq.find_quantizable_linears(model, options.skip)
    if not targets:
        raise QuantizeError(f"{source.label}: no nn.Linear left to quantize after skip={list(options.skip)}")
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    for name, module in targets.items():
        if embeddings is not None and module.weight is getattr(embeddings, "weight", None):
            raise QuantizeError(f"{source.label}: {name!r} shares its weight with the input embeddings "
                                f"(tie_word_embeddings); keep it in skip (e.g. 'lm_head')")
    return targets


def _run_ptq(source: QuantizeSource, options: Options, out_format: str, progress: bool) -> dict[str, ptq.QuantizedLinear]:
    if options.method == "gptq":  # one decoder layer resident at a time (see SourceLayers)
        model, layer_weights = skeleton_model(source), SourceLayers(source)
    else:
        model, layer_weights = source.model(), None
    targets = _quantizable_linears(source, model, options)
    for name, module in targets.items():
        if out_format == "gptq":
            out_f, in_f = module.weight.shape
            if (in_f * options.bits) % 32 or (out_f * options.bits) % 32:
                raise QuantizeError(f"{source.label}: layer {name!r} has shape {[out_f, in_f]}; the GPTQ v1 layout "
                                    f"needs in and out features times {options.bits} bits to be multiples of 32")
    ids = _calibration_ids(source, options) if options.method == "gptq" else None
    try:
        return ptq.quantize_model(
            model, options.method, ids, bits=options.bits, group_size=options.group_size,
            symmetric=options.symmetric, skip=options.skip, act_order=options.act_order, progress=progress,
            layer_weights=layer_weights,
        )
    except (ValueError, ptq.GPTQError) as exc:
        raise QuantizeError(f"{source.label}: {exc}") from None
    finally:
        del model


def _quantize_ptq(src, out: Path, options: Options, out_format: str, progress: bool) -> QuantizeResult:
    start = time.perf_counter()
    source = open_source(src, out.parent, progress)
    streamed = options.method != "gptq" and out_format == "parquet"
    try:
        # RTN needs no calibration: one weight at a time is read, quantized, written and dropped, so memory
        # stays near the largest tensor. GPTQ needs the model's activations and loads it.
        results = _StreamedRTN(source, options) if streamed else _run_ptq(source, options, out_format, progress)
        writer = write_parquet if out_format == "parquet" else write_gptq_dir
        bpw = writer(source, results, options, out, progress)
    finally:
        source.close()
    return QuantizeResult(out, "ptq", options.method, out_format, options.as_dict(), sorted(results), bpw,
                          time.perf_counter() - start, None if streamed else results)


class _StreamedRTN(Mapping):
    """Layer -> its RTN ``QuantizedLinear``, computed when asked for and not kept (see ``_quantize_ptq``).

    Which Linears to quantize comes from the architecture built on the meta device (no weights), with
    the same skip list and tied-embedding check as the in-memory path."""

    def __init__(self, source: QuantizeSource, options: Options):
        self.source, self.options = source, options
        self.names = list(_quantizable_linears(source, meta_model(source), options))

    def __getitem__(self, layer: str) -> ptq.QuantizedLinear:
        if layer not in self.names:
            raise KeyError(layer)
        weight = source_weight(self.source, f"{layer}.weight")  # as GPTQ's layer loader reads it
        try:
            return ptq.quantize_rtn(weight, self.options.bits, self.options.group_size, self.options.symmetric,
                                    name=layer)
        except ValueError as exc:
            raise QuantizeError(f"{self.source.label}: {exc}") from None

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


# ==================================================================================================
# Public API
# ==================================================================================================


def quantize(
    src: str | os.PathLike,
    out: str | os.PathLike,
    method: str = "int8",
    bits: int | None = None,
    group_size: int | None = None,
    symmetric: bool | None = None,
    skip: Sequence[str] | None = None,
    act_order: bool = False,
    calib_samples: int = 128,
    calib_seq_len: int = 256,
    seed: int = 0,
    out_format: str = "parquet",
    backend: str = "ptq",
    progress: bool = True,
    compare_backends: Sequence[str] | None = None,
    angelslim_python: str | os.PathLike | None = None,
    evaluate_kwargs: dict[str, Any] | None = None,
) -> QuantizeResult | ComparisonResult:
    """Quantize SRC (HF directory, hub id or Parquet file) into OUT.

    Args:
        method: backend ``ptq``: ``int8`` (RTN, per channel, symmetric), ``int4`` (RTN, group 128,
            symmetric), ``int2`` (RTN, group 128, asymmetric) or ``gptq`` (4 bits, group 128, symmetric);
            backend ``angelslim``: one of ``ANGELSLIM_METHODS``.
        bits: only for ``gptq`` (2..8); for the RTN methods it must match the name.
        group_size: -1 per channel, else the input columns per group (default per method, above).
        symmetric: None takes the method's default.
        skip: module-name patterns (substring or regex) left dense; default ``("lm_head", "embed")``.
        act_order: GPTQ's activation order (columns by descending Hessian diagonal).
        calib_samples, calib_seq_len, seed: GPTQ / AngelSlim calibration windows from the train split of
            the offline corpus (``corpus.calibration_samples``).
        out_format: ``parquet`` (a ``ptq``-format weight file) or ``gptq`` (an AutoGPTQ v1 HF directory).
        backend: ``ptq`` (ours), ``angelslim`` (needs ``.venv-angelslim``, ``make angelslim-env``) or ``aios``
            (AI-OS's ArrowQuantizer, exactly: ``int8`` per channel or ``int2`` in groups of 128, on every tensor;
            ``skip`` patterns stay float16 as its ``mixed_precision_layers``).
        compare_backends: e.g. ``("ptq", "angelslim")``: quantize with each (the method is mapped to its
            counterpart, e.g. int8 <-> int8_dynamic, gptq <-> int4_gptq) into ``OUT`` with the backend
            name inserted before the suffix, then evaluate each against SRC with
            ``evaluation.compare.evaluate`` (``evaluate_kwargs`` passed on; ``perf`` defaults to False there);
            returns a ``ComparisonResult``.
        angelslim_python: the AngelSlim env's python (default ``.venv-angelslim/bin/python``).

    Returns a ``QuantizeResult`` (or a ``ComparisonResult`` with ``compare_backends``).
    Raises ``QuantizeError`` (a ``StoreError``/``ValueError``) naming the file, layer or option on bad
    input, and ``AngelSlimError`` with AngelSlim's own message when its run fails. OUT is written
    atomically: after an error it does not exist.
    """
    out = Path(out)
    if compare_backends:
        return _compare(src, out, method, tuple(compare_backends), bits=bits, group_size=group_size,
                        symmetric=symmetric, skip=skip, act_order=act_order, calib_samples=calib_samples,
                        calib_seq_len=calib_seq_len, seed=seed, progress=progress, angelslim_python=angelslim_python,
                        evaluate_kwargs=evaluate_kwargs)
    if backend not in BACKENDS:
        raise QuantizeError(f"unknown backend {backend!r}; supported: {list(BACKENDS)}")
    if out_format not in OUT_FORMATS:
        raise QuantizeError(f"unknown output format {out_format!r}; supported: {list(OUT_FORMATS)}")
    if backend == "aios":
        return _quantize_aios(src, out, method, group_size, symmetric, skip, out_format, progress)
    if backend == "angelslim":
        given = {k: v for k, v in (("bits", bits), ("symmetric", symmetric), ("skip", skip)) if v is not None}
        if group_size is not None and method not in ANGELSLIM_GROUP_METHODS:
            given["group_size"] = group_size
        if act_order:
            given["act_order"] = True
        if given:
            raise QuantizeError(f"AngelSlim's methods fix their own settings; {sorted(given)} apply to backend 'ptq' only "
                                f"(group_size also to AngelSlim's {sorted(ANGELSLIM_GROUP_METHODS)})")
        if out_format != "parquet":
            raise QuantizeError("backend 'angelslim' writes Parquet only (AngelSlim's own directory is converted)")
        check_output(out, out_format)
        python = Path(angelslim_python) if angelslim_python else ANGELSLIM_PYTHON
        return quantize_angelslim(src, out, method, calib_samples, calib_seq_len, seed, progress, python, group_size)
    options = ptq_options(method, bits, group_size, symmetric, skip, act_order, calib_samples, calib_seq_len, seed,
                           out_format)
    check_output(out, out_format)
    return _quantize_ptq(src, out, options, out_format, progress)


def _quantize_aios(src, out: Path, method: str, group_size: int | None, symmetric: bool | None, skip, out_format: str,
                   progress: bool) -> QuantizeResult:
    """AI-OS's ArrowQuantizer on every tensor, as AI-OS's users run it: int8 per output channel, int2 in groups
    of 128 consecutive elements (``group_size`` overrides), symmetric unless told; ``skip`` patterns are its
    ``mixed_precision_layers`` (kept as float16)."""
    import time

    from llm_workbook.quantize import aios

    if method not in AIOS_METHODS:
        raise QuantizeError(f"backend 'aios' quantizes with AI-OS's methods {list(AIOS_METHODS)}, not {method!r}")
    if out_format != "parquet":
        raise QuantizeError("backend 'aios' writes Parquet only (AI-OS's V2 rows)")
    check_output(out, out_format)
    per_channel = method == "int8" and not group_size
    options = aios.aios_options(method, per_channel, True if symmetric is None else symmetric,
                                int(group_size or 0) if (group_size or 0) > 0 else 0)
    started = time.perf_counter()
    bits = aios.quantize_file(src, out, mixed_precision_layers=tuple(skip or ()), progress=progress, **options)
    from llm_workbook.store.loader import WeightLoaderV2

    layers = [i.tensor_name for i in WeightLoaderV2(out).rows.values() if i.format == "aios"]
    return QuantizeResult(out, "aios", method, out_format, {**options, "mixed_precision_layers": list(skip or ())},
                          layers, bits, time.perf_counter() - started)


def backend_output(out: Path, backend: str) -> Path:
    """Where ``compare_backends`` writes one backend's output: ``x.parquet`` -> ``x.<backend>.parquet``."""
    return out.with_name(f"{out.stem}.{backend}{out.suffix}")


def _compare(src, out: Path, method: str, backends: tuple[str, ...], evaluate_kwargs: dict[str, Any] | None,
             angelslim_python, **options: Any) -> ComparisonResult:
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or len(set(backends)) != len(backends) or len(backends) < 2:
        raise QuantizeError(f"compare_backends takes two or more distinct backends of {list(BACKENDS)}, got {list(backends)}")
    methods: dict[str, str] = {}
    for backend in backends:
        own = {"ptq": PTQ_METHODS, "angelslim": ANGELSLIM_METHODS, "aios": AIOS_METHODS}[backend]
        counterpart = method if method in own else COUNTERPARTS[backend].get(method)
        if counterpart is None:
            raise QuantizeError(f"method {method!r} has no {backend} counterpart; pairs: "
                                f"{COUNTERPARTS['angelslim']} (ptq -> angelslim)")
        methods[backend] = counterpart
    # Validate every run's options before the first (possibly long) one starts.
    for backend in backends:
        if backend == "ptq":
            ptq_options(methods["ptq"], options["bits"], options["group_size"], options["symmetric"], options["skip"],
                         options["act_order"], options["calib_samples"], options["calib_seq_len"], options["seed"], "parquet")
        elif (problem := angelslim_missing(angelslim_python)):
            raise QuantizeError(f"AngelSlim backend: {problem}")
        check_output(backend_output(out, backend), "parquet")
    results: dict[str, QuantizeResult] = {}
    for backend in backends:
        kwargs = dict(options)
        if backend in ("angelslim", "aios"):  # they fix their own bits / groups / skip list
            kwargs.update(bits=None, group_size=None, symmetric=None, skip=None, act_order=False)
        results[backend] = quantize(src, backend_output(out, backend), methods[backend], backend=backend,
                                    angelslim_python=angelslim_python, **kwargs)
    from llm_workbook.evaluation.compare import evaluate  # transformers-heavy: only when comparing

    kwargs = {"perf": False, **(evaluate_kwargs or {})}  # accuracy comparison; perf subprocesses only on request
    evaluations = {b: evaluate(src, r.output, **kwargs) for b, r in results.items()}
    return ComparisonResult(results, evaluations, f"evaluated against {src} with evaluation.evaluate")


__all__ = [
    "ANGELSLIM_METHODS", "AngelSlimError", "BACKENDS", "ComparisonResult", "OUT_FORMATS", "PTQ_METHODS",
    "QuantizeError", "QuantizeResult", "angelslim_missing", "backend_output", "quantize", "run_angelslim",
    "write_calibration_jsonl",
]
