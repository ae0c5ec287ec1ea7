"""The bad-input corpus of issue 14: every input a hostile but realistic user gives.

Each case runs the real command line (``wsss-bench run`` through Typer's CliRunner, in this
process) and checks what the user sees and what is left behind:

- exit code 2 (1 for a bug inside a plugin's cell), no traceback, no unhandled exception;
- exactly one message (an ``error:`` or ``cell failed`` line; a malformed spec's message
  carries its text and a pointer below it) naming the file, plugin or parameter at fault;
- nothing partial in the cache: no ``.partial-*``/``.build-*``/``.tmp-*`` work folder, no
  ``*.tmp`` file, and every published artifact or slice store has its completion marker.

Plugin-load problems print one plain ``warning:`` line per broken plugin (no Python warning
with an internal source line) and are fatal under ``--strict``, which says so.  A plugin that
raises inside a cell fails that cell only: the other cells finish, the failure is recorded
in ``cells/<key>.failed.json`` and the manifest, and the exit code is 1.

(A benchmark TOML with a missing field belongs to the ``bench`` command's tests.)
Set ``WSSS_RELIABILITY_TABLE=path`` to write the table of every input and its first line.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from test_plugins import CAM_MODULE, make_dist
from typer.testing import CliRunner

from wsss_bench import cache as cache_mod
from wsss_bench import cli
from wsss_bench import plugins as plugins_mod
from wsss_bench.data.splits import case_split
from wsss_bench.seeding import derive_seed

TABLE: list[tuple[str, int, str]] = []
MESSAGE_PREFIXES = ("error:", "cell failed")


# ============================================================================ helpers
@pytest.fixture(scope="module", autouse=True)
def _write_table():
    yield
    target = os.environ.get("WSSS_RELIABILITY_TABLE")
    if target:
        lines = ["| input | exit | first line of the message |", "|---|---|---|"]
        lines += [f"| {c} | {code} | {first.replace('|', '/')} |" for c, code, first in TABLE]
        Path(target).write_text("\n".join(lines) + "\n")


def leftovers(cache: Path) -> list[str]:
    """Anything half-written in a cache folder."""
    if not Path(cache).exists():
        return []
    bad = [str(p) for p in Path(cache).rglob("*")
           if p.name.startswith((".partial-", ".build-", ".tmp-", ".write-test")) or p.name.endswith(".tmp")]
    for stage in (Path(cache) / "artifacts").glob("*"):
        bad += [str(d) for d in stage.iterdir() if d.is_dir() and not d.name.startswith(".")
                and not (d / cache_mod.META).is_file()]
    slices = Path(cache) / "slices"
    if slices.is_dir():
        bad += [str(d) for d in slices.iterdir() if d.is_dir() and not d.name.startswith(".")
                and not (d / "done").is_file()]
    return bad


def first_message(output: str) -> str:
    lines = [ln for ln in output.splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith(MESSAGE_PREFIXES + ("warning:",)):
            return ln
    return lines[0] if lines else ""


def check_bad(result, case: str, cache: Path | None, *needles: str, code: int = 2) -> str:
    """One clear message naming what is wrong; ``code``; no traceback; nothing partial."""
    out = result.output
    TABLE.append((case, result.exit_code, first_message(out)[:160]))
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        f"{case}: unhandled {result.exception!r}\n{out}"
    assert result.exit_code == code, f"{case}: exit {result.exit_code}\n{out}"
    assert "Traceback" not in out and "PluginLoadWarning" not in out, out
    messages = [ln for ln in out.splitlines() if ln.startswith(MESSAGE_PREFIXES)]
    assert len(messages) == 1, f"{case}: expected one message, got {messages}"
    text = " ".join(out.split())
    for needle in needles:
        assert needle in text, f"{case}: {needle!r} not in:\n{out}"
    if cache is not None:
        assert leftovers(cache) == [], f"{case}: partial cache entries {leftovers(cache)}"
    return out


@pytest.fixture(scope="module")
def flare_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("flare")
    result = CliRunner().invoke(cli.app, ["data", "synth", "--kind", "flare", "--out", str(root),
                                          "--cases", "6", "--profile", "smoke"])
    assert result.exit_code == 0, result.output
    return root


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _cases(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir())


def _run_args(tmp_path: Path, *extra) -> list:
    return ["run", "--profile", "smoke", "--method", "threshold", "--out", tmp_path / "out",
            "--cache-dir", tmp_path / "cache", *extra]


# ============================================================================ data on disk
def _truncate(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def _not_nifti(path: Path) -> None:
    path.write_text("this is a text file, not a NIfTI volume\n")


def _resave(path: Path, fn) -> None:
    img = nib.load(str(path))
    data = np.asarray(img.dataobj)
    nib.save(nib.Nifti1Image(fn(data), img.affine), str(path))


DATA_CASES = {
    # name: (file to damage, damage, needles)
    "truncated .nii.gz": ("t2", _truncate, ["cannot read NIfTI file", "_t2.nii.gz"]),
    "non-NIfTI file": ("flair", _not_nifti, ["cannot read NIfTI file", "_flair.nii.gz"]),
    "missing modality": ("t1ce", lambda p: p.unlink(), ["is missing its t1ce file", "_t1ce.nii.gz"]),
    "mismatched shapes": ("seg", lambda p: _resave(p, lambda d: d[:-2]), ["_seg.nii.gz", "must match"]),
    "2D volume": ("t1", lambda p: _resave(p, lambda d: d[:, :, 0].astype(np.float32)),
                  ["_t1.nii.gz", "expected a 3D volume"]),
    "4D volume": ("t1", lambda p: _resave(p, lambda d: np.stack([d, d], -1).astype(np.float32)),
                  ["_t1.nii.gz", "expected a 3D volume"]),
    "NaN voxels in one modality": ("flair", lambda p: _resave(p, _with_nan),
                                   ["_flair.nii.gz", "non-finite voxel", "nonfinite=zero"]),
    "BraTS seg with label 3": ("seg", lambda p: _resave(p, _with_label3), ["_seg.nii.gz", "holds values [3]"]),
}


def _with_nan(d):
    d = d.astype(np.float32)
    d[10:14, 10:14, 5] = np.nan
    return d


def _with_label3(d):
    d = d.astype(np.uint8)
    d[d == 2] = 3
    return d


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_bad_brats_files(run_cli, brats_root, tmp_path, case):
    which, damage, needles = DATA_CASES[case]
    root = _copy(brats_root, tmp_path / "root")
    victim = _cases(root)[1]
    damage(victim / f"{victim.name}_{which}.nii.gz")
    result = run_cli(*_run_args(tmp_path, "--cam", "gradcam", "--data-root", root))
    check_bad(result, case, tmp_path / "cache", victim.name, *needles)
    assert not (tmp_path / "out" / "results.parquet").exists()


def test_empty_root_and_the_other_datasets_layout(run_cli, brats_root, flare_root, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    check_bad(run_cli(*_run_args(tmp_path, "--cam", "gradcam", "--data-root", empty)), "empty data root",
              tmp_path / "cache", "no BraTS cases under", str(empty))
    check_bad(run_cli(*_run_args(tmp_path, "--cam", "gradcam", "--data-root", flare_root)),
              "FLARE21 layout given to --task brats", tmp_path / "cache", "no BraTS cases under", "TrainingImg")
    check_bad(run_cli(*_run_args(tmp_path, "--cam", "layercam", "--task", "flare21-kidney", "--data-root",
                                 brats_root)),
              "BraTS layout given to --task flare21-kidney", tmp_path / "cache", "unknown FLARE21 layout",
              str(brats_root))
    check_bad(run_cli(*_run_args(tmp_path, "--cam", "gradcam", "--data-root", tmp_path / "nope")),
              "--data-root that does not exist", tmp_path / "cache", "no such directory")


def test_test_split_without_a_positive_slice(run_cli, brats_root, tmp_path):
    root = _copy(brats_root, tmp_path / "root")
    ids = [p.name for p in _cases(root)]
    test_cases = case_split(ids, "tenths", derive_seed(0, "brats", "split"))["test"]
    for case in test_cases:
        _resave(root / case / f"{case}_seg.nii.gz", lambda d: np.zeros_like(d))
    result = run_cli(*_run_args(tmp_path, "--cam", "gradcam", "--data-root", root))
    check_bad(result, "test split without a positive slice", tmp_path / "cache", *test_cases,
              "hold no positive slice", "--seed")
    # it failed before any training: no model was built
    assert not (tmp_path / "cache" / "artifacts").exists() or not any((tmp_path / "cache" / "artifacts").rglob("*.safetensors"))
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [c["status"] for c in manifest["cells"]] == ["failed"]
    # no results file, and no line pointing at one
    assert not (tmp_path / "out" / "results.parquet").exists()
    assert "results:" not in result.output and "no results were written (1 of 1 cell(s) failed)" in result.output


# ============================================================================ the output folder and the disk
def test_out_under_a_regular_file_fails_before_compute(run_cli, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = run_cli("run", "--profile", "smoke", "--method", "threshold", "--cam", "gradcam",
                     "--out", blocker / "run", "--cache-dir", tmp_path / "cache")
    check_bad(result, "--out under a regular file", tmp_path / "cache", str(blocker), "is a file")
    assert not (tmp_path / "cache").exists()  # checked before the phantom, the store or a model


def test_unwritable_out_fails_before_compute(run_cli, tmp_path, monkeypatch):
    """(The tests run as root, where chmod cannot take write permission away: the probe write
    that check_out_dir makes is refused as the OS would refuse it.)"""
    real = Path.write_text

    def refuse(self, *args, **kwargs):
        if self.name.startswith(".write-test"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", refuse)
    result = run_cli(*_run_args(tmp_path, "--cam", "gradcam"))
    check_bad(result, "--out not writable", tmp_path / "cache", f"--out {tmp_path / 'out'}", "cannot write there",
              "Permission denied", "choose a writable folder")
    assert not (tmp_path / "cache").exists()


def test_out_holding_another_configuration_fails_before_compute(run_cli, tmp_path):
    out = tmp_path / "out"
    (out / "cells").mkdir(parents=True)
    (out / "cells" / "abc.parquet").write_bytes(b"")
    (out / "cells" / "abc.json").write_text(json.dumps({"status": "done"}))  # a finished cell: rows + record
    (out / "run.json").write_text(json.dumps({"identity": {"profile": "paper", "bf16": True}}))
    result = run_cli(*_run_args(tmp_path, "--cam", "gradcam"))
    check_bad(result, "--out holding another configuration's results", tmp_path / "cache",
              "another configuration", "--force")
    assert not (tmp_path / "cache").exists()


def test_full_disk_is_one_line_and_resumes(run_cli, tmp_path, monkeypatch):
    """ENOSPC on a cache write: one line naming the file, exit 2, nothing published half-written;
    with space again, the same command completes."""
    real = cache_mod.atomic_write_bytes
    artifacts = str(tmp_path / "cache" / "artifacts")

    def full_disk(path, data):
        if str(path).startswith(artifacts):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # what write() raises: no filename
        return real(path, data)

    monkeypatch.setattr(cache_mod, "atomic_write_bytes", full_disk)
    args = _run_args(tmp_path, "--cam", "gradcam")
    result = run_cli(*args)
    out = result.output
    TABLE.append(("full disk (ENOSPC on a cache write)", result.exit_code, first_message(out)[:160]))
    assert result.exit_code == 2 and "Traceback" not in out, out
    text = " ".join(out.split())
    assert "No space left on device" in text and artifacts in text and "run the same command again" in text
    published = [d for stage in Path(artifacts).glob("*") for d in stage.iterdir()
                 if d.is_dir() and not d.name.startswith(".")]
    assert all((d / cache_mod.META).is_file() for d in published), published
    assert not list(Path(artifacts).rglob("*.tmp"))

    monkeypatch.setattr(cache_mod, "atomic_write_bytes", real)
    again = run_cli(*args)
    assert again.exit_code == 0, again.output
    assert leftovers(tmp_path / "cache") == []
    assert set(pd.read_parquet(tmp_path / "out" / "results.parquet")["method"]) == {"gradcam+threshold"}

    # the disk fills up while the run folder's manifest is written (outside any cell)
    def full_at_manifest(path, data):
        if Path(path).name == "manifest.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, data)

    monkeypatch.setattr(cache_mod, "atomic_write_bytes", full_at_manifest)
    last = check_bad(run_cli(*args), "full disk while writing manifest.json", tmp_path / "cache",
                     f"cannot write {tmp_path / 'out' / 'manifest.json'}", "No space left on device")
    assert "already done" in last


# ============================================================================ specs and plugin names
SPEC_CASES = [
    ("unknown CAM source", ["--cam", "gradcan"], ["unknown CAM source 'gradcan'", "Did you mean 'gradcam'"]),
    ("unknown refiner", ["--cam", "gradcam", "--method", "threshhold"], ["unknown refiner 'threshhold'"]),
    ("unknown backbone", ["--cam", "gradcam", "--method", "cldf", "--backbone", "nosuch"],
     ["unknown feature backbone 'nosuch'", "cdm"]),
    ("unknown parameter", ["--cam", "gradcam[layr=layer3]"], ["has no parameter 'layr'", "did you mean 'layer'"]),
    ("parameter of the wrong type", ["--cam", "gradcam", "--method", "threshold[value=abc]"],
     ["plugin 'threshold'", "parameter 'value' expects float", "'abc'"]),
    ("unknown task", ["--cam", "gradcam", "--task", "bratz"], ["unknown task 'bratz'", "Did you mean 'brats'"]),
    ("unknown profile", ["--cam", "gradcam", "--profile", "fast"], ["unknown profile 'fast'"]),
    ("unknown device", ["--cam", "gradcam", "--device", "tpu"], ["--device tpu", "unknown device"]),
    ("bad seed", ["--cam", "gradcam", "--seed", "x"], ["--seed x", "integers"]),
    ("malformed brackets: unclosed", ["--cam", "gradcam[layer=layer3"],
     ["malformed spec 'gradcam[layer=layer3' at position 20", "expected ']'",
      "Expected NAME or NAME[key=value,key2=[a,b]]", "gradcam[layer=layer3 ^"]),
    ("malformed brackets: stray ]", ["--cam", "gradcam]"], ["malformed spec 'gradcam]' at position 7",
                                                             "unexpected ']'", "gradcam] ^"]),
    ("malformed brackets: nested list", ["--cam", "layercam[layers=[a,[b]]]"],
     ["nested lists are not allowed", "join list items with '+'"]),
    ("malformed brackets: no name", ["--cam", "[layer=layer3]"], ["at position 0", "expected a name"]),
    ("quote inside an unquoted value", ["--cam", "gradcam[layer=a'b]"], ["a ' inside an unquoted value"]),
    ("'+' in --method", ["--cam", "gradcam", "--method", "threshold+threshold"], ["'+' joins map sources"]),
    ("source named twice", ["--cam", "gradcam+gradcam"], ["'gradcam' appears twice"]),
    ("empty grid: empty list", ["--cam", "gradcam[layer=[]]"], ["at position 15", "expected a value"]),
    ("empty grid: no task", ["--cam", "gradcam", "--task", ","], ["--task: no task given", "grid is empty"]),
    ("empty grid: no seed", ["--cam", "gradcam", "--seed", ","], ["--seed: no seed given", "grid is empty"]),
    ("empty grid: no CAM", ["--cam", ","], ["malformed spec ','", "expected a name"]),
    ("refiner needs a CAM", [], ["--method threshold refines a CAM", "add --cam"]),
]


@pytest.mark.parametrize("case,args,needles", SPEC_CASES, ids=[c[0] for c in SPEC_CASES])
def test_bad_specs_and_names(run_cli, tmp_path, case, args, needles):
    base = ["run", "--profile", "smoke", "--method", "threshold", "--out", tmp_path / "out",
            "--cache-dir", tmp_path / "cache"]
    # a later --method/--profile overrides the base one (Typer keeps the last)
    check_bad(run_cli(*base, *args), case, tmp_path / "cache", *needles)
    assert not (tmp_path / "cache").exists()  # every one of these is caught before any compute


def test_unknown_kind_in_list(run_cli):
    check_bad(run_cli("list", "camz"), "unknown kind in `list`", None, "unknown kind 'camz'", "Did you mean 'cams'")


# ============================================================================ broken plugins
@pytest.fixture
def site(tmp_path, monkeypatch):
    import sys

    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    yield site
    for mod in [m for m in sys.modules if m.startswith("tp_")]:
        del sys.modules[mod]


def _warnings(output: str) -> list[str]:
    return [ln for ln in output.splitlines() if ln.startswith("warning:")]


def test_plugin_that_raises_on_import(run_cli, site, tmp_path):
    # an entry point whose name differs from its module: the message names both, and the distribution
    make_dist(site, "tp-broken", "tp_broken", "import json\nraise RuntimeError('boom at import [/x] [bold]')\n",
              ep_name="mybroken")
    result = run_cli("list", "cams", "grad*")
    TABLE.append(("plugin that raises on import (entry point)", result.exit_code, first_message(result.output)))
    assert result.exit_code == 0 and "gradcam" in result.output  # the others still work
    (line,) = _warnings(result.output)
    for needle in ("entry point 'mybroken'", "module tp_broken", "distribution tp-broken 1.2.3",
                   "failed to import and was skipped", "RuntimeError: boom at import",
                   f"raised at {site / 'tp_broken.py'}:2"):
        assert needle in line, line
    assert "plugins.py" not in result.output and "warnings.warn" not in result.output  # no internal source line
    assert "boom at import [/x] [bold]" in line  # user text is printed as it is
    listing = run_cli("plugins")
    assert listing.exit_code == 0 and "boom at import [/x] [bold]" in " ".join(listing.output.split()), listing.output

    strict = run_cli("--strict", *_run_args(tmp_path, "--cam", "gradcam"))
    check_bad(strict, "plugin that raises on import, --strict", tmp_path / "cache", "entry point 'mybroken'",
              "boom at import", "fatal under --strict")
    assert "skipped" not in strict.output
    assert not (tmp_path / "cache").exists()

    # the same through the console entry point (main() loads the plugins before Typer runs)
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", "import sys; from wsss_bench.cli import main; main(sys.argv[1:])",
                           "--strict", "list", "refiners"], env=env, capture_output=True, text=True, timeout=120)
    TABLE.append(("plugin that raises on import, --strict (console entry point)", done.returncode,
                  first_message(done.stderr)[:160]))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "boom at import [/x] [bold]" in done.stderr and "fatal under --strict" in done.stderr


def test_plugin_file_that_raises_on_import(run_cli, tmp_path):
    plugdir = tmp_path / "plugs"
    plugdir.mkdir()
    (plugdir / "badfile.py").write_text("x = 1\nimport not_a_real_module_xyz\n")
    result = run_cli("--plugins-dir", plugdir, "list", "refiners")
    TABLE.append(("plugin file that raises on import (--plugins-dir)", result.exit_code,
                  first_message(result.output)))
    assert result.exit_code == 0 and "threshold" in result.output
    (line,) = _warnings(result.output)
    assert f"plugin file {plugdir / 'badfile.py'}" in line and "ModuleNotFoundError" in line
    assert f"raised at {plugdir / 'badfile.py'}:2" in line
    syntax = tmp_path / "syntax"
    syntax.mkdir()
    (syntax / "broken.py").write_text("x = 1\ndef broken(:\n")
    strict = run_cli("--strict", "--plugins-dir", syntax, "list", "refiners")
    check_bad(strict, "plugin file with a syntax error, --strict", None, f"plugin file {syntax / 'broken.py'}",
              "SyntaxError", f"raised at {syntax / 'broken.py'}:2", "fatal under --strict")


def test_plugin_whose_name_collides_with_a_builtin(run_cli, site, tmp_path):
    make_dist(site, "tp-dup", "tp_dup", CAM_MODULE.format(cls="Dup", name="gradcam"))
    result = run_cli("list", "cams", "gradcam")
    TABLE.append(("plugin registering the built-in name 'gradcam'", result.exit_code,
                  first_message(result.output)))
    assert result.exit_code == 0
    (line,) = _warnings(result.output)
    for needle in ("distribution tp-dup 1.2.3", "CAM source 'gradcam'", "already registered by",
                   "distribution wsss-bench", "built-in", "kept the built-in"):
        assert needle in line, line
    assert "(gradcam)" in result.output  # the listing shows the built-in's plugin
    strict = run_cli("--strict", *_run_args(tmp_path, "--cam", "gradcam"))
    check_bad(strict, "plugin registering 'gradcam', --strict", tmp_path / "cache", "distribution tp-dup 1.2.3",
              "distribution wsss-bench", "fatal under --strict")


def test_entry_point_named_like_a_builtin_plugin(run_cli, site):
    make_dist(site, "tp-same", "tp_same", CAM_MODULE.format(cls="Same", name="samecam"), ep_name="gradcam")
    result = run_cli("list", "cams")
    TABLE.append(("entry point named like the built-in plugin 'gradcam'", result.exit_code,
                  first_message(result.output)))
    assert result.exit_code == 0 and "gradcam" in result.output and "samecam" not in result.output
    (line,) = _warnings(result.output)
    for needle in ("entry point 'gradcam' (module tp_same, distribution tp-same 1.2.3)", "same name",
                   "distribution wsss-bench", "built-in", "skipped"):
        assert needle in line, line


BOOM = textwrap.dedent('''
    from wsss_bench.hookspecs import hookimpl
    from wsss_bench.interfaces import CamSource

    class BoomCam(CamSource):
        name = "boomcam"
        description = "raises inside its cell [experimental]"
        params = {"k": 1}
        def prepare(self, ctx):
            pass
        def maps(self, batch):
            raise RuntimeError("kaboom in boomcam.maps")

    @hookimpl
    def register_cam_sources(register):
        register(BoomCam)
''')


def test_plugin_that_raises_inside_a_cell_breaks_only_itself(run_cli, tmp_path):
    plugdir = tmp_path / "plugs"
    plugdir.mkdir()
    (plugdir / "boomcam.py").write_text(BOOM)
    listing = run_cli("--plugins-dir", plugdir, "list", "cams", "boom*")
    assert "raises inside its cell [experimental]" in listing.output, listing.output
    result = run_cli(*_run_args(tmp_path, "--plugins-dir", plugdir, "--cam", "boomcam[k=2],gradcam"))
    out = check_bad(result, "plugin that raises inside a cell", None,
                    "cell failed brats boomcam[k=2]+threshold seed 0", "RuntimeError: kaboom in boomcam.maps",
                    "traceback in", code=1)
    assert "gradcam+threshold seed 0: done" in " ".join(out.split())
    frame = pd.read_parquet(tmp_path / "out" / "results.parquet")
    assert set(frame["method"]) == {"gradcam+threshold"}  # the other cell finished
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    status = {c["method"]: c["status"] for c in manifest["cells"]}
    assert status == {"boomcam[k=2]+threshold": "failed", "gradcam+threshold": "done"}
    failed = next(c for c in manifest["cells"] if c["status"] == "failed")
    assert "kaboom" in failed["error"] and failed["user_error"] is False
    assert list((tmp_path / "out" / "cells").glob("*.error.txt"))
    # no published maps of boomcam; the only thing it left is its hidden work folder (kept, as for
    # every failed build, so that a build can resume; never looked up as an artifact)
    rest = leftovers(tmp_path / "cache")
    assert len(rest) == 1 and Path(rest[0]).parent.name == "maps" and Path(rest[0]).name.startswith(".partial-")
    maps = tmp_path / "cache" / "artifacts" / "maps"
    for d in maps.iterdir():
        if d.is_dir() and not d.name.startswith("."):
            assert json.loads((d / cache_mod.META).read_text())["describe"]["plugin"] == "gradcam"


# ============================================================================ user text stays as it is
def test_grid_rows_and_paths_keep_their_brackets(run_cli, tmp_path):
    """Rich markup must not eat bracketed specs or paths: a grid prints one row per value."""
    result = run_cli(*_run_args(tmp_path, "--cam", "gradcam[layer=[layer3,layer2]]"))
    assert result.exit_code == 0, result.output
    text = result.output
    for label in ("gradcam[layer=layer3]+threshold", "gradcam[layer=layer2]+threshold"):
        assert f"{label} seed 0: done" in text
        rows = [ln for ln in text.splitlines() if label in ln and ("label" in ln or "none" in ln)]
        assert len(rows) == 2, text  # the table: gate label and gate none rows of this cell
    assert "gradcam+threshold" not in text
    target = tmp_path / "reports [b]" / "r[bold].md"
    report = run_cli("report", tmp_path / "out", "--format", "markdown", "--output", target)
    assert report.exit_code == 0, report.output
    assert f"wrote {target}" in " ".join(report.output.split()) and target.is_file()


def test_nonfinite_zero_reads_nan_voxels_as_background(run_cli, brats_root, tmp_path):
    """The NaN message's remedy works from the command line: --nonfinite zero."""
    root = _copy(brats_root, tmp_path / "root")
    victim = _cases(root)[1]
    _resave(victim / f"{victim.name}_flair.nii.gz", _with_nan)
    result = run_cli(*_run_args(tmp_path, "--cam", "gradcam", "--data-root", root, "--nonfinite", "zero"))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "results.parquet").is_file()
    bad = run_cli(*_run_args(tmp_path, "--cam", "gradcam", "--data-root", root, "--nonfinite", "maybe"))
    assert bad.exit_code == 2 and "--nonfinite maybe" in bad.output


def test_a_data_error_is_read_once_and_printed_once(run_cli, brats_root, tmp_path):
    root = _copy(brats_root, tmp_path / "root")
    victim = _cases(root)[1]
    _truncate(victim / f"{victim.name}_t2.nii.gz")
    result = run_cli(*_run_args(tmp_path, "--cam", "gradcam,layercam", "--data-root", root))
    assert result.exit_code == 2
    flat = " ".join(result.output.split())
    assert flat.count("cannot read NIfTI file") == 1 and "the same error as above" in flat
