"""Training curves of every trained model, per task, under the profile's convergence rule.

Each model is trained exactly as a run trains it (the shared-model path, the profile's cap,
k, P and delta) in a cache of its own, then its stored convergence record is read back
(:func:`wsss_bench.nn.training.convergence_of`): the train loss and the validation criterion
against steps, the stop reason (converged / cap while improving / cap on a plateau), the
kept step, and the training wall time.  Only the validation split is read; the test split
never is.  One JSON line per (task, model) goes to ``--log`` as soon as that model is done,
so an interrupted run keeps what it measured; ``--report`` merges logs into
``benchmarks/results/curves.jsonl`` and the Markdown summary ``curves.md``.

    python benchmarks/curves.py --task brats --models classifier,seam,amecam,noisy-classifier
    python benchmarks/curves.py --report benchmarks/results/curves_*.jsonl
    python benchmarks/curves.py --from-cache .cache-cold --manifest runs/bench_cpu/manifest.json \
        --log benchmarks/results/curves_cpu_bench.jsonl   # every model a bench trained

``--from-cache`` reads the convergence records a bench left in its artifact cache (every
model of every task it trained, CLDF decoders included), with the bench's command, commit
and machine from its manifest, so the curves published are those of the models behind the
published tables.

Models: ``classifier`` (CAM classifier), ``table2-resnet``, ``seam``, ``amecam`` (stages 1
and 2), ``noisy-classifier``, ``fsl``, ``dig`` and ``cldf`` (both need the task's CDM,
3,000 iterations, first).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _meta import command_line, provenance, provenance_lines  # noqa: E402

SOURCES = ["benchmarks/curves.py", "wsss_bench/nn/training.py", "wsss_bench/nn/classifier.py",
           "wsss_bench/nn/seam.py", "wsss_bench/nn/amecam.py", "wsss_bench/nn/noisy_classifier.py",
           "wsss_bench/nn/fsl.py", "wsss_bench/nn/dig.py", "wsss_bench/nn/cldf.py", "wsss_bench/profiles.toml",
           "wsss_bench/data/taskdata.py"]
MODELS = ("classifier", "table2-resnet", "seam", "amecam", "noisy-classifier", "fsl", "dig", "cldf")
#: shared-model names each curve model trains (and whose records it reports)
TRAINS = {"classifier": ["classifier"], "table2-resnet": ["table2-resnet"], "seam": ["seam"],
          "amecam": ["amecam-stage1", "amecam-stage2"], "noisy-classifier": ["noisy-classifier"],
          "fsl": ["fsl"], "dig": ["dig"], "cldf": ["cldf-decoder"]}


def make(ctx, model: str) -> None:
    """Train ``model`` in ``ctx`` the way a run does."""
    if model == "classifier":
        ctx.classifier()
    elif model == "table2-resnet":
        from wsss_bench_plugins.resnet_features import get_table2_resnet

        get_table2_resnet(ctx)
    elif model == "noisy-classifier":
        from wsss_bench.nn.noisy_classifier import get_noisy_classifier

        get_noisy_classifier(ctx)
    elif model in ("seam", "amecam", "dig"):
        ctx.plugin("cams", model)
    elif model == "fsl":
        ctx.plugin("refiners", "fsl")
    elif model == "cldf":
        ctx.plugin("refiners", "cldf", sources=(ctx.plugin("cams", "amecam"),))
    else:
        raise SystemExit(f"--models: unknown model '{model}'; choose from {', '.join(MODELS)}")


def records_of(ctx, names: list[str]) -> dict[str, dict]:
    """{shared-model name: (convergence record, train info)} from the models' artifact folders."""
    from wsss_bench.nn.training import convergence_of

    out = {}
    for name in names:
        folder = ctx.cache.path(name, ctx.shared_model_key(name))
        fname = name.replace("-", "_")
        info = json.loads((folder / f"{fname}.train.json").read_text())
        out[name] = {"convergence": convergence_of(folder / f"{fname}.train.json").get(fname), "info": info}
    return out


