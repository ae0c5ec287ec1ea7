"""LayerCAM (METHODS section 5): the single-layer map, both fusions, layer choice, the plugin."""
from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

from wsss_bench._compat import ensure_torchvision, import_timm
from wsss_bench.errors import PluginError
from wsss_bench.interfaces import SliceBatch
from wsss_bench.maps import minmax
from wsss_bench.spec import parse_specs

ROOT = Path(__file__).resolve().parents[1]




import wsss_bench_plugins.layercam as layercam
import wsss_bench_plugins.gradcam as gradcam


def smoke_resnet(in_chans: int, seed: int = 0, output_stride: int = 8) -> nn.Module:
    """The smoke-profile CAM classifier shape: resnet18, widths (8,16,32,64), output stride 8."""
    timm = import_timm()
    torch.manual_seed(seed)
    model = timm.create_model("resnet18", pretrained=False, in_chans=in_chans, num_classes=2,
                              output_stride=output_stride, channels=(8, 16, 32, 64))
    with torch.no_grad():  # a positive class-1 row keeps most random maps non-degenerate
        model.fc.weight[1].abs_()
    return model.eval()


# --------------------------------------------------------------------------- oracle
@pytest.mark.parametrize("in_chans", [4, 1])
def test_library_fusion_equals_pytorch_grad_cam(in_chans):
    """``fusion=library`` gives pytorch-grad-cam 1.5.7's LayerCAM (ClassifierOutputTarget(1)).

    Single layers (layer4, layer3) and the default three-layer set, whose per-layer maps
    grad-cam scales by (x - min)/(max + 1e-7), resizes and averages, exactly our library
    fusion; the final scalings differ only by grad-cam's epsilon.
    """
    ensure_torchvision()
    from pytorch_grad_cam import LayerCAM as RefLayerCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = smoke_resnet(in_chans)
    x = torch.rand(5, in_chans, 32, 32, generator=torch.Generator().manual_seed(1))
    for layers in (["layer4"], ["layer3"], ["layer2", "layer3", "layer4"]):
        ref_cam = RefLayerCAM(model, [model.get_submodule(n) for n in layers])
        ref = ref_cam(x, targets=[ClassifierOutputTarget(1)] * len(x))
        ref_cam.activations_and_grads.release()
        ours = layercam.LayerCAMExtractor(model, layers, fusion="library")(x)
        spread = ref.reshape(5, -1).max(1) - ref.reshape(5, -1).min(1)
        assert (spread > 0.5).sum() >= 4, "the example should give non-degenerate maps"
        assert np.abs(ours.numpy() - ref).max() < 1e-5, layers


# --------------------------------------------------------------------------- mechanism
class QuadrantNet(nn.Module):
    """conv (target) -> ReLU -> keep the top-left quadrant only -> GAP -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(2, 6, 3, padding=1)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        a = torch.relu(self.features(x))
        h, w = a.shape[-2:]
        keep = torch.zeros(h, w, dtype=a.dtype)
        keep[: h // 2, : w // 2] = 1
        return self.fc((a * keep).mean((2, 3)))


def test_single_layer_is_zero_outside_the_quadrant_gradcam_is_not():
    torch.manual_seed(0)
    net = QuadrantNet().double().eval()
    x = torch.rand(3, 2, 8, 8, dtype=torch.float64)
    lc = layercam.LayerCAMExtractor(net, "features")(x, size=(8, 8))
    gc = gradcam.GradCAMExtractor(net, "features")(x, size=(8, 8))
    outside = torch.ones(8, 8, dtype=torch.bool)
    outside[:4, :4] = False
    assert (lc[:, outside] == 0).all()
    assert (lc[:, ~outside].amax(1) == 1).all()
    assert (gc[:, outside] > 0).any()


def hand_built_maps() -> list[torch.Tensor]:
    """Three raw 4x4 layer maps (batch of 2), already at S x S, with a negative entry."""
    a = torch.tensor([[0, 1, 2, 3], [1, 2, 3, 4], [2, 3, 4, 5], [3, 4, 5, 6]], dtype=torch.float32)
    b = torch.tensor([[9, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 2]], dtype=torch.float32)
    c = torch.tensor([[0, 0, 0, 0], [0, 5, 5, 0], [0, 5, 5, 0], [0, 0, 0, -1]], dtype=torch.float32)
    return [torch.stack([m, m.flip(0)]) for m in (a, b, c)]


def test_paper_fusion_is_max_of_tanh_scaled_maps():
    maps = hand_built_maps()
    ext = layercam.LayerCAMExtractor(nn.Sequential(nn.Conv2d(1, 1, 1)), "0", fusion="paper")
    expected = torch.stack([torch.tanh(2 * minmax(torch.relu(m))) for m in maps]).amax(0)
    relu_maps = [torch.relu(m) for m in maps]  # layer maps are ReLU'd by layer_map
    assert torch.equal(layercam.paper_fusion(relu_maps, (4, 4)), expected)
    assert torch.equal(ext.fuse(relu_maps, (4, 4)), minmax(expected))

    lib = layercam.LayerCAMExtractor(nn.Sequential(nn.Conv2d(1, 1, 1)), "0", fusion="library")
    library = lib.fuse(relu_maps, (4, 4))
    assert torch.allclose(library, minmax(torch.stack([minmax(m) for m in relu_maps]).mean(0)), atol=1e-6)
    assert (library - ext.fuse(relu_maps, (4, 4))).abs().max() > 0.05  # the variants differ
    # one layer: plain minmax(Up(cam)) under either fusion
    assert torch.equal(ext.fuse(relu_maps[:1], (4, 4)), minmax(relu_maps[0]))
    assert torch.equal(lib.fuse(relu_maps[:1], (4, 4)), minmax(relu_maps[0]))


def test_paper_fusion_upsamples_after_tanh():
    """Maps of different resolutions: tanh(2 minmax) at each layer's resolution, then Up."""
    model = smoke_resnet(1, output_stride=32)
    x = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(2))
    ext = layercam.LayerCAMExtractor(model, ["layer3", "layer4"], fusion="paper")
    raw = ext.layer_maps(x)
    assert [tuple(m.shape[-2:]) for m in raw] == [(4, 4), (2, 2)]
    up = torch.nn.functional.interpolate
    expected = torch.maximum(*[up(torch.tanh(2 * minmax(m))[:, None], size=(64, 64), mode="bilinear",
                                  align_corners=False)[:, 0] for m in raw])
    assert torch.allclose(ext(x), minmax(expected), atol=1e-6)


