"""The site's egress policy: what a hospital lets leave, checked by the site itself before every send.

The policy comes from the site's own YAML file (``SitePolicy.load``), never from the coordinator's run
configuration: the coordinator asks for an update, the site decides what it is willing to send. ``enforce`` takes
the update a round produced and returns exactly what may be sent -- clipped and noised when the policy says so -- or
raises ``EgressRefused``, whose reasons name every refused tensor and why. Messages name tensors, shapes and limits,
never tensor values.

Tensor names are the stable adapter names of ``fedmusk.musk_model.lora`` (``beit3.encoder.layers.0.self_attn.
q_proj.B.lora_A.weight``, ``task_heads.fusion.gate.weight``). Patterns are Python regexes matched against the whole
name (``re.fullmatch``). A name must match an allowed pattern and no refused pattern: refused patterns always win,
so widening ``allowed_tensors`` by mistake cannot let base weights out.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from fedmusk.config import ConfigError, load_config
from fedmusk.strategies.aggregation import clip_by_norm, state_norm
from fedmusk.strategies.privacy import add_local_noise

# LoRA factors (optionally with peft's adapter name before ".weight") and the trainable task heads.
DEFAULT_ALLOWED: tuple[str, ...] = (
    r".+\.lora_[AB](\.[A-Za-z0-9_-]+)?\.weight",
    r"task_heads\.[A-Za-z0-9_]+\..+",
)
DEFAULT_REFUSED: tuple[str, ...] = (
    # Base weights: every name that is neither a LoRA factor nor a task head.
    r"(?!task_heads\.)(?!.+\.lora_[AB](\.[A-Za-z0-9_-]+)?\.weight$).*",
    # Token, patch and position embeddings, wherever they sit outside the task heads.
    r"(?!task_heads\.)(.*\.)?(text_embed|vision_embed|embed_positions|embed_tokens)\..*",
)
# What the built-in refused patterns mean, for refusal messages that hospital IT can read.
_DEFAULT_REFUSED_MEANING = {
    DEFAULT_REFUSED[0]: "a base weight: neither a LoRA factor nor a task head",
    DEFAULT_REFUSED[1]: "an embedding",
}
SENDABLE_DTYPES = (torch.float32, torch.float16)  # Flower's ArrayRecord rejects bfloat16
NORM_ACTIONS = ("refuse", "clip")
AUDIT_LOG_DEFAULT = Path(".fedmusk") / "audit.jsonl"
_SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.-]{0,63}")


@dataclass
class SitePolicyConfig:
    """The site policy file's schema; unknown keys are errors. See docs/site-policy.md."""

    site_name: str | None = None  # shown to the coordinator; None: the site folder's name
    allowed_tensors: list[str] = field(default_factory=lambda: list(DEFAULT_ALLOWED))
    refused_tensors: list[str] = field(default_factory=lambda: list(DEFAULT_REFUSED))  # always win
    max_update_norm: float | None = 50.0  # L2 norm of the whole update; None: no limit
    on_norm_exceeded: str = "refuse"  # "refuse" the round or "clip" the update to max_update_norm
    local_dp_std: float = 0.0  # Gaussian noise std added to every value at the site; 0: none
    max_bytes_per_round: int | None = 128 * 2**20  # None: no limit
    allowed_recipients: list[str] = field(default_factory=list)  # coordinator ids; empty: any
    audit_log: str | None = None  # None: <site_root>/.fedmusk/audit.jsonl; relative paths: from the policy file


class EgressRefused(PermissionError):
    """The site policy refused an update. ``reasons`` has one line per problem, each naming the tensor (or the
    recipient, or the whole update) and the rule it broke; no tensor values."""

    def __init__(self, reasons: list[str], round: int, recipient: str | None):
        self.reasons = list(reasons)
        self.round = round
        self.recipient = recipient
        to = f" for {recipient!r}" if recipient else ""
        lines = "\n".join(f"  - {r}" for r in self.reasons)
        super().__init__(f"site policy refused the round {round} update{to} ({len(self.reasons)} problems):\n{lines}")