def run(args) -> None:
    import torch

    from wsss_bench.running.runner import RunConfig, Session

    torch.set_num_threads(args.threads)
    cfg = RunConfig(profile=args.profile, device="cpu", cache_dir=args.cache_dir, out=Path(f"/tmp/wsss-curves-{args.task}"),
                    overrides=list(args.set or []))
    session = Session(cfg)
    ctx = session.context(args.task, args.seed)
    data = ctx.task_data
    log = Path(args.log or ROOT / "benchmarks" / "results" / f"curves_{args.profile}_{args.task}.jsonl")
    log.parent.mkdir(parents=True, exist_ok=True)
    command = command_line(argv=sys.argv[1:])
    split = data.summary()["splits"]
    header = {"kind": "header", "task": args.task, "provenance": provenance(command, args.profile, data, SOURCES),
              "val": dict(data.val_info), "n_train_cases": split["train"]["n_cases"],
              "n_train_slices": split["train"]["n_slices"], "n_val_cases": split["val"]["n_cases"],
              "threads": args.threads}
    with log.open("a") as fh:
        fh.write(json.dumps(header) + "\n")
    for model in args.models:
        t0 = time.perf_counter()
        make(ctx, model)
        wall = time.perf_counter() - t0
        for name, rec in records_of(ctx, TRAINS[model]).items():
            info = rec["info"]
            row = {"kind": "curve", "task": args.task, "model": name, "profile": args.profile,
                   "convergence": rec["convergence"],
                   "train_seconds": info.get("seconds_this_attempt", info.get("seconds")),
                   "resumed_from": info.get("resumed_from"), "wall_seconds_with_prepare": round(wall, 1)}
            with log.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            conv = rec["convergence"] or {}
            print(f"{args.task} {name}: {conv.get('stop_reason')} at step {conv.get('steps')} "
                  f"(kept {conv.get('kept_step')}, cap {conv.get('cap')}, best {conv.get('best')}), "
                  f"{row['train_seconds']} s", flush=True)


# ---------------------------------------------------------------------------- snapshot
class _NoTensors(dict):
    def __missing__(self, key):
        return None


def snapshot(cache_dir: Path, task: str, log: Path) -> None:
    """Append the curves of models still training in ``cache_dir`` (their last checkpoint) to
    ``log``, marked ``in_progress``: what a run had measured when it had to stop."""
    from wsss_bench.nn.training import CHECKPOINT_META, _unflatten, convergence_of

    for done in sorted(Path(cache_dir).glob("artifacts/*/*/*.train.json")):  # finished, not yet logged
        if done.parent.name.startswith("."):
            continue
        info = json.loads(done.read_text())
        for name, conv in convergence_of(done).items():
            row = {"kind": "curve", "task": task, "model": done.parent.parent.name, "profile": "cpu",
                   "convergence": conv, "train_seconds": info.get("seconds_this_attempt", info.get("seconds")),
                   "resumed_from": info.get("resumed_from")}
            with log.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(f"{task} {row['model']}: {conv['stop_reason']} at step {conv['steps']}")
    for meta in sorted(Path(cache_dir).glob(f"artifacts/*/.partial-*/{CHECKPOINT_META}")):
        state = _unflatten(json.loads(meta.read_text())["state"], _NoTensors())
        curve = state.get("curve") or []
        model = meta.parent.parent.name
        if not curve:
            continue
        conv = {"criterion": None, "stop_reason": f"not finished (stopped by hand at step {state['iteration']})",
                "steps": int(state["iteration"]), "kept_step": state.get("best_step"), "best": state.get("best_value"),
                "since_best": state.get("since"), "curve": curve, "cap": None, "every": None, "patience": None}
        row = {"kind": "curve", "task": task, "model": model, "profile": "cpu", "in_progress": True,
               "convergence": conv, "train_seconds": None, "resumed_from": None}
        with log.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(f"{task} {model}: in progress at step {state['iteration']}, best {state.get('best_value')} "
              f"at {state.get('best_step')}, {state.get('since')} evaluation(s) since")


