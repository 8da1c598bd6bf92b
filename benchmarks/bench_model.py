"""MuskModel against the reference (torchscale 0.3.0's BEiT3 with MUSK's configuration) on CPU, float32, eval.

For each configuration both models hold the very same tensors (the reference is built on the meta device and
assigned MuskModel's parameters), and the benchmark reports:
- max |difference| of the default outputs (CLS, head, L2 norm) and of the raw final hidden states;
- images/s (batch of images at the model's size) and texts/s (batch of texts of --text-len tokens, variously padded),
  timed in one process with the two models alternating, repetition after repetition, after a warm-up; the median
  is reported, so that a noisy neighbour on the machine slows both alike;
- peak memory of one forward: in a fresh subprocess per (model, input), the process RSS (psutil) is sampled every
  millisecond during the first forward; the peak minus the RSS just before is the forward's working memory
  (tracemalloc does not see torch's allocations). Weights are reported separately.

With ``--precisions float32,auto`` the same MuskModel also runs at ``model.precision=auto`` (bf16 autocast where
the CPU has AVX512-BF16 or AMX, see fedmusk.precision) as ``fedmusk_auto``, timed in the same interleaved rounds,
and its CLS features are compared with float32's by cosine similarity (minimum over the batch).

Goals: identical outputs and at least 1.3x the reference's image throughput at the large configuration, batch 4,
float32 CPU; at ``auto``, at least 2x the reference (float32) with CLS cosine >= 0.999.

Usage: python benchmarks/bench_model.py [--configs tiny,large] [--repeats 5] [--threads N] [--precisions float32,auto]
Writes benchmarks/results/bench_model.json and bench_model.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import torch
import torch.nn.functional as F
from _report import cpu_name, write_report

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torchscale_reference  # noqa: E402

from fedmusk.musk_model import MuskConfig, MuskModel  # noqa: E402

IMPLS = ("fedmusk", "reference")
GOAL_IMAGE_SPEEDUP = 1.3
GOAL_AUTO_SPEEDUP = 2.0
GOAL_AUTO_COSINE = 0.999


class AtPrecision(torch.nn.Module):
    """A model whose forward runs at a resolved compute precision ("float32" or "bfloat16"), outputs in float32:
    what fedmusk's prepare and training forwards do at ``model.precision``."""

    def __init__(self, model: torch.nn.Module, precision: str):
        super().__init__()
        self.model, self.precision = model, precision

    def forward(self, **kwargs):
        from fedmusk.precision import autocast

        with autocast("cpu", self.precision):
            out = self.model(**kwargs)
        return tuple(None if t is None else t.float() for t in out)


@torch.no_grad()
def cosines(model, other, inputs) -> dict:
    """Minimum cosine similarity over the batch between two models' CLS features (raw, no head or norm)."""
    kwargs = {"with_head": False, "out_norm": False}
    ours, theirs = model(**inputs, **kwargs), other(**inputs, **kwargs)
    return {f"{name}_min_cosine": float(F.cosine_similarity(ours[i].float(), theirs[i].float(), dim=-1).min())
            for i, name in enumerate(("vision", "language"))}  # fmt: skip


def parse_config(spec: str) -> MuskConfig:
    """A preset name, optionally with field changes: ``large`` or ``large/depth=4/img_size=224``."""
    name, *changes = spec.split("/")
    fields = {}
    for change in changes:
        key, value = change.split("=", 1)
        fields[key] = type(getattr(MuskConfig, key))(value)
    return MuskConfig.preset(name, **fields)


def build_pair(cfg: MuskConfig, seed: int = 0) -> tuple[MuskModel, torchscale_reference.ReferenceMusk]:
    """MuskModel with random weights, and the reference sharing those very tensors."""
    torch.manual_seed(seed)
    model = MuskModel(cfg).eval()
    with torch.device("meta"):
        reference = torchscale_reference.ReferenceMusk(cfg)
    reference.load_state_dict(model.state_dict(), strict=True, assign=True)
    return model, reference.eval()


