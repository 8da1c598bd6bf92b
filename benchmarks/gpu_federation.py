"""One federated round of 3 simulated sites with MUSK-large on one GPU, through ``fedmusk simulate``'s own code.

fedmusk refuses a MUSK-large without the release's files (``fedmusk.config.check_model_config``), so this script
makes stand-ins first: a seeded random MUSK-large written as ``model.safetensors`` (the release's tensor names and
shapes; speed does not depend on the values) and fedmusk's tiny SentencePiece tokenizer written as a ``.spm`` file
(ids stay far below MUSK's vocabulary). Then a small synthetic cohort (3 sites, --cases each, 384 px tiles) and
``run_simulation_from_config`` with configs/musk-large.yaml, ``device=cuda``, SecAgg+ on (the default), one outcome
round, one local epoch: every site starts (loads the checkpoint onto the GPU, ``fedmusk prepare`` embeds its tiles
with the frozen model for cached features, or not for --features end2end), trains, sends its update, evaluates;
then the driver tests the final adapter on every site.

Reported: seconds of each stage (stand-ins, cohort, the simulation; the round as the coordinator timed it, which
includes every site's start-up), bytes per site, the final test metrics, and the peak GPU memory in use on the
device (nvidia-smi, sampled every 0.5 s: the sites run in Ray worker processes, so torch's own counters in this
process would not see them). Every process this script starts is stopped before it exits.

Usage (one GPU; about 2 minutes on an H100): python benchmarks/gpu_federation.py [--features cached] [--cases 10]
Smoke test anywhere (tiny config, 96 px tiles, on the CPU): python benchmarks/gpu_federation.py --smoke
Writes the JSON to --out (default benchmarks/results/gpu_federation.json; gpu.sh collects it into results/gpu.json).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def write_random_weights(preset: str, path: Path, device: str) -> dict:
    """A seeded random MuskModel's state dict as safetensors, built on ``device`` (seconds on a GPU)."""
    import torch
    from safetensors.torch import save_file

    from fedmusk.musk_model import MuskConfig, MuskModel

    torch.manual_seed(0)
    with torch.device(device):
        model = MuskModel(MuskConfig.preset(preset))
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    del model
    if device == "cuda":
        torch.cuda.empty_cache()  # this process tests the final adapter on the same GPU later
    save_file(state, str(path))
    return {"tensors": len(state), "parameters": sum(v.numel() for v in state.values()), "bytes": path.stat().st_size}


