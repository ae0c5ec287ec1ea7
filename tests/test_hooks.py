"""Every hook has a test here, and every example module in docs/plugins.md is loaded and used
(so the documentation cannot rot)."""
import inspect
import re
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from wsss_bench import cli, hookspecs
from wsss_bench.plugins import load_plugins

DOCS = Path(__file__).resolve().parent.parent / "docs" / "plugins.md"


@pytest.fixture(scope="module")
def doc_plugins(tmp_path_factory) -> Path:
    """Each ```python block of docs/plugins.md that defines a hook, written as a plugin file."""
    folder = tmp_path_factory.mktemp("doc_plugins")
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.S)
    modules = [b for b in blocks if "@hookimpl" in b]
    assert len(modules) >= 7
    for i, code in enumerate(modules):
        (folder / f"doc_example_{i}.py").write_text(code)
    return folder


@pytest.fixture(scope="module")
def host(doc_plugins):
    h = load_plugins(strict=True, plugins_dirs=[doc_plugins])
    h.pm.check_pending()
    return h


@pytest.fixture
def runner(monkeypatch):
    monkeypatch.setitem(cli._STATE, "host", None)
    return CliRunner()


def test_every_hook_is_documented_with_its_exact_signature_and_tested():
    docs = DOCS.read_text()
    tests = {name for name, _ in inspect.getmembers(__import__(__name__), inspect.isfunction)}
    specs = [n for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("register_")]
    assert len(specs) == 7
    for name in specs:
        signature = f"def {name}{inspect.signature(getattr(hookspecs, name))}"
        assert signature in docs, f"docs/plugins.md lacks the exact signature `{signature}`"
        assert f"test_{name}" in tests, f"hook {name} has no test_{name} in tests/test_hooks.py"


def test_register_cam_sources(host, tmp_path, runner, doc_plugins):
    """The five-minute example, loaded with --plugins-dir, runs through `wsss-bench run`."""
    assert host.registries["cams"].entry("centrecam").plugin.startswith("doc_example")
    out = tmp_path / "run"
    result = runner.invoke(cli.app, ["--plugins-dir", str(doc_plugins), "run", "--profile", "smoke",
                                     "--method", "threshold,topfraction", "--cam", "centrecam[sigma=0.2]",
                                     "--task", "brats", "--out", str(out)])
    assert result.exit_code == 0, result.output
    frame = pd.read_parquet(out / "results.parquet")
    assert set(frame["method"]) == {"centrecam[sigma=0.2]+threshold", "centrecam[sigma=0.2]+topfraction"}
    assert (frame.query("gate == 'none'")["pred_area"] > 0).all()


def test_register_refiners(host):
    import torch

    ref = host.get("refiners", "topfraction")(fraction=0.25)
    maps = torch.rand(3, 8, 8)
    masks = ref.refine(None, (maps,), (None,))
    assert masks.dtype == torch.bool and masks.shape == (3, 8, 8)
    assert masks.flatten(1).sum(1).tolist() == [16, 16, 16]


def test_register_backbones(host):
    import torch

    bb = host.get("backbones", "pixels")()
    bb.prepare(type("Ctx", (), {"task": type("T", (), {"channels": 4})})())
    images = torch.rand(2, 4, 6, 6)
    coords = torch.tensor([[0, 1, 2], [1, 5, 5]])
    assert torch.equal(bb.gather(images, coords), torch.stack([images[0, :, 1, 2], images[1, :, 5, 5]]))
    streamed = torch.cat([part for _, part in bb.stream(images[0], 7)])
    assert torch.equal(streamed, images[0].flatten(1).T)


def test_register_datasets(host, runner, doc_plugins, tmp_path):
    from wsss_bench.data.taskdata import load_task_data
    from wsss_bench.profiles import load_profile

    cls, task = host.task("brats-et")
    assert task.foreground == (4,)
    result = runner.invoke(cli.app, ["--plugins-dir", str(doc_plugins), "list", "tasks"])
    assert "brats-et" in result.output and "brats" in result.output
    data = load_task_data(cls(), "brats-et", None, load_profile("smoke"), 0, tmp_path)
    whole = load_task_data(host.task("brats")[0](), "brats", None, load_profile("smoke"), 0, tmp_path)
    idx = whole.split("test")
    # enhancing tumour is a strict subset of the whole tumour on the same slices
    et = data.masks(idx)
    assert et.sum() > 0 and (et & ~whole.masks(idx)).sum() == 0 and et.sum() < whole.masks(idx).sum()


def _results_dir(tmp_path) -> Path:
    rows = []
    for method, d in (("a+threshold", 0.5), ("b+threshold", 0.75)):
        for z in range(4):
            rows.append(dict(task="brats", method=method, cam=method[0], refiner="threshold", gate="label",
                             case_id="c1", z=z, split="test", label=1, fg_fraction=0.1, gt_area=10, pred_area=10,
                             gate_pass=True, classifier_p1=0.9, dice=d, iou=d / 2, seed=0, profile="smoke",
                             params="{}", data="phantom"))
    run = tmp_path / "r"
    run.mkdir()
    pd.DataFrame(rows).to_parquet(run / "results.parquet")
    return run


def test_register_exporters(host, runner, doc_plugins, tmp_path):
    result = runner.invoke(cli.app, ["--plugins-dir", str(doc_plugins), "report", str(_results_dir(tmp_path)),
                                     "--format", "tsv"])
    assert result.exit_code == 0, result.output
    # the output also names the loose plugin files it ran ("note: ran N loose plugin file(s) as code")
    lines = [ln for ln in result.output.strip().splitlines() if not ln.startswith("note:")]
    assert lines[0].count("\t") >= 2 and any(l.startswith("b+threshold\t0.750") for l in lines)


def test_register_executors(host):
    pool = host.get("executors", "pool")(workers=2)
    assert pool.map(abs, [-1, -2, 3]) == [1, 2, 3]


def test_register_commands(doc_plugins, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--plugins-dir", str(doc_plugins), "cite", "--style", "text"])
    assert done.value.code in (0, None)
    assert "Zeng et al." in capsys.readouterr().out
