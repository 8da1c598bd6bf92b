"""LoRA adapters on MUSK with peft, and the adapter state: the only tensors that may leave a site.

The adapter is peft's own object: ``apply_lora`` wraps a ``MuskModel`` with ``get_peft_model``, ``save_adapter``
writes peft's on-disk format (adapter_config.json + adapter_model.safetensors), so stock
``PeftModel.from_pretrained(MuskModel(...), dir)`` reloads it on top of the released weights.

Trainable task heads (MIL, fusion, survival, MLM/MIM prediction heads) are part of the adapter: they are attached to
the base model under ``task_heads.<name>`` and declared as peft ``modules_to_save``, so peft saves and reloads them
with the LoRA tensors. Stock peft restores them only into a base model that has the same heads attached
(``attach_task_heads``); without them it loads the LoRA tensors and silently skips the heads.

Adapter state names are stable: peft's ``base_model.model.`` prefix, the adapter name and the ``modules_to_save``
wrapper are stripped, giving e.g. ``beit3.encoder.layers.0.self_attn.q_proj.A.lora_A.weight`` and
``task_heads.mil.attention_V.weight``. They equal the keys of adapter_model.safetensors without its prefix.

FFA-LoRA (Sun et al. 2024): every site draws A from the same seeded generator and freezes it; only B (zero at the
start) trains. With A shared, averaging B across sites averages the product B @ A exactly, which plain federated
LoRA does not. A is seeded in plain LoRA too, so that every site starts from the same adapter.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from torch import Tensor, nn

from fedmusk.musk_model.roles import EXPERTS, HEADS_ATTR, expert_linears, is_task_head, lora_factor

# fedmusk's own settings (FFA mode, seed, head names) beside peft's files; stock peft ignores this file.
SETTINGS_FILE = "fedmusk_adapter.json"
PEFT_PREFIX = "base_model.model."
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
FFN_TARGETS = ("fc1", "fc2")


@dataclass
class LoraSettings:
    """Which Linear layers of MUSK get LoRA, and how.

    targets: any of q_proj, k_proj, v_proj, out_proj (attention) and fc1, fc2 (feed-forward).
    experts: "A" (vision), "B" (language) or both; LoRA goes only into the chosen experts' copies.
    ffa: FFA-LoRA, A frozen at its seeded initialisation and only B trained.
    seed: seeds A; sites that share it start from bit-identical adapters.
    """

    rank: int = 8
    alpha: float = 16
    dropout: float = 0.0
    targets: tuple[str, ...] = ATTENTION_TARGETS
    experts: tuple[str, ...] = ("A", "B")
    ffa: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        self.targets, self.experts = tuple(self.targets), tuple(self.experts)
        known = ATTENTION_TARGETS + FFN_TARGETS
        unknown = [t for t in self.targets if t not in known]
        if unknown or not self.targets:
            raise ValueError(f"LoRA targets {unknown or 'none'} are not valid; choose from {list(known)}")
        bad = [e for e in self.experts if e not in EXPERTS]
        if bad or not self.experts:
            raise ValueError(f"LoRA experts {bad or 'none'} are not valid; choose from 'A' (vision), 'B' (language)")
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {self.rank}")

    def target_regex(self) -> str:
        """A regex that peft full-matches against module names; it names exactly the chosen experts' Linears."""
        attention = [t for t in self.targets if t in ATTENTION_TARGETS]
        ffn = [t for t in self.targets if t in FFN_TARGETS]
        return expert_linears(attention, ffn, self.experts)

    def to_dict(self) -> dict:
        return asdict(self)


def attach_task_heads(model: nn.Module, heads: dict[str, nn.Module]) -> nn.Module:
    """Register ``heads`` on a base ``MuskModel`` as ``model.task_heads[name]``; returns the model.

    Do this on a fresh base model before ``PeftModel.from_pretrained`` so that stock peft restores saved heads.
    """
    if isinstance(model, PeftModel):
        raise TypeError("attach task heads to the base MuskModel before wrapping it with LoRA")
    for name in heads:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError(f"task head name {name!r} must be a Python identifier")
    container = getattr(model, HEADS_ATTR, None)
    if container is None:
        container = nn.ModuleDict()
        model.add_module(HEADS_ATTR, container)
    clash = sorted(set(heads) & set(container))
    if clash:
        raise ValueError(f"task heads {clash} are already attached to the model")
    container.update(heads)
    return model


