"""One typed configuration schema; unknown keys and bad values are named."""

from pathlib import Path

import pytest

from fedmusk.config import ConfigError, FedMuskConfig, config_from_mapping, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_fits_its_schema(path):
    if path.name.startswith("site-policy"):
        from fedmusk.client.policy import SitePolicyConfig

        assert isinstance(load_config([path], schema=SitePolicyConfig), SitePolicyConfig)
    else:
        assert isinstance(load_config([path]), FedMuskConfig)


def test_later_files_and_overrides_win(tmp_path):
    a = tmp_path / "a.yaml"
    b = tmp_path / "b.yaml"
    a.write_text("seed: 1\nmodel:\n  preset: tiny\n  max_text_len: 50\n")
    b.write_text("seed: 2\n")
    cfg = load_config([a, b], ["model.max_text_len=64"])
    assert (cfg.seed, cfg.model.preset, cfg.model.max_text_len) == (2, "tiny", 64)
    assert cfg.data.tile_size == 384, "defaults fill what no file sets"


def test_unknown_key_in_a_file_is_named_with_the_file(tmp_path):
    bad = tmp_path / "site.yaml"
    bad.write_text("data:\n  tile_szie: 256\n")
    with pytest.raises(ConfigError, match=r"site\.yaml: unknown configuration key 'data\.tile_szie'"):
        load_config([bad])


def test_unknown_override_key_is_named():
    with pytest.raises(ConfigError, match="unknown configuration key 'modle'"):
        load_config([], ["modle.preset=large"])


def test_value_of_wrong_type_is_named():
    with pytest.raises(ConfigError, match="bad value for 'data.target_mpp'"):
        load_config([], ["data.target_mpp=fine"])


def test_unreadable_yaml_is_named(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml: not a readable YAML"):
        load_config([bad])


def test_settings_that_cannot_work_together_are_refused_once_at_load_whatever_the_source():
    with pytest.raises(ConfigError, match="federation.robust: robust rules need every site's update"):
        load_config([], ["federation.robust=median"])  # SecAgg+ is on by default
    with pytest.raises(ConfigError, match="no LoRA expert can learn"):
        config_from_mapping({"train": {"features": "cached", "fusion": "image"}}, "the coordinator's run config")
    zero = ["train.pretrain.mlm_weight=0", "train.pretrain.mim_weight=0", "train.pretrain.clip_weight=0"]
    with pytest.raises(ConfigError, match="every objective has weight 0; nothing to train"):
        load_config([], ["federation.pretrain_rounds=1", *zero])
    assert load_config([], zero).federation.pretrain_rounds == 0  # no pretraining: the weights do not matter
    with pytest.raises(ConfigError, match="federation.secagg_quantization_range: 2048 sites x quantization_range"):
        load_config([], ["federation.min_sites=2048", "federation.min_replies=2"])
