"""fedmusk's one configuration schema (OmegaConf structured configs) and its loader.

Every YAML file in configs/ and every ``key=value`` override is checked against ``FedMuskConfig``: an unknown key or a
value of the wrong type is an error that names the key and where it came from. Resolve once with ``load_config`` and
pass the typed sections down.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration file or override that does not fit the schema; the message names the key and its source."""


# Choices are Enums: OmegaConf refuses any other value at load, naming the key and the allowed values. They are
# StrEnums whose names are their values, so they compare, print and serialise as the plain strings.


class Preset(StrEnum):
    large = "large"
    tiny = "tiny"


class Task(StrEnum):
    survival = "survival"
    response = "response"
    pretrain = "pretrain"


class Features(StrEnum):
    cached = "cached"
    end2end = "end2end"


class Fusion(StrEnum):
    concat = "concat"
    gated = "gated"
    image = "image"
    report = "report"


class SurvivalLoss(StrEnum):
    nll = "nll"
    cox = "cox"


class MimTarget(StrEnum):
    teacher = "teacher"
    codes = "codes"


class Strategy(StrEnum):
    fedit = "fedit"
    ffa = "ffa"
    fedsa = "fedsa"
    rolora = "rolora"


class ServerOptimizer(StrEnum):
    fedavg = "fedavg"
    fedavgm = "fedavgm"
    fedadam = "fedadam"
    fedyogi = "fedyogi"


class Robust(StrEnum):
    none = "none"
    median = "median"
    trimmed_mean = "trimmed_mean"


@dataclass
class ModelConfig:
    preset: Preset = Preset.tiny  # "large" (the release) or "tiny" (tests and demos)
    weights: str | None = None  # model.safetensors of the release; None: random initialisation (tiny only)
    tokenizer: str | None = None  # tokenizer.spm of the release; None: fedmusk's tiny tokenizer
    img_size: int | None = None  # None: the preset's size
    max_text_len: int = 100
    ms_aug: bool = False  # multi-scale (1x + 2x) tile features for MIL
    precision: str = "auto"  # "auto" (bf16 where the hardware has it), "float32" or "bfloat16"; see precision.py


@dataclass
class DataConfig:
    target_mpp: float = 0.5  # microns per pixel at which tiles are cut
    tile_size: int = 384  # tile edge in pixels at target_mpp
    min_tissue: float = 0.5  # fraction of a tile that must be tissue
    max_tiles_per_slide: int = 64  # sampling cap per slide in training
    batch_size: int = 32
    num_workers: int = 0


@dataclass
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"])
    experts: list[str] = field(default_factory=lambda: ["A", "B"])  # A = vision, B = language
    ffa: bool = False  # FFA-LoRA: A frozen at a seeded initialisation shared by all sites, only B trains


@dataclass
class PretrainConfig:
    """Continued domain pretraining with MUSK's objectives on a site's pretrain/ folder."""

    mlm_weight: float = 1.0  # masked language modelling on unpaired report text
    mim_weight: float = 1.0  # masked image modelling on unpaired tiles
    clip_weight: float = 1.0  # contrastive alignment on image-caption pairs
    aux_mlm_weight: float = 0.1  # cross-attention MLM beside the contrastive loss, as in the paper
    mim_target: MimTarget = MimTarget.teacher  # "teacher" (frozen base features) or "codes" (visual tokenizer)
    visual_tokenizer: str | None = None  # checkpoint of a visual tokenizer when mim_target=codes
    mask_ratio: float = 0.4
    mlm_probability: float = 0.15
    steps: int = 20
    batch_size: int = 8
    lr: float = 1e-4
    stain_augmentation: bool = True


@dataclass
class TrainConfig:
    task: Task = Task.survival  # "survival", "response" or "pretrain"
    features: Features = Features.cached  # "cached": tile features from `fedmusk prepare`; "end2end": tiles through MUSK
    fusion: Fusion = Fusion.concat  # "concat", "gated", "image" (slides only) or "report" (report only)
    survival_loss: SurvivalLoss = SurvivalLoss.nll  # "nll" (discrete-time) or "cox" (partial likelihood)
    time_bins: list[float] = field(default_factory=lambda: [12.0, 24.0, 48.0])  # months; shared by every site
    epochs: int = 20
    lr: float = 5e-4
    weight_decay: float = 0.05
    batch_cases: int = 16
    bag_size: int = 16  # tiles sampled per slide per step in training (all tiles at evaluation)
    grad_clip: float = 1.0
    hidden_dim: int = 64
    dropout: float = 0.1
    bootstrap: int = 200  # resamples for confidence intervals
    val_fraction: float = 0.15  # when the manifest has no split column
    test_fraction: float = 0.2
    lora: LoraConfig = field(default_factory=LoraConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)


