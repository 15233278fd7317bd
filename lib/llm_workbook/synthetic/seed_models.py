"""Stand-ins for the planning report's checkpoints at their true size, in a local Hugging Face cache.

None of the releases can be downloaded here, so each is built offline from its public ``config.json``: random
weights (fixed seeds, so every build gives the same bytes) in exactly the release's architecture and shapes,
written as the release lays them out (the bf16 originals; AngelSlim's FP8 static, GPTQ INT4 and AWQ INT4 through
``checkpoints.write_checkpoint``; HY-1.8B-2Bit in float32 with ``weight_clip_val``, once on the SEQ grid and once
latent). Each goes into the cache under its release's repo id, so ``llmc run parameters/angelslim/*.yaml`` with
``HF_HUB_CACHE`` pointing there runs offline through the real hub code path (``make seed-models``).

What differs from the real downloads is the weights (random, so quality figures say nothing about the releases)
and the tokenizer (the offline BPE tokenizer of ``toy_models``; the embedding keeps the release's vocabulary
size). ``shrink`` builds the same set with small shapes, for the tests.

Run: ``python -m llm_workbook.synthetic.seed_models --cache DIR [--shrink] [--only REPO_ID ...]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

# config.json of Qwen/Qwen3-0.6B, as published
QWEN3_0_6B = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 1024,
    "initializer_range": 0.02, "intermediate_size": 3072, "max_position_embeddings": 40960, "max_window_layers": 28,
    "model_type": "qwen3", "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False,
    "vocab_size": 151936,
}
# config.json of Qwen/Qwen3-1.7B: Qwen3-0.6B's but for these
QWEN3_1_7B = {**QWEN3_0_6B, "hidden_size": 2048, "intermediate_size": 6144}
# config.json of tencent/Hunyuan-1.8B-Instruct's architecture, as AngelSlim/HY-1.8B-2Bit publishes it
HUNYUAN_1_8B = {
    "architectures": ["HunYuanDenseV1ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "attention_head_dim": 128, "bos_token_id": 120000, "eos_token_id": 120025, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 6144, "max_position_embeddings": 262144,
    "mlp_bias": False, "model_type": "hunyuan_v1_dense", "num_attention_heads": 16, "num_hidden_layers": 32,
    "num_key_value_heads": 4, "pad_token_id": 120002, "rms_norm_eps": 1e-05,
    "rope_scaling": {"alpha": 1000.0, "beta_fast": 32, "beta_slow": 1, "factor": 1.0, "mscale": 1.0,
                     "mscale_all_dim": 1.0, "type": "dynamic"},
    "rope_theta": 10000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
    "use_qk_norm": True, "use_rotary_pos_emb": True, "vocab_size": 120818,
}
# small shapes of the same architectures (quantization friendly: Linear widths multiples of 128); the releases'
# special token ids lie beyond the small vocabulary
SHRUNK = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
          "num_key_value_heads": 1, "head_dim": 64, "attention_head_dim": 64, "max_window_layers": 2,
          "vocab_size": 4096, "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
BUILD_VERSION = 2  # bump when a build's bytes change: it names the snapshot (2: seeds from the repo id)
CALIBRATION = {"n_samples": 8, "seq_len": 256, "seed": 0}  # layout, not quality, is what a stand-in shows


@dataclass(frozen=True)
class SeedModel:
    repo_id: str
    config: dict | None = None  # an original: its config.json (random weights)
    base: str | None = None  # a derived checkpoint: the original it is written from
    fmt: str | None = None  # ... in this checkpoints.write_checkpoint format
    options: dict = field(default_factory=dict)
    note: str = ""


QWEN = "Qwen/Qwen3-0.6B"
HUNYUAN = "tencent/Hunyuan-1.8B-Instruct"
SEED_MODELS = (
    SeedModel(QWEN, config=QWEN3_0_6B, note="bf16 original"),
    SeedModel("AngelSlim/Qwen3-0.6B-FP8", base=QWEN, fmt="fp8_static", options=CALIBRATION,
              note="AngelSlim fp8_static (the planning report's Qwen3 FP8)"),
    SeedModel("AngelSlim/Qwen3-0.6B-INT4-GPTQ", base=QWEN, fmt="gptq_int4", options=CALIBRATION,
              note="AngelSlim int4_gptq (the planning report's Qwen3 INT4)"),
    SeedModel("AngelSlim/Qwen3-0_6B_int4_awq", base=QWEN, fmt="awq_int4", options={"group_size": 128},
              note="AngelSlim int4_awq"),
    SeedModel("Qwen/Qwen3-1.7B", config=QWEN3_1_7B, note="bf16 original"),
    SeedModel("AngelSlim/Qwen3-1_7B_int4_awq", base="Qwen/Qwen3-1.7B", fmt="awq_int4", options={"group_size": 128},
              note="AngelSlim int4_awq"),
    SeedModel(HUNYUAN, config=HUNYUAN_1_8B, note="bf16 original"),
    SeedModel("tencent/Hunyuan-1.8B-Instruct-FP8", base=HUNYUAN, fmt="fp8_static", options=CALIBRATION,
              note="AngelSlim fp8_static"),
    SeedModel("tencent/Hunyuan-1.8B-Instruct-GPTQ-Int4", base=HUNYUAN, fmt="gptq_int4", options=CALIBRATION,
              note="AngelSlim int4_gptq"),
    SeedModel("tencent/Hunyuan-1.8B-Instruct-AWQ-Int4", base=HUNYUAN, fmt="awq_int4", options={"group_size": 128},
              note="AngelSlim int4_awq"),
    SeedModel("AngelSlim/HY-1.8B-2Bit", base=HUNYUAN, fmt="seq_2bit", options={"candidates": 16},
              note="float32 with weight_clip_val, weights on the SEQ grid"),
    # not a release: the same layout with latent QAT weights, the case the card leaves open
    SeedModel("llmc-seed/HY-1.8B-2Bit-latent", base=HUNYUAN, fmt="seq_2bit",
              options={"candidates": 16, "latent": True}, note="float32 with weight_clip_val, latent weights"),
)
BY_ID = {m.repo_id: m for m in SEED_MODELS}
STAND_IN_TAG = "llmc-stand-in"  # in a stand-in's model card: reports say its quality figures are not the release's


def _write_card(model: SeedModel, out: Path) -> None:
    """A model card (README.md, the hub's own way for a repository to describe itself) saying what this is."""
    from huggingface_hub import ModelCard, ModelCardData

    made = "random weights (seeded)" if model.config is not None else f"written from the stand-in of `{model.base}`"
    card = ModelCard.from_template(
        ModelCardData(tags=[STAND_IN_TAG], base_model=model.base),
        template_str="---\n{{ card_data }}\n---\n\n# Stand-in for {{ repo_id }}\n\n{{ body }}\n",
        repo_id=model.repo_id,
        body=f"Not the release: {made}, {model.note}, in the release's architecture, shapes and layout, built "
             f"offline by `make seed-models`. Sizes, layouts, time and memory are the release's; quality figures "
             f"say nothing about it.")
    card.save(out / "README.md")


def stand_in_of(directory: str | Path) -> str | None:
    """What a checkpoint directory stands in for, when its model card carries ``STAND_IN_TAG``; None for any
    other checkpoint (a real release's card included, however malformed)."""
    import yaml
    from huggingface_hub import ModelCard

    card_path = Path(directory) / "README.md"
    if not card_path.is_file():
        return None
    try:
        card = ModelCard.load(card_path, ignore_metadata_errors=True)
    except (OSError, ValueError, yaml.YAMLError):  # a card that is not one is no stand-in's
        return None
    tags = card.data.tags or []
    if STAND_IN_TAG not in ([tags] if isinstance(tags, str) else tags):
        return None
    title = next((line[2:].strip() for line in card.text.splitlines() if line.startswith("# ")), "")
    return title.removeprefix("Stand-in for ").strip() or str(directory)


def config_of(model: SeedModel, shrink: bool = False) -> dict:
    """The config.json an original is built from (its release's, or small shapes of it)."""
    config = dict(model.config)
    if shrink:
        config.update({k: v for k, v in SHRUNK.items() if k in config})
    return config


def repo_dir(cache: Path, repo_id: str) -> Path:
    """Where the hub cache keeps a model repository (huggingface_hub's layout)."""
    return Path(cache) / ("models--" + repo_id.replace("/", "--"))


def snapshot(cache: Path, repo_id: str) -> Path | None:
    """The snapshot ``refs/main`` points at, when built."""
    ref = repo_dir(cache, repo_id) / "refs" / "main"
    return repo_dir(cache, repo_id) / "snapshots" / ref.read_text().strip() if ref.is_file() else None


def _commit(model: SeedModel, shrink: bool) -> str:
    """A stand-in's snapshot name: a hash of what it is built from, so a changed build is a new snapshot."""
    key = json.dumps([model.repo_id, model.config, model.base, model.fmt, model.options, shrink, BUILD_VERSION],
                     sort_keys=True)
    return hashlib.sha1(key.encode()).hexdigest()


def _seed(repo_id: str) -> int:
    """An original's weight seed, from its repo id alone: the same bytes whichever subset is built."""
    return int(hashlib.sha1(repo_id.encode()).hexdigest()[:8], 16)


def _write_original(model: SeedModel, out: Path, shrink: bool, seed: int) -> None:
    """Random weights (the architecture's own initialisation, seeded) saved in bf16, with the release's config.json."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from llm_workbook.synthetic.toy_models import build_tokenizer

    config = config_of(model, shrink)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out), dtype=torch.float32)
    network.to(torch.bfloat16).save_pretrained(out)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")  # the release's, not transformers' rewrite
    build_tokenizer(out)


def build(cache: str | Path, only: list[str] | None = None, shrink: bool = False, log=print) -> dict[str, Path]:
    """Build the stand-ins (``only``: these repo ids and the originals they need) into the hub cache ``cache``;
    one already built is kept. Returns repo id -> snapshot directory."""
    from llm_workbook.store.writer import staged_directory
    from llm_workbook.synthetic.checkpoints import write_checkpoint

    cache = Path(cache)
    wanted = list(only or BY_ID)
    unknown = [r for r in wanted if r not in BY_ID]
    if unknown:
        raise ValueError(f"unknown stand-in(s) {unknown}; known: {list(BY_ID)}")
    needed = [r for r in BY_ID if r in wanted or any(BY_ID[w].base == r for w in wanted)]
    built: dict[str, Path] = {}
    for repo_id in needed:
        model = BY_ID[repo_id]
        commit = _commit(model, shrink)
        target = repo_dir(cache, repo_id) / "snapshots" / commit
        if not (target / "config.json").is_file():
            log(f"building {repo_id} ({model.note}) ...")
            shutil.rmtree(target, ignore_errors=True)
            target.parent.mkdir(parents=True, exist_ok=True)
            with staged_directory(target) as staging:  # a stopped build leaves no snapshot
                if model.config is not None:
                    _write_original(model, staging, shrink, _seed(repo_id))
                else:
                    write_checkpoint(built[model.base], staging, model.fmt, **model.options)
                _write_card(model, staging)
        if not (target / "README.md").is_file():  # snapshots built before the card was written get it too
            _write_card(model, target)
        ref = repo_dir(cache, repo_id) / "refs" / "main"
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(commit)
        built[repo_id] = target
    return {r: built[r] for r in wanted}


def sizes(cache: str | Path) -> dict[str, int]:
    """Bytes on disk per built stand-in."""
    out = {}
    for repo_id in BY_ID:
        path = snapshot(Path(cache), repo_id)
        if path is not None and path.is_dir():
            out[repo_id] = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", required=True, type=Path, help="the hub cache to fill (HF_HUB_CACHE for runs)")
    parser.add_argument("--only", nargs="*", help="repo ids to build (and the originals they need)")
    parser.add_argument("--shrink", action="store_true", help="small shapes of the same architectures")
    args = parser.parse_args(argv)
    try:
        build(args.cache, args.only, args.shrink)
    except ValueError as exc:  # an unknown repo id, or a writer refusing its original: one line, no traceback
        print(f"seed-models: {exc}", file=sys.stderr)
        return 2
    total = 0
    for repo_id, size in sizes(args.cache).items():
        total += size
        print(f"{repo_id}: {size / 1e9:.2f} GB")
    print(f"total: {total / 1e9:.2f} GB in {args.cache}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
