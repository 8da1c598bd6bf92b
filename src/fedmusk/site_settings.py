"""What a site decides for itself, and how a site reads the configuration a coordinator sends.

A federation's configuration is the coordinator's, but some settings are facts of each hospital's machine: where its
copy of the MUSK weights and tokenizer lie, which device it trains on, how many tiles it embeds at once and how many
reader processes it runs. Those *site-local* settings never travel: the coordinator sends its configuration with them
at their defaults, and each site fills them in from its own ``site-settings.yaml`` (deployment) or from the
researcher's configuration (simulation, where every site is a folder on one machine). The compute precision is one
of them: ``auto`` means bf16 where this machine computes it natively.

The configuration that arrives is data, nothing else: ``parse_coordinator_config`` refuses OmegaConf interpolation
(``${oc.env:...}`` would read the site's environment), keys the schema does not know, and site-local keys set by the
coordinator (a path chosen by someone else's machine). The run also carries the fingerprint of the base model the
coordinator started from; a site whose weights or tokenizer differ refuses to train and says which file differs.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from fedmusk.config import ConfigError, FedMuskConfig, config_from_mapping

SITE_SETTINGS_FILE = "site-settings.yaml"

# Dotted keys of FedMuskConfig that belong to the machine a site trains on. Paths first: the coordinator never
# chooses a file that a hospital's process opens.
SITE_LOCAL_KEYS = (
    "model.weights",
    "model.tokenizer",
    "train.pretrain.visual_tokenizer",
    "device",
    "model.precision",
    "data.batch_size",
    "data.num_workers",
)


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _set(cfg: Any, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        cfg = getattr(cfg, part)
    setattr(cfg, leaf, value)


def site_local_settings(cfg: FedMuskConfig) -> dict[str, Any]:
    """The site-local values of ``cfg`` as ``{dotted key: value}``."""
    return {key: _get(cfg, key) for key in SITE_LOCAL_KEYS}


def without_site_local(cfg: FedMuskConfig) -> FedMuskConfig:
    """A copy of ``cfg`` with every site-local key at its schema default: what a coordinator sends."""
    defaults = FedMuskConfig()
    out = copy.deepcopy(cfg)
    for key in SITE_LOCAL_KEYS:
        _set(out, key, _get(defaults, key))
    return out


def with_site_settings(cfg: FedMuskConfig, settings: Mapping[str, Any]) -> FedMuskConfig:
    """A copy of ``cfg`` with the site's own values for the site-local keys in ``settings``."""
    out = copy.deepcopy(cfg)
    for key, value in settings.items():
        if key not in SITE_LOCAL_KEYS:
            raise ConfigError(f"site settings: '{key}' is not a site-local setting ({', '.join(SITE_LOCAL_KEYS)})")
        _set(out, key, value)
    return out


def load_site_settings(path: str | os.PathLike | None) -> dict[str, Any]:
    """The site-local settings of a site's ``site-settings.yaml`` (nested YAML, e.g. ``model: {weights: ...}``),
    checked against the schema: {} when ``path`` is None. Relative paths are taken from the file's folder.

    Raises ConfigError naming the file and key for a key that is not site-local, a wrong type or a missing file."""
    if path is None:
        return {}
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"site settings file not found: {path}") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: not a readable YAML file ({type(err).__name__})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of settings (e.g. 'device: cuda')")
    flat = _flatten(raw)
    unknown = sorted(set(flat) - set(SITE_LOCAL_KEYS))
    if unknown:
        raise ConfigError(
            f"{path}: '{unknown[0]}' is not a site-local setting; a site sets only {', '.join(SITE_LOCAL_KEYS)} "
            "(everything else is the federation's, from the coordinator)"
        )
    _refuse_interpolation(raw, str(path))
    checked = config_from_mapping(raw, str(path))
    settings = {key: _get(checked, key) for key in flat}
    for key in ("model.weights", "model.tokenizer", "train.pretrain.visual_tokenizer"):
        if settings.get(key):
            settings[key] = str((path.parent / os.path.expanduser(settings[key])).resolve())
    return settings


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{dotted}."))
        else:
            out[dotted] = value
    return out


def _refuse_interpolation(tree: Any, source: str, prefix: str = "") -> None:
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            _refuse_interpolation(value, source, f"{prefix}{key}.")
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            _refuse_interpolation(value, source, f"{prefix}{i}.")
    elif isinstance(tree, str) and "${" in tree:
        raise ConfigError(
            f"{source}: '{prefix.rstrip('.')}' uses interpolation ('${{...}}'); a federation's configuration is "
            "plain data and is not resolved at the site"
        )


def parse_coordinator_config(text: str, source: str = "the coordinator's configuration") -> FedMuskConfig:
    """The configuration a coordinator sent, as plain data: refused (ConfigError naming the key) when it is not a
    mapping, uses interpolation, sets a key the schema does not know, or sets a site-local key."""
    raw = _plain_mapping(text, source)
    flat = _flatten(raw)
    defaults = site_local_settings(FedMuskConfig())
    chosen = sorted(k for k in SITE_LOCAL_KEYS if k in flat and flat[k] != defaults[k])
    if chosen:
        raise ConfigError(
            f"{source} sets '{chosen[0]}', a setting of this site's own machine: sites choose their paths, device "
            f"and batch sizes in their {SITE_SETTINGS_FILE}, never the coordinator"
        )
    return config_from_mapping(raw, source)


def parse_config_data(text: str, source: str) -> FedMuskConfig:
    """A configuration in YAML read as plain data (no interpolation) against the schema; ConfigError names the key."""
    return config_from_mapping(_plain_mapping(text, source), source)


def _plain_mapping(text: str, source: str) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source} is not YAML ({type(err).__name__})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of settings")
    _refuse_interpolation(raw, source)
    return raw


# --- the base model a run expects -------------------------------------------------------------------------------

_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, streamed; remembered per (path, size, mtime) for this process."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def model_fingerprint(cfg: FedMuskConfig) -> dict[str, str]:
    """What identifies the base model of ``cfg``: the preset and the sha256 of the weights and tokenizer files
    ("none" for random initialisation and fedmusk's own tiny tokenizer). Raises ConfigError for a missing file."""
    out = {"preset": str(cfg.model.preset)}  # a StrEnum prints as its value
    for name, key in (("weights", "model.weights"), ("tokenizer", "model.tokenizer")):
        value = _get(cfg, key)
        if not value:
            out[name] = "none"
            continue
        try:
            out[name] = file_sha256(value)
        except OSError:
            raise ConfigError(f"{key}: cannot read {value}") from None
    return out


def check_model_fingerprint(expected: Mapping[str, str], cfg: FedMuskConfig) -> None:
    """Refuse (ConfigError) a site whose base model differs from the run's, naming what differs."""
    mine = model_fingerprint(cfg)
    for name in ("preset", "weights", "tokenizer"):
        want, have = str(expected.get(name, "none")), mine.get(name, "none")
        if want != have:
            where = {"weights": "model.weights", "tokenizer": "model.tokenizer"}.get(name, "model.preset")
            raise ConfigError(
                f"this site's {name} ({where} in {SITE_SETTINGS_FILE}: {_short(have)}) differ from the run's "
                f"({_short(want)}): every site must train the same base MUSK; install the release files the "
                "coordinator names"
            )


def _short(value: str) -> str:
    return f"sha256 {value[:12]}…" if len(value) == 64 else value
