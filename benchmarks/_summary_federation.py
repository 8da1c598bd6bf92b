"""report.py's federation areas, from bench_federation.json: communication (section 1), secure aggregation
(section 2) and scale (section 3), each with its goals.

Imported as a sibling module (see ``_report.py``).
"""

from __future__ import annotations

import statistics

from _summary_page import LINK, Page, fmt, fmt_pct  # noqa: E402 - sibling module in benchmarks/

GOAL_UP_FRACTION = 0.005
GOAL_SECAGG = 0.15
FLOWER_SECAGG = 0.13  # Flower's reported SecAgg+ runtime cost, the anchor
FEDDFP_LESS = 0.999  # FedDFP (2026): federated prompt tuning on pathology, >99.9% less communication


def communication(page: Page, d: dict | None) -> None:
    lines = ["### Communication per site per round, MUSK-large (`bench_federation.py`, section 1)", ""]
    b = (d or {}).get("bytes")
    if not b or "down" not in (b.get("variants") or [{}])[0]:
        page.sections.append(lines + ["Not run.", ""])
        page.goal("communication", "bytes up <= 0.5% of the full model", "-", None)
        return
    full = b["full_bytes_float32"]
    lines += [f"Full-model fine-tuning: {full / 1e6:,.1f} MB up and the same down per round. fedmusk: up = the "
              "shared tensors of the strategy (float32; SecAgg+ sends them masked, packed as uint32), down = the float32 "
              "global adapter with the fit and again with the evaluate instruction.", "",
              "| configuration | up MB plain / SecAgg+ | down MB | up, % of full model (plain / SecAgg+) | "
              "less communication than full fine-tuning (plain / SecAgg+) |", "|---|---|---|---|---|"]  # fmt: skip
    for v in b["variants"]:
        lines.append(f"| {v['variant']} | {v['up_plain'] / 1e6:.2f} / {v['up_secure'] / 1e6:.2f} | "
                     f"{v['down'] / 1e6:.2f} | {fmt_pct(v['up_plain_of_full'], 3)} / "
                     f"{fmt_pct(v['up_secure_of_full'], 3)} | "
                     f"{fmt_pct(v['less_plain'], 2)} / {fmt_pct(v['less_secure'], 2)} |")  # fmt: skip
    t = b.get("tiny")
    sec = d.get("secagg")
    if t and sec:
        later = [x for r in sec["runs"] if not r["secure"] for x in r.get("rounds", []) if x["round"] > 1]
        if later:
            measured = statistics.median(x["bytes_up_per_client"] for x in later)
            lines += ["", f"Check: the same count for the tiny demo adapter gives {t['up_plain']:,} bytes up per site "
                      f"per round; fedmusk's byte meter measured {measured:,.0f} in the simulations of section 2 "
                      f"({fmt_pct(measured / t['up_plain'] - 1, 2, sign=True)}: metrics and configs)."]  # fmt: skip
    lines += ["", f"![bytes per site per round]({LINK}/federation_bytes.png)", ""]
    page.sections.append(lines)
    rows = {v["key"]: v for v in b["variants"]}
    default = rows.get("defaults") or rows.get("fedit-both")  # earlier results: FedIT both experts was the default
    passing = [v for v in b["variants"] if v["up_secure_of_full"] <= GOAL_UP_FRACTION]
    if default:
        page.goal("communication", f"bytes up <= 0.5% of the full model, defaults under SecAgg+ ({default['variant']})",
                  f"{fmt_pct(default['up_secure_of_full'], 3)} ({default['up_secure'] / 1e6:.1f} MB); plain "
                  f"{fmt_pct(default['up_plain_of_full'], 3)}", default["up_secure_of_full"] <= GOAL_UP_FRACTION)
    if passing:
        page.goal("communication", "bytes up <= 0.5% of the full model under SecAgg+, some configuration",
                  "; ".join(f"{v['variant']}: {fmt_pct(v['up_secure_of_full'], 3)}" for v in passing), True)
    best = max(b["variants"], key=lambda v: v["less_secure"])
    page.goals.append(("communication", f"anchor: federated prompt tuning on pathology (FedDFP 2026) used > "
                       f"{fmt_pct(FEDDFP_LESS)} less communication than full fine-tuning",
                       f"fedmusk, up + down under SecAgg+: {fmt_pct(best['less_secure'], 2)} less at best "
                       f"({best['variant']}), {fmt_pct(default['less_secure'], 2) if default else '-'} with the "
                       "defaults (LoRA + heads exchange more values than prompts)", "comparison"))  # fmt: skip