def apply_lora(
    model: nn.Module, settings: LoraSettings | None = None, extra_trainable: dict[str, nn.Module] | None = None
) -> PeftModel:
    """Wrap a base ``MuskModel`` with LoRA: base weights frozen, adapters and ``extra_trainable`` heads trainable.

    The heads are attached as ``task_heads.<name>`` and wrapped by peft (``modules_to_save``): peft trains a copy,
    so call the live heads through ``task_heads(peft_model)[name]``, not the objects passed in, which become
    peft's frozen reference copies (used under ``disable_adapter()``).
    """
    settings = settings or LoraSettings()
    heads = dict(extra_trainable or {})
    if heads:
        attach_task_heads(model, heads)
    head_names = sorted(getattr(model, HEADS_ATTR, {}) or {})
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_regex(),
        modules_to_save=[f"{HEADS_ATTR}.{n}" for n in head_names] or None,
        bias="none",
    )
    peft_model = get_peft_model(model, config)
    _seed_lora_a(peft_model, settings)
    peft_model.fedmusk_settings = settings
    return peft_model


@torch.no_grad()
def _seed_lora_a(model: PeftModel, settings: LoraSettings) -> None:
    # Each A draws from its own generator keyed by (seed, layer name), so A of a layer does not depend on which
    # other layers are targeted. Same bound as peft's default (Kaiming-uniform, a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in)).
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        for adapter, lora_a in module.lora_A.items():
            key = f"{settings.seed}:{_stable_name(name)}".encode()
            gen = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:7], "little"))
            bound = 1 / math.sqrt(lora_a.weight.shape[1])
            values = (torch.rand(lora_a.weight.shape, generator=gen, dtype=torch.float64) * 2 - 1) * bound
            values = values.to(lora_a.weight.dtype)
            if settings.ffa:
                # A as a buffer, not a parameter: peft re-enables requires_grad on adapter parameters whenever it
                # toggles adapters (disable_adapter, set_adapter), and an optimizer with weight decay would move A.
                # A buffer keeps its state_dict name, so peft still saves, loads and merges it.
                del lora_a.weight
                lora_a.register_buffer("weight", values)
            else:
                lora_a.weight.copy_(values)
            module.lora_B[adapter].weight.zero_()


def _stable_name(name: str) -> str:
    """peft's parameter or module name -> the stable adapter name (no prefix, adapter name or wrapper)."""
    adapter = r"[^.]+"  # peft's adapter name, "default" unless renamed
    name = name.removeprefix(PEFT_PREFIX)
    name = re.sub(rf"\.(lora_A|lora_B)\.{adapter}(?=\.|$)", r".\1", name)
    return re.sub(rf"\.modules_to_save\.{adapter}(?=\.|$)", "", name)


def _require_peft(model: nn.Module) -> PeftModel:
    if not isinstance(model, PeftModel):
        raise TypeError(f"expected a LoRA-wrapped model from apply_lora, got {type(model).__name__}")
    return model


def settings_of(model: PeftModel) -> LoraSettings:
    """The LoraSettings a model was built with."""
    settings = getattr(_require_peft(model), "fedmusk_settings", None)
    if settings is None:
        raise ValueError("this peft model was not built by fedmusk.apply_lora/load_adapter; its settings are unknown")
    return settings


def task_heads(model: PeftModel) -> dict[str, nn.Module]:
    """The live (trained) task heads by name; calling them runs the adapter's copy."""
    container = getattr(_require_peft(model).base_model.model, HEADS_ATTR, None)
    return dict(container.items()) if container is not None else {}


def _adapter_tensors(model: PeftModel) -> dict[str, Tensor]:
    """Stable name -> live tensor for everything in the adapter: LoRA A/B (FFA's A is a buffer) and head copies."""
    adapter = _require_peft(model).active_adapter
    out = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        lora = lora_factor(name, adapter) is not None
        head = (
            name.startswith(PEFT_PREFIX)
            and is_task_head(name.removeprefix(PEFT_PREFIX))
            and f".modules_to_save.{adapter}." in name
        )
        if lora or head:
            out[_stable_name(name)] = tensor
    return out


def _exchanged(model: PeftModel, trainable_only: bool) -> dict[str, Tensor]:
    """The adapter tensors a site sends. Decided by the settings, not by requires_grad flags, so that every site
    and every round exchange the same names; FFA's shared lora_A stays home unless trainable_only is False."""
    tensors = _adapter_tensors(model)
    settings = getattr(model, "fedmusk_settings", None)
    if trainable_only and settings is not None and settings.ffa:
        tensors = {n: t for n, t in tensors.items() if lora_factor(n) != "A"}
    return tensors


