"""What makes two runs' rows poolable: the same identity.

``report`` and ``figures`` accept several run folders and pool their rows into one table.
That is only right when the runs measured the same thing: rows of a cpu-profile run and of a
smoke-profile run of one method are two different experiments (other phantoms, other network
sizes), and pooling them gives a mean over both that describes neither.  A run's identity is

- its **profile** and the values it overrode (``--set``),
- its **data**: the fingerprint of each task's data (a phantom's generator version, sizes and
  seed, or the real files),
- its **code**: the git commit (the harness version where no commit was recorded).

Runs whose identity differs are refused with one sentence naming the difference, unless the
user keeps them apart with one ``--label`` per run: each run's rows then carry its label in
the method column (``amecam+mg+cldf (cpu)``), so no row pools two runs.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

from wsss_bench.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd


def run_identity(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a run's manifest that must agree for its rows to pool with another run's."""
    config = manifest.get("config") or {}
    env = manifest.get("environment") or {}
    data = {}
    for entry in (manifest.get("data") or {}).values():
        if isinstance(entry, Mapping) and entry.get("task"):
            data[str(entry["task"])] = str(entry.get("fingerprint", ""))
    return {"profile": str(config.get("profile", "")),
            "overrides": sorted(map(str, config.get("overrides") or [])),
            "code": str(env.get("git_sha") or env.get("harness_version") or ""),
            "data": data}


def identity_difference(a: Mapping[str, Any], b: Mapping[str, Any]) -> str | None:
    """The first way two identities differ, in words, or None when they agree."""
    if a["profile"] != b["profile"]:
        return f"profile ({a['profile']} vs {b['profile']})"
    if a["overrides"] != b["overrides"]:
        show = lambda v: ", ".join(v) or "none"  # noqa: E731
        return f"--set values ({show(a['overrides'])} vs {show(b['overrides'])})"
    for task in sorted(set(a["data"]) & set(b["data"])):
        if a["data"][task] != b["data"][task]:
            return f"data of task {task} (fingerprint {a['data'][task][:12]} vs {b['data'][task][:12]})"
    if a["code"] and b["code"] and a["code"] != b["code"]:
        return f"code (commit {a['code'][:10]} vs {b['code'][:10]})"
    return None


def check_poolable(manifests: Sequence[Mapping[str, Any]]) -> None:
    """Refuse runs whose identity differs (one sentence naming the runs and the difference)."""
    runs = [m for m in manifests if m.get("_run_dir")]
    for other in runs[1:]:
        diff = identity_difference(run_identity(runs[0]), run_identity(other))
        if diff:
            raise UserError(f"runs {runs[0]['_run_dir']} and {other['_run_dir']} differ in {diff}, so their rows "
                            f"must not be pooled; report them one at a time, or keep them apart with one --label "
                            f"per run (e.g. --label a --label b)")


def apply_labels(df: "pd.DataFrame", run_dirs: Sequence[str], labels: Sequence[str]) -> "pd.DataFrame":
    """Each run's rows with its label appended to the method (``gradcam+threshold (cpu)``).

    ``run_dirs`` are the runs in the order the user named them (one label each)."""
    from pathlib import Path

    if len(labels) != len(run_dirs):
        raise UserError(f"--label: {len(labels)} label(s) for {len(run_dirs)} run(s); give one --label per run, "
                        f"in the order of the runs")
    if len(set(labels)) != len(labels):
        raise UserError("--label: two runs got the same label; each run needs its own")
    out = df.copy()
    resolved = {str(Path(d).resolve()): lab for d, lab in zip(run_dirs, labels)}
    col = out["run_dir"].map(lambda d: next((lab for root, lab in resolved.items()
                                             if str(Path(d).resolve()).startswith(root)), None))
    if col.isna().any():
        raise UserError("--label: some rows come from a folder that is none of the named runs")
    out["run_label"] = col
    out["method"] = out["method"].astype(str) + " (" + col.astype(str) + ")"
    return out
