"""One typed configuration schema; unknown keys and bad values are named."""

from pathlib import Path

import pytest

from fedmusk.config import ConfigError, FedMuskConfig, load_config

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
