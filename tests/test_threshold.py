"""plugins/threshold.py: the protocol's map-to-mask rules as a refiner (docs/protocol.md section 6)."""
from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import pytest
import torch

from wsss_bench.errors import PluginError
from wsss_bench.interfaces import CamSource, SliceBatch
from wsss_bench.maps import binarize_cam, otsu_masks


def load_plugin(name: str):
    """The built-in plugin module (installed as wsss_bench_plugins, else from plugins/)."""
    try:
        return importlib.import_module(f"wsss_bench_plugins.{name}")
    except ImportError:
        path = Path(__file__).resolve().parents[1] / "plugins" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"_wsss_test_plugin_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module


threshold = load_plugin("threshold")


class _Cam(CamSource):
    name = "fake"

    def __init__(self, rule: str):
        super().__init__()
        self.mask_rule = rule

    def maps(self, batch):  # pragma: no cover - not used
        raise NotImplementedError


def _batch_and_maps():
    g = torch.Generator().manual_seed(3)
    maps = torch.rand(3, 16, 16, generator=g) ** 3
    maps[2] = 0.25  # constant map
    batch = SliceBatch(images=torch.zeros(3, 1, 16, 16), labels=torch.ones(3, dtype=torch.long),
                       index=None, case_ids=["a", "b", "c"], z=[0, 1, 2])
    return batch, maps


def test_auto_follows_the_cam_sources_rule():
    batch, maps = _batch_and_maps()
    ref = threshold.Threshold()
    cam_masks = ref.refine(batch, (maps,), (_Cam("cam"),))
    otsu = ref.refine(batch, (maps,), (_Cam("otsu"),))
    assert cam_masks.dtype == torch.bool and cam_masks.shape == (3, 16, 16)
    assert torch.equal(cam_masks, binarize_cam(maps, 0.5))
    assert torch.equal(otsu, otsu_masks(maps))
    assert not torch.equal(cam_masks, otsu)  # the example tells the rules apart
    assert not cam_masks[2].any() and not otsu[2].any()  # constant map -> empty mask


def test_forced_rules_and_value():
    batch, maps = _batch_and_maps()
    forced = threshold.Threshold(rule="otsu").refine(batch, (maps,), (_Cam("cam"),))
    assert torch.equal(forced, otsu_masks(maps))
    low = threshold.Threshold(rule="cam", value="0.2").refine(batch, (maps,), (_Cam("otsu"),))
    assert torch.equal(low, binarize_cam(maps, 0.2))
    assert threshold.Threshold(rule="cam").refine(batch, (maps,), (None,)).shape == (3, 16, 16)


def test_bad_parameters_are_named():
    with pytest.raises(PluginError, match="rule='mean'.*auto, cam, otsu"):
        threshold.Threshold(rule="mean")
    with pytest.raises(PluginError, match="value=1.5"):
        threshold.Threshold(value=1.5)
    batch, maps = _batch_and_maps()
    with pytest.raises(PluginError, match="no CAM source"):
        threshold.Threshold().refine(batch, (maps,), (None,))
    with pytest.raises(PluginError, match="kmeans"):
        threshold.Threshold().refine(batch, (maps,), (_Cam("kmeans"),))


def test_registers_itself():
    seen = []
    threshold.register_refiners(seen.append)
    assert seen == [threshold.Threshold] and threshold.Threshold.name == "threshold"


def test_two_sources_fuse_as_the_intersection_of_their_own_masks():
    """Fig. 1(e): gradcam+mg is each source's mask by its own rule, intersected."""
    batch, maps = _batch_and_maps()
    other = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(9))
    ref = threshold.Threshold()
    fused = ref.refine(batch, (maps, other), (_Cam("cam"), _Cam("otsu")))
    a = ref.refine(batch, (maps,), (_Cam("cam"),))
    b = ref.refine(batch, (other,), (_Cam("otsu"),))
    assert torch.equal(fused, a & b)
    assert a.sum() > fused.sum() > 0 and b.sum() > fused.sum()  # a real intersection, not one source


def test_no_maps_is_a_clear_error():
    batch, _ = _batch_and_maps()
    with pytest.raises(PluginError, match="map source"):
        threshold.Threshold().refine(batch, (), ())
