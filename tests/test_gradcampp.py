"""GradCAM++ (docs/methods/gradcampp.md): equality with pytorch-grad-cam 1.5.7 and the naive formula."""
from __future__ import annotations

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





import wsss_bench_plugins.gradcampp as gradcampp




# --------------------------------------------------------------------------- oracle
@pytest.mark.parametrize("in_chans", [4, 1])
def test_equals_pytorch_grad_cam(in_chans):
    """Same maps as pytorch-grad-cam 1.5.7's GradCAMPlusPlus with ClassifierOutputTarget(1).

    grad-cam returns scale(resize(scale(ReLU(cam)))) with scale(x) = (x - min)/(max + 1e-7)
    and cv2 INTER_LINEAR (torch's bilinear, align_corners=False, for this x8 upscale); we
    return minmax(Up(ReLU(cam))), equal up to grad-cam's epsilons.  The channel weights are
    also compared with grad-cam's own, computed from grad-cam's activations and gradients.
    """
    ensure_torchvision()
    from pytorch_grad_cam import GradCAMPlusPlus
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = smoke_resnet(in_chans)
    x = torch.rand(5, in_chans, 32, 32, generator=torch.Generator().manual_seed(1))
    for layers in (["layer4"], ["layer3"], ["layer3", "layer4"]):
        ref_cam = GradCAMPlusPlus(model, [model.get_submodule(n) for n in layers])
        ref = ref_cam(x, targets=[ClassifierOutputTarget(1)] * len(x))  # (B, 32, 32) numpy
        ref_acts = ref_cam.activations_and_grads.activations[-1].numpy()
        ref_grads = ref_cam.activations_and_grads.gradients[-1].numpy()
        ref_w = ref_cam.get_cam_weights(x, None, None, ref_acts, ref_grads)  # (B, K)
        ref_cam.activations_and_grads.release()

        ext = gradcampp.GradCAMPPExtractor(model, layers)
        ours = ext(x)
        _, acts, grads = ext.capture(x)
        ext.inputs = None

        assert ours.shape == (5, 32, 32) and ours.dtype == torch.float32
        spread = ref.reshape(5, -1).max(1) - ref.reshape(5, -1).min(1)
        assert (spread > 0.5).sum() >= 4, "the example should give non-degenerate maps"
        assert np.abs(ours.numpy() - ref).max() < 1e-5, layers
        w = gradcampp.gradcampp_weights(acts[-1], grads[-1])
        assert np.allclose(w.numpy(), ref_w, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- mechanism
def naive_weights(a: np.ndarray, g: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """docs/methods/gradcampp.md element by element: a_kij, then w_k = sum_ij a_kij ReLU(g_kij)."""
    b, k, h, w = a.shape
    out = np.zeros((b, k))
    for bi in range(b):
        for ki in range(k):
            total = sum(a[bi, ki, i, j] for i in range(h) for j in range(w))
            acc = 0.0
            for i in range(h):
                for j in range(w):
                    gij = g[bi, ki, i, j]
                    if gij == 0:
                        alpha = 0.0
                    else:
                        alpha = gij ** 2 / (2 * gij ** 2 + total * gij ** 3 + eps)
                    acc += alpha * max(gij, 0.0)
            out[bi, ki] = acc
    return out


def test_weights_equal_a_naive_loop_in_float64():
    gen = torch.Generator().manual_seed(3)
    a = torch.rand(2, 5, 3, 4, generator=gen, dtype=torch.float64) * 2
    g = torch.randn(2, 5, 3, 4, generator=gen, dtype=torch.float64) * 0.1
    g[0, 1] = 0  # a = 0 where g = 0, including a whole channel
    g[1, 2, 0, :] = 0
    a[1, 3] = 0  # a dead channel
    w = gradcampp.gradcampp_weights(a, g)
    assert w.dtype == torch.float64
    ref = naive_weights(a.numpy(), g.numpy())
    assert np.abs(w.numpy() - ref).max() < 1e-10
    assert (w[0, 1] == 0).all()
    cam = gradcampp.GradCAMPPExtractor.layer_map(None, a, g)
    naive_cam = np.maximum((ref[:, :, None, None] * a.numpy()).sum(1), 0)
    assert np.abs(cam.numpy() - naive_cam).max() < 1e-10


# --------------------------------------------------------------------------- plugin
def test_plugin_end_to_end_with_a_fake_context(monkeypatch):
    from wsss_bench.nn import cam as cam_base

    model = smoke_resnet(4)
    ctx = SimpleNamespace(device="cpu")
    monkeypatch.setattr(cam_base, "get_classifier", lambda c: model if c is ctx else None)
    cam = gradcampp.GradCAMPP()
    assert cam.name == "gradcampp" and cam.mask_rule == "cam" and cam.p == {"layer": "layer4"}
    cam.prepare(ctx)
    images = torch.rand(3, 4, 32, 32)
    batch = SliceBatch(images=images, labels=torch.tensor([1, 0, 1]), index=np.arange(3),
                       case_ids=["a", "b", "c"], z=[0, 1, 2])
    maps = cam.maps(batch)
    assert maps.shape == (3, 32, 32) and float(maps.min()) >= 0 and float(maps.max()) <= 1
    assert torch.equal(maps, gradcampp.GradCAMPPExtractor(model, "layer4")(images))
    assert all(p.grad is None for p in model.parameters())

    two = gradcampp.GradCAMPP(layer="layer3+layer4")
    assert two.layers == ["layer3", "layer4"]
    two.prepare(ctx)
    assert two.maps(batch).shape == (3, 32, 32)

    with pytest.raises(PluginError, match="gradcampp.*layer9.*layer1, layer2, layer3, layer4"):
        gradcampp.GradCAMPP(layer="layer9").prepare(ctx)
    with pytest.raises(PluginError, match="parameter layer"):
        gradcampp.GradCAMPP(layer="layer3+")

    seen = []
    gradcampp.register_cam_sources(seen.append)
    assert seen == [gradcampp.GradCAMPP]
    assert torch.allclose(minmax(maps), maps)