@dataclass
class FederationConfig:
    """Rounds as the coordinator runs them. The site's own egress policy is a separate file the site controls."""

    strategy: Strategy = Strategy.fedit  # "fedit" (FedAvg of A and B), "ffa" (FFA-LoRA), "fedsa" (FedSA-LoRA: B stays local),
    # "rolora" (RoLoRA: odd rounds of a phase train and send only B, even rounds only A; exact, also under SecAgg+)
    rounds: int = 3
    pretrain_rounds: int = 0  # continued-pretraining rounds before the outcome rounds
    local_epochs: int = 1
    secure_aggregation: bool = True  # SecAgg+; false = plain mode (needed for robust aggregation)
    secagg_num_shares: int = 3  # must be odd
    secagg_reconstruction_threshold: int = 2
    secagg_clipping_range: float = 1.0  # weighted updates must stay within +-this (adapter deltas are far smaller)
    secagg_weight_cap: int = 1024  # training cases that give a site full weight; set near the sites' real sizes
    secagg_quantization_range: int = 4194304
    secagg_packed: bool = True  # masked vector uploaded as uint32 (4 bytes a value), not Flower's int64; same sum
    fraction: float = 1.0  # share of connected sites asked each round
    min_sites: int = 2  # sites that must be connected before a round starts
    min_replies: int = 2  # fewer replies and the round fails loudly
    wait_for_sites_s: float = 120.0  # never wait forever for sites to connect
    reply_timeout_s: float = 1800.0  # never wait forever for replies
    server_optimizer: ServerOptimizer = ServerOptimizer.fedavg  # "fedavg", "fedavgm", "fedadam", "fedyogi"
    server_lr: float = 1.0
    proximal_mu: float = 0.0  # FedProx term at the sites (0 = off)
    robust: Robust = Robust.none  # "none", "median", "trimmed_mean" (plain mode only)
    trim_fraction: float = 0.1
    dp_noise_multiplier: float = 0.0  # server-side Gaussian noise on the sum (0 = no DP)
    dp_clip: float = 0.0  # client-side clipping norm of each update (needed with DP)
    dp_delta: float = 1e-5


@dataclass
class TrackingConfig:
    uri: str | None = None  # None: a local SQLite store inside the run's output folder
    experiment: str = "fedmusk"
    parent_run_id: str | None = None  # nest the run under this MLflow run (a study's parent; the demo sets it)


@dataclass
class FedMuskConfig:
    seed: int = 0
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


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
        except IsADirectoryError:
            raise ConfigError(f"{path} is a folder, not a YAML configuration file") from None
        except PermissionError:
            raise ConfigError(f"{path}: permission denied (this account cannot read it)") from None
        except Exception as err:  # noqa: BLE001 - OS, YAML and OmegaConf errors alike mean "cannot read this file"
            raise ConfigError(f"{path}: not a readable YAML configuration ({_first_line(err)})") from None
        if not isinstance(layer, DictConfig):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, data:, train:, ...), "
                              f"not a {type(layer).__name__.removesuffix('Config').lower()}")  # fmt: skip
        merged = _merge(merged, layer, str(path))
        _check_values(merged, str(path))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        merged = _merge(merged, OmegaConf.from_dotlist([item]), f"override {item!r}")
        _check_values(merged, f"override {item!r}")
    return _typed(merged)


def config_from_mapping(raw: Mapping[str, Any], source: str, schema: type = FedMuskConfig) -> Any:
    """A plain mapping (parsed YAML, never resolved) checked against the schema like a file named ``source``."""
    try:
        layer = OmegaConf.create(dict(raw))
    except OmegaConfBaseException as err:
        raise ConfigError(f"{source}: not a configuration ({_first_line(err)})") from None
    merged = _merge(OmegaConf.structured(schema), layer, source)
    _check_values(merged, source)
    return _typed(merged)


