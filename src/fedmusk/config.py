"""fedmusk's one configuration schema (OmegaConf structured configs) and its loader.

Every YAML file in configs/ and every ``key=value`` override is checked against ``FedMuskConfig``: an unknown key or a
value of the wrong type is an error that names the key and where it came from. Resolve once with ``load_config`` and
pass the typed sections down.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration file or override that does not fit the schema; the message names the key and its source."""


@dataclass
class ModelConfig:
    preset: str = "tiny"  # "large" (the release) or "tiny" (tests and demos)
    weights: str | None = None  # model.safetensors of the release; None: random initialisation (tiny only)
    tokenizer: str | None = None  # tokenizer.spm of the release; None: fedmusk's tiny tokenizer
    img_size: int | None = None  # None: the preset's size
    max_text_len: int = 100
    ms_aug: bool = False  # multi-scale (1x + 2x) tile features for MIL


@dataclass
class DataConfig:
    target_mpp: float = 0.5  # microns per pixel at which tiles are cut
    tile_size: int = 384  # tile edge in pixels at target_mpp
    min_tissue: float = 0.5  # fraction of a tile that must be tissue
    max_tiles_per_slide: int = 64  # sampling cap per slide in training
    batch_size: int = 32
    num_workers: int = 0


@dataclass
class FedMuskConfig:
    seed: int = 0
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)


def load_config(
    files: Sequence[str | os.PathLike] = (), overrides: Sequence[str] = (), schema: type = FedMuskConfig
) -> Any:
    """Merge YAML ``files`` (later wins) and ``key=value`` ``overrides`` onto the schema's defaults.

    Returns a typed instance of ``schema`` (dataclasses all the way down). Raises ConfigError naming the file or
    override and the key for unknown keys, wrong types and unreadable files.
    """
    merged = OmegaConf.structured(schema)
    for f in files:
        path = Path(f)
        try:
            layer = OmegaConf.load(path)
        except FileNotFoundError:
            raise ConfigError(f"configuration file not found: {path}") from None
        except Exception as err:  # noqa: BLE001 - OS, YAML and OmegaConf errors alike mean "cannot read this file"
            raise ConfigError(f"{path}: not a readable YAML configuration ({_first_line(err)})") from None
        merged = _merge(merged, layer, str(path))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        merged = _merge(merged, OmegaConf.from_dotlist([item]), f"override {item!r}")
    try:
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(f"configuration is incomplete: {_first_line(err)}") from None


def _merge(base, layer, source: str):
    try:
        return OmegaConf.merge(base, layer)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        msg = getattr(err, "msg", None) or _first_line(err)
        if isinstance(err, ConfigKeyError):
            raise ConfigError(f"{source}: unknown configuration key '{key}'") from None
        raise ConfigError(f"{source}: bad value for '{key}': {_first_line(msg)}") from None


def _first_line(err: object) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def to_yaml(config: Any) -> str:
    """The resolved configuration as YAML (for run records; pass it through the scrubber before it leaves a site)."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))
