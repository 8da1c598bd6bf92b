"""bench_federation.py, section 1: the bytes one site exchanges per round, counted from fedmusk's own layouts.

MUSK-large is built on the meta device (no weights) and wrapped by fedmusk's ``OutcomeTrainer``; the layout counted
is fedmusk's ``AdapterLayout`` of the very tensors ``adapter_state`` would send, and ``update_layout`` gives what each
strategy sends up. Imported as a sibling module (see ``_report.py``).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
FULL_PARAMS = 675_188_737
FULL_BYTES = FULL_PARAMS * 4  # float32; full-model fine-tuning sends this up and receives it down every round
GOAL_UP_FRACTION = 0.005  # issue: bytes up <= 0.5% of the full model

# Tiny federations: report-only fusion needs no slides, so a labels-and-reports cohort (images=False) is a valid site.
TINY_OVERRIDES = [
    "train.fusion=report", "train.bootstrap=0", "federation.local_epochs=1", "federation.min_replies=2",
    "federation.pretrain_rounds=0",  # outcome rounds only (configs/demo.yaml starts with a pretraining round)
    "federation.wait_for_sites_s=600", "federation.reply_timeout_s=1200",
]  # fmt: skip

# MUSK-large configurations whose exchange is counted (on configs/musk-large.yaml): key -> (label, strategy, overrides).
# The vision expert's LoRA can learn only from tiles run through MUSK: the "both experts" rows train end to end.
BOTH = ["train.lora.experts=[A,B]", "train.features=end2end"]
VARIANTS = {
    "defaults": ("configs/musk-large.yaml defaults (FedIT, LoRA r8 q/k/v/out, language expert, cached tiles)",
                 "fedit", []),
    "fedit-both": ("FedIT, both experts (end-to-end tiles)", "fedit", BOTH),
    "fedit-language": ("FedIT, language expert only", "fedit", ["train.lora.experts=[B]"]),
    "ffa-both": ("FFA-LoRA (B only), both experts (end-to-end tiles)", "ffa", [*BOTH, "train.lora.ffa=true"]),
    "ffa-language": ("FFA-LoRA (B only), language expert only", "ffa",
                     ["train.lora.experts=[B]", "train.lora.ffa=true"]),
    "fedsa-both": ("FedSA-LoRA (A only), both experts (end-to-end tiles)", "fedsa", BOTH),
    "fedsa-language": ("FedSA-LoRA (A only), language expert only", "fedsa", ["train.lora.experts=[B]"]),
    "rolora-both": ("RoLoRA (B or A each round), both experts (end-to-end tiles)", "rolora", BOTH),
    "rolora-language": ("RoLoRA (B or A each round), language expert only", "rolora", ["train.lora.experts=[B]"]),
}  # fmt: skip


def npy_bytes(shape, dtype) -> int:
    """Bytes of one array as Flower ships it: numpy's .npy serialisation (header + data)."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": np.dtype(dtype).str, "fortran_order": False,
                                                  "shape": tuple(shape)})  # fmt: skip
    return len(header.getvalue()) + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def exchange(layout, strategy: str) -> dict:
    """Bytes one site exchanges per round for a global adapter ``layout`` (fedmusk's AdapterLayout).

    Up, plain: the float32 arrays of ``update_layout(strategy)``. Up, SecAgg+: the same values plus fedmusk's weight,
    quantised and masked by Flower, plus Flower's own weight factor (one more array), as uint32 (fedmusk packs
    Flower's int64, ``up_secure_int64``); the keys and shares of the protocol (a few kB) come on top. RoLoRA: a
    round-1 (B) round; its A rounds send as many values where every LoRA layer is square (q/k/v/out). Down: the
    float32 global adapter, twice (the fit and the evaluate instructions both carry it), in both modes and in
    every strategy."""
    from fedmusk.strategies.aggregation import tensor_role

    rnd = 1 if strategy == "rolora" else None
    plain, secure = layout.update_layout(strategy, False, rnd), layout.update_layout(strategy, True, rnd)
    values = lambda lay: sum(int(np.prod(s)) for s in lay.shapes)  # noqa: E731
    return {
        "strategy": strategy, "tensors_global": len(layout.names), "tensors_up": len(plain.names),
        "values_global": values(layout), "values_up": values(plain), "secure_vector_len": values(secure),
        "lora_params_up": sum(int(np.prod(s)) for n, s in zip(plain.names, plain.shapes) if tensor_role(n) != "head"),
        "head_params_up": sum(int(np.prod(s)) for n, s in zip(plain.names, plain.shapes) if tensor_role(n) == "head"),
        "up_plain": sum(npy_bytes(s, np.float32) for s in plain.shapes),
        "up_secure": sum(npy_bytes(s, np.uint32) for s in secure.shapes) + npy_bytes((1,), np.uint32),
        "up_secure_int64": sum(npy_bytes(s, np.int64) for s in secure.shapes) + npy_bytes((1,), np.int64),
        "down": 2 * sum(npy_bytes(s, np.float32) for s in layout.shapes),
    }  # fmt: skip


