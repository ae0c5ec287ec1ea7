"""CDM diffusion features (docs/methods/diffusion.md): gather, mean-then-Up, streaming, block choice.

The UNet has every parameter random (tests/diffusion_helpers.py): in a fresh MONAI UNet the
zero-initialised res blocks make the up-block outputs independent of t and of the label, so
features computed with the wrong t or label would pass.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import diffusion_helpers as H
from wsss_bench.errors import PluginError
from wsss_bench.nn import diffusion as dif
from wsss_bench.nn import diffusion_features as dfeat
from wsss_bench.profiles import load_profile
from wsss_bench_plugins.cdm_features import CDMFeatures

SMOKE = load_profile("smoke")
S = 32


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: one intra-op thread (conftest)


def up(a, size):
    return F.interpolate(a, size=(size, size), mode="bilinear", align_corners=False)


def tiny_unet(seed=0):
    return H.random_cdm(seed=seed)


def backbone(unet, monkeypatch, **params):
    """The backbone, prepared on a fake context whose CDM is ``unet``."""
    monkeypatch.setattr(dif, "get_cdm", lambda ctx: unet)
    ctx = H.FakeContext(size=S)
    bb = CDMFeatures(**params)
    bb.ctx = ctx
    bb.prepare(ctx)
    return bb, ctx


#: docs/methods/diffusion.md: t_ref {1, 10, 50, 100} on the 4000-step scale are harness {0, 2, 12, 24}
HARNESS_T = [0, 2, 12, 24]


def documented_noises(ctx):
    """One fixed eps_t (1, C, S, S) per t from component noise/features/t=<t>."""
    return [torch.randn((1, 4, S, S), generator=ctx.generator(f"noise/features/t={t}")) for t in HARNESS_T]


# ---------------------------------------------------------------- gather
@pytest.mark.parametrize("size", [32, 20])
def test_gather_equals_dense_upsample_then_index(size):
    g = torch.Generator().manual_seed(size)
    shapes = [(5, 4, 4), (3, 7, 7), (6, size // 2, size // 2), (2, size, size), (4, 3, 5)]
    acts = [torch.randn(3, *s, generator=g) for s in shapes]
    n = 500
    coords = torch.stack([torch.randint(0, 3, (n,), generator=g), torch.randint(0, size, (n,), generator=g),
                          torch.randint(0, size, (n,), generator=g)], dim=1)
    corners = torch.tensor([[0, 0, 0], [1, size - 1, size - 1], [2, 0, size - 1], [2, size - 1, 0]])
    coords = torch.cat([coords, corners])  # borders included, batch indices in random order
    dense = torch.cat([up(a, size) for a in acts], dim=1)  # (B, D, S, S), the naive way
    want = dense[coords[:, 0], :, coords[:, 1], coords[:, 2]]  # (N, D)
    got = dfeat.gather_from(acts, coords, size)
    assert got.shape == want.shape == (n + 4, sum(s[0] for s in shapes))
    assert float((got - want).abs().max()) < 1e-5


def test_features_equal_an_independent_float64_reference(monkeypatch):
    """gather and stream = mean_t concat_l Up(up_blocks[l] output) at t = {0, 2, 12, 24}, label 1,
    x_t = q_sample(2x - 1, eps_t, t) with the documented seeded eps_t (reference: MONAI's
    alpha-bar, hooks on the block outputs, dense Up, float64)."""
    unet = tiny_unet(seed=2)
    H.assert_depends_on_t_and_label(unet)
    bb, ctx = backbone(unet, monkeypatch)
    assert bb.ts == HARNESS_T and bb.blocks == [0, 1, 2] and bb.dim == 40 == SMOKE.cldf.feature_dim
    noises = documented_noises(ctx)
    images = torch.rand(2, 4, S, S, generator=torch.Generator().manual_seed(1))
    dense = H.reference_features(unet, images, HARNESS_T, noises, [0, 1, 2], S)  # (2, D, S, S)
    scale = float(dense.abs().max())
    g = torch.Generator().manual_seed(4)
    coords = torch.stack([torch.randint(0, 2, (300,), generator=g), torch.randint(0, S, (300,), generator=g),
                          torch.randint(0, S, (300,), generator=g)], dim=1)
    got = bb.gather(images, coords)
    want = dense[coords[:, 0], :, coords[:, 1], coords[:, 2]]
    assert float((got.double() - want).abs().max()) < 1e-4 * max(1.0, scale)
    streamed = torch.cat([f for _, f in bb.stream(images[1], chunk=300)])  # (S^2, D)
    assert float((streamed.double() - dense[1].reshape(bb.dim, -1).t()).abs().max()) < 1e-4 * max(1.0, scale)

    # what fakes compute is far from it: label 0, t = 0 everywhere, a single t, no mean over t
    for wrong in (H.reference_features(unet, images, HARNESS_T, noises, [0, 1, 2], S, label=0),
                  H.reference_features(unet, images, [0, 0, 0, 0], noises, [0, 1, 2], S),
                  H.reference_features(unet, images, HARNESS_T[-1:], noises[-1:], [0, 1, 2], S),
                  4 * dense):
        assert float((wrong - dense).abs().max()) > 1e-2 * scale


def test_mean_then_upsample_equals_upsample_then_mean():
    unet = tiny_unet()
    images = torch.rand(2, 4, S, S)
    ts = HARNESS_T
    g = torch.Generator().manual_seed(1)
    noises = [torch.randn(1, 4, S, S, generator=g) for _ in ts]
    blocks = [0, 1, 2]
    mean_first = [up(a, S) for a in dfeat.mean_activations(unet, images, ts, noises, blocks)]
    up_first = H.reference_features(unet, images, ts, noises, blocks, S)  # Up each t, then mean
    got = torch.cat(mean_first, 1)
    assert float((got.double() - up_first).abs().max()) < 1e-4 * max(1.0, float(up_first.abs().max()))


# ---------------------------------------------------------------- streaming
def test_streamed_embeddings_equal_a_dense_computation(monkeypatch):
    unet = tiny_unet(seed=2)
    bb, ctx = backbone(unet, monkeypatch)
    torch.manual_seed(0)
    decoder = torch.nn.Sequential(torch.nn.Linear(bb.dim, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16))
    image = torch.rand(4, S, S)
    dense = H.reference_features(unet, image[None], HARNESS_T, documented_noises(ctx), [0, 1, 2], S)[0]
    with torch.no_grad():
        want = decoder(dense.float().reshape(bb.dim, -1).t())  # (S^2, 16)

    rows = []
    real_gather = dfeat.gather_from

    def spy(acts, coords, size):
        out = real_gather(acts, coords, size)
        rows.append(out.shape[0])
        return out

    def no_dense(*args, **kwargs):
        raise AssertionError("the streamed path must not upsample whole feature maps")

    monkeypatch.setattr(dfeat, "gather_from", spy)
    stream = bb.stream(image, chunk=100)  # runs the UNet once (its own upsampling included)
    monkeypatch.setattr(F, "interpolate", no_dense)  # from here on: no dense Up of feature maps
    got = dfeat.stream_embed(stream, S * S, decoder, 16)
    monkeypatch.undo()
    assert float((got - want).abs().max()) < 1e-4 * max(1.0, float(want.abs().max()))
    assert max(rows) <= 100 and sum(rows) == S * S  # every gather has <= chunk rows, pixels once


def test_gather_of_the_backbone_matches_the_stream_and_is_batch_independent(monkeypatch):
    bb, ctx = backbone(tiny_unet(seed=3), monkeypatch)
    images = torch.rand(2, 4, S, S)
    coords = torch.tensor([[1, 5, 7], [0, 31, 0], [1, 0, 31], [0, 12, 12]])
    feats = bb.gather(images, coords)
    assert feats.shape == (4, bb.dim)
    streamed = torch.cat([f for _, f in bb.stream(images[1], chunk=257)])  # (S^2, D)
    for row, (b, i, j) in zip(feats, coords.tolist()):
        if b == 1:
            torch.testing.assert_close(row, streamed[i * S + j], rtol=1e-5, atol=1e-5)
    assert ctx.records["match/features"]["rows"][1] == {"t_ref": 10, "t": 2, "alpha_bar": pytest.approx(
        float(H.harness_ab()[2])), "alpha_bar_ref": pytest.approx(H.ref_ab(10), rel=1e-12)}
    assert all(torch.equal(a, b) for a, b in zip(bb.noises, documented_noises(ctx)))  # one seeded eps per t
    assert ctx.records["features/cdm"] == {"blocks": [0, 1, 2], "dim": 40, "label": 1}


def test_forward_stops_after_the_deepest_needed_block_and_leaves_no_hooks():
    unet = tiny_unet()
    ran = []
    probe = [unet.up_blocks[2].register_forward_hook(lambda *a: ran.append("up2")),
             unet.out.register_forward_hook(lambda *a: ran.append("out"))]
    x, t = torch.randn(1, 4, S, S), dif.timesteps(0, 1)
    with torch.no_grad():
        acts = dfeat.block_activations(unet, x, t, torch.ones(1, dtype=torch.long), [0, 1])
    assert ran == [] and [a.shape[1:] for a in acts] == [(16, 16, 16), (16, 32, 32)]
    for h in probe:
        h.remove()
    assert all(not blk._forward_hooks for blk in unet.up_blocks)


# ---------------------------------------------------------------- blocks and D
def test_blocks_and_feature_dim_follow_the_profiles(monkeypatch):
    for name, want in (("paper", [1, 2, 3]), ("cpu", [0, 1, 2]), ("smoke", [0, 1, 2])):
        prof = load_profile(name)
        blocks = dfeat.select_blocks(prof.cldf.feature_blocks, prof.cdm_unet, prof.image_size)
        assert blocks == want
        assert dfeat.feature_dim(prof.cdm_unet, blocks) == prof.cldf.feature_dim  # 1024, 112, 40
        # the the spec rule gives the same choice ("auto"): paper 32..128 px; cpu falls back to all
        assert dfeat.select_blocks("auto", prof.cdm_unet, prof.image_size) == want
    assert dfeat.up_block_resolutions(6, 256) == [16, 32, 64, 128, 256, 256]
    assert dfeat.select_blocks("up 0,2", SMOKE.cdm_unet, 32) == [0, 2]
    with pytest.raises(ValueError):
        dfeat.select_blocks("up 1-7", SMOKE.cdm_unet, 32)
    with pytest.raises(PluginError, match="blocks"):
        backbone(tiny_unet(), monkeypatch, blocks="everything")
    with pytest.raises(PluginError, match="t_scale"):
        CDMFeatures(t_scale="log")
