"""ScoreCAM (docs/methods/scorecam.md): the three variants, the shortcuts, and pytorch-grad-cam 1.5.7."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cam_helpers import smoke_resnet
from wsss_bench._compat import ensure_torchvision, import_timm
from wsss_bench.errors import PluginError
from wsss_bench.interfaces import SliceBatch
from wsss_bench.maps import minmax





import wsss_bench_plugins.scorecam as scorecam




# --------------------------------------------------------------------------- oracle
@pytest.mark.parametrize("in_chans", [4, 1])
def test_library_variant_equals_pytorch_grad_cam(in_chans):
    """``variant=library`` gives pytorch-grad-cam 1.5.7's ScoreCAM maps (ClassifierOutputTarget(1)).

    Same normalisation on both sides up to grad-cam's epsilons (see test_gradcam.py).  The
    random ResNet has dead layer4 channels, so the all-zero-channel shortcut is exercised,
    and the chunk (37) splits images across forward passes.
    """
    ensure_torchvision()
    from pytorch_grad_cam import ScoreCAM as RefScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = smoke_resnet(in_chans)
    x = torch.rand(4, in_chans, 32, 32, generator=torch.Generator().manual_seed(1))
    for layers in (["layer4"], ["layer3"]):
        ref_cam = RefScoreCAM(model, [model.get_submodule(n) for n in layers])
        ref_cam.batch_size = 64
        ref = ref_cam(x, targets=[ClassifierOutputTarget(1)] * len(x))
        ref_cam.activations_and_grads.release()

        ext = scorecam.ScoreCAMExtractor(model, layers, variant="library", chunk=37)
        ours = ext(x)
        (stats,) = ext.last_stats
        assert stats["skipped"] > 0 and stats["forwards"] == stats["channels"] - stats["skipped"]
        spread = ref.reshape(4, -1).max(1) - ref.reshape(4, -1).min(1)
        assert (spread > 0.5).sum() >= 3, "the example should give non-degenerate maps"
        assert np.abs(ours.numpy() - ref).max() < 1e-5, layers


# --------------------------------------------------------------------------- mechanism
class TinyNet(nn.Module):
    """conv (the target layer) -> ReLU -> GAP -> linear; channel 0 of the target is constant."""

    def __init__(self, const: float = 0.0) -> None:
        super().__init__()
        self.features = nn.Conv2d(2, 5, 3, stride=2, padding=1)
        self.fc = nn.Linear(5, 2)
        with torch.no_grad():
            self.features.weight[0] = 0  # channel 0 = its bias everywhere: a constant map
            self.features.bias[0] = const

    def forward(self, x):
        return self.fc(torch.relu(self.features(x)).mean((2, 3)))


def naive_scores(net, x, acts, baseline: bool):
    """float64 loop, one forward per (image, channel): softmax(f(x * minmax(Up(A_k))))[1]
    minus softmax(f(0))[1] when ``baseline``; 0 for a constant channel."""
    b_n, k_n = acts.shape[:2]
    out = torch.zeros(b_n, k_n, dtype=torch.float64)
    ups = F.interpolate(acts, size=x.shape[-2:], mode="bilinear", align_corners=False)
    with torch.no_grad():
        p_base = torch.softmax(net(torch.zeros_like(x[:1])), dim=1)[0, 1] if baseline else 0.0
        for b in range(b_n):
            for k in range(k_n):
                if float(acts[b, k].max() - acts[b, k].min()) < 1e-8:
                    continue  # constant channel: weight 0
                u = ups[b, k]
                h = (u - u.min()) / (u.max() - u.min())
                out[b, k] = torch.softmax(net(x[b:b + 1] * h), dim=1)[0, 1] - p_base
    return out, ups


def test_official_weights_are_class_probabilities_of_masked_inputs():
    """official: s_k = softmax(f(x * minmax(Up(A_k))))[1], one naive forward per (image, channel)."""
    torch.manual_seed(0)
    net = TinyNet(const=0.7).double().eval()
    x = torch.rand(3, 2, 12, 12, dtype=torch.float64)
    ext = scorecam.ScoreCAMExtractor(net, "features", variant="official", chunk=4)
    with torch.no_grad():
        acts = net.features(x)  # (3, 5, 6, 6)
    weights = ext.official_weights(x, acts)
    naive, ups = naive_scores(net, x, acts, baseline=False)
    assert weights.dtype == torch.float64
    assert torch.allclose(weights, naive, rtol=0, atol=1e-12)
    assert (weights[:, 0] == 0).all() and (weights[:, 1:] > 0).all()
    assert ext.last_stats == [{"channels": 15, "forwards": 12, "skipped": 3}]

    cam = ext(x)  # minmax(ReLU(sum_k s_k U_k)) at input resolution
    expected = minmax(torch.relu((naive[:, :, None, None] * ups).sum(1)))
    assert torch.allclose(cam, expected, rtol=0, atol=1e-12)


class CellsAndConstant(nn.Module):
    """CellChannels plus one constant channel: (B, 17, 4, 4)."""

    def forward(self, x):
        cells = CellChannels()(x)
        return torch.cat([cells, torch.ones_like(cells[:, :1])], 1)


class InsideMinusOutside(nn.Module):
    """Target ``target``: one channel per 4x4 cell and a constant one; the class-1 logit is
    20 (mean inside a disc - mean outside) + 0.5, so f(0) gives p = sigmoid(0.5): masks inside
    the disc raise the confidence over the zero baseline, masks outside lower it."""

    def __init__(self, size: int = 16) -> None:
        super().__init__()
        self.target = CellsAndConstant()
        yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        self.register_buffer("disc", (((yy - 5.0) ** 2 + (xx - 9.0) ** 2) < 4.5 ** 2).double())

    def forward(self, x):
        self.target(x)  # runs, but the logit reads the image directly (ScoreCAM allows it)
        inside = (x * self.disc).sum((1, 2, 3)) / self.disc.sum()
        outside = (x * (1 - self.disc)).sum((1, 2, 3)) / (1 - self.disc).sum()
        s = 20 * (inside - outside) + 0.5
        return torch.stack([torch.zeros_like(s), s], 1)


def test_paper_weights_are_increases_over_the_zero_baseline():
    """paper: s_k = softmax(f(x * H_k))[1] - softmax(f(X_b))[1], X_b = 0, against a float64 loop."""
    net = InsideMinusOutside().double().eval()
    x = torch.rand(3, 1, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 0.2
    ext = scorecam.ScoreCAMExtractor(net, "target", variant="paper", chunk=5)
    with torch.no_grad():
        acts = net.target(x)  # (3, 17, 4, 4)
    weights = ext.paper_weights(x, acts)
    naive, ups = naive_scores(net, x, acts, baseline=True)
    assert weights.dtype == torch.float64
    assert torch.allclose(weights, naive, rtol=0, atol=1e-12)
    assert (weights[:, 16] == 0).all()  # the constant channel has no mask and no increase
    assert (weights < -0.01).any() and (weights > 0.01).any()  # increases of both signs
    official, _ = naive_scores(net, x, acts, baseline=False)
    p_base = torch.sigmoid(torch.tensor(0.5, dtype=torch.float64))  # softmax([0, 0.5])[1] = f(0)
    assert torch.allclose(official[:, :16] - weights[:, :16], p_base.expand(3, 16), rtol=0, atol=1e-12)

    cam = ext(x)  # minmax(ReLU(sum_k s_k U_k)) at input resolution
    expected = minmax(torch.relu((naive[:, :, None, None] * ups).sum(1)))
    assert torch.allclose(cam, expected, rtol=0, atol=1e-12)
    official_cam = scorecam.ScoreCAMExtractor(net, "target", variant="official", chunk=5)(x)
    assert float((cam - official_cam).abs().max()) > 0.05  # the baseline term changes the map
    disc = net.disc.bool()
    assert float(cam[:, disc].mean()) > float(cam[:, ~disc].mean()) + 0.3


def test_paper_map_is_finite_and_empty_when_no_channel_raises_the_confidence():
    """Every masked input scores below the baseline: all s_k <= 0, the map is all zero, not NaN."""

    class DarkIsPositive(nn.Module):
        """logit_1 = -10 * mean intensity: the zero image is the most positive input.  The
        target layer ends in a ReLU (A >= 0, as layer4 of a ResNet)."""

        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU())

        def forward(self, x):
            self.features(x)
            m = x.mean((1, 2, 3))
            return torch.stack([torch.zeros_like(m), -10 * m], 1)

    torch.manual_seed(3)
    net = DarkIsPositive().eval()
    x = torch.rand(2, 2, 8, 8) + 0.1
    ext = scorecam.ScoreCAMExtractor(net, "features", variant="paper", chunk=3)
    with torch.no_grad():
        acts = net.features(x)
    assert (ext.paper_weights(x, acts) <= 0).all()
    cam = ext(x)
    assert torch.isfinite(cam).all() and torch.count_nonzero(cam) == 0
    assert float(scorecam.ScoreCAMExtractor(net, "features", variant="official", chunk=3)(x).max()) == 1.0


@pytest.mark.parametrize("const", [0.0, 0.7, 1e3])
@pytest.mark.parametrize("variant", ["paper", "official", "library"])
def test_constant_channel_gives_finite_maps(variant, const):
    """docs/methods/scorecam.md (a) and (b): no NaN with a constant channel; library weights sum to 1."""
    torch.manual_seed(1)
    net = TinyNet(const=const).eval()
    x = torch.rand(2, 2, 16, 16)
    ext = scorecam.ScoreCAMExtractor(net, "features", variant=variant, chunk=3)
    cam = ext(x)
    assert torch.isfinite(cam).all() and cam.shape == (2, 16, 16)
    # paper: where no channel beats the baseline, the map is all zero (that is the method)
    assert float(cam.max()) == 1.0 or (variant == "paper" and float(cam.max()) == 0.0)
    with torch.no_grad():
        acts = net.features(x)
    if variant == "library":
        w = ext.library_weights(x, acts)
        assert torch.isfinite(w).all()
        assert torch.allclose(w.sum(1), torch.ones(2), atol=1e-6)
    elif variant == "official":
        assert (ext.official_weights(x, acts)[:, 0] == 0).all()
    else:
        assert (ext.paper_weights(x, acts)[:, 0] == 0).all()


def test_all_zero_channel_scores_the_zero_image_once():
    """library: an all-zero channel has H = 0, so its score is f(0)[1] for every image."""
    torch.manual_seed(2)
    net = TinyNet(const=0.0).eval()  # channel 0 of the target is all zeros
    x = torch.rand(3, 2, 16, 16)
    ext = scorecam.ScoreCAMExtractor(net, "features", variant="library", chunk=5)
    with torch.no_grad():
        acts = net.features(x)
        ref_logits = torch.stack([
            net(x[b:b + 1] * ((u - u.min()) / (u.max() - u.min() + 1e-8)))[0, 1]
            for b in range(3) for u in F.interpolate(acts[b:b + 1], size=(16, 16), mode="bilinear",
                                                     align_corners=True)[0]
        ]).view(3, 5)
    w = ext.library_weights(x, acts)
    assert ext.last_stats[-1] == {"channels": 15, "forwards": 12, "skipped": 3}
    assert torch.allclose(w, torch.softmax(ref_logits, 1), rtol=1e-5, atol=1e-7)


class CellChannels(nn.Module):
    """One channel per cell of a 4x4 grid: the image's mean in that cell, zero elsewhere."""

    def forward(self, x):
        pooled = F.adaptive_avg_pool2d(x.mean(1, keepdim=True), 4)  # (B, 1, 4, 4)
        onehot = torch.eye(16, dtype=x.dtype, device=x.device).view(1, 16, 4, 4)
        return pooled * onehot  # (B, 16, 4, 4)


