"""wsss_bench.interfaces: the plugin base classes and the plugin API version: parameters are
coerced and checked, a refiner written against the first published docs keeps working through
the adapter, a plugin for a newer API is refused in one sentence."""
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
from wsss_bench.interfaces import CamSource, target_api
from wsss_bench.plugins import PluginLoadWarning, load_plugins

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




class _Cam(CamSource):
    name = "toy"
    params = {"layer": "layer4", "chunk": 64, "scale": 1.0, "flip": False, "layers": ["layer3", "layer4"]}

    def maps(self, batch):  # pragma: no cover - not called
        raise AssertionError


def test_plugin_params_are_coerced_and_unknown_names_rejected():
    cam = _Cam(chunk="32", scale=2, flip="true", layers="layer2+layer3")
    assert cam.p["chunk"] == 32 and cam.p["scale"] == 2.0 and cam.p["flip"] is True
    assert cam.p["layers"] == ["layer2", "layer3"]
    assert cam.spec() == "toy[chunk=32,flip=true,layers=layer2+layer3,scale=2.0]"
    with pytest.raises(PluginError) as err:
        _Cam(layr="layer3")
    msg = str(err.value)
    assert "toy" in msg and "layr" in msg and "did you mean 'layer'" in msg and "chunk=64" in msg
    with pytest.raises(PluginError, match="expects int"):
        _Cam(chunk="many")
