"""LayerCAM (docs/methods/layercam.md): the single-layer map, both fusions, layer choice, the plugin."""
from __future__ import annotations

import importlib
import math
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
    """Three raw 4x4 layer maps (batch of 2), already at S x S, with a negative entry.

    The last one is the deepest layer; its interior values (5 of 9 on a 4x4 cross) are where
    the paper fusion (unscaled deepest map) and the torchcam fusion (tanh-scaled) differ.
    """
    a = torch.tensor([[0, 1, 2, 3], [1, 2, 3, 4], [2, 3, 4, 5], [3, 4, 5, 6]], dtype=torch.float32)
    b = torch.tensor([[9, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 2]], dtype=torch.float32)
    c = torch.tensor([[0, 0, 5, 0], [5, 9, 5, 5], [5, 5, 9, 0], [0, 5, 0, -1]], dtype=torch.float32)
    return [torch.stack([m, m.flip(0)]) for m in (a, b, c)]


def naive_minmax(m: torch.Tensor) -> torch.Tensor:
    """Per-image (m - min) / (max - min), written out for one (S, S) map."""
    return (m - m.min()) / (m.max() - m.min())


def test_paper_fusion_scales_the_shallow_layers_only():
    """docs/methods/layercam.md: paper = max(tanh(2 mm(cam_1)), tanh(2 mm(cam_2)), mm(cam_3)) exactly, then minmax;
    torchcam = max_l tanh(2 mm(ReLU cam_l)); library = minmax(mean_l mm(cam_l)); they differ."""
    relu_maps = [torch.relu(m) for m in hand_built_maps()]  # layer maps are ReLU'd by layer_map
    net = nn.Sequential(nn.Conv2d(1, 1, 1))
    paper = layercam.LayerCAMExtractor(net, "0", fusion="paper")
    torchcam = layercam.LayerCAMExtractor(net, "0", fusion="torchcam")
    library = layercam.LayerCAMExtractor(net, "0", fusion="library")

    for b in range(2):  # an independent reference, one image at a time
        shallow = [torch.tanh(2 * naive_minmax(m[b])) for m in relu_maps[:2]]
        want_paper = torch.maximum(torch.maximum(shallow[0], shallow[1]), naive_minmax(relu_maps[2][b]))
        want_torchcam = torch.stack([torch.tanh(2 * naive_minmax(m[b])) for m in relu_maps]).amax(0)
        assert torch.equal(layercam.paper_fusion(relu_maps, (4, 4))[b], want_paper)
        assert torch.equal(layercam.torchcam_fusion(relu_maps, (4, 4))[b], want_torchcam)
        assert torch.equal(paper.fuse(relu_maps, (4, 4))[b], naive_minmax(want_paper))
        assert torch.equal(torchcam.fuse(relu_maps, (4, 4))[b], naive_minmax(want_torchcam))
        want_library = naive_minmax(torch.stack([naive_minmax(m[b]) for m in relu_maps]).mean(0))
        assert torch.allclose(library.fuse(relu_maps, (4, 4))[b], want_library, atol=1e-6)

    p, t, lib = (e.fuse(relu_maps, (4, 4)) for e in (paper, torchcam, library))
    assert (p - t).abs().max() > 0.1 and (p - lib).abs().max() > 0.05  # the variants differ
    # the deepest map enters unscaled: at (1, 0) its 5/9 beats the shallow tanh(2/6) = 0.32
    assert float(layercam.paper_fusion(relu_maps, (4, 4))[0, 1, 0]) == pytest.approx(5 / 9, abs=1e-7)
    assert float(layercam.torchcam_fusion(relu_maps, (4, 4))[0, 1, 0]) == pytest.approx(math.tanh(10 / 9), abs=1e-7)
    # which map is the deepest matters (deepest = the first map gives another result)
    assert not torch.equal(layercam.paper_fusion(relu_maps, (4, 4), deepest=0), layercam.paper_fusion(relu_maps, (4, 4)))
    # one layer: plain minmax(Up(cam)) under every fusion
    for e in (paper, torchcam, library):
        assert torch.equal(e.fuse(relu_maps[:1], (4, 4)), minmax(relu_maps[0]))


