"""bench_utility.py's markdown tables and plots, written from its report.

Imported as a sibling module (see ``_report.py``).
"""

from __future__ import annotations

from pathlib import Path

from _utility_summary import STRATEGIES, fmt, fmt_ci  # noqa: E402 - sibling module in benchmarks/


def _run_cell(r: dict | None) -> str:
    if r is None or r["value"] is None:
        return "-"
    ci = r.get("ci")
    return fmt(r["value"]) + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci and None not in ci else "")


def markdown(report: dict) -> str:
    env, st, s = report["environment"], report["settings"], report["summary"]
    metric = "C-index" if st["task"] == "survival" else "AUROC"
    seeds, sites, strategies = st["seeds"], report["sites"], st["strategies"]
    configs = ["centralized", *strategies]
    label = {"centralized": "centralized (pooled)", **STRATEGIES}
    runs = report["runs"]

    def run(config, seed, local=None):
        return next((r for r in runs if r["config"] == config and r["seed"] == seed and r.get("site") == local), None)

    cohort = ("synthetic (`synthesize_cohort`, one cohort per seed, seeded like the run)" if report["synthetic"] else
              "user-given sites (the same for every seed; the seed changes the training only)")  # fmt: skip
    lines = [
        f"Test {metric} ({st['task']} task) of federated training against the pooled baseline and each site alone. "
        f"configs/demo.yaml (tiny MUSK, random weights, cached tile features, LoRA on the language expert, concat "
        f"fusion), overrides: `{' '.join(st['overrides'])}`. Cohort: {cohort}. Seeds {', '.join(map(str, seeds))}. "
        f"{env['cpu']} ({env['cores']} cores, shared), torch {env['torch']}, flwr {env['flwr']}, one torch thread; "
        f"load average before/after {env['load_before']} / {env['load_after']}. Whole run: "
        f"{report['wall_s'] / 60:.1f} min.", "",
        f"Centralized and local: {st['epochs']} epochs, the epoch with the best validation {metric} is tested. "
        f"Federated: SecAgg+, {st['pretrain_rounds']} pretraining rounds, {st['rounds']} outcome rounds x "
        f"{st['local_epochs']} local epochs ({st['rounds'] * st['local_epochs']} passes over each site's training "
        "cases, every site in every round), the final round's adapter is tested "
        "(FedSA-LoRA: each site with its own B and heads; its pooled number joins the sites' personal predictions).",
        "",
        f"### Pooled test {metric} (all sites' test cases)", "",
        f"Mean over seeds [95% t-interval, n = {len(seeds)}]; per seed: the run's value [95% bootstrap CI over the "
        f"test cases]. Difference: per seed against centralized (same test cases), mean [95% t-interval].", "",
        "| model | mean [95% t-CI] | " + " | ".join(f"seed {x}" for x in seeds) +
        " | diff vs centralized | run s (mean) | bytes up / site / round |",
        "|---|---|" + "---|" * len(seeds) + "---|---|---|",
    ]  # fmt: skip
    for c in configs:
        cells = [_run_cell(run(c, x)["pooled"] if run(c, x) else None) for x in seeds]
        walls = [run(c, x)["wall_s"] for x in seeds if run(c, x)]
        up = [run(c, x).get("bytes_up_per_site_round") for x in seeds if run(c, x)]
        up = [u for u in up if u is not None]
        d = s["diff_vs_centralized"].get(c)
        lines.append(f"| {label[c]} | {fmt_ci(s['pooled'][c])} | {' | '.join(cells)} | "
                     f"{fmt_ci(d) if d else ''} | {fmt(sum(walls) / len(walls), 0) if walls else '-'} | "
                     f"{f'{sum(up) / len(up):,.0f}' if up else ''} |")  # fmt: skip
    lines += ["", f"### Each site's own test cases ({metric}, mean over seeds [95% t-interval])", "",
              "| site | test cases / positives per seed | alone | " + " | ".join(label[c] for c in configs) +
              " | " + " | ".join(f"{label[c]} - alone" for c in configs) + " | alone run s |",
              "|---|---|---|" + "---|" * (2 * len(configs)) + "---|"]  # fmt: skip
    for site in sites:
        ps = s["per_site"][site]
        facts = [report["cohorts"][str(x)]["splits"].get(site, {}) for x in seeds]
        pos_key = "test_events" if st["task"] == "survival" else "test_responses"
        sizes = ", ".join(f"{f.get('test', '?')}/{f.get(pos_key, '?')}" for f in facts)
        walls = [run("local", x, site)["wall_s"] for x in seeds if run("local", x, site)]
        lines.append(f"| {site} | {sizes} | {fmt_ci(ps['alone'])} | " + " | ".join(fmt_ci(ps[c]) for c in configs) +
                     " | " + " | ".join(fmt_ci(s["diff_vs_alone"][site][c]) for c in configs) +
                     f" | {fmt(sum(walls) / len(walls), 0) if walls else '-'} |")  # fmt: skip
    lines += ["", "### Goals", "", "| goal | met | numbers (mean over seeds) |", "|---|---|---|"]
    for g in report["goals"]:
        lines.append(f"| ({g['goal']}) {g['what']} | {'met' if g['met'] else 'NOT met'} | {g['numbers']} |")
    lines += ["", "Goal (1) counts as met when the federated mean is at most 1% below the centralized mean (higher is "
              "fine); goal (2) when every site's mean is higher. Paired difference: per seed, mean [95% t-interval]. "
              "With test sets this small the seed-to-seed spread is several times 1%: an interval that holds 0 says "
              "the seeds cannot tell the two apart, whatever met / NOT met says. t-intervals are not clipped to "
              "[0, 1].", ""]  # fmt: skip
    if report["synthetic"]:
        lines += ["### The sites (non-IID)", "",
                  "| site | scanner, um/px | stain (H, E strength) | case mix (extent, grade, TIL shift) | follow-up "
                  "(accrual / study months, loss per year) | report style | events | median time (months) |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for p in report["site_profiles"]:
            cm, fu, stn = p["case_mix"], p["follow_up"], p["stain"]
            lines.append(f"| {p['name']} | {p['scanner']}, {p['mpp']} | {stn['h_strength']}, {stn['e_strength']} | "
                         f"{cm['extent_shift']:+}, {cm['grade_shift']:+}, {cm['til_shift']:+} | "
                         f"{fu['accrual_months']} / {fu['study_months']}, {fu['dropout_per_year']} | "
                         f"{p['report_style']} | {fmt(p['event_rate'], 2)} | {p['median_time_months']} |")  # fmt: skip
        split = (f"splits redrawn per site, stratified by the label: {st['test_share']} test, {st['val_share']} "
                 "validation, the rest training" if st["test_share"] is not None else
                 "synthesize_cohort's splits (70% training, 15% validation, 15% test)")  # fmt: skip
        lines += ["", f"Events: share of the site's cases (seed {seeds[0]}'s cohort; the profiles are the same for "
                  f"every seed, the cases are drawn anew). Cases per site {', '.join(map(str, st['cases']))}, "
                  f"slides {st['slide_px']} px across at 0.5 um/px; {split}.", ""]  # fmt: skip
    t = report["timing"]
    lines += ["### Time", "",
              f"Per seed (mean): cohort {fmt(t['cohort_s'], 0)} s, prepare {fmt(t['prepare_s'], 0)} s, centralized "
              f"{fmt(t['centralized_s'], 0)} s, "
              + ", ".join(f"{STRATEGIES[c]} {fmt(t[c + '_s'], 0)} s" for c in strategies)
              + f", all sites alone {fmt(t['local_s'], 0)} s. Simulation seconds include Ray's start and the final "
              "test of every site. Each seed: " + ", ".join(
                  f"seed {x}: {v['wall_s'] / 60:.1f} min (1-min load average at its start {v['load_start']})"
                  for x, v in report["per_seed"].items()) + ".", ""]  # fmt: skip
    return "\n".join(lines)


def plots(report: dict, out_dir: Path, stem: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    st, s, sites = report["settings"], report["summary"], report["sites"]
    metric = "C-index" if st["task"] == "survival" else "AUROC"
    configs = ["centralized", *st["strategies"]]
    names = {"centralized": "centralized", **STRATEGIES}
    colours = {"centralized": "#444444", "fedit": "#1f77b4", "ffa": "#2ca02c", "fedsa": "#9467bd", "rolora": "#ff7f0e",
               "alone": "#d62728"}  # fmt: skip

    def point(ax, x, t, colour, dx=0.12):
        if t["mean"] is None:
            return
        err = None if t["ci"] is None else [[t["mean"] - t["ci"][0]], [t["ci"][1] - t["mean"]]]
        ax.errorbar([x], [t["mean"]], yerr=err, fmt="o", color=colour, capsize=4, ms=7)
        vals = [v for v in t["values"] if v is not None]
        ax.scatter([x + dx] * len(vals), vals, color=colour, alpha=0.45, s=14, marker="x")

    fig, ax = plt.subplots(figsize=(9, 4.2))
    labels = []
    for i, c in enumerate(configs):
        point(ax, i, s["pooled"][c], colours[c])
        labels.append(f"{names[c]}\n(all test cases)")
    for j, site in enumerate(sites):
        point(ax, len(configs) + j, s["per_site"][site]["alone"], colours["alone"])
        labels.append(f"{site} alone\n(own test cases)")
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel(f"test {metric}")
    ax.set_title(f"Test {metric}: mean over {len(st['seeds'])} seed(s), 95% t-interval; x = each seed")
    fig.tight_layout()
    paths = [out_dir / f"{stem}.png"]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    groups = ["alone", *configs]
    fig, ax = plt.subplots(figsize=(9, 4.2))
    width = 0.8 / len(groups)
    for j, site in enumerate(sites):
        for g, name in enumerate(groups):
            x = j + (g - (len(groups) - 1) / 2) * width
            point(ax, x, s["per_site"][site][name], colours[name], dx=0.35 * width)
    for name in groups:
        ax.plot([], [], "o", color=colours[name], label="alone" if name == "alone" else names[name])
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_xticks(range(len(sites)), sites)
    ax.set_ylabel(f"test {metric} on the site's own test cases")
    ax.set_title(f"Each site: alone vs pooled vs federated (mean over {len(st['seeds'])} seed(s), 95% t-interval)")
    ax.legend(fontsize=8, ncol=len(groups), loc="upper center", bbox_to_anchor=(0.5, -0.08), frameon=False)
    fig.tight_layout()
    paths.append(out_dir / f"{stem}_sites.png")
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return [p.name for p in paths]

