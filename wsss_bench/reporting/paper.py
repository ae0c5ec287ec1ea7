"""The CLDF paper's reference numbers (docs/protocol.md section 13) and which of our runs fill its rows.

Tables 1-3 of Zeng et al. are stored here as data, copied from docs/protocol.md section 13 (mean and
population std per slice over the paper's test sets).  ``report --with-paper`` prints them
beside ours; :func:`resolve` says which of our method labels fills a paper row for a task.

A method label is ``<cam spec>+<refiner spec>`` (the runner's ``method`` column), where the CAM
part may join several sources with '+' (``amecam+mg+cldf``).  A paper row is matched by a
:class:`Rule`: the CAM sources in order, the refiner, and the parameters that identify the
variant.  Parameters that only change speed (``chunk``) are ignored; any other non-default
parameter makes a different method, which fills no paper row.

Row -> method label (docs/metrics.md repeats this table):

==========================  ==========================================================
paper row                   our method label
==========================  ==========================================================
GradCAM                     gradcam+threshold
GradCAM++                   gradcampp+threshold (supplementary)
ScoreCAM                    scorecam+threshold; (library): scorecam[variant=library]+threshold
SEAM                        seam+threshold
LayerCAM                    layercam+threshold (paper fusion); (library):
                            layercam[fusion=library]+threshold; (layer4):
                            layercam[layers=layer4]+threshold
CDM                         cdm+threshold
AME-CAM                     amecam+threshold
DiG                         dig+threshold
MG (Table 3)                mg+threshold
CLDF                        brats: amecam+mg+cldf or amecam+cldf (cldf adds MG itself
                            while use_mg=true, its default); FLARE: layercam+mg+cldf or
                            layercam+cldf
FSL (UNet)                  fsl
<SRC>+MG+CL (Table 3)       <src>+mg+cldf or <src>+cldf
<SRC>+CL (Table 3)          <src>+cldf[use_mg=false]
MG+CL (Table 3)             mg+cldf
Table 2 <backbone>          the task's CLDF seeds + cldf[backbone=resnet18|resnet50|
                            unet-encoder]; CDM: the default backbone
==========================  ==========================================================

These are the rows of ``benchmarks/table{1,2,3}.toml``; a test plans every row of those files
into its method label and checks that it fills the row of the same name.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

#: column order of the paper's tables (task ids of docs/protocol.md section 1)
TASKS = ("brats", "flare21-kidney", "flare21-spleen", "flare21-liver")
TABLE_TASKS = {"table1": TASKS, "table2": TASKS[:2], "table3": TASKS[:2]}
#: parameters that never change a result (speed only); they do not make a new method
IGNORED_PARAMS = frozenset({"chunk"})


def _parse(text: str) -> dict[str, tuple[float, float] | None]:
    """'0.392±0.29 0.286±0.24 ...' (Dice, IoU per task in TASKS order) -> {task/metric: (m, s)}."""
    out: dict[str, tuple[float, float] | None] = {}
    cells = text.split()
    for k, cell in enumerate(cells):
        task, metric = TASKS[k // 2], ("dice", "iou")[k % 2]
        if cell == "—":
            out[f"{task}/{metric}"] = None
        else:
            m, s = cell.split("±")
            out[f"{task}/{metric}"] = (float(m), float(s))
    return out


#: docs/protocol.md §13.1, Table 1 (BraTS21, Kidney, Spleen, Liver; Dice then IoU)
TABLE1 = {
    "GradCAM": _parse("0.392±0.29 0.286±0.24 0.335±0.31 0.251±0.27 0.243±0.29 0.175±0.23 0.261±0.22 0.170±0.16"),
    "ScoreCAM": _parse("0.318±0.11 0.195±0.08 0.208±0.13 0.122±0.08 0.138±0.13 0.080±0.08 0.438±0.19 0.299±0.16"),
    "SEAM": _parse("0.342±0.08 0.210±0.06 0.257±0.09 0.123±0.06 0.114±0.09 0.063±0.05 0.408±0.18 0.271±0.14"),
    "LayerCAM": _parse("0.670±0.15 0.521±0.16 0.514±0.23 0.380±0.22 0.492±0.21 0.352±0.19 0.721±0.17 0.587±0.18"),
    "CDM": _parse("0.563±0.02 0.450±0.02 0.322±0.19 0.207±0.14 0.374±0.20 0.249±0.16 0.392±0.19 0.260±0.14"),
    "AME-CAM": _parse("0.827±0.14 0.725±0.18 0.413±0.17 0.288±0.13 0.560±0.13 0.399±0.12 0.556±0.18 0.406±0.17"),
    "DiG": _parse("0.535±0.17 0.381±0.15 0.378±0.14 0.242±0.11 0.313±0.23 0.208±0.17 0.470±0.19 0.326±0.16"),
    "CLDF": _parse("0.880±0.11 0.798±0.14 0.740±0.20 0.621±0.21 0.623±0.15 0.470±0.16 0.778±0.15 0.658±0.18"),
    "FSL (UNet)": _parse("0.920±0.09 0.861±0.12 0.949±0.08 0.910±0.09 — — — —"),
}
#: docs/protocol.md §13.2, Table 2 (BraTS21, Kidney)
TABLE2 = {
    "ResNet18": _parse("0.640±0.32 0.542±0.30 0.448±0.25 0.320±0.20"),
    "ResNet50": _parse("0.775±0.15 0.652±0.16 0.644±0.20 0.504±0.20"),
    "UNet Encoder": _parse("0.760±0.13 0.629±0.15 0.605±0.21 0.465±0.21"),
    "CDM": _parse("0.880±0.11 0.798±0.14 0.740±0.20 0.621±0.21"),
}
#: docs/protocol.md §13.3, Table 3 (BraTS21, Kidney)
TABLE3 = {
    "LayerCAM": _parse("0.670±0.15 0.521±0.16 0.514±0.23 0.380±0.22"),
    "AME-CAM": _parse("0.827±0.14 0.725±0.18 0.413±0.17 0.288±0.13"),
    "MG": _parse("0.692±0.12 0.541±0.13 0.339±0.16 0.263±0.13"),
    "LayerCAM+CL": _parse("0.776±0.13 0.650±0.16 0.692±0.30 0.598±0.30"),
    "AME-CAM+CL": _parse("0.847±0.14 0.755±0.17 0.631±0.15 0.476±0.14"),
    "MG+CL": _parse("0.800±0.11 0.680±0.14 0.622±0.21 0.482±0.21"),
    "LayerCAM+MG+CL": _parse("0.795±0.12 0.675±0.15 0.740±0.20 0.621±0.21"),
    "AME-CAM+MG+CL": _parse("0.880±0.11 0.798±0.14 0.698±0.15 0.554±0.16"),
}
NUMBERS = {"table1": TABLE1, "table2": TABLE2, "table3": TABLE3}
TITLES = {"table1": "Table 1: WSSS methods on BraTS21 and FLARE21",
          "table2": "Table 2: CLDF with different feature extractors",
          "table3": "Table 3: pixel selection for contrastive learning"}
NOTES = {"table1": "Paper: no FSL values for spleen and liver; CDM's BraTS std (0.02) looks fold-level, "
                   "not per-slice (docs/protocol.md §13.1)."}
#: rows the paper lists as upper bounds: they never take the bold
NOT_BOLD = frozenset({"FSL (UNet)"})


# --------------------------------------------------------------------------- method labels
def split_top(text: str, sep: str = "+") -> list[str]:
    """Split on ``sep`` outside brackets: 'layercam[layers=a+b]+cldf' -> ['layercam[layers=a+b]', 'cldf']."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p for p in parts if p]


