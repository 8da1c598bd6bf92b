"""One results page from every benchmark's JSON: results/summary.md, written to be pasted into the README.

Reads benchmarks/results/{bench_model, bench_data, bench_train, bench_federation, bench_utility, bench_deployment,
gpu, gpu_train}.json
(whichever exist: a missing one is reported as "not run") and writes the key table of each area, every goal from
the issues as met / NOT met with its number, links to the plots, the machine and its load, and the commands that
reproduce each number. It re-runs nothing.

Usage: python benchmarks/report.py [--results benchmarks/results] [--out benchmarks/results/summary.md]
Links are relative to the repository root (the page is meant for the README's Results section). The page and its
number formats are in ``_summary_page.py``, the federation's areas in ``_summary_federation.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from _summary_federation import communication, scale, secagg  # noqa: E402 - sibling modules in benchmarks/
from _summary_page import LINK, Page, fmt, fmt_load, fmt_num

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

GOAL_MODEL_SPEEDUP = 1.3
GOAL_AUTO_SPEEDUP = 2.0  # model.precision=auto (bf16 where the CPU has it) against the float32 reference
GOAL_AUTO_COSINE = 0.999
GOAL_LOADER_RATIO = 2.0


# -- areas -------------------------------------------------------------------------------------------------------------


def model(page: Page, d: dict | None) -> None:
    lines = ["### Model: MuskModel vs the torchscale BEiT-3 reference (`bench_model.py`)", ""]
    large = next((r for r in (d or {}).get("results", []) if r["config"].split("/")[0] == "large"), None)
    if not d:
        page.sections.append(lines + ["Not run.", ""])
        page.goal("model", f"MUSK-large images/s >= {GOAL_MODEL_SPEEDUP}x torchscale (CPU, float32, batch 4)", "-",
                  None)
        return
    lines += [f"CPU float32, batch {d['batch']}, {d['text_len']}-token texts, {d['environment']['threads']} threads, "
              f"median of {d['repeats']} interleaved repetitions; the very same weights in both models.", "",
              "| config | input | fedmusk per s | reference per s | ratio (medians / per-round / CPU time) | "
              "max abs diff (CLS, head, norm) | forward peak MiB fedmusk / reference |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in d["results"]:
        for modality, key in (("images", "image"), ("texts", "text")):
            t, mem = r[f"{key}_per_s"], r.get("memory") or {}
            m_f, m_r = mem.get(f"fedmusk_{key}"), mem.get(f"reference_{key}")
            peak = f"{m_f['forward_peak_mib']:.0f} / {m_r['forward_peak_mib']:.0f}" if m_f and m_r else "-"
            diff = r["max_abs_diff"]["vision_default" if key == "image" else "language_default"]
            rates = f"{fmt_num(t['fedmusk']['median'])} | {fmt_num(t['reference']['median'])}"
            lines.append(f"| {r['config']} | {modality} | {rates}"
                         f" | {t['speedup']:.2f}x / {t['speedup_paired']:.2f}x / {t['speedup_cpu']:.2f}x | {diff:.1e} "
                         f"| {peak} |")  # fmt: skip
            if "fedmusk_auto" in t:  # the same model at model.precision=auto, against the float32 reference
                cos = r["auto_vs_float32"]["vision_min_cosine" if key == "image" else "language_min_cosine"]
                lines.append(f"| {r['config']}, precision auto ({r['auto_resolves_to']}) | {modality} | "
                             f"{fmt_num(t['fedmusk_auto']['median'])} | {fmt_num(t['reference']['median'])} | "
                             f"{t['speedup_fedmusk_auto']:.2f}x / {t['speedup_paired_fedmusk_auto']:.2f}x / "
                             f"{t['speedup_cpu_fedmusk_auto']:.2f}x | min cosine to float32 {cos:.5f} | - |")  # fmt: skip
    page.sections.append(lines + ["", f"Details: [{LINK}/bench_model.md]({LINK}/bench_model.md).", ""])
    if large:
        s = large["image_per_s"]
        name = "MUSK-large" if large["config"] == "large" else f"MUSK-large ({large['config']})"
        page.goal("model", f"{name} images/s >= {GOAL_MODEL_SPEEDUP}x torchscale (CPU, float32, batch 4)",
                  f"{s['speedup']:.3f}x (medians; {s['speedup_paired']:.3f}x per-round, {s['speedup_cpu']:.3f}x by "
                  "CPU time)", s["speedup"] >= GOAL_MODEL_SPEEDUP)  # fmt: skip
        page.goal("model", f"identical outputs (max abs diff of CLS + head + norm, {large['config']})",
                  f"{max(large['max_abs_diff']['vision_default'], large['max_abs_diff']['language_default']):.1e}",
                  max(large["max_abs_diff"]["vision_default"], large["max_abs_diff"]["language_default"]) < 1e-4)
        if "speedup_fedmusk_auto" in s:
            cos = min(large["auto_vs_float32"].values())
            page.goal("model", f"{name} images/s at model.precision=auto >= {GOAL_AUTO_SPEEDUP}x torchscale "
                      f"float32, CLS cosine >= {GOAL_AUTO_COSINE} (CPU, batch 4)",
                      f"{s['speedup_fedmusk_auto']:.3f}x (medians; {s['speedup_paired_fedmusk_auto']:.3f}x per-round, "
                      f"{s['speedup_cpu_fedmusk_auto']:.3f}x by CPU time), "
                      f"auto = {large['auto_resolves_to']}, min cosine {cos:.5f}",
                      s["speedup_fedmusk_auto"] >= GOAL_AUTO_SPEEDUP and cos >= GOAL_AUTO_COSINE)  # fmt: skip
    loads = [r[f"{k}_per_s"].get("load_average_1min") for r in d["results"] for k in ("image", "text")]
    loads = [x for x in loads if x]
    page.machine("bench_model.py", {**d["environment"], **({"load_before": round(min(x[0] for x in loads), 1),
                                                            "load_after": round(max(x[1] for x in loads), 1)}
                                                           if loads else {})})  # fmt: skip


def data(page: Page, d: dict | None) -> None:
    lines = ["### Tile loading vs the model (`bench_data.py`)", ""]
    if not d:
        page.sections.append(lines + ["Not run.", ""])
        page.goal("data", f"loader >= {GOAL_LOADER_RATIO:g}x the tiny model's tiles/s (CPU)", "-", None)
        return
    workers = [str(w) for w in d["workers"]]
    models = {}
    for m in d["models"]:
        if m["name"] not in models or m["median"] > models[m["name"]]["median"]:
            models[m["name"]] = m
    lines += ["Loader: `iter_tile_batches` (what `fedmusk prepare` runs), batches of 32, best of in-process and "
              f"{', '.join(w for w in workers if w != '0')} worker processes (medians of {d['repeats']}); model: raw "
              "CLS features, float32, no_grad, at its faster thread count.", "",
              "| slide | format | tile px | loader tiles/s (best setting) | model tiles/s | loader / model |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    best_tiny = []
    for r in d["loader"]:
        w = max(workers, key=lambda k: r["rates"][k]["median"])
        m = models.get(r["tiling"])
        ratio = r.get("ratio", {}).get(w)
        if r["tiling"] == "tiny" and ratio is not None:
            best_tiny.append((ratio, f"{r['slide']} {r['format']}"))
        lines.append(f"| {r['slide']} | {r['format']} | {r['tile_px']} | {r['rates'][w]['median']:,.0f} "
                     f"({'in-process' if w == '0' else w + ' workers'}) | {fmt_num(m['median'])} | "
                     f"{fmt(ratio, 2 if ratio is None or ratio < 100 else 0)}x |" if m else "| - | - |")  # fmt: skip
    page.sections.append(lines + ["", f"Details (every worker setting, the prepare pipeline): "
                                  f"[{LINK}/bench_data.md]({LINK}/bench_data.md).", ""])  # fmt: skip
    if best_tiny:
        low, where = min(best_tiny)
        page.goal("data", f"loader >= {GOAL_LOADER_RATIO:g}x the tiny model's tiles/s (CPU)",
                  f"lowest {low:.2f}x ({where}), highest {max(best_tiny)[0]:.2f}x", low >= GOAL_LOADER_RATIO)
    page.machine("bench_data.py", d["environment"])


def train(page: Page, d: dict | None) -> None:
    lines = ["### Outcome training throughput, tiny model on CPU (`bench_train.py`)", ""]
    if not d:
        page.sections.append(lines + ["Not run.", ""])
        return
    c = d["cohort"]
    lines += [f"`TrainingSession` (what a federated site runs), {c['sites']} synthetic sites x {c['cases_per_site']} "
              f"cases, {d['environment']['threads']} torch thread(s).", "",
              "| features | set-up s (prepare) | cases/s | slides/s | tiles/s |", "|---|---|---|---|---|"]
    for r in d["results"]:
        p = r["per_s"]
        lines.append(f"| {r['mode']} | {r['setup_s']:.1f} | {p['cases']:.1f} | {p['slides']:.1f} | {p['tiles']:,.0f} |")
    page.sections.append(lines + ["", f"Details: [{LINK}/bench_train.md]({LINK}/bench_train.md).", ""])
    page.machine("bench_train.py", d["environment"])



def utility_extra(page: Page, main: dict | None, quick: dict | None) -> None:
    """Strategies that only a reduced run (``bench_utility.py --quick ...``) measured: its pooled table and goals,
    labelled with its seeds, beside the main run's."""
    if not quick:
        return
    measured = set((main or {}).get("summary", {}).get("pooled", {}))
    pooled = quick.get("summary", {}).get("pooled", {})
    new = [k for k in pooled if k not in measured]
    if not new:
        return
    st = quick.get("settings", {})
    seeds = ", ".join(map(str, st.get("seeds", [])))
    names = {"centralized": "centralized (all sites pooled)", "fedit": "FedIT", "ffa": "FFA-LoRA",
             "fedsa": "FedSA-LoRA", "rolora": "RoLoRA"}  # fmt: skip
    lines = [f"A reduced run measured {', '.join(names.get(k, k) for k in new)} beside the others (`bench_utility.py "
             f"--quick` with the settings in the details; seed {seeds} only, so no intervals): pooled test "
             f"{st.get('metric', 'c_index')}.", "", "| model | pooled test |", "|---|---|"]  # fmt: skip
    lines += [f"| {names.get(k, k)} | {fmt(t.get('mean'), 3)} |" for k, t in pooled.items()]
    page.sections[-1][-1:-1] = ["", *lines, "", f"Details: [{LINK}/bench_utility_quick.md]"
                                f"({LINK}/bench_utility_quick.md)."]  # fmt: skip
    for g in quick.get("goals", []):
        if g.get("goal") == 4 or any(names.get(k, k) in g["what"] for k in new):  # 4: no site below its local model
            page.goal("utility", f"{g['what']} (seed {seeds} only)", g["numbers"], g["met"])