# ---------------------------------------------------------------------------- from a bench's cache
def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def from_cache(cache_dir: Path, manifest_path: Path, log: Path) -> None:
    """Append the curves of every model trained in a bench's cache to ``log``: one header per
    task (the bench's command, commit, machine and data from its manifest), one row per model.
    Models of one (task, stage) that differ in their parameters (CLDF decoders) are told apart
    by the parameters that differ."""
    from wsss_bench.cache import read_meta
    from wsss_bench.nn.training import convergence_of

    manifest = json.loads(Path(manifest_path).read_text())
    env = manifest.get("environment", {})
    found: dict[tuple[str, str], list[tuple[dict, Path]]] = {}
    for meta_file in sorted(Path(cache_dir).glob("artifacts/*/*/artifact.json")):
        folder = meta_file.parent
        if folder.name.startswith(".") or not list(folder.glob("*.train.json")):
            continue
        meta = read_meta(folder)
        task = (meta.get("describe") or {}).get("task", "?")
        found.setdefault((task, meta["stage"]), []).append((meta, folder))
    tasks = sorted({t for t, _ in found})
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as fh:
        for task in tasks:
            data = next((v for k, v in manifest.get("data", {}).items() if k.split("/")[0] == task), {})
            split = data.get("splits", {})
            prov = {"command": manifest.get("command"), "git_sha": env.get("git_sha"), "uncommitted": [],
                    "machine": f"{env.get('cpu_model')}; {env.get('cpu_count')} logical CPUs; Python "
                               f"{env.get('python')}; torch {env.get('packages', {}).get('torch')}; "
                               f"{manifest.get('config', {}).get('executor')} workers, 1 thread each",
                    "date": "models built " + max(m.get("created", "?") for (t, _), g in found.items() if t == task
                                                  for m, _ in g),
                    "profile": manifest.get("config", {}).get("profile"),
                    "phantom_generator": data.get("generator_version", "-")}
            fh.write(json.dumps({"kind": "header", "task": task, "provenance": prov,
                                 "val": {"n_pos": split.get("val", {}).get("n_pos"),
                                         "n_neg": split.get("val", {}).get("n_neg")},
                                 "n_train_cases": split.get("train", {}).get("n_cases"),
                                 "n_train_slices": split.get("train", {}).get("n_slices"),
                                 "n_val_cases": split.get("val", {}).get("n_cases"), "threads": 1}) + "\n")
        for (task, stage), group in sorted(found.items()):
            params = [_flat((m.get("describe") or {}).get("params", {})) for m, _ in group]
            varying = sorted({k for p in params for k in p if len({json.dumps(q.get(k)) for q in params}) > 1})
            for (meta, folder), p in zip(group, params):
                tag = ", ".join(f"{k}={p.get(k)}" for k in varying)
                for name, conv in convergence_of(folder).items():
                    info = json.loads((folder / f"{name.split('/')[0]}.train.json").read_text())
                    model = stage if name.replace("_", "-") == stage else f"{stage}/{name}"
                    row = {"kind": "curve", "task": task, "model": model + (f" [{tag}]" if tag else ""),
                           "profile": (meta.get("describe") or {}).get("profile"), "convergence": conv,
                           "train_seconds": info.get("seconds_this_attempt", info.get("seconds")),
                           "resumed_from": info.get("resumed_from")}
                    fh.write(json.dumps(row) + "\n")
    print(f"{log}: {sum(len(g) for g in found.values())} trained model(s) on {len(tasks)} task(s)")


