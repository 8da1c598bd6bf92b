"""Loading MUSK checkpoints strictly: every tensor accounted for, or one error that lists what differs."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedmusk.musk_model.model import POSITION_OFFSET

VISION_POSITIONS = "beit3.encoder.embed_positions.A.weight"
WRAPPER_KEYS = ("model", "module", "state_dict")


class WeightsMismatchError(RuntimeError):
    """A checkpoint's tensors do not match the model: lists missing, unexpected and shape-mismatched names."""

    def __init__(self, source: str, missing: list[str], unexpected: list[str], mismatched: list[tuple]):
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        lines = [f"checkpoint {source} does not match the model:"]
        if missing:
            lines.append(f"  missing from the checkpoint ({len(missing)}): " + ", ".join(missing))
        if unexpected:
            lines.append(f"  unexpected in the checkpoint ({len(unexpected)}): " + ", ".join(unexpected))
        for name, want, got in mismatched:
            lines.append(f"  shape of {name}: model {tuple(want)}, checkpoint {tuple(got)}")
        super().__init__("\n".join(lines))


@dataclass
class LoadReport:
    """What a non-strict load left out (empty lists after a strict load)."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple] = field(default_factory=list)
    interpolated_positions: bool = False


def read_state_dict(source: str | os.PathLike | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The flat state dict in a .safetensors/.bin/.pth file or mapping, unwrapped from "model"/"module"."""
    if isinstance(source, Mapping):
        state = dict(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"MUSK checkpoint not found: {path}")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        elif path.suffix in {".bin", ".pth", ".pt"}:
            state = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise ValueError(f"{path}: unknown checkpoint format {path.suffix!r} (use .safetensors, .bin or .pth)")
    for key in WRAPPER_KEYS:
        if key in state and isinstance(state[key], Mapping):
            state = dict(state[key])
            break
    bad = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if bad:
        raise ValueError(f"checkpoint entries are not tensors: {', '.join(map(str, bad[:10]))}")
    return state


def interpolate_vision_positions(table: Tensor, grid_size: int) -> Tensor:
    """Resize a vision position table to a new patch grid (bicubic); the 2 offset rows and CLS row are kept."""
    keep = POSITION_OFFSET + 1
    extra, grid = table[:keep], table[keep:]
    old = int(round(grid.shape[0] ** 0.5))
    if old * old != grid.shape[0]:
        raise ValueError(f"vision position table has {grid.shape[0]} patch rows, not a square grid")
    if old == grid_size:
        return table
    dim = grid.shape[1]
    g = grid.float().reshape(1, old, old, dim).permute(0, 3, 1, 2)
    g = F.interpolate(g, size=(grid_size, grid_size), mode="bicubic", align_corners=False)
    g = g.permute(0, 2, 3, 1).reshape(grid_size * grid_size, dim).to(table.dtype)
    return torch.cat([extra, g], dim=0)


def load_musk_weights(
    model: nn.Module, source: str | os.PathLike | Mapping[str, Tensor], strict: bool = True
) -> LoadReport:
    """Load a MUSK checkpoint (path or state dict) into ``model``.

    The vision position table is interpolated when the checkpoint was trained at another image size. With
    ``strict`` (the default) any missing, unexpected or shape-mismatched tensor raises ``WeightsMismatchError``
    naming every one of them and nothing is loaded; otherwise the matching tensors load and the report says what
    was skipped.
    """
    name = str(source) if not isinstance(source, Mapping) else "state dict"
    state = read_state_dict(source)
    expected = model.state_dict()
    report = LoadReport()
    if VISION_POSITIONS in state and VISION_POSITIONS in expected:
        table, want = state[VISION_POSITIONS], expected[VISION_POSITIONS]
        if table.shape != want.shape and table.ndim == 2 and table.shape[1] == want.shape[1]:
            grid_size = int(round((want.shape[0] - POSITION_OFFSET - 1) ** 0.5))
            state[VISION_POSITIONS] = interpolate_vision_positions(table, grid_size)
            report.interpolated_positions = True
    report.missing = sorted(set(expected) - set(state))
    report.unexpected = sorted(set(state) - set(expected))
    report.mismatched = [
        (k, expected[k].shape, state[k].shape) for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape
    ]
    if strict and (report.missing or report.unexpected or report.mismatched):
        raise WeightsMismatchError(name, report.missing, report.unexpected, report.mismatched)
    skip = set(report.unexpected) | {k for k, _, _ in report.mismatched}
    # to(): a model built on the meta device takes the checkpoint's tensors, so give them the model's dtype
    state = {k: v.to(expected[k].dtype) for k, v in state.items() if k not in skip}
    model.load_state_dict(state, strict=False, assign=_on_meta(model))
    return report


def _on_meta(model: nn.Module) -> bool:
    # A model built on the meta device has no storage to copy into: take the checkpoint's tensors instead.
    return any(p.is_meta for p in model.parameters())