def make_inputs(cfg: MuskConfig, batch: int, text_len: int, seed: int = 0) -> dict:
    """Images (batch, 3, S, S) and token ids framed like the tokenizer's, rows padded to different lengths."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, cfg.img_size, cfg.img_size, generator=g)
    ids = torch.randint(4, 64000, (batch, text_len), generator=g)
    padding = torch.zeros(batch, text_len, dtype=torch.bool)
    for row, used in enumerate(torch.linspace(text_len, max(3, text_len // 5), batch).long().tolist()):
        ids[row, 0], ids[row, used - 1] = 0, 2
        ids[row, used:] = 1
        padding[row, used:] = True
    return {"image": images, "text": ids, "padding_mask": padding}


# -- prototypes of speed-ups for model.py, measured here before anyone changes the model -------------------------


def _fused_qkv_attention(self, x, split, keep):
    """MultiwayAttention.forward with q, k and v of each expert computed by one GEMM against [Wq; Wk; Wv]."""
    b, n, d = x.shape
    h = self.num_heads
    A, B = self._fused_qkv["A"], self._fused_qkv["B"]
    if split >= n:
        qkv = F.linear(x, *A)
    elif split <= 0:
        qkv = F.linear(x, *B)
    else:
        qkv = torch.cat([F.linear(x[:, :split], *A), F.linear(x[:, split:], *B)], dim=1)
    q, k, v = qkv.view(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4)  # each (b, h, n, head_dim)
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    a = a.transpose(1, 2).reshape(b, n, d)
    return self.out_proj(self.inner_attn_ln(a, split), split)


@torch.no_grad()
def prototype_fused_qkv(model: MuskModel) -> MuskModel:
    """Patch every attention of ``model`` (in place, inference only) to use fused q/k/v weights."""
    from fedmusk.musk_model.model import MultiwayAttention

    for module in model.modules():
        if isinstance(module, MultiwayAttention):
            module._fused_qkv = {
                e: (
                    torch.cat([getattr(module, p)._modules[e].weight for p in ("q_proj", "k_proj", "v_proj")]),
                    torch.cat([getattr(module, p)._modules[e].bias for p in ("q_proj", "k_proj", "v_proj")]),
                )
                for e in ("A", "B")
            }
            module.forward = _fused_qkv_attention.__get__(module)
    return model


PROTOTYPES = {"fedmusk_fused_qkv": prototype_fused_qkv}


def image_forward(model, inputs):
    return model(image=inputs["image"])[0]


def text_forward(model, inputs):
    return model(text=inputs["text"], padding_mask=inputs["padding_mask"])[1]


FORWARDS = {"image": image_forward, "text": text_forward}


@torch.no_grad()
def differences(model, reference, inputs) -> dict:
    """Max |fedmusk - reference| of default features and of raw hidden states."""
    out = {}
    for name, kwargs in {
        "default": {},  # CLS, head, L2 norm: what zero-shot uses
        "hidden": {"return_global": False, "with_head": False, "out_norm": False},
    }.items():
        ours = model(**inputs, **kwargs)
        theirs = reference(**inputs, **kwargs)
        out[f"vision_{name}"] = (ours[0] - theirs[0]).abs().max().item()
        out[f"language_{name}"] = (ours[1] - theirs[1]).abs().max().item()
    return out


@torch.no_grad()
def interleaved_throughput(models: dict, forward, inputs, batch: int, repeats: int, min_sample_s: float) -> dict:
    """Items/s of each model: a warm-up, then ``repeats`` rounds in which every model runs once (the order
    alternating from round to round); a sample loops enough calls to last ``min_sample_s``.

    Per model: median and best wall-clock rate, and the median rate per CPU-second of this process (less sensitive
    to other processes taking the cores). Ratios to the reference: of the medians, the median of per-round ratios
    (adjacent runs share the machine's load), and of the CPU-time medians.
    """
    calls = {}
    for name, model in models.items():
        start = time.perf_counter()
        forward(model, inputs)  # warm-up: allocator, oneDNN primitive caches
        elapsed = time.perf_counter() - start
        if elapsed < min_sample_s:
            start = time.perf_counter()
            forward(model, inputs)
            elapsed = time.perf_counter() - start
        calls[name] = max(1, int(min_sample_s / max(elapsed, 1e-6)))
    n_calls = min(calls.values())  # the same work per sample for every model
    wall = {name: [] for name in models}
    cpu = {name: [] for name in models}
    names = list(models)
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(n_calls):
                forward(models[name], inputs)
            wall[name].append(batch * n_calls / (time.perf_counter() - start))
            cpu[name].append(batch * n_calls / (time.process_time() - start_cpu))
    out = {
        name: {
            "median": statistics.median(wall[name]),
            "best": max(wall[name]),
            "per_cpu_s_median": statistics.median(cpu[name]),
            "samples": wall[name],
            "cpu_samples": cpu[name],
        }
        for name in models
    }
    for name in models:
        if name == "reference":
            continue
        suffix = "" if name == "fedmusk" else f"_{name}"
        out[f"speedup{suffix}"] = out[name]["median"] / out["reference"]["median"]
        out[f"speedup_paired{suffix}"] = statistics.median(
            a / b for a, b in zip(wall[name], wall["reference"], strict=True)
        )
        out[f"speedup_cpu{suffix}"] = out[name]["per_cpu_s_median"] / out["reference"]["per_cpu_s_median"]
    return out


# -- peak memory, in a fresh subprocess per measurement ----------------------------------------------------------


def _rss() -> int:
    return psutil.Process().memory_info().rss


@torch.no_grad()
def memory_probe(config: str, impl: str, modality: str, batch: int, text_len: int) -> dict:
    """RSS of the weights and peak extra RSS of one first forward, in this (fresh) process."""
    cfg = parse_config(config)
    before_build = _rss()
    with torch.device("meta"):
        model = MuskModel(cfg) if impl == "fedmusk" else torchscale_reference.ReferenceMusk(cfg)
    model = model.to_empty(device="cpu").eval()
    for p in model.parameters():
        p.zero_()  # touch every page; values do not matter for memory
    inputs = make_inputs(cfg, batch, text_len)
    base = _rss()
    peak, done = [base], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    FORWARDS[modality](model, inputs)
    done.set()
    sampler.join()
    peak[0] = max(peak[0], _rss())
    return {"weights_mib": (base - before_build) / 2**20, "forward_peak_mib": (peak[0] - base) / 2**20}


def measure_memory(config: str, batch: int, text_len: int, threads: int) -> dict:
    out = {}
    for modality in FORWARDS:
        for impl in IMPLS:
            cmd = [sys.executable, __file__, "--memory-probe", config, impl, modality]
            cmd += ["--batch", str(batch), "--text-len", str(text_len), "--threads", str(threads)]
            result = subprocess.run(cmd, capture_output=True, text=True, check=True)
            out[f"{impl}_{modality}"] = json.loads(result.stdout.strip().splitlines()[-1])
    return out


# -- report -------------------------------------------------------------------------------------------------------


def bench_config(config: str, args) -> dict:
    cfg = parse_config(config)
    print(f"[{config}] building both models ...", flush=True)
    model, reference = build_pair(cfg)
    inputs = make_inputs(cfg, args.batch, args.text_len)
    result = {"config": config, "parameters": sum(p.numel() for p in model.parameters())}
    print(f"[{config}] comparing outputs ...", flush=True)
    result["max_abs_diff"] = differences(model, reference, inputs)
    models = {"fedmusk": model, "reference": reference}
    if "auto" in args.precisions:
        from fedmusk.precision import resolve_precision

        resolved = resolve_precision("auto", "cpu")
        models["fedmusk_auto"] = AtPrecision(model, resolved)
        result["auto_resolves_to"] = resolved
        result["auto_vs_float32"] = cosines(models["fedmusk_auto"], model, inputs)
        print(f"[{config}] auto = {resolved} on this CPU; {result['auto_vs_float32']}", flush=True)
    if args.prototypes:
        # a second MuskModel sharing the same parameters, patched; checked against the reference like the first
        for name, patch in PROTOTYPES.items():
            twin = copy.deepcopy(model, memo={id(p): p for p in model.parameters()})
            models[name] = patch(twin)
            result[f"max_abs_diff_{name}"] = differences(models[name], reference, inputs)
    for modality, forward in FORWARDS.items():
        print(f"[{config}] timing {modality} forwards ...", flush=True)
        load = os.getloadavg()[0]
        t = interleaved_throughput(models, forward, inputs, args.batch, args.repeats, args.min_sample_s)
        t["load_average_1min"] = [load, os.getloadavg()[0]]  # before, after: other processes on the machine
        result[f"{modality}_per_s"] = t
    del model, reference, models
    if not args.no_memory:
        print(f"[{config}] peak memory (subprocesses) ...", flush=True)
        result["memory"] = measure_memory(config, args.batch, args.text_len, args.threads)
    return result


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        f"MuskModel vs the torchscale 0.3.0 BEiT3 reference. CPU float32, eval, no_grad; batch {report['batch']}, "
        f"texts of {report['text_len']} tokens (variously padded); {env['threads']} threads, torch {env['torch']}, "
        f"{env['cpu']} ({env['cores']} cores); {report['repeats']} interleaved repetitions after a warm-up.",
        "",
        "| config | max abs diff vision / language (CLS, head, norm) | (all hidden states) | weights MiB "
        "| image forward peak MiB fedmusk / reference | text forward peak MiB fedmusk / reference |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        d, mem = r["max_abs_diff"], r.get("memory")
        cells = ["n/a"] * 3
        if mem:
            cells = [
                f"{mem['fedmusk_image']['weights_mib']:.0f}",
                f"{mem['fedmusk_image']['forward_peak_mib']:.0f} / {mem['reference_image']['forward_peak_mib']:.0f}",
                f"{mem['fedmusk_text']['forward_peak_mib']:.0f} / {mem['reference_text']['forward_peak_mib']:.0f}",
            ]
        lines.append(
            f"| {r['config']} | {d['vision_default']:.1e} / {d['language_default']:.1e} "
            f"| {d['vision_hidden']:.1e} / {d['language_hidden']:.1e} | {' | '.join(cells)} |"
        )
    lines += [
        "",
        "| config | input | model | per s (median) | per s (best) | per CPU-s (median) | vs reference: medians "
        "| per-round ratios (median) | CPU time | load avg before/after |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        for modality in FORWARDS:
            t = r[f"{modality}_per_s"]
            load = "{:.1f} / {:.1f}".format(*t["load_average_1min"])
            for name, stats in t.items():
                if not isinstance(stats, dict):
                    continue
                suffix = "" if name == "fedmusk" else f"_{name}"
                ratios = ["1"] * 3
                if name != "reference":
                    ratios = [f"{t[key + suffix]:.3f}x" for key in ("speedup", "speedup_paired", "speedup_cpu")]
                lines.append(
                    f"| {r['config']} | {modality}s | {name} | {stats['median']:.3g} | {stats['best']:.3g} "
                    f"| {stats['per_cpu_s_median']:.3g} | {' | '.join(ratios)} | {load} |"
                )
    large = next((r for r in report["results"] if r["config"].split("/")[0] == "large"), None)
    if large:
        got = large["image_per_s"]["speedup"]
        verdict = "met" if got >= GOAL_IMAGE_SPEEDUP else "NOT met"
        lines += [
            "",
            f"Goal, >= {GOAL_IMAGE_SPEEDUP}x the reference's image throughput at {large['config']}: {verdict} "
            f"({got:.3f}x by medians, {large['image_per_s']['speedup_paired']:.3f}x by per-round ratios, "
            f"{large['image_per_s']['speedup_cpu']:.3f}x by CPU time).",
        ]
    for r in report["results"]:
        if "speedup_fedmusk_auto" not in r["image_per_s"] or r["config"].split("/")[0] != "large":
            continue  # the goal is MUSK-large's (the tiny model is too small for bf16 to pay off)
        img, txt, cos = r["image_per_s"], r["text_per_s"], r["auto_vs_float32"]
        fast = img["speedup_fedmusk_auto"] >= GOAL_AUTO_SPEEDUP
        close = min(cos.values()) >= GOAL_AUTO_COSINE
        lines += [
            "",
            f"Goal at model.precision=auto ({r['auto_resolves_to']} on this CPU), {r['config']}: >= "
            f"{GOAL_AUTO_SPEEDUP}x the reference's float32 image throughput with CLS cosine >= {GOAL_AUTO_COSINE}: "
            f"{'met' if fast and close else 'NOT met'} ({img['speedup_fedmusk_auto']:.3f}x images by medians, "
            f"{img['speedup_paired_fedmusk_auto']:.3f}x by per-round ratios; texts "
            f"{txt['speedup_fedmusk_auto']:.3f}x; min cosine vision {cos['vision_min_cosine']:.5f}, language "
            f"{cos['language_min_cosine']:.5f}).",
        ]
    lines += [
        "",
        "Peak memory: process RSS (psutil) sampled every 1 ms during the first forward in a fresh "
        "subprocess, minus the RSS just before it; weights: RSS growth from building the model.",
    ]
    return "\n".join(lines) + "\n"




def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="tiny,large", help="comma-separated MuskConfig presets")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timing repetitions per model")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--text-len", type=int, default=100)
    parser.add_argument("--min-sample-s", type=float, default=0.5, help="loop small models to last this long")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--prototypes", action="store_true", help="also time prototype speed-ups (fused q/k/v)")
    parser.add_argument("--precisions", default="float32",
                        help="float32, or float32,auto (fedmusk at model.precision=auto too)")  # fmt: skip
    parser.add_argument("--out-dir", type=Path, default=HERE / "results")
    parser.add_argument("--memory-probe", nargs=3, metavar=("CONFIG", "IMPL", "MODALITY"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.memory_probe:
        print(json.dumps(memory_probe(*args.memory_probe, args.batch, args.text_len)))
        return 0

    report = {
        "batch": args.batch,
        "text_len": args.text_len,
        "repeats": args.repeats,
        "precisions": args.precisions,
        "environment": {
            "torch": torch.__version__,
            "threads": args.threads,
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
        },
        "results": [bench_config(c.strip(), args) for c in args.configs.split(",") if c.strip()],
    }
    table = markdown(report)
    print("\n" + table)
    write_report(args.out_dir, "bench_model", report, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
