"""Figures from a run (``wsss-bench figures RUN_DIR``): matplotlib (Agg), PNG and PDF.

- **Qualitative grid** (the paper's Fig. 3): per task, rows of test slices; columns: the image,
  the ground truth, then each method's mask, all as overlays on the image (ground truth as a
  sky-blue outline, prediction as an orange fill and outline: a pair that stays apart under
  the common colour-vision deficiencies, unlike green/red), each panel labelled with its slice
  Dice.  **Slice rule** (documented, not
  hand-picked): take the best WSSS method of the task (highest all-slice mean Dice under the
  gate; FSL excluded); among its *positive* test slices, take those whose Dice is nearest to
  its median positive-slice Dice, at most one per case, ties broken by (case id, z); ``rows``
  of them per task.  Columns: at most 8 methods, those that fill a row of the paper's
  Table 1/3 first (in the paper's order), then the others in the results' order.  The image
  channel is the first one (FLAIR for BraTS, the CT window for FLARE), shown in the
  radiological view (anterior up, patient right on the viewer's left).  Needs the run's
  stored predictions (:mod:`wsss_bench.reporting.export_masks`).
- **Ablation curves** (Fig. 4): all-slice mean Dice vs the CLDF decoder's ``out_dim`` and
  vs its ``decoder_depth``, one line per task and seed set, 95% bootstrap CI as error bars;
  drawn when the run holds CLDF cells that vary one of them (the other at its default,
  ``out_dim`` 16 and ``decoder_depth`` 4, docs/methods/cldf.md).  The series are drawn
  slightly apart on x, with their own marker and line style, so error bars never hide each other.
- **Boxplots**: per task, per-slice Dice of each method over the positive test slices
  (negatives score 0 or 1 by the empty rule and would hide the spread), mean as a diamond.

**For a paper**: every figure is laid out for a journal column, ``size="single"`` (3.5 in) or
``"double"`` (7.16 in, the default); methods carry the paper's names (``CLDF``, ``AME-CAM``)
where a cell fills a paper row, else their canonical label, in one order in every panel (the
paper's Table 1 / Table 3 order, then the rest); titles are wrapped to the figure's width;
legends sit outside the axes; PDFs embed TrueType (Type 42) fonts, which journals ask for.

Every function returns a :class:`Fig` (or None when the run lacks what it needs);
:func:`build_figures` also says why a figure was skipped.  matplotlib is imported lazily and
always through the object API (no pyplot state), so figures are safe in any process.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from wsss_bench.reporting import paper
from wsss_bench.reporting.export_masks import RunSlices, gated
from wsss_bench.reporting.layout import DEFAULT_TASK_LABELS, available
from wsss_bench.reporting.load import bootstrap_resamples, load_manifests, load_results
from wsss_bench.reporting.stats import aggregate
from wsss_bench.running.rundir import load_predictions
from wsss_bench.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

CLDF_DEFAULTS = {"out_dim": 16, "decoder_depth": 4}  # docs/methods/cldf.md
ABLATED = ("out_dim", "decoder_depth")
ABLATION_LABELS = {"out_dim": "decoder output dimension", "decoder_depth": "decoder depth (Linear layers)"}
# Okabe-Ito sky blue and orange: distinguishable with deuteranopia, protanopia and tritanopia
GT_COLOR = (0.337, 0.706, 0.914)
PRED_COLOR = (0.902, 0.624, 0.0)
FORMATS = ("png", "pdf")
#: the papers' names of the map sources, for legends
CAM_NAMES = {"gradcam": "GradCAM", "gradcampp": "GradCAM++", "scorecam": "ScoreCAM", "layercam": "LayerCAM",
             "seam": "SEAM", "amecam": "AME-CAM", "cdm": "CDM", "mg": "MG", "dig": "DiG"}
#: figure widths in inches: one journal column, or the full page width
SIZES = {"single": 3.5, "double": 7.16}
#: matplotlib settings in force while a figure is drawn and saved (TrueType fonts in PDF/PS)
RC = {"pdf.fonttype": 42, "ps.fonttype": 42, "font.size": 7, "axes.titlesize": 7, "axes.labelsize": 7,
      "xtick.labelsize": 6, "ytick.labelsize": 6, "legend.fontsize": 6, "figure.titlesize": 8}


@dataclass
class Fig:
    """A finished figure: file stem, caption and the matplotlib Figure."""

    name: str
    caption: str
    figure: Any

    def png(self, dpi: int = 150) -> bytes:
        import matplotlib

        buf = io.BytesIO()
        with matplotlib.rc_context(RC):
            self.figure.savefig(buf, format="png", dpi=dpi)
        return buf.getvalue()

    def save(self, out_dir: str | Path, formats: Sequence[str] = FORMATS, dpi: int = 300) -> list[Path]:
        import matplotlib

        from wsss_bench.cache import atomic_write_bytes

        paths = []
        for fmt in formats:
            buf = io.BytesIO()
            # fixed metadata: the same figure gives the same bytes
            meta = {"Creator": "wsss-bench"} if fmt == "png" else {"Creator": "wsss-bench", "CreationDate": None}
            with matplotlib.rc_context(RC):
                self.figure.savefig(buf, format=fmt, dpi=dpi, metadata=meta)
            path = Path(out_dir) / f"{self.name}.{fmt}"
            atomic_write_bytes(path, buf.getvalue())
            paths.append(path)
        return paths

    def close(self) -> None:
        self.figure.clear()


def _figure(width: float, height: float):
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def figure_width(size: str) -> float:
    """Inches for ``single`` / ``double`` column; anything else is a user mistake."""
    if size not in SIZES:
        raise UserError(f"figure size {size!r}: choose single (one journal column, {SIZES['single']} in) "
                        f"or double (page width, {SIZES['double']} in)")
    return SIZES[size]


def _suptitle(fig, text: str, width: float, fontsize: float = 8) -> None:
    """A title wrapped to the figure's width (about 0.5 em per character), never cut."""
    import textwrap

    chars = max(20, int(width * 72 / (0.55 * fontsize)))
    fig.suptitle(textwrap.fill(text, chars), fontsize=fontsize)


