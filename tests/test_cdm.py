"""CDM saliency (METHODS section 8): Algorithm 1 mechanism tests on a tiny random UNet."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from wsss_bench.cache import ArtifactCache
from wsss_bench.context import RunContext
from wsss_bench.errors import PluginError
from wsss_bench.interfaces import SliceBatch, TaskDef
from wsss_bench.maps import otsu_masks
from wsss_bench.nn import diffusion as dif
from wsss_bench.profiles import load_profile
from wsss_bench_plugins import cdm as cdm_plugin
from wsss_bench_plugins.cdm import CDMSaliency, cdm_difference, class_embedding_swapped, ddim_step

S = 16


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_unet(seed=0):
    """Smoke-width CDM whose zero-initialised convs (MONAI's zero_module: every res block's
    conv2 and the output conv) get random weights, so eps depends on the class embedding."""
    unet = dif.build_cdm(load_profile("smoke").cdm_unet, 4, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in unet.parameters():
            if p.dim() > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return unet.eval().requires_grad_(False)


def batch(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 4, S, S, generator=g)
    return SliceBatch(images=images, labels=torch.ones(n, dtype=torch.long), index=np.arange(n),
                      case_ids=[f"case{i}" for i in range(n)], z=[3 + i for i in range(n)])


class FakeData:
    image_size, fingerprint, is_phantom = S, "fake", True


def plugin(unet, **params):
    ctx = RunContext(TaskDef("brats", "brats", None, 4, True, "amecam"), FakeData(), load_profile("smoke"), 0,
                     "cpu", ArtifactCache("/nonexistent", enabled=False))
    ctx._memo.update(cdm=unet, cdm_key="tiny")
    cam = CDMSaliency(**params)
    cam.ctx = ctx
    cam.prepare(ctx)
    return cam, ctx


def run_alg(unet, tau, x0=None, noise=None, **kw):
    g = torch.Generator().manual_seed(5)
    x0 = torch.rand(2, 4, S, S, generator=g) * 2 - 1 if x0 is None else x0
    noise = torch.randn(2, 4, S, S, generator=g) if noise is None else noise
    table = dict(zip(range(380, 401), dif.match(list(range(380, 401)))))
    return cdm_difference(unet, x0, noise, tau, 400, 10, dif.ref_alpha_bar, table.__getitem__, **kw)


# ---------------------------------------------------------------- mechanism tests
def test_tau_one_gives_exactly_zero_and_an_empty_mask():
    unet = tiny_unet()
    acc = run_alg(unet, 1.0)
    assert torch.count_nonzero(acc) == 0
    cam, _ = plugin(unet, tau=1.0)
    maps = cam.maps(batch())
    assert torch.count_nonzero(maps) == 0 and not otsu_masks(maps).any()


def test_tau_095_gives_a_nonzero_difference():
    unet = tiny_unet()
    assert not torch.equal(unet.class_embedding.weight[0], unet.class_embedding.weight[1])
    acc = run_alg(unet, 0.95)
    assert acc.abs().amax() > 1e-4
    cam, _ = plugin(unet)
    maps = cam.maps(batch())
    assert maps.shape == (2, S, S) and maps.dtype == torch.float32
    assert float(maps.min()) == 0.0 and float(maps.max()) == 1.0


def test_same_seed_is_bit_identical_and_noise_is_per_slice():
    unet = tiny_unet()
    cam, _ = plugin(unet)
    a, b = cam.maps(batch()), cam.maps(batch())
    assert torch.equal(a, b)
    eps = cam.noise(batch())
    single = cam.noise(SliceBatch(images=batch().images[1:], labels=torch.ones(1, dtype=torch.long),
                                  index=np.arange(1), case_ids=["case1"], z=[4]))
    assert torch.equal(eps[1], single[0]) and not torch.equal(eps[0], eps[1])


def test_reduce_abs_differs_from_the_signed_reference():
    unet = tiny_unet()
    acc = run_alg(unet, 0.95)
    assert torch.equal(cdm_plugin.reduce_channels(acc, "abs"), acc.abs().sum(1))
    assert torch.equal(cdm_plugin.reduce_channels(acc, "signed"), acc.sum(1))
    signed, _ = plugin(unet, reduce="signed")
    absolute, _ = plugin(unet)
    assert not torch.equal(signed.maps(batch()), absolute.maps(batch()))


def test_both_branches_start_from_one_noisy_image_and_get_matched_long_timesteps():
    unet = tiny_unet()
    calls = []
    hook = unet.conv_in.register_forward_hook(lambda m, i, o: calls.append(i[0].clone()))
    seen_t = []
    original_forward = type(unet).forward

    def recording_forward(self, x, timesteps, **kw):
        seen_t.append(timesteps.clone())
        return original_forward(self, x, timesteps, **kw)

    type(unet).forward = recording_forward
    try:
        run_alg(unet, 0.95)
    finally:
        type(unet).forward = original_forward
        hook.remove()
    assert torch.equal(calls[0], calls[1])  # first call of each branch: the identical x_Q
    assert len(seen_t) == 20
    assert all(t.dtype == torch.long and t.shape == (2,) for t in seen_t)
    expected = [dif.match(400 - k) for k in range(1, 11)]  # reference quirk: first step told 399
    assert [int(t[0]) for t in seen_t[::2]] == expected and expected[0] == 99


def test_embedding_swap_is_temporary():
    unet = tiny_unet()
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
    a, a_prev = dif.ref_alpha_bar(399), dif.ref_alpha_bar(398)
    x = a ** 0.5 * x0 + (1 - a) ** 0.5 * eps
    torch.testing.assert_close(ddim_step(x, eps, a, a_prev), a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * eps)
    # clipping: a prediction outside [-1, 1] is clamped and eps re-derived from the clamped x0
    big = ddim_step(torch.full((1,), 3.0, dtype=torch.float64), torch.zeros(1, dtype=torch.float64), a, 1.0)
    assert float(big) == 1.0


def test_guidance_pushes_each_branch_towards_its_label():
    unet = tiny_unet()

    class Classifier(torch.nn.Module):  # log p(1) grows with the mean intensity
        def forward(self, x, t):
            m = x.mean(dim=(1, 2, 3))
            return torch.stack([-m, m], dim=1) * 5

    base = run_alg(unet, 0.95)
    guided = run_alg(unet, 0.95, guidance_scale=10.0, classifier=Classifier())
    assert float(guided.mean()) > float(base.mean())  # branch 1 brighter, perturbed branch darker


def test_parameters_are_validated():
    with pytest.raises(PluginError, match="tau"):
        CDMSaliency(tau=1.5)
    with pytest.raises(PluginError, match="reduce"):
        CDMSaliency(reduce="max")
    with pytest.raises(PluginError, match="steps"):
        CDMSaliency(steps=500)
    assert CDMSaliency().no_grad is True and CDMSaliency(guidance_scale=1.0).no_grad is False
    assert CDMSaliency.mask_rule == "otsu"


def test_prepare_records_the_match_table():
    cam, ctx = plugin(tiny_unet())
    rows = ctx.records["match/cdm"]["rows"]
    assert [r["t_ref"] for r in rows] == list(range(400, 389, -1))
    assert rows[0]["t"] == 99 and ctx.records["match/cdm"]["ref_schedule"] == "cosine"
