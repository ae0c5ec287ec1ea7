"""Recompute every committed table under results/ from its per-slice results; fail on any difference.

    python results/check.py            # exit 0: every table matches; 1: a difference (printed)

- a run folder (``results.parquet`` + ``summary.md``): the summary table is recomputed from the
  per-slice rows with the same function that wrote it;
- a bench folder (``results.parquet`` + ``tables.md`` + ``manifest.json``): the tables are
  recomputed from the per-slice rows and the table files named in the manifest, and so are
  the paper tables rendered beside them (``latex/tableN.tex``, ``tableN.md``: gate label,
  with the paper's numbers, as results/cpu/collect.sh writes them).
- HD95/ASSD columns, where the rows carry them, are recomputed the same way (the bench's
  --metrics and --empty-distance are read from its manifest).

Nothing is re-trained: this checks that the committed numbers are what their per-slice data
says, not that a new run reproduces them (for that, rerun the command in results/README.md).
"""
from __future__ import annotations

import difflib
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def check_run(folder: Path) -> list[str]:
    import pandas as pd

    from wsss_bench.reporting.summary import summary_markdown

    frame = pd.read_parquet(folder / "results.parquet")
    want = (folder / "summary.md").read_text()
    got = summary_markdown(frame)
    return [] if got == want else list(difflib.unified_diff(want.splitlines(), got.splitlines(),
                                                              "committed summary.md", "recomputed", lineterm=""))


def bench_inputs(folder: Path) -> dict:
    """What a bench folder's tables are computed from: its manifest, the table files it names
    (planned with the bench's own --seeds/--task), its per-slice rows, profile and resamples."""
    import pandas as pd

    from wsss_bench.running import bench as bn
    from wsss_bench.plugins import load_plugins
    from wsss_bench.profiles import load_profile

    manifest = json.loads((folder / "manifest.json").read_text())
    host = load_plugins()
    root = HERE.parent
    tables = [bn.load_table(root / p if not Path(p).is_absolute() else Path(p), host) for p in manifest["tables"]]
    _, planned = bn.plan(host, tables, manifest.get("seeds"), manifest.get("only_tasks"))
    profile = manifest["config"]["profile"]
    return {"manifest": manifest, "host": host, "tables": tables, "planned": planned, "profile": profile,
            "frame": pd.read_parquet(folder / "results.parquet"),
            "resamples": int(load_profile(profile).bootstrap.resamples)}


def check_bench(folder: Path) -> list[str]:
    from wsss_bench.reporting.summary import bench_markdown
    from wsss_bench.running.rundir import failed_cells

    b = bench_inputs(folder)
    got = bench_markdown(b["frame"], b["planned"], b["tables"], resamples=b["resamples"],
                         failures=failed_cells(folder), profile=b["profile"],
                         metrics=b["manifest"].get("table_metrics"),
                         empty_distance=b["manifest"].get("empty_distance") or "undefined",
                         quality=folder)
    want = (folder / "tables.md").read_text()
    diff = [] if got == want else list(difflib.unified_diff(want.splitlines(), got.splitlines(),
                                                              "committed tables.md", "recomputed", lineterm=""))
    return diff + check_paper_tables(folder)


# the paper tables results/cpu/collect.sh renders: file -> (exporter, table); gate label, with paper
PAPER_TABLES = {f"{kind}{name}": (fmt, name)
                for name in ("table1", "table2", "table3")
                for kind, fmt in (("latex/", "latex"), ("", "markdown"))}


#: the side tables collect.sh renders (``wsss-bench report DIR --table T``): file -> (exporter, table)
SIDE_TABLES = {"seeds": ("markdown", "seeds"), "quality": ("markdown", "quality")}


def check_paper_tables(folder: Path) -> list[str]:
    """Re-render every committed ``latex/tableN.tex`` and ``tableN.md`` from the per-slice rows
    (what ``wsss-bench report DIR --format F --table tableN --with-paper --gate label`` writes)."""
    from wsss_bench.plugins import load_plugins
    from wsss_bench.reporting.load import bootstrap_resamples, failed_cells, load_manifests, load_results
    from wsss_bench.reporting.tables import build_tables, render_many

    out: list[str] = []
    wanted = [(folder / (stem + (".tex" if fmt == "latex" else ".md")), fmt, table)
              for stem, (fmt, table) in {**PAPER_TABLES, **SIDE_TABLES}.items()]
    wanted = [w for w in wanted if w[0].is_file()]
    if not wanted:
        return out
    host = load_plugins()
    frame = load_results(folder)
    manifests = load_manifests(folder)
    resamples = bootstrap_resamples(frame, manifests)
    built: dict[str, list] = {}  # one build (bootstrap) per table, rendered by each exporter
    for path, fmt, table in wanted:
        if table not in built and table in ("seeds", "quality"):  # the model and seed tables of every cell
            built[table] = build_tables(frame, table, "all", resamples=resamples, quality=manifests)
        elif table not in built:
            built[table] = build_tables(frame, table, "label", with_paper=True, resamples=resamples,
                                        failed=failed_cells(manifests), quality=manifests)
        got = render_many(built[table], host.get("exporters", fmt)())
        want = path.read_text()
        if got != want:
            out += list(difflib.unified_diff(want.splitlines(), got.splitlines(), f"committed {path.name}",
                                             "recomputed", lineterm=""))
    return out


