"""bench_utility.py's statistics across seeds (means, t-intervals, paired differences) and its goals, met or not.

Imported as a sibling module (see ``_report.py``).
"""

from __future__ import annotations

import math

STRATEGIES = {"fedit": "FedIT", "ffa": "FFA-LoRA", "fedsa": "FedSA-LoRA", "rolora": "RoLoRA"}


def t_interval(values: list[float]) -> dict:
    """Mean, standard deviation and the 95% t-interval of the mean (None below two values)."""
    from scipy import stats

    vals = [v for v in values if v is not None]
    n = len(vals)
    if n == 0:
        return {"mean": None, "sd": None, "ci": None, "n": 0, "values": values}
    mean = sum(vals) / n
    if n < 2:
        return {"mean": mean, "sd": None, "ci": None, "n": n, "values": values}
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    return {"mean": mean, "sd": sd, "ci": [mean - half, mean + half], "n": n, "values": values}


def summarize(runs: list[dict], seeds: list[int], sites: list[str], strategies: list[str]) -> dict:
    """Across seeds: pooled score per configuration, each site's score per configuration, paired differences."""

    def pick(config: str, seed: int, site: str | None = None, local_site: str | None = None):
        for r in runs:
            if r["config"] == config and r["seed"] == seed and r.get("site") == local_site:
                m = r["pooled"] if site is None else r["per_site"].get(site)
                return None if m is None else m["value"]
        return None

    configs = ["centralized", *strategies]
    pooled = {c: t_interval([pick(c, s) for s in seeds]) for c in configs}
    per_site = {site: {"alone": t_interval([pick("local", s, site, site) for s in seeds]),
                       **{c: t_interval([pick(c, s, site) for s in seeds]) for c in configs}}
                for site in sites}  # fmt: skip

    def diff(a: list, b: list) -> dict:
        return t_interval([None if x is None or y is None else x - y for x, y in zip(a, b)])

    vs_central = {c: diff(pooled[c]["values"], pooled["centralized"]["values"]) for c in strategies}
    vs_alone = {site: {c: diff(per_site[site][c]["values"], per_site[site]["alone"]["values"]) for c in configs}
                for site in sites}  # fmt: skip
    out = {"pooled": pooled, "per_site": per_site, "diff_vs_centralized": vs_central, "diff_vs_alone": vs_alone}
    if "ffa" in strategies and "fedit" in strategies:
        out["diff_ffa_vs_fedit"] = diff(pooled["ffa"]["values"], pooled["fedit"]["values"])
    return out


def goals(summary: dict, sites: list[str], strategies: list[str]) -> list[dict]:
    pooled, per_site = summary["pooled"], summary["per_site"]
    central = pooled["centralized"]["mean"]
    out = []
    for c in strategies:
        fed = pooled[c]["mean"]
        rel = None if fed is None or not central else (fed - central) / central
        out.append({"goal": 1, "what": f"{STRATEGIES[c]} within 1% of centralized (pooled test, mean over seeds)",
                    "met": rel is not None and rel >= -0.01,
                    "numbers": f"{fmt(fed)} vs {fmt(central)}: {fmt_pct(rel)}; paired difference "
                               f"{fmt_ci(summary['diff_vs_centralized'][c])}"})  # fmt: skip
    for c in strategies:
        rows = [(site, per_site[site][c]["mean"], per_site[site]["alone"]["mean"]) for site in sites]
        met = all(f is not None and a is not None and f > a for _, f, a in rows)
        out.append({"goal": 2, "what": f"every site better with {STRATEGIES[c]} than alone (own test cases)",
                    "met": met, "primary": c == "fedit",
                    "numbers": "; ".join(f"{s}: {fmt(f)} vs {fmt(a)}" for s, f, a in rows)})  # fmt: skip
    for c in strategies:
        rows = [(site, per_site[site][c]["mean"], per_site[site]["alone"]["mean"]) for site in sites]
        below = [s for s, f, a in rows if f is None or a is None or f < a]
        out.append({"goal": 4, "what": f"no site below its local model with {STRATEGIES[c]} (own test cases)",
                    "met": not below,
                    "numbers": "; ".join(f"{s}: {fmt(f)} vs {fmt(a)}" for s, f, a in rows)
                               + (f" (below: {', '.join(below)})" if below else "")})  # fmt: skip
    if "ffa" in strategies and "fedit" in strategies:
        ffa, fedit = pooled["ffa"]["mean"], pooled["fedit"]["mean"]
        out.append({"goal": 3, "what": "FFA-LoRA at least as good as FedIT (pooled test, mean over seeds)",
                    "met": ffa is not None and fedit is not None and ffa >= fedit,
                    "numbers": f"{fmt(ffa)} vs {fmt(fedit)}; paired difference "
                               f"{fmt_ci(summary['diff_ffa_vs_fedit'])}"})  # fmt: skip
    return out


def fmt(v, digits=3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def fmt_pct(v) -> str:
    return "-" if v is None else f"{100 * v:+.1f}%"


def fmt_ci(t: dict, digits=3) -> str:
    if t["mean"] is None:
        return "-"
    return fmt(t["mean"], digits) + (f" [{fmt(t['ci'][0], digits)}, {fmt(t['ci'][1], digits)}]" if t["ci"] else "")

