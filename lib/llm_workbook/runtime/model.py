"""Build a transformers model straight from a Parquet weight file (no HF directory written)."""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from llm_workbook.errors import StoreError
from llm_workbook.store.loader import WeightLoaderV2


def plain_config(loader: WeightLoaderV2):
    """The model's transformers config, without its quantization_config (weights arrive dequantized)."""
    from transformers import AutoConfig

    raw = copy.deepcopy(loader.config)
    if not raw:
        raise StoreError(f"{loader.path}: no config.json inside the file; cannot build a model")
    raw.pop("quantization_config", None)
    model_type = raw.pop("model_type", None)
    if model_type is None:
        raise StoreError(f"{loader.path}: config.json has no model_type")
    try:
        return AutoConfig.for_model(model_type, **raw)
    except Exception as exc:
        raise StoreError(f"{loader.path}: transformers cannot build a {model_type!r} config ({exc})") from None


def model_class(config, task: str | None):
    """The transformers class a file's config builds: its ``architectures``, else the task's auto class."""
    import transformers

    if task is None:
        for arch in getattr(config, "architectures", None) or []:
            cls = getattr(transformers, arch, None)
            if cls is not None:
                return cls
        task = "causal-lm"
    auto = {"causal-lm": transformers.AutoModelForCausalLM, "base": transformers.AutoModel}[task]
    return auto._model_mapping[type(config)]


def model_from_parquet(
    path: str | os.PathLike | WeightLoaderV2,
    dtype: torch.dtype = torch.float32,
    task: str | None = None,
):
    """A ready, eval-mode transformers model whose weights come from the Parquet file.

    ``dtype`` is the compute dtype every floating weight is cast to (quantized weights are
    dequantized straight into it). ``task`` picks the head: None follows ``architectures`` in the
    config, ``"causal-lm"`` or ``"base"`` (encoder / bare model) force one.
    """
    loader = path if isinstance(path, WeightLoaderV2) else WeightLoaderV2(path)
    config = plain_config(loader)
    from llm_workbook.formats import seq

    exact = loader.source_tensors() if seq.companions(loader.keys()) else None  # SEQ reads weights as stored
    model = _assemble(model_class(config, task), config, loader.state_dict(dtype=dtype), dtype, str(loader.path),
                      exact=exact)
    model.llmc_loader = loader
    return model


class _CheckpointState(Mapping):
    """An unquantized checkpoint's tensors by name, each read from its shard and cast when asked for."""

    def __init__(self, checkpoint, dtype: torch.dtype | None):
        self.checkpoint, self.dtype = checkpoint, dtype

    def __getitem__(self, name: str) -> torch.Tensor:
        tensor = self.checkpoint.read(name)
        return tensor.to(self.dtype) if tensor.is_floating_point() and self.dtype else tensor

    def __iter__(self):
        return iter(self.checkpoint.tensors)

    def __len__(self) -> int:
        return len(self.checkpoint.tensors)


def model_from_checkpoint(root: str | os.PathLike, dtype: torch.dtype = torch.float32, task: str | None = None):
    """``from_pretrained`` of an unquantized HF directory, reading and casting one tensor at a time, so that
    the file's pages and the ``dtype`` copy are never both resident. Raises ``StoreError`` when the
    checkpoint's names are not the model's own (``from_pretrained`` renames some legacy ones)."""
    from transformers import AutoConfig

    from llm_workbook.store.checkpoint import open_checkpoint

    checkpoint = open_checkpoint(Path(root))
    config = AutoConfig.from_pretrained(root)
    return _assemble(model_class(config, task), config, _CheckpointState(checkpoint, dtype), dtype, str(root),
                     exact=_CheckpointState(checkpoint, None))


def _assemble(cls, config, state: Mapping, dtype: torch.dtype, where: str, exact: Mapping | None = None):
    """An eval-mode ``cls`` model built without initializing its weights, then given ``state``'s tensors, SEQ
    weights as AngelSlim serves them, from ``exact`` (the tensors as stored; ``formats.seq``)."""
    from transformers.initialization import no_init_weights

    from llm_workbook.formats import seq

    state = seq.served(state, exact, dtype)

    with no_init_weights():
        model = cls._from_config(config, dtype=dtype)
    expected = model.state_dict()
    prefix = getattr(model, "base_model_prefix", "")
    loaded = {}
    for name in state:
        target = name
        if target not in expected and prefix and f"{prefix}.{name}" in expected:
            target = f"{prefix}.{name}"
        elif target not in expected and prefix and name.startswith(prefix + ".") and name[len(prefix) + 1 :] in expected:
            target = name[len(prefix) + 1 :]
        if target not in expected:
            continue  # e.g. position_ids buffers or heads this class does not have
        tensor = state[name]
        if tuple(tensor.shape) != tuple(expected[target].shape):
            raise StoreError(
                f"{where}: tensor {name!r} has shape {tuple(tensor.shape)}, the model expects {tuple(expected[target].shape)}"
            )
        loaded[target] = tensor
    missing = model.load_state_dict(loaded, strict=False, assign=True).missing_keys
    model.tie_weights()
    tied = {name for name, p in model.named_parameters() if name in missing and not p.is_meta}
    persistent_missing = [m for m in missing if m not in tied and m in dict(model.named_parameters())]
    tied_names = _tied_parameter_names(model)
    persistent_missing = [m for m in persistent_missing if m not in tied_names]
    if persistent_missing:
        raise StoreError(f"{where}: the file has no weights for {persistent_missing[:5]}")
    model.llmc_seq = state.describe() if isinstance(state, seq.Served) else None
    return model.eval()


def _tied_parameter_names(model) -> set[str]:
    """Parameters that share storage with another (tied embeddings), by every name they have."""
    by_ptr: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_ptr.setdefault(param.data_ptr(), []).append(name)
    return {n for names in by_ptr.values() if len(names) > 1 for n in names}
