"""AME-CAM (docs/methods/amecam.md): mechanism tests of the networks, losses, trainings and plugin."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from fakes import FakeTaskData
from wsss_bench.interfaces import SliceBatch
from wsss_bench.nn import amecam as am
from wsss_bench.profiles import load_profile

S = 32


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: one intra-op thread (conftest)


def smoke_cfg(**over):
    cfg = dict(load_profile("smoke").amecam)
    cfg.update(over)
    return cfg


def stage1(seed=0, channels=4, **over):
    torch.manual_seed(seed)
    return am.MultiExitResNet(smoke_cfg(**over), channels)


# ---------------------------------------------------------------- (a) exits
def test_exit_logits_are_the_spatial_means_of_the_exit_maps():
    model = stage1().eval()
    feats = {}
    hooks = [getattr(model.encoder, f"layer{k}").register_forward_hook(
        lambda mod, i, o, k=k: feats.__setitem__(k, o.detach())) for k in range(1, 5)]
    size = 36  # exit maps 9x9 and 5x5: Up is not an integer zoom, so mean(Up(M)) != mean(M)
    x = torch.rand(3, 4, size, size, generator=torch.Generator().manual_seed(1))
    logits, maps = model(x)
    for h in hooks:
        h.remove()
    assert logits.shape == (3, 4)
    for k in range(4):
        f = feats[k + 1].double()  # (B, C_k, h, w): the output of layer k+1
        w = model.exits[k].weight.detach().double()[0, :, 0, 0]  # (C_k,)
        bias = float(model.exits[k].bias.detach())
        naive_map = torch.zeros(f.shape[0], f.shape[2], f.shape[3], dtype=torch.float64)
        naive_logit = torch.zeros(f.shape[0], dtype=torch.float64)
        for b in range(f.shape[0]):
            for i in range(f.shape[2]):
                for j in range(f.shape[3]):
                    naive_map[b, i, j] = (w * f[b, :, i, j]).sum() + bias
            naive_logit[b] = naive_map[b].sum() / (f.shape[2] * f.shape[3])
        torch.testing.assert_close(maps[k][:, 0].double(), naive_map, rtol=0, atol=1e-5)
        torch.testing.assert_close(logits[:, k].double(), naive_logit, rtol=0, atol=1e-6)
    # m_k = Up(M_k) at image size, bilinear, align_corners=False
    _, m = model.up_maps(x)
    want = torch.nn.functional.interpolate(maps[3], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    assert m.shape == (3, 4, size, size) and torch.allclose(m[:, 3], want)


def test_exit_loss_is_the_deep_weighted_sum_of_exit_bces():
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(5, 4, generator=g) * 3, torch.tensor([1, 0, 1, 1, 0])
    want = 0.0
    for k, wk in enumerate((0.25, 0.5, 0.75, 1.0)):
        bce = 0.0
        for b in range(5):
            p = 1 / (1 + math.exp(-float(logits[b, k])))
            bce += -(math.log(p) if int(y[b]) == 1 else math.log(1 - p))
        want += wk * bce / 5
    assert float(am.exit_loss(logits, y)) == pytest.approx(want, rel=1e-5)


def test_stage1_is_a_resnet18_with_instance_norm_and_profile_geometry():
    model = stage1()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._NormBase)]
    assert norms and all(isinstance(m, torch.nn.InstanceNorm2d) and not m.affine for m in norms)
    assert [e.in_channels for e in model.exits] == list(smoke_cfg()["channels"])
    assert all(e.out_channels == 1 and e.kernel_size == (1, 1) and e.bias is not None for e in model.exits)
    assert len(model.encoder.layer4) == 2 and len(model.encoder.layer1) == 2  # resnet18: 2 blocks a stage


@pytest.mark.parametrize("size,stride", [(32, 8), (33, 8), (40, 16), (50, 32), (64, 32), (27, 16)])
def test_feature_sizes_match_the_network(size, stride):
    model = stage1(output_stride=stride).eval()
    with torch.no_grad():
        shapes = [f.shape[-1] for f in am.encoder_layers(model.encoder, torch.rand(1, 4, size, size))]
    assert shapes == am.feature_sizes(size, stride)


def test_geometry_problems_name_the_profile_value():
    assert am.geometry_problems(32, smoke_cfg()) == []
    bad = dict(am.geometry_problems(32, smoke_cfg(output_stride=32)))
    assert "1x1" in bad["output_stride"] and "image_size >= 64" in bad["output_stride"]
    assert "batch" in dict(am.geometry_problems(32, smoke_cfg(batch=3)))
    assert dict(am.geometry_problems(64, smoke_cfg(output_stride=32))) == {}
    assert "output_stride" in dict(am.geometry_problems(64, smoke_cfg(output_stride=4)))
    # the failure the check prevents is real: InstanceNorm refuses a 1x1 map
    model = stage1(output_stride=32).train()
    with pytest.raises(ValueError):
        model(torch.rand(2, 4, 32, 32))


# ---------------------------------------------------------------- (b) attention aggregation
def test_attention_weights_sum_to_one_and_the_aggregate_lies_between_the_exit_maps():
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    att = am.AttentionAggregator().train()  # a few steps give BN non-trivial statistics
    with torch.no_grad():
        for p in att.parameters():
            p.mul_(3.0)
    x = torch.rand(4, 4, S, S, generator=g)
    m = torch.randn(4, 4, S, S, generator=g) * 4 - 1  # raw maps, far outside [0, 1]
    m[:, 1] *= 1e-4  # a nearly flat exit map: n_k's 1e-5 matters there
    seen = {}
    h = att.att[0].register_forward_pre_hook(lambda mod, inp: seen.__setitem__("u", inp[0].detach()))
    a, w = att(x, m)
    h.remove()
    assert w.shape == (4, 4, S, S) and a.shape == (4, S, S)
    torch.testing.assert_close(w.sum(dim=1), torch.ones(4, S, S), rtol=0, atol=1e-6)
    assert (w >= 0).all()
    assert (a >= m.amin(dim=1) - 1e-5).all() and (a <= m.amax(dim=1) + 1e-5).all()
    assert a.amin() < 0 or a.amax() > 1  # A uses the raw maps, not the normalised ones
    # naive float64: A = sum_k w_k m_k, u = gray * (m - min + 1e-5) / (max - min + 1e-5)
    want_a = (w.double() * m.double()).sum(dim=1)
    torch.testing.assert_close(a.double(), want_a, rtol=0, atol=1e-5)
    gray = x.double().mean(dim=1)
    for b in range(4):
        for k in range(4):
            mk = m[b, k].double()
            n = (mk - mk.min() + 1e-5) / (mk.max() - mk.min() + 1e-5)
            torch.testing.assert_close(seen["u"][b, k].double(), gray[b] * n, rtol=0, atol=1e-6)
    # the net is 4 x [Conv3x3(no bias) -> BN -> ReLU], 4 -> 32 -> 32 -> 32 -> 4
    convs = [mod for mod in att.att if isinstance(mod, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.bias) for c in convs] == \
        [(4, 32, (3, 3), None), (32, 32, (3, 3), None), (32, 32, (3, 3), None), (32, 4, (3, 3), None)]
    assert sum(isinstance(mod, torch.nn.BatchNorm2d) for mod in att.att) == 4
    # the final map is the mean of the five maps
    avg = am.average_map(m, a)
    torch.testing.assert_close(avg, (m.sum(dim=1) + a) / 5, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- (c) C^2AM losses
def naive_cos(x, y):
    x, y = x.double(), y.double()
    out = torch.zeros(x.shape[0], y.shape[0], dtype=torch.float64)
    for i in range(x.shape[0]):
        for j in range(y.shape[0]):
            num = sum(float(a) * float(b) for a, b in zip(x[i], y[j]))
            den = math.sqrt(float((x[i] ** 2).sum())) * math.sqrt(float((y[j] ** 2).sum()))
            out[i, j] = min(max(num / den, 5e-4), 0.9995)
    return out


def naive_sim_max(x):
    sim = naive_cos(x, x)
    total = 0.0
    for i in range(sim.shape[0]):
        row = [float(v) for v in sim[i]]
        order = sorted(range(len(row)), key=lambda j: -row[j])  # descending; ties: any order
        for r, j in enumerate(order):  # r is the 0-based rank
            total += -math.log(row[j]) * math.exp(-0.25 * (r - 1))
    return total / sim.numel()


def naive_sim_min(fg, bg):
    sim = naive_cos(bg, fg)
    return sum(-math.log(1 - float(v)) for v in sim.flatten()) / sim.numel()


@pytest.mark.parametrize("seed", [0, 1])
def test_simmax_and_simmin_equal_naive_loops_with_rank_weights(seed):
    g = torch.Generator().manual_seed(seed)
    fg = torch.randn(6, 20, generator=g)  # signed: some cosines clamp at 5e-4
    bg = torch.rand(6, 20, generator=g) + 0.2 * torch.randn(6, 20, generator=g)
    fg[5] = fg[4] * 2.0  # a duplicate direction: clamped at 0.9995, a tie
    assert float(am.sim_max(fg)) == pytest.approx(naive_sim_max(fg), rel=1e-5)
    assert float(am.sim_max(bg)) == pytest.approx(naive_sim_max(bg), rel=1e-5)
    assert float(am.sim_min(fg, bg)) == pytest.approx(naive_sim_min(fg, bg), rel=1e-5)
    total = naive_sim_max(fg) + naive_sim_min(fg, bg) + naive_sim_max(bg)
    assert float(am.c2am_loss(fg, bg)) == pytest.approx(total, rel=1e-5)


def test_rank_weights_give_the_top_entry_e_to_the_quarter():
    sim = torch.tensor([[0.9995, 0.2, 0.7, 0.5]])
    w = am.rank_weights(sim)
    want = torch.tensor([[math.exp(0.25), math.exp(-0.5), math.exp(0.0), math.exp(-0.25)]])
    torch.testing.assert_close(w, want)


# ---------------------------------------------------------------- (d) polarity
def toy_images(n=12, seed=0):
    """Dark noisy slices, each with one bright 8x8 object; and the object masks."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 4, S, S, generator=g) * 0.3
    obj = torch.zeros(n, S, S)
    for i in range(n):
        r, c = torch.randint(2, S - 10, (2,), generator=g).tolist()
        obj[i, r:r + 8, c:c + 8] = 1
    return x + 0.7 * obj[:, None], obj


