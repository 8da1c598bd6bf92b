"""Round checkpoints of the coordinator: the global adapter, the strategy's state and what a resume needs.

One folder per round, ``<ckpt_dir>/round-000003/``:
  global_state.safetensors    the global adapter state (tensor names as in the adapter), bit-exact
  strategy_state.safetensors  every tensor found inside the strategy state (server optimiser moments, ...)
  checkpoint.json             round, save time, the strategy state with tensors replaced by references, ``extra``
                              (MLflow run id, config hash, seeds) and the sha256 of both tensor files

A round is written into a hidden temporary folder and renamed into place (``os.replace``) once complete, so a crash
leaves either the previous checkpoint or the new one, never half of one; ``load_latest`` skips folders that are
incomplete or whose files do not match their hashes, with a warning. ``save_round`` keeps the newest ``keep``
rounds (3 by default; ``keep=None`` keeps all). One coordinator writes a checkpoint folder at a time.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor

from fedmusk.config import ConfigError

CHECKPOINT_DIR = "checkpoints"  # the round checkpoints' folder inside a federation's output folder
FORMAT_VERSION = 1
MANIFEST = "checkpoint.json"
GLOBAL_FILE = "global_state.safetensors"
STRATEGY_FILE = "strategy_state.safetensors"
DEFAULT_KEEP = 3
_ROUND_DIR = re.compile(r"round-(\d+)")
_TENSOR_REF = "__tensor__"


class CheckpointError(ValueError):
    """A round checkpoint that is incomplete or damaged; the message names the folder and what is wrong."""


@dataclass
class RoundCheckpoint:
    round: int
    global_state: dict[str, Tensor]
    strategy_state: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


def round_dir(ckpt_dir: str | os.PathLike, round: int) -> Path:
    return Path(ckpt_dir) / f"round-{round:06d}"


def save_round(
    ckpt_dir: str | os.PathLike,
    round: int,
    global_state: Mapping[str, Tensor],
    strategy_state: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    keep: int | None = DEFAULT_KEEP,
) -> Path:
    """Write round ``round`` atomically and return its folder; then delete all but the newest ``keep`` rounds.

    ``strategy_state`` may nest dicts and lists of JSON values and tensors (tuples come back as lists); ``extra``
    must be JSON-able. Raises TypeError naming the key of a value that is neither. Saving a round that exists
    replaces it.
    """
    if round < 0:
        raise ValueError(f"round must be >= 0, got {round}")
    if keep is not None and keep < 1:
        raise ValueError(f"keep must be >= 1 or None, got {keep}")
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Tensor] = {}
    strategy_json = _encode(dict(strategy_state or {}), tensors, "strategy_state")
    extra_json = dict(extra or {})
    _check_json(extra_json, "extra")

    tmp = ckpt_dir / f".tmp-round-{round:06d}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        files = {
            GLOBAL_FILE: _write_tensors(tmp / GLOBAL_FILE, global_state),
            STRATEGY_FILE: _write_tensors(tmp / STRATEGY_FILE, tensors),
        }
        manifest = {
            "format": FORMAT_VERSION,
            "round": round,
            "saved_at": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
            "files": files,
            "strategy_state": strategy_json,
            "extra": extra_json,
        }
        _write_synced(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
        _fsync_dir(tmp)
        target = round_dir(ckpt_dir, round)
        if target.exists():  # a directory cannot be replaced while it has files: move the old one aside first
            old = ckpt_dir / f".old-{target.name}-{secrets.token_hex(4)}"
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        _fsync_dir(ckpt_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep is not None:
        for n in list_rounds(ckpt_dir, complete_only=False)[:-keep]:
            shutil.rmtree(round_dir(ckpt_dir, n), ignore_errors=True)
    for stale in ckpt_dir.glob(".tmp-round-*"):  # left by a coordinator that crashed mid-save
        shutil.rmtree(stale, ignore_errors=True)
    return target


def list_rounds(ckpt_dir: str | os.PathLike, complete_only: bool = True) -> list[int]:
    """Round numbers that have a folder (with ``complete_only``: and a manifest), ascending."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    rounds = []
    for p in ckpt_dir.iterdir():
        m = _ROUND_DIR.fullmatch(p.name)
        if m and p.is_dir() and (not complete_only or (p / MANIFEST).is_file()):
            rounds.append(int(m.group(1)))
    return sorted(rounds)