def parse_spec(text: str) -> tuple[str, dict[str, str]]:
    """'scorecam[chunk=64,variant=library]' -> ('scorecam', {'chunk': '64', 'variant': 'library'})."""
    text = text.strip()
    if "[" not in text:
        return text, {}
    name, inner = text.split("[", 1)
    inner = inner.rsplit("]", 1)[0]
    params = {}
    for item in split_top(inner, ","):
        k, _, v = item.partition("=")
        params[k.strip()] = v.strip()
    return name.strip(), params


@dataclass(frozen=True)
class Parsed:
    """A method label taken apart: CAM sources (name, params) in order, refiner (name, params)."""

    cams: tuple[tuple[str, tuple[tuple[str, str], ...]], ...]
    refiner: str
    refiner_params: tuple[tuple[str, str], ...]


def parse_method(method: str, cam: str | None = None, refiner: str | None = None) -> Parsed:
    """Parse a method label, preferring the results' ``cam`` and ``refiner`` columns when given."""
    if refiner is None:
        parts = split_top(method)
        refiner, cam_parts = parts[-1], parts[:-1]
    else:
        cam_parts = split_top(cam or "")
    rname, rparams = parse_spec(refiner)
    cams = tuple((n, tuple(sorted(p.items()))) for n, p in (parse_spec(c) for c in cam_parts))
    return Parsed(cams, rname, tuple(sorted(rparams.items())))