def utility(page: Page, d: dict | None) -> None:
    lines = ["### Utility: federated vs centralized vs each site alone (`bench_utility.py`)", ""]
    if not d:
        page.sections.append(lines + ["Not run.", ""])
        for what in ("federated within 1% (relative) of centralized", "every site better federated than alone",
                     "FFA-LoRA >= FedIT"):
            page.goal("utility", what, "-", None)
        return
    st, s = d.get("settings", {}), d.get("summary", {})
    metric = "C-index" if st.get("task", "survival") == "survival" else "AUROC"
    seeds = st.get("seeds", [])
    lines += [f"Test {metric} on the pooled test cases, mean over seeds {', '.join(map(str, seeds))} [95% "
              "t-interval]; tiny MUSK, cached features, SecAgg+ for the federations.", "",
              f"| model | pooled test {metric} |", "|---|---|"]  # fmt: skip
    names = {"centralized": "centralized (all sites pooled)", "fedit": "FedIT", "ffa": "FFA-LoRA",
             "fedsa": "FedSA-LoRA", "rolora": "RoLoRA"}  # fmt: skip
    for key, t in (s.get("pooled") or {}).items():
        ci = t.get("ci")
        interval = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
        lines.append(f"| {names.get(key, key)} | {fmt(t.get('mean'), 3)}{interval} |")
    for p in d.get("plots") or []:
        name = Path(p).name
        lines += ["", f"![{name}]({LINK}/{name})"]
    page.sections.append(lines + ["", f"Details (per site, per seed, the sites' profiles): "
                                  f"[{LINK}/bench_utility.md]({LINK}/bench_utility.md).", ""])  # fmt: skip
    for g in d.get("goals", []):
        page.goal("utility", g["what"], g["numbers"], g["met"])
    page.machine("bench_utility.py", d.get("environment"), f"the run took {d['wall_s'] / 60:.0f} min" if "wall_s" in d
                 else "")


