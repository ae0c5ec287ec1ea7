"""The plugin API version: a refiner written against the first published docs keeps working,
a plugin for a newer API is refused in one sentence, a name clash keeps both plugins reachable."""
from __future__ import annotations

import textwrap
import types

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import wsss_bench
from wsss_bench import cli
from wsss_bench.errors import PluginError
from wsss_bench.interfaces import target_api
from wsss_bench.plugins import PluginLoadWarning, load_plugins
from wsss_bench.spec import parse_specs

#: the refiner example of the first published docs/plugins.md, verbatim (plugin API 1)
API1_REFINER = textwrap.dedent('''
    from wsss_bench.hookspecs import hookimpl
    from wsss_bench.interfaces import Refiner
    from wsss_bench.maps import minmax


    class TopFraction(Refiner):
        """Keep the brightest `fraction` of each map."""
        name = "topfraction"
        params = {"fraction": 0.1}

        def refine(self, batch, maps, cam):
            flat = minmax(maps).flatten(1)
            k = max(1, int(self.p["fraction"] * flat.shape[1]))
            cut = flat.topk(k, dim=1).values[:, -1:]
            return (flat >= cut).reshape(maps.shape)


    @hookimpl
    def register_refiners(register):
        register(TopFraction)
''')


@pytest.fixture
def api1_dir(tmp_path):
    d = tmp_path / "api1"
    d.mkdir()
    (d / "topfraction.py").write_text(API1_REFINER)
    return d


def _reference_top_fraction(maps: np.ndarray, fraction: float) -> np.ndarray:
    """Independent float64 reference: per map, min-max scale, keep values >= the k-th largest."""
    out = np.zeros(maps.shape, dtype=bool)
    for i, m in enumerate(maps.astype(np.float64)):
        span = m.max() - m.min()
        scaled = (m - m.min()) / span if span >= 1e-8 else np.zeros_like(m)
        flat = np.sort(scaled.ravel())[::-1]
        k = max(1, int(fraction * flat.size))
        out[i] = scaled >= flat[k - 1]
    return out


def test_plugin_api_is_a_published_integer():
    assert isinstance(wsss_bench.PLUGIN_API, int) and wsss_bench.PLUGIN_API >= 3
    from pathlib import Path

    docs = (Path(__file__).resolve().parents[1] / "docs" / "plugins.md").read_text()
    assert f"PLUGIN_API = {wsss_bench.PLUGIN_API}" in docs or f"plugin API {wsss_bench.PLUGIN_API}" in docs


def test_a_refiner_written_for_api_1_runs_through_the_adapter(api1_dir):
    host = load_plugins(plugins_dirs=[api1_dir])
    cls = host.get("refiners", "topfraction")
    assert target_api(cls) == 1 and target_api(host.get("refiners", "threshold")) == wsss_bench.PLUGIN_API
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(3, 16, 16, generator=g)
    batch = types.SimpleNamespace(images=torch.zeros(3, 1, 16, 16))
    source = types.SimpleNamespace(spec=lambda: "gradcam", name="gradcam")
    ref = cls(fraction=0.2)
    ref.prepare(None, (source,))
    masks = ref.refine(batch, (maps,), (source,))  # what the runner passes today
    assert np.array_equal(masks.numpy(), _reference_top_fraction(maps.numpy(), 0.2))
    # without the adapter the same plugin crashes exactly as reported
    with pytest.raises(AttributeError, match="'tuple' object has no attribute 'ndim'"):
        cls.adapted_from(fraction=0.2).refine(batch, (maps,), (source,))
    with pytest.raises(PluginError, match=r"plugin API 1 \(one map source\).*a\+b; give it one --cam source"):
        ref.refine(batch, (maps, maps), (types.SimpleNamespace(spec=lambda: "a"),
                                         types.SimpleNamespace(spec=lambda: "b")))


def test_an_api_1_refiner_runs_a_whole_cell(api1_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(cli._STATE, "host", None)
    out = tmp_path / "run"
    result = CliRunner().invoke(cli.app, ["--plugins-dir", str(api1_dir), "run", "--profile", "smoke",
                                          "--cam", "gradcam", "--method", "topfraction[fraction=0.05]",
                                          "--task", "brats", "--out", str(out)])
    monkeypatch.setitem(cli._STATE, "host", None)
    assert result.exit_code == 0, result.output
    frame = pd.read_parquet(out / "results.parquet")
    assert set(frame["method"]) == {"gradcam+topfraction[fraction=0.05]"}
    none = frame[frame["gate"] == "none"]
    assert (none["pred_area"] > 0).all()  # the top 5 % of every map is kept


def test_a_plugin_for_a_newer_api_is_refused_in_one_sentence(tmp_path):
    (tmp_path / "future.py").write_text(API1_REFINER.replace('name = "topfraction"',
                                                             'name = "future"\n    plugin_api = 99'))
    with pytest.warns(PluginLoadWarning, match=r"refiner 'future' targets plugin API 99, newer than this "
                                               r"wsss-bench's \d+; upgrade wsss-bench"):
        host = load_plugins(plugins_dirs=[tmp_path])
    assert "future" not in host.registries["refiners"]
    with pytest.raises(PluginError, match="plugin API 99"):
        load_plugins(plugins_dirs=[tmp_path], strict=True)


def test_ctx_classifier_names_the_change_and_the_fix():
    from wsss_bench.context import RunContext

    ctx = RunContext.__new__(RunContext)
    with pytest.raises(PluginError, match=r"removed in plugin API 3.*get_classifier\(ctx\)"):
        ctx.classifier()
    with pytest.raises(AttributeError):
        ctx.no_such_thing


HTML_EXPORTER = textwrap.dedent('''
    from wsss_bench.hookspecs import hookimpl
    from wsss_bench.interfaces import Exporter

    class MyHtml(Exporter):
        name = "html"
        suffix = ".html"
        def export(self, table):
            return "<p>third party</p>"

    @hookimpl
    def register_exporters(register):
        register(MyHtml)
''')


def test_a_name_clash_keeps_the_builtin_and_qualifies_the_plugin(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "tp_html.py").write_text(HTML_EXPORTER)
    info = tmp_path / "tp_html-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tp-html\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[wsss_bench]\ntp_html = tp_html\n")
    try:
        with pytest.warns(PluginLoadWarning) as caught:
            host = load_plugins()
        (message,) = [str(w.message) for w in caught if "html" in str(w.message)]
        assert "kept the built-in as 'html'" in message and "reachable as 'tp-html:html'" in message
        assert host.registries["exporters"].entry("html").plugin != "tp_html"  # the built-in
        mine = host.get("exporters", parse_specs("tp-html:html")[0].name)
        assert mine().export(None) == "<p>third party</p>" and mine.name == "tp-html:html"
        assert "exporters:tp-html:html" in host.infos["tp_html"].provides
        with pytest.raises(PluginError, match="fatal under --strict"):
            load_plugins(strict=True)
    finally:
        import sys

        sys.modules.pop("tp_html", None)
