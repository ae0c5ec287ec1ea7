"""Table 2 feature backbones (docs/methods/backbones.md): dimensions, gather = dense Up + index,
streaming, the networks each row uses, and no dense (B, D, S, S) tensor."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from wsss_bench.nn import diffusion as dif
from wsss_bench.nn.classifier import get_classifier
from wsss_bench.profiles import load_profile

S = 32
ROWS = ["resnet18", "resnet50", "unet-encoder", "cdm"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: one intra-op thread (conftest)


@pytest.fixture(scope="module")
def ctx(cache_root):
    from wsss_bench.plugins import load_plugins
    from wsss_bench.running.runner import RunConfig, Session

    session = Session(RunConfig(profile="smoke", device="cpu", cache_dir=Path(cache_root)), host=load_plugins())
    return session.context("brats", 0)


@pytest.fixture(scope="module")
def images(ctx):
    idx = ctx.data.split("test")[:3]
    return next(iter(ctx.data.batches(idx, 3))).images  # (3, 4, S, S)


def up(a):
    return F.interpolate(a, size=(S, S), mode="bilinear", align_corners=False)


class DenseSpy(TorchDispatchMode):
    """Fails on any op output that is a dense feature map (n, >= D, S, S) or (> rows, D) matrix."""

    def __init__(self, dim, max_rows):
        super().__init__()
        self.dim, self.max_rows, self.bad, self.seen = dim, max_rows, [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.seen += 1
                shape = tuple(t.shape)
                if len(shape) == 4 and shape[-2:] == (S, S) and shape[1] >= self.dim:
                    self.bad.append((str(func), shape))
                if len(shape) == 2 and shape[1] == self.dim and shape[0] > self.max_rows:
                    self.bad.append((str(func), shape))
        return out


# ---------------------------------------------------------------------------- dimensions
def test_feature_dimension_of_every_row_matches_the_table_formula(ctx):
    smoke = load_profile("smoke")
    expansion = {"resnet18": 1, "resnet50": 4}  # basic block vs bottleneck
    nets = {"resnet18": smoke.cam_classifier, "resnet50": smoke.table2_resnet}
    want = {
        "resnet18": sum(nets["resnet18"].channels) * expansion["resnet18"],  # 8+16+32+64 = 120
        "resnet50": sum(nets["resnet50"].channels) * expansion["resnet50"],  # 4 * 120 = 480
        "unet-encoder": sum(smoke.cdm_unet.channels),  # every down block: 8+16+16 = 40
        "cdm": int(smoke.cldf.feature_dim),  # profile table: all 3 up blocks -> 40
    }
    assert want == {"resnet18": 120, "resnet50": 480, "unet-encoder": 40, "cdm": 40}
    for name in ROWS:
        bb = ctx.plugin("backbones", name)
        assert bb.dim == want[name], name
        feats = bb.gather(torch.rand(1, 4, S, S), torch.tensor([[0, 3, 4]]))
        assert feats.shape == (1, want[name])


def test_paper_widths_give_the_paper_dimensions():
    from wsss_bench.nn.classifier import build_classifier
    from wsss_bench.nn.noisy_classifier import feature_dim
    from wsss_bench_plugins.resnet_features import STAGES, network_for, stage_widths

    paper = load_profile("paper")
    assert network_for(paper, "resnet50") == "cam_classifier" and network_for(paper, "resnet18") == "table2_resnet"
    smoke = load_profile("smoke")
    assert network_for(smoke, "resnet18") == "cam_classifier" and network_for(smoke, "resnet50") == "table2_resnet"
    assert sum(stage_widths(build_classifier(paper.table2_resnet, 4), STAGES)) == 960
    assert sum(stage_widths(build_classifier(paper.cam_classifier, 4), STAGES)) == 3840
    assert feature_dim(paper.cdm_unet) == 1792


def test_resnet_rows_use_classifiers_trained_with_image_labels_only(ctx):
    r18, r50 = ctx.plugin("backbones", "resnet18"), ctx.plugin("backbones", "resnet50")
    assert r18.model is get_classifier(ctx)  # smoke: the CAM classifier serves as ResNet18
    assert type(r50.model).__name__ == "ResNet" and r50.model.layer1[0].conv3 is not None  # bottlenecks
    assert r50.model is not r18.model
    assert ctx.records["features/resnet50"]["network"] == "table2_resnet"
    assert ctx.shared_model_key("table2-resnet")


# ---------------------------------------------------------------------------- gather / stream
def resnet_dense(model, x):
    """Independent dense reference: walk the timm ResNet by hand, Up each stage, concatenate."""
    with torch.no_grad():
        h = model.maxpool(model.act1(model.bn1(model.conv1(x))))
        outs = []
        for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
            h = layer(h)
            outs.append(up(h))
    return torch.cat(outs, 1)  # (B, D, S, S)


def encoder_dense(bb, x):
    """Independent dense reference: Up every block at every t, concatenate, then the mean over t."""
    per_t = []
    with torch.no_grad():
        for t, eps in zip(bb.ts, bb.noises):
            tt = dif.timesteps(t, x.shape[0])
            xt = dif.add_noise(x * 2 - 1, eps.expand_as(x), tt)
            per_t.append(torch.cat([up(f) for f in bb.model.features(xt, tt)], 1))
    return torch.stack(per_t).mean(0)


def random_coords(n, b, seed):
    g = torch.Generator().manual_seed(seed)
    coords = torch.stack([torch.randint(0, b, (n,), generator=g), torch.randint(0, S, (n,), generator=g),
                          torch.randint(0, S, (n,), generator=g)], 1)
    return torch.cat([coords, torch.tensor([[0, 0, 0], [b - 1, S - 1, S - 1], [0, S - 1, 0]])])


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "unet-encoder"])
def test_gather_equals_dense_upsample_then_index(ctx, images, name):
    bb = ctx.plugin("backbones", name)
    dense = encoder_dense(bb, images) if name == "unet-encoder" else resnet_dense(bb.model, images)
    assert dense.shape == (3, bb.dim, S, S)
    coords = random_coords(300, 3, 1)
    want = dense[coords[:, 0], :, coords[:, 1], coords[:, 2]]
    got = bb.gather(images, coords)
    assert float((got - want).abs().max()) < 1e-5
    streamed = torch.cat([f for _, f in bb.stream(images[2], 100)])  # (S^2, D)
    assert float((streamed - dense[2].reshape(bb.dim, -1).t()).abs().max()) < 1e-5


def test_unet_encoder_shares_the_cdm_rows_timesteps_and_noise(ctx):
    enc, cdm = ctx.plugin("backbones", "unet-encoder"), ctx.plugin("backbones", "cdm")
    assert enc.ts == cdm.ts == [0, 2, 12, 24]
    for a, b in zip(enc.noises, cdm.noises):
        assert torch.equal(a, b)
    assert enc.model is not None and not any(p.requires_grad for p in enc.model.parameters())


@pytest.mark.parametrize("name", ROWS)
def test_no_dense_feature_tensor_in_gather_or_stream(ctx, images, name):
    bb = ctx.plugin("backbones", name)
    chunk = 97
    coords = random_coords(150, 3, 2)
    with DenseSpy(bb.dim, max_rows=max(chunk, len(coords))) as spy:
        bb.gather(images, coords)
        spans = [(sl.start, sl.stop, f.shape[0]) for sl, f in bb.stream(images[0], chunk)]
    assert spy.seen > 50 and spy.bad == [], spy.bad[:3]
    assert spans[0][0] == 0 and spans[-1][1] == S * S and max(n for *_, n in spans) <= chunk
    with DenseSpy(bb.dim, max_rows=10**9) as spy:  # the spy itself sees a dense map when one is made
        dense = torch.cat([up(a) for a in bb.activations(images)], 1)
    assert dense.shape[1] == bb.dim and spy.bad


def test_bad_parameters_are_named():
    from wsss_bench.errors import PluginError
    from wsss_bench_plugins.resnet_features import ResNet18Features
    from wsss_bench_plugins.unet_encoder import UNetEncoderFeatures

    with pytest.raises(PluginError, match="stages"):
        ResNet18Features(stages=["layer5"])
    with pytest.raises(PluginError, match="t_scale"):
        UNetEncoderFeatures(t_scale="weird")


# ---------------------------------------------------------------------------- the template
def test_template_gives_dim_gather_and_stream_from_activations_alone():
    from wsss_bench.nn.backbone import ActivationBackbone
    from wsss_bench_plugins.cdm_features import CDMFeatures
    from wsss_bench_plugins.resnet_features import ResNetFeatures
    from wsss_bench_plugins.unet_encoder import UNetEncoderFeatures

    g = torch.Generator().manual_seed(5)
    maps = [torch.randn(3, 4, 4, 4, generator=g), torch.randn(3, 2, 8, 8, generator=g)]

    class Fixed(ActivationBackbone):
        name = "fixed"

        def prepare(self, ctx):
            self.set_geometry(8, 6)

        def activations(self, images):
            return [m[: images.shape[0]] for m in maps]

    bb = Fixed()
    with pytest.raises(RuntimeError, match="prepare"):
        bb.dim
    bb.prepare(None)
    dense = torch.cat([F.interpolate(m, size=(8, 8), mode="bilinear", align_corners=False) for m in maps], 1)
    coords = torch.tensor([[0, 0, 0], [2, 7, 3], [1, 4, 4], [2, 0, 7]])
    want = dense[coords[:, 0], :, coords[:, 1], coords[:, 2]]  # the naive dense map, indexed
    assert bb.dim == 6
    torch.testing.assert_close(bb.gather(torch.zeros(3, 1, 8, 8), coords), want)
    parts = list(bb.stream(torch.zeros(1, 8, 8), 20))
    assert [p[1].shape[0] for p in parts] == [20, 20, 20, 4]
    torch.testing.assert_close(torch.cat([p[1] for p in parts]), dense[0].reshape(6, -1).t())
    for cls in (CDMFeatures, UNetEncoderFeatures, ResNetFeatures):  # the built-ins keep only what differs
        assert issubclass(cls, ActivationBackbone)
        assert not {"gather", "stream", "dim"} & set(vars(cls)), cls