class SitePolicy:
    """A validated site policy. Build it with ``SitePolicy.load(path)`` or ``SitePolicy.default(site_root)``."""

    def __init__(self, config: SitePolicyConfig, site_root: str | os.PathLike, source: str = "defaults"):
        self.config = config
        self.site_root = Path(site_root)
        self.source = source
        self._validate()
        self.allowed = [re.compile(p) for p in config.allowed_tensors]
        self.refused = [re.compile(p) for p in config.refused_tensors]
        self.site_name = config.site_name or _name_from_folder(self.site_root)
        base = Path(source).parent if source != "defaults" else self.site_root
        self.audit_log_path = base / config.audit_log if config.audit_log else self.site_root / AUDIT_LOG_DEFAULT

    @classmethod
    def load(cls, path: str | os.PathLike, site_root: str | os.PathLike | None = None) -> SitePolicy:
        """The policy in the site's YAML file ``path``; ``site_root`` (default: the file's folder) anchors the default
        audit log and the default site name. Raises ConfigError naming the file and key for unknown keys and bad
        values."""
        config = load_config([path], [], schema=SitePolicyConfig)
        return cls(config, site_root if site_root is not None else Path(path).parent, source=str(path))

    @classmethod
    def default(cls, site_root: str | os.PathLike) -> SitePolicy:
        """The built-in policy: LoRA factors and task heads only, norm <= 50 (refuse), no noise, 128 MiB, any
        recipient, audit log under ``site_root``."""
        return cls(SitePolicyConfig(), site_root)

    def enforce(
        self,
        update: Mapping[str, Tensor],
        round: int,
        recipient: str | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """What may leave the site from ``update``: new detached tensors, clipped to ``max_update_norm`` when
        ``on_norm_exceeded`` is "clip", then with N(0, local_dp_std^2) added to every value when set.

        Raises EgressRefused listing every problem at once: a name not allowed or refused, a dtype other than
        float32/float16, NaN or infinite values, the whole update over ``max_bytes_per_round`` or over
        ``max_update_norm`` (with "refuse"), a recipient not in ``allowed_recipients``. ``generator`` seeds the noise
        (tests only: leave it None in deployment so that nobody can replay the noise).
        """
        cfg = self.config
        reasons: list[str] = []
        if cfg.allowed_recipients and recipient not in cfg.allowed_recipients:
            who = f"recipient {recipient!r}" if recipient else "an unnamed recipient"
            reasons.append(f"{who} is not in allowed_recipients")
        sendable: dict[str, Tensor] = {}
        for name, value in update.items():
            problems = self._tensor_problems(name, value)
            reasons += [f"{name}: {p}" for p in problems]
            if not problems:
                sendable[name] = value.detach()
        total = sum(v.numel() * v.element_size() for v in update.values() if isinstance(v, Tensor))
        if cfg.max_bytes_per_round is not None and total > cfg.max_bytes_per_round:
            reasons.append(f"update is {total} bytes, over max_bytes_per_round {cfg.max_bytes_per_round}")
        # The norm itself is never reported: even one number about the update is more than the site promised.
        over_norm = cfg.max_update_norm is not None and state_norm(sendable) > cfg.max_update_norm
        if over_norm and cfg.on_norm_exceeded == "refuse":
            reasons.append(f"update L2 norm is over max_update_norm {cfg.max_update_norm} (on_norm_exceeded: refuse)")
        if reasons:
            raise EgressRefused(reasons, round, recipient)
        out = clip_by_norm(sendable, cfg.max_update_norm) if over_norm else {k: v.clone() for k, v in sendable.items()}
        if cfg.local_dp_std > 0:
            out = add_local_noise(out, cfg.local_dp_std, generator)
        return out

    def _tensor_problems(self, name: str, value: object) -> list[str]:
        problems = []
        refused_by = next((i for i, p in enumerate(self.refused) if p.fullmatch(name)), None)
        if refused_by is not None:
            pattern = self.refused[refused_by].pattern
            meaning = _DEFAULT_REFUSED_MEANING.get(pattern, repr(pattern))
            problems.append(f"refused by refused_tensors[{refused_by}] ({meaning})")
        elif not any(p.fullmatch(name) for p in self.allowed):
            problems.append("not in allowed_tensors")
        if not isinstance(value, Tensor):
            return problems + [f"not a tensor ({type(value).__name__})"]
        if value.dtype not in SENDABLE_DTYPES:
            problems.append(f"dtype {str(value.dtype).removeprefix('torch.')} is not sendable (float32 or float16)")
        elif not bool(torch.isfinite(value).all()):
            problems.append("has NaN or infinite values")
        return problems

    def _validate(self) -> None:
        cfg, src = self.config, self.source

        def bad(key: str, why: str) -> ConfigError:
            return ConfigError(f"{src}: bad value for '{key}': {why}")

        if cfg.on_norm_exceeded not in NORM_ACTIONS:
            raise bad("on_norm_exceeded", f"{cfg.on_norm_exceeded!r}; choose {' or '.join(NORM_ACTIONS)}")
        if cfg.max_update_norm is not None and not (math.isfinite(cfg.max_update_norm) and cfg.max_update_norm > 0):
            raise bad("max_update_norm", f"{cfg.max_update_norm}; use a positive number, or null for no limit")
        if not (math.isfinite(cfg.local_dp_std) and cfg.local_dp_std >= 0):
            raise bad("local_dp_std", f"{cfg.local_dp_std}; use 0 (no noise) or a positive number")
        if cfg.max_bytes_per_round is not None and cfg.max_bytes_per_round <= 0:
            raise bad("max_bytes_per_round", f"{cfg.max_bytes_per_round}; use a positive number, or null")
        if cfg.site_name is not None and not _SITE_NAME.fullmatch(cfg.site_name):
            raise bad("site_name", f"{cfg.site_name!r}; use 1-64 letters, digits, spaces, '_', '.' or '-'")
        for key in ("allowed_tensors", "refused_tensors"):
            for i, pattern in enumerate(getattr(cfg, key)):
                try:
                    re.compile(pattern)
                except re.error as err:
                    raise bad(f"{key}[{i}]", f"{pattern!r} is not a regular expression ({err})") from None


def _name_from_folder(site_root: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9 _.-]", "-", site_root.resolve().name).lstrip(" _.-")[:64]
    return name or "site"