def test_paper_fusion_upsamples_after_scaling_and_leaves_the_deepest_unscaled():
    """Maps of different resolutions: tanh(2 minmax) (shallow) or minmax (deepest) at each
    layer's own resolution, then Up, max, minmax."""
    model = smoke_resnet(1, output_stride=32)
    x = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(2))
    up = torch.nn.functional.interpolate
    for fusion in ("paper", "torchcam"):
        ext = layercam.LayerCAMExtractor(model, ["layer3", "layer4"], fusion=fusion)
        raw = ext.layer_maps(x)
        assert [tuple(m.shape[-2:]) for m in raw] == [(4, 4), (2, 2)]
        scaled = [torch.tanh(2 * minmax(raw[0])),
                  minmax(raw[1]) if fusion == "paper" else torch.tanh(2 * minmax(raw[1]))]
        expected = torch.maximum(*[up(m[:, None], size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
                                   for m in scaled])
        assert torch.allclose(ext(x), minmax(expected), atol=1e-6), fusion


def test_the_deepest_layer_is_the_last_to_run_whatever_the_order_given():
    model = smoke_resnet(4)
    x = torch.rand(3, 4, 32, 32, generator=torch.Generator().manual_seed(4))
    ordered = layercam.LayerCAMExtractor(model, ["layer2", "layer3", "layer4"], fusion="paper")
    shuffled = layercam.LayerCAMExtractor(model, ["layer4", "layer2", "layer3"], fusion="paper")
    a = ordered(x)
    b = shuffled(x)
    assert shuffled.forward_order == [1, 2, 0] and ordered.forward_order == [0, 1, 2]
    assert torch.allclose(a, b, rtol=0, atol=1e-6)
    raw = shuffled.layer_maps(x)
    scaled = [torch.tanh(2 * minmax(raw[1])), torch.tanh(2 * minmax(raw[2])), minmax(raw[0])]  # layer4 unscaled
    up = [torch.nn.functional.interpolate(m[:, None], size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
          for m in scaled]  # (B, 4, 4) at output stride 8 -> (B, 32, 32)
    assert torch.allclose(b, minmax(torch.stack(up).amax(0)), rtol=0, atol=1e-6)


def test_torchcam_fusion_equals_torchcam_0_5():
    """``fusion=torchcam`` is frgfm/torch-cam 0.5.0's LayerCAM fuse_cams, then minmax.

    torch-cam normalises each layer by (x - min) / (max + 1e-8) where we use min-max; the
    difference is ~1e-7 relative, so the maps agree to 1e-5.
    """
    from torchcam.methods import LayerCAM as TorchCamLayerCAM

    model = smoke_resnet(4)
    x = torch.rand(4, 4, 32, 32, generator=torch.Generator().manual_seed(3))
    layers = ["layer2", "layer3", "layer4"]
    extractor = TorchCamLayerCAM(model, target_layer=layers)
    try:
        scores = model(x)
        cams = extractor(class_idx=[1] * len(x), scores=scores)  # per layer (B, h, w)
        ref = TorchCamLayerCAM.fuse_cams(cams, (32, 32))  # (B, 32, 32)
    finally:
        extractor.remove_hooks()
    ref = minmax(ref.detach())
    ours = layercam.LayerCAMExtractor(model, layers, fusion="torchcam")(x)
    assert float(ref.reshape(4, -1).std(1).min()) > 0.05, "the example should give non-degenerate maps"
    assert float((ours - ref).abs().max()) < 1e-5
    paper = layercam.LayerCAMExtractor(model, layers, fusion="paper")(x)
    assert float((paper - ref).abs().max()) > 1e-3  # the paper fusion is not torch-cam's


# --------------------------------------------------------------------------- layers
def test_default_layers_and_spec_forms():
    cam = layercam.LayerCAM()
    assert cam.p == {"layers": ["layer2", "layer3", "layer4"], "fusion": "paper"}
    assert layercam.LayerCAM(fusion="torchcam").p["fusion"] == "torchcam"
    assert layercam.LayerCAM.version == "2" and layercam.LayerCAM.no_grad is False
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


def test_unknown_layer_lists_valid_names(monkeypatch):
    from wsss_bench.nn import cam as cam_base

    model = smoke_resnet(1)
    ctx = SimpleNamespace(device="cpu")
    monkeypatch.setattr(cam_base, "get_classifier", lambda c: model if c is ctx else None)
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
def test_plugin_end_to_end_with_a_fake_context(monkeypatch):
    from wsss_bench.nn import cam as cam_base

    model = smoke_resnet(4)
    records = {}
    ctx = SimpleNamespace(device="cpu", record=records.__setitem__,
                          profile=SimpleNamespace(image_size=32), task=SimpleNamespace(channels=4))
    monkeypatch.setattr(cam_base, "get_classifier", lambda c: model if c is ctx else None)
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