def toy_logit(x):
    """A 'classifier' whose positive evidence is the object: the brightest pixel."""
    return 30.0 * (x.mean(dim=1).flatten(1).amax(dim=1) - 0.5)


def test_polarity_rule_finds_the_negated_map():
    x, obj = toy_images()
    blur = obj + 0.2 * torch.rand(obj.shape, generator=torch.Generator().manual_seed(9))  # high on the object
    plus = am.polarity_test(x, lambda t: blur, toy_logit, batch=64)
    assert plus["s"] == +1 and plus["drop_plus"] > 0.5 and abs(plus["drop_minus"]) < 0.05 and not plus["tied"]
    neg = am.polarity_test(x, lambda t: -blur, toy_logit, batch=64)  # deliberately negated avg
    assert neg["s"] == -1 and neg["drop_minus"] > 0.5 and abs(neg["drop_plus"]) < 0.05
    assert neg["drop_plus"] == pytest.approx(plus["drop_minus"]) and neg["n_slices"] == len(x)
    # the final map follows s: high on the object in both cases
    for avg, rec in ((blur, plus), (-blur, neg)):
        cam = am.final_cam(avg, rec["s"])
        assert float(cam[obj.bool()].mean()) > 0.8 > 0.2 > float(cam[~obj.bool()].mean())


