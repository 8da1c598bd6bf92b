"""What the federation tests share: the tiny federation's configuration and a tracker that records rounds in memory."""

from __future__ import annotations

from fedmusk.config import load_config

BASE = [
    "device=cpu", "data.tile_size=96", "data.max_tiles_per_slide=32", "model.max_text_len=64",
    "train.epochs=1", "train.bootstrap=20", "train.lr=0.002", "train.lora.experts=[B]",
    "federation.rounds=2", "federation.local_epochs=1", "federation.min_sites=3", "federation.min_replies=2",
    "federation.wait_for_sites_s=60", "federation.reply_timeout_s=300",
]  # fmt: skip


def config(*overrides: str):
    return load_config([], [*BASE, *overrides])


class FakeTracker:
    def __init__(self, out_dir, **kwargs):
        self.run_id, self.tracking_uri, self.rounds = kwargs.get("run_id") or "run-1", "memory://", []

    def log_config(self, cfg, arm=None):
        return []

    def set_tags(self, tags):
        pass

    def log_round(self, round, *args, **kwargs):
        self.rounds.append(round)

    def finish(self, status="FINISHED"):
        self.status = status