class DiscNet(nn.Module):
    """The class-1 logit is ``scale`` times the mean input intensity inside a disc.

    The target layer ``grid`` runs in the forward pass but the logit ignores it, as
    ScoreCAM allows: masking the image by a cell inside the disc scores high.
    """

    def __init__(self, size: int = 32, scale: float = 20.0) -> None:
        super().__init__()
        self.grid = CellChannels()
        yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        self.register_buffer("disc", (((yy - 20.0) ** 2 + (xx - 11.0) ** 2) < 7.0 ** 2).float())
        self.scale = scale

    def forward(self, x):
        self.grid(x)
        inside = (x * self.disc).sum((1, 2, 3)) / self.disc.sum()
        return torch.stack([torch.zeros_like(inside), self.scale * inside], 1)


@pytest.mark.parametrize("variant", ["paper", "official", "library"])
def test_cam_peaks_in_the_disc(variant):
    """docs/methods/scorecam.md (c): if the logit is the mean intensity inside a disc, the CAM peaks there."""
    net = DiscNet().eval()
    x = torch.full((2, 1, 32, 32), 0.5)
    x[1] += 0.1 * torch.rand(1, 32, 32, generator=torch.Generator().manual_seed(0))
    cam = scorecam.ScoreCAMExtractor(net, "grid", variant=variant, chunk=7)(x)
    disc = net.disc.bool()
    for b in range(2):
        peak = int(cam[b].argmax())
        assert disc.view(-1)[peak], variant
        assert float(cam[b][disc].mean()) > float(cam[b][~disc].mean()) + 0.2


