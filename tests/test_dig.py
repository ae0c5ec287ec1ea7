"""DiG (docs/methods/dig.md): mechanism tests of the ViT, LFCA, losses, features, cache and training.

References are independent of the code under test: ``torch.nn.MultiheadAttention`` for the
attention weights, float64 loops for rcams, ``torch.distributions`` for the Bernoulli KL, a
noise oracle for x0-hat, MONAI forward hooks for the diffusion features.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsss_bench.errors import PluginError
from wsss_bench.interfaces import SliceBatch
from wsss_bench.nn import diffusion as dif
from wsss_bench.nn import dig as D
from wsss_bench.profiles import load_profile

PROFILE = load_profile("smoke")
SPEC = dict(PROFILE.dig)
S, C = 32, 4
FEAT_IN = len(D.FEATURE_T) * D.feature_dim(PROFILE.cdm_unet)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: one intra-op thread (conftest)


def model(seed=0, head_bias=None):
    torch.manual_seed(seed)
    m = D.DiG(C, S, SPEC, FEAT_IN)
    if head_bias is not None:  # positive patch CAMs everywhere, so cams / rcams are not all zero
        with torch.no_grad():
            m.vit.head.bias.fill_(head_bias)
    return m


def tiny_unet(seed=0):
    """Smoke-width CDM whose zero-initialised convs get random weights (eps depends on x, t, y)."""
    unet = dif.build_cdm(PROFILE.cdm_unet, C, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in unet.parameters():
            if p.dim() > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return unet.eval().requires_grad_(False)


def inputs(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, C, S, S, generator=g)
    feats = torch.randn(n, FEAT_IN, SPEC["grid"], SPEC["grid"], generator=g)
    x0 = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    y = torch.tensor([1, 0, 1, 1][:n])
    return x, feats, x0, y


# ---------------------------------------------------------------- the ViT
def test_attention_weights_sum_to_one_and_match_torch_multihead_attention():
    m = model().vit.eval().double().requires_grad_(False)
    x = torch.rand(2, C, S, S, dtype=torch.float64)
    out = m(x)
    assert len(out["attn"]) == SPEC["depth"]
    n = 1 + SPEC["grid"] ** 2
    for a in out["attn"]:
        assert a.shape == (2, SPEC["heads"], n, n)
        assert torch.allclose(a.sum(-1), torch.ones(2, SPEC["heads"], n, dtype=torch.float64), atol=1e-12)
    # independent reference: torch's MultiheadAttention with the same projections
    blk = m.blocks[0]
    d = SPEC["dim"]
    mha = torch.nn.MultiheadAttention(d, SPEC["heads"], bias=True, batch_first=True).double()
    with torch.no_grad():
        mha.in_proj_weight.copy_(blk.attn.qkv.weight)
        mha.in_proj_bias.copy_(blk.attn.qkv.bias)
        mha.out_proj.weight.copy_(blk.attn.proj.weight)
        mha.out_proj.bias.copy_(blk.attn.proj.bias)
    tokens = torch.randn(2, n, d, dtype=torch.float64)
    ours, weights, q = blk.attn(tokens)
    ref, ref_w = mha(tokens, tokens, tokens, need_weights=True, average_attn_weights=False)
    assert torch.allclose(ours, ref, atol=1e-10) and torch.allclose(weights, ref_w, atol=1e-12)
    # the returned queries are the query projection, split into heads
    q_ref = (tokens @ blk.attn.qkv.weight[:d].T + blk.attn.qkv.bias[:d]).view(2, n, SPEC["heads"], -1).transpose(1, 2)
    assert torch.allclose(q, q_ref, atol=1e-12)


def test_cams_and_rcams_equal_float64_loops_and_rcams_differ_from_cams():
    m = model(head_bias=0.0).vit.eval().double().requires_grad_(False)
    x = torch.rand(2, C, S, S, dtype=torch.float64)
    m.head.bias -= m(x)["patch_cam"].median()  # a patch CAM of both signs, so ReLU(A) matters
    out = m(x)
    assert (out["patch_cam"] > 0).any() and (out["patch_cam"] < 0).any()
    g, L = SPEC["grid"], SPEC["depth"]
    att = [a.numpy().mean(axis=1) for a in out["attn"]]  # heads averaged, (B, N, N)
    a_map = out["patch_cam"].numpy()[:, 0]
    for b in range(2):
        mtatt = np.zeros((g, g))
        patch = np.zeros((g * g, g * g))
        for layer in range(L):
            for i in range(g * g):
                mtatt[i // g, i % g] += att[layer][b, 0, 1 + i]
                for j in range(g * g):
                    patch[i, j] += att[layer][b, 1 + i, 1 + j]
        cams = mtatt * np.maximum(a_map[b], 0)
        rcams = np.array([sum(patch[i, j] * cams.flat[j] for j in range(g * g)) for i in range(g * g)]).reshape(g, g)
        np.testing.assert_allclose(out["mtatt"][b, 0].numpy(), mtatt, atol=1e-12)
        np.testing.assert_allclose(out["cams"][b, 0].numpy(), cams, atol=1e-12)
        np.testing.assert_allclose(out["rcams"][b, 0].numpy(), rcams, atol=1e-10)
    assert torch.equal(out["pcls"], D.topk_max_min(out["patch_cam"]))  # the patch logit is top-3 max-min
    assert torch.equal(out["cls"], out["attn"][0].new_tensor(0) + m.tokens(x)[0][:, 0].mean(-1))
    assert not torch.allclose(D.max_norm(out["rcams"]), D.max_norm(out["cams"]), atol=1e-3)


def test_patch_logit_is_top3_max_min():
    a = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    for b in range(3):
        v = np.sort(a[b].flatten().numpy())
        ref = np.maximum(v[::-1][:3], 0).mean() - np.maximum(-v[:3], 0).mean()
        assert abs(float(D.topk_max_min(a)[b]) - ref) < 1e-12


# ---------------------------------------------------------------- losses
def test_kd_term_is_zero_for_equal_logits_and_equals_the_bernoulli_kl():
    z = torch.randn(6, dtype=torch.float64)
    assert float(D.bernoulli_kd(z, z.clone())) == pytest.approx(0.0, abs=1e-12)
    student = torch.randn(6, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(6, dtype=torch.float64, requires_grad=True)
    ours = D.bernoulli_kd(student, teacher, 5.0)
    kl = torch.distributions.kl_divergence(torch.distributions.Bernoulli(probs=torch.sigmoid(teacher / 5)),
                                           torch.distributions.Bernoulli(probs=torch.sigmoid(student / 5)))
    assert float(ours.detach()) == pytest.approx(25.0 * float(kl.detach().mean()), rel=1e-6)
    ours.backward()
    assert teacher.grad is None and student.grad is not None  # teacher detached


def test_l_pred_matches_its_definition():
    m = model().eval()
    x, feats, _, y = inputs()
    out = m(x, feats)
    bce = lambda z: F.binary_cross_entropy_with_logits(z.double(), y.double())  # noqa: E731
    kl = lambda s, t: torch.distributions.kl_divergence(  # noqa: E731
        torch.distributions.Bernoulli(probs=torch.sigmoid(t.double() / 5)),
        torch.distributions.Bernoulli(probs=torch.sigmoid(s.double() / 5))).mean()
    ref = 0.2 * (bce(out["diff_cls"]) + bce(out["diff_pcls"])) + 0.8 * 25 * 0.5 * (
        kl(out["diff_cls"], out["cls"]) + kl(out["diff_pcls"], out["pcls"]))
    assert float(D.loss_pred(out, y).detach()) == pytest.approx(float(ref.detach()), rel=1e-5)


def test_l_pac_is_zero_when_x0hat_equals_x_and_positive_otherwise():
    m = model(head_bias=0.5).eval()  # eval: no drop-path, so both passes see the same network
    x, feats, x0, y = inputs()
    same = D.dig_losses(m, x, feats, x.clone(), y, active=True)
    assert float(same["pac"]) == 0.0
    other = D.dig_losses(m, x, feats, x0, y, active=True)
    assert float(other["pac"]) > 1e-4
    # the x branch is the detached target: gradients reach rcams(x0-hat) only
    r_x = torch.rand(4, 1, 8, 8, requires_grad=True)
    r_0 = torch.rand(4, 1, 8, 8, requires_grad=True)
    D.loss_pac(r_x, r_0, y, active=True).backward()
    assert r_x.grad is None and r_0.grad.abs().sum() > 0
    # and it is the y-weighted mean absolute difference of max-normed rcams
    r, r0 = m.vit(x)["rcams"], m.vit(x0)["rcams"]
    ref = (y.double()[:, None, None, None] * (D.max_norm(r.double()) - D.max_norm(r0.double())).abs()).mean()
    assert float(other["pac"]) == pytest.approx(float(ref), rel=1e-5)


def test_max_norm_is_seams():
    cam = torch.randn(2, 1, 5, 5, dtype=torch.float64)
    for b in range(2):
        v = np.maximum(cam[b, 0].numpy(), 0)
        ref = np.maximum(v - v.min() - 1e-5, 0) / (v.max() - v.min() + 1e-5)
        np.testing.assert_allclose(D.max_norm(cam)[b, 0].numpy(), ref, atol=1e-12)


def test_cons_and_pac_are_zero_before_warmup_and_not_after():
    m = model(head_bias=0.5).eval()
    x, feats, x0, y = inputs()
    before = D.dig_losses(m, x, feats, x0, y, active=False)
    after = D.dig_losses(m, x, feats, x0, y, active=True)
    assert float(before["cons"]) == 0.0 and float(before["pac"]) == 0.0
    assert float(after["cons"]) > 1e-4 and float(after["pac"]) > 1e-4
    for t in (before, after):
        parts = t["cls"] + t["pred"] + t["cons"] + t["cls_diff"] + 10 * t["pac"]
        assert float(t["total"]) == pytest.approx(float(parts), rel=1e-6)
    assert float(before["cls"]) == pytest.approx(float(after["cls"]))


def test_l_cons_sends_no_gradient_into_lfca_and_l_pred_none_into_the_vit():
    m = model(head_bias=0.5).train()
    x, feats, x0, y = inputs()
    out = m(x, feats)
    D.loss_cons(out, y, active=True).backward()
    lfca = [p for mod in (m.lfca, m.diff_head) for p in mod.parameters()]
    assert all(p.grad is None or not p.grad.any() for p in lfca)
    assert m.vit.head.weight.grad is not None and m.vit.head.weight.grad.abs().sum() > 0
    m.zero_grad(set_to_none=True)
    out = m(x, feats)
    D.loss_pred(out, y).backward()  # detached queries and a detached teacher: nothing reaches the ViT
    assert all(p.grad is None or not p.grad.any() for p in m.vit.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lfca)


def test_training_applies_cons_and_pac_only_after_the_warmup_fraction(monkeypatch, tmp_path):
    seen = []
    real = D.dig_losses

    def spy(model, x, feats, x0hat, y, active, autocast=None):
        seen.append(active)
        return real(model, x, feats, x0hat, y, active, autocast)

    monkeypatch.setattr(D, "dig_losses", spy)
    data, rows, fake_inputs = toy_training_set()
    D.train_dig(model(), data, rows, fake_inputs, SPEC, "cpu", 3, tmp_path, flips=False, warmup_fraction=10 / 60,
                iterations=12)
    assert seen == [it >= 2 for it in range(12)]  # round(12 * 10/60) = 2


# ---------------------------------------------------------------- diffusion features and x0-hat
def test_features_are_mid_and_up_blocks_at_t0_to_4_with_label_1_resized_align_corners():
    unet = tiny_unet()
    calls = []
    real_forward = type(unet).forward

    def recording(self, x, timesteps, **kw):
        calls.append((timesteps.clone(), kw.get("class_labels")))
        return real_forward(self, x, timesteps, **kw)

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, C, S, S, generator=g)
    noise = torch.randn(2, 5, C, S, S, generator=g)
    type(unet).forward = recording
    try:
        feats = D.diffusion_features(unet, x, noise, SPEC["grid"], label=1)
    finally:
        type(unet).forward = real_forward
    d_f = D.feature_dim(PROFILE.cdm_unet)
    assert d_f == 16 + 16 + 16 + 8  # middle block + up blocks of channels (8, 16, 16)
    assert feats.shape == (2, 5 * d_f, SPEC["grid"], SPEC["grid"])
    assert [c[0].tolist() for c in calls] == [[t, t] for t in range(5)]
    assert all(c[0].dtype == torch.long and c[1].tolist() == [1, 1] for c in calls)
    # independent reference: hooks on a full forward, one t at a time
    for k in range(5):
        acts = []
        hs = [unet.middle_block.register_forward_hook(lambda m, i, o: acts.append(o))]
        hs += [b.register_forward_hook(lambda m, i, o: acts.append(o)) for b in unet.up_blocks]
        t = torch.full((2,), k, dtype=torch.long)
        xt = dif.add_noise(2 * x - 1, noise[:, k], t)
        with torch.no_grad():
            unet(xt, timesteps=t, class_labels=torch.ones(2, dtype=torch.long))
        for h in hs:
            h.remove()
        ref = torch.cat([F.interpolate(a, size=(8, 8), mode="bilinear", align_corners=True) for a in acts], 1)
        assert torch.allclose(feats[:, k * d_f:(k + 1) * d_f], ref, atol=1e-5)


def test_unconditional_network_gets_no_label():
    from monai.networks.nets import DiffusionModelUNet

    unet = DiffusionModelUNet(**{**dif.unet_kwargs(PROFILE.cdm_unet, C), "num_class_embeds": None}).eval()
    x = torch.rand(1, C, S, S)
    feats = D.diffusion_features(unet, x, torch.randn(1, 5, C, S, S), SPEC["grid"], label=None)
    assert feats.shape[1] == FEAT_IN


def test_x0hat_recovers_the_image_with_a_noise_oracle_at_harness_t100():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, C, S, S, generator=g)
    eps = torch.randn(x.shape, generator=g)
    seen = []

    class Oracle(torch.nn.Module):
        def forward(self, xt, timesteps, class_labels=None):
            seen.append((timesteps.tolist(), class_labels.tolist()))
            ab = float(dif.harness_alphas_cumprod()[100])
            assert torch.allclose(xt, math.sqrt(ab) * (2 * x - 1) + math.sqrt(1 - ab) * eps, atol=1e-5)
            return eps

    x0h = D.denoised(Oracle(), x, eps)
    assert torch.allclose(x0h, x, atol=1e-5)
    assert seen == [([100, 100], [1, 1])]


# ---------------------------------------------------------------- the feature cache
class ToyData:
    """Rows 0..n-1 of random images, batched like TaskData."""

    def __init__(self, n=10, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.rand(n, C, S, S, generator=g)
        self.y = torch.tensor([i % 2 for i in range(n)])

    def split(self, name):
        return np.arange(len(self.y))  # validation = every row (the toy has no other)

    def batches(self, idx, batch_size, shuffle=False, seed=None, device="cpu", with_masks=False):
        idx = np.asarray(idx)
        for s in range(0, len(idx), batch_size):
            r = idx[s:s + batch_size]
            yield SliceBatch(images=self.x[r].to(device), labels=self.y[r].to(device), index=r,
                             case_ids=[f"case{i // 5}" for i in r], z=[int(i % 5) for i in r])


def noise_for(batch):
    gen = lambda comp: torch.Generator().manual_seed(abs(hash(comp)) % (2**31))  # noqa: E731
    return D.slice_noise(gen, batch.case_ids, batch.z, C, S)


def test_feature_cache_is_a_memmap_of_the_expected_up_front_shape(monkeypatch, tmp_path):
    data, unet = ToyData(6), tiny_unet()
    inputs_ = D.DiffusionInputs(unet, SPEC["grid"], 1, noise_for, None)
    opened, computed = [], []
    real_open, real_compute = np.lib.format.open_memmap, inputs_.compute

    def spy_open(path, mode="r+", dtype=None, shape=None, **kw):
        opened.append((str(path).rsplit("/", 1)[-1], mode, shape, len(computed)))
        return real_open(path, mode=mode, dtype=dtype, shape=shape, **kw)

    monkeypatch.setattr(np.lib.format, "open_memmap", spy_open)
    monkeypatch.setattr(inputs_, "compute", lambda *a: computed.append(1) or real_compute(*a))
    rows = np.arange(6)
    info = D.build_feature_cache(tmp_path, inputs_, data.batches(rows, 4), rows, FEAT_IN, C, S)
    g = SPEC["grid"]
    assert opened == [("features.npy", "w+", (6, FEAT_IN, g, g), 0), ("x0hat.npy", "w+", (6, C, S, S), 0)]
    assert info["rows"] == 6 and len(computed) == 2
    feats = np.load(tmp_path / "features.npy", mmap_mode="r")
    assert isinstance(feats, np.memmap) and feats.shape == (6, FEAT_IN, g, g) and feats.dtype == np.float32
    # reading back through the cache equals computing on the fly, in any batch order
    cached = D.DiffusionInputs(unet, g, 1, noise_for, None, cache=tmp_path)
    batch = next(data.batches(np.array([4, 1, 3]), 3))
    f_c, x_c = cached(batch)
    f_o, x_o = real_compute(batch.images, noise_for(batch))
    assert torch.allclose(f_c, f_o, atol=1e-5) and torch.allclose(x_c, x_o, atol=1e-6)


# ---------------------------------------------------------------- training and resume
def toy_training_set(n=16):
    data = ToyData(n)
    g = torch.Generator().manual_seed(5)
    feats = torch.randn(n, FEAT_IN, SPEC["grid"], SPEC["grid"], generator=g)
    x0 = (data.x + 0.1 * torch.randn(data.x.shape, generator=g)).clamp(0, 1)
    return data, np.arange(n), lambda b: (feats[b.index], x0[b.index])


class Killed(Exception):
    pass


def test_training_resumes_bit_identically_after_a_kill(tmp_path):
    data, rows, fake_inputs = toy_training_set()
    ref_w, ref_info = D.train_dig(model(), data, rows, fake_inputs, SPEC, "cpu", 7, tmp_path / "a", flips=True,
                                  warmup_fraction=10 / 60, iterations=8, every=2)
    done = []

    def advance(n):
        done.append(n)
        if sum(done) == 5:
            raise Killed

    with pytest.raises(Killed):
        D.train_dig(model(), data, rows, fake_inputs, SPEC, "cpu", 7, tmp_path / "b", flips=True,
                    warmup_fraction=10 / 60, iterations=8, every=2, progress=advance)
    w, info = D.train_dig(model(), data, rows, fake_inputs, SPEC, "cpu", 7, tmp_path / "b", flips=True,
                          warmup_fraction=10 / 60, iterations=8, every=2)
    assert info["resumed_from"] == 4
    assert ref_w.keys() == w.keys() and all(torch.equal(ref_w[k], w[k]) for k in w)
    assert ref_info["loss_log"] == info["loss_log"]
    assert not all(torch.equal(ref_w[k], model().state_dict()[k]) for k in w)  # it did train
    conv = ref_info["convergence"]  # the criterion: the ViT's classification AUC on val, kept weights reproduce it
    assert "classification" in conv["criterion"] and info["convergence"]["curve"] == conv["curve"]
    from sklearn.metrics import roc_auc_score

    kept = model()
    kept.load_state_dict(ref_w)
    kept.eval()
    with torch.no_grad():
        p = torch.sigmoid(kept.vit(data.x)["cls"].float().reshape(-1)).numpy()
    assert roc_auc_score(data.y.numpy(), p) == pytest.approx(conv["best"], abs=1e-6)


def test_lr_schedule_warms_up_then_decays_by_cosine():
    lrs = [D.lr_factor(it, 60, 5) for it in range(60)]
    assert lrs[:5] == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert lrs[5] == 1.0 and lrs[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 54 / 55)))
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:]))
    assert D.dig_lr(32) == pytest.approx(5e-4 * 32 / 512)


def test_inference_adds_the_flipped_back_map_of_the_flip():
    vit = model(head_bias=0.5).vit.eval()
    x = torch.rand(2, C, S, S)
    with torch.no_grad():
        got = D.rcam_maps(vit, x, True, S)
        plain = D.rcam_maps(vit, x, False, S)
        r = vit(x)["rcams"][:, 0] + vit(x.flip(-1))["rcams"][:, 0].flip(-1)
    ref = F.interpolate(F.relu(r)[:, None], size=(S, S), mode="bilinear", align_corners=False)[:, 0]
    lo, hi = ref.flatten(1).amin(1)[:, None, None], ref.flatten(1).amax(1)[:, None, None]
    assert torch.allclose(got, (ref - lo) / (hi - lo), atol=1e-6)
    assert not torch.allclose(got, plain, atol=1e-3)


def test_bad_ddpm_parameter_names_plugin_and_parameter():
    from wsss_bench_plugins.dig import DiGSource

    with pytest.raises(PluginError, match=r"'dig'.*ddpm='gan'.*shared, separate"):
        DiGSource(ddpm="gan")


# ---------------------------------------------------------------- end to end
def test_end_to_end_smoke_both_diffusion_sources_and_a_rerun_reuses_every_model(tmp_path, monkeypatch):
    import json

    import pandas as pd
    from typer.testing import CliRunner

    from wsss_bench import cli

    monkeypatch.setitem(cli._STATE, "host", None)
    # a private cache: other tests may already have trained these smoke models in the shared one
    args = ["run", "--profile", "smoke", "--method", "threshold", "--cam", "dig,dig[ddpm=separate]",
            "--task", "brats", "--device", "cpu", "--cache-dir", str(tmp_path / "cache"), "--out"]
    first = CliRunner().invoke(cli.app, args + [str(tmp_path / "a")])
    assert first.exit_code == 0, first.output
    cells = json.loads((tmp_path / "a" / "manifest.json").read_text())["cells"]
    stages = [[s["stage"] for s in c["stages"]] for c in cells]
    assert any("train/dig" in s and "train/cdm" in s for s in stages)
    assert any("train/dig-ddpm" in s for s in stages)
    records = [c["records"]["dig"] for c in cells]
    assert sorted((r["ddpm"], r["label"]) for r in records) == [("separate", None), ("shared", 1)]
    again = CliRunner().invoke(cli.app, args + [str(tmp_path / "b")])
    assert again.exit_code == 0, again.output
    for what in ("dig", "dig-features", "dig-ddpm", "cdm"):
        assert f"reused cached {what} (" in again.output
    assert "stage train/" not in again.output
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "b" / "results.parquet"),
                                  pd.read_parquet(tmp_path / "a" / "results.parquet"))
