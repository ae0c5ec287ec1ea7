"""A cell's identity is what computes it: reporting and plumbing edits never recompute a cell."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: prints {"kind:name": plugin identity} for every plugin that enters a cell, and the identity of
#: a GradCAM cell, a CLDF cell and an FSL cell, computed by the copy in sys.argv[1]
_PROBE = textwrap.dedent("""
    import json, sys, types
    sys.path.insert(0, sys.argv[1])
    import wsss_bench
    assert wsss_bench.__file__.startswith(sys.argv[1]), wsss_bench.__file__
    from wsss_bench.plugins import load_plugins
    from wsss_bench.running.runner import Cell, RunConfig, cell_identity, plugin_identity
    host = load_plugins()
    out = {}
    for kind in ("cams", "refiners", "backbones"):
        for name in host.registries[kind].names():
            out[f"{kind}:{name}"] = plugin_identity(host, kind, name)["source"]
    cfg = RunConfig(profile="smoke", device="cpu")
    ctx = types.SimpleNamespace(data_key="fixed-data")
    cells = {"gradcam": Cell("brats", "threshold", (), (("gradcam", ()),), 0),
             "cldf": Cell("brats", "cldf", (), (("gradcam", ()),), 0),
             "fsl": Cell("brats", "fsl", (), (), 0)}
    for label, cell in cells.items():
        out[f"cell:{label}"] = cell_identity(cfg, ctx, host, cell)
    print(json.dumps(out))
""")


def _copy(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "wsss_bench", tmp_path / "wsss_bench", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "plugins", tmp_path / "wsss_bench_plugins", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def _identities(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", _PROBE, str(root)], capture_output=True, text=True, env=env,
                          cwd=root)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _edit(path: Path) -> None:
    path.write_text(path.read_text() + "\n# an edit that changes this file's bytes\n")


def test_reporting_and_plumbing_edits_keep_every_identity_and_nn_cam_edits_change_gradcam(tmp_path):
    root = _copy(tmp_path)
    before = _identities(root)
    assert {"cams:gradcam", "refiners:threshold", "cell:gradcam", "cell:cldf"} <= set(before)
    # reporting (tables, HTML page, figures, mask export, paper numbers) and run-folder plumbing
    edited = sorted((root / "wsss_bench" / "reporting").glob("*.py"))
    assert any("report" in p.name or "html" in p.name for p in edited), edited
    for rel in ("running/rundir.py", "running/manifest.py", "running/bench.py", "running/runner.py",
                "progress.py", "cli.py"):
        edited.append(root / "wsss_bench" / rel)
    for path in edited:
        _edit(path)
    assert _identities(root) == before, "a reporting or plumbing edit changed an identity"
    # the code that computes: nn/cam.py holds GradCAM's logic, the stages score every cell
    cam = root / "wsss_bench" / "nn" / "cam.py"
    cam.write_text(cam.read_text().replace("def resolve_layers(", "def resolve_layers(  # edited\n", 1))
    after_cam = _identities(root)
    assert after_cam["cams:gradcam"] != before["cams:gradcam"]
    assert after_cam["cell:gradcam"] != before["cell:gradcam"]
    assert after_cam["refiners:threshold"] == before["refiners:threshold"]
    assert after_cam["cell:fsl"] == before["cell:fsl"]  # FSL uses no CAM code
    _edit(root / "wsss_bench" / "running" / "stages.py")
    after_stages = _identities(root)
    assert all(after_stages[k] != after_cam[k] for k in after_stages if k.startswith("cell:"))
    assert all(after_stages[k] == after_cam[k] for k in after_stages if not k.startswith("cell:"))
    _edit(root / "wsss_bench" / "data" / "splits.py")  # which slices are test slices
    assert _identities(root)["cell:fsl"] != after_stages["cell:fsl"]