# --------------------------------------------------------------------------- batching
def test_batched_chunks_equal_one_image_at_a_time():
    """Chunking across images and channels, and the memory layout, do not change the maps."""
    model = smoke_resnet(1, seed=3)
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(5))
    for variant in ("paper", "official", "library"):
        together = scorecam.ScoreCAMExtractor(model, "layer4", variant=variant, chunk=50)(x)
        alone = torch.cat([scorecam.ScoreCAMExtractor(model, "layer4", variant=variant, chunk=64)(x[i:i + 1])
                           for i in range(2)])
        assert torch.allclose(together, alone, rtol=0, atol=1e-5), variant
        plain = scorecam.ScoreCAMExtractor(model, "layer4", variant=variant, chunk=50)
        plain.channels_last = False  # the CPU default lays masked inputs out channels-last
        assert torch.allclose(plain(x), together, rtol=0, atol=1e-5), variant


def test_works_under_inference_mode_and_leaves_model_clean():
    model = smoke_resnet(4)
    x = torch.rand(2, 4, 32, 32)
    ext = scorecam.ScoreCAMExtractor(model, "layer4", chunk=64)
    maps = ext(x)
    with torch.inference_mode():
        again = ext(x)
    assert torch.equal(maps, again)
    assert not maps.is_inference()
    assert all(not m._forward_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


# --------------------------------------------------------------------------- plugin
def test_plugin_chunk_from_profile_and_errors(monkeypatch):
    from wsss_bench.nn import cam as cam_base

    model = smoke_resnet(4)
    profile = SimpleNamespace(scorecam=SimpleNamespace(chunk=128))
    ctx = SimpleNamespace(device="cpu", profile=profile)
    monkeypatch.setattr(cam_base, "get_classifier", lambda c: model if c is ctx else None)
    cam = scorecam.ScoreCAM()
    assert cam.p == {"layer": "layer4", "variant": "paper", "chunk": 0} and cam.mask_rule == "cam"
    assert scorecam.ScoreCAM.version == "2" and scorecam.ScoreCAM.no_grad is True
    cam.prepare(ctx)
    assert cam.extractor.chunk == 128 and cam.extractor.variant == "paper"
    images = torch.rand(3, 4, 32, 32)
    batch = SliceBatch(images=images, labels=torch.tensor([1, 0, 1]), index=np.arange(3),
                       case_ids=["a", "b", "c"], z=[0, 1, 2])
    maps = cam.maps(batch)
    assert maps.shape == (3, 32, 32) and torch.isfinite(maps).all()

    lib = scorecam.ScoreCAM(variant="library", chunk=16)
    lib.prepare(ctx)
    assert lib.extractor.chunk == 16 and lib.extractor.variant == "library"
    official = scorecam.ScoreCAM(variant="official")
    official.prepare(ctx)
    assert official.extractor.variant == "official" and official.chunk == 128

    with pytest.raises(PluginError, match="variant"):
        scorecam.ScoreCAM(variant="fast")
    with pytest.raises(PluginError, match="chunk"):
        scorecam.ScoreCAM(chunk=-1)
    with pytest.raises(PluginError, match="scorecam.*layer5.*layer1, layer2, layer3, layer4"):
        scorecam.ScoreCAM(layer="layer5").prepare(ctx)
    assert scorecam.profile_chunk(SimpleNamespace(profile=SimpleNamespace())) == 64

    seen = []
    scorecam.register_cam_sources(seen.append)
    assert seen == [scorecam.ScoreCAM]
