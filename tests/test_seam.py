"""SEAM (docs/methods/seam.md): PCM, losses, training, geometry checks and the ``seam`` CAM source.

The references here are independent: float64 loops for the PCM and the losses, and the
mechanism checks the spec lists (a)-(d).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fakes import FakeTaskData
from wsss_bench.errors import PluginError
from wsss_bench.interfaces import SliceBatch
from wsss_bench.nn import seam
from wsss_bench.profiles import Section, load_profile

SMOKE_SPEC = {"arch": "resnet18", "channels": [8, 16, 32, 64]}
EPS = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: one intra-op thread (conftest)


@pytest.fixture(scope="module")
def smoke_brats(tmp_path_factory):
    """The smoke BraTS phantom's task data (base seed 0)."""
    from wsss_bench.data.readers import BratsDataset
    from wsss_bench.data.taskdata import ensure_phantom, load_task_data

    prof = load_profile("smoke")
    root = tmp_path_factory.mktemp("seam-data")
    ensure_phantom(BratsDataset(), prof, root, 0)
    return load_task_data(BratsDataset(), "brats", None, prof, 0, root)


def seam_data(n=24, size=32, channels=4, seed=0):
    """train = every row, val = the last 8."""
    return FakeTaskData(n, size, channels, seed, splits={"train": np.arange(n), "val": np.arange(n - 8, n)})