def _typed(merged) -> Any:
    try:
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(f"configuration is incomplete: {_first_line(err)}") from None


def _positive(v) -> bool:
    return v is not None and math.isfinite(v) and v > 0


def _non_negative(v) -> bool:
    return v is not None and math.isfinite(v) and v >= 0


def _share(v) -> bool:  # a fraction in [0, 1)
    return v is not None and 0 <= v < 1


def _open_share(v) -> bool:  # a fraction in (0, 1)
    return v is not None and 0 < v < 1


_POSITIVE, _NON_NEGATIVE = ("a positive number", _positive), ("0 or more", _non_negative)
_SHARE, _OPEN_SHARE = ("a share in [0, 1)", _share), ("a share in (0, 1)", _open_share)
# Values that cannot work, refused at load with the key and the file or override that set them. Cross-field rules
# that need the whole federation (SecAgg+ shares, DP, robust rules) stay in server.rounds.check_federation_config.
VALUE_RULES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "model.max_text_len": _POSITIVE,
    "model.img_size": ("a positive number (or null: the preset's size)", lambda v: v is None or v > 0),
    "data.target_mpp": _POSITIVE,
    "data.tile_size": _POSITIVE,
    "data.min_tissue": ("a share in [0, 1]", lambda v: 0 <= v <= 1),
    "data.max_tiles_per_slide": _POSITIVE,
    "data.batch_size": _POSITIVE,
    "data.num_workers": _NON_NEGATIVE,
    "train.time_bins": ("a list of positive times (months)", lambda v: len(v) > 0 and all(_positive(t) for t in v)),
    "train.epochs": ("1 or more", lambda v: v >= 1),
    "train.lr": _POSITIVE,
    "train.weight_decay": _NON_NEGATIVE,
    "train.batch_cases": _POSITIVE,
    "train.bag_size": _POSITIVE,
    "train.grad_clip": _NON_NEGATIVE,
    "train.hidden_dim": _POSITIVE,
    "train.dropout": _SHARE,
    "train.bootstrap": _NON_NEGATIVE,
    "train.val_fraction": _SHARE,
    "train.test_fraction": _SHARE,
    "train.lora.rank": _POSITIVE,
    "train.lora.alpha": _POSITIVE,
    "train.lora.dropout": _SHARE,
    "train.pretrain.mlm_weight": _NON_NEGATIVE,
    "train.pretrain.mim_weight": _NON_NEGATIVE,
    "train.pretrain.clip_weight": _NON_NEGATIVE,
    "train.pretrain.aux_mlm_weight": _NON_NEGATIVE,
    "train.pretrain.mask_ratio": _OPEN_SHARE,
    "train.pretrain.mlm_probability": _OPEN_SHARE,
    "train.pretrain.steps": _POSITIVE,
    "train.pretrain.batch_size": _POSITIVE,
    "train.pretrain.lr": _POSITIVE,
    "federation.rounds": ("1 or more", lambda v: v >= 1),
    "federation.pretrain_rounds": _NON_NEGATIVE,
    "federation.local_epochs": ("1 or more", lambda v: v >= 1),
    "federation.server_lr": _POSITIVE,
    "federation.proximal_mu": _NON_NEGATIVE,
}


def _check_values(merged, source: str) -> None:
    """ConfigError naming the key and ``source`` for the first value that breaks VALUE_RULES (the earlier layers
    were checked already, so a break is this layer's)."""
    for key, (wanted, ok) in VALUE_RULES.items():
        try:
            value = OmegaConf.select(merged, key, throw_on_missing=False)
        except OmegaConfBaseException:
            continue
        if value is None and key != "model.img_size":
            continue  # not in this schema (a site policy, say)
        if not ok(value):
            raise ConfigError(f"{source}: bad value for '{key}': {value}; must be {wanted}")
    if (
        OmegaConf.select(merged, "train.val_fraction") is not None
        and merged.train.val_fraction + merged.train.test_fraction >= 1
    ):
        raise ConfigError(f"{source}: train.val_fraction + train.test_fraction must stay below 1 (cases must be left "
                          "for training)")  # fmt: skip


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