def test_polarity_rule_drops_use_deletion_and_warn_on_a_tie():
    x, obj = toy_images()
    # naive drops for the negated map, one image at a time
    avg = -(obj + 0.2 * torch.rand(obj.shape, generator=torch.Generator().manual_seed(9)))
    rec = am.polarity_test(x, lambda t: avg, toy_logit)
    for s, key in ((+1, "drop_plus"), (-1, "drop_minus")):
        d = []
        for i in range(len(x)):
            a = s * avg[i]
            mask = ((a - a.min()) / (a.max() - a.min()) > 0.5).float()
            d.append(float(torch.sigmoid(toy_logit(x[i:i + 1]))) - float(torch.sigmoid(toy_logit(x[i:i + 1] * (1 - mask)))))
        assert rec[key] == pytest.approx(sum(d) / len(d), abs=1e-6)
    assert rec["drop_minus"] > 0.5 and rec["s"] == -1
    const = lambda t: torch.zeros(t.shape[0], S, S)  # noqa: E731  (no evidence either way)
    with pytest.warns(UserWarning, match="polarity"):
        tied = am.polarity_test(x, const, toy_logit)
    assert tied["s"] == +1 and tied["tied"]
    assert am.decide_polarity(0.30, 0.295) == (+1, True)
    assert am.decide_polarity(0.10, 0.30) == (-1, False) and am.decide_polarity(0.30, 0.10) == (+1, False)