class GpuMemorySampler:
    """Peak memory in use on GPU 0 (MiB) while running, from nvidia-smi; None where there is no nvidia-smi."""

    def __init__(self, interval_s: float = 0.5):
        self.interval_s, self.peak_mib, self._stop = interval_s, None, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                      "--id=0"], capture_output=True, text=True, timeout=10)  # fmt: skip
                used = float(out.stdout.strip().splitlines()[0])
                self.peak_mib = used if self.peak_mib is None else max(self.peak_mib, used)
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                return
            self._stop.wait(self.interval_s)

    def __enter__(self):
        if shutil.which("nvidia-smi"):
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def stop_descendants() -> int:
    """Terminate (then kill) every process this one started that is still alive (Ray's workers and helpers);
    returns how many there were."""
    import psutil

    children = psutil.Process().children(recursive=True)
    for p in children:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(children, timeout=5)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    return len(children)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", choices=["cached", "end2end"], default="cached")
    parser.add_argument("--cases", type=int, default=10, help="cases per site")
    parser.add_argument("--slide-px", type=int, default=None, help="slide side at 0.5 um/px (default 1536; smoke 384)")
    parser.add_argument("--smoke", action="store_true", help="tiny config on the CPU: checks the pipeline")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep the stand-ins and cohort here")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "gpu_federation.json")
    args = parser.parse_args(argv)

    import torch

    if not args.smoke and not torch.cuda.is_available():
        sys.exit("no CUDA GPU here; run with --smoke to check the script on the CPU")
    preset, device = ("tiny", "cpu") if args.smoke else ("large", "cuda")
    slide_px = args.slide_px or (384 if args.smoke else 1536)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="fmgpu-"))
    work.mkdir(parents=True, exist_ok=True)
    ray_tmp = Path(tempfile.mkdtemp(prefix="fmray", dir="/tmp"))  # Ray's socket paths must stay short
    os.environ.update(RAY_TMPDIR=str(ray_tmp), FLWR_HOME=str(work / "flwr"), RAY_USAGE_STATS_ENABLED="0",
                      FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")  # fmt: skip

    from fedmusk.config import load_config
    from fedmusk.data.synth.cohort import synthesize_cohort
    from fedmusk.federation import run_simulation_from_config
    from fedmusk.musk_model.tokenizer import train_tiny_tokenizer

    stages: dict[str, float] = {}
    start = time.perf_counter()
    weights = write_random_weights(preset, work / "model.safetensors", device)
    stages["random weights written"] = time.perf_counter() - start
    t = time.perf_counter()
    tokenizer = train_tiny_tokenizer(work / "tokenizer.spm")
    stages["tokenizer written"] = time.perf_counter() - t
    t = time.perf_counter()
    tile_px = 96 if args.smoke else 384
    roots = synthesize_cohort(work / "cohort", sites=3, cases_per_site=args.cases, tile_px=tile_px, slide_px=slide_px,
                              pretrain_tiles=0, pretrain_reports=2, progress=False, overwrite=True)  # fmt: skip
    stages["cohort synthesised"] = time.perf_counter() - t
    files = [REPO / "configs" / ("demo.yaml" if args.smoke else "musk-large.yaml")]
    overrides = [
        f"device={device}", f"model.weights={work / 'model.safetensors'}", f"model.tokenizer={tokenizer}",
        f"train.features={args.features}", "train.bootstrap=0", "data.max_tiles_per_slide=16",
        # cached features come from the frozen vision expert: adapt the language expert (as configs/demo.yaml does)
        "train.lora.experts=[B]" if args.features == "cached" else "train.lora.experts=[A,B]",
        "federation.pretrain_rounds=0", "federation.rounds=1", "federation.local_epochs=1",
        "federation.min_sites=3", "federation.min_replies=3", "federation.secure_aggregation=true",
        "federation.wait_for_sites_s=300", "federation.reply_timeout_s=600",
    ]  # fmt: skip
    cfg = load_config(files, overrides)
    out_dir = work / "run"
    shutil.rmtree(out_dir, ignore_errors=True)
    t = time.perf_counter()
    error = None
    try:
        with GpuMemorySampler() as gpu:
            summary = run_simulation_from_config(cfg, roots, out_dir)
    except Exception as err:  # noqa: BLE001 - recorded in the report, and the exit status says it failed
        summary, error = None, f"{type(err).__name__}: {err}"[-2000:]
    stages["simulation (Ray, sites, 1 round, final test)"] = time.perf_counter() - t
    leftovers = stop_descendants()
    shutil.rmtree(ray_tmp, ignore_errors=True)
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)

    rounds = (summary or {}).get("rounds", [])
    report = {
        "preset": preset, "device": device, "features": args.features, "sites": 3, "cases_per_site": args.cases,
        "tile_px": tile_px, "slide_px": slide_px, "max_tiles_per_slide": 16, "secure_aggregation": True,
        "device_name": torch.cuda.get_device_name(0) if device == "cuda" else "CPU", "torch": torch.__version__,
        "weights": weights, "stages_s": stages, "round_s": rounds[0]["seconds"] if rounds else None,
        "bytes_up_per_site": rounds[0]["bytes_up_per_client"] if rounds else None,
        "bytes_down_per_site": rounds[0]["bytes_down"] / 3 if rounds else None,
        "test_pooled": (summary or {}).get("test", {}).get("pooled"), "peak_gpu_mib": gpu.peak_mib,
        "seconds": time.perf_counter() - start, "stopped_processes": leftovers, "error": error,
    }  # fmt: skip
    for name, seconds in stages.items():
        print(f"{name}: {seconds:.1f} s", flush=True)
    print(f"round 1: {report['round_s']} s; peak GPU memory {report['peak_gpu_mib']} MiB; error: {error}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 1 if error else 0


if __name__ == "__main__":
    sys.exit(main())
