"""bench_federation.py's markdown tables and plots, written from the merged report (bench_federation.json).

Imported as a sibling module (see ``_report.py``).
"""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np
from _federation_bytes import FULL_BYTES, GOAL_UP_FRACTION  # noqa: E402 - sibling module in benchmarks/


def fmt(v, digits=2) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def _mb(v) -> str:
    return f"{v / 1e6:.2f}"


def _pair_medians(rows, key_fields) -> dict:
    """(key..., secure) -> median of median_round_s over repeats."""
    groups: dict = {}
    for r in rows:
        if r.get("median_round_s") is not None:
            groups.setdefault(tuple(r[k] for k in key_fields) + (r["secure"],), []).append(r["median_round_s"])
    return {k: statistics.median(v) for k, v in groups.items()}


def secagg_overheads(sec: dict) -> list[dict]:
    """Per site count: median plain and SecAgg+ round seconds, overhead, and measured bytes per site per round."""
    med = _pair_medians(sec["runs"], ["sites"])
    out = []
    for n in sorted({r["sites"] for r in sec["runs"]}):
        p, s = med.get((n, False)), med.get((n, True))
        row = {"sites": n, "plain_s": p, "secure_s": s, "overhead_s": None if p is None or s is None else s - p}
        row["overhead"] = None if row["overhead_s"] is None else row["overhead_s"] / p
        for secure, mode in ((False, "plain"), (True, "secure")):
            later = [x for r in sec["runs"] if r["sites"] == n and r["secure"] == secure
                     for x in r.get("rounds", []) if x["round"] > 1]  # fmt: skip
            row[f"up_{mode}"] = statistics.median(x["bytes_up_per_client"] for x in later) if later else None
            row[f"down_{mode}"] = statistics.median(x["bytes_down"] / n for x in later) if later else None
            if secure:  # runs before fedmusk packed the masked vector carry no wire field: Flower's int64
                wires = {r.get("secagg_wire", "int64") for r in sec["runs"] if r["sites"] == n and r["secure"]}
                row["secagg_wire"] = "uint32" if wires == {"uint32"} else "int64"
            walls = [r["wall_s"] for r in sec["runs"] if r["sites"] == n and r["secure"] == secure]
            row[f"run_{mode}_s"] = statistics.median(walls) if walls else None
        out.append(row)
    return out


def _measured(section: dict) -> str:
    m = section.get("measured") or {}
    return (f"Measured {m.get('date', '?')}, load average before/after {m.get('load_before')} / "
            f"{m.get('load_after')}.") if m else ""  # fmt: skip