def test_polarity_rows_are_seeded_label1_training_slices():
    labels = np.array([1, 0, 1, 1, -1, 1, 0, 1] * 100, dtype=np.int8)
    train = np.arange(0, 700)
    rows = am.polarity_rows(labels, train, torch.Generator().manual_seed(0))
    assert len(rows) == 256 and (labels[rows] == 1).all() and rows.max() < 700
    again = am.polarity_rows(labels, train, torch.Generator().manual_seed(0))
    assert np.array_equal(rows, again) and np.all(np.diff(rows) > 0)
    few = am.polarity_rows(labels, np.arange(8), torch.Generator().manual_seed(0))
    assert np.array_equal(few, [0, 2, 3, 5, 7])


# ---------------------------------------------------------------- trainings
def killed_then_resumed(train, tmp_path, stop_at):
    """(uninterrupted result, resumed result) of ``train(work, progress)``."""
    full = train(tmp_path / "full", None)

    def progress_killing(n, count=[0]):  # noqa: B006 (per-call state)
        count[0] += n
        if count[0] >= stop_at:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "cut", progress_killing)
    resumed = train(tmp_path / "cut", None)
    return full, resumed


def test_stage1_trains_keeps_best_val_auc_and_resumes_bit_identically(tmp_path):
    data, cfg = FakeTaskData(), smoke_cfg(stage1_epochs=3, eval_every=2)  # one evaluation per epoch

    def train(work, progress):
        model = stage1(seed=5)
        return am.train_stage1(model, data, cfg, work, seed=11, device="cpu", progress=progress, every=2)

    (w_full, info), (w_res, info2) = killed_then_resumed(train, tmp_path, stop_at=3)
    assert info["iterations"] == 3 * (36 // 16) and info["resumed_from"] is None and info2["resumed_from"] == 2
    assert all(torch.equal(w_full[k], w_res[k]) for k in w_full)
    assert info2["loss_log"] == info["loss_log"] and info2["val_auc"] == info["val_auc"]
    # the kept weights are those of the best validation AUC of sigma(logit_4)
    aucs = info["val_auc"]
    per_epoch = 36 // 16
    assert len(aucs) == 3 and max(aucs) == aucs[info["best_step"] // per_epoch - 1]
    assert info["convergence"]["criterion"].startswith("val AUC of sigma(logit_4)")
    model = stage1(seed=5)
    model.load_state_dict(w_full)
    assert am.val_auc(model, data, 16, "cpu") == pytest.approx(max(aucs))


def test_stage2_trains_the_attention_only_and_resumes_bit_identically(tmp_path):
    data, cfg = FakeTaskData(), smoke_cfg(stage2_epochs=2)
    frozen = stage1(seed=2)
    before = {k: v.clone() for k, v in frozen.state_dict().items()}

    def train(work, progress):
        torch.manual_seed(4)
        att = am.AttentionAggregator()
        init = {k: v.clone() for k, v in att.state_dict().items()}
        w, info = am.train_stage2(att, frozen, data, cfg, work, seed=13, device="cpu", progress=progress, every=1)
        info["changed"] = any(not torch.equal(init[k], w[k]) for k in w if w[k].is_floating_point())
        return w, info

    (w_full, info), (w_res, info2) = killed_then_resumed(train, tmp_path, stop_at=3)
    assert info["changed"] and info2["resumed_from"] == 3 and info["iterations"] == 4
    assert all(torch.equal(w_full[k], w_res[k]) for k in w_full)
    assert all(torch.equal(before[k], v) for k, v in frozen.state_dict().items())  # stage 1 untouched
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    assert math.isfinite(info["final_loss"])
    conv = info["convergence"]  # the criterion is L2 on the validation slices, recomputed here
    assert "C2AM" in conv["criterion"] and conv["higher_is_better"] is False
    att = am.AttentionAggregator()
    att.load_state_dict(w_full)
    att.eval()
    rows = data.split("val")
    x = torch.from_numpy(data.images(rows)).float()
    with torch.no_grad():
        a, _ = att(x, frozen.up_maps(x)[1].float())
        fg, bg = am.fg_bg(x, a.float())
        assert float(am.c2am_loss(fg, bg)) == pytest.approx(conv["best"], rel=1e-5)  # one batch of val


def test_stage2_loss_falls_on_fixed_maps(tmp_path):
    """The C^2AM objective is what the attention net optimises: its loss falls."""
    data, cfg = FakeTaskData(), smoke_cfg(stage2_epochs=12)
    torch.manual_seed(4)
    att = am.AttentionAggregator()
    _, info = am.train_stage2(att, stage1(seed=2), data, cfg, tmp_path, seed=13, device="cpu", every=4)
    losses = [v for _, v in info["loss_log"]]
    assert losses[-1] < losses[0]


def test_simclr_stage_runs_resumes_and_loads_the_encoder_by_name(tmp_path):
    data, cfg = FakeTaskData(), smoke_cfg(simclr_epochs=1, batch=8)  # SimCLR batch = 2 x 8

    def train(work, progress):
        torch.manual_seed(7)
        net = am.SimCLRNet(cfg, 4)
        return am.train_simclr(net, data, cfg, work, seed=17, device="cpu", flips=True, progress=progress, every=1)

    torch.manual_seed(7)
    z = am.SimCLRNet(cfg, 4)(torch.rand(3, 4, S, S))
    assert z.shape == (3, 256) and torch.allclose(z.norm(dim=1), torch.ones(3))  # L2-normalised
    (w_full, info), (w_res, info2) = killed_then_resumed(train, tmp_path, stop_at=1)
    assert info["iterations"] == 36 // 16 and info["batch"] == 16 and info2["resumed_from"] == 1
    assert all(torch.equal(w_full[k], w_res[k]) for k in w_full) and math.isfinite(info["final_loss"])
    head = [k for k in w_full if k.startswith("head.")]
    assert w_full["head.0.weight"].shape == (64, 64) and "head.0.bias" not in w_full
    assert w_full["head.2.weight"].shape == (256, 64) and head
    model = stage1(seed=9)
    names = am.load_encoder(model, w_full)
    enc = model.encoder.state_dict()
    assert names == sorted(enc) and all(torch.equal(enc[k], w_full["encoder." + k]) for k in enc)
    assert all(not torch.equal(model.exits[0].weight, v) for v in w_full.values() if v.shape == model.exits[0].weight.shape)


def test_nt_xent_equals_a_naive_loop():
    g = torch.Generator().manual_seed(0)
    z1 = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=1)
    z2 = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=1)
    z = torch.cat([z1, z2]).double()
    total = 0.0
    for i in range(8):
        pos = (i + 4) % 8
        den = sum(math.exp(float(z[i] @ z[j]) / 0.07) for j in range(8) if j != i)
        total += -math.log(math.exp(float(z[i] @ z[pos]) / 0.07) / den)
    assert float(am.nt_xent(z1, z2)) == pytest.approx(total / 8, rel=1e-5)