def secagg(page: Page, d: dict | None) -> None:
    lines = ["### Secure aggregation: round time with and without SecAgg+ (`bench_federation.py`, section 2)", ""]
    sec, vec = (d or {}).get("secagg"), (d or {}).get("vector")
    if not sec:
        page.sections.append(lines + ["Not run.", ""])
        page.goal("SecAgg+", f"SecAgg+ <= ~{fmt_pct(GOAL_SECAGG, 0)} more time per round", "-", None)
        return
    rows = _secagg_rows(sec)
    lines += [f"Tiny-model federations (report-only fusion, {sec['cases_per_site']} cases per site, {sec['rounds']} "
              "rounds, 1 local epoch), SecAgg+ and plain interleaved in one run; median round seconds over rounds "
              "2.. .", "", "| sites | plain s/round | SecAgg+ s/round | overhead |", "|---|---|---|---|"]  # fmt: skip
    lines += [f"| {r['sites']} | {fmt(r['plain'])} | {fmt(r['secure'])} | {fmt(r['extra'])} s "
              f"({fmt_pct(r['overhead'], 0, sign=True)}) |" for r in rows]
    if vec:
        vrows = _vector_rows(vec)
        lines += ["", "The protocol alone (minimal Flower simulation, 3 sites, fixed vectors), by vector length:", "",
                  "| vector | values | plain s/round | SecAgg+ s/round | extra s | extra vs an assumed " +
                  " / ".join(f"{a['local_s']:.0f} s" for a in vec["assumptions"]) + " local round |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        lines += [f"| {r['name']} | {r['length']:,} | {fmt(r['plain'])} | {fmt(r['secure'])} | {fmt(r['extra'])} | "
                  + " / ".join(fmt_pct(o) for o in r["overheads"]) + " |" for r in vrows]
        lines += ["", "The local round times are assumptions (MUSK-large LoRA training on one GPU), not measurements: "
                  "see the assumptions in the details."]  # fmt: skip
    lines += ["", f"![SecAgg+ vs plain]({LINK}/federation_secagg.png)", "",
              f"Details: [{LINK}/bench_federation.md]({LINK}/bench_federation.md).", ""]
    page.sections.append(lines)
    measured = [r for r in rows if r["overhead"] is not None]
    if measured:
        worst = max(measured, key=lambda r: r["overhead"])
        page.goal("SecAgg+", f"SecAgg+ <= ~{fmt_pct(GOAL_SECAGG, 0)} more time per round (Flower: about "
                  f"{fmt_pct(FLOWER_SECAGG, 0)}), measured, tiny model",
                  ", ".join(f"{r['sites']} sites {fmt_pct(r['overhead'], 0, sign=True)}" for r in measured) +
                  f" (rounds of {fmt(min(r['plain'] for r in measured), 1)}-{fmt(max(r['plain'] for r in measured), 1)}"
                  " s, where SecAgg+'s fixed cost weighs most)", worst["overhead"] <= GOAL_SECAGG)  # fmt: skip
    if vec:
        big = max(_vector_rows(vec), key=lambda r: r["length"])
        if big["overheads"] and big["overheads"][0] is not None:
            page.goal("SecAgg+", f"SecAgg+ <= ~{fmt_pct(GOAL_SECAGG, 0)} more time per round at MUSK-large's adapter "
                      "size (protocol measured, local round assumed)",
                      f"+{fmt(big['extra'])} s per round = {fmt_pct(big['overheads'][0])} of an assumed "
                      f"{vec['assumptions'][0]['local_s']:.0f} s round", big["overheads"][0] <= GOAL_SECAGG)


def _secagg_rows(sec: dict) -> list[dict]:
    med: dict = {}
    for r in sec["runs"]:
        if r.get("median_round_s") is not None:
            med.setdefault((r["sites"], r["secure"]), []).append(r["median_round_s"])
    rows = []
    for n in sorted({r["sites"] for r in sec["runs"]}):
        p, s = (statistics.median(med[(n, m)]) if (n, m) in med else None for m in (False, True))
        extra = None if p is None or s is None else s - p
        rows.append({"sites": n, "plain": p, "secure": s, "extra": extra,
                     "overhead": None if extra is None else extra / p})  # fmt: skip
    return rows


