"""Collect gpu.sh's three parts (gpu_forward, gpu_train, gpu_federation) into results/gpu.json and results/gpu.md.

Usage (gpu.sh calls it): python benchmarks/gpu_report.py PARTS_DIR [--name gpu|gpu_smoke] [--out-dir DIR]
PARTS_DIR holds forward.json, train.json (gpu_train.py's report), federation.json and steps.tsv (one line per step:
name, seconds, exit status). A missing or failed part is reported as such.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from _report import write_report  # noqa: E402 - sibling module in benchmarks/

HERE = Path(__file__).resolve().parent


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _f(v, digits=1) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def markdown(report: dict) -> str:
    fwd, train, fed = report.get("forward"), report.get("train"), report.get("federation")
    device = next((p["device_name"] for p in (fwd, train, fed) if p and p.get("device_name")), "?")
    lines = [f"gpu.sh on {device} (torch {next((p['torch'] for p in (fwd, train, fed) if p), '?')}), "
             f"{report['seconds']:.0f} s in all.", "", "| step | seconds | exit status |", "|---|---|---|"]  # fmt: skip
    lines += [f"| {s['step']} | {s['seconds']:.0f} | {s['status']} |" for s in report["steps"]]
    lines += ["", "**Forward throughput** (MuskModel, random weights, "
              + ("not run" if not fwd else f"MUSK-{fwd['preset']}, {fwd['dtype']}, batch {fwd['batch']}, "
                 f"{fwd['img_size']} px images, {fwd['text_len']}-token texts, median of {fwd['steps']} calls)"), ""]
    if fwd:
        lines += ["| input | per s | ms per batch | peak GiB |", "|---|---|---|---|"]
        lines += [f"| {r['input']} | {_f(r['per_s'])} {r['unit']} | {_f(1e3 * r['median_s'])} | "
                  f"{_f(r['peak_gib'], 2) if r['peak_gib'] is not None else 'n/a'} |" for r in fwd["results"]]
    lines += ["", "**LoRA training** (gpu_train.py: bag of K tiles through the vision expert with LoRA, MIL, "
              "survival loss, backward, AdamW; " + ("not run)" if not train else
              f"MUSK-{train['preset']}, {train['dtype']}, checkpointing {'on' if train['checkpointing'] else 'off'})"),
              ""]  # fmt: skip
    if train:
        lines += ["| bag K | step s | tiles/s | peak GiB |", "|---|---|---|---|"]
        for r in train["bags"]:
            if "error" in r:
                lines.append(f"| {r['bag']} | {r['error']} | | |")
            else:
                lines.append(f"| {r['bag']} | {r['step_s']:.3f} | {_f(r['tiles_per_s'])} | "
                             f"{_f(r['peak_gib'], 2) if r['peak_gib'] is not None else 'n/a'} |")  # fmt: skip
        e = train["embedding"]
        lines.append(f"\nFrozen feature extraction (prepare), batch {e['batch']}: {_f(e['tiles_per_s'])} tiles/s.")
    lines += ["", "**One federated round** (gpu_federation.py: `run_simulation_from_config`, 3 sites, SecAgg+, "
              + ("not run)" if not fed else
                 f"MUSK-{fed['preset']} with random weights from a file, {fed['features']} features, "
                 f"{fed['cases_per_site']} cases per site, {fed['tile_px']} px tiles, device {fed['device']})"), ""]
    if fed:
        lines += ["| stage | seconds |", "|---|---|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in fed["stages_s"].items()]
        lines += [f"| round 1 as the coordinator timed it (includes every site's start-up) | {_f(fed['round_s'])} |",
                  "", f"Bytes per site: up {_f(fed['bytes_up_per_site'], 0)}, down "
                  f"{_f(fed['bytes_down_per_site'], 0)}; "
                  f"peak GPU memory in use {_f(fed['peak_gpu_mib'], 0)} MiB (nvidia-smi); "
                  f"processes stopped afterwards: {fed['stopped_processes']}."]  # fmt: skip
        if fed.get("error"):
            lines.append(f"\nError: `{fed['error'].strip().splitlines()[-1][:300]}`")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("parts", type=Path)
    parser.add_argument("--name", default="gpu")
    parser.add_argument("--out-dir", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    steps = []
    for line in (args.parts / "steps.tsv").read_text().splitlines() if (args.parts / "steps.tsv").exists() else []:
        name, seconds, status = line.split("\t")
        steps.append({"step": name, "seconds": float(seconds), "status": int(status)})
    report = {"steps": steps, "seconds": sum(s["seconds"] for s in steps),
              "forward": _read(args.parts / "forward.json"), "train": _read(args.parts / "train.json"),
              "federation": _read(args.parts / "federation.json")}  # fmt: skip
    table = markdown(report)
    print(table)
    write_report(args.out_dir, args.name, report, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
