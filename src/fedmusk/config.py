"""fedmusk's one configuration schema (OmegaConf structured configs) and its loader.

Every YAML file in configs/ and every ``key=value`` override is checked against ``FedMuskConfig``: an unknown key or a
value of the wrong type is an error that names the key and where it came from. Resolve once with ``load_config`` and
pass the typed sections down. Rules that tie several keys together (``check_config``) run once, after the last
layer is merged; ``check_resume_compatible`` compares a checkpointed run's configuration with a new one.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration file or override that does not fit the schema; the message names the key and its source."""


# Choices are Enums: OmegaConf refuses any other value at load, naming the key and the allowed values. They are
# StrEnums whose names are their values, so they compare, print and serialise as the plain strings.


Preset = StrEnum("Preset", ["large", "tiny"])
Task = StrEnum("Task", ["survival", "response", "pretrain"])
Features = StrEnum("Features", ["cached", "end2end"])
Fusion = StrEnum("Fusion", ["concat", "gated", "image", "report"])
SurvivalLoss = StrEnum("SurvivalLoss", ["nll", "cox"])
MimTarget = StrEnum("MimTarget", ["teacher", "codes"])
Strategy = StrEnum("Strategy", ["fedit", "ffa", "fedsa", "rolora"])
ServerOptimizer = StrEnum("ServerOptimizer", ["fedavg", "fedavgm", "fedadam", "fedyogi"])
Robust = StrEnum("Robust", ["none", "median", "trimmed_mean"])
Precision = StrEnum("Precision", ["auto", "float32", "bfloat16"])


@dataclass
class ModelConfig:
    preset: Preset = Preset.tiny  # "large" (the release) or "tiny" (tests and demos)
    weights: str | None = None  # model.safetensors of the release; None: random initialisation (tiny only)
    tokenizer: str | None = None  # tokenizer.spm of the release; None: fedmusk's tiny tokenizer
    img_size: int | None = None  # None: the preset's size
    max_text_len: int = 100
    ms_aug: bool = False  # multi-scale (1x + 2x) tile features for MIL
    precision: Precision = Precision.auto  # "auto" (bf16 where the hardware has it), "float32" or "bfloat16"


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
    return _checked(_typed(merged))


def config_from_mapping(raw: Mapping[str, Any], source: str, schema: type = FedMuskConfig) -> Any:
    """A plain mapping (parsed YAML, never resolved) checked against the schema like a file named ``source``."""
    try:
        layer = OmegaConf.create(dict(raw))
    except OmegaConfBaseException as err:
        raise ConfigError(f"{source}: not a configuration ({_first_line(err)})") from None
    merged = _merge(OmegaConf.structured(schema), layer, source)
    _check_values(merged, source)
    return _checked(_typed(merged))


def _checked(cfg: Any) -> Any:
    if isinstance(cfg, FedMuskConfig):  # other schemas (a site policy) have no cross-field rules here
        check_config(cfg)
    return cfg


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
# Values that cannot work, refused at load with the key and the file or override that set them. Rules that tie
# several keys together (SecAgg+ shares, DP, robust rules, LoRA experts) are ``check_config``'s.
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


# --- rules that tie keys together, checked once per loaded configuration -----------------------------------------

SECAGG_MODULUS = 2**32  # SecAgg+'s integer sum wraps around this (Flower's modulus_range)


