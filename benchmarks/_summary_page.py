"""The summary page under construction (sections, goals, machines) and the number formats of report.py.

Imported as a sibling module (see ``_report.py``).
"""

from __future__ import annotations

LINK = "benchmarks/results"  # how the README reaches results/


def fmt(v, digits=2) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def fmt_pct(v, digits=1, sign=False) -> str:
    return "-" if v is None else f"{100 * v:{'+' if sign else ''}.{digits}f}%"


def fmt_num(v) -> str:
    """A rate for a table: thousands separated above 100, three significant digits below."""
    return "-" if v is None else f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def fmt_load(v) -> str:
    """The 1-minute load average of a [1, 5, 15]-minute triple (or a single number)."""
    if isinstance(v, list | tuple):
        v = v[0] if v else None
    return "?" if v is None else f"{float(v):.1f}"


def _status(met: bool | None) -> str:
    return "not run" if met is None else "met" if met else "**NOT met**"


class Page:
    """The summary under construction: sections of markdown and the goals table's rows."""

    def __init__(self):
        self.sections: list[list[str]] = []
        self.goals: list[tuple[str, str, str, str]] = []  # area, goal, result, status
        self.machines: list[str] = []

    def goal(self, area: str, goal: str, result: str, met: bool | None) -> None:
        self.goals.append((area, goal, result, _status(met)))

    def machine(self, name: str, env: dict | None, extra: str = "") -> None:
        if env:
            load = (f"1-min load average {fmt_load(env.get('load_before'))} before, "
                    f"{fmt_load(env.get('load_after'))} after") if env.get("load_before") is not None else ""
            self.machines.append(f"- `{name}`: {env.get('cpu', env.get('device_name', '?'))}, "
                                 f"{env.get('cores', '?')} cores, torch {env.get('torch', '?')}"
                                 + (f", {load}" if load else "") + (f"; {extra}" if extra else ""))  # fmt: skip