def load_round(ckpt_dir: str | os.PathLike, round: int) -> RoundCheckpoint:
    """Round ``round``'s checkpoint, tensors on the CPU. Raises FileNotFoundError when there is none and
    CheckpointError when it is incomplete or its files do not match their recorded hashes."""
    path = round_dir(ckpt_dir, round)
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint for round {round} in {ckpt_dir}")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: incomplete checkpoint (no {MANIFEST})") from None
    except ValueError as err:
        raise CheckpointError(f"{path}/{MANIFEST}: not valid JSON ({err})") from None
    if manifest.get("format") != FORMAT_VERSION or manifest.get("round") != round:
        raise CheckpointError(f"{path}/{MANIFEST}: format {manifest.get('format')}, round {manifest.get('round')}")
    loaded = {}
    for name, digest in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{path}: incomplete checkpoint ({name} is missing)")
        if _sha256(file) != digest:
            raise CheckpointError(f"{file}: contents do not match the sha256 recorded in {MANIFEST}")
        loaded[name] = load_file(file)
    return RoundCheckpoint(
        round=round,
        global_state=loaded[GLOBAL_FILE],
        strategy_state=_decode(manifest["strategy_state"], loaded[STRATEGY_FILE]),
        extra=manifest["extra"],
        path=path,
    )


def load_latest(ckpt_dir: str | os.PathLike) -> RoundCheckpoint | None:
    """The newest complete, intact round checkpoint, or None when there is none. Damaged or half-written rounds
    are skipped with a warning that names them."""
    for n in reversed(list_rounds(ckpt_dir, complete_only=False)):
        try:
            return load_round(ckpt_dir, n)
        except CheckpointError as err:
            warnings.warn(f"skipping checkpoint: {err}", stacklevel=2)
    return None


def resume_point(out_dir: str | os.PathLike, resume: bool, total_rounds: int | None = None) -> RoundCheckpoint | None:
    """Whether the federation in ``out_dir`` can start as asked, and where: the newest intact checkpoint for a
    resume, None for a fresh start. Raises ConfigError for a resume with nothing to resume (no completed round; or,
    with ``total_rounds``, every round already done) and for a fresh start in a folder that already holds
    checkpoints (never overwritten)."""
    checkpoints = Path(out_dir) / CHECKPOINT_DIR
    if not resume:
        if checkpoints.is_dir() and any(checkpoints.iterdir()):
            raise ConfigError(f"{out_dir} already holds a federation's checkpoints: continue it with --resume or "
                              "choose another --out")  # fmt: skip
        return None
    latest = load_latest(checkpoints)
    if latest is None:
        raise ConfigError(f"nothing to resume: {out_dir} holds no completed round (start without --resume)")
    if total_rounds is not None and latest.round >= total_rounds:
        raise ConfigError(
            f"nothing to resume: the federation in {out_dir} already completed all {total_rounds} rounds "
            "(raise federation.rounds to continue training it)"
        )
    return latest


# --- encoding ----------------------------------------------------------------------------------------------------


def _encode(value: Any, tensors: dict[str, Tensor], where: str) -> Any:
    """JSON-able copy of ``value`` with each tensor moved into ``tensors`` under a fresh key and referenced."""
    if isinstance(value, Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = value
        return {_TENSOR_REF: key}
    if isinstance(value, Mapping):
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise TypeError(f"{where}: keys must be strings, got {bad[0]!r}")
        return {k: _encode(v, tensors, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]
    _check_json(value, where)
    return value


def _decode(value: Any, tensors: Mapping[str, Tensor]) -> Any:
    if isinstance(value, dict):
        if set(value) == {_TENSOR_REF}:
            return tensors[value[_TENSOR_REF]]
        return {k: _decode(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    return value


def _check_json(value: Any, where: str) -> None:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{where}: not JSON-able ({err})") from None


def _write_tensors(path: Path, state: Mapping[str, Tensor]) -> str:
    # contiguous CPU copies: safetensors refuses views that share memory
    save_file({k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}, str(path))
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
    return _sha256(path)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory handles
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