def _norm(value: str) -> str:
    v = str(value).strip().strip("'\"")
    return v.lower() if v.lower() in ("true", "false", "none") else v


def _significant(params: Iterable[tuple[str, str]]) -> dict[str, str]:
    return {k: _norm(v) for k, v in params if k not in IGNORED_PARAMS}


@dataclass(frozen=True)
class Rule:
    """A paper row's method: CAM source names in order (with identifying params) and refiner."""

    cams: tuple[str, ...]
    refiner: str
    cam_params: Mapping[str, str] = field(default_factory=dict)  # params of the first source
    refiner_params: Mapping[str, str] = field(default_factory=dict)

    def matches(self, p: Parsed) -> bool:
        if p.refiner != self.refiner or tuple(n for n, _ in p.cams) != self.cams:
            return False
        for i, (_, params) in enumerate(p.cams):
            want = dict(self.cam_params) if i == 0 else {}
            if _significant(params) != {k: _norm(v) for k, v in want.items()}:
                return False
        return _significant(p.refiner_params) == {k: _norm(v) for k, v in self.refiner_params.items()}

    def label(self) -> str:
        def spec(name: str, params: Mapping[str, str]) -> str:
            inner = ",".join(f"{k}={params[k]}" for k in sorted(params))
            return f"{name}[{inner}]" if inner else name

        cams = [spec(c, self.cam_params if i == 0 else {}) for i, c in enumerate(self.cams)]
        return "+".join([*cams, spec(self.refiner, self.refiner_params)])


def _thr(cam: str, **params: str) -> Rule:
    return Rule((cam,), "threshold", params)


#: the task's CLDF CAM source (docs/protocol.md section 1)
CLDF_CAM = {"brats": "amecam", "flare21-kidney": "layercam", "flare21-spleen": "layercam",
            "flare21-liver": "layercam"}


def cam_mg_cl(cam: str, **refiner_params: str) -> list[Rule]:
    """<CAM>+MG+CL: MG named as a source, or added by cldf itself (``use_mg`` defaults to true)."""
    return [Rule((cam, "mg"), "cldf", {}, refiner_params), Rule((cam,), "cldf", {}, refiner_params)]


def cldf_rules(task: str, **refiner_params: str) -> list[Rule]:
    """CLDF of docs/protocol.md §9: the task's CAM source plus MG (Table 1's CLDF row)."""
    return cam_mg_cl(CLDF_CAM.get(task, "layercam"), **refiner_params)


#: Table 2 backbone names accepted for each row (the backbone plugins' names)
TABLE2_BACKBONES = {"ResNet18": ("resnet18",), "ResNet50": ("resnet50",),
                    "UNet Encoder": ("unet-encoder", "unet_encoder")}


