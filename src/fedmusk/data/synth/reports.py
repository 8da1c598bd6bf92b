"""Surgical pathology reports and tile captions for the synthetic cohort, written from the latent biology.

Each site writes in its own house style ("synoptic" checklist, "narrative" prose or "structured" sections) and
spelling, and every report varies its phrasing. Reports carry what a pathologist reports: specimen, diagnosis,
grade and pattern, size, pleura, lymphovascular invasion, margins, lymph nodes, pTNM and stage, necrosis, PD-L1 TPS
and Ki-67, with realistic observer noise (grade off by one now and then, rounded percentages, tests not done).
They never mention tumour-infiltrating lymphocytes: that signal is in the tissue only.

Only the site-local pseudonym identifies a case. With ``fake_identifier=True`` a clearly fake medical record number
line (``MRN: 000xxxxx``) is planted so that the site validator's identifier warnings have something to find.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedmusk.data.synth.outcomes import CaseBiology

REPORT_STYLES = ("synoptic", "narrative", "structured")

_GRADE_WORDS = {1: "well differentiated", 2: "moderately differentiated", 3: "poorly differentiated"}
_PATTERN_MIX = {
    "lepidic": ("lepidic", "acinar", "papillary"),
    "acinar": ("acinar", "lepidic", "solid"),
    "papillary": ("papillary", "acinar", "lepidic"),
    "solid": ("solid", "acinar", "micropapillary"),
    "micropapillary": ("micropapillary", "acinar", "solid"),
}
_STATIONS = ("2R", "4R", "4L", "5", "7", "10R", "10L", "11R", "11L")


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


class _Speller:
    """British or American spelling of the handful of words that differ."""

    def __init__(self, british: bool):
        self.british = british

    def __call__(self, text: str) -> str:
        if self.british:
            return text
        for gb, us in (("tumour", "tumor"), ("Tumour", "Tumor"), ("aematoxylin", "ematoxylin"),
                       ("oedema", "edema"), ("colour", "color"), ("centimetre", "centimeter")):  # fmt: skip
            text = text.replace(gb, us)
        return text


def _reported_grade(bio: CaseBiology, rng) -> int:
    """Inter-observer variation: about one report in eight grades one step off."""
    if rng.random() < 0.125:
        return int(np.clip(bio.grade + _pick(rng, (-1, 1)), 1, 3))
    return bio.grade


def _percent(value: float, rng, step: int = 5) -> int:
    return int(max(step, step * round((value + rng.normal(0, 3)) / step)))


def _tps_text(bio: CaseBiology, rng) -> str | None:
    if rng.random() < 0.08:
        return None  # not performed
    tps = bio.pdl1_tps
    if tps < 1:
        return "<1%"
    if tps < 10:
        return f"{max(1, int(round(tps)))}%"
    return f"{int(min(100, 5 * round(tps / 5)))}%"


def _necrosis_text(bio: CaseBiology, rng) -> str:
    if bio.necrosis == 0:
        return _pick(rng, ("not identified", "absent", "none seen"))
    if bio.necrosis < 0.12:
        return _pick(rng, ("focal", "present, focal", "present (<10%)"))
    pct = _percent(100 * bio.necrosis, rng)
    if pct >= 30:
        return _pick(rng, (f"extensive, approximately {pct}%", f"extensive ({pct}% of tumour)"))
    return _pick(rng, (f"present, approximately {pct}%", f"present ({pct}% of tumour)", f"present ({pct}%)"))


def _pattern_text(bio: CaseBiology, rng) -> str:
    names = _PATTERN_MIX[bio.pattern]
    main = int(rng.integers(45, 80))
    second = int(rng.integers(10, 100 - main))
    main, second = 5 * round(main / 5), 5 * round(second / 5)
    third = 100 - main - second
    parts = [f"{names[0]} {main}%", f"{names[1]} {second}%"] + ([f"{names[2]} {third}%"] if third > 0 else [])
    return ", ".join(parts)


def _nodes_text(bio: CaseBiology, rng) -> str:
    pos, total = bio.nodes_positive, bio.nodes_examined
    if pos == 0:
        return _pick(
            rng,
            (
                f"{total} lymph nodes, all negative for metastatic carcinoma (0/{total})",
                f"no metastatic carcinoma in {total} lymph nodes examined (0/{total})",
                f"0 of {total} lymph nodes involved (0/{total})",
            ),
        )
    where = "hilar/intrapulmonary" if bio.pn == "N1" else "mediastinal"
    return _pick(
        rng,
        (
            f"metastatic carcinoma in {pos} of {total} lymph nodes ({pos}/{total}), {where}",
            f"{pos}/{total} lymph nodes positive for metastatic adenocarcinoma ({where} stations)",
            f"metastatic adenocarcinoma present in {pos} of {total} nodes ({pos}/{total}); {where} stations involved",
        ),
    )


def _margin_text(bio: CaseBiology, rng) -> str:
    if bio.margin_positive:
        return _pick(rng, ("bronchial margin involved by carcinoma", "parenchymal margin positive for carcinoma"))
    d = bio.margin_cm
    return _pick(
        rng,
        (
            f"uninvolved; closest margin (parenchymal) {d} cm",
            f"negative for tumour, nearest margin {d} cm",
            f"all resection margins free of tumour (closest {d} cm)",
        ),
    )


def _stations(bio: CaseBiology, rng) -> str:
    chosen = sorted(rng.choice(len(_STATIONS), size=int(rng.integers(2, 5)), replace=False))
    return ", ".join(_STATIONS[i] for i in chosen)


@dataclass(frozen=True)
class _Findings:
    """What the pathologist writes down: the biology seen through rounding and observer variation."""

    grade: int
    tps: str | None  # None: not performed
    ki67: str | None  # None: not reported
    specimen: str
    nodes_specimen: str
    stage_line: str
    size: str
    pleura: str
    lvi: str


def _findings(bio: CaseBiology, rng) -> _Findings:
    if bio.pleural_invasion:
        pleura = _pick(rng, ("present (PL1)", "present, elastic layer breached"))
    else:
        pleura = _pick(rng, ("not identified (PL0)", "not identified"))
    lvi = _pick(rng, ("present", "identified", "present, focal")) if bio.lvi else _pick(
        rng, ("not identified", "absent", "none seen")
    )  # fmt: skip
    return _Findings(
        grade=_reported_grade(bio, rng),
        tps=_tps_text(bio, rng),
        ki67=f"{_percent(bio.ki67, rng)}%" if rng.random() < 0.7 else None,
        specimen=f"{bio.side.capitalize()} {bio.lobe} lobe, {bio.procedure}",
        nodes_specimen=f"Lymph nodes, stations {_stations(bio, rng)}, excision",
        stage_line=f"pT{bio.pt[1:]} pN{bio.pn[1:]}" + (f" pM{bio.pm[1:]}" if bio.pm != "M0" else ""),
        size=f"{bio.size_cm:.1f} cm",
        pleura=pleura,
        lvi=lvi,
    )


def write_report(
    case_id: str, bio: CaseBiology, style: str, british: bool, rng: np.random.Generator, fake_identifier: bool = False
) -> str:
    """A surgical pathology report for one case in the site's ``style`` (one of REPORT_STYLES)."""
    writers = {"synoptic": _synoptic, "narrative": _narrative, "structured": _structured}
    if style not in writers:
        raise ValueError(f"unknown report style {style!r}; expected one of {', '.join(REPORT_STYLES)}")
    header = ["SURGICAL PATHOLOGY REPORT", f"Case: {case_id}"]
    if fake_identifier:
        header.append(f"MRN: 000{int(rng.integers(10000, 99999))}")
    body = writers[style](bio, _findings(bio, rng), rng)
    return _Speller(british)("\n".join(header + body) + "\n")


