"""MUSK-large LoRA training throughput and peak memory on one GPU, in bf16 with activation checkpointing.

A training step is what end-to-end outcome training does with one case: a bag of K tiles (384 px) through MUSK's
vision expert with LoRA on its attention projections (q, k, v, out; rank 8), raw CLS features (K, 1024), the
gated-attention MIL and a discrete-time survival head, the NLL loss, backward, and an AdamW step. The base weights are
random (the release's shapes: speed and memory do not depend on the values), frozen, in bf16; peft keeps the LoRA
tensors in float32, and the heads are float32. Tiles are random tensors already on the GPU, so this measures the
model, not the loader (see bench_data.py for that).

For each bag size K: 2 warm-up steps, then --steps timed steps (synchronised); reports tiles/s (K / median step
time) and the peak GPU memory of those steps (torch.cuda.max_memory_allocated). A bag that runs out of memory is
recorded as such and larger bags are skipped. It also times frozen-feature extraction (no_grad, bf16, batch 64), the
GPU side of ``fedmusk prepare``.

Usage (one GPU, well under 5 minutes on an H100):
    python benchmarks/gpu_train.py                      # K = 16, 32, 64, 128; 10 timed steps each
    python benchmarks/gpu_train.py --bags 64 --steps 20 --no-checkpointing
Smoke test anywhere (tiny config on the CPU, a few seconds): python benchmarks/gpu_train.py --smoke
Writes benchmarks/results/gpu_train.json and .md (gpu_train_smoke.* with --smoke).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from _report import write_report  # noqa: E402 - sibling module in benchmarks/

from fedmusk.musk_model import MuskConfig, MuskModel
from fedmusk.musk_model.heads import CaseFusion, SurvivalHead, pad_bags
from fedmusk.musk_model.lora import LoraSettings, apply_lora, task_heads, trainable_parameter_count
from fedmusk.musk_model.losses import discrete_time_nll

HERE = Path(__file__).resolve().parent
GIB = 2**30


def build(preset: str, device: torch.device, dtype: torch.dtype, checkpointing: bool):
    """The LoRA-wrapped model (vision expert only) with MIL + survival heads, and its AdamW optimizer."""
    cfg = MuskConfig.preset(preset)
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: seconds on a GPU, not a minute of CPU work
        base = MuskModel(cfg)
    base = base.to(dtype).set_activation_checkpointing(checkpointing)
    heads = {"fusion": CaseFusion(cfg.embed_dim, cfg.embed_dim, dim=64, mode="image"),
             "outcome": SurvivalHead(64, n_bins=4)}  # fmt: skip
    model = apply_lora(base, LoraSettings(rank=8, alpha=16, experts=("A",)), extra_trainable=heads).to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=1e-4), cfg


def train_step(model, optimizer, tiles: torch.Tensor) -> float:
    """One case: bag of tiles -> LoRA vision features -> MIL -> survival NLL -> backward -> step."""
    heads = task_heads(model)
    feats, _ = model(image=tiles, with_head=False, out_norm=False)  # (K, dim) in the base dtype
    bag, padding = pad_bags([feats.float()])  # (1, K, dim)
    embedding, _ = heads["fusion"](bag, padding, None)
    logits = heads["outcome"](embedding)  # (1, bins)
    loss = discrete_time_nll(logits, torch.tensor([2], device=tiles.device), torch.tensor([1.0], device=tiles.device))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_bag(model, optimizer, cfg, k: int, steps: int, warmup: int, device, dtype) -> dict:
    tiles = torch.randn(k, 3, cfg.img_size, cfg.img_size, device=device, dtype=dtype)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        train_step(model, optimizer, tiles)
    times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        train_step(model, optimizer, tiles)
        sync(device)
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
    return {"bag": k, "step_s": step_s, "tiles_per_s": k / step_s, "peak_gib": peak, "steps": steps}


@torch.no_grad()
def bench_embedding(model, cfg, batch: int, steps: int, device, dtype) -> dict:
    """Frozen base features (adapters disabled), as ``fedmusk prepare`` computes them."""
    model.eval()
    x = torch.randn(batch, 3, cfg.img_size, cfg.img_size, device=device, dtype=dtype)
    with model.disable_adapter():
        model(image=x, with_head=False, out_norm=False)
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            model(image=x, with_head=False, out_norm=False)
        sync(device)
    model.train()
    return {"batch": batch, "tiles_per_s": batch * steps / (time.perf_counter() - start)}


def markdown(report: dict) -> str:
    lines = [
        f"MUSK-{report['preset']} LoRA training on {report['device_name']} ({report['dtype']}, activation "
        f"checkpointing {'on' if report['checkpointing'] else 'off'}, torch {report['torch']}): LoRA rank 8 on the "
        f"vision expert's attention, {report['trainable_params']:,} trainable of {report['total_params']:,} "
        f"parameters; weights {report['weights_gib']:.2f} GiB on the device."
        if report["weights_gib"] is not None else
        f"MUSK-{report['preset']} LoRA training on {report['device_name']} ({report['dtype']}, smoke test).",
        "",
        "| bag K (tiles) | step s | tiles/s | peak GiB |",
        "|---|---|---|---|",
    ]  # fmt: skip
    for r in report["bags"]:
        if "error" in r:
            lines.append(f"| {r['bag']} | {r['error']} | | |")
            continue
        peak = "n/a" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        lines.append(f"| {r['bag']} | {r['step_s']:.3f} | {r['tiles_per_s']:.1f} | {peak} |")
    e = report["embedding"]
    lines += ["", f"Frozen feature extraction (prepare), no_grad, batch {e['batch']}: {e['tiles_per_s']:.1f} tiles/s.",
              ""]  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bags", default="16,32,64,128", help="comma-separated bag sizes K")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per bag size")
    parser.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--smoke", action="store_true", help="tiny config on the CPU, K=4, 2 steps: checks the code")
    parser.add_argument("--out-dir", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)

    dtype = torch.bfloat16
    if args.smoke:
        preset, device, bags, steps, warmup, embed_batch = "tiny", torch.device("cpu"), [4], 2, 1, 8
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA GPU here; run with --smoke to check the script on the CPU")
        preset, device, warmup, embed_batch = "large", torch.device("cuda"), 2, 64
        bags, steps = [int(k) for k in args.bags.split(",")], args.steps
        torch.backends.cuda.matmul.allow_tf32 = True

    start = time.perf_counter()
    model, optimizer, cfg = build(preset, device, dtype, args.checkpointing)
    weights = torch.cuda.memory_allocated(device) / GIB if device.type == "cuda" else None
    print(f"built MUSK-{preset} with LoRA in {time.perf_counter() - start:.1f} s", flush=True)
    results = []
    for k in bags:
        try:
            r = bench_bag(model, optimizer, cfg, k, steps, warmup, device, dtype)
        except torch.cuda.OutOfMemoryError:
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            results.append({"bag": k, "error": "out of memory"})
            print(f"K={k}: out of memory; skipping larger bags", flush=True)
            break
        results.append(r)
        peak = "" if r["peak_gib"] is None else f", peak {r['peak_gib']:.2f} GiB"
        print(f"K={k}: {r['tiles_per_s']:.1f} tiles/s ({r['step_s']:.3f} s/step){peak}", flush=True)
    embedding = bench_embedding(model, cfg, embed_batch, 2 if args.smoke else 5, device, dtype)
    report = {
        "preset": preset, "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "dtype": str(dtype).removeprefix("torch."), "checkpointing": args.checkpointing, "torch": torch.__version__,
        "cuda": torch.version.cuda, "total_params": sum(p.numel() for p in model.parameters()),
        "trainable_params": trainable_parameter_count(model), "weights_gib": weights, "bags": results,
        "embedding": embedding, "seconds": time.perf_counter() - start,
    }  # fmt: skip
    table = markdown(report)
    print(table)
    name = "gpu_train_smoke" if args.smoke else "gpu_train"
    write_report(args.out_dir, name, report, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
