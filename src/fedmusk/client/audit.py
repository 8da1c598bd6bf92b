"""The site's audit log: one JSON line per update sent or refused, hash-chained so that edits show.

Each line records what left (or would have left) the site: run, round, recipient and, per tensor, its name, shape,
dtype, size in bytes and the sha256 of its raw bytes (C order, little-endian: the bytes safetensors stores) -- never
the values. Each line also stores ``prev_sha256``, the sha256 of the previous line's bytes (64 zeros on the first
line), so editing or deleting any line breaks the chain at the line after it. Removing lines from the end leaves a
valid shorter chain, and an edited last line has no line after it: so every append also stores the new head beside
the log (``audit.jsonl.head``), and ``verify`` checks the last line against it. A head noted somewhere else (say, on
paper, or in the hospital's own records) can be given to ``verify(expected_head=...)`` or ``fedmusk audit --head``.

The file is only ever opened for appending, and created with permissions 0o600.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import Tensor

GENESIS = "0" * 64
HEAD_SUFFIX = ".head"  # audit.jsonl.head: the head after the latest append
AUDIT_LOG_DEFAULT = Path(".fedmusk") / "audit.jsonl"

try:  # POSIX: serialise appends from several processes of one site
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


class AuditLogTampered(RuntimeError):
    """The audit log's hash chain is broken; ``line`` is the 1-based line where it first fails."""

    def __init__(self, path: Path, line: int, why: str):
        self.path, self.line = path, line
        super().__init__(f"{path}: line {line}: {why}")