def gpu(page: Page, g: dict | None, train_only: dict | None, smoke: dict | None) -> None:
    lines = ["### On one GPU (`benchmarks/gpu.sh`)", ""]
    if not g and not train_only:
        checked = ("" if not smoke else f" The script's smoke test (`benchmarks/gpu.sh --smoke`: the same three steps "
                   f"with the tiny model on the CPU) passed in {smoke['seconds']:.0f} s: "
                   f"[{LINK}/gpu_smoke.md]({LINK}/gpu_smoke.md).")  # fmt: skip
        page.sections.append(lines + ["Not run yet: no GPU was available where these results were measured. Run "
                                      "`benchmarks/gpu.sh` on a machine with one CUDA GPU (under 5 minutes on an "
                                      "H100)." + checked, ""])  # fmt: skip
        return
    if g:
        fwd, tr, fed = g.get("forward"), g.get("train"), g.get("federation")
        lines += ["| measure | result |", "|---|---|"]
        if fwd:
            for r in fwd["results"]:
                lines.append(f"| MUSK-{fwd['preset']} forward, {fwd['dtype']}, batch {fwd['batch']}, {r['input']} | "
                             f"{r['per_s']:,.0f} {r['unit']}/s" + (f", peak {r['peak_gib']:.1f} GiB" if r["peak_gib"]
                                                                    else "") + " |")  # fmt: skip
        for r in (tr or {}).get("bags", []):
            if "error" not in r:
                lines.append(f"| LoRA training, bag of {r['bag']} tiles ({tr['dtype']}, checkpointing) | "
                             f"{r['tiles_per_s']:,.0f} tiles/s" + (f", peak {r['peak_gib']:.1f} GiB" if r["peak_gib"]
                                                                   else "") + " |")  # fmt: skip
        if fed:
            lines.append(f"| one federated round, 3 sites, MUSK-{fed['preset']}, {fed['features']} features, SecAgg+ "
                         f"| {fmt(fed['round_s'], 1)} s round (with site start-up), "
                         f"{fmt(fed['stages_s'].get('simulation (Ray, sites, 1 round, final test)'), 0)} s in all; "
                         f"peak GPU memory {fmt(fed['peak_gpu_mib'], 0)} MiB |")  # fmt: skip
        lines += ["", f"gpu.sh took {g['seconds']:.0f} s. Details: [{LINK}/gpu.md]({LINK}/gpu.md)."]
        device = next((p.get("device_name") for p in (fwd, tr, fed) if p), "?")
        page.machines.append(f"- `gpu.sh`: {device}")
    elif train_only:
        lines += [f"Only `gpu_train.py` was run: see [{LINK}/gpu_train.md]({LINK}/gpu_train.md)."]
    page.sections.append(lines + [""])