def paper_name(df: "pd.DataFrame", task: str, method: str) -> str:
    """The paper's name for ``method`` on ``task`` (``CLDF``, ``AME-CAM``, ``LayerCAM+CL``)
    when the cell fills a row of Table 1 or 3 (Table 2 rows as ``CLDF (ResNet18)``), else the
    method's own label."""
    avail = available(df[(df["task"] == task) & (df["method"] == method)])
    if method not in avail:
        return method
    hit = paper.paper_row_of(avail[method], task, ("table1", "table3", "table2"))
    if hit is None:
        return method
    table, row = hit
    return f"CLDF ({row})" if table == "table2" else row


def method_order(df: "pd.DataFrame", task: str, methods: Sequence[str]) -> list[str]:
    """One order for every panel: methods that fill a paper row in the paper's order (Table 1,
    its supplementary rows, Table 3), then the others in the results' order."""
    avail = available(df[(df["task"] == task) & df["method"].isin(list(methods))])
    order = list(dict.fromkeys([*paper.ROWS["table1"], *paper.SUPPLEMENTARY["table1"], *paper.ROWS["table3"]]))
    ranked = []
    for m in methods:
        hit = paper.paper_row_of(avail[m], task, ("table1", "table3")) if m in avail else None
        ranked.append((order.index(hit[1]) if hit and hit[1] in order else len(order), len(ranked), m))
    return [m for _, _, m in sorted(ranked)]


def _task_label(task: str) -> str:
    return DEFAULT_TASK_LABELS.get(task, task)


def _order_tasks(tasks) -> list[str]:
    return sorted({str(t) for t in tasks}, key=lambda t: (paper.TASKS.index(t) if t in paper.TASKS else 99, t))


def _is_fsl(df: "pd.DataFrame", method: str) -> bool:

    p = available(df[df["method"] == method]).get(method)
    return p is not None and p.refiner == "fsl"


def _wrap(label: str, width: int = 18) -> str:
    parts, line = [], ""
    for tok in paper.split_top(label):
        piece = tok if not line else "+" + tok
        if line and len(line) + len(piece) > width:
            parts.append(line + "+")
            line = tok
        else:
            line += piece
    parts.append(line)
    out = []  # a token longer than the width (a bracketed parameter list) is cut hard
    for part in parts:
        out += [part[i:i + width] for i in range(0, len(part), width)] or [""]
    return "\n".join(out)


