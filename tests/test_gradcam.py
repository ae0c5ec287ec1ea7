"""GradCAM (docs/methods/gradcam.md) and the CAM template it uses (wsss_bench.nn.cam)."""
from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

from cam_helpers import smoke_resnet
from wsss_bench._compat import ensure_torchvision, import_timm
from wsss_bench.errors import PluginError
from wsss_bench.interfaces import SliceBatch
from wsss_bench.maps import minmax
from wsss_bench.nn.cam import CamExtractor, ClassifierCam

ROOT = Path(__file__).resolve().parents[1]




import wsss_bench_plugins.gradcam as gradcam




# --------------------------------------------------------------------------- oracle
@pytest.mark.parametrize("in_chans", [4, 1])
def test_equals_pytorch_grad_cam(in_chans):
    """Same maps as pytorch-grad-cam 1.5.7's GradCAM with ClassifierOutputTarget(1).

    What is compared, exactly: grad-cam returns, per image, scale(resize(scale(ReLU(cam))))
    at input size, where scale(x) = (x - min) / (max + 1e-7) and resize is cv2.resize with
    INTER_LINEAR; we return minmax(Up(ReLU(cam))).  cv2's INTER_LINEAR uses half-pixel
    centres with edge clamping, which for this integer (x8) upscale is torch's bilinear with
    align_corners=False, and min-max scaling commutes with a resize that reproduces
    constants; so the two differ only by grad-cam's 1e-7 epsilons, which the second
    scaling cancels to ~1e-7 relative.  We also compare the raw ingredients at activation
    resolution: grad-cam's captured gradients against ours (our layers below the target
    run without a graph, so this checks that shortcut), and our raw layer map against
    ReLU(sum_k mean(g_k) A_k) from grad-cam's own activations and gradients.
    """
    ensure_torchvision()
    from pytorch_grad_cam import GradCAM as RefGradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = smoke_resnet(in_chans)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(5, in_chans, 32, 32, generator=g)
    for layer in ("layer4", "layer3"):
        ref_cam = RefGradCAM(model, [getattr(model, layer)])
        ref = ref_cam(x, targets=[ClassifierOutputTarget(1)] * len(x))  # (B, 32, 32) numpy
        ref_acts = ref_cam.activations_and_grads.activations[0]
        ref_grads = ref_cam.activations_and_grads.gradients[0]
        ref_cam.activations_and_grads.release()

        ext = gradcam.GradCAMExtractor(model, layer)
        _, acts, grads = ext.capture(x)
        ours = ext(x)
        raw = ext.layer_maps(x)[0]

        assert ours.shape == (5, 32, 32) and ours.dtype == torch.float32
        spread = ref.reshape(5, -1).max(1) - ref.reshape(5, -1).min(1)
        assert (spread > 0.5).sum() >= 4, "the example should give non-degenerate maps"
        assert np.abs(ours.numpy() - ref).max() < 1e-5, layer
        assert torch.allclose(acts[0], ref_acts, rtol=0, atol=1e-6)
        assert torch.allclose(grads[0], ref_grads, rtol=1e-5, atol=1e-9)
        alpha = ref_grads.mean(dim=(2, 3), keepdim=True)
        assert torch.allclose(raw, torch.relu((alpha * ref_acts).sum(1)), rtol=1e-5, atol=1e-9)