def deployment(page: Page, d: dict | None) -> None:
    lines = ["### A deployed round vs the same round simulated (`bench_deployment.py`)", ""]
    if not d:
        page.sections.append(lines + ["Not run.", ""])
        return
    dep, sim = d["deployed_round_s"], d["simulated_round_s"]
    lines += [f"3 tiny 8-case sites, SecAgg+, {d['rounds']} rounds, on loopback: `fedmusk server` (TLS, node "
              "authentication, the Fleet proxy) and three `fedmusk client` daemons (SuperNode and site worker), "
              "against `fedmusk simulate` over the same sites, in one run.", "",
              "| | first round (s) | later rounds, median (s) |", "|---|---|---|",
              f"| deployed | {dep['first']:.1f} | {dep['later_median']:.1f} |",
              f"| simulated | {sim['first']:.1f} | {sim['later_median']:.1f} |", "",
              f"Model builds per site in the deployed run: {d['deployed']['model_builds']}.", "",
              f"Details (seconds per message and where they go): [{LINK}/bench_deployment.md]"
              f"({LINK}/bench_deployment.md).", ""]  # fmt: skip
    page.sections.append(lines)
    page.goal("deployment", f"a deployed SecAgg+ round of tiny sites in at most {d['goal_round_s']:g} s",
              f"{dep['later_median']:.1f} s (simulated {sim['later_median']:.1f} s, x{d['ratio_later_rounds']:.1f})",
              d["goal_met"])  # fmt: skip
    page.goal("deployment", "one model build per site per run, not one per message",
              ", ".join(f"{k}: {v}" for k, v in d["deployed"]["model_builds"].items()), d["builds_goal_met"])
    page.machines.append(f"- `bench_deployment.py`: {d['machine']}, {d['cores']} cores, 1-min load average "
                         f"{fmt_load(d['load_before'])} before, {fmt_load(d['load_after'])} after")  # fmt: skip