# --------------------------------------------------------------------------- layers
def test_default_layers_and_spec_forms():
    cam = layercam.LayerCAM()
    assert cam.p == {"layers": ["layer2", "layer3", "layer4"], "fusion": "paper"}
    assert cam.layers == ["layer2", "layer3", "layer4"]
    (spec,) = parse_specs("layercam[layers=layer3+layer4,fusion=library]")
    (params,) = spec.expand()
    assert layercam.LayerCAM(**params).layers == ["layer3", "layer4"]
    (spec,) = parse_specs("layercam[layers='layer3,layer4']")
    assert layercam.LayerCAM(**spec.expand()[0]).layers == ["layer3", "layer4"]
    assert layercam.LayerCAM(layers="layer4").layers == ["layer4"]
    with pytest.raises(PluginError, match="fusion"):
        layercam.LayerCAM(fusion="mean")
    with pytest.raises(PluginError, match="twice"):
        layercam.LayerCAM(layers="layer4+layer4")


def test_unknown_layer_lists_valid_names():
    model = smoke_resnet(1)
    ctx = SimpleNamespace(device="cpu", classifier=lambda: model)
    with pytest.raises(PluginError) as err:
        layercam.LayerCAM(layers="layer3+layer5").prepare(ctx)
    msg = str(err.value)
    assert "layercam" in msg and "'layer5'" in msg
    for name in ("conv1", "layer1", "layer2", "layer3", "layer4"):
        assert name in msg


def test_strided_layers_follow_the_output_stride():
    names = ["layer1", "layer2", "layer3", "layer4"]
    os8 = smoke_resnet(1, output_stride=8)
    assert layercam.strided_layers(os8, names, torch.zeros(1, 1, 32, 32)) == ["layer1"]
    os32 = smoke_resnet(1, output_stride=32)
    assert layercam.strided_layers(os32, names, torch.zeros(1, 1, 64, 64)) == ["layer1", "layer2", "layer3"]


# --------------------------------------------------------------------------- plugin
def test_plugin_end_to_end_with_a_fake_context():
    model = smoke_resnet(4)
    records = {}
    ctx = SimpleNamespace(device="cpu", classifier=lambda: model, record=records.__setitem__,
                          profile=SimpleNamespace(image_size=32), task=SimpleNamespace(channels=4))
    cam = layercam.LayerCAM()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default layers are not strided at output stride 8
        cam.prepare(ctx)
    assert records == {"layercam/strided_layers": []}
    images = torch.rand(3, 4, 32, 32)
    batch = SliceBatch(images=images, labels=torch.tensor([1, 0, 1]), index=np.arange(3),
                       case_ids=["a", "b", "c"], z=[0, 1, 2])
    maps = cam.maps(batch)
    assert maps.shape == (3, 32, 32) and float(maps.max()) == 1.0 and float(maps.min()) == 0.0
    assert all(p.grad is None for p in model.parameters())

    with pytest.warns(UserWarning, match="layer1"):
        layercam.LayerCAM(layers="layer1+layer4").prepare(ctx)
    assert records["layercam/strided_layers"] == ["layer1"]

    seen = []
    layercam.register_cam_sources(seen.append)
    assert seen == [layercam.LayerCAM]


def test_importing_the_plugins_does_not_import_torch():
    code = "import importlib.util, sys\n"
    for name in ("gradcampp", "scorecam", "layercam"):
        code += (f"spec = importlib.util.spec_from_file_location('{name}', {str(ROOT / 'plugins' / (name + '.py'))!r})\n"
                 "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n")
    code += "assert 'torch' not in sys.modules, 'torch imported'\n"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
