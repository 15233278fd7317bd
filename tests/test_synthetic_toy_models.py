"""synthetic/toy_models.py: the BPE tokenizer, tiny model fixtures, the toy LM trainer and the MiniLM weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from llm_workbook import corpus  # noqa: E402
from llm_workbook.synthetic import toy_models


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_files_and_special_tokens(tokenizer_dir: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tokenizer_dir / name).is_file(), name
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert len(tok) == 4096
    ids = {tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id}
    assert None not in ids and len(ids) == 4
    assert json.loads((tokenizer_dir / "special_tokens_map.json").read_text())["eos_token"] == tok.eos_token


def test_tokenizer_round_trips_eval_text(tokenizer_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    text = corpus.load_text("pydoc", "eval")
    ids = tok(text, add_special_tokens=False, verbose=False)["input_ids"]
    assert tok.decode(ids) == text
    # A trained BPE merges bytes: English prose must compress well below one token per 3 characters.
    assert len(ids) < len(text) / 3
    odd = "  tabs\tand ünïcödé → 🐍, trailing space "
    assert tok.decode(tok.encode(odd, add_special_tokens=False)) == odd


def test_tokenizer_and_split_are_identical_in_a_fresh_process(tokenizer_dir: Path, tmp_path: Path) -> None:
    script = (
        "import sys, json\n"
        "from llm_workbook import corpus\nfrom llm_workbook.synthetic import toy_models\n"
        "toy_models.build_tokenizer(sys.argv[1])\n"
        "print(json.dumps(corpus.pydoc_split_keys()))\n"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, env=env, check=True
    ).stdout
    assert json.loads(out.strip().splitlines()[-1]) == {k: list(v) for k, v in corpus.pydoc_split_keys().items()}
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / name).read_bytes() == (tokenizer_dir / name).read_bytes(), name


# ----------------------------------------------------------------------------- tiny models


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), "pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_tiny_model_saves_loads_and_is_quant_friendly(tmp_path: Path, arch: str) -> None:
    out = toy_models.make_tiny_model(tmp_path / arch, arch=arch, seed=0)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == arch
    gen = json.loads((out / "generation_config.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(out))
    assert gen["eos_token_id"] == tok.eos_token_id
    tensors = _tensors(out)
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    linear = {k: t for k, t in tensors.items() if k.endswith("proj.weight")}
    assert len(linear) == 2 * 7  # q k v o gate up down per layer
    assert all(t.shape[1] % 128 == 0 for t in linear.values())
    assert "lm_head.weight" in tensors

    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    for name, tensor in tensors.items():
        assert torch.equal(model.state_dict()[name], tensor.float()), name
    ids = tok("def f(x): return x", return_tensors="pt")["input_ids"]
    assert model(ids).logits.shape == (1, ids.shape[1], len(tok))


def test_tiny_model_is_byte_deterministic(tmp_path: Path) -> None:
    a = toy_models.make_tiny_model(tmp_path / "a", seed=3)
    b = toy_models.make_tiny_model(tmp_path / "b", seed=3)
    c = toy_models.make_tiny_model(tmp_path / "c", seed=4)
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_tied_and_sharded_checkpoints(tiny_lm_tied: Path, tmp_path: Path) -> None:
    tied = tiny_lm_tied  # toy_models.make_tiny_model(..., tie_word_embeddings=True), built once in conftest
    assert "lm_head.weight" not in _tensors(tied)
    model = AutoModelForCausalLM.from_pretrained(str(tied))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    single = toy_models.make_tiny_model(tmp_path / "single", seed=5)
    sharded = toy_models.make_tiny_model(tmp_path / "sharded", seed=5, shards=3)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) >= 2 and all((sharded / f).is_file() for f in files)
    assert not (sharded / "model.safetensors").exists()
    single_t, sharded_t = _tensors(single), _tensors(sharded)
    assert single_t.keys() == sharded_t.keys()
    assert all(torch.equal(single_t[k], sharded_t[k]) for k in single_t)
    assert AutoModelForCausalLM.from_pretrained(str(sharded)) is not None


@pytest.mark.parametrize("kwargs", [{"hidden_size": 192}, {"intermediate_size": 100}, {"arch": "gpt2"}])
def test_tiny_model_rejects_bad_settings(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError, match="tiny model"):
        toy_models.make_tiny_model(tmp_path, **kwargs)


# ----------------------------------------------------------------------------- trained toy LM


def test_perplexity_matches_transformers_loss(tiny_lm: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(str(tiny_lm), dtype=torch.float32)
    ids = torch.randint(4, 4096, (40,), generator=torch.Generator().manual_seed(0))
    expected = torch.exp(model(input_ids=ids[None], labels=ids[None]).loss).item()
    assert toy_models.perplexity(model, ids, seq_len=40) == pytest.approx(expected, rel=1e-4)
    # Two windows of 20: each predicts 19 tokens.
    nll = [model(input_ids=w[None], labels=w[None]).loss.item() for w in (ids[:20], ids[20:])]
    assert toy_models.perplexity(model, ids, seq_len=20, batch_size=1) == pytest.approx(
        torch.exp(torch.tensor(nll).mean()).item(), rel=1e-4
    )


def test_short_training_learns_and_is_deterministic(tmp_path: Path) -> None:
    # One thread: 2-thread OpenMP barriers crawl when other processes share the 2 cores.
    settings = dict(seed=7, steps=8, batch_size=2, seq_len=64, lr=3e-3, warmup_steps=2, evaluate=False, num_threads=1)
    a = toy_models.train_default_lm(tmp_path / "a", **settings)
    b = toy_models.train_default_lm(tmp_path / "b", **settings)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    record = json.loads((a / "training.json").read_text())
    assert record["seed"] == 7 and record["steps"] == 8 and len(record["losses"]) == 8
    assert record["num_threads"] == 1
    assert record["corpus"]["split"] == "train"
    assert record["losses"][-1] < record["losses"][0] - 0.3

    # Independent check: the saved model scores lower loss on the first training batch than at init.
    tok = AutoTokenizer.from_pretrained(str(a))
    train_ids = toy_models._token_ids(tok, "train")
    first_batch = next(toy_models._batches(train_ids, 64, 2, 7))
    trained = AutoModelForCausalLM.from_pretrained(str(a), dtype=torch.float32)
    assert trained.config.num_hidden_layers == 4 and trained.config.hidden_size == 256
    loss = trained(input_ids=first_batch, labels=first_batch).loss.item()
    assert loss < record["losses"][0] - 0.3


def test_cache_key_follows_settings_and_cached_model_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = toy_models.default_lm_cache_key()
    assert key == toy_models.default_lm_cache_key(dict(toy_models.DEFAULT_LM_SETTINGS))
    assert key != toy_models.default_lm_cache_key({**toy_models.DEFAULT_LM_SETTINGS, "steps": 1})
    cached = tmp_path / f"default_lm-{key}"
    cached.mkdir()
    (cached / "training.json").write_text("{}")

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cached model must not be retrained")

    monkeypatch.setattr(toy_models, "train_default_lm", fail)
    assert toy_models.default_lm_path(tmp_path) == cached


def test_training_clears_staging_left_by_a_killed_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"default_lm-{toy_models.default_lm_cache_key()}"
    stale = tmp_path / f"{name}.partial-99999"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half written")

    def quick_train(out: Path, **settings: object) -> Path:
        out.mkdir(parents=True)
        (out / "training.json").write_text("{}")
        return out

    monkeypatch.setattr(toy_models, "train_default_lm", quick_train)
    assert toy_models.default_lm_path(tmp_path) == tmp_path / name
    assert not list(tmp_path.glob(f"{name}.partial-*"))


# ----------------------------------------------------------------------------- MiniLM


def _embed(model: torch.nn.Module, tok: object, sentences: list[str]) -> torch.Tensor:
    batch = tok(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def test_minilm_loads_offline_and_embeds_meaningfully() -> None:
    path = toy_models.minilm_path()
    model = AutoModel.from_pretrained(str(path)).eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    emb = _embed(model, tok, ["A cat sits on the mat.", "A kitten is sitting on a rug.", "Quarterly revenue rose 4%."])
    assert emb.shape == (3, 384)
    similar, unrelated = (emb[0] @ emb[1]).item(), (emb[0] @ emb[2]).item()
    # Real weights separate paraphrases from unrelated text; random weights would not.
    assert similar > 0.5 and similar > unrelated + 0.3
