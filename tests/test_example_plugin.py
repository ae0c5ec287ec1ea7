"""The whole third-party path, with the worked example package in tests/example_plugin:
discovery with distribution and version, a run on the phantoms, and the contract suite."""
import os
import sys

import pandas as pd
import pytest
from typer.testing import CliRunner

from third_party import DIST, EXAMPLE, VERSION, fake_site
from wsss_bench import cli


@pytest.fixture
def example_installed(tmp_path, monkeypatch):
    site = fake_site(tmp_path / "site")
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setitem(cli._STATE, "host", None)
    yield site
    sys.modules.pop("wsss_bench_example", None)
    cli._STATE["host"] = None


def test_plugins_lists_the_example_with_distribution_and_version(example_installed):
    result = CliRunner().invoke(cli.app, ["plugins", "--all"])
    assert result.exit_code == 0, result.output
    line = next(l for l in result.output.splitlines() if "wsss_bench_example" in l)
    assert DIST in line and VERSION in line and "ok" in line
    assert "cams:randomcam" in result.output and "refiners:dilate" in result.output


def test_run_with_the_example_plugins(example_installed, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(cli.app, ["run", "--profile", "smoke", "--method", "dilate[radius=2]",
                                          "--cam", "randomcam", "--task", "brats", "--out", str(out)])
    assert result.exit_code == 0, result.output
    frame = pd.read_parquet(out / "results.parquet")
    assert set(frame["method"]) == {"randomcam+dilate[radius=2]"}
    assert set(frame["gate"]) == {"label", "classifier", "none"}
    manifest = (out / "manifest.json").read_text()
    assert DIST in manifest and VERSION in manifest


def test_contract_suite_passes_on_the_example(example_installed, pytester, monkeypatch):
    """What a plugin author runs in their own package: pytest --wsss-bench-plugin NAME."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(example_installed), str(EXAMPLE),
                                                     os.environ.get("PYTHONPATH", "")]))
    pytester.makeini("[pytest]\n")
    result = pytester.runpytest_subprocess("--wsss-bench-plugin", "wsss_bench_example", "-v", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["wsss-bench plugin API *", "*cams:randomcam targets plugin API *"])
    result.stdout.fnmatch_lines(["*test_plugin_contract?cams:randomcam? PASSED*",
                                 "*test_plugin_contract?refiners:dilate? PASSED*"])


BROKEN = '''
import os
from wsss_bench.hookspecs import hookimpl
from wsss_bench.interfaces import CamSource
from wsss_bench.lazy import torch


class OutOfRange(CamSource):
    name = "rangecam"
    def maps(self, batch):
        return torch.ones(batch.images.shape[0], *batch.images.shape[-2:]) * 2


class Unseeded(CamSource):
    name = "noisecam"
    def maps(self, batch):
        g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
        return torch.rand(batch.images.shape[0], *batch.images.shape[-2:], generator=g)


class WrongShape(CamSource):
    name = "shapecam"
    def maps(self, batch):
        return torch.zeros(batch.images.shape[0], 3, 3)


@hookimpl
def register_cam_sources(register):
    register(OutOfRange); register(Unseeded); register(WrongShape)
'''


def test_contract_suite_fails_broken_plugins(pytester, monkeypatch, tmp_path):
    """The suite is not a rubber stamp: range, determinism and shape violations fail."""
    plugdir = tmp_path / "plugs"
    plugdir.mkdir()
    (plugdir / "broken.py").write_text(BROKEN)
    monkeypatch.setenv("WSSS_BENCH_PLUGINS_DIR", str(plugdir))
    pytester.makeini("[pytest]\n")
    result = pytester.runpytest_subprocess("--wsss-bench-plugin", "broken", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=3)
    result.stdout.fnmatch_lines(["*maps must lie in [[]0, 1[]]*"])
    result.stdout.fnmatch_lines(["*maps differ between two runs*"])
    result.stdout.fnmatch_lines(["*maps must be (B, S, S)*"])