def large_layout(overrides: list[str]):
    """fedmusk's AdapterLayout of MUSK-large under configs/musk-large.yaml (and ``overrides``), built on the meta
    device (no weights), from exactly the tensors ``adapter_state`` would copy."""
    import torch

    from fedmusk.config import load_config
    from fedmusk.musk_model import MuskConfig, MuskModel
    from fedmusk.musk_model.lora import _exchanged
    from fedmusk.training.outcome import OutcomeTrainer
    from fedmusk.wire import AdapterLayout

    cfg = load_config([REPO / "configs" / "musk-large.yaml"], overrides)
    with torch.device("meta"):
        base = MuskModel(MuskConfig.large())
    assert sum(p.numel() for p in base.parameters()) == FULL_PARAMS
    trainer = OutcomeTrainer(cfg, base, None, None, "meta")
    return AdapterLayout.of(_exchanged(trainer.model, trainable_only=True))  # meta tensors: shapes only


def tiny_layout():
    """fedmusk's AdapterLayout of the tiny demo adapter of section 2's federations (built for real on the CPU)."""
    from fedmusk.config import load_config
    from fedmusk.musk_model import MuskConfig, MuskModel
    from fedmusk.training.outcome import OutcomeTrainer
    from fedmusk.wire import AdapterLayout

    cfg = load_config([REPO / "configs" / "demo.yaml"], TINY_OVERRIDES)
    return AdapterLayout.of(OutcomeTrainer(cfg, MuskModel(MuskConfig.tiny()), None, None, "cpu").adapter_state())


def with_fractions(row: dict) -> dict:
    """Shares of full-model fine-tuning: up alone against the full model up, and up + down against its up + down."""
    for mode in ("plain", "secure"):
        row[f"up_{mode}_of_full"] = row[f"up_{mode}"] / FULL_BYTES
        row[f"total_{mode}_of_full"] = (row[f"up_{mode}"] + row["down"]) / (2 * FULL_BYTES)
        row[f"less_{mode}"] = 1 - row[f"total_{mode}_of_full"]
    return row


def bench_bytes() -> dict:
    rows = []
    for key, (label, strategy, overrides) in VARIANTS.items():
        r = with_fractions({"key": key, "variant": label, **exchange(large_layout(overrides), strategy)})
        print(f"bytes: {label}: up {r['up_plain'] / 1e6:.2f} MB plain ({100 * r['up_plain_of_full']:.3f}% of full), "
              f"{r['up_secure'] / 1e6:.2f} MB SecAgg+; down {r['down'] / 1e6:.2f} MB; "
              f"{100 * r['less_secure']:.2f}% less than full fine-tuning under SecAgg+", flush=True)  # fmt: skip
        rows.append(r)
    defaults = rows[0]
    print(f"bytes: GOAL defaults under SecAgg+ <= {100 * GOAL_UP_FRACTION:.1f}% of the full model: "
          f"{100 * defaults['up_secure_of_full']:.3f}% "
          f"({'met' if defaults['up_secure_of_full'] <= GOAL_UP_FRACTION else 'NOT met'})", flush=True)
    return {"full_params": FULL_PARAMS, "full_bytes_float32": FULL_BYTES, "variants": rows,
            "tiny": {"variant": "tiny demo adapter (report fusion), FedIT", **exchange(tiny_layout(), "fedit")},
            "heads_config": "configs/musk-large.yaml (ms_aug, concat fusion, survival head)"}  # fmt: skip
