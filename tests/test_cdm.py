"""CDM saliency (docs/methods/diffusion.md): Algorithm 1 against an independent float64 reference.

The UNet has every parameter random (tests/diffusion_helpers.py): a fresh MONAI UNet has
zero-initialised output layers, predicts eps = 0 and would let a fake saliency pass.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import diffusion_helpers as H
from wsss_bench.errors import PluginError
from wsss_bench.interfaces import SliceBatch
from wsss_bench.maps import otsu_masks
from wsss_bench.nn import diffusion as dif
from wsss_bench.nn import noisy_classifier as ncl
from wsss_bench_plugins import cdm as cdm_plugin
from wsss_bench_plugins.cdm import CDMSaliency, cdm_difference, class_embedding_swapped, ddim_step

S = 16


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: one intra-op thread (conftest)


@pytest.fixture(scope="module")
def unet():
    net = H.random_cdm(seed=0)
    H.assert_depends_on_t_and_label(net)
    return net


def images(n=2, seed=0):
    return torch.rand(n, 4, S, S, generator=torch.Generator().manual_seed(seed))


def plugin(unet, monkeypatch, classifier=None, **params):
    """The plugin, prepared on a fake context whose CDM (and noisy classifier) are ours."""
    monkeypatch.setattr(dif, "get_cdm", lambda ctx: unet)
    if classifier is not None:
        monkeypatch.setattr(ncl, "get_noisy_classifier", lambda ctx: classifier)
    ctx = H.FakeContext(size=S)
    cam = CDMSaliency(**params)
    cam.ctx = ctx
    cam.prepare(ctx)
    return cam, ctx


def slice_noise(ctx, batch):
    """The documented per-slice noise: randn((C, S, S)) from component noise/cdm/<case>/<z>."""
    return torch.stack([torch.randn((4, S, S), generator=ctx.generator(f"noise/cdm/{c}/{z}"))
                        for c, z in zip(batch.case_ids, batch.z)])


def run_alg(unet, tau, x0, noise, **kw):
    """The code under test on one input, with the harness' match() and reference alpha-bar."""
    table = dict(zip(range(380, 401), dif.match(list(range(380, 401)))))
    return cdm_difference(unet, x0, noise, tau, 400, 10, dif.ref_alpha_bar, table.__getitem__, **kw)