# ---------------------------------------------------------------------------- report
def _fmt(v, digits=3) -> str:
    return "-" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def report(logs: list[Path], out_jsonl: Path, out_md: Path) -> None:
    headers, rows = {}, {}
    for path in logs:
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if rec["kind"] == "header":
                headers[(rec["task"], rec["provenance"]["command"])] = rec
            else:
                rows[(rec["task"], rec["model"])] = rec  # the latest line of a (task, model) wins
    ordered = [rows[k] for k in sorted(rows)]
    tmp = out_jsonl.with_suffix(".jsonl.tmp")
    runs = {task: [h["provenance"] for (t, _), h in headers.items() if t == task] for task, _ in rows}
    tmp.write_text("".join(json.dumps({**r, "provenance": runs.get(r["task"])}) + "\n" for r in ordered))
    os.replace(tmp, out_jsonl)
    command = command_line(argv=sys.argv[1:])
    lines = ["# Training curves under the convergence rule", "",
             "Written by `benchmarks/curves.py` from the logs named below; each row is one trained model",
             "on one task, trained the way a run trains it. The curves (train loss and validation",
             "criterion at every evaluation) are in `curves.jsonl`. Only the validation split was read.", "",
             "Report:", *provenance_lines(command, sources=SOURCES), "", "Runs:"]
    for (task, _), h in sorted(headers.items()):
        p = h["provenance"]
        lines.append(f"- {task}: `{p['command']}`, git `{p['git_sha']}`"
                     f"{' (uncommitted: ' + ', '.join(p['uncommitted']) + ')' if p['uncommitted'] else ''}, "
                     f"{p['machine']}, {p['date']}, profile {p['profile']}, phantom {p['phantom_generator']}; "
                     f"{h['n_train_cases']} training cases ({h['n_train_slices']} slices), validation "
                     f"{h['val']['n_pos']} positive + {h['val']['n_neg']} hard negative slices")
    lines += ["", "| task | model | criterion | stop reason | steps | kept step | cap | k | P | best value | "
              "train wall time (s) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in ordered:
        c = r["convergence"] or {}
        lines.append(f"| {r['task']} | {r['model']} | {c.get('criterion', '-')} | {c.get('stop_reason', '-')} | "
                     f"{c.get('steps', '-')} | {c.get('kept_step', '-')} | {c.get('cap', '-')} | {c.get('every', '-')} | "
                     f"{c.get('patience', '-')} | {_fmt(c.get('best'), 4)} | {_fmt(r.get('train_seconds'), 1)} |")
    lines += ["", "## Curves (step: validation value / mean train loss since the previous evaluation)", ""]
    for r in ordered:
        c = r["convergence"] or {}
        pts = c.get("curve") or []
        shown = pts if len(pts) <= 24 else pts[:: max(1, len(pts) // 24)] + [pts[-1]]
        text = ", ".join(f"{p[0]}: {_fmt(p[2])}/{_fmt(p[1])}" for p in shown)
        lines.append(f"- **{r['task']} {r['model']}** ({len(pts)} evaluations): {text}")
    tmp = out_md.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, out_md)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--task", default="brats")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--models", type=lambda s: [m.strip() for m in s.split(",") if m.strip()],
                    default=["classifier", "seam", "amecam", "noisy-classifier"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", action="append", help="a profile override KEY=VALUE (as wsss-bench --set)")
    ap.add_argument("--log", type=Path)
    ap.add_argument("--cache-dir", type=Path, default=Path("/tmp/wsss-curves-cache"))
    ap.add_argument("--report", type=Path, nargs="+")
    ap.add_argument("--snapshot", action="store_true",
                    help="append the last checkpoints of models still training in --cache-dir to --log")
    ap.add_argument("--from-cache", type=Path, help="a bench's cache: log every model it trained")
    ap.add_argument("--manifest", type=Path, help="with --from-cache: the bench's manifest.json")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "curves.jsonl")
    args = ap.parse_args()
    for m in args.models:
        if m not in MODELS:
            ap.error(f"--models: unknown model '{m}'; choose from {', '.join(MODELS)}")
    if args.from_cache:
        if not args.manifest:
            ap.error("--from-cache needs --manifest (the bench's manifest.json: its command, commit, machine)")
        from_cache(args.from_cache, args.manifest, Path(args.log or ROOT / "benchmarks" / "results" /
                                                        f"curves_{args.profile}_bench.jsonl"))
    elif args.report:
        report(args.report, args.out, args.out.with_suffix(".md"))
    elif args.snapshot:
        snapshot(args.cache_dir, args.task, Path(args.log or ROOT / "benchmarks" / "results" /
                                                 f"curves_{args.profile}_{args.task}.jsonl"))
    else:
        run(args)


if __name__ == "__main__":
    main()
