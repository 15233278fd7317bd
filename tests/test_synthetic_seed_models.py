"""The planning report's checkpoints as offline stand-ins: shapes as published, layouts as released, found through
the hub code path."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from llm_workbook.synthetic import seed_models as seeds

HY_2BIT_ELEMENTS = 8_156_553_216 // 4  # the release's index: total_size, float32
HY_2BIT_CLIP_VALUES = 622_592


def _elements(config: dict, lm_head: bool, clip_val: bool) -> int:
    """Elements of a decoder checkpoint of ``config``'s shapes (qk-norm for HunYuan), counted from the config."""
    h, i, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    q, kv = config["num_attention_heads"] * config["head_dim"], config["num_key_value_heads"] * config["head_dim"]
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h  # q, k, v, o, gate, up, down, two norms
    per_layer += 2 * config["head_dim"]  # query_layernorm and key_layernorm (qk-norm)
    if clip_val:
        per_layer += q + 2 * kv + h + 2 * i + h  # one alpha per output row of each projection
    embeddings = config["vocab_size"] * h
    return layers * per_layer + embeddings * (2 if lm_head else 1) + h  # + the final norm


def test_hunyuan_stand_in_has_the_2bit_release_s_element_count():
    """The HY-1.8B-2Bit stand-in's shapes give exactly the element count of the release's index (float32)."""
    config = seeds.config_of(seeds.BY_ID[seeds.HUNYUAN])
    assert _elements(config, lm_head=True, clip_val=True) == HY_2BIT_ELEMENTS
    assert (_elements(config, lm_head=True, clip_val=True) - _elements(config, lm_head=True, clip_val=False)
            == HY_2BIT_CLIP_VALUES)


@pytest.mark.parametrize("repo_id, parameters", [(seeds.QWEN, 596_049_920), ("Qwen/Qwen3-1.7B", 1_720_574_976)])
def test_qwen3_stand_ins_have_the_releases_parameter_counts(repo_id, parameters):
    config = seeds.config_of(seeds.BY_ID[repo_id])
    assert _elements(config, lm_head=False, clip_val=False) == parameters and config["tie_word_embeddings"]


@pytest.fixture(scope="module")
def seed_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("hub")
    seeds.build(cache, shrink=True, log=lambda _: None)
    return cache