def x0_noise(seed=5, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(2, 4, S, S, generator=g, dtype=torch.float64) * 2 - 1
    return x0.to(dtype), torch.randn(2, 4, S, S, generator=g, dtype=torch.float64).to(dtype)


# ---------------------------------------------------------------- against the reference
def test_algorithm_1_equals_an_independent_float64_reference(unet):
    """acc of the code under test (run in float64) = the reference loop (cloned UNet with the
    perturbed row, guided-diffusion's DDIM step, own schedule and match) to 1e-7."""
    x0, noise = x0_noise(dtype=torch.float64)
    stats = {}
    want = H.reference_cdm_difference(unet, x0, noise, stats=stats)
    assert stats["clipped"] > 100  # the x0 clip is exercised, so dropping it would show
    assert float(want.abs().max()) > 1e-4  # the branches really differ
    got = run_alg(copy.deepcopy(unet).double(), 0.95, x0, noise)
    assert got.dtype == torch.float64
    scale = float(want.abs().max())
    assert float((got - want).abs().max()) < 1e-7 * max(1.0, scale / 1e-3)
    # what fakes would return is far from it: the input intensity, or one step's difference
    assert float(((1 - 0.95) * x0 + 1e-3 * want - want).abs().max()) > 10 * scale


def test_plugin_maps_equal_the_reference_map(unet, monkeypatch):
    """maps = minmax(sum_c |acc_c|) with x0 = 2x - 1 and the per-slice seeded noise."""
    cam, ctx = plugin(unet, monkeypatch)
    batch = H.slice_batch(images())
    got = cam.maps(batch)
    assert got.shape == (2, S, S) and got.dtype == torch.float32
    assert float(got.min()) == 0.0 and float(got.max()) == 1.0
    acc = H.reference_cdm_difference(unet, batch.images.double() * 2 - 1, slice_noise(ctx, batch))
    want = H.reference_cdm_map(acc)
    assert float((got.double() - want).abs().max()) < 5e-3  # float32 branches vs float64
    # the map is not the input intensity
    intensity = H.reference_cdm_map(batch.images.double())
    assert float((want - intensity).abs().max()) > 0.3

    signed, _ = plugin(unet, monkeypatch, reduce="signed")
    s = acc.sum(1)
    flat = s.flatten(1)
    want_signed = (s - flat.min(1).values[:, None, None]) / (flat.max(1).values - flat.min(1).values)[:, None, None]
    got_signed = signed.maps(batch)
    assert float((got_signed.double() - want_signed).abs().max()) < 5e-3
    assert float((got_signed - got).abs().max()) > 0.1  # sum |.| is not the signed sum


def test_guidance_acts_on_the_rederived_eps_as_guided_diffusion(unet):
    """guidance_scale s: eps' (re-derived after the clip) - sqrt(1 - ab) s grad log p(y | x_t),
    x0 re-derived without a second clip (guided-diffusion's condition_score), y = 1 / 0."""
    clf = H.random_noisy_classifier(S, seed=3).double()
    x0, noise = x0_noise(seed=6, dtype=torch.float64)
    want = H.reference_cdm_difference(unet, x0, noise, guidance_scale=10.0, classifier=clf)
    unet64 = copy.deepcopy(unet).double()
    got = run_alg(unet64, 0.95, x0, noise, guidance_scale=10.0, classifier=clf)
    unguided = run_alg(unet64, 0.95, x0, noise)
    scale = float(want.abs().max())
    assert float((got - want).abs().max()) < 1e-7 * max(1.0, scale / 1e-3)
    assert float((want - unguided).abs().max()) > 0.1 * scale  # guidance changes the result


def test_guidance_through_the_plugin(unet, monkeypatch):
    clf = H.random_noisy_classifier(S, seed=3)
    cam, ctx = plugin(unet, monkeypatch, classifier=clf, guidance_scale=10.0)
    assert cam.classifier is clf and cam.no_grad is False
    batch = H.slice_batch(images(seed=1))
    with torch.no_grad():  # the runner may call maps under no_grad; guidance re-enables autograd
        got = cam.maps(batch)
    acc = H.reference_cdm_difference(unet, batch.images.double() * 2 - 1, slice_noise(ctx, batch),
                                     guidance_scale=10.0, classifier=clf)
    assert float((got.double() - H.reference_cdm_map(acc)).abs().max()) < 5e-3


# ---------------------------------------------------------------- mechanism tests
def test_tau_one_gives_exactly_zero_and_an_empty_mask(unet, monkeypatch):
    x0, noise = x0_noise()
    acc = run_alg(unet, 1.0, x0, noise)
    assert torch.count_nonzero(acc) == 0
    cam, _ = plugin(unet, monkeypatch, tau=1.0)
    maps = cam.maps(H.slice_batch(images()))
    assert torch.count_nonzero(maps) == 0 and not otsu_masks(maps).any()


def test_tau_095_gives_a_nonzero_difference(unet):
    assert not torch.equal(unet.class_embedding.weight[0], unet.class_embedding.weight[1])
    x0, noise = x0_noise()
    assert run_alg(unet, 0.95, x0, noise).abs().amax() > 1e-4


def test_same_seed_is_bit_identical_and_noise_is_per_slice(unet, monkeypatch):
    cam, ctx = plugin(unet, monkeypatch)
    batch = H.slice_batch(images())
    a, b = cam.maps(batch), cam.maps(batch)
    assert torch.equal(a, b)
    eps = cam.noise(batch)
    assert torch.equal(eps, slice_noise(ctx, batch))
    single = cam.noise(SliceBatch(images=batch.images[1:], labels=torch.ones(1, dtype=torch.long),
                                  index=np.arange(1), case_ids=["case1"], z=[4]))
    assert torch.equal(eps[1], single[0]) and not torch.equal(eps[0], eps[1])


def test_reduce_channels():
    acc = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(cdm_plugin.reduce_channels(acc, "abs"), acc.abs().sum(1))
    assert torch.equal(cdm_plugin.reduce_channels(acc, "signed"), acc.sum(1))


def test_both_branches_start_from_one_noisy_image_and_get_matched_long_timesteps(unet):
    calls = []
    hook = unet.conv_in.register_forward_hook(lambda m, i, o: calls.append(i[0].clone()))
    seen_t = []
    original_forward = type(unet).forward

    def recording_forward(self, x, timesteps, **kw):
        seen_t.append(timesteps.clone())
        return original_forward(self, x, timesteps, **kw)

    type(unet).forward = recording_forward
    try:
        run_alg(unet, 0.95, *x0_noise())
    finally:
        type(unet).forward = original_forward
        hook.remove()
    assert torch.equal(calls[0], calls[1])  # first call of each branch: the identical x_Q
    assert len(seen_t) == 20
    assert all(t.dtype == torch.long and t.shape == (2,) for t in seen_t)
    expected = [H.ref_match(400 - k) for k in range(1, 11)]  # reference quirk: first step told 399
    assert [int(t[0]) for t in seen_t[::2]] == expected and expected[0] == 99


def test_embedding_swap_is_temporary(unet):
    original = unet.class_embedding
    vec = cdm_plugin.perturbed_embedding(unet, 0.95)
    with pytest.raises(RuntimeError):
        with class_embedding_swapped(unet, vec):
            out = unet.class_embedding(torch.tensor([0, 1, 1]))
            assert torch.equal(out, vec.expand(3, -1))
            raise RuntimeError("boom")
    assert unet.class_embedding is original
    w = original.weight
    assert torch.equal(cdm_plugin.perturbed_embedding(unet, 1.0), w[1])
    torch.testing.assert_close(vec, 0.95 * w[1] + 0.05 * w[0])


def test_ddim_step_moves_exactly_between_noise_levels_with_the_true_noise():
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 4, S, S, generator=g, dtype=torch.float64) * 1.6 - 0.8
    eps = torch.randn(2, 4, S, S, generator=g, dtype=torch.float64)
    a, a_prev = H.ref_ab(399), H.ref_ab(398)
    x = a ** 0.5 * x0 + (1 - a) ** 0.5 * eps
    torch.testing.assert_close(ddim_step(x, eps, a, a_prev), a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * eps)
    # clipping: a prediction outside [-1, 1] is clamped and eps re-derived from the clamped x0
    big = ddim_step(torch.full((1,), 3.0, dtype=torch.float64), torch.zeros(1, dtype=torch.float64), a, 1.0)
    assert float(big) == 1.0
    # guided: x0 from the shifted re-derived eps, not clipped again
    guide = torch.full((1,), 50.0, dtype=torch.float64)
    x = torch.full((1,), 0.9, dtype=torch.float64)
    e2 = (x - a ** 0.5 * 1.0) / (1 - a) ** 0.5 - (1 - a) ** 0.5 * guide  # x0h = clamp(3.0) = 1
    x0g = (x - (1 - a) ** 0.5 * e2) / a ** 0.5
    assert float(x0g) > 1.0  # the guided x0 leaves [-1, 1]: no second clip
    want = a_prev ** 0.5 * x0g + (1 - a_prev) ** 0.5 * e2
    torch.testing.assert_close(ddim_step(x, torch.full((1,), -30.0, dtype=torch.float64), a, a_prev, guide), want)