def test_simclr_views_crop_flip_and_jitter():
    x = torch.rand(64, 4, S, S, generator=torch.Generator().manual_seed(0))
    v = am.simclr_view(x, torch.Generator().manual_seed(1), flips=True)
    assert v.shape == x.shape and v.min() >= 0 and v.max() <= 1
    assert not torch.allclose(v, x)
    again = am.simclr_view(x, torch.Generator().manual_seed(1), flips=True)
    assert torch.equal(v, again)
    # full-image crop boxes are the identity; jitter scales a channel's contrast about its mean
    ident = am.random_resized_crop(x, torch.Generator().manual_seed(1), flips=False)
    assert ident.shape == x.shape
    j = am.channel_jitter(x, torch.Generator().manual_seed(2))
    changed = (j - x).abs().flatten(1).amax(dim=1) > 0
    assert 0.6 < float(changed.float().mean()) < 0.97  # p = 0.8


# ---------------------------------------------------------------- the plugin
def make_ctx(tmp_path, data=None, **amecam):
    from wsss_bench.cache import ArtifactCache
    from wsss_bench.context import RunContext
    from wsss_bench.profiles import Section
    from wsss_bench.records import TaskDef

    prof = load_profile("smoke")
    if amecam:
        prof["amecam"] = Section.of({**prof.amecam, **amecam})
    task = TaskDef("brats", "brats", None, 4, True, "amecam")
    return RunContext(task, data or FakeTaskData(), prof, 0, "cpu", ArtifactCache(tmp_path / "cache"))