# --------------------------------------------------------------------------- Fig. 3
def pick_slices(df: "pd.DataFrame", task: str, method: str, gate: str, rows: int = 2) -> list[tuple[str, int]]:
    """The slice rule of the module docstring: (case_id, z) of ``method``'s positive test
    slices nearest its median positive-slice Dice, one per case, ties by (case id, z)."""
    sel = df[(df["task"] == task) & (df["method"] == method) & (df["gate"] == gate) & (df["label"] == 1)]
    if "seed" in sel.columns and len(sel):
        sel = sel[sel["seed"] == sel["seed"].min()]
    if not len(sel):
        return []
    med = float(np.median(sel["dice"].to_numpy(np.float64)))
    cand = sorted(zip((sel["dice"] - med).abs().round(12), sel["case_id"].astype(str), sel["z"].astype(int)))
    chosen, seen = [], set()
    for _, case, z in cand:
        if case not in seen:
            chosen.append((case, z))
            seen.add(case)
        if len(chosen) == rows:
            break
    for _, case, z in cand:  # fewer cases than rows: fill with the next nearest slices
        if len(chosen) == rows:
            break
        if (case, z) not in chosen:
            chosen.append((case, z))
    return chosen


def best_method(df: "pd.DataFrame", task: str, gate: str, among: Sequence[str]) -> str | None:
    """Highest all-slice mean Dice under ``gate`` among ``among`` (FSL excluded; ties by label)."""
    sel = df[(df["task"] == task) & (df["gate"] == gate) & df["method"].isin(list(among))]
    means = sel.groupby("method")["dice"].mean()
    means = means[[not _is_fsl(df, m) for m in means.index]]
    if not len(means):
        return None
    top = means.max()
    return sorted(m for m, v in means.items() if v == top)[0]


def radiological(a: np.ndarray) -> np.ndarray:
    """A RAS slice (rows = x towards patient right, columns = y towards anterior) as seen in the
    radiological convention: anterior at the top, the patient's right on the viewer's left."""
    return np.flip(a, (0, 1)).T


def grid_methods(df: "pd.DataFrame", task: str, methods: Sequence[str], limit: int = 8) -> list[str]:
    """The grid's columns: methods that fill a paper row (paper order) first, then the rest."""
    return method_order(df, task, methods)[:limit]


def _overlay(ax, image: np.ndarray, mask: np.ndarray | None, color, gt: np.ndarray | None = None) -> None:
    image = radiological(image)
    mask = None if mask is None else radiological(mask)
    gt = None if gt is None else radiological(gt)
    ax.imshow(image, cmap="gray", vmin=0.0, vmax=max(float(image.max()), 1e-6), interpolation="nearest")
    for m, c, alpha in ((mask, color, 0.45), (gt, GT_COLOR, 0.0)):  # ground truth outline on top
        if m is None or not m.any():
            continue
        if alpha > 0:
            rgba = np.zeros(m.shape + (4,))
            rgba[..., :3] = c
            rgba[..., 3] = alpha * m
            ax.imshow(rgba, interpolation="nearest")
        ax.contour(m.astype(float), levels=[0.5], colors=[c], linewidths=0.9)
    ax.set_xticks([])
    ax.set_yticks([])