def test_every_stand_in_resolves_offline_through_the_hub_code_path(seed_cache, monkeypatch):
    from llm_workbook import Source

    monkeypatch.setenv("HF_HUB_CACHE", str(seed_cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(seed_cache))
    for repo_id, model in seeds.BY_ID.items():
        root = Source.of(repo_id).root()
        assert root == seeds.snapshot(seed_cache, repo_id)
        config = json.loads((root / "config.json").read_text())
        original = seeds.config_of(seeds.BY_ID[model.base or repo_id], shrink=True)
        assert config["architectures"] == original["architectures"], repo_id
        assert (root / "tokenizer.json").is_file(), repo_id


def test_each_layout_is_the_release_s(seed_cache):
    def tensors(repo_id):
        root = seeds.snapshot(seed_cache, repo_id)
        files = sorted(root.glob("*.safetensors"))
        out = {}
        for path in files:
            with safe_open(str(path), "pt") as handle:
                out.update({k: handle.get_slice(k).get_dtype() for k in handle.keys()})
        return out, json.loads((root / "config.json").read_text())

    fp8, config = tensors("AngelSlim/Qwen3-0.6B-FP8")
    assert fp8["model.layers.0.self_attn.q_proj.weight"] == "F8_E4M3" and "model.layers.0.mlp.up_proj.input_scale" in fp8
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    gptq, config = tensors("AngelSlim/Qwen3-0.6B-INT4-GPTQ")
    assert {"model.layers.1.mlp.down_proj.qweight", "model.layers.1.mlp.down_proj.g_idx"} <= set(gptq)
    assert config["quantization_config"]["desc_act"] is True
    on_grid, config = tensors("AngelSlim/HY-1.8B-2Bit")
    latent, _ = tensors("llmc-seed/HY-1.8B-2Bit-latent")
    assert config["model_type"] == "hunyuan_v1_dense" and "quantization_config" not in config
    for layout in (on_grid, latent):
        assert {dtype for dtype in layout.values()} == {"F32"}
        assert "lm_head.weight" in layout and "model.layers.0.self_attn.o_proj.weight_clip_val" in layout
        assert "model.layers.0.self_attn.query_layernorm.weight" in layout


def test_the_2bit_stand_ins_are_one_on_the_grid_and_one_latent(seed_cache, tmp_path):
    from llm_workbook.store.convert import HuggingFaceToParquetConverter
    from llm_workbook.store import inventory
    from llm_workbook.store.loader import WeightLoaderV2

    described = {}
    for repo_id in ("AngelSlim/HY-1.8B-2Bit", "llmc-seed/HY-1.8B-2Bit-latent"):
        out = tmp_path / (repo_id.split("/")[1] + ".parquet")
        HuggingFaceToParquetConverter(progress=False).convert(seeds.snapshot(seed_cache, repo_id), out)
        described[repo_id] = inventory.summary(WeightLoaderV2(out))["seq"]["description"]
    assert described["AngelSlim/HY-1.8B-2Bit"].startswith("on the grid")
    assert described["llmc-seed/HY-1.8B-2Bit-latent"].startswith("latent")


def test_a_build_is_deterministic_and_kept(seed_cache, tmp_path):
    # built alone, an original later in the catalogue gets the same bytes as in the whole set's build
    again = seeds.build(tmp_path, only=[seeds.HUNYUAN], shrink=True, log=lambda _: None)[seeds.HUNYUAN]
    first = seeds.snapshot(seed_cache, seeds.HUNYUAN)
    assert again.name == first.name
    with safe_open(str(again / "model.safetensors"), "pt") as a, safe_open(str(first / "model.safetensors"), "pt") as b:
        name = "model.layers.1.mlp.up_proj.weight"
        assert torch.equal(a.get_tensor(name), b.get_tensor(name))
    logged = []
    seeds.build(tmp_path, only=[seeds.HUNYUAN], shrink=True, log=logged.append)
    assert logged == []  # already built: nothing rebuilt


def test_an_unknown_repo_id_is_one_error_and_nothing_is_written(tmp_path, capsys):
    assert seeds.main(["--cache", str(tmp_path / "hub"), "--only", "nobody/Nothing-0B"]) == 2
    assert "unknown stand-in(s) ['nobody/Nothing-0B']" in capsys.readouterr().err
    assert not (tmp_path / "hub").exists()


def test_every_stand_in_says_so_in_its_model_card_and_the_report_reads_it(seed_cache, monkeypatch, tmp_path):
    from llm_workbook import Source
    from llm_workbook.workbook import report

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(seed_cache))
    for repo_id in seeds.BY_ID:
        assert seeds.stand_in_of(seeds.snapshot(seed_cache, repo_id)) == repo_id
    candidate, original = Source.of("AngelSlim/HY-1.8B-2Bit"), Source.of(seeds.HUNYUAN)
    assert report.stand_ins(candidate, original) == ("AngelSlim/HY-1.8B-2Bit", seeds.HUNYUAN)
    assert "are stand-ins" in report.stand_in_sentence(report.stand_ins(candidate, original))
    # a real checkpoint (its own card, or none, or a card that is not YAML) is no stand-in
    real = tmp_path / "real"
    real.mkdir()
    assert seeds.stand_in_of(real) is None
    for card in ("---\nlicense: apache-2.0\ntags: [llama]\n---\n# Model", "---\ntags: [\n---\n", "no front matter"):
        (real / "README.md").write_text(card)
        assert seeds.stand_in_of(real) is None, card


def test_a_snapshot_built_before_the_card_gets_it_on_the_next_build(tmp_path):
    target = seeds.build(tmp_path, only=[seeds.QWEN], shrink=True, log=lambda _: None)[seeds.QWEN]
    (target / "README.md").unlink()
    logged = []
    seeds.build(tmp_path, only=[seeds.QWEN], shrink=True, log=logged.append)
    assert logged == [] and seeds.stand_in_of(target) == seeds.QWEN
