"""Write real on-disk quantized checkpoints from an unquantized (bf16) Hugging Face checkpoint.

``write_checkpoint(src_dir, out_dir, fmt)`` reads a bf16 safetensors checkpoint and writes the same
model as one of the formats AngelSlim (or the tool named) puts on disk: same tensor names, dtypes and
shapes, the same ``quantization_config`` in config.json, the same modules left unquantized
(``lm_head``, embeddings, norms), tokenizer and generation files copied. These directories are the
"pre-quantized checkpoints" of the embedded default set; the readers in ``formats/`` must store them
losslessly and dequantize them close to the original.

Formats (see ``FORMATS``; AngelSlim section numbers refer to shared/reference/angelslim-formats.md):

* ``fp8_static`` / ``fp8_dynamic`` (§1.2): compressed-tensors ``naive-quantized``, per-tensor FP8
  E4M3. The codes come from compressed-tensors' own ``NaiveQuantizationCompressor``; the scales follow
  AngelSlim: ``weight_scale = bf16(absmax) / 448`` computed in bf16 and saved as F32 [1],
  ``input_scale = bf16(activation absmax) / 448`` saved as BF16 [1] (static only), activations
  observed on the offline calibration corpus.
* ``fp8_block`` (§1.3): ``quant_method: fp8``, ``weight_block_size: [128, 128]``, F32
  ``weight_scale_inv`` per block (squeezed like AngelSlim's ``create_fp8_quantized_param``).
* ``int8_w8a8`` (§1.4): compressed-tensors ``int-quantized``; I8 weight, BF16 ``weight_scale``
  [out, 1] = absmax / 127, per-token dynamic activations; codes from compressed-tensors'
  ``IntQuantizationCompressor`` (bf16 arithmetic, as AngelSlim's ``quantize_weight_int``).
* ``gptq_int4`` (§1.5): AutoGPTQ v1 (``qweight``/``qzeros`` zero−1/``scales`` BF16/``g_idx``) with
  the config AngelSlim v0.5 writes; codes from a real GPTQ run (``ptq.quantize_model``, act-order
  with static groups as AngelSlim runs it) on calibration windows of the offline corpus.
* ``awq_int4`` (§1.6): AutoAWQ GEMM layout, asymmetric RTN group 128 from ``ptq.quantize_rtn``
  (no activation-aware scale search), packed along ``out`` in AutoAWQ's order (``formats.awq.ORDER``); F16 scales.
* ``seq_2bit`` (§1.9, HY-1.8B-2Bit style): no quantization_config; every decoder Linear weight is
  replaced by its 2-bit SEQ fake-quant (per row ``(s/2)·{−1.5, −0.5, 0.5, 1.5}``, ``s`` by MSE
  search), stored as ordinary bf16 values.
* ``nvfp4`` (§1.7): AngelSlim PTQ NVFP4 in ModelOpt tensor layout under its (misleading)
  compressed-tensors ``naive-quantized`` config, plus ``hf_quant_config.json``.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from . import ptq
from .converter import staged_directory
from .formats._codec import E2M1_VALUES, FP8_MAX
from .formats.awq import pack_awq

__all__ = [
    "FORMATS",
    "QUANTIZED_LINEARS",
    "fp8_block_quantize",
    "fp8_per_tensor_quantize",
    "int8_channel_quantize",
    "nvfp4_quantize",
    "seq_2bit_fake_quantize",
    "write_checkpoint",
]

FP4_MAX = 6.0
INT8_MAX = 127
# Decoder Linears AngelSlim quantizes for Qwen/Llama-style models (qwen.py ``observed_names``).
QUANTIZED_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DECODER_PREFIX = "model.layers."
WEIGHT_FILE = "model.safetensors"
# Files of the source directory that are not copied: weights, their index, the rewritten config, and
# our toy LM's training log (it describes the original, not the quantized copy).
NOT_COPIED = {"config.json", "model.safetensors.index.json", "training.json"}
# NVFP4: q/k/v and gate/up share one weight_scale_2 (TensorRT-LLM fuses them).
NVFP4_SHARED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


# ================================================================================================
# Quantization math, one small function per format (weights are Linear weights [out, in])
# ================================================================================================


def _ct_args(**kwargs: Any):
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(**kwargs)


def _ct_scheme(weights: dict, input_activations: dict | None):
    from compressed_tensors.quantization import QuantizationScheme

    return QuantizationScheme(
        targets=["Linear"],
        weights=_ct_args(**weights),
        input_activations=_ct_args(**input_activations) if input_activations else None,
    )


def _nonzero(value: torch.Tensor) -> torch.Tensor:
    """All-zero tensors/blocks get scale 1 instead of 0 (their codes are 0 either way)."""
    return torch.where(value > 0, value, torch.ones_like(value))


def fp8_per_tensor_quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 E4M3 codes [out, in] and F32 ``weight_scale`` [1], as AngelSlim fp8_static/dynamic writes them.

    AngelSlim's observer keeps the absmax in the model dtype and divides by 448 there; the weight is
    then divided by that bf16 scale (bf16 arithmetic) and cast to FP8. compressed-tensors'
    ``NaiveQuantizationCompressor.compress`` performs exactly that division, clamp and cast, so it
    produces the codes; the scale is saved as float32 like AngelSlim's ``.float()``.
    """
    from compressed_tensors.compressors import NaiveQuantizationCompressor

    scale = _nonzero(weight.abs().amax().reshape(1)) / torch.tensor(FP8_MAX, dtype=weight.dtype)
    scheme = _ct_scheme({"num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True}, None)
    packed = NaiveQuantizationCompressor.compress({"weight": weight, "weight_scale": scale}, scheme)
    return packed["weight"].contiguous(), scale.to(torch.float32)


def fp8_block_quantize(weight: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 E4M3 codes and F32 ``weight_scale_inv`` per block, as AngelSlim's ``create_fp8_quantized_param``.

    Per block (zero padded, blocks never larger than the weight): ``q = fp8(clamp(w * (448 / absmax)))``
    and ``scale_inv = 1 / (448 / absmax)`` in float32, then ``.squeeze()`` (a single block row or
    column gives a 1-D scale, one block a 0-D scale, exactly as AngelSlim saves it).
    """
    rows, cols = weight.shape
    b0, b1 = min(block[0], rows), min(block[1], cols)
    n0, n1 = math.ceil(rows / b0), math.ceil(cols / b1)
    padded = torch.nn.functional.pad(weight.to(torch.float32), (0, n1 * b1 - cols, 0, n0 * b0 - rows))
    blocks = padded.reshape(n0, b0, n1, b1).permute(0, 2, 1, 3)
    multiplier = FP8_MAX / _nonzero(blocks.abs().amax(dim=(-1, -2)))
    codes = torch.clamp(blocks * multiplier[..., None, None], -FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    codes = codes.permute(0, 2, 1, 3).reshape(n0 * b0, n1 * b1)[:rows, :cols]
    return codes.contiguous(), multiplier.reciprocal().squeeze().contiguous()


def int8_channel_quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """I8 codes [out, in] and ``weight_scale`` [out, 1] in the weight's dtype, as AngelSlim int8_dynamic.

    ``scale = absmax_row / 127`` and ``q = clamp(round(w / scale), -128, 127)``, both in the model dtype
    (AngelSlim's in-place ``quantize_weight_int``); compressed-tensors' ``IntQuantizationCompressor``
    does the division, rounding and clamp.
    """
    from compressed_tensors.compressors import IntQuantizationCompressor

    scale = _nonzero(weight.abs().amax(dim=1, keepdim=True)) / torch.tensor(INT8_MAX, dtype=weight.dtype)
    scheme = _ct_scheme(
        {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True},
        {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True, "symmetric": True},
    )
    packed = IntQuantizationCompressor.compress({"weight": weight, "weight_scale": scale}, scheme)
    return packed["weight"].to(torch.int8).contiguous(), scale.contiguous()


def awq_quantize(weight: torch.Tensor, group_size: int = 128, name: str = "weight") -> dict[str, torch.Tensor]:
    """AWQ GEMM ``qweight`` [in, out/8], ``qzeros`` [in/gs, out/8], ``scales`` F16 [in/gs, out].

    Asymmetric 4-bit RTN per group of ``group_size`` inputs from ``ptq.quantize_rtn`` (codes and zero
    points unchanged; scales cast to float16 as AutoAWQ stores them).
    """
    rtn = ptq.quantize_rtn(weight, bits=4, group_size=group_size, symmetric=False, name=name)
    return {
        "qweight": pack_awq(rtn.codes.t().contiguous()),
        "qzeros": pack_awq(rtn.zeros.t().contiguous()),
        "scales": rtn.scales.t().contiguous().to(torch.float16),
    }


def _round_significand(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Round positive float32 values to ``bits`` significant bits (exact in bf16 when bits <= 8)."""
    mantissa, exponent = torch.frexp(values)  # mantissa in [0.5, 1)
    return torch.ldexp(torch.round(mantissa * 2**bits) / 2**bits, exponent)


def _seq_levels(weight: torch.Tensor, quarter: torch.Tensor) -> torch.Tensor:
    """SEQ 2-bit fake-quant with per-row step ``quarter = s / 4``: values ``(2k + 1) * s / 4``, k in {-2..1}.

    AngelSlim's ``SpecialWeightQuantizer`` (quant_method seq, w_bits 2): ``q = clamp(w / s, -0.99,
    0.99)``, ``level = (round(2q - 0.5) + 0.5) / 2`` so ``w_q = level * s`` in {-0.75, -0.25, 0.25, 0.75}·s.
    """
    scale = 4.0 * quarter
    q = torch.clamp(weight / scale, -0.99, 0.99)
    k = torch.round(2.0 * q - 0.5)
    return (2.0 * k + 1.0) * quarter


def seq_2bit_fake_quantize(weight: torch.Tensor, candidates: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row 2-bit SEQ fake-quantized weight (float32) and its per-row scale ``s`` [out].

    ``s`` is picked per output row by a grid search minimising the squared error over ``candidates``
    values of ``s`` in ``(0, absmax / 0.75]``. ``s / 4`` is then rounded to 6 significant bits so all
    four levels ``±s/4, ±3s/4`` are exact bf16 numbers: the bf16 checkpoint holds exactly four
    distinct values per row, which is what a 2-bit grid encoder recovers losslessly.
    """
    w = weight.detach().to(torch.float32)
    top = _nonzero(w.abs().amax(dim=1, keepdim=True)) / 0.75  # s at which the outer level hits absmax
    best_err = torch.full((w.shape[0], 1), float("inf"))
    best = top.clone()
    for fraction in torch.linspace(1.0 / candidates, 1.0, candidates).tolist():
        scale = top * fraction
        err = ((w - _seq_levels(w, scale / 4.0)) ** 2).sum(dim=1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, scale, best)
    quarter = _round_significand(best / 4.0, 6)
    return _seq_levels(w, quarter), (4.0 * quarter).squeeze(1)




def _e2m1_codes(values: torch.Tensor) -> torch.Tensor:
    """E2M1 nibbles ``sign << 3 | index`` of float32 values: round to nearest, ties to the even index
    (as a float cast does), saturating at ±6."""
    table = torch.tensor(E2M1_VALUES)
    midpoints = (table[1:] + table[:-1]) / 2
    magnitude = values.abs().clamp(max=FP4_MAX).contiguous()
    index = torch.searchsorted(midpoints, magnitude)  # midpoints strictly below: the lower value at a tie
    tie = (index < len(midpoints)) & (magnitude == midpoints[index.clamp(max=len(midpoints) - 1)])
    index = torch.where(tie & (index % 2 == 1), index + 1, index)
    sign = (values < 0).to(torch.int64) << 3
    return (index | sign).to(torch.uint8)


def nvfp4_quantize(weight: torch.Tensor, global_amax: torch.Tensor, group_size: int = 16) -> dict[str, torch.Tensor]:
    """ModelOpt-style NVFP4: ``weight`` U8 [out, in/2], ``weight_scale`` F8 [out, in/16], ``weight_scale_2`` F32.

    ``weight_scale_2 = global_amax / (6 * 448)`` (``global_amax`` shared across fused q/k/v, gate/up),
    ``weight_scale = fp8(group_amax / 6 / weight_scale_2)``, codes = E2M1 of ``w / (weight_scale *
    weight_scale_2)``, two per byte with the even input in the low nibble (AngelSlim ``NVFP4QDQModule``).
    """
    out, in_ = weight.shape
    if in_ % group_size:
        raise ValueError(f"nvfp4: {in_} input features are not a multiple of the group size {group_size}")
    w = weight.to(torch.float32).reshape(out, in_ // group_size, group_size)
    scale_2 = _nonzero(global_amax.to(torch.float32).reshape(())) / (FP4_MAX * FP8_MAX)
    block_scale = (w.abs().amax(dim=-1) / FP4_MAX / scale_2).clamp(max=FP8_MAX).to(torch.float8_e4m3fn)
    effective = _nonzero(block_scale.to(torch.float32)) * scale_2
    codes = _e2m1_codes(w / effective[..., None]).reshape(out, in_)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return {"weight": packed.contiguous(), "weight_scale": block_scale.contiguous(), "weight_scale_2": scale_2.clone()}


# ================================================================================================
# Calibration (activation statistics, GPTQ inputs) on the offline corpus
# ================================================================================================


def calibration_ids(src_dir: Path, n_samples: int, seq_len: int, seed: int, corpus_name: str) -> torch.Tensor:
    """``[n_samples, seq_len]`` token windows of the corpus train split, tokenized by the checkpoint's tokenizer."""
    from transformers import AutoTokenizer

    from . import corpus

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(src_dir))
    except Exception as exc:  # no tokenizer files: calibration cannot run
        raise ValueError(f"{src_dir}: calibration needs the checkpoint's tokenizer ({exc})") from None
    ids = corpus.calibration_samples(tokenizer, n_samples=n_samples, seq_len=seq_len, seed=seed, name=corpus_name)
    return ids


def _load_float_model(src_dir: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(src_dir), dtype=torch.float32)
    return model.eval()


@torch.no_grad()
def input_absmax(model: torch.nn.Module, modules: list[str], ids: torch.Tensor, batch_size: int = 8) -> dict[str, float]:
    """Largest |input| each named Linear sees over the calibration ids (AngelSlim's per-tensor act observer)."""
    found = dict(model.named_modules())
    missing = [m for m in modules if m not in found]
    if missing:
        raise ValueError(f"calibration: modules {missing[:3]} are not in {type(model).__name__}")
    amax = {m: 0.0 for m in modules}

    def make_hook(name: str):
        def hook(_module, args, kwargs):
            x = args[0] if args else kwargs["input"]
            amax[name] = max(amax[name], float(x.detach().abs().amax()))

        return hook

    handles = [found[m].register_forward_pre_hook(make_hook(m), with_kwargs=True) for m in modules]
    try:
        for chunk in ids.split(batch_size):
            model(input_ids=chunk, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return amax


# ================================================================================================
# Checkpoint plumbing
# ================================================================================================


@dataclass
class Source:
    """An unquantized checkpoint read whole (the models here are small)."""

    root: Path
    config: dict
    tensors: dict[str, torch.Tensor]

    def linear_modules(self) -> list[str]:
        """Decoder Linears AngelSlim quantizes, in checkpoint order."""
        modules = []
        for name, tensor in self.tensors.items():
            module, _, leaf = name.rpartition(".")
            if (leaf == "weight" and module.startswith(DECODER_PREFIX) and tensor.dim() == 2
                    and module.rpartition(".")[2] in QUANTIZED_LINEARS):
                modules.append(module)
        return modules


def read_source(src_dir: str | os.PathLike) -> Source:
    """config.json and every safetensors tensor of an unquantized checkpoint; ValueError names the file."""
    root = Path(src_dir)
    config_path = root / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{config_path}: missing; write_checkpoint needs an HF checkpoint directory")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("quantization_config"):
        raise ValueError(f"{config_path}: already has a quantization_config; write_checkpoint needs an unquantized model")
    shards = sorted(root.glob("*.safetensors"))
    if not shards:
        raise ValueError(f"{root}: no *.safetensors weights")
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        tensors.update(load_file(str(shard)))
    return Source(root, config, tensors)


def _float_weight(source: Source, module: str) -> torch.Tensor:
    name = f"{module}.weight"
    weight = source.tensors[name]
    if not weight.is_floating_point() or weight.element_size() < 2:
        raise ValueError(f"{source.root}: tensor {name!r} has dtype {weight.dtype}; expected an unquantized float weight")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError(f"{source.root}: tensor {name!r} holds NaN/Inf values")
    return weight


def _replace_weights(source: Source, groups: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Source tensors in order, each quantized module's ``weight`` replaced by its group's tensors."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in source.tensors.items():
        module, _, leaf = name.rpartition(".")
        if module in groups and leaf == "weight":
            out.update({f"{module}.{suffix}": t for suffix, t in groups[module].items()})
        else:
            out[name] = tensor
    return out


def _write_dir(source: Source, out_dir: Path, tensors: dict[str, torch.Tensor], config: dict,
               extra_files: dict[str, dict] | None = None) -> Path:
    """Write weights, config.json, extra JSON files and copies of the side files, atomically."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f"{out_dir}: output exists and is not an empty directory")
    if not out_dir.parent.is_dir():
        raise ValueError(f"{out_dir}: parent directory {out_dir.parent} does not exist")
    with staged_directory(out_dir) as staging:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(staging / WEIGHT_FILE), metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        for name, content in (extra_files or {}).items():
            (staging / name).write_text(json.dumps(content, indent=4) + "\n", encoding="utf-8")
        for entry in sorted(source.root.iterdir()):
            if (entry.is_file() and not entry.name.startswith(".") and entry.suffix != ".safetensors"
                    and entry.name not in NOT_COPIED and not (staging / entry.name).exists()):
                shutil.copy2(entry, staging / entry.name)
    return out_dir


def _with_qconfig(source: Source, qconfig: dict | None, dtype: str | None = None) -> dict:
    config = json.loads(json.dumps(source.config))
    if qconfig is not None:
        config["quantization_config"] = qconfig
    if dtype is not None:
        for key in ("dtype", "torch_dtype"):
            if key in config:
                config[key] = dtype
    return config


def _angelslim_ignore() -> list[str]:
    """AngelSlim's Qwen ignore list: the YAML's ``lm_head`` plus every Linear module outside the decoder
    blocks, i.e. ``lm_head`` again (the toolkit writes it twice, also when embeddings are tied)."""
    return ["lm_head", "lm_head"]


def _hf_quant_config(ignore: list[str], algo: str, group_size: int | None = None) -> dict:
    """The TensorRT-LLM / ModelOpt side file AngelSlim's ``PTQSaveVllmHF`` writes next to config.json."""
    quantization: dict[str, Any] = {"exclude_modules": ignore, "kv_cache_quant_algo": None, "quant_algo": algo}
    if group_size is not None:
        quantization["group_size"] = group_size
    return {"quantization": quantization}


def _ct_config(fmt: str, weights: dict, activations: dict, ignore: list[str]) -> dict:
    """compressed-tensors quantization_config with the keys and order AngelSlim's save.py writes."""
    return {
        "quant_method": "compressed-tensors",
        "ignore": ignore,
        "config_groups": {"group_0": {"weights": weights, "input_activations": activations,
                                      "output_activations": None, "targets": ["Linear"]}},
        "kv_cache_scheme": None,
        "format": fmt,
        "quantization_status": "compressed",
    }


# ================================================================================================
# One writer per format
# ================================================================================================


def _write_fp8(source: Source, out: Path, static: bool, n_samples: int = 32, seq_len: int = 256,
               seed: int = 0, corpus: str = "pydoc") -> Path:
    modules = source.linear_modules()
    act_amax: dict[str, float] = {}
    if static:
        ids = calibration_ids(source.root, n_samples, seq_len, seed, corpus)
        act_amax = input_absmax(_load_float_model(source.root), modules, ids)
    groups = {}
    for module in modules:
        weight = _float_weight(source, module)
        codes, scale = fp8_per_tensor_quantize(weight)
        group = {"weight": codes, "weight_scale": scale}
        if static:
            # observer absmax in the model dtype, divided by 448 there (AngelSlim PTQHook.post_process)
            amax = _nonzero(torch.tensor([act_amax[module]], dtype=weight.dtype))
            group["input_scale"] = amax / torch.tensor(FP8_MAX, dtype=weight.dtype)
        groups[module] = group
    ignore = _angelslim_ignore()
    qconfig = _ct_config(
        "naive-quantized",
        {"num_bits": 8, "strategy": "tensor", "dynamic": False, "type": "float"},
        {"num_bits": 8, "strategy": "tensor", "dynamic": not static, "type": "float"},
        ignore,
    )
    return _write_dir(source, out, _replace_weights(source, groups), _with_qconfig(source, qconfig),
                      {"hf_quant_config.json": _hf_quant_config(ignore, "FP8")})


def _write_fp8_block(source: Source, out: Path, block_size: tuple[int, int] | list[int] = (128, 128)) -> Path:
    block = (int(block_size[0]), int(block_size[1]))
    groups = {}
    for module in source.linear_modules():
        codes, scale_inv = fp8_block_quantize(_float_weight(source, module), block)
        groups[module] = {"weight": codes, "weight_scale_inv": scale_inv}
    # _get_ignored_layers: every nn.Linear whose name matches no SUFFIX_TO_QUANT entry, i.e. lm_head
    qconfig = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
               "modules_to_not_convert": ["lm_head"], "weight_block_size": list(block)}
    return _write_dir(source, out, _replace_weights(source, groups), _with_qconfig(source, qconfig))


def _write_int8(source: Source, out: Path) -> Path:
    groups = {}
    for module in source.linear_modules():
        codes, scale = int8_channel_quantize(_float_weight(source, module))
        groups[module] = {"weight": codes, "weight_scale": scale}
    ignore = _angelslim_ignore()
    qconfig = _ct_config(
        "int-quantized",
        {"num_bits": 8, "strategy": "channel", "dynamic": False, "type": "int"},
        {"num_bits": 8, "strategy": "token", "dynamic": True, "type": "int"},
        ignore,
    )
    return _write_dir(source, out, _replace_weights(source, groups), _with_qconfig(source, qconfig),
                      {"hf_quant_config.json": _hf_quant_config(ignore, "INT8")})


def _write_gptq(source: Source, out: Path, group_size: int = 128, n_samples: int = 64, seq_len: int = 256,
                seed: int = 0, corpus: str = "pydoc", damp_percent: float = 0.01, progress: bool = False) -> Path:
    from .formats.gptq import pack_gptq

    modules = source.linear_modules()
    ids = calibration_ids(source.root, n_samples, seq_len, seed, corpus)
    model = _load_float_model(source.root)
    found = ptq.find_quantizable_linears(model)
    skip = tuple(f"^{re.escape(name)}$" for name in found if name not in modules) + ptq.DEFAULT_SKIP
    # AngelSlim int4_gptq: symmetric, act-order (desc_act) with static groups, true sequential.
    results = ptq.quantize_model(
        model, "gptq", ids, bits=4, group_size=group_size, symmetric=True, skip=skip, act_order=True,
        static_groups=True, damp_percent=damp_percent, true_sequential=True, progress=progress,
    )
    groups = {}
    for module in modules:
        q = results[module]
        dtype = _float_weight(source, module).dtype  # scales in the Linear's dtype (bf16)
        groups[module] = pack_gptq(q.codes, q.zeros.t().contiguous(), q.scales.t().contiguous().to(dtype), q.g_idx, 4)
    qconfig = {"bits": 4, "checkpoint_format": "gptq", "desc_act": True, "group_size": group_size,
               "quant_method": "gptq", "static_groups": True, "sym": True, "true_sequential": True}
    return _write_dir(source, out, _replace_weights(source, groups), _with_qconfig(source, qconfig))


def _write_awq(source: Source, out: Path, group_size: int = 128) -> Path:
    groups = {m: awq_quantize(_float_weight(source, m), group_size, name=m) for m in source.linear_modules()}
    tensors = _replace_weights(source, groups)
    for module in groups:
        if f"{module}.bias" in tensors:  # WQLinear_GEMM keeps an fp16 bias
            tensors[f"{module}.bias"] = tensors[f"{module}.bias"].to(torch.float16)
    qconfig = {"quant_method": "awq", "zero_point": True, "group_size": group_size, "bits": 4,
               "version": "gemm", "modules_to_not_convert": None}
    # AngelSlim forces torch_dtype float16 in config.json (awq.py save); other tensors keep bf16.
    return _write_dir(source, out, tensors, _with_qconfig(source, qconfig, dtype="float16"))


def _write_seq_2bit(source: Source, out: Path, candidates: int = 64) -> Path:
    tensors = dict(source.tensors)
    for module in source.linear_modules():
        weight = _float_weight(source, module)
        fake, _ = seq_2bit_fake_quantize(weight, candidates)
        tensors[f"{module}.weight"] = fake.to(weight.dtype)
    return _write_dir(source, out, tensors, _with_qconfig(source, None))


def _write_nvfp4(source: Source, out: Path, n_samples: int = 32, seq_len: int = 256, seed: int = 0,
                 corpus: str = "pydoc") -> Path:
    modules = source.linear_modules()
    ids = calibration_ids(source.root, n_samples, seq_len, seed, corpus)
    act_amax = input_absmax(_load_float_model(source.root), modules, ids)
    weight_amax = {m: _float_weight(source, m).abs().amax().to(torch.float32) for m in modules}
    groups = {}
    for module in modules:
        parent, _, leaf = module.rpartition(".")
        shared = next((names for names in NVFP4_SHARED if leaf in names), (leaf,))
        peers = [f"{parent}.{n}" for n in shared if f"{parent}.{n}" in weight_amax]
        global_amax = torch.stack([weight_amax[p] for p in peers]).amax()
        group = nvfp4_quantize(_float_weight(source, module), global_amax)
        group["input_scale"] = torch.tensor(act_amax[module] / (FP4_MAX * FP8_MAX), dtype=torch.float32)
        groups[module] = group
    ignore = _angelslim_ignore()
    qconfig = _ct_config(
        "naive-quantized",
        {"num_bits": 4, "group_size": 16, "dynamic": False, "type": "float"},
        {"num_bits": 4, "group_size": 16, "dynamic": False, "type": "float"},
        ignore,
    )
    return _write_dir(source, out, _replace_weights(source, groups), _with_qconfig(source, qconfig),
                      {"hf_quant_config.json": _hf_quant_config(ignore, "NVFP4", group_size=16)})


_WRITERS: dict[str, Callable[..., Path]] = {
    "fp8_static": lambda s, o, **kw: _write_fp8(s, o, static=True, **kw),
    "fp8_dynamic": lambda s, o, **kw: _write_fp8(s, o, static=False, **kw),
    "fp8_block": _write_fp8_block,
    "int8_w8a8": _write_int8,
    "gptq_int4": _write_gptq,
    "awq_int4": _write_awq,
    "seq_2bit": _write_seq_2bit,
    "nvfp4": _write_nvfp4,
}
_OPTIONS: dict[str, set[str]] = {
    "fp8_static": {"n_samples", "seq_len", "seed", "corpus"},
    "fp8_dynamic": set(),
    "fp8_block": {"block_size"},
    "int8_w8a8": set(),
    "gptq_int4": {"group_size", "n_samples", "seq_len", "seed", "corpus", "damp_percent", "progress"},
    "awq_int4": {"group_size"},
    "seq_2bit": {"candidates"},
    "nvfp4": {"n_samples", "seq_len", "seed", "corpus"},
}
FORMATS: tuple[str, ...] = tuple(_WRITERS)


def write_checkpoint(src_dir: str | os.PathLike, out_dir: str | os.PathLike, fmt: str, **options: Any) -> Path:
    """Write ``src_dir`` (an unquantized bf16 HF checkpoint) to ``out_dir`` in on-disk format ``fmt``.

    ``fmt`` is one of ``FORMATS``. ``options`` per format: fp8_static / nvfp4 ``n_samples``,
    ``seq_len``, ``seed``, ``corpus`` (activation calibration); fp8_block ``block_size``; gptq_int4
    ``group_size``, ``n_samples``, ``seq_len``, ``seed``, ``corpus``, ``damp_percent``, ``progress``;
    awq_int4 ``group_size``; seq_2bit ``candidates``. ``out_dir`` must not exist or be empty; it is
    written atomically (nothing is left behind on error). Returns ``out_dir``.
    """
    if fmt not in _WRITERS:
        raise ValueError(f"unknown checkpoint format {fmt!r}; supported: {list(FORMATS)}")
    unknown = sorted(set(options) - _OPTIONS[fmt])
    if unknown:
        raise ValueError(f"format {fmt!r} takes no option(s) {unknown}; accepted: {sorted(_OPTIONS[fmt])}")
    source = read_source(src_dir)
    if not source.linear_modules():
        raise ValueError(f"{source.root}: no decoder Linear weights ({DECODER_PREFIX}*.{{{','.join(QUANTIZED_LINEARS)}}}.weight) to quantize")
    with torch.no_grad():
        return _WRITERS[fmt](source, Path(out_dir), **options)