def qualitative_grid(df: "pd.DataFrame", manifests: Sequence[Mapping[str, Any]], gate: str = "label",
                     rows: int = 2, max_methods: int | None = None, predictions: Mapping | None = None,
                     size: str = "double", cache_dir: str | Path | None = None) -> Fig | None:
    """Fig. 3: image | ground truth | each method's mask, per chosen slice (module docstring)."""

    if predictions is None:
        dirs = sorted({str(m["_run_dir"]) for m in manifests if "_run_dir" in m})
        predictions = load_predictions(dirs) if dirs else {}
    if not predictions:
        return None
    width = figure_width(size)
    if max_methods is None:
        max_methods = 8 if size == "double" else 3
    seed0 = {}
    for (t, m, s) in predictions:  # one seed per (task, method): the smallest
        seed0[(t, m)] = min(s, seed0.get((t, m), s))
    panels = []  # (task, case, z, best, methods)
    for task in _order_tasks(t for t, _ in seed0):
        methods = [m for m in dict.fromkeys(map(str, df.loc[df["task"] == task, "method"])) if (task, m) in seed0]
        methods = grid_methods(df, task, methods, max_methods)
        best = best_method(df, task, gate, methods)
        if best is None:
            continue
        for case, z in pick_slices(df, task, best, gate, rows):
            panels.append((task, case, z, best, methods))
    if not panels:
        return None
    ncol = 2 + max(len(p[4]) for p in panels)
    cell = width / ncol
    title_lines = 3 if cell < 0.9 else 2
    fig = _figure(width, (cell + 0.12) * len(panels) + 0.1 * title_lines * len({p[0] for p in panels}) + 0.35)
    chars = max(6, int(cell * 72 / (0.62 * 6)))
    axes = fig.subplots(len(panels), ncol, squeeze=False)
    data_cache: dict[str, Any] = {}
    for r, (task, case, z, best, methods) in enumerate(panels):
        if task not in data_cache:
            data_cache[task] = RunSlices(manifests, task, cache_dir=cache_dir)
        imgs, gts = data_cache[task].slices([case], [z])
        image, gt = imgs[0, 0], gts[0]
        _overlay(axes[r, 0], image, None, PRED_COLOR)
        axes[r, 0].set_ylabel(f"{_task_label(task)}\n{case}\nz={z}", fontsize=6)
        _overlay(axes[r, 1], image, gt, GT_COLOR)
        for c, m in enumerate(methods, start=2):
            p = predictions[(task, m, seed0[(task, m)])]
            masks = gated(p, df, gate)
            hit = np.flatnonzero((p.case_ids == case) & (p.z == z))
            mask = masks[hit[0]] if len(hit) else np.zeros_like(gt)
            _overlay(axes[r, c], image, mask, PRED_COLOR, gt=gt)
            row = df[(df["task"] == task) & (df["method"] == m) & (df["gate"] == gate)
                     & (df["case_id"].astype(str) == case) & (df["z"] == z) & (df["seed"] == p.seed)]
            score = f"Dice {float(row['dice'].iloc[0]):.2f}" if len(row) else "not scored"
            axes[r, c].set_xlabel(score + ("*" if m == best else ""), fontsize=6)
            if r == 0 or panels[r - 1][0] != task:
                axes[r, c].set_title(_wrap(paper_name(df, task, m), chars), fontsize=6)
        for c in range(2 + len(methods), ncol):
            axes[r, c].axis("off")
        if r == 0 or panels[r - 1][0] != task:
            axes[r, 0].set_title("image", fontsize=6)
            axes[r, 1].set_title(_wrap("ground truth", chars), fontsize=6)
    _suptitle(fig, f"Qualitative results (gate={gate}); blue outline = ground truth, orange = prediction", width)
    return Fig("fig3_qualitative", f"Qualitative grid (gate={gate}): per task, the positive test slices nearest the "
               "median Dice of the best WSSS method (marked *), one per case, in the radiological view; "
               "sky-blue outline = ground truth, orange = prediction.", fig)


# --------------------------------------------------------------------------- Fig. 4
def ablation_points(df: "pd.DataFrame", gate: str = "label", resamples: int = 0) -> "pd.DataFrame":
    """Per (task, cam sources, ablated parameter, value): all-slice mean Dice and its CI.

    A CLDF cell belongs to the ``out_dim`` curve when every other refiner parameter (speed-only
    ones aside) is at its default, and likewise for ``decoder_depth``; the all-default cell
    sits on both curves.
    """
    import pandas as pd


    sel = df[df["gate"] == gate]
    avail = available(sel)
    rows = []
    for method, p in avail.items():
        if p.refiner != "cldf":
            continue
        params = {k: v for k, v in p.refiner_params if k not in paper.IGNORED_PARAMS}
        try:
            values = {k: int(float(params.get(k, CLDF_DEFAULTS[k]))) for k in ABLATED}
        except ValueError:
            continue
        if set(params) - set(ABLATED):
            continue  # another parameter changed too: not on these curves
        for k in ABLATED:
            other = [o for o in ABLATED if o != k]
            if all(values[o] == CLDF_DEFAULTS[o] for o in other):
                rows.append({"method": method, "cams": "+".join(n for n, _ in p.cams), "param": k, "value": values[k]})
    if not rows:
        return pd.DataFrame(columns=["task", "cams", "param", "value", "method", "dice_mean", "dice_ci_lo", "dice_ci_hi"])
    pts = pd.DataFrame(rows)
    agg = aggregate(sel[sel["method"].isin(pts["method"])], ci_resamples=resamples)
    out = pts.merge(agg[["task", "method", "dice_mean", "n_cases"]
                        + (["dice_ci_lo", "dice_ci_hi"] if resamples else [])], on="method")
    return out.sort_values(["param", "task", "cams", "value"]).reset_index(drop=True)