def _synoptic(bio: CaseBiology, f: _Findings, rng) -> list[str]:
    stage_group = f", stage {bio.stage_label}" if rng.random() < 0.7 else ""
    lines = [
        "",
        "SPECIMEN:",
        f"A. {f.specimen}",
        f"B. {f.nodes_specimen}",
        "",
        "DIAGNOSIS:",
        f"A. Invasive adenocarcinoma, {bio.pattern} predominant ({_pattern_text(bio, rng)}).",
        f"B. {_cap(_nodes_text(bio, rng))}.",
        "",
        "SYNOPTIC SUMMARY (lung resection):",
        f"Procedure: {bio.procedure}",
        f"Histologic type: invasive non-mucinous adenocarcinoma, {bio.pattern} predominant",
        f"Histologic grade: G{f.grade}, {_GRADE_WORDS[f.grade]}",
        f"Tumour size: {f.size} (greatest dimension)",
        f"Visceral pleural invasion: {f.pleura}",
        f"Lymphovascular invasion: {f.lvi}",
        f"Tumour necrosis: {_necrosis_text(bio, rng)}",
        f"Margins: {_margin_text(bio, rng)}",
        f"Regional lymph nodes: {bio.nodes_positive}/{bio.nodes_examined} involved",
        f"Pathologic stage (AJCC 8th edition): {f.stage_line}{stage_group}",
        "",
        "ANCILLARY STUDIES:",
        f"PD-L1 (22C3) tumour proportion score: {f.tps}" if f.tps else "PD-L1 (22C3): not performed on this specimen",
    ]
    if f.ki67:
        lines.append(f"Ki-67 proliferation index: {f.ki67}")
    return lines + ["", "COMMENT:", _comment(bio, f.grade, rng)]