# ---------------------------------------------------------------- float64 references
def naive_resize(a: np.ndarray, out: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of (C, h, w) with align_corners=True, one output pixel at a time."""
    c, h, w = a.shape
    res = np.zeros((c, *out))
    for i in range(out[0]):
        sy = i * (h - 1) / (out[0] - 1) if out[0] > 1 else 0.0
        y0 = int(math.floor(sy))
        y1, wy = min(y0 + 1, h - 1), sy - y0
        for j in range(out[1]):
            sx = j * (w - 1) / (out[1] - 1) if out[1] > 1 else 0.0
            x0 = int(math.floor(sx))
            x1, wx = min(x0 + 1, w - 1), sx - x0
            res[:, i, j] = ((1 - wy) * (1 - wx) * a[:, y0, x0] + (1 - wy) * wx * a[:, y0, x1]
                            + wy * (1 - wx) * a[:, y1, x0] + wy * wx * a[:, y1, x1])
    return res


def naive_max_norm(p: np.ndarray) -> np.ndarray:
    """(C, h, w): ReLU, then ReLU(p - min - e) / (max - min + e) per channel."""
    out = np.zeros_like(p)
    for k in range(p.shape[0]):
        q = np.maximum(p[k], 0.0)
        lo, hi = q.min(), q.max()
        out[k] = np.maximum(q - lo - EPS, 0.0) / (hi - lo + EPS)
    return out


def naive_view(a: np.ndarray, size, flip: bool) -> np.ndarray:
    r = naive_resize(a, size)
    return r[:, :, ::-1] if flip else r


def naive_pcm(cam_d: np.ndarray, f_in: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """cam_d (K, h, w), f_in (Din, h, w), 1x1 conv weight (D, Din): loops over pixel pairs."""
    k, h, w = cam_d.shape
    n = h * w
    fin = f_in.reshape(f_in.shape[0], n)
    f = np.zeros((weight.shape[0], n))
    for p in range(n):
        v = weight @ fin[:, p]
        f[:, p] = v / (math.sqrt(float((v * v).sum())) + EPS)
    aff = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            aff[i, j] = max(0.0, float((f[:, i] * f[:, j]).sum()))
    for j in range(n):
        col = aff[:, j].sum()
        aff[:, j] = aff[:, j] / (col + EPS)
    cam = cam_d.reshape(k, n)
    out = np.zeros((k, n))
    for c in range(k):
        for j in range(n):
            out[c, j] = sum(cam[c, i] * aff[i, j] for i in range(n))
    return out.reshape(k, h, w)


def bce_logit(z: float, y: float) -> float:
    s = 1.0 / (1.0 + math.exp(-z))
    return -(y * math.log(s) + (1 - y) * math.log(1 - s))


# ---------------------------------------------------------------- the PCM
def test_normalised_cam_is_detached_relu_over_max_with_bg_one_minus_fg():
    cam = torch.randn(2, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    out = seam.normalised_cam(cam)
    assert not out.requires_grad
    for b in range(2):
        fg = np.maximum(cam[b, 1].detach().numpy(), 0)
        fg = fg / (fg.max() + EPS)
        assert np.allclose(out[b, 1].numpy(), fg, atol=1e-7)
        assert np.allclose(out[b, 0].numpy(), 1 - fg, atol=1e-7)  # not the bg channel's own CAM


def test_pcm_equals_a_float64_loop():
    torch.manual_seed(0)
    model = seam.build_seam(SMOKE_SPEC, 4, seed=3).double()
    cam_d = torch.rand(1, 2, 3, 3, dtype=torch.float64)
    f = torch.randn(1, 4 + 192, 3, 3, dtype=torch.float64)
    got = model.pcm(cam_d, f)[0].detach().numpy()
    w = model.pcm_proj.weight.detach()[:, :, 0, 0].numpy()
    proj = w @ f[0].numpy().reshape(196, 9)
    assert (proj.T @ proj < 0).any()  # some affinities are negative: the ReLU matters here
    want = naive_pcm(cam_d[0].numpy(), f[0].numpy(), w)
    assert np.allclose(got, want, rtol=1e-10, atol=1e-12)


def test_b_random_features_change_the_cam():
    """(b): for random features, cam_rv differs from cam_d (max abs diff > 1e-3)."""
    model = seam.build_seam(SMOKE_SPEC, 4, seed=1).eval()
    g = torch.Generator().manual_seed(5)
    x = torch.rand(2, 4, 32, 32, generator=g)
    with torch.no_grad():
        s2, s3, last = model.features(x)
        cam = model.head(last)
        cam_d = seam.normalised_cam(cam)
        f = torch.rand(2, 4 + 192, *cam.shape[-2:], generator=g)
        cam_rv = model.pcm(cam_d, f)
        _, cam_rv_full = model.cam_grid(x)  # the network's own features
    assert (cam_rv - cam_d).abs().max() > 1e-3
    assert (cam_rv_full - cam_d).abs().max() > 1e-3


def test_c_one_hot_features_leave_the_cam_unchanged():
    """(c): with one-hot features per pixel (f^T f = I), cam_rv = cam_d (up to the stated 1e-5s)."""
    h, w, d = 3, 4, 192
    cam_d = torch.rand(2, 2, h, w, dtype=torch.float64)
    f = torch.zeros(2, d, h * w, dtype=torch.float64)
    for p in range(h * w):
        f[:, p, p] = 1.0
    f = f.view(2, d, h, w)
    out = seam.propagate(cam_d, f)
    a = 1.0 / (1.0 + EPS) ** 2  # f^T f after the (||f|| + eps) normalisation
    assert torch.allclose(out, cam_d * (a / (a + EPS)), rtol=1e-13, atol=0)
    assert (out - cam_d).abs().max() < 3 * EPS


def test_d_a_loss_on_cam_rv_leaves_the_backbone_untouched():
    """(d): the PCM sees detached CAM and features, so backbone and head get no gradient."""
    model = seam.build_seam(SMOKE_SPEC, 4, seed=2).train()
    x = torch.rand(4, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    _, cam_rv = model(x)
    (cam_rv ** 2).mean().backward()
    for name, p in list(model.backbone.named_parameters()) + list(model.head.named_parameters()):
        assert p.grad is None or not p.grad.any(), name
    for conv in (model.pcm_proj, model.pcm_stage2, model.pcm_stage3):
        assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0  # the loss does reach the PCM


def test_network_shapes_and_output_stride():
    model = seam.build_seam(SMOKE_SPEC, 1, seed=0).eval()
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        cam_g, rv_g = model.cam_grid(x)
        cam, rv = model(x)
    assert cam_g.shape == rv_g.shape == (2, 2, 4, 4)  # stride 8 on every stage
    assert cam.shape == rv.shape == (2, 2, 32, 32)
    assert model.head.bias is None and model.pcm_proj.bias is None and model.pcm_proj.in_channels == 1 + 192
    a = seam.build_seam(SMOKE_SPEC, 1, seed=0)
    assert all(torch.equal(u, v) for u, v in zip(a.state_dict().values(), model.state_dict().values()))


# ---------------------------------------------------------------- the losses
def _random_maps(b, full, small, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 2, n, n, generator=g, dtype=torch.float64) for n in (full, full, small, small)]


@pytest.mark.parametrize("flip", [False, True])
def test_er_and_ecr_equal_float64_loops(flip):
    b, full, small = 3, 8, 5
    cam1, rv1, cam2, rv2 = _random_maps(b, full, small)
    y = torch.tensor([1, 0, 1])
    er = float(seam.er_loss(cam1, cam2, y, flip))
    ecr = float(seam.ecr_loss(cam1, rv1, cam2, rv2, y, flip))
    k = int(2 * small * small * 0.2)
    er_terms, top1, top2 = [], [], []
    for i in range(b):
        yl = float(y[i])
        lab = np.array([1.0, yl])[:, None, None]
        a = naive_view(naive_max_norm(cam1[i].numpy()), (small, small), flip)[1] * yl
        bb = naive_max_norm(cam2[i].numpy())[1] * yl
        er_terms.append(np.abs(a - bb).ravel())
        c1 = np.stack([1 - a, a])
        c2 = np.stack([1 - bb, bb])
        r1 = naive_view(naive_max_norm(rv1[i].numpy()), (small, small), flip) * lab
        r2 = naive_max_norm(rv2[i].numpy()) * lab
        top1.append(np.sort(np.abs(c2 - r1).ravel())[::-1][:k])
        top2.append(np.sort(np.abs(c1 - r2).ravel())[::-1][:k])
    assert er == pytest.approx(np.concatenate(er_terms).mean(), rel=1e-9, abs=1e-12)
    assert ecr == pytest.approx(np.concatenate(top1).mean() + np.concatenate(top2).mean(), rel=1e-9)


def test_ecr_targets_are_detached():
    """Only cam_rv learns from the ECR: the CAMs of both views are detached targets."""
    maps = [t.requires_grad_(True) for t in _random_maps(2, 8, 4, seed=3)]
    seam.ecr_loss(*maps, torch.tensor([1, 1]), True).backward()
    cam1, rv1, cam2, rv2 = maps
    assert cam1.grad is None and cam2.grad is None
    assert rv1.grad.abs().sum() > 0 and rv2.grad.abs().sum() > 0


class RampCam(torch.nn.Module):
    """A perfectly equivariant 'network': cam = [-a, a] with a the channel mean of the input."""

    def forward(self, x):
        a = x.mean(dim=1, keepdim=True)
        cam = torch.cat([-a, a], dim=1)
        return cam, cam.clone()


@pytest.mark.parametrize("flip", [False, True])
def test_an_equivariant_cam_has_zero_er_loss(flip):
    """On an affine ramp image (kept exactly by align_corners=True resizing) a CAM that commutes
    with rescale-and-flip has L_ER = 0: the second view and the alignment of the first agree."""
    ii, jj = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    ramp = (ii + 2 * jj) / 93.0  # affine, not mirror-symmetric
    x = ramp.expand(2, 4, 32, 32).contiguous()
    y = torch.tensor([1, 1])
    losses = seam.seam_losses(RampCam(), x, y, 0.5, flip)
    assert float(losses["er"]) < 1e-6
    mirrored = seam.seam_losses(RampCam(), x.flip(-1), y, 0.5, flip)
    assert float(mirrored["er"]) < 1e-6


def test_cls_loss_equals_a_float64_loop():
    b, full, small = 3, 8, 4
    cam1, rv1, cam2, rv2 = _random_maps(b, full, small, seed=1)
    y = torch.tensor([1, 0, 1])
    got = float(seam.cls_loss(cam1, rv1, cam2, rv2, y))
    bce, rvmin = 0.0, 0.0
    for cam, rv in ((cam1, rv1), (cam2, rv2)):
        n = cam.shape[-1] ** 2
        k = n // 4
        bce += np.mean([bce_logit(float(cam[i, 1].mean()), float(y[i])) for i in range(b)])
        lows = [np.maximum(np.sort((rv[i, 1].numpy() * float(y[i])).ravel())[:k], 0) for i in range(b)]
        rvmin += np.concatenate(lows).mean()
    assert got == pytest.approx(bce / 2 + rvmin / 2, rel=1e-9)


def test_the_second_view_is_rescaled_and_flipped_on_brats_only():
    x = torch.rand(2, 4, 32, 32)
    v = seam.to_view(x, seam.view_size(x.shape[-2:], 0.5), flip=True)
    assert v.shape == (2, 4, 16, 16)
    want = naive_view(x[0].double().numpy(), (16, 16), True)
    assert np.allclose(v[0].numpy(), want, atol=1e-6)
    assert torch.equal(seam.to_view(x, (16, 16), flip=False).flip(-1), v)


def test_a_er_loss_falls_on_a_fixed_scaled_pair_of_smoke_images(smoke_brats):
    """(a): 30 SGD steps of the SEAM loss on a fixed pair (I, I^) lower L_ER."""
    data = smoke_brats
    idx = data.split("train")
    lab = np.asarray(data.labels)[idx]
    rows = list(idx[lab == 1][:2]) + list(idx[lab == 0][:2])
    x = torch.as_tensor(np.asarray(data.images(rows)))
    y = torch.tensor([1, 1, 0, 0])
    model = seam.build_seam(SMOKE_SPEC, 4, seed=0).train()
    opt = torch.optim.SGD(seam.parameter_groups(model), lr=seam.LR, momentum=seam.MOMENTUM,
                          weight_decay=seam.WEIGHT_DECAY)

    def er_now() -> float:  # same dropout masks each time; BatchNorm in training mode
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(123)
            return float(seam.seam_losses(model, x, y, 0.5, True)["er"])

    torch.manual_seed(0)
    before = er_now()
    for _ in range(30):
        losses = seam.seam_losses(model, x, y, 0.5, True)
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
    after = er_now()
    assert before > 0.05  # not trivially zero
    assert after < 0.75 * before, (before, after)


# ---------------------------------------------------------------- geometry
def test_a_collapsed_view_is_a_clear_error_before_training(tmp_path):
    model = seam.build_seam(SMOKE_SPEC, 4, seed=0)
    grids = seam.check_geometry(model, 4, 32, 0.5, [1.0])
    assert grids["seam.view_scale=0.5"] == [16, 2, 2]
    with pytest.raises(PluginError, match=r"seam\.view_scale.*0\.2.*6x6 px.*CAM grid is 1x1.*raise seam\.view_scale"):
        seam.check_geometry(model, 4, 32, 0.2, [1.0])
    with pytest.raises(PluginError, match=r"seam\.tta_scales.*0\.25"):
        seam.check_geometry(model, 4, 32, 0.5, [1.0, 0.25])
    with pytest.raises(PluginError, match=r"seam\.view_scale.*must be > 0"):
        seam.check_geometry(model, 4, 32, 0.0, [1.0])
    prof = load_profile("smoke")
    prof["seam"] = Section.of({**dict(prof.seam), "view_scale": 0.1})
    steps = []
    with pytest.raises(PluginError, match=r"seam\.view_scale"):
        seam.train_seam(model, seam_data(), prof, "cpu", 0, tmp_path, flips=True, step_hook=steps.append)
    assert steps == [] and not list(tmp_path.iterdir())  # nothing trained, nothing written


# ---------------------------------------------------------------- training
def test_augment_jitter_crop_and_flip_are_seeded():
    x = torch.rand(4, 1, 32, 32)
    a = seam.augment(x, torch.Generator().manual_seed(1), flips=False)
    b = seam.augment(x, torch.Generator().manual_seed(1), flips=False)
    assert a.shape == x.shape and torch.equal(a, b)
    seen_pad = seen_crop = False
    for s in range(40):
        out = seam.augment(x, torch.Generator().manual_seed(s), flips=False)
        zero_rows = (out.abs().sum(dim=(1, 3)) == 0).any()
        seen_pad |= bool(zero_rows)
        seen_crop |= not bool(zero_rows) and not torch.equal(out, x)
    assert seen_pad and seen_crop  # both sides of the 0.9-1.1 jitter occur


def test_poly_schedule_and_parameter_groups():
    model = seam.build_seam(SMOKE_SPEC, 4, seed=0)
    groups = {g["name"]: g for g in seam.parameter_groups(model)}
    assert groups["new"]["lr"] == pytest.approx(0.1) and groups["new"]["weight_decay"] == 5e-4
    assert groups["backbone"]["lr"] == pytest.approx(0.01) and groups["backbone_bias"]["weight_decay"] == 0.0
    new = {id(p) for m in model.new_layers() for p in m.parameters()}
    assert {id(p) for p in groups["new"]["params"]} == new
    n_all = sum(len(g["params"]) for g in groups.values())
    assert n_all == len(list(model.parameters()))
    assert seam.poly_factor(0, 10) == 1.0 and seam.poly_factor(5, 10) == pytest.approx(0.5 ** 0.9)


def test_training_uses_poly_decay_and_the_lr_multipliers(tmp_path, monkeypatch):
    seen = []
    step = torch.optim.SGD.step

    def spy(self, *a, **k):
        seen.append({g["name"]: (g["lr"], g["weight_decay"], g["momentum"]) for g in self.param_groups})
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.SGD, "step", spy)
    model = seam.build_seam(SMOKE_SPEC, 4, seed=0)
    seam.train_seam(model, seam_data(), load_profile("smoke"), "cpu", 0, tmp_path, flips=False, iterations=4)
    assert len(seen) == 4
    mult = {"backbone": 1, "backbone_bias": 2, "new": 10}
    for it, groups in enumerate(seen):
        for name, (lr, wd, mom) in groups.items():
            assert lr == pytest.approx(0.01 * mult[name] * (1 - it / 4) ** 0.9, rel=1e-12)
            assert mom == 0.9 and wd == (0.0 if name.endswith("bias") else 5e-4)


def test_training_resumes_bit_identically_after_a_kill(tmp_path):
    prof, data = load_profile("smoke"), seam_data()

    class Killed(Exception):
        pass

    def train(work, kill_at=None):
        def hook(it):
            if it == kill_at:
                raise Killed

        model = seam.build_seam(SMOKE_SPEC, 4, seed=1)
        return seam.train_seam(model, data, prof, "cpu", 7, work, flips=True, iterations=6,
                               checkpoint_interval=2, step_hook=hook)

    torch.manual_seed(11)  # each run starts from a different global RNG state (a fresh process)
    full, info = train(tmp_path / "full")
    torch.manual_seed(12)
    with pytest.raises(Killed):
        train(tmp_path / "cut", kill_at=5)
    torch.manual_seed(13)
    resumed, info2 = train(tmp_path / "cut")
    assert info["resumed_from"] is None and info2["resumed_from"] == 4
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert info2["loss_log"] == info["loss_log"]
    assert set(info["last_losses"]) == {"cls", "er", "ecr"}


# ---------------------------------------------------------------- inference
def test_maps_flip_tta_is_flip_equivariant_and_in_unit_range():
    model = seam.build_seam(SMOKE_SPEC, 4, seed=4).eval()
    with torch.no_grad():  # a positive foreground row keeps the untrained CAM non-degenerate
        model.head.weight[1].abs_()
    x = torch.rand(3, 4, 32, 32, generator=torch.Generator().manual_seed(2))
    m = seam.seam_maps(model, x, [0.5, 1.0], flips=True)
    assert m.shape == (3, 32, 32) and float(m.min()) == 0.0 and float(m.max()) == 1.0
    mf = seam.seam_maps(model, x.flip(-1), [0.5, 1.0], flips=True)
    assert torch.allclose(mf.flip(-1), m, atol=3e-3)  # each flipped pass is flipped back (resize rounding)
    one = seam.seam_maps(model, x, [1.0], flips=True)
    assert torch.equal(seam.seam_maps(model, x.flip(-1), [1.0], flips=True).flip(-1), one)
    # the map is the cam_rv foreground channel (not the raw CAM)
    with torch.no_grad():
        cam, cam_rv = model(x)
    from wsss_bench.maps import minmax

    plain = seam.seam_maps(model, x, [1.0], flips=False)
    assert torch.allclose(plain, minmax(torch.relu(cam_rv[:, 1])), atol=1e-6)


def test_background_remap_moves_the_protocol_threshold_to_bg():
    m = torch.rand(2, 16, 16, generator=torch.Generator().manual_seed(0))
    m[:, 0, 0], m[:, 0, 1] = 0.0, 1.0
    out = seam.background_remap(m, 0.26)
    from wsss_bench.maps import minmax

    assert torch.equal(minmax(out) > 0.5, m > 0.26)
    assert float(out.min()) == 0.0 and float(out.max()) == 1.0


# ---------------------------------------------------------------- the CAM source, end to end
def test_seam_parameters_are_checked():
    from wsss_bench_plugins.seam import Seam

    assert Seam().bg is None and Seam(bg="0.26").bg == 0.26
    for bad in ("1.5", "0", "dark"):
        with pytest.raises(PluginError, match=r"plugin 'seam': parameter bg="):
            Seam(bg=bad)


@pytest.mark.parametrize("task", ["brats", "flare21-kidney"])
def test_e2e_cli_trains_seam_once_and_reuses_it(run_cli, tmp_path, task):
    import json

    import pandas as pd

    # a private cache: other tests may already have trained this smoke model in the shared one
    args = ["run", "--method", "threshold", "--cam", "seam", "--task", task, "--profile", "smoke",
            "--cache-dir", tmp_path / "cache", "--out"]
    first = run_cli(*args, tmp_path / "run1")
    assert first.exit_code == 0, first.output
    assert "train seam" in first.output
    frame = pd.read_parquet(tmp_path / "run1" / "results.parquet")
    assert frame["dice"].between(0, 1).all() and set(frame["gate"]) >= {"label"}
    cell = json.loads((tmp_path / "run1" / "manifest.json").read_text())["cells"][0]
    rec = cell["records"]["seam"]
    assert rec["tta_flip"] is (task == "brats") and rec["view_flip"] is (task == "brats")
    assert rec["geometry"]["seam.view_scale=0.5"] == [16, 2, 2]
    again = run_cli(*args, tmp_path / "run2")  # another run directory: the trained SEAM is reused
    assert again.exit_code == 0, again.output
    assert "reused cached seam" in again.output and "train seam" not in again.output
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "run2" / "results.parquet"), frame)


def test_e2e_a_collapsing_profile_fails_before_training(run_cli, tmp_path, monkeypatch):
    import copy

    from wsss_bench import profiles

    raw = copy.deepcopy(profiles._raw())
    raw["smoke"]["seam"]["view_scale"] = 0.1
    monkeypatch.setattr(profiles, "_raw", lambda: raw)
    out = run_cli("run", "--method", "threshold", "--cam", "seam", "--task", "brats", "--profile", "smoke",
                  "--out", tmp_path / "run")
    assert out.exit_code != 0
    assert "seam.view_scale" in out.output and "0.1" in out.output
    assert "train seam" not in out.output


def test_training_names_its_criterion_and_keeps_the_best_evaluation(tmp_path):
    """The rule scores the classification head on val; the kept weights reproduce the best AUC."""
    from sklearn.metrics import roc_auc_score

    data = seam_data(n=32)
    prof = load_profile("smoke")
    prof["seam"] = type(prof.seam)({**prof.seam, "eval_every": 2})
    model = seam.build_seam(SMOKE_SPEC, 4, seed=3)
    weights, info = seam.train_seam(model, data, prof, "cpu", 5, tmp_path, flips=False, iterations=8)
    conv = info["convergence"]
    assert "classification head" in conv["criterion"] and [p[0] for p in conv["curve"]] == [2, 4, 6, 8]
    values = [p[2] for p in conv["curve"]]
    kept = [p[0] for p in conv["curve"]].index(conv["kept_step"])
    assert conv["best"] == values[kept] == max(values)  # at equal AUC the tie-break (lower BCE) decides
    fresh = seam.build_seam(SMOKE_SPEC, 4, seed=99)
    fresh.load_state_dict(weights)
    fresh.eval()
    rows = data.split("val")
    with torch.no_grad():
        cam, _ = fresh(torch.from_numpy(data.images(rows)))
    p = torch.sigmoid(cam[:, 1].mean(dim=(1, 2))).numpy()
    assert roc_auc_score(data.labels[rows], p) == pytest.approx(conv["best"], abs=1e-6)
