"""Helpers shared by the format tests: tiny seeded models, checkpoint writing, the store round trip,
reference models and logit comparison. Offline and deterministic; no format-specific code here
except the compressed-tensors qparams helper at the end (which uses compressed-tensors itself).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llm_workbook import HuggingFaceToParquetConverter, export_to_hf

FIXTURES = Path(__file__).resolve().parent / "fixtures"
ANGELSLIM = FIXTURES / "angelslim"
LINEAR_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# --------------------------------------------------------------------------------------- models


def tiny_qwen3(seed: int = 0, hidden: int = 128, intermediate: int = 256, layers: int = 1, vocab: int = 128,
               heads: int = 2, kv_heads: int = 1, head_dim: int = 64, dtype: torch.dtype = torch.bfloat16):
    """A random Qwen3ForCausalLM (eval mode) drawn in float32 from ``seed`` then cast to ``dtype``.

    Linear weights get std 0.05 (instead of 0.02) so quantization and logits are not all near zero.
    """
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                         max_position_embeddings=256, tie_word_embeddings=False, initializer_range=0.05)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    return model.to(dtype).eval()


def linear_names(state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Module names of the decoder Linears (q/k/v/o, gate/up/down), in state-dict order."""
    names = []
    for key in state_dict:
        module, _, leaf = key.rpartition(".")
        if leaf == "weight" and module.rpartition(".")[2] in LINEAR_SUFFIXES:
            names.append(module)
    return names


def config_dict(model, quantization_config: dict | None = None) -> dict:
    """The model's config.json content, with ``quantization_config`` added when given."""
    raw = model.config.to_dict()
    if quantization_config is not None:
        raw["quantization_config"] = quantization_config
    return raw


def save_checkpoint(directory: str | Path, state_dict: dict[str, torch.Tensor], config: dict,
                    files: dict[str, str | bytes] | None = None) -> Path:
    """Write ``model.safetensors`` + ``config.json`` (+ side files) and return the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    for name, data in (files or {}).items():
        path = directory / name
        path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data, encoding="utf-8")
    return directory


def read_tensors(directory: str | Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


# --------------------------------------------------------------------------------- store round trip


def convert(src: str | Path, parquet: str | Path) -> Path:
    HuggingFaceToParquetConverter(progress=False).convert(src, parquet)
    return Path(parquet)


def assert_bit_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Same names, dtypes, shapes and bytes."""
    assert sorted(a) == sorted(b), sorted(set(a) ^ set(b))
    for name in a:
        assert a[name].dtype == b[name].dtype, (name, a[name].dtype, b[name].dtype)
        assert a[name].shape == b[name].shape, (name, a[name].shape, b[name].shape)
        left = a[name].contiguous().reshape(-1).view(torch.uint8)
        right = b[name].contiguous().reshape(-1).view(torch.uint8)
        assert torch.equal(left, right), name


def round_trip(src: str | Path, tmp: str | Path) -> Path:
    """Convert ``src`` to Parquet and export it back; assert every tensor is bit-equal and the
    quantization_config identical. Returns the Parquet path."""
    tmp = Path(tmp)
    parquet = convert(src, tmp / "store.parquet")
    out = export_to_hf(parquet, tmp / "exported", progress=False)
    assert_bit_equal(read_tensors(src), read_tensors(out))
    src_config = json.loads((Path(src) / "config.json").read_text())
    out_config = json.loads((out / "config.json").read_text())
    assert out_config.get("quantization_config") == src_config.get("quantization_config")
    return parquet


# ----------------------------------------------------------------------------------- comparisons


def reference_model(config: dict, state_dict: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32):
    """A transformers model from a config dict (quantization_config dropped) and dense weights."""
    import transformers

    raw = {k: v for k, v in config.items() if k != "quantization_config"}
    model_type = raw.pop("model_type")
    cfg = transformers.AutoConfig.for_model(model_type, **raw)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in state_dict.items()}, strict=False)
    assert not unexpected, unexpected
    assert not [m for m in missing if "rotary" not in m], missing
    return model.eval()


def token_batch(vocab: int, seed: int = 0, batch: int = 2, length: int = 24) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