def ablation_curves(df: "pd.DataFrame", gate: str = "label", resamples: int = 0, size: str = "double") -> Fig | None:
    """Fig. 4: Dice vs decoder output dimension and vs depth (None without >= 2 values)."""
    pts = ablation_points(df, gate, resamples)
    params = [k for k in ABLATED if (pts["param"] == k).any()
              and pts[pts["param"] == k].groupby(["task", "cams"])["value"].nunique().max() >= 2]
    if not params:
        return None
    width = figure_width(size)
    ncols = len(params) if size == "double" else 1
    nrows = math.ceil(len(params) / ncols)
    fig = _figure(width, 2.3 * nrows + 0.6)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    styles = [("o", "-", "#0072B2"), ("s", "--", "#D55E00"), ("^", "-.", "#009E73"), ("D", ":", "#CC79A7")]
    counts = pts.groupby(["task", "cams", "param"])["value"].nunique()
    series = list(dict.fromkeys((str(t), str(c)) for (t, c, _), n in counts.items() if n >= 2))  # drawn curves
    series.sort(key=lambda s: (paper.TASKS.index(s[0]) if s[0] in paper.TASKS else 99, s))
    handles = {}
    for ax, k in zip(axes, params):
        sub = pts[pts["param"] == k]
        n = len(series)
        for i, (task, cams) in enumerate(series):
            g = sub[(sub["task"] == task) & (sub["cams"] == cams)]
            if g["value"].nunique() < 2:
                continue  # the default cell alone is no curve
            g = g.sort_values("value")
            x, y = g["value"].to_numpy(np.float64), g["dice_mean"].to_numpy()
            shift = (i - (n - 1) / 2) * 0.08  # dodge: series side by side, error bars never on top of each other
            x = x * 2.0 ** shift if k == "out_dim" else x + shift
            marker, ls, color = styles[i % len(styles)]
            seeds = "+".join(CAM_NAMES.get(c, c) for c in cams.split("+"))
            label = f"{_task_label(task)}: CLDF on {seeds}"
            if "dice_ci_lo" in g:
                err = np.vstack([y - g["dice_ci_lo"].to_numpy(), g["dice_ci_hi"].to_numpy() - y])
                h = ax.errorbar(x, y, yerr=np.clip(err, 0, None), marker=marker, ls=ls, color=color, ms=3.5,
                                lw=1.0, elinewidth=0.8, capsize=2, label=label)
            else:
                h = ax.plot(x, y, marker=marker, ls=ls, color=color, ms=3.5, lw=1.0, label=label)[0]
            handles.setdefault(label, h)
        if k == "out_dim":
            ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(sub["value"].unique()))
        ax.set_xticklabels([str(v) for v in sorted(sub["value"].unique())])
        ax.axvline(CLDF_DEFAULTS[k], color="0.6", lw=0.8, ls=":")
        ax.set_xlabel(ABLATION_LABELS[k])
        ax.set_ylabel(f"Dice (gate={gate})")
        ax.grid(alpha=0.3)
    for ax in axes[len(params):]:
        ax.axis("off")
    if handles:  # below the axes, never over the data
        fig.legend(list(handles.values()), list(handles), loc="outside lower center",
                   ncols=min(len(handles), 2 if size == "single" else 4), frameon=False)
    _suptitle(fig, "CLDF decoder ablation" + (" (error bars: case bootstrap 95% CI)" if resamples else ""), width)
    return Fig("fig4_ablation", f"CLDF decoder ablation (gate={gate}): Dice vs decoder output dimension and "
               "depth; dotted line = paper default.", fig)