def check_config(cfg: FedMuskConfig) -> None:
    """Refuse settings that cannot work together: the federation's (before any site is contacted), the LoRA
    experts the outcome model can train, the pretraining objectives. ConfigError names the key. (A value outside
    its Enum or its VALUE_RULES range is refused earlier, while the layers merge.)"""
    fed, t = cfg.federation, cfg.train

    def bad(key: str, why: str) -> ConfigError:
        return ConfigError(f"federation.{key}: {why}")

    if fed.strategy == "ffa" and not t.lora.ffa:
        raise ConfigError("federation.strategy=ffa needs train.lora.ffa=true (A frozen at the shared seed)")
    if fed.strategy == "rolora" and t.lora.ffa:
        raise ConfigError("federation.strategy=rolora trains A in every other round: set train.lora.ffa=false")
    if fed.pretrain_rounds and t.task == Task.pretrain:
        raise ConfigError(
            "federation.pretrain_rounds: train.task=pretrain has no outcome phase; set a survival or response task"
        )
    if not 0 < fed.fraction <= 1:
        raise bad("fraction", f"{fed.fraction}; use a share in (0, 1]")
    if fed.min_replies < 1 or fed.min_sites < fed.min_replies:
        raise bad("min_replies", f"need 1 <= min_replies <= min_sites, got {fed.min_replies}, {fed.min_sites}")
    if fed.wait_for_sites_s <= 0 or fed.reply_timeout_s <= 0:
        raise bad("wait_for_sites_s", "wait_for_sites_s and reply_timeout_s must be positive: never wait forever")
    if fed.robust != "none" and fed.secure_aggregation:
        raise bad("robust", "robust rules need every site's update, which SecAgg+ hides; set secure_aggregation=false")
    if fed.dp_noise_multiplier < 0 or fed.dp_clip < 0:
        raise bad("dp_noise_multiplier", "dp_noise_multiplier and dp_clip must be >= 0")
    if fed.dp_noise_multiplier > 0 and fed.dp_clip <= 0:
        raise bad("dp_clip", "DP noise needs a clipping norm (dp_clip > 0): noise is calibrated to it")
    if fed.dp_noise_multiplier > 0 and fed.robust != "none":
        raise bad("robust", "robust rules and DP noise cannot be combined (the DP sum is not robust)")
    if fed.secure_aggregation:
        if fed.secagg_num_shares < 3 or fed.secagg_num_shares % 2 == 0:
            raise bad("secagg_num_shares", f"{fed.secagg_num_shares}; SecAgg+ needs an odd number >= 3")
        if not 2 <= fed.secagg_reconstruction_threshold < fed.secagg_num_shares:
            raise bad("secagg_reconstruction_threshold", "must be >= 2 and below secagg_num_shares")
        if fed.min_sites < 2:
            raise bad("min_sites", "SecAgg+ needs at least 2 sites in a round")
        if fed.secagg_clipping_range <= 0 or fed.secagg_quantization_range <= 0:
            raise bad("secagg_quantization_range", "clipping_range, quantization_range and n_clients must be positive")
        if fed.min_sites * fed.secagg_quantization_range >= SECAGG_MODULUS:  # the integer sum would wrap around
            raise bad("secagg_quantization_range", f"{fed.min_sites} sites x quantization_range "
                      f"{fed.secagg_quantization_range} overflows modulus_range {SECAGG_MODULUS}")  # fmt: skip
    experts, dropped = learnable_experts(cfg)
    if t.task != Task.pretrain and not experts:
        reasons = "; ".join(dropped.values())
        raise ConfigError(
            f"train.lora.experts={list(t.lora.experts)}: no LoRA expert can learn ({reasons}); "
            "use train.features=end2end or a fusion that reads the report"
        )
    p = t.pretrain
    if (t.task == Task.pretrain or fed.pretrain_rounds) and not (p.mlm_weight or p.mim_weight or p.clip_weight):
        raise ConfigError("train.pretrain: every objective has weight 0; nothing to train")


def learnable_experts(cfg: FedMuskConfig) -> tuple[tuple[str, ...], dict[str, str]]:
    """Which configured LoRA experts can receive a gradient in the outcome task, and why the others cannot.

    The vision expert (A) sees tiles only in end-to-end training: cached features come from the frozen base model,
    and ``fusion=report`` reads no tiles. The language expert (B) sees the report unless ``fusion=image``.
    Returns ``(experts, {expert: reason})``; LoRA on the others would be trained and exchanged for nothing.
    """
    t = cfg.train
    why_not: dict[str, str] = {}
    if t.fusion == "report":
        why_not["A"] = "train.fusion=report reads no tiles"
    elif t.features == "cached":
        why_not["A"] = "train.features=cached: tile features come from the frozen base model"
    if t.fusion == "image":
        why_not["B"] = "train.fusion=image reads no report"
    configured = tuple(dict.fromkeys(t.lora.experts))
    return tuple(e for e in configured if e not in why_not), {e: why_not[e] for e in configured if e in why_not}


def check_model_config(cfg: ModelConfig) -> None:
    """Refuse, before any work starts, a model configuration that cannot load: a large model needs the release's
    checkpoint and tokenizer files (a random MUSK-large is never what a hospital wants). Not part of
    ``check_config``: the files are a site's own settings, filled in after the coordinator's configuration is read."""
    if cfg.preset == "tiny":
        return
    if cfg.weights is None:
        raise ConfigError(
            f"model.preset={cfg.preset} needs the released checkpoint: set model.weights to model.safetensors"
        )
    if cfg.tokenizer is None:
        raise ConfigError(f"model.preset={cfg.preset} needs the release tokenizer: set model.tokenizer")


# Sections that must not change when a federation resumes (rounds, waits and tracking may).
_FIXED_ON_RESUME = ("seed", "model", "data", "train")
_FIXED_FEDERATION_KEYS = (
    "strategy", "local_epochs", "pretrain_rounds", "secure_aggregation", "server_optimizer", "server_lr",
    "proximal_mu", "robust", "trim_fraction", "dp_noise_multiplier", "dp_clip",
)  # fmt: skip


def check_resume_compatible(saved: FedMuskConfig, cfg: FedMuskConfig) -> None:
    """ConfigError listing the settings that differ from the checkpointed run's and would change its results."""
    changed = [s for s in _FIXED_ON_RESUME if _plain(getattr(saved, s)) != _plain(getattr(cfg, s))]
    changed += [
        f"federation.{k}" for k in _FIXED_FEDERATION_KEYS if getattr(saved.federation, k) != getattr(cfg.federation, k)
    ]
    if changed:
        raise ConfigError(f"cannot resume: these settings differ from the checkpointed run: {', '.join(changed)}")


def _plain(value: Any) -> Any:
    return asdict(value) if hasattr(value, "__dataclass_fields__") else value


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