def parquet_and_reference_logits(parquet: str | Path, config: dict, reference: dict[str, torch.Tensor],
                                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 logits, on the same seeded tokens, of the model built from ``parquet`` and of the dense
    ``reference`` weights under ``config``."""
    from llm_workbook.runtime.model import model_from_parquet

    ids = token_batch(config["vocab_size"], seed=seed)
    return (logits(model_from_parquet(parquet, torch.float32), ids),
            logits(reference_model(config, reference, torch.float32), ids))


def convert_fails(src: str | Path, tmp_path: Path, error: type[BaseException], match: str) -> None:
    """Converting ``src`` raises ``error`` matching ``match`` and leaves neither the output nor a temp file."""
    out = tmp_path / "bad.parquet"
    with pytest.raises(error, match=match):
        convert(src, out)
    assert not out.exists() and not list(tmp_path.glob(".bad.parquet*"))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.reshape(-1).double(), b.reshape(-1).double(), dim=0))


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


# ------------------------------------------------------------------- compressed-tensors qparams


def ct_qparams(weight: torch.Tensor, args, global_scale: torch.Tensor | None = None):
    """Scale and zero point of ``weight`` for compressed-tensors QuantizationArgs ``args``, from the
    per-tensor / channel / group / block min-max and compressed-tensors' own ``calculate_qparams``."""
    from compressed_tensors.quantization.utils import calculate_qparams

    w = weight.float()
    strategy = args.strategy
    if strategy == "tensor":
        low, high = w.amin(), w.amax()
    elif strategy == "channel":
        low, high = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    elif strategy in ("group", "tensor_group"):
        groups = w.unflatten(1, (-1, args.group_size))
        low, high = groups.amin(-1), groups.amax(-1)
    elif strategy == "block":
        b0, b1 = args.block_structure
        rows, cols = w.shape
        padded = torch.nn.functional.pad(w, (0, -cols % b1, 0, -rows % b0))
        blocks = padded.reshape(math.ceil(rows / b0), b0, math.ceil(cols / b1), b1)
        low, high = blocks.amin((1, 3)), blocks.amax((1, 3))
    else:
        raise ValueError(f"no min-max rule for strategy {strategy!r}")
    return calculate_qparams(low, high, args, global_scale=global_scale)


def ct_compress_linears(state_dict: dict[str, torch.Tensor], modules: list[str], scheme, compressor,
                        scale_dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Quantize each module's weight with compressed-tensors and compress it with ``compressor``.

    Returns (checkpoint state dict with the compressed tensors in place of the weights, the same state
    dict with every weight replaced by ``compressor.decompress`` of its compressed form: the reference).
    ``scale_dtype`` casts the scales before compression (e.g. bf16, as checkpoints store them).
    Tensor-group schemes (NVFP4) get a global scale from compressed-tensors' ``generate_gparam``.
    """
    from compressed_tensors.quantization.utils import generate_gparam

    compressed = dict(state_dict)
    reference = dict(state_dict)
    for module in modules:
        weight = compressed.pop(f"{module}.weight")
        global_scale = None
        if scheme.weights.strategy == "tensor_group":
            global_scale = generate_gparam(weight.float().amin(), weight.float().amax())
        scale, zero_point = ct_qparams(weight, scheme.weights, global_scale)
        if scale_dtype is not None:
            scale = scale.to(scale_dtype)
        local = {"weight": weight, "weight_scale": scale, "weight_zero_point": zero_point}
        if global_scale is not None:
            local["weight_global_scale"] = global_scale
        packed = compressor.compress(local, scheme)
        reference[f"{module}.weight"] = compressor.decompress(dict(packed), scheme)["weight"]
        compressed.update({f"{module}.{name}": tensor for name, tensor in packed.items()})
    return compressed, reference


def ct_config(scheme, fmt: str, ignore: list[str] | None = None, ignore_key: str = "ignore") -> dict:
    """A compressed-tensors quantization_config for one scheme, as compressed-tensors serializes it."""
    from compressed_tensors.quantization import QuantizationConfig

    config = QuantizationConfig(config_groups={"group_0": scheme}, format=fmt, quantization_status="compressed")
    raw = json.loads(config.model_dump_json())
    raw.pop("ignore", None)
    raw[ignore_key] = list(ignore or ["lm_head"])
    return raw