def test_guidance_pushes_each_branch_towards_its_label(unet):
    class Classifier(torch.nn.Module):  # log p(1) grows with the mean intensity
        def forward(self, x, t):
            m = x.mean(dim=(1, 2, 3))
            return torch.stack([-m, m], dim=1) * 5

    x0, noise = x0_noise()
    base = run_alg(unet, 0.95, x0, noise)
    guided = run_alg(unet, 0.95, x0, noise, guidance_scale=10.0, classifier=Classifier())
    assert float(guided.mean()) > float(base.mean())  # branch 1 brighter, perturbed branch darker


def test_parameters_are_validated():
    with pytest.raises(PluginError, match="tau"):
        CDMSaliency(tau=1.5)
    with pytest.raises(PluginError, match="reduce"):
        CDMSaliency(reduce="max")
    with pytest.raises(PluginError, match="steps"):
        CDMSaliency(steps=500)
    assert CDMSaliency().no_grad is True and CDMSaliency(guidance_scale=1.0).no_grad is False
    assert CDMSaliency.mask_rule == "otsu" and CDMSaliency.version == "2"


def test_prepare_records_the_match_table(unet, monkeypatch):
    cam, ctx = plugin(unet, monkeypatch)
    rows = ctx.records["match/cdm"]["rows"]
    assert [r["t_ref"] for r in rows] == list(range(400, 389, -1))
    assert [r["t"] for r in rows] == [H.ref_match(i) for i in range(400, 389, -1)]
    assert rows[0]["t"] == 99 and ctx.records["match/cdm"]["ref_schedule"] == "cosine"