# --------------------------------------------------------------------------- mechanism
class ToyCAMNet(nn.Module):
    """conv -> ReLU -> GAP -> linear w: the network of the classic CAM."""

    def __init__(self, k: int = 6) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(2, k, 3, padding=1), nn.ReLU(inplace=True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(k, 2)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


def test_weights_are_fc_weights_over_z_so_gradcam_is_classic_cam():
    """docs/methods/gradcam.md: alpha_k = w_k / Z, so minmax(GradCAM) = minmax(ReLU(sum_k w_k A_k))."""
    torch.manual_seed(0)
    net = ToyCAMNet().double().eval()
    x = torch.rand(3, 2, 9, 7, dtype=torch.float64)
    ext = gradcam.GradCAMExtractor(net, "features")
    _, (acts,), (grads,) = ext.capture(x)
    z = 9 * 7
    w = net.fc.weight[1].detach()  # (K,)
    alpha = grads.mean(dim=(2, 3))  # (B, K)
    assert torch.allclose(alpha, (w / z).expand(3, -1), rtol=1e-12, atol=0)
    classic = torch.relu((w[None, :, None, None] * acts).sum(1))
    assert torch.allclose(ext(x, size=(9, 7)), minmax(classic), rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- template
def test_unknown_layer_lists_valid_names():
    model = smoke_resnet(1)
    with pytest.raises(PluginError) as err:
        gradcam.GradCAMExtractor(model, "layer5")
    msg = str(err.value)
    for name in ("conv1", "layer1", "layer2", "layer3", "layer4"):
        assert name in msg
    assert "did you mean 'layer4'" in msg or "did you mean 'layer1'" in msg


def test_call_leaves_model_clean_and_grads_untouched():
    model = smoke_resnet(4)
    x = torch.rand(2, 4, 32, 32)
    maps = gradcam.GradCAMExtractor(model, "layer4")(x)
    assert maps.shape == (2, 32, 32) and float(maps.min()) >= 0 and float(maps.max()) <= 1
    assert all(p.grad is None for p in model.parameters())  # the backward stops at the layer
    assert all(not m._forward_hooks for m in model.modules())  # hooks removed
    assert torch.is_grad_enabled()
    with torch.no_grad():  # works under no_grad and restores it
        assert torch.equal(gradcam.GradCAMExtractor(model, "layer4")(x), maps)
        assert not torch.is_grad_enabled()
    with torch.inference_mode():
        assert torch.equal(gradcam.GradCAMExtractor(model, "layer4")(x), maps)


def test_target_output_modified_in_place_downstream():
    """timm's BasicBlock does ``x = bn2(x); x += shortcut``: A must be bn2's own output."""
    ensure_torchvision()
    from pytorch_grad_cam import GradCAM as RefGradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = smoke_resnet(1)
    x = torch.rand(3, 1, 32, 32)
    kept = []
    handle = model.layer4[1].bn2.register_forward_hook(lambda m, i, o: kept.append(o.detach().clone()))
    ref_cam = RefGradCAM(model, [model.layer4[1].bn2])
    ref_cam(x, targets=[ClassifierOutputTarget(1)] * 3)
    ref_grads = ref_cam.activations_and_grads.gradients[0]  # tensor hooks: correct gradients
    ref_cam.activations_and_grads.release()
    handle.remove()

    for layers in (["layer4.1.bn2"], ["layer3", "layer4.1.bn2"]):  # first / later target layer
        _, acts, grads = gradcam.GradCAMExtractor(model, layers).capture(x)
        assert torch.allclose(acts[-1], kept[0], rtol=0, atol=1e-6)
        assert torch.allclose(grads[-1], ref_grads, rtol=1e-5, atol=1e-9)


def test_several_layers_give_one_map_each():
    model = smoke_resnet(1)
    ext = gradcam.GradCAMExtractor(model, ["layer2", "layer3", "layer4"])
    x = torch.rand(2, 1, 32, 32)
    per_layer = ext.layer_maps(x)
    singles = [gradcam.GradCAMExtractor(model, name).layer_maps(x)[0] for name in ("layer2", "layer3", "layer4")]
    assert len(per_layer) == 3
    for a, b in zip(per_layer, singles):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-9)
    fused = ext(x)
    assert fused.shape == (2, 32, 32) and float(fused.max()) == 1.0


def test_subclass_overrides_one_function():
    class Activation(CamExtractor):  # e.g. a gradient-free method
        needs_grads = False

        def layer_map(self, acts, grads):
            assert grads is None and self.inputs is not None
            return acts.sum(1)

    model = smoke_resnet(1)
    x = torch.rand(2, 1, 32, 32)
    maps = Activation(model, "layer4")(x)
    assert maps.shape == (2, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(x).sum(1)
    assert torch.allclose(maps, minmax(torch.nn.functional.interpolate(
        feats[:, None], size=(32, 32), mode="bilinear", align_corners=False)[:, 0]), atol=1e-6)


def test_layer_off_the_logits_path_is_reported():
    class SideBranch(nn.Module):
        def __init__(self):
            super().__init__()
            self.side = nn.Conv2d(1, 2, 3)
            self.main = nn.Conv2d(1, 2, 3)
            self.fc = nn.Linear(2, 2)

        def forward(self, x):
            self.side(x)  # runs first, but the logits ignore it
            return self.fc(self.main(x).mean((2, 3)))

    net = SideBranch().eval()
    assert gradcam.GradCAMExtractor(net, "main")(torch.rand(2, 1, 8, 8)).shape == (2, 8, 8)
    with pytest.raises(PluginError, match="does not depend on target layer.*side"):
        gradcam.GradCAMExtractor(net, ["main", "side"])(torch.rand(2, 1, 8, 8))


# --------------------------------------------------------------------------- plugin
def test_plugin_end_to_end_with_a_fake_context(monkeypatch):
    from wsss_bench.nn import cam as cam_base

    model = smoke_resnet(4)
    ctx = SimpleNamespace(device="cpu")
    monkeypatch.setattr(cam_base, "get_classifier", lambda c: model if c is ctx else None)
    cam = gradcam.GradCAM()
    assert cam.name == "gradcam" and cam.mask_rule == "cam" and cam.p == {"layer": "layer4"}
    cam.prepare(ctx)
    images = torch.rand(3, 4, 32, 32)
    batch = SliceBatch(images=images, labels=torch.tensor([1, 0, 1]), index=np.arange(3),
                       case_ids=["a", "b", "c"], z=[0, 1, 2])
    maps = cam.maps(batch)
    assert maps.shape == (3, 32, 32) and maps.device == images.device
    assert torch.equal(maps, gradcam.GradCAMExtractor(model, "layer4")(images))

    bad = gradcam.GradCAM(layer="layer9")
    with pytest.raises(PluginError, match="gradcam.*layer9.*layer1, layer2, layer3, layer4"):
        bad.prepare(ctx)
    with pytest.raises(PluginError, match="parameter layer"):
        gradcam.GradCAM(layer="layer3++layer4")

    # the shared base: classifier from get_classifier(ctx), one extractor, autograd inside maps()
    assert issubclass(gradcam.GradCAM, ClassifierCam) and gradcam.GradCAM.no_grad is False
    two = gradcam.GradCAM(layer="layer3+layer4")
    two.prepare(ctx)
    assert two.extractor.layer_names == ["layer3", "layer4"] and two.model is model

    seen = []
    gradcam.register_cam_sources(seen.append)
    assert seen == [gradcam.GradCAM]


def test_importing_the_plugin_does_not_import_torch():
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('g', {str(ROOT / 'plugins' / 'gradcam.py')!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        f"spec = importlib.util.spec_from_file_location('t', {str(ROOT / 'plugins' / 'threshold.py')!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "import wsss_bench.nn.classifier\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