README_BEGIN, README_END = "<!-- results/cpu tables: begin -->", "<!-- results/cpu tables: end -->"


def readme_tables(folder: Path) -> str:
    """The README's compact tables: our Dice [case-level 95% CI] beside the paper's Dice, per
    task, for every table of the bench in ``folder`` (gate label); recomputed from its rows."""
    from wsss_bench.reporting import paper
    from wsss_bench.reporting.stats import bootstrap_ci, bootstrap_seed

    b = bench_inputs(folder)
    manifest, tables, planned, resamples = b["manifest"], b["tables"], b["planned"], b["resamples"]
    frame = b["frame"][b["frame"].gate == "label"]
    out = []
    for table in tables:
        if not table.paper:
            continue
        ref = paper.NUMBERS.get(table.paper, {})
        notes: list[str] = []
        out += [f"**{table.name}**: Dice over all test slices (gate label), mean [case-level 95% CI], beside the "
                f"paper's Dice{' (IoU and std: results/cpu/' + table.name + '.md)' if table.name else ''}.", "",
                "| method | " + " | ".join(f"{t} | paper" for t in table.tasks) + " |",
                "|---|" + "---|---|" * len(table.tasks)]
        for row in table.rows:
            cells = []
            for task in table.tasks:
                pr = next((p for p in planned if p.table == table.name and p.row == row.name and p.task == task), None)
                m = frame[(frame.task == task) & frame.method.isin({c.method for c in pr.cells})] if pr else frame[:0]
                if len(m):
                    lo, hi = bootstrap_ci(m, resamples, bootstrap_seed(m, task), column="dice")
                    cells.append(f"{m.dice.mean():.3f} [{lo:.2f}, {hi:.2f}]")
                else:
                    cells.append("not run")
                p = (ref.get(row.name) or {}).get(f"{task}/dice")
                cells.append(f"{p[0]:.3f}" if p else "")
            tag = " (upper bound)" if row.upper_bound else (" (suppl.)" if row.supplementary else "")
            note = row.note_for(manifest["config"]["profile"])
            if note:
                notes.append(note)
                tag += f" [{len(notes)}]"
            out.append(f"| {row.name}{tag} | " + " | ".join(cells) + " |")
        out.append("")
        out += [f"[{i}] {text}" for i, text in enumerate(notes, 1)] + ([""] if notes else [])
    return "\n".join(out)


def check_readme(readme: Path, folder: Path) -> list[str]:
    """The README's block between the markers equals :func:`readme_tables` (when both exist)."""
    if not readme.is_file() or not (folder / "manifest.json").is_file():
        return []
    text = readme.read_text()
    if README_BEGIN not in text:
        return []
    want = text.split(README_BEGIN, 1)[1].split(README_END, 1)[0].strip("\n")
    got = readme_tables(folder).strip("\n")
    return [] if got == want else list(difflib.unified_diff(want.splitlines(), got.splitlines(),
                                                              "README.md tables", "recomputed", lineterm=""))


