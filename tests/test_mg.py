"""Mean gradient map (docs/methods/diffusion.md) and the noisy classifier it uses (docs/methods/diffusion.md).

The reference for MG is float64 central differences of log softmax(f(x_t, t))[1] written
in tests/diffusion_helpers.py, on a noisy classifier with every parameter random; it calls
none of the code under test.
"""
from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

import diffusion_helpers as H
from fakes import FakeTaskData
from wsss_bench.cache import ArtifactCache
from wsss_bench.context import RunContext
from wsss_bench.errors import PluginError
from wsss_bench.interfaces import SliceBatch, TaskDef
from wsss_bench.nn import diffusion as dif
from wsss_bench.nn import noisy_classifier as ncl
from wsss_bench.profiles import load_profile
from wsss_bench_plugins.mg import MeanGradient, input_gradients, mean_gradient, positive_log_prob

SMOKE = load_profile("smoke")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: one intra-op thread (conftest)


class LeftHalf(torch.nn.Module):
    """Reads only the left half of the image: logit_1 = sum of tanh(conv) over columns < W/2."""

    def __init__(self, channels=2):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, 3, 3, padding=1)

    def forward(self, x, t):
        h = torch.tanh(self.conv(x[..., : x.shape[-1] // 2]))  # the right half never enters
        s = h.mean(dim=(1, 2, 3)) * (1 + t.float() / 100)
        return torch.stack([torch.zeros_like(s), s], dim=1)


class PlusMinus(torch.nn.Module):
    """logit_1 = sum_ij w_ij (x_0 - x_1): channel gradients are +g and -g."""

    def __init__(self, size):
        super().__init__()
        self.register_buffer("w", torch.linspace(-1, 2, size * size).view(size, size))

    def forward(self, x, t):
        s = (self.w * (x[:, 0] - x[:, 1])).sum(dim=(1, 2))
        return torch.stack([torch.zeros_like(s), s], dim=1)


def noises(ts, c, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, c, size, size, generator=g, dtype=torch.float64) for _ in ts]


def tiny_classifier(size=8, seed=0):
    return H.random_noisy_classifier(size, seed=seed).double()


# ---------------------------------------------------------------- mechanism tests
def test_gradcheck_and_an_independent_finite_difference_reference():
    model = tiny_classifier()
    t = dif.timesteps(12, 1)
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: positive_log_prob(model, v, t), (x,), eps=1e-6, atol=1e-6)

    # the whole MG against central differences of an independently written log p(1 | x_t)
    images = torch.rand(2, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ts, eps = [2, 24], noises([2, 24], 4, 8)
    got = mean_gradient(model, images, ts, eps)
    want = H.reference_mean_gradient(model, images, ts, eps)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)
    # the classifier depends on t and the two t differ, so averaging is visible
    one_t = H.reference_mean_gradient(model, images, ts[:1], eps[:1])
    assert float((one_t - want).abs().max()) > 1e-3 * float(want.abs().max())


def test_plugin_maps_equal_the_reference(monkeypatch):
    """maps = minmax(reference MG) at the profile's matched t-set with the documented noise."""
    model = H.random_noisy_classifier(8, seed=4)
    monkeypatch.setattr(ncl, "get_noisy_classifier", lambda ctx: model)
    ctx = H.FakeContext(size=8)
    cam = MeanGradient()
    cam.ctx = ctx
    cam.prepare(ctx)
    ts = [H.ref_match(t) for t in SMOKE.mg.t_ref]  # smoke t_ref {100, 200} -> {24, 49}
    assert cam.ts == ts == [24, 49]
    eps = [torch.randn((1, 4, 8, 8), generator=ctx.generator(f"noise/mg/t={t}")) for t in ts]
    assert all(torch.equal(a, b) for a, b in zip(cam.noises, eps))
    images = torch.rand(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    batch = SliceBatch(images=images, labels=torch.ones(2, dtype=torch.long), index=np.arange(2),
                       case_ids=["a", "b"], z=[0, 1])
    got = cam.maps(batch)
    ref = H.reference_mean_gradient(model, images, ts, eps)
    flat = ref.flatten(1)
    want = (ref - flat.min(1).values[:, None, None]) / (flat.max(1).values - flat.min(1).values)[:, None, None]
    assert float((got.double() - want).abs().max()) < 1e-3  # float32 gradients vs float64 differences


def test_classifier_reading_the_left_half_gives_zero_on_the_right_half():
    model = LeftHalf().double().eval()
    images = torch.rand(3, 2, 8, 8, dtype=torch.float64)
    mg = mean_gradient(model, images, [2, 4, 7], noises([2, 4, 7], 2, 8))
    assert torch.count_nonzero(mg[..., 4:]) == 0
    assert bool((mg[..., :4] > 0).any())


def test_opposite_channel_gradients_do_not_cancel():
    model = PlusMinus(8).double().eval()
    images = torch.rand(2, 2, 8, 8, dtype=torch.float64)
    ts, eps = [2, 9], noises([2, 9], 2, 8)
    xt = dif.add_noise(images * 2 - 1, eps[0].expand_as(images), dif.timesteps(2, 2))
    g = input_gradients(model, xt, dif.timesteps(2, 2))
    torch.testing.assert_close(g[:, 0], -g[:, 1])
    signed = mean_gradient(model, images, ts, eps, reduce="signed")
    absolute = mean_gradient(model, images, ts, eps, reduce="abs")
    assert torch.count_nonzero(signed) == 0
    assert float(absolute.amin()) < float(absolute.amax())  # non-zero and not constant


def test_timestep_batching_does_not_change_the_map():
    model = tiny_classifier(seed=1)
    images = torch.rand(3, 4, 8, 8, dtype=torch.float64)
    ts = [2, 4, 7, 9, 12]
    eps = noises(ts, 4, 8)
    one_by_one = mean_gradient(model, images, ts, eps, max_batch=3)
    together = mean_gradient(model, images, ts, eps, max_batch=1000)
    torch.testing.assert_close(one_by_one, together, rtol=1e-9, atol=1e-12)


def test_a_pass_smaller_than_the_batch_slices_the_images_and_keeps_the_map():
    model = tiny_classifier(seed=2)
    images = torch.rand(5, 4, 8, 8, dtype=torch.float64)
    ts = [2, 4, 7]
    eps = noises(ts, 4, 8)
    whole = mean_gradient(model, images, ts, eps, max_batch=1000)
    torch.testing.assert_close(whole, H.reference_mean_gradient(model, images, ts, eps), rtol=1e-5, atol=1e-8)
    for limit in (1, 2, 4):  # fewer images per pass than the batch holds: slices of it, one t each
        torch.testing.assert_close(mean_gradient(model, images, ts, eps, max_batch=limit), whole, rtol=1e-9, atol=1e-12)


def test_out_of_memory_halves_the_pass_until_it_fits_and_the_map_is_unchanged(monkeypatch):
    """A fake device that holds at most 3 noisy images per pass: the pass goes 16 -> 8 -> 4 -> 2,
    the smaller size is kept for the next batch, every pass that ran fitted, and the map equals
    the independent reference; any other error is not retried."""
    import wsss_bench_plugins.mg as mg_mod

    model = tiny_classifier(seed=3)
    images = torch.rand(6, 4, 8, 8, dtype=torch.float64)
    ts = [2, 4, 7, 9]
    eps = noises(ts, 4, 8)
    real, sizes = mg_mod.input_gradients, []

    def small_device(m, xt, t):
        if xt.shape[0] > 3:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {xt.shape[0]} images")
        sizes.append(xt.shape[0])
        return real(m, xt, t)

    monkeypatch.setattr(mg_mod, "input_gradients", small_device)
    size = mg_mod.PassSize(16)
    with pytest.warns(RuntimeWarning, match="out of memory.*2 noisy images per forward/backward"):
        got = mean_gradient(model, images, ts, eps, max_batch=size)
    assert size.limit == 2 and size.halvings == 3 and max(sizes) <= 3
    torch.testing.assert_close(got, H.reference_mean_gradient(model, images, ts, eps), rtol=1e-5, atol=1e-8)
    monkeypatch.setattr(mg_mod, "input_gradients", real)
    torch.testing.assert_close(got, mean_gradient(model, images, ts, eps, max_batch=1000), rtol=1e-9, atol=1e-12)
    monkeypatch.setattr(mg_mod, "input_gradients", small_device)
    sizes.clear()
    mean_gradient(model, images[:2], ts, eps, max_batch=size)  # the next batch starts at the smaller size
    assert sizes and max(sizes) == 2 and size.halvings == 3

    calls = []

    def fails_mid_pass(m, xt, t):  # the second slice of the first pass fails (fragmentation)
        calls.append(xt.shape[0])
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(m, xt, t)

    monkeypatch.setattr(mg_mod, "input_gradients", fails_mid_pass)
    with pytest.warns(RuntimeWarning):
        got = mean_gradient(model, images, ts, eps, max_batch=mg_mod.PassSize(3))
    assert calls[:2] == [3, 3] and set(calls[2:]) == {1}  # the half-done pass was redone, not half-counted
    torch.testing.assert_close(got, H.reference_mean_gradient(model, images, ts, eps), rtol=1e-5, atol=1e-8)

    def broken(m, xt, t):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(mg_mod, "input_gradients", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        mean_gradient(model, images, ts, eps, max_batch=mg_mod.PassSize(16))

    def never_fits(m, xt, t):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(mg_mod, "input_gradients", never_fits)
    with pytest.warns(RuntimeWarning), pytest.raises(torch.OutOfMemoryError):
        mean_gradient(model, images, ts, eps, max_batch=mg_mod.PassSize(4))


# ---------------------------------------------------------------- the plugin
def prepared(model, monkeypatch, **params):
    monkeypatch.setattr(ncl, "get_noisy_classifier", lambda ctx: model)
    ctx = H.FakeContext(size=16)
    cam = MeanGradient(**params)
    cam.ctx = ctx
    cam.prepare(ctx)
    return cam, ctx


def test_plugin_maps_use_the_profile_t_set_and_record_the_match(monkeypatch):
    model = H.random_noisy_classifier(16, seed=0)
    cam, ctx = prepared(model, monkeypatch)
    assert cam.ts == [24, 49] and cam.mask_rule == "otsu"  # smoke t_ref = {100, 200}
    assert [r["t"] for r in ctx.records["match/mg"]["rows"]] == [24, 49]
    b = SliceBatch(images=torch.rand(2, 4, 16, 16), labels=torch.ones(2, dtype=torch.long), index=np.arange(2),
                   case_ids=["a", "b"], z=[0, 1])
    with torch.no_grad():  # the runner may call maps under no_grad; MG re-enables autograd
        maps = cam.maps(b)
    assert maps.shape == (2, 16, 16) and float(maps.min()) == 0.0 and float(maps.max()) == 1.0
    assert torch.equal(maps, cam.maps(b))
    paper, _ = prepared(model, monkeypatch, t_ref="+".join(str(v) for v in range(10, 201, 10)))
    assert paper.ts == [2, 4, 7, 9, 12, 14, 17, 19, 22, 24, 27, 29, 32, 34, 37, 39, 42, 44, 47, 49]
    native, _ = prepared(model, monkeypatch, t_ref="5+6", t_scale="native")
    assert native.ts == [5, 6]
    with pytest.raises(PluginError, match="t_ref"):
        MeanGradient(t_ref="ten")
    with pytest.raises(PluginError, match="reduce"):
        MeanGradient(reduce="max")


# ---------------------------------------------------------------- the noisy classifier
def test_noisy_classifier_architecture():
    spec = load_profile("paper").cdm_unet
    accepted = inspect.signature(ncl.DiffusionModelEncoder.__init__).parameters
    kwargs = ncl.encoder_kwargs(spec, 4, 256)
    assert set(kwargs) <= set(accepted) and kwargs["num_class_embeds"] is None
    model = ncl.build_noisy_classifier(SMOKE.cdm_unet, 4, 32, seed=0)
    assert isinstance(model, ncl.DiffusionModelEncoder) and not hasattr(model, "class_embedding")
    linear = [m for m in model.out.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linear) == 1 and linear[0].in_features == 16 and linear[0].out_features == 2
    x, t = torch.randn(3, 4, 32, 32), dif.timesteps(5, 3)
    assert model(x, t).shape == (3, 2)
    feats = model.features(x, t)
    assert [f.shape[1] for f in feats] == [8, 16, 16] and [f.shape[-1] for f in feats] == [16, 8, 4]
    assert ncl.feature_dim(spec) == 1792  # Table 2 "UNet encoder" row
    assert model(torch.randn(1, 4, 48, 48), dif.timesteps(0, 1)).shape == (1, 2)  # any size: pooled head


def blob_data(n=96, size=32, seed=0):
    """train = rows 0..63, val = test = the rest."""
    return FakeTaskData(n, size, 4, seed, splits={"train": np.arange(64), "val": np.arange(64, n), "test": np.arange(64, n)},
                        fingerprint=f"blob-{seed}")


def test_smoke_training_beats_the_majority_rate_at_small_t(tmp_path):
    data = blob_data()
    ctx = RunContext(TaskDef("brats", "brats", None, 4, True, "amecam"), data, SMOKE, 0, "cpu",
                     ArtifactCache(tmp_path / "cache"))
    model = ncl.get_noisy_classifier(ctx)
    assert not model.training and ncl.get_noisy_classifier(ctx) is model
    assert list((tmp_path / "cache").rglob("noisy_classifier.safetensors"))
    p1, labels = ncl.noisy_scores(model, data, data.split("val"), dif.match(100), seed=0)
    accuracy = float(((p1 >= 0.5) == labels).mean())
    majority = max(labels.mean(), 1 - labels.mean())
    assert accuracy > majority, (accuracy, majority)
    from wsss_bench.nn.training import convergence_of

    folder = next((tmp_path / "cache").rglob("noisy_classifier.safetensors")).parent
    conv = convergence_of(folder)["noisy_classifier"]  # the rule's record is stored with the model
    assert "MG t-set" in conv["criterion"] and conv["steps"] == conv["curve"][-1][0] <= conv["cap"]
    assert conv["stop_reason"] in ("converged", "cap while improving", "cap on a plateau")
