"""Would AI-OS's engine, as it stands, run this checkpoint right? Derived from the checkpoint's config, tensor
names and storage formats against what the engine does, read from its public source (all facts below are
from github.com/pallasting/ArrowQuant_V2 at tag v0.2.0-pre-optimization, commit 3eab8ed:
``llm_compression/inference/inference_core.py``, ``decoder_layers.py``, ``arrow_engine.py``, ``weight_loader.py``).

* Decoders (an architecture ending in ``CausalLM``): Llama/Qwen2-style layers by exact HF tensor name
  (``model.layers.N.self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``, RMS norms, ``model.norm``,
  ``model.embed_tokens``, ``lm_head``), SiLU MLP, every weight in float32.
* q/k/v are built with biases and o/gate/up/down without; a tensor the file lacks is skipped without a word,
  so a missing q/k/v bias keeps its random initialisation and a missing ``lm_head.weight`` (tied embeddings)
  leaves the output layer random; a tensor the engine has no slot for (an o_proj bias, q_norm) is ignored.
* ``head_dim = hidden_size / num_attention_heads``; no qk-norm; RoPE from ``rope_theta``, and of
  ``rope_scaling`` only a linear ``factor``.
* Encoders: BERT-style ``embeddings.*`` / ``encoder.layer.N.*`` with biases and LayerNorms, GELU.
* Nothing in it knows AngelSlim's SEQ ``weight_clip_val`` (HY-1.8B-2Bit): latent weights would run unquantized.
* Its loader reads float32/float16 rows and AI-OS int8/int2 codes; nothing else (FP8, 4-bit packed codes,
  GGUF blocks, bf16 bytes) without a float32 export first.
"""

from __future__ import annotations

import re

from llm_workbook.formats.seq import CLIP_SUFFIX

AIOS_ENGINE_SOURCE = "pallasting/ArrowQuant_V2 @ v0.2.0-pre-optimization (3eab8ed)"
DECODER_SLOTS = {"self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                 "self_attn.o_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias",
                 "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight",
                 "post_attention_layernorm.weight"}
READABLE_FORMATS = {"dense", "aios"}
AIOS_READS = {"fp32", "fp16", "int8", "int2"}  # quant_type values whose rows carry what AI-OS's loader needs
QK_NORM = ("self_attn.q_norm", "self_attn.k_norm", "self_attn.query_layernorm", "self_attn.key_layernorm")
LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def engine_findings(config: dict, tensor_names: set[str], formats: dict[str, str]) -> list[str]:
    """Why the engine would not run the checkpoint right (empty: it would). ``formats``: tensor -> storage format."""
    text = config.get("text_config") or config
    architecture = (config.get("architectures") or [""])[0]
    reasons: list[str] = []
    if architecture.endswith("CausalLM"):
        reasons += _decoder_findings(text, tensor_names)
    elif not any(name.startswith(("encoder.layer.", "bert.encoder.layer.")) for name in tensor_names):
        reasons.append(f"architecture {architecture or 'unknown'}: the engine runs Llama/Qwen2-style decoders "
                       "and BERT-style encoders only")
    unreadable = sorted({fmt for fmt in formats.values() if fmt not in READABLE_FORMATS})
    if unreadable:
        reasons.append(f"its loader cannot read {', '.join(unreadable)} rows: export with "
                       "`llmc export IN OUT --format aios-v2` (written dequantized to float32)")
    bf16 = sorted(name for name, fmt in formats.items() if fmt == "dense:BF16")
    if bf16:
        reasons.append(f"{len(bf16)} bf16 tensors: its loader reads float32/float16 only (the aios-v2 export widens them)")
    return reasons


def _decoder_findings(text: dict, names: set[str]) -> list[str]:
    reasons = []
    hidden, heads = text.get("hidden_size"), text.get("num_attention_heads")
    head_dim = text.get("head_dim")
    if head_dim and hidden and heads and head_dim * heads != hidden:
        reasons.append(f"head_dim {head_dim} != hidden_size / num_attention_heads = {hidden // heads}: the engine "
                       "derives head_dim from the hidden size")
    layer_tensors: dict[str, set[str]] = {}
    for name in names:
        match = LAYER.match(name)
        if match:
            layer_tensors.setdefault(match.group(1), set()).add(match.group(2))
    first = layer_tensors.get("0", set())
    if any(t.startswith(QK_NORM) for t in first):
        reasons.append("qk-norm (q_norm/k_norm weights): the engine does not apply it")
    missing_bias = [b for b in ("q_proj", "k_proj", "v_proj") if f"self_attn.{b}.bias" not in first]
    if first and missing_bias:
        reasons.append(f"no {'/'.join(missing_bias)} biases: the engine builds them and keeps random initial values")
    if any(t.endswith(CLIP_SUFFIX) for t in first):
        reasons.append("AngelSlim SEQ weight_clip_val (2-bit QAT): the engine ignores it, so latent weights would run "
                       "as they are instead of on their 2-bit grid")
    ignored = sorted(t for t in first if t not in DECODER_SLOTS and not t.startswith(QK_NORM) and not t.endswith(CLIP_SUFFIX))
    if ignored:
        reasons.append(f"tensors the engine has no place for are ignored: {', '.join(ignored[:4])}")
    if first and not DECODER_SLOTS - {"self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"} <= first:
        absent = sorted(DECODER_SLOTS - first - {"self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"})
        reasons.append(f"layer tensors it needs are missing (left random): {', '.join(absent[:4])}")
    if "lm_head.weight" not in names:
        reasons.append("no lm_head.weight (tied embeddings): the engine does not tie it to the embeddings, the output layer stays random")
    scaling = text.get("rope_scaling") or None
    if scaling:
        kind = scaling.get("rope_type") or scaling.get("type")
        if kind not in (None, "linear", "default"):
            reasons.append(f"rope_scaling {kind!r}: the engine applies only a linear factor")
    act = text.get("hidden_act") or text.get("hidden_activation")
    if act not in (None, "silu"):
        reasons.append(f"activation {act!r}: the engine's MLP is SiLU")
    return reasons


def verdict(loader) -> dict:
    """``{"runs": bool, "reasons": [...], "source": ...}`` for a weight file (a ``WeightLoaderV2``)."""
    formats = {}
    for name, info in loader.rows.items():
        if info.dtype == "BF16" and info.format == "dense":
            formats[name] = "dense:BF16"
        elif info.quant_type in AIOS_READS or info.format in READABLE_FORMATS:  # rows AI-OS's loader reads right
            formats[name] = "dense"
        else:
            formats[name] = info.format
    names = set(loader.keys()) | set(loader.rows)
    reasons = engine_findings(loader.config, names, formats)
    return {"runs": not reasons, "reasons": reasons, "source": AIOS_ENGINE_SOURCE}


def summary_line(result: dict | None) -> str:
    if not result:
        return "not checked"
    return "runs" if result["runs"] else "cannot run it right: " + "; ".join(result["reasons"])


__all__ = ["AIOS_ENGINE_SOURCE", "engine_findings", "summary_line", "verdict"]
