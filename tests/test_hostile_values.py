"""The --set value corpus: every value a method cannot run with is refused before any work,
in one sentence naming the key, with exit 2; an unknown key gets a did-you-mean."""
from __future__ import annotations

import pytest

from wsss_bench.errors import UserError
from wsss_bench.profiles import PROFILE_NAMES, _leaves, apply_overrides, check_profile, check_value, load_profile

BAD = [
    ("classifier.batch=0", "'classifier.batch' must be greater than 0"),
    ("classifier.epochs=0", "'classifier.epochs' must be greater than 0"),
    ("classifier.epochs=1e309", "'classifier.epochs' must be a finite number"),
    ("classifier.epochs=nan", "'classifier.epochs' must be a finite number"),
    ("classifier.epochs=2.5", "'classifier.epochs' takes an integer"),
    ("classifier.epochs=10000000000", "out of range"),
    ("cdm.iterations=-3", "must not be negative"),
    ("cdm.lr=0", "'cdm.lr' must be greater than 0"),
    ("cdm.ema=1.5", "'cdm.ema' must be below 1"),
    ("mg.t_ref=[100,-1]", "'mg.t_ref' must not be negative"),
    ("image_size=7", "at least 16 pixels"),
    ("image_size=36", "not a multiple of 'cam_classifier.output_stride' = 8"),
    ("cdm.iterationz=5", "did you mean 'cdm.iterations'?"),
    ("classifer.epochs=2", "did you mean 'classifier.epochs'?"),
    ("classifier.epochs=many", "is int"),
]


@pytest.mark.parametrize("item,needle", BAD, ids=[b[0] for b in BAD])
def test_bad_set_values_are_one_sentence_exit_2_before_any_work(run_cli, tmp_path, item, needle):
    result = run_cli("run", "--profile", "smoke", "--cam", "gradcam", "--method", "threshold", "--set", item,
                     "--cache-dir", tmp_path / "cache", "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    text = " ".join(result.output.split())
    assert lines[0].startswith("error: --set ") and needle in text and "Traceback" not in text, result.output
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()  # before any work


@pytest.mark.parametrize("seed", ["1e23", "100000000000000000000000", "-1"])
def test_bad_seeds(run_cli, tmp_path, seed):
    result = run_cli("run", "--profile", "smoke", "--cam", "gradcam", "--method", "threshold", "--seed", seed,
                     "--cache-dir", tmp_path / "cache", "--out", tmp_path / "out")
    assert result.exit_code == 2 and result.output.startswith(f"error: --seed {seed}"), result.output


def test_every_shipped_profile_passes_its_own_rules():
    for name in PROFILE_NAMES:
        prof = load_profile(name)
        assert check_profile(prof) is None
        assert [k for k, v in _leaves(prof).items() if check_value(k, v)] == []


def test_good_overrides_still_pass():
    cpu = load_profile("cpu")
    short = apply_overrides(cpu, ["cdm.iterations=200", "image_size=32", "amecam.simclr_epochs=0", "cdm.ema=0.5"])
    assert short.cdm.iterations == 200 and short.amecam.simclr_epochs == 0
    with pytest.raises(UserError, match="must be greater than 0"):
        apply_overrides(cpu, ["classifier.batch=0"])


# ============================================================================ plugin files are code
def test_loose_plugin_files_are_named_as_code(tmp_path, monkeypatch):
    """`list` and `profiles` run the files of WSSS_BENCH_PLUGINS_DIR too: the command says which."""
    import subprocess
    import sys

    d = tmp_path / "plugs"
    d.mkdir()
    marker = tmp_path / "ran.txt"
    (d / "sneaky.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    env = dict(__import__("os").environ, WSSS_BENCH_PLUGINS_DIR=str(d), CI="1")
    code = "import sys; from wsss_bench.cli import main; main(sys.argv[1:])"
    for cmd in (["list", "cams"], ["profiles"]):
        marker.unlink(missing_ok=True)
        result = subprocess.run([sys.executable, "-c", code, *cmd], capture_output=True, text=True, env=env,
                                timeout=120)
        assert result.returncode == 0, result.stderr
        assert marker.is_file()  # it did run: the note is the truth, not a formality
        note = " ".join(result.stderr.split())
        assert f"note: ran 1 loose plugin file(s) as code: {d / 'sneaky.py'}" in note, result.stderr
    help_text = subprocess.run([sys.executable, "-c", code, "run", "--help"], capture_output=True, text=True,
                               env=dict(env, WSSS_BENCH_PLUGINS_DIR="", COLUMNS="200"), timeout=120).stdout
    assert "Python code that runs with your permissions" in " ".join(help_text.replace("│", " ").split())