def _narrative(bio: CaseBiology, f: _Findings, rng) -> list[str]:
    parts = [
        f"Received in formalin is a {bio.procedure} specimen from the {bio.side} {bio.lobe} lobe.",
        f"Sectioning reveals a firm tan-white tumour measuring {f.size} in greatest dimension.",
        f"Microscopically there is an invasive adenocarcinoma, predominantly {bio.pattern} "
        f"({_pattern_text(bio, rng)}), {_GRADE_WORDS[f.grade]} (grade {f.grade}).",
    ]
    if bio.necrosis > 0 or rng.random() < 0.5:
        parts.append(f"Tumour necrosis: {_necrosis_text(bio, rng)}.")
    lvi = _pick(rng, ("is identified", "is present")) if bio.lvi else _pick(rng, ("is not identified", "is absent"))
    parts.append(f"Lymphovascular invasion {lvi}; visceral pleural invasion {f.pleura}.")
    parts.append(f"Margin status: {_margin_text(bio, rng)}.")
    parts.append(f"Lymph nodes: {_nodes_text(bio, rng)}.")
    immuno = [f"PD-L1 (SP263) shows a tumour proportion score of {f.tps}." if f.tps else "PD-L1 was not requested."]
    if f.ki67:
        immuno.append(f"Ki-67 labels approximately {f.ki67} of tumour nuclei.")
    return [
        "",
        "CLINICAL HISTORY: Lung mass, resection.",
        "",
        "REPORT:",
        " ".join(parts),
        "",
        f"Staging: {f.stage_line} (AJCC 8th edition).",
        "",
        "IMMUNOHISTOCHEMISTRY: " + " ".join(immuno),
        "",
        "COMMENT: " + _comment(bio, f.grade, rng),
    ]