def tensor_record(name: str, tensor: Tensor) -> dict:
    """Name, shape, dtype, bytes and sha256 of one tensor's raw bytes; no values."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    digest = hashlib.sha256(flat.view(torch.uint8).numpy()).hexdigest()
    return {
        "name": name,
        "shape": list(tensor.shape),
        "dtype": str(tensor.dtype).removeprefix("torch."),
        "bytes": flat.numel() * flat.element_size(),
        "sha256": digest,
    }


class AuditLog:
    """The append-only audit log at ``path`` (a JSON-lines file; created with its folder on the first record)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def record_send(
        self, run_id: str, round: int, recipient: str | None, tensors: Mapping[str, Tensor]
    ) -> dict:
        """Append a "send" entry for ``tensors`` (exactly what is sent) and return it."""
        records = [tensor_record(name, t) for name, t in tensors.items()]
        return self._append(
            {
                "event": "send",
                "run_id": run_id,
                "round": round,
                "recipient": recipient,
                "tensors": records,
                "total_bytes": sum(r["bytes"] for r in records),
            }
        )

    def record_refusal(self, run_id: str, round: int, recipient: str | None, reasons: list[str]) -> dict:
        """Append a "refusal" entry with the policy's reasons (they name tensors and rules, never values)."""
        return self._append(
            {"event": "refusal", "run_id": run_id, "round": round, "recipient": recipient, "reasons": list(reasons)}
        )

    def record_refused_bundle(self, run_id: str, reasons: list[str]) -> dict:
        """Append a "refused-bundle" entry: a run whose app bundle was not fedmusk's description, so nothing of
        it ran here (``reasons`` name its files and components)."""
        return self._append({"event": "refused-bundle", "run_id": run_id, "reasons": list(reasons)})

    def entries(self) -> list[dict]:
        """Every entry, oldest first (without checking the chain: use ``verify``)."""
        return [json.loads(line) for line in self._lines()]

    @property
    def head_path(self) -> Path:
        """Where the head after the latest append is stored, beside the log."""
        return self.path.with_name(self.path.name + HEAD_SUFFIX)

    def head(self) -> str:
        """sha256 of the last line (the chain's head); keep it elsewhere to detect lines cut from the end later."""
        lines = self._lines()
        return hashlib.sha256(lines[-1]).hexdigest() if lines else GENESIS

    def verify(self, expected_head: str | None = None) -> bool:
        """True when every line is intact JSON chained to the one before it (and, given ``expected_head``, a line
        with that hash is still in the log). Raises AuditLogTampered naming the first bad line; a missing log is
        an empty, valid one."""
        prev = GENESIS
        seen_head = expected_head is None or expected_head == GENESIS
        lines = self._lines()
        for number, line in enumerate(lines, start=1):
            try:
                entry = json.loads(line)
            except ValueError:
                raise AuditLogTampered(self.path, number, "not a JSON entry") from None
            if not isinstance(entry, dict) or entry.get("prev_sha256") != prev:
                raise AuditLogTampered(self.path, number, "prev_sha256 does not match the line before it")
            if entry.get("seq") != number:
                raise AuditLogTampered(self.path, number, f"sequence number {entry.get('seq')} is not {number}")
            prev = hashlib.sha256(line).hexdigest()
            seen_head = seen_head or prev == expected_head
        if not seen_head:
            raise AuditLogTampered(self.path, len(lines), f"no line has the expected head {expected_head}")
        stored = self.stored_head()
        if expected_head is None and stored is not None and stored != prev:
            raise AuditLogTampered(
                self.path, len(lines), f"the last line does not match the head stored in {self.head_path.name} "
                "(the last line was edited, or lines were cut from or added to the end)",
            )  # fmt: skip
        return True

    def stored_head(self) -> str | None:
        """The head stored beside the log by the latest append, or None when there is no such file."""
        try:
            return self.head_path.read_text().strip() or None
        except FileNotFoundError:
            return None

    def _lines(self) -> list[bytes]:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        lines = data.split(b"\n")
        if lines[-1]:
            raise AuditLogTampered(self.path, len(lines), "last line is incomplete (no line end)")
        return lines[:-1]

    def _append(self, body: dict) -> dict:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            last = _last_line(self.path)
            seq = _seq(self.path, last) + 1 if last else 1
            entry = {
                "seq": seq,
                "time": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                **body,
                "prev_sha256": hashlib.sha256(last).hexdigest() if last else GENESIS,
            }
            line = json.dumps(entry, separators=(",", ":"), ensure_ascii=True).encode() + b"\n"
            head = hashlib.sha256(line[:-1]).hexdigest()
            while line:  # O_APPEND and the lock: every piece lands at the end, right after the one before
                line = line[os.write(fd, line) :]
            os.fsync(fd)
            self._store_head(head)  # still under the lock: the stored head is always the latest line's
        finally:
            os.close(fd)  # also releases the lock
        return entry


    def _store_head(self, head: str) -> None:
        tmp = self.head_path.with_name(self.head_path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, (head + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.head_path)


def _last_line(path: Path, chunk: int = 1 << 16) -> bytes | None:
    """The last line of ``path`` without its line end, read backwards from the end; None for an empty file."""
    with open(path, "rb") as f:
        end = f.seek(0, os.SEEK_END)
        if end == 0:
            return None
        f.seek(end - 1)
        if f.read(1) != b"\n":
            line = path.read_bytes().count(b"\n") + 1
            raise AuditLogTampered(path, line, "last line is incomplete (no line end); refusing to append")
        buf, pos = b"", end - 1  # buf holds bytes [pos, end - 1)
        while pos > 0 and b"\n" not in buf:
            step = min(chunk, pos)
            pos -= step
            f.seek(pos)
            buf = f.read(step) + buf
        return buf.rsplit(b"\n", 1)[-1]


def _seq(path: Path, last: bytes) -> int:
    try:
        seq = json.loads(last)["seq"]
    except (ValueError, KeyError, TypeError):
        seq = None
    if not isinstance(seq, int):
        line = path.read_bytes().count(b"\n")
        raise AuditLogTampered(path, line, "last line is not a fedmusk audit entry; refusing to append")
    return seq


def audit_log_path(site_root_or_log: str | os.PathLike) -> Path:
    """The log file itself, or ``<site_root>/.fedmusk/audit.jsonl`` when given a folder."""
    path = Path(site_root_or_log)
    return path / AUDIT_LOG_DEFAULT if path.is_dir() else path


def summarize(path: str | os.PathLike):
    """A rich Table of the log at ``path`` (see ``inspect_log``); never raises for a tampered log."""
    return inspect_log(path)[0]


def inspect_log(path: str | os.PathLike, expected_head: str | None = None):
    """``(table, ok)`` for the log at ``path`` (a log file or a site folder): one row per entry, and in the caption
    whether the chain is intact, with the whole head hash. ``ok`` is False for a broken chain, a last line that
    does not match the stored head (or ``expected_head``), and a missing or empty log."""
    from rich.table import Table

    given = Path(path)
    log = AuditLog(audit_log_path(given))
    ok = False
    if not given.exists():
        status = f"[bold red]NO AUDIT LOG[/]: {given} does not exist (wrong path?)"
    elif not log.path.is_file():
        status = (f"[bold red]NO AUDIT LOG[/] at {log.path}: this site has sent nothing yet, or the log was deleted"
                  + (" (a stored head says it held entries)" if log.stored_head() else ""))  # fmt: skip
    elif log.path.stat().st_size == 0:
        status = f"[bold red]EMPTY AUDIT LOG[/]: {log.path} holds no entries (emptied?)"
    else:
        try:
            log.verify(expected_head)
            checked = "the head given" if expected_head else "the stored head" if log.stored_head() else "no head"
            status = f"[green]hash chain intact[/] (checked against {checked}); head {log.head()}"
            ok = True
        except AuditLogTampered as err:
            status = f"[bold red]TAMPERED[/]: {err}"
    try:
        entries = log.entries()
    except (AuditLogTampered, ValueError, OSError):
        entries = []
    table = Table(title=f"fedmusk audit log: {log.path}", caption=status)
    for column in ("#", "time (UTC)", "event", "run", "round", "recipient", "tensors", "bytes", "details"):
        table.add_column(column, justify="right" if column in ("#", "round", "tensors", "bytes") else "left")
    for e in entries:
        sent = e.get("event") == "send"
        table.add_row(
            str(e.get("seq", "")),
            str(e.get("time", "")),
            "[green]send[/]" if sent else "[red]refusal[/]",
            str(e.get("run_id", "")),
            str(e.get("round", "")),
            str(e.get("recipient") or "-"),
            str(len(e.get("tensors", []))) if sent else "-",
            f"{e.get('total_bytes', 0):,}" if sent else "-",
            "" if sent else "; ".join(e.get("reasons", [])),
        )
    return table, ok