def events(ctx):
    return {e["stage"]: e["hit"] for e in ctx.cache.events if e["stage"].startswith("amecam")}


def test_plugin_caches_each_stage_and_a_stage2_change_keeps_stage1(tmp_path):
    data = FakeTaskData()
    ctx = make_ctx(tmp_path, data)
    upstream, real = {}, ctx.shared_model

    def spy(name, *args, **kwargs):
        upstream[name] = list(kwargs.get("upstream", ()))
        return real(name, *args, **kwargs)

    ctx.shared_model = spy
    cam = ctx.plugin("cams", "amecam")
    assert events(ctx) == {"amecam-stage1": False, "amecam-stage2": False, "amecam-polarity": False}
    assert upstream == {"amecam-stage1": [], "amecam-stage2": [ctx.shared_model_key("amecam-stage1")]}
    pol = ctx.records["amecam/polarity"]
    assert pol["s"] in (1, -1) and {"drop_plus", "drop_minus", "tied", "n_slices"} <= set(pol)
    assert pol["n_slices"] == int((data.labels[data.split("train")] == 1).sum())
    assert ctx.records["amecam/stage0"]["simclr_epochs"] == 0
    batch = next(data.batches("test", 5))
    maps = cam.maps(batch)
    assert maps.shape == (5, S, S) and float(maps.min()) >= 0 and float(maps.max()) <= 1
    # the map is minmax(s * avg) of the trained stages
    with torch.no_grad():
        avg = am.AmeCamNet(cam.net.stage1, cam.net.stage2)(batch.images)
    torch.testing.assert_close(maps, am.final_cam(avg, pol["s"]))

    other = make_ctx(tmp_path, data)
    other.plugin("cams", "amecam[stage2_epochs=2]")  # a stage-2 parameter: stage 1 is reused
    assert events(other) == {"amecam-stage1": True, "amecam-stage2": False, "amecam-polarity": False}
    assert not [st for st in other.stages if st["stage"] == "train/amecam-stage1"]
    assert [st for st in other.stages if st["stage"] == "train/amecam-stage2"]

    again = make_ctx(tmp_path, data)
    cam3 = again.plugin("cams", "amecam")  # everything reused, same maps, polarity replayed
    assert events(again) == {"amecam-stage1": True, "amecam-stage2": True, "amecam-polarity": True}
    assert not [st for st in again.stages if st["stage"].startswith("train/")]
    assert torch.equal(cam3.maps(batch), maps) and again.records["amecam/polarity"] == pol


def test_plugin_runs_simclr_when_the_profile_asks_and_loads_its_encoder(tmp_path, monkeypatch):
    seen = {}
    real = am.train_stage1

    def spy(model, *args, **kwargs):
        seen["encoder"] = {k: v.clone() for k, v in model.encoder.state_dict().items()}
        return real(model, *args, **kwargs)

    monkeypatch.setattr(am, "train_stage1", spy)
    ctx = make_ctx(tmp_path, simclr_epochs=1, batch=8)
    cam = ctx.plugin("cams", "amecam")
    assert events(ctx) == {"amecam-stage0": False, "amecam-stage1": False, "amecam-stage2": False,
                           "amecam-polarity": False}
    stage0 = [m.value for k, m in ctx._memo.items() if isinstance(k, tuple) and k[0] == "model"
              and isinstance(m.value, am.SimCLRNet)]  # the memoised stage-0 model
    assert len(stage0) == 1
    enc0 = stage0[0].encoder.state_dict()
    assert seen["encoder"].keys() == enc0.keys()
    assert all(torch.equal(seen["encoder"][k], enc0[k].cpu()) for k in enc0)  # loaded by name before training
    assert ctx.records["amecam/stage0"]["encoder"] == "loaded by name"
    assert cam.net.stage1 is not None
    # without SimCLR the stage-1 artifact is a different one
    plain = make_ctx(tmp_path, batch=8)
    plain.plugin("cams", "amecam")
    assert plain.shared_model_key("amecam-stage1") != ctx.shared_model_key("amecam-stage1")