# -- the page ----------------------------------------------------------------------------------------------------------


COMMANDS = """\
    make bench            # all of the below (~50 min on 2 cores at load ~6; see benchmarks/README.md)
    .venv/bin/python benchmarks/bench_model.py --repeats 3
    .venv/bin/python benchmarks/bench_data.py
    .venv/bin/python benchmarks/bench_train.py
    .venv/bin/python benchmarks/bench_federation.py --fresh
    .venv/bin/python benchmarks/bench_utility.py
    .venv/bin/python benchmarks/bench_deployment.py
    .venv/bin/python benchmarks/report.py   # this page, from benchmarks/results/*.json
    benchmarks/gpu.sh [PYTHON]              # on a machine with one CUDA GPU (< 5 min on an H100)"""


def build(results: Path) -> str:
    def load(name: str) -> dict | None:
        try:
            return json.loads((results / f"{name}.json").read_text())
        except (OSError, ValueError):
            return None

    page = Page()
    fed = load("bench_federation")
    model(page, load("bench_model"))
    data(page, load("bench_data"))
    train(page, load("bench_train"))
    communication(page, fed)
    secagg(page, fed)
    scale(page, fed)
    utility(page, load("bench_utility"))
    utility_extra(page, load("bench_utility"), load("bench_utility_quick"))
    deployment(page, load("bench_deployment"))
    smoke = load("gpu_smoke")
    passed = smoke if smoke and all(x["status"] == 0 for x in smoke["steps"]) else None
    gpu(page, load("gpu"), load("gpu_train"), passed)
    if fed:
        dates = {k: (fed.get(k) or {}).get("measured", {}) for k in ("secagg", "vector", "scale")}
        page.machine("bench_federation.py", fed.get("environment"), "; ".join(
            f"{k} {m.get('date', '?')}, load {fmt_load(m.get('load_before'))} to {fmt_load(m.get('load_after'))}"
            for k, m in dates.items() if m))  # fmt: skip

    lines = ["## Results", "",
             "Every number below comes from `benchmarks/results/*.json`, written by the scripts in `benchmarks/` "
             "(random weights: speed, memory and bytes do not depend on the values) and collected by "
             "`benchmarks/report.py`. The CPU numbers come from a shared 2-core machine on which other jobs were "
             "running (load averages below): compare numbers measured in the same run, and rerun on the machine you "
             "care about.", "", "### Goals", "", "| area | goal | result | status |", "|---|---|---|---|"]  # fmt: skip
    lines += [f"| {a} | {g} | {r} | {s} |" for a, g, r, s in page.goals]
    lines.append("")
    for section in page.sections:
        lines += section
    lines += ["### Machine and load", "", *page.machines, "", "### Reproduce", "",
              "From a fresh clone (`make bench` installs first, about 3 minutes):", "", COMMANDS, ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=HERE / "results")
    parser.add_argument("--out", type=Path, default=None, help="default: <results>/summary.md")
    args = parser.parse_args(argv)
    text = build(args.results)
    out = args.out or args.results / "summary.md"
    out.write_text(text)
    print(text)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