def adapter_state(model: PeftModel, trainable_only: bool = True) -> dict[str, Tensor]:
    """The tensors that may leave a site: float32, detached CPU copies under stable names, sorted.

    trainable_only: in FFA mode leave out the frozen lora_A that every site derives from the shared seed; False
    gives the full adapter (what ``save_adapter`` writes). Plain LoRA sends A and B either way. Base weights are
    never included, even if someone made them trainable.
    """
    return {
        name: t.detach().to(device="cpu", dtype=torch.float32, copy=True)
        for name, t in sorted(_exchanged(model, trainable_only).items())
    }


class AdapterStateError(ValueError):
    """An adapter state that does not fit the model: the message names every offending tensor."""


@torch.no_grad()
def load_adapter_state(model: PeftModel, state: dict[str, Tensor], strict: bool = True) -> None:
    """Copy ``state`` (stable names, as from ``adapter_state``) into the model's adapter, in place.

    Unknown names and wrong shapes are always refused (AdapterStateError naming them); with strict, every tensor
    that ``adapter_state`` would send must also be present (FFA's lora_A may be given or left out).
    """
    params = _adapter_tensors(model)
    unknown = sorted(set(state) - set(params))
    misshapen = [
        f"{n}: got {tuple(state[n].shape)}, model has {tuple(params[n].shape)}"
        for n in sorted(set(state) & set(params))
        if tuple(state[n].shape) != tuple(params[n].shape)
    ]
    missing = sorted(set(_exchanged(model, trainable_only=True)) - set(state)) if strict else []
    if unknown or misshapen or missing:
        lines = []
        if unknown:
            lines.append(f"unknown tensors (not part of this adapter): {unknown}")
        if misshapen:
            lines.append(f"wrong shapes: {misshapen}")
        if missing:
            lines.append(f"missing trainable tensors: {missing}")
        raise AdapterStateError("adapter state does not fit the model; " + "; ".join(lines))
    for name, value in state.items():
        params[name].copy_(value.to(device=params[name].device, dtype=params[name].dtype))


def trainable_parameter_count(model: nn.Module) -> int:
    """Number of trainable scalars (what an optimizer updates, and for plain LoRA what a site sends)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def save_adapter(model: PeftModel, out_dir: str | Path) -> Path:
    """Write the adapter in peft's format (adapter_config.json + adapter_model.safetensors), full set including
    frozen FFA lora_A, plus fedmusk_adapter.json with the LoraSettings and head names. Returns the folder."""
    settings = settings_of(model)
    out = Path(out_dir)
    model.save_pretrained(str(out))
    meta = {"lora": settings.to_dict(), "task_heads": sorted(task_heads(model))}
    (out / SETTINGS_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def read_adapter_file(adapter_dir: str | Path) -> dict[str, Tensor]:
    """The tensors of a saved adapter under stable names."""
    path = Path(adapter_dir) / "adapter_model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no adapter at {path}")
    return {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(str(path)).items()}


def load_adapter(
    model_or_base: nn.Module,
    adapter_dir: str | Path,
    extra_trainable: dict[str, nn.Module] | None = None,
) -> PeftModel:
    """Load a saved adapter, strictly (every tensor must fit, every adapter tensor must be in the file).

    Given a base ``MuskModel``: rebuild the LoRA wrapping from fedmusk_adapter.json (``extra_trainable`` must supply
    modules for the saved heads, same shapes) and load into it. Given a model from ``apply_lora``: load in place.
    The result is trainable as the settings say (FFA: lora_A frozen).
    """
    adapter_dir = Path(adapter_dir)
    if isinstance(model_or_base, PeftModel):
        model = model_or_base
    else:
        meta_path = adapter_dir / SETTINGS_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"{meta_path} is missing: this folder was not written by fedmusk.save_adapter; "
                "load it with peft.PeftModel.from_pretrained instead"
            )
        meta = json.loads(meta_path.read_text())
        heads = dict(extra_trainable or {})
        attached = set(getattr(model_or_base, HEADS_ATTR, {}) or {})
        absent = sorted(set(meta["task_heads"]) - set(heads) - attached)
        if absent:
            raise AdapterStateError(
                f"{adapter_dir} holds task heads {absent}: pass modules for them in extra_trainable"
            )
        model = apply_lora(model_or_base, LoraSettings(**meta["lora"]), heads)
    state = read_adapter_file(adapter_dir)
    expected = set(_adapter_tensors(model))
    missing = sorted(expected - set(state))
    if missing:
        raise AdapterStateError(f"{adapter_dir} lacks adapter tensors {missing}")
    load_adapter_state(model, state, strict=True)
    return model


def merge_for_inference(model: PeftModel) -> nn.Module:
    """Fold LoRA into the base weights and unwrap the heads: a plain MuskModel (with ``task_heads``) that runs
    as fast as the base. The adapter cannot be separated afterwards."""
    return _require_peft(model).merge_and_unload()