def readme_facts(folder: Path) -> set[str]:
    """Every number the README's prose may state about ``folder``, as printed: the numbers of the
    recomputed tables, the Fig. 4 points (all-slice mean Dice, 3 decimals), the bench's wall
    time in minutes, its test-slice counts and bootstrap resamples, the cpu profile's time
    target, and :func:`side_facts` (model quality, seed quality, AME-CAM's deletion drops)."""
    import re

    from wsss_bench.reporting.figures import ablation_points
    from wsss_bench.profiles import load_profile

    b = bench_inputs(folder)
    facts = set(re.findall(r"\d+\.\d+", readme_tables(folder)))
    pts = ablation_points(b["frame"], "label")
    facts |= {f"{v:.3f}" for v in pts["dice_mean"]}
    manifest = b["manifest"]
    facts.add(str(round(manifest["wall_seconds"] / 60)))
    cold = folder / "manifest-cold.json"  # the cold run (regenerate.sh keeps it before the warm re-run)
    if cold.is_file():
        wall = json.loads(cold.read_text())["wall_seconds"]
        facts |= {str(round(wall / 60)), f"{wall / 60:.1f}"}
    facts |= {str(b["resamples"]), "95"}  # the CI level
    facts |= set(re.findall(r"\d+", str(load_profile(b["profile"]).hardware)))
    facts |= side_facts(folder)
    label = b["frame"][b["frame"].gate == "label"].drop_duplicates(["task", "case_id", "z"])
    for _, g in label.groupby("task"):
        facts |= {str(int((g.label == 1).sum())), str(int((g.label == 0).sum())), str(g.case_id.nunique())}
    return facts


def side_facts(folder: Path) -> set[str]:
    """Numbers the README may quote beyond the Dice tables: every number of the checked side
    tables (``quality.md``: each model's stop and the classifiers' test AUC, sensitivity and
    specificity; ``seeds.md``: training-split pseudo-mask and seed quality) and AME-CAM's two
    deletion drops per task (``records["amecam/polarity"]`` of the committed cell manifests)."""
    import re

    facts: set[str] = set()
    for stem in SIDE_TABLES:
        path = folder / f"{stem}.md"
        if path.is_file():
            facts |= set(re.findall(r"\d+\.\d+", path.read_text()))
    for f in sorted((folder / "cells").glob("*.json")):
        pol = (json.loads(f.read_text()).get("records") or {}).get("amecam/polarity") or {}
        facts |= {f"{pol[k]:.3f}" for k in ("drop_plus", "drop_minus") if isinstance(pol.get(k), float)}
    return facts


def _prose(text: str) -> str:
    """The README without code blocks, inline code, links' targets and the generated tables."""
    import re

    sections = re.split(r"(?m)^(?=## )", text)  # the Quick start and Results sections state results
    text = "".join(s for s in sections if s.startswith(("## Quick start", "## Results")))
    if README_BEGIN in text:
        head, rest = text.split(README_BEGIN, 1)
        text = head + rest.split(README_END, 1)[-1]
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    text = re.sub(r"`[^`]*`", "", text)
    return re.sub(r"\]\([^)]*\)", "]", text)


def check_readme_numbers(readme: Path, folder: Path) -> list[str]:
    """Every decimal number, every "N min(utes)" and every percentage in the README's prose is a
    number :func:`readme_facts` recomputed from ``folder`` (no figure typed in by hand)."""
    import re

    if not readme.is_file() or not (folder / "manifest.json").is_file():
        return []
    facts = readme_facts(folder)
    prose = _prose(readme.read_text())
    out = []
    for m in re.finditer(r"\d+\.\d+|\d+(?=(?:\s|-)?(?:min\b|minutes?\b|%))", prose):
        if m.group() not in facts:
            line = prose.count("\n", 0, m.start()) + 1
            out.append(f"README.md prose: {m.group()!r} is not a number recomputed from results/cpu "
                       f"(near: {prose[max(0, m.start() - 40):m.end() + 20]!r}, prose line {line})")
    return out


def main() -> int:
    bad = 0
    checked = 0
    for folder in sorted(p for p in HERE.rglob("results.parquet")):
        folder = folder.parent
        if (folder / "tables.md").is_file():
            diff = check_bench(folder)
        elif (folder / "summary.md").is_file():
            diff = check_run(folder)
        else:
            continue
        checked += 1
        rel = folder.relative_to(HERE)
        if diff:
            bad += 1
            print(f"DIFFERS: {rel}")
            print("\n".join(diff))
        else:
            print(f"ok: {rel}")
    diff = check_readme(HERE.parent / "README.md", HERE / "cpu")
    if diff:
        bad += 1
        print("DIFFERS: README.md (the results/cpu tables)")
        print("\n".join(diff))
    numbers = check_readme_numbers(HERE.parent / "README.md", HERE / "cpu")
    if numbers:
        bad += 1
        print("DIFFERS: README.md (numbers in its prose)")
        print("\n".join(numbers))
    if not checked:
        print("no result folder found under results/")
        return 1
    return 1 if bad else 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    if sys.argv[1:] == ["--readme-tables"]:  # print the README block (paste it between the markers)
        print(readme_tables(HERE / "cpu"))
        raise SystemExit(0)
    raise SystemExit(main())