@pytest.mark.parametrize("over,key", [({"output_stride": 32}, "amecam.output_stride"), ({"batch": 3}, "amecam.batch"),
                                      ({"channels": [8, 16, 32]}, "amecam.channels")])
def test_plugin_refuses_a_bad_profile_before_training(tmp_path, over, key):
    from wsss_bench.errors import PluginError

    ctx = make_ctx(tmp_path, **over)
    with pytest.raises(PluginError, match=key) as err:
        ctx.plugin("cams", "amecam")
    assert "cam plugin 'amecam'" in str(err.value) and "profile 'smoke'" in str(err.value)
    assert ctx.cache.events == [] and not [st for st in ctx.stages if st["stage"].startswith("train/")]


def test_plugin_rejects_a_negative_stage2_override():
    from wsss_bench.errors import PluginError
    from wsss_bench_plugins.amecam import AmeCam

    with pytest.raises(PluginError, match="stage2_epochs"):
        AmeCam(stage2_epochs=-1)


def test_plugin_resumes_a_killed_stage_from_its_last_checkpoint(tmp_path):
    import contextlib
    import json

    data = FakeTaskData()

    @contextlib.contextmanager
    def killing(description, total):
        count = [0]

        def advance(n=1):
            count[0] += n
            if description == "train amecam-stage1" and count[0] >= 5:
                raise KeyboardInterrupt  # killed in stage 1's third epoch
        yield advance

    ctx = make_ctx(tmp_path, data, stage1_epochs=3)
    ctx.progress = killing
    with pytest.raises(KeyboardInterrupt):
        ctx.plugin("cams", "amecam")
    assert list((tmp_path / "cache").rglob("checkpoint.safetensors"))
    again = make_ctx(tmp_path, data, stage1_epochs=3)
    again.plugin("cams", "amecam")
    meta = json.loads(next((tmp_path / "cache").rglob("amecam_stage1.train.json")).read_text())
    assert meta["resumed_from"] == 4 and meta["iterations"] == 6  # 2 iterations an epoch, checkpoint per epoch
    fresh = make_ctx(tmp_path / "b", data, stage1_epochs=3)
    fresh.plugin("cams", "amecam")
    a = again.plugin("cams", "amecam").net.stage1.state_dict()
    b = fresh.plugin("cams", "amecam").net.stage1.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # resumed == uninterrupted


# ---------------------------------------------------------------- end to end
@pytest.mark.filterwarnings("ignore:amecam")  # smoke-size exits: the polarity test may tie
@pytest.mark.parametrize("task", ["brats", "flare21-kidney"])
def test_cli_runs_amecam_end_to_end_and_reuses_every_stage(tmp_path, monkeypatch, task):
    import json

    from typer.testing import CliRunner

    from wsss_bench import cli

    monkeypatch.setitem(cli._STATE, "host", None)
    monkeypatch.setenv("WSSS_BENCH_CACHE", str(tmp_path / "cache"))
    args = ["run", "--method", "threshold", "--cam", "amecam", "--task", task, "--profile", "smoke", "--device", "cpu"]
    first = CliRunner().invoke(cli.app, [*args, "--out", str(tmp_path / "one")])
    assert first.exit_code == 0, first.output
    man = json.loads((tmp_path / "one" / "manifest.json").read_text())
    cell = man["cells"][0]
    pol = cell["records"]["amecam/polarity"]
    assert pol["s"] in (1, -1) and "drop_plus" in pol and "drop_minus" in pol
    trained = {st["stage"] for st in cell["stages"]}
    assert {"train/amecam-stage1", "train/amecam-stage2"} <= trained
    second = CliRunner().invoke(cli.app, [*args, "--out", str(tmp_path / "two")])
    assert second.exit_code == 0, second.output
    man2 = json.loads((tmp_path / "two" / "manifest.json").read_text())
    hits = {e["stage"]: e["hit"] for e in man2["cache_events"] if e["stage"].startswith("amecam")}
    assert hits == {"amecam-stage1": True, "amecam-stage2": True, "amecam-polarity": True}
    assert not [st for st in man2["cells"][0]["stages"] if st["stage"].startswith("train/amecam")]
    assert man2["cells"][0]["records"]["amecam/polarity"] == pol
