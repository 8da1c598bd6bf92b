"""What a tensor name of MUSK and its adapter means: the one rule every module asks, never a substring test of its own.

Names are the stable adapter names of ``fedmusk.musk_model.lora`` (the keys of an adapter state), e.g.
``beit3.encoder.layers.0.self_attn.q_proj.B.lora_A.weight`` or ``task_heads.fusion.gate.weight``:

- a LoRA factor has a ``lora_A`` (down-projection, (r, in)) or ``lora_B`` (up-projection, (out, r)) component;
  peft's own parameter names put the adapter name after it (``...lora_A.default.weight``), which counts the same;
- a multiway expert's Linear sits at ``self_attn.<projection>.<expert>`` or ``ffn.<expert>.<fc1|fc2>``, the expert
  being ``A`` (vision) or ``B`` (language). MUSK's experts share their letters with the LoRA factors, so
  ``q_proj.B.lora_A.weight`` is the language expert's A factor: the factor comes from the ``lora_`` component alone;
- a task head tensor lies under ``task_heads.<head>.``;
- a base weight is everything else: never part of an adapter.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

Factor = Literal["A", "B"]
HEADS_ATTR = "task_heads"
EXPERTS = {"A": "vision", "B": "language"}
_FACTORS: tuple[tuple[Factor, str], ...] = (("A", "lora_A"), ("B", "lora_B"))
_EXPERT = re.compile(r"(?:^|\.)(?:self_attn\.[A-Za-z0-9_]+\.(?P<attention>[AB])|ffn\.(?P<ffn>[AB])\.[A-Za-z0-9_]+)\.")


def lora_factor(name: str, adapter: str | None = None) -> Factor | None:
    """"A" for a tensor of a LoRA down-projection, "B" for an up-projection, None for any other tensor. With
    ``adapter`` (peft parameter names), only the factors of that peft adapter count. ValueError for a name that
    claims to be both."""
    parts = name.split(".")
    found = [factor for factor, part in _FACTORS if part in parts]
    if len(found) > 1:
        raise ValueError(f"tensor {name!r} names both lora_A and lora_B")
    if not found:
        return None
    if adapter is not None:
        i = parts.index(f"lora_{found[0]}")
        if parts[i + 1 : i + 2] != [adapter] or i + 2 >= len(parts):
            return None
    return found[0]


def is_lora(name: str) -> bool:
    """Whether ``name`` is a LoRA factor (A or B)."""
    return lora_factor(name) is not None


def is_task_head(name: str) -> bool:
    """Whether ``name`` is a tensor of a task head (``task_heads.<head>.…``)."""
    return name.startswith(f"{HEADS_ATTR}.")


def is_base_weight(name: str) -> bool:
    """Whether ``name`` is a weight of the base model: neither a LoRA factor nor a task head."""
    return not is_lora(name) and not is_task_head(name)


def expert(name: str) -> str | None:
    """The multiway expert ("A" vision, "B" language) whose Linear ``name`` belongs to (its LoRA factors included),
    or None for a tensor outside the experts' Linears."""
    found = _EXPERT.search(name)
    return None if found is None else found["attention"] or found["ffn"]


def lora_partner(name: str) -> tuple[str, str]:
    """For a LoRA A factor: its layer (the name before ``.lora_A``) and the name of the B factor it pairs with."""
    parts = name.split(".")
    i = parts.index("lora_A")
    return ".".join(parts[:i]), ".".join([*parts[:i], "lora_B", *parts[i + 1 :]])


def expert_linears(attention: Sequence[str], ffn: Sequence[str], experts: Sequence[str]) -> str:
    """A regex that full-matches the module names of the ``experts``' Linears among the ``attention`` projections
    and ``ffn`` layers of MUSK's encoder: where LoRA goes."""
    chosen = "|".join(experts)
    parts = []
    if attention:
        parts.append(rf"self_attn\.({'|'.join(attention)})\.({chosen})")
    if ffn:
        parts.append(rf"ffn\.({chosen})\.({'|'.join(ffn)})")
    return rf"beit3\.encoder\.layers\.\d+\.({'|'.join(parts)})"
