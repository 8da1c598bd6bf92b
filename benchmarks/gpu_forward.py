"""MUSK-large forward throughput on one GPU in bf16: images/s and texts/s with fedmusk's MuskModel.

The model is built directly on the GPU with random weights (the release's shapes: speed does not depend on the
values), cast to bf16, eval mode, no_grad. Images: a batch of random 384 px tensors (default 64), the default
outputs (CLS, head, L2 norm: what zero-shot and retrieval use) and the raw CLS features ``fedmusk prepare`` caches.
Texts: a batch of 100-token ids, rows padded to different lengths as the tokenizer frames them. Each timing is
--steps synchronised calls after 2 warm-up calls; peak memory is ``torch.cuda.max_memory_allocated``.

Usage (one GPU, well under a minute on an H100): python benchmarks/gpu_forward.py [--batch 64] [--steps 10]
Smoke test anywhere (tiny config on the CPU): python benchmarks/gpu_forward.py --smoke
Writes the JSON to --out (default benchmarks/results/gpu_forward.json; gpu.sh collects it into results/gpu.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from fedmusk.musk_model import MuskConfig, MuskModel

HERE = Path(__file__).resolve().parent
GIB = 2**30


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def text_batch(batch: int, length: int, vocab: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids framed like the tokenizer's (<s> ... </s> then padding), rows of different lengths."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, vocab, (batch, length), generator=g)
    padding = torch.zeros(batch, length, dtype=torch.bool)
    for row, used in enumerate(torch.linspace(length, max(3, length // 5), batch).long().tolist()):
        ids[row, 0], ids[row, used - 1] = 0, 2
        ids[row, used:] = 1
        padding[row, used:] = True
    return ids.to(device), padding.to(device)


@torch.no_grad()
def timed(call, steps: int, device: torch.device) -> dict:
    """Median and mean seconds per call over ``steps`` synchronised calls after 2 warm-up calls, and peak memory."""
    for _ in range(2):
        call()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        call()
        sync(device)
        times.append(time.perf_counter() - start)
    times.sort()
    peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
    return {"median_s": times[len(times) // 2], "mean_s": sum(times) / len(times), "peak_gib": peak}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64, help="images and texts per forward")
    parser.add_argument("--text-len", type=int, default=100)
    parser.add_argument("--steps", type=int, default=10, help="timed forwards per input")
    parser.add_argument("--smoke", action="store_true", help="tiny config on the CPU, batch 8, 2 steps")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "gpu_forward.json")
    args = parser.parse_args(argv)

    dtype = torch.bfloat16
    if args.smoke:
        preset, device, batch, steps = "tiny", torch.device("cpu"), 8, 2
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA GPU here; run with --smoke to check the script on the CPU")
        preset, device, batch, steps = "large", torch.device("cuda"), args.batch, args.steps
        torch.backends.cuda.matmul.allow_tf32 = True
    start = time.perf_counter()
    cfg = MuskConfig.preset(preset)
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: seconds on a GPU, not a minute of CPU work
        model = MuskModel(cfg)
    model = model.to(dtype).eval()
    build_s = time.perf_counter() - start
    weights = torch.cuda.memory_allocated(device) / GIB if device.type == "cuda" else None
    images = torch.randn(batch, 3, cfg.img_size, cfg.img_size, device=device, dtype=dtype)
    ids, padding = text_batch(batch, args.text_len, cfg.vocab_size, device)
    calls = {
        "images (CLS + head + norm)": ("images", lambda: model(image=images)),
        "images (raw CLS, as prepare caches)": ("images", lambda: model(image=images, with_head=False,
                                                                        out_norm=False)),
        "texts": ("texts", lambda: model(text=ids, padding_mask=padding)),
    }  # fmt: skip
    rows = []
    for name, (unit, call) in calls.items():
        r = timed(call, steps, device)
        r.update(input=name, unit=unit, per_s=batch / r["median_s"])
        peak = "" if r["peak_gib"] is None else f", peak {r['peak_gib']:.2f} GiB"
        print(f"{name}: {r['per_s']:.1f} {unit}/s ({r['median_s'] * 1e3:.1f} ms per batch of {batch}){peak}",
              flush=True)
        rows.append(r)
    report = {
        "preset": preset, "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__, "cuda": torch.version.cuda,
        "batch": batch, "img_size": cfg.img_size, "text_len": args.text_len, "steps": steps,
        "parameters": sum(p.numel() for p in model.parameters()), "weights_gib": weights, "build_s": build_s,
        "results": rows, "seconds": time.perf_counter() - start,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