# --------------------------------------------------------------------------- boxplots
def dice_boxplots(df: "pd.DataFrame", gate: str = "label", size: str = "double") -> Fig | None:
    """Per task: a box of per-slice Dice over positive test slices for each method."""
    sel = df[(df["gate"] == gate) & (df["label"] == 1)]
    tasks = _order_tasks(sel["task"].unique())
    if not tasks:
        return None
    width = figure_width(size)
    ncols = min(len(tasks), 2 if size == "double" else 1)
    nrows = math.ceil(len(tasks) / ncols)
    fig = _figure(width, 2.4 * nrows + 0.4)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, task in zip(axes, tasks):
        st = sel[sel["task"] == task]
        methods = method_order(df, task, list(dict.fromkeys(map(str, st["method"]))))
        data = [st.loc[st["method"] == m, "dice"].to_numpy(np.float64) for m in methods]
        bp = ax.boxplot(data, patch_artist=True, widths=0.6, medianprops={"color": "k"},
                        flierprops={"markersize": 2.5, "alpha": 0.5})
        for patch, m in zip(bp["boxes"], methods):
            patch.set_facecolor("#c9c9c9" if _is_fsl(df, m) else "#8fb8de")
        ax.scatter(range(1, len(methods) + 1), [d.mean() for d in data], marker="D", s=9, color="#D55E00",
                   zorder=3)
        ax.set_xticks(range(1, len(methods) + 1))
        crowded = len(methods) * 14 * 0.6 * 5.5 / 72 > width / ncols * 0.85  # labels would touch when slanted
        ax.set_xticklabels([_wrap(paper_name(df, task, m), 14) for m in methods], fontsize=5.5,
                           rotation=90 if crowded else 35, ha="center" if crowded else "right")
        ax.set_ylim(-0.03, 1.03)
        ax.set_ylabel("Dice per positive slice")
        ax.set_title(f"{_task_label(task)} ({st['case_id'].nunique()} cases, {len(st) // max(len(methods), 1)} slices)")
        ax.grid(axis="y", alpha=0.3)
    for ax in axes[len(tasks):]:
        ax.axis("off")
    _suptitle(fig, f"Per-slice Dice on positive test slices (gate={gate}); diamond = mean, grey = FSL upper bound",
              width)
    return Fig("dice_boxplots", f"Per-method Dice over positive test slices per task (gate={gate}); "
               "diamond = mean; grey box = the fully supervised upper bound.", fig)


# --------------------------------------------------------------------------- all of them
def build_figures(df: "pd.DataFrame", manifests: Sequence[Mapping[str, Any]], gate: str = "label",
                  resamples: int | None = None, size: str = "double",
                  cache_dir: str | Path | None = None) -> tuple[list[Fig], list[str]]:
    """Every figure the run supports, and one line per figure it could not make (and why)."""

    if gate not in set(map(str, df["gate"].unique())):
        raise UserError(f"no results for gate={gate}; the results hold gate(s) "
                        f"{', '.join(sorted(map(str, df['gate'].unique())))}")
    r = bootstrap_resamples(df, manifests) if resamples is None else resamples
    made, skipped = [], []
    figure_width(size)
    try:  # the grid alone needs images: without them, every other figure is still made
        grid = qualitative_grid(df, manifests, gate, size=size, cache_dir=cache_dir)
    except UserError as err:
        grid = None
        skipped.append(f"Qualitative grid: {err}")
    if grid is not None:
        made.append(grid)
    elif not any(s.startswith("Qualitative grid") for s in skipped):
        skipped.append("Qualitative grid: the run stored no predicted masks (predictions/*.npz).")
    curves = ablation_curves(df, gate, r, size=size)
    if curves is None:
        skipped.append("Ablation curves: the run holds no CLDF cells varying out_dim or decoder_depth "
                       "(e.g. --method 'cldf[out_dim=[4,8,16,32]]').")
    else:
        made.append(curves)
    box = dice_boxplots(df, gate, size=size)
    if box is None:
        skipped.append("Boxplots: no positive test slices.")
    else:
        made.append(box)
    return made, skipped


def write_figures(run_dirs: str | Path | Sequence[str | Path], out_dir: str | Path | None = None,
                  gate: str = "label", formats: Sequence[str] = FORMATS,
                  size: str = "double", cache_dir: str | Path | None = None,
                  labels: Sequence[str] = ()) -> tuple[list[Path], list[str]]:
    """Write every figure of the runs as PNG and PDF into ``out_dir`` (default RUN_DIR/figures).

    Runs of different identity are refused unless ``labels`` names each (see ``load_runs``)."""
    from wsss_bench.reporting.load import load_runs

    dirs = [run_dirs] if isinstance(run_dirs, (str, Path)) else list(run_dirs)
    for fmt in formats:
        if fmt not in FORMATS:
            raise UserError(f"figure format {fmt!r}: choose from {', '.join(FORMATS)}")
    df, manifests = load_runs(dirs, labels)
    out = Path(out_dir) if out_dir is not None else Path(dirs[0]) / "figures"
    made, skipped = build_figures(df, manifests, gate, size=size, cache_dir=cache_dir)
    paths: list[Path] = []
    for fig in made:
        paths += fig.save(out, formats)
        fig.close()
    return paths, skipped