def _vector_rows(vec: dict) -> list[dict]:
    med: dict = {}
    for r in vec["runs"]:
        if r.get("median_round_s") is not None:
            med.setdefault((r["vector"], r["secure"]), []).append(r["median_round_s"])
    rows = []
    for name in dict.fromkeys(r["vector"] for r in vec["runs"]):
        p, s = (statistics.median(med[(name, m)]) if (name, m) in med else None for m in (False, True))
        extra = None if p is None or s is None else s - p
        rows.append({"name": name, "length": next(r["length"] for r in vec["runs"] if r["vector"] == name),
                     "plain": p, "secure": s, "extra": extra,
                     "overheads": [None if extra is None else extra / (a["local_s"] + p) for a in vec["assumptions"]]})
    return rows


def scale(page: Page, d: dict | None) -> None:
    lines = ["### Scale: 10 to 100 simulated sites, tiny model (`bench_federation.py`, section 3)", ""]
    sc = (d or {}).get("scale")
    if not sc:
        page.sections.append(lines + ["Not run.", ""])
        page.goal("scale", "time per round and peak memory grow at most linearly with sites", "-", None)
        return
    lines += [f"{sc['cases_per_site']} cases per site, {sc['rounds']} rounds; the first round also starts every site; "
              "peak RSS of the whole process tree (simulation + Ray workers).", "",
              "| sites | mode | first round s | later round s | run s | run CPU s | peak RSS MB |",
              "|---|---|---|---|---|---|---|"]
    for r in sc["runs"]:
        rs = r.get("round_s") or []
        later = statistics.median(rs[1:]) if len(rs) > 1 else None
        note = " (killed at the cap)" if r.get("timed_out") else " (error)" if "error" in r else ""
        lines.append(f"| {r['sites']} | {'SecAgg+' if r['secure'] else 'plain'}{note} | "
                     f"{fmt(rs[0] if rs else None, 1)} "
                     f"| {fmt(later, 1)} | {r['wall_s']:.0f} | {fmt(r.get('cpu_s'), 0)} | {r['peak_rss_mb']:,.0f} |")
    growth = sc.get("growth") or {}
    for mode, g in growth.items():
        cpu = g.get("cpu_s")
        lines += ["", f"Growth ({mode}, straight-line fit over {', '.join(map(str, g['sites']))} sites): later rounds "
                  f"{g['round_s']['per_site']:.3f} s per site (x{g['round_s']['ratio']:.1f} for x{g['site_ratio']:.0f} "
                  f"sites), first round {g['first_round_s']['per_site']:.2f} s per site, "
                  + (f"CPU time of the whole run {cpu['per_site']:.2f} s per site (x{cpu['ratio']:.1f}), "
                     if cpu else "")
                  + f"peak memory {g['peak_rss_mb']['per_site']:.1f} MB per site (x{g['peak_rss_mb']['ratio']:.2f}). "
                  "Wall seconds on a shared machine follow the other jobs' load as much as the sites; the CPU "
                  "seconds of the process tree do not."]  # fmt: skip
    lines += ["", f"![scale]({LINK}/federation_scale.png)", ""]
    page.sections.append(lines)
    g = growth.get("plain") or next(iter(growth.values()), None)
    if g:
        wall, mem, cpu = g["round_s"], g["peak_rss_mb"], g.get("cpu_s")
        page.goal("scale", "time per round and peak memory grow at most linearly with sites (10 to 100)",
                  f"x{g['site_ratio']:.0f} sites: time per round x{wall['ratio']:.1f} ({wall['per_site']:.2f} s/site), "
                  f"peak memory x{mem['ratio']:.2f} ({mem['per_site']:.1f} MB/site)" +
                  (f"; CPU time of the whole run x{cpu['ratio']:.1f} ({cpu['per_site']:.2f} s/site)" if cpu else ""),
                  wall["ratio"] <= g["site_ratio"] and mem["ratio"] <= g["site_ratio"])  # fmt: skip