def md_bytes(b: dict, sec: dict | None) -> list[str]:
    lines = ["### 1. Communication per site per round (MUSK-large)", "",
             f"Full-model fine-tuning exchanges the {b['full_params']:,} float32 parameters "
             f"({b['full_bytes_float32'] / 1e6:,.1f} MB) up and down every round: "
             f"{2 * b['full_bytes_float32'] / 1e6:,.1f} MB per site per round. fedmusk's heads: "
             f"{b['heads_config']}. Down: the float32 global adapter, sent with the fit and again with the evaluate "
             "instruction (every strategy; FedSA's sites then keep their own B and heads). Up under SecAgg+: the "
             "masked vector as fedmusk packs it, uint32 (+ a few kB of keys and shares; Flower's own int64 in the "
             "last column). Goal: bytes up <= 0.5% of the full model, at configs/musk-large.yaml's defaults under "
             "SecAgg+.", "",
             "| configuration | values up | up MB plain / SecAgg+ | down MB | up % of full model plain / SecAgg+ "
             "| goal (<= 0.5%) plain / SecAgg+ | up + down % of full fine-tuning plain / SecAgg+ | less communication "
             "plain / SecAgg+ | SecAgg+ up MB as Flower's int64 |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    verdict = lambda f: "met" if f <= GOAL_UP_FRACTION else "NOT met"  # noqa: E731
    for v in b["variants"]:
        lines.append(f"| {v['variant']} | {v['values_up']:,} | {_mb(v['up_plain'])} / {_mb(v['up_secure'])} | "
                     f"{_mb(v['down'])} | {100 * v['up_plain_of_full']:.3f} / {100 * v['up_secure_of_full']:.3f} | "
                     f"{verdict(v['up_plain_of_full'])} / {verdict(v['up_secure_of_full'])} | "
                     f"{100 * v['total_plain_of_full']:.3f} / {100 * v['total_secure_of_full']:.3f} | "
                     f"{100 * v['less_plain']:.2f}% / {100 * v['less_secure']:.2f}% | "
                     f"{_mb(v['up_secure_int64']) if 'up_secure_int64' in v else '-'} |")  # fmt: skip
    lines += ["", "FedIT sends every LoRA factor and the heads; FFA-LoRA leaves A (frozen at the shared seed) out; "
              "FedSA-LoRA sends only the A factors (B and heads stay at the site); RoLoRA sends B in odd rounds and A "
              "in even ones, with the heads. With cached tile features (configs/musk-large.yaml) the vision expert "
              "never runs in training, so fedmusk neither trains nor sends its LoRA (the log says so): the "
              "both-experts rows train end to end. SecAgg+ masks values below 2^32: fedmusk ships them as uint32, "
              "the bytes of float32 (Flower's own int64 is twice that).", ""]  # fmt: skip
    t = b.get("tiny")
    rows = secagg_overheads(sec) if sec else []
    if t and rows:
        lines += ["Cross-check with section 2a: the same count for the tiny demo adapter "
                  f"({t['values_global']:,} values, {t['tensors_global']} tensors, FedIT) against fedmusk's byte meter "
                  "in the simulations (median over rounds 2..; the rest is metrics, configs, SecAgg+ keys and shares):",
                  "", "| sites | up plain: computed / measured | up SecAgg+: computed / measured | down: computed / "
                  "measured plain / measured SecAgg+ | largest gap |", "|---|---|---|---|---|"]  # fmt: skip
        for r in rows:
            int64 = r.get("secagg_wire") == "int64" and "up_secure_int64" in t  # measured before the packing
            up_secure = t["up_secure_int64"] if int64 else t["up_secure"]
            got = [(t["up_plain"], r["up_plain"]), (up_secure, r["up_secure"]), (t["down"], r["down_plain"]),
                   (t["down"], r["down_secure"])]  # fmt: skip
            gaps = [abs(m - c) / c for c, m in got if m is not None]
            lines.append(f"| {r['sites']} | {t['up_plain']:,} / {fmt(r['up_plain'], 0)} | {up_secure:,} / "
                         f"{fmt(r['up_secure'], 0)}{' (int64, earlier run)' if int64 else ''} | "
                         f"{t['down']:,} / {fmt(r['down_plain'], 0)} / "
                         f"{fmt(r['down_secure'], 0)} | {fmt(100 * max(gaps) if gaps else None, 1)}% |")  # fmt: skip
        lines.append("")
    return lines + ["![bytes](federation_bytes.png)", ""]


def md_secagg(sec: dict) -> list[str]:
    lines = ["### 2a. SecAgg+ vs plain, tiny model (report-only fusion, labels-and-reports cohort)", "",
             f"{sec['cases_per_site']} cases per site, {sec['rounds']} rounds, 1 local epoch; median round seconds "
             "over rounds 2.. (training + SecAgg+ or plain fit + evaluation), median over repeats "
             f"({sec['repeats']}); SecAgg+ and plain interleaved in one invocation. Bytes per site per round from "
             f"fedmusk's meter. {_measured(sec)}", "",
             "| sites | plain s/round | SecAgg+ s/round | overhead s | overhead % | up bytes/site plain / SecAgg+ | "
             "down bytes/site plain / SecAgg+ | run s plain / SecAgg+ |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in secagg_overheads(sec):
        lines.append(f"| {r['sites']} | {fmt(r['plain_s'])} | {fmt(r['secure_s'])} | {fmt(r['overhead_s'])} | "
                     f"{fmt(None if r['overhead'] is None else 100 * r['overhead'], 0)} | {fmt(r['up_plain'], 0)} / "
                     f"{fmt(r['up_secure'], 0)} | {fmt(r['down_plain'], 0)} / {fmt(r['down_secure'], 0)} | "
                     f"{fmt(r['run_plain_s'], 0)} / {fmt(r['run_secure_s'], 0)} |")  # fmt: skip
    return lines + ["", "![SecAgg+](federation_secagg.png)", ""]


def vector_overheads(vec: dict) -> list[dict]:
    med = _pair_medians(vec["runs"], ["vector"])
    out = []
    for name in dict.fromkeys(r["vector"] for r in vec["runs"]):
        p, s = med.get((name, False)), med.get((name, True))
        extra = None if p is None or s is None else s - p
        out.append({"vector": name, "length": next(r["length"] for r in vec["runs"] if r["vector"] == name),
                    "plain_s": p, "secure_s": s, "extra_s": extra,
                    "overhead": {f"{a['local_s']:.0f}": None if extra is None else extra / (a["local_s"] + p)
                                 for a in vec["assumptions"]}})  # fmt: skip
    return out


def md_vector(vec: dict) -> list[str]:
    lines = ["### 2b. SecAgg+ protocol cost by vector length (minimal Flower simulation, no training)", "",
             f"{vec['sites']} sites, NumPyClient returning a fixed float32 vector, {vec['rounds']} rounds, fit "
             f"only; median fit-round seconds over rounds 2.., median over repeats ({vec['repeats']}). Ratio: "
             f"SecAgg+'s extra seconds against an assumed local workload per round (see below). {_measured(vec)}", "",
             "| vector | length | plain s/round | SecAgg+ s/round | SecAgg+ extra s | " +
             " | ".join(f"extra / {a['local_s']:.0f} s local" for a in vec["assumptions"]) + " |",
             "|---|---|---|---|---|" + "---|" * len(vec["assumptions"])]  # fmt: skip
    for r in vector_overheads(vec):
        ratios = [fmt(None if v is None else 100 * v, 1) + " %" for v in r["overhead"].values()]
        lines.append(f"| {r['vector']} | {r['length']:,} | {fmt(r['plain_s'])} | {fmt(r['secure_s'])} | "
                     f"{fmt(r['extra_s'])} | {' | '.join(ratios)} |")  # fmt: skip
    return lines + ["", "Assumed local workloads (assumptions, not measurements): " +
                    "; ".join(f"{a['local_s']:.0f} s = {a['what']}" for a in vec["assumptions"]) +
                    ". Overhead % = SecAgg+ extra / (local time + plain round time).", ""]  # fmt: skip


def md_scale(sc: dict) -> list[str]:
    lines = ["### 3. Scale: tiny model, report-only fusion, many simulated sites", "",
             f"{sc['cases_per_site']} cases per site, {sc['rounds']} rounds, 1 local epoch; seconds of each round "
             "(training + fit + evaluation of every site; the first also starts every site), the whole run (Ray "
             "start, final test) with the CPU seconds of its process tree (less sensitive to other jobs than wall "
             "time), and peak RSS of the process tree (simulation + Ray workers), sampled every 0.5 s. "
             f"{_measured(sc)}", "", "| sites | mode | round s (1st, ...) | run s | run CPU s | peak RSS (MB) | note |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in sc["runs"]:
        note = (f"killed at the {r['cap_s']:.0f} s cap" + (" (rounds done by then)" if r.get("partial") else "")
                if r["timed_out"] else ("error: " + r["error"].strip().splitlines()[-1][:120] if "error" in r else ""))
        lines.append(f"| {r['sites']} | {'SecAgg+' if r['secure'] else 'plain'} | "
                     f"{', '.join(f'{s:.1f}' for s in r.get('round_s', [])) or '-'} | {r['wall_s']:.0f} | "
                     f"{fmt(r.get('cpu_s'), 0)} | {r['peak_rss_mb']:.0f} | {note} |")  # fmt: skip
    for mode, fit in (sc.get("growth") or {}).items():
        lines += ["", f"Growth ({mode}, {fit['sites'][0]} to {fit['sites'][-1]} sites, {fit['site_ratio']:.0f}x the "
                  "sites; straight-line fit): " + "; ".join(
                      f"{label} {fmt(fit[k]['per_site'], 3 if k != 'peak_rss_mb' else 1)} {unit} per site "
                      f"(x{fmt(fit[k]['ratio'], 1)})" for k, label, unit in (
                          ("round_s", "later rounds", "s"), ("first_round_s", "first round", "s"),
                          ("cpu_s", "CPU time of the run", "s"), ("peak_rss_mb", "peak RSS", "MB")) if k in fit)]
    return lines + ["", "![scale](federation_scale.png)", ""]


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"Federation benchmarks on {env['cpu']} ({env['cores']} cores, shared), flwr {env.get('flwr')}, torch "
             f"{env.get('torch')}. Each section says when it was measured and under what load.", ""]  # fmt: skip
    if report.get("bytes"):
        lines += md_bytes(report["bytes"], report.get("secagg"))
    if report.get("secagg"):
        lines += md_secagg(report["secagg"])
    if report.get("vector"):
        lines += md_vector(report["vector"])
    if report.get("scale"):
        lines += md_scale(report["scale"])
    return "\n".join(lines)


# -- plots -------------------------------------------------------------------------------------------------------------


def plot(report: dict, out_dir: Path) -> list[Path]:
    """federation_bytes.png, federation_secagg.png, federation_scale.png from the merged report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        written.append(out_dir / name)

    b = report.get("bytes")
    if b:
        fig, ax = plt.subplots(figsize=(9, 4.2))
        names = ["full-model\nfine-tuning"] + [v["key"].replace("-", "\n") for v in b["variants"]]
        up_p = [b["full_bytes_float32"]] + [v["up_plain"] for v in b["variants"]]
        up_s = [None] + [v["up_secure"] for v in b["variants"]]
        down = [b["full_bytes_float32"]] + [v["down"] for v in b["variants"]]
        x = np.arange(len(names))
        ax.bar(x - 0.27, np.array(up_p) / 1e6, 0.27, label="up, plain (float32)")
        ax.bar(x[1:], np.array(up_s[1:]) / 1e6, 0.27, label="up, SecAgg+ (int64)")
        ax.bar(x + 0.27, np.array(down) / 1e6, 0.27, label="down (fit + evaluate)")
        ax.axhline(GOAL_UP_FRACTION * FULL_BYTES / 1e6, color="k", ls="--", lw=1, label="goal: up <= 0.5% of full")
        ax.set_yscale("log")
        ax.set_xticks(x, names, fontsize=7)
        ax.set_ylabel("MB per site per round")
        ax.set_title("MUSK-large: bytes per site per round")
        ax.legend(fontsize=7)
        save(fig, "federation_bytes.png")
    sec, vec = report.get("secagg"), report.get("vector")
    if sec or vec:
        fig, axes = plt.subplots(1, 2 if sec and vec else 1, figsize=(10 if sec and vec else 5.5, 4), squeeze=False)
        i = 0
        if sec:
            ax, rows = axes[0][i], secagg_overheads(sec)
            i += 1
            x = np.arange(len(rows))
            plain = [r["plain_s"] or 0 for r in rows]
            secure = [r["secure_s"] or 0 for r in rows]
            ax.bar(x - 0.2, plain, 0.4, label="plain")
            ax.bar(x + 0.2, secure, 0.4, label="SecAgg+")
            for xi, r in zip(x, rows):
                if r["overhead"] is not None:
                    ax.annotate(f"{100 * r['overhead']:+.0f}%", (xi + 0.2, r["secure_s"]), ha="center",
                                va="bottom", fontsize=8)  # fmt: skip
            ax.set_xticks(x, [f"{r['sites']} sites" for r in rows])
            ax.set_ylabel("median round s (rounds 2..)")
            ax.set_title("tiny model: round time, plain vs SecAgg+")
            ax.legend(fontsize=8)
        if vec:
            ax, rows = axes[0][i], vector_overheads(vec)
            x = np.arange(len(rows))
            ax.bar(x - 0.2, [r["plain_s"] or 0 for r in rows], 0.4, label="plain")
            ax.bar(x + 0.2, [r["secure_s"] or 0 for r in rows], 0.4, label="SecAgg+")
            ax.set_xticks(x, [f"{r['length']:,} values" for r in rows], fontsize=8)
            ax.set_ylabel("median fit round s")
            ax.set_title("protocol alone (3 sites), by vector length")
            ax.legend(fontsize=8)
        save(fig, "federation_secagg.png")
    sc = report.get("scale")
    if sc and sc.get("growth"):
        fig, axes = plt.subplots(1, 3, figsize=(14, 4))
        for mode, fit in sc["growth"].items():
            xs = np.array(fit["sites"], float)
            line = np.linspace(0, xs.max(), 50)
            for key, label, marker in (("round_s", "later rounds", "o"), ("first_round_s", "first round", "s")):
                f = fit[key]
                pts = axes[0].plot(xs, f["values"], marker, label=f"{mode}, {label}: {f['per_site']:.3f} s/site")
                axes[0].plot(line, f["intercept"] + f["per_site"] * line, "-", color=pts[0].get_color(), lw=1)
            for ax, key, unit in ((axes[1], "cpu_s", "s"), (axes[2], "peak_rss_mb", "MB")):
                if key in fit:
                    f = fit[key]
                    pts = ax.plot(xs, f["values"], "o", label=f"{mode}: {f['per_site']:.2f} {unit}/site")
                    ax.plot(line, f["intercept"] + f["per_site"] * line, "-", color=pts[0].get_color(), lw=1)
        axes[0].set(xlabel="simulated sites", ylabel="round s", title="round time vs sites (tiny)")
        axes[1].set(xlabel="simulated sites", ylabel="CPU s", title="CPU time of the whole run (process tree)")
        axes[2].set(xlabel="simulated sites", ylabel="peak RSS, MB", title="peak memory vs sites (process tree)")
        for ax in axes:
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
            ax.set_xlim(left=0)
            ax.set_ylim(0, ax.get_ylim()[1] * 1.1)
        save(fig, "federation_scale.png")
    return written