def row_rules(table: str, row: str, task: str) -> list[Rule]:
    """The rules whose first match in the results fills ``row`` of ``table`` for ``task``."""
    if table == "table2":
        if row == "CDM":
            return [*cldf_rules(task), *cldf_rules(task, backbone="cdm")]
        return [r for b in TABLE2_BACKBONES.get(row, ()) for r in cldf_rules(task, backbone=b)]
    fixed = {
        "GradCAM": [_thr("gradcam")], "GradCAM++": [_thr("gradcampp")],
        "ScoreCAM": [_thr("scorecam")], "ScoreCAM (library)": [_thr("scorecam", variant="library")],
        "SEAM": [_thr("seam")], "LayerCAM": [_thr("layercam")],
        "LayerCAM (library)": [_thr("layercam", fusion="library")],
        "LayerCAM (layer4)": [_thr("layercam", layers="layer4")],
        "CDM": [_thr("cdm")], "AME-CAM": [_thr("amecam")], "DiG": [_thr("dig")], "MG": [_thr("mg")],
        "FSL (UNet)": [Rule((), "fsl")], "CLDF": cldf_rules(task),
        "LayerCAM+CL": [Rule(("layercam",), "cldf", {}, {"use_mg": "false"})],
        "AME-CAM+CL": [Rule(("amecam",), "cldf", {}, {"use_mg": "false"})],
        "MG+CL": [Rule(("mg",), "cldf")], "LayerCAM+MG+CL": cam_mg_cl("layercam"),
        "AME-CAM+MG+CL": cam_mg_cl("amecam"),
    }
    return fixed.get(row, [])


#: rows of each table, in the paper's order, and the supplementary rows (docs/protocol.md section 9)
ROWS = {
    "table1": ["GradCAM", "ScoreCAM", "SEAM", "LayerCAM", "CDM", "AME-CAM", "DiG", "CLDF", "FSL (UNet)"],
    "table2": ["ResNet18", "ResNet50", "UNet Encoder", "CDM"],
    "table3": ["LayerCAM", "AME-CAM", "MG", "LayerCAM+CL", "AME-CAM+CL", "MG+CL", "LayerCAM+MG+CL", "AME-CAM+MG+CL"],
}
SUPPLEMENTARY = {"table1": ["GradCAM++", "ScoreCAM (library)", "LayerCAM (library)", "LayerCAM (layer4)"]}


def resolve(table: str, row: str, task: str, available: Mapping[str, Parsed]) -> str | None:
    """The method label (a key of ``available``) that fills ``row`` for ``task``, or None."""
    for rule in row_rules(table, row, task):
        hits = sorted(m for m, p in available.items() if rule.matches(p))
        if hits:
            return hits[0]
    return None


def paper_row_of(method: Parsed, task: str, tables: Sequence[str] = ("table3", "table1")) -> tuple[str, str] | None:
    """(table, row) of the paper numbers a method stands beside, or None (first table wins).

    Table 3 comes first because its rows name the seeds exactly (``layercam+mg+cldf`` on BraTS
    is LayerCAM+MG+CL, which Table 1 has no row for); where both tables hold a method
    (``amecam+mg+cldf`` on BraTS) they agree.
    """
    for table in tables:
        for row in [*ROWS[table], *SUPPLEMENTARY.get(table, [])]:
            if any(rule.matches(method) for rule in row_rules(table, row, task)):
                if row in NUMBERS[table]:
                    return table, row
    return None


def value(table: str, row: str, task: str, metric: str) -> tuple[float, float] | None:
    """(mean, std) the paper reports, or None (no such row, task or value)."""
    return NUMBERS.get(table, {}).get(row, {}).get(f"{task}/{metric}")


def as_json() -> str:
    """Every reference number, for the docs and the manifest."""
    return json.dumps({t: {r: {k: v for k, v in cells.items()} for r, cells in rows.items()}
                       for t, rows in NUMBERS.items()}, indent=1)


__all__ = ["TABLE1", "TABLE2", "TABLE3", "NUMBERS", "ROWS", "SUPPLEMENTARY", "Rule", "Parsed",
           "parse_method", "resolve", "paper_row_of", "value", "split_top"]