def _structured(bio: CaseBiology, f: _Findings, rng) -> list[str]:
    lines = [
        "",
        "Specimen(s) received:",
        f"  1: {f.specimen}",
        f"  2: {f.nodes_specimen}",
        "",
        "Final diagnosis:",
        f"  1: Adenocarcinoma of lung, {bio.pattern} pattern predominant, grade {f.grade} of 3.",
        f"     Size {f.size}. Pleura: {f.pleura}. LVI: {f.lvi}. Necrosis: {_necrosis_text(bio, rng)}.",
        f"     Margins: {_margin_text(bio, rng)}.",
        f"  2: {_cap(_nodes_text(bio, rng))}.",
        "",
        f"pTNM: {f.stage_line}",
        f"PD-L1 TPS: {f.tps or 'not done'}",
    ]
    if f.ki67:
        lines.append(f"Ki-67: {f.ki67}")
    return lines + ["", "Comment: " + _comment(bio, f.grade, rng)]


def _comment(bio: CaseBiology, grade: int, rng) -> str:
    options = [
        "Molecular testing (EGFR, ALK, ROS1, KRAS) has been requested and will be reported separately.",
        "Findings were discussed at the thoracic multidisciplinary meeting.",
        "The immunoprofile (TTF-1 positive, p40 negative) supports a pulmonary adenocarcinoma.",
        "Sections of the background lung show mild emphysematous change.",
    ]
    if grade == 3:
        options.append("The high-grade pattern (solid/micropapillary) exceeds 20% of the tumour.")
    if bio.margin_positive:
        options.append("Please note the involved margin.")
    n = int(rng.integers(1, 3))
    return " ".join(options[i] for i in sorted(rng.choice(len(options), size=n, replace=False)))


# --- captions for pretraining tiles -----------------------------------------------------------------------------


def describe_tile(fractions: dict[str, float], grade: int, til: float, british: bool, rng: np.random.Generator) -> str:
    """A one-sentence caption of what a tile shows, from its compartment ``fractions`` (tumour, stroma, necrosis,
    lymphoid, lumen) and the biology it was drawn from."""
    sp = _Speller(british)
    bits = []
    tumour = fractions.get("tumour", 0.0) + fractions.get("lumen", 0.0)
    if tumour >= 0.2:
        kind = {1: "well differentiated", 2: "moderately differentiated", 3: "poorly differentiated"}[grade]
        growth = {1: "with gland formation", 2: "forming irregular glands", 3: "growing in solid sheets"}[grade]
        bits.append(f"{kind} adenocarcinoma {growth}")
        if grade == 3:
            bits.append(_pick(rng, ("marked nuclear pleomorphism", "large hyperchromatic nuclei")))
    if fractions.get("stroma", 0.0) >= 0.3:
        bits.append(_pick(rng, ("desmoplastic stroma", "fibrous stroma", "collagenous stroma")))
    if fractions.get("necrosis", 0.0) >= 0.1:
        bits.append(_pick(rng, ("tumour necrosis", "areas of necrosis with nuclear debris")))
    if fractions.get("lymphoid", 0.0) >= 0.05:
        bits.append("a lymphoid aggregate")
    if til >= 0.55:
        bits.append(_pick(rng, ("brisk tumour-infiltrating lymphocytes", "dense lymphocytic infiltrate")))
    elif til <= 0.2:
        bits.append("scant lymphocytes")
    if not bits:
        bits.append("lung tissue")
    opener = _pick(
        rng, ("H&E-stained section of", "Histopathology image of", "Haematoxylin and eosin stain showing", "")
    )
    text = bits[0] if len(bits) == 1 else ", ".join(bits[:-1]) + " and " + bits[-1]
    return sp(_cap((opener + " " + text).strip()) + ".")


def report_body(report: str) -> str:
    """A report without its header (title, case pseudonym, any planted identifier): text for pretraining."""
    lines = report.splitlines()
    while lines and (not lines[0].strip() or lines[0].startswith(("SURGICAL PATHOLOGY REPORT", "Case:", "MRN:"))):
        lines.pop(0)
    return "\n".join(lines) + "\n"
