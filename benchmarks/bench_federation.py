"""Federation costs: bytes a site exchanges per round, SecAgg+'s time overhead, and how simulation scales with sites.

1. bytes: what one site sends up and receives down per round with MUSK-large (built on the meta device; LoRA applied
   by fedmusk's own apply_lora; the layout counted is fedmusk's ``AdapterLayout`` of the very tensors
   ``adapter_state`` would send, and its ``update_layout`` for each strategy), for configs/musk-large.yaml as it is
   and for FedIT, FFA-LoRA, FedSA-LoRA and RoLoRA, both experts (end-to-end tiles: the vision expert can learn only
   there) or the language expert only, plain and under SecAgg+, against full-model fine-tuning (the
   675,188,737 float32 parameters up and down every round). The tiny demo adapter is counted the same way and
   checked against the payloads measured in section 2's simulations.
2. secagg: tiny-model federations (report-only fusion on a labels-and-reports synthetic cohort) at 3, 5 and 10
   sites, SecAgg+ and plain interleaved in one invocation, median round seconds after round 1; and Flower's SecAgg+
   on its own: a minimal Flower simulation (3 sites, NumPyClient returning a fixed random vector) with the vector
   as long as the tiny adapter and as MUSK-large's adapters, so the protocol's cost at MUSK-large's size is measured
   without training MUSK-large.
3. scale: federations of 10, 30 and 100 tiny sites, 2 rounds (plain by default; SecAgg+ with --scale-modes):
   seconds of the first round (which includes every site's start-up) and of the next, the whole run, peak resident
   memory of the process tree (the simulation and every Ray process), and a straight-line fit of each against the
   number of sites.

Every simulation runs in a child process of this script (its own Ray), sampled for RSS with psutil and killed
with its whole process tree at the time cap; every child process is checked to be gone afterwards (``_child.py``).
Section 1 lives in ``_federation_bytes.py``, sections 2 and 3 in ``_federation_runs.py``, the tables and plots in
``_federation_tables.py``; this script parses the command line and merges the sections into one report.

Usage: python benchmarks/bench_federation.py [--quick] [--fresh] [--sections bytes,secagg,vector,scale]
Results merge into benchmarks/results/bench_federation.json (per section; --fresh drops the earlier rows of the
sections it runs), bench_federation.md and the plots federation_{bytes,secagg,scale}.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from _child import child_main  # noqa: E402 - sibling modules in benchmarks/
from _federation_bytes import VARIANTS, bench_bytes
from _federation_runs import bench_scale, bench_secagg, bench_vector, child_fedmusk, child_vector, growth
from _federation_tables import markdown, plot
from _report import cpu_name, write_report

HERE = Path(__file__).resolve().parent
GOAL_SECAGG_OVERHEAD = 0.15  # issue: SecAgg+ <= ~15% more time per round (Flower reports about 13%)


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


# -- main --------------------------------------------------------------------------------------------------------------


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv=None) -> int:
    if argv is None and len(sys.argv) >= 2 and sys.argv[1] == "--child":
        return child_main(sys.argv[2:], {"fedmusk": child_fedmusk, "vector": child_vector})
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="reduced run: fewer sites, rounds and vectors")
    parser.add_argument("--sections", default="bytes,secagg,vector,scale")
    parser.add_argument("--fresh", action="store_true", help="drop earlier rows of the sections this run measures")
    parser.add_argument("--secagg-sites", type=ints, default=None, help="default 3,5,10 (quick: 3,5)")
    parser.add_argument("--scale-sites", type=ints, default=None, help="default 10,30,100 (quick: 10,30)")
    parser.add_argument("--scale-modes", default="plain", help="plain, or plain,secure (both modes)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of the SecAgg+ runs (default 6, quick 3)")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved SecAgg+/plain pairs per setting")
    parser.add_argument("--vectors", default=None,
                        help="section 2b's lengths: tiny and VARIANTS keys (default tiny,fedit-language,fedit-both; "
                             "quick: tiny,fedit-both)")  # fmt: skip
    parser.add_argument("--cases", type=int, default=8, help="cases per site")
    parser.add_argument("--cap-s", type=float, default=None, help="time cap per simulation (default 600, quick 300)")
    parser.add_argument("--local-s", type=float, nargs="*", default=None,
                        help="assumed local training seconds per round for MUSK-large on a GPU")
    parser.add_argument("--out-dir", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    q = args.quick
    secagg_sites = args.secagg_sites or ([3, 5] if q else [3, 5, 10])
    scale_sites = args.scale_sites or ([10, 30] if q else [10, 30, 100])
    scale_modes = [m == "secure" for m in args.scale_modes.split(",")]
    rounds = args.rounds or (3 if q else 6)
    vectors = (args.vectors or ("tiny,fedit-both" if q else "tiny,fedit-language,fedit-both")).split(",")
    cap_s = args.cap_s or (300.0 if q else 600.0)
    sections = args.sections.split(",")

    import flwr
    import torch

    torch.set_num_threads(1)
    json_path = args.out_dir / "bench_federation.json"
    report = json.loads(json_path.read_text()) if json_path.exists() else {}  # sections merge across runs
    for key in ("quick", "rounds_note"):
        report.pop(key, None)  # fields of the format before each section carried its own settings
    report["environment"] = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
                             "flwr": flwr.__version__}  # fmt: skip
    earlier = (lambda name: None) if args.fresh else report.get  # noqa: E731
    if "bytes" in sections or "vector" in sections:
        report["bytes"] = {**bench_bytes(), "measured": {"date": _now()}}
    with tempfile.TemporaryDirectory(prefix="fmb-", dir="/tmp") as tmp_name:
        tmp = Path(tmp_name)
        need = max([*(secagg_sites if "secagg" in sections else []), *(scale_sites if "scale" in sections else []), 0])
        roots = []
        if need:
            from fedmusk.data.synth.cohort import synthesize_cohort

            roots = synthesize_cohort(tmp / "cohort", sites=need, cases_per_site=args.cases, seed=0, progress=False,
                                      images=False, pretrain_tiles=0, pretrain_reports=2)  # fmt: skip
        if "secagg" in sections:
            before = _load()
            runs = _merge(earlier("secagg"), bench_secagg(roots, secagg_sites, rounds, args.repeats, cap_s, tmp),
                          ("sites",))  # fmt: skip
            report["secagg"] = {"cases_per_site": args.cases, "rounds": rounds, "repeats": args.repeats, "runs": runs,
                                "measured": {"date": _now(), "load_before": before, "load_after": _load()}}  # fmt: skip
        if "vector" in sections:
            before = _load()
            by_key = {v["key"]: v for v in report["bytes"]["variants"]}
            lengths = {("tiny demo adapter (report fusion)" if k == "tiny" else f"MUSK-large, {VARIANTS[k][0]}"):
                       (report["bytes"]["tiny"] if k == "tiny" else by_key[k])["secure_vector_len"] for k in vectors}
            local = args.local_s or [30.0, 120.0]
            runs = bench_vector(lengths, 3, rounds, args.repeats, cap_s, tmp)
            report["vector"] = {"sites": 3, "rounds": rounds, "repeats": args.repeats, "runs": runs,
                                "assumptions": [{"local_s": s, "what": _assumption_text(s)} for s in local],
                                "measured": {"date": _now(), "load_before": before, "load_after": _load()}}  # fmt: skip
        if "scale" in sections:
            before = _load()
            runs = _merge(earlier("scale"), bench_scale(roots, scale_sites, scale_modes, 2, cap_s, tmp),
                          ("sites", "secure"))  # fmt: skip
            report["scale"] = {"cases_per_site": args.cases, "rounds": 2, "runs": runs,
                               "measured": {"date": _now(), "load_before": before, "load_after": _load()}}  # fmt: skip
    if report.get("scale"):
        report["scale"]["growth"] = growth(report["scale"]["runs"])  # over every row kept, whichever run made it
    table = markdown(report)
    print(table)
    write_report(args.out_dir, "bench_federation", report, table, indent=1)
    for path in plot(report, args.out_dir):
        print(f"wrote {path}")
    return 0


def _merge(old: dict | None, new: list[dict], key: tuple[str, ...]) -> list[dict]:
    """Earlier runs of a section whose key this run did not measure, then this run's (sorted by the key)."""
    done = {tuple(r[k] for k in key) for r in new}
    kept = [r for r in (old or {}).get("runs", []) if tuple(r.get(k) for k in key) not in done]
    return sorted(kept + new, key=lambda r: (r["sites"], r["secure"]))


def _assumption_text(seconds: float) -> str:
    if seconds == 30.0:
        return ("one local epoch of 100 cases x a bag of 16 tiles (1,600 tiles) at ~100 tiles/s of MUSK-large LoRA "
                "training on one GPU (bf16, checkpointing), plus ~15 s of evaluation and loading")
    if seconds == 120.0:
        return "2 local epochs of 400 cases x 16 tiles at ~120 tiles/s, plus evaluation"
    return "user-given local training time per round"


if __name__ == "__main__":
    sys.exit(main())
