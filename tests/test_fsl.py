"""FSL upper bound (docs/methods/fsl.md): it learns from masks, resumes exactly, and is the one
plugin the data view hands training masks to."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from wsss_bench.data.readers import Flare21Dataset
from wsss_bench.data.taskdata import ensure_phantom, load_task_data
from wsss_bench.interfaces import SliceBatch
from wsss_bench.nn import fsl
from wsss_bench.profiles import load_profile

PROFILE = load_profile("smoke")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: one intra-op thread (conftest)


@pytest.fixture(scope="module")
def liver(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsl-data")
    ensure_phantom(Flare21Dataset(), PROFILE, root, 0)
    return load_task_data(Flare21Dataset(), "flare21-liver", None, PROFILE, 0, root)


def square(size: int) -> np.ndarray:
    """A fixed off-centre square, unrelated to any anatomy."""
    m = np.zeros((size, size), bool)
    m[3:13, 18:28] = True
    return m


class SquareMasks:
    """Four smoke slices whose masks are replaced by the square (batched like TaskData)."""

    def __init__(self, data, rows):
        self.data, self.rows = data, np.asarray(rows)
        self.sq = square(data.image_size)

    def split(self, name):
        return self.rows.copy()  # validation = the training rows (the square is the only target)

    def batches(self, idx, batch_size, shuffle=False, seed=None, device="cpu", with_masks=False):
        idx = np.asarray(idx)
        for s in range(0, len(idx), batch_size):
            r = idx[s:s + batch_size]
            yield SliceBatch(images=torch.from_numpy(self.data.images(r)).to(device),
                             labels=torch.ones(len(r), dtype=torch.long), index=r,
                             case_ids=["sq"] * len(r), z=[int(v) for v in r],
                             masks=torch.from_numpy(np.repeat(self.sq[None], len(r), 0)).to(device)
                             if with_masks else None)


def dice(pred: torch.Tensor, truth: np.ndarray) -> float:
    t = torch.from_numpy(np.broadcast_to(truth, pred.shape).copy())
    return float(2 * (pred & t).sum() / (pred.sum() + t.sum()))


def test_unet_learns_a_fixed_square_unrelated_to_the_image(liver, tmp_path):
    rows = liver.split("train")[:4]
    data = SquareMasks(liver, rows)
    model = fsl.build_fsl(PROFILE.fsl, 1, seed=0)
    before = dice(fsl.predict(model.eval(), torch.from_numpy(liver.images(rows))), data.sq)
    weights, info = fsl.train_fsl(model, data, rows, dict(PROFILE.fsl), "cpu", 0, tmp_path, flips=False,
                                  iterations=200)
    model.load_state_dict(weights)
    pred = fsl.predict(model.eval(), torch.from_numpy(liver.images(rows)))
    assert dice(pred, data.sq) > 0.9, (before, dice(pred, data.sq))
    conv = info["convergence"]  # the rule's criterion is val Dice; the kept weights reproduce it
    per_slice = [dice(pred[i:i + 1], data.sq) for i in range(len(rows))]  # masks are never empty here
    assert "val Dice" in conv["criterion"] and conv["best"] == pytest.approx(float(np.mean(per_slice)), abs=1e-6)  # test Dice in float32
    # the square is not the organ: what it learnt came from the masks, not the images
    assert dice(pred, liver.masks(rows)) < 0.5


def test_architecture_and_recipe_follow_the_profile():
    kw = fsl.unet_kwargs(PROFILE.fsl, 4)
    assert kw == dict(spatial_dims=2, in_channels=4, out_channels=2, channels=(4, 8, 16), strides=(2, 2),
                      num_res_units=1, norm="batch")
    cpu = fsl.unet_kwargs(load_profile("cpu").fsl, 1)
    assert cpu["channels"] == (8, 16, 32, 64) and cpu["strides"] == (2, 2, 2)
    assert fsl.LR == 1e-3 and fsl.WEIGHT_DECAY == 1e-5


def test_flips_move_image_and_mask_together(liver, tmp_path, monkeypatch):
    import monai.losses

    rows = liver.split("train")[:8]
    sq = square(liver.image_size)

    class ImageMasks(SquareMasks):  # the "mask" is the off-centre square drawn into the image
        def batches(self, idx, batch_size, **kw):
            for b in super().batches(idx, batch_size, **kw):
                b.images[:, 0][torch.from_numpy(np.repeat(sq[None], len(b), 0))] = 1.0
                yield b

    seen = []
    real = monai.losses.DiceCELoss

    class Spy(real):
        def forward(self, logits, target):
            seen.append(target[:, 0].bool().clone())
            return super().forward(logits, target)

    monkeypatch.setattr(monai.losses, "DiceCELoss", Spy)
    model = fsl.build_fsl(PROFILE.fsl, 1, seed=0)
    inputs = []
    model.register_forward_pre_hook(lambda m, a: inputs.append(a[0][:, 0].clone()))
    fsl.train_fsl(model, ImageMasks(liver, rows), rows, {**dict(PROFILE.fsl), "batch": 8}, "cpu", 0, tmp_path,
                  flips=True, iterations=6)
    flipped = 0
    for x, y in zip(inputs, seen):
        assert torch.equal(x[y], torch.ones_like(x[y]))  # the mask still covers the square in the image
        flipped += int((y != torch.from_numpy(sq)).any(dim=(1, 2)).sum())
    assert flipped > 0  # some slices were flipped


class Killed(Exception):
    pass


def test_training_resumes_bit_identically_after_a_kill(liver, tmp_path):
    rows = liver.split("train")[:12]
    data = SquareMasks(liver, rows)
    spec = {**dict(PROFILE.fsl), "batch": 4}
    ref_w, ref_info = fsl.train_fsl(fsl.build_fsl(spec, 1, seed=1), data, rows, spec, "cpu", 3, tmp_path / "a",
                                    flips=True, iterations=12, every=3)
    done = []

    def advance(n):
        done.append(n)
        if sum(done) == 7:
            raise Killed

    with pytest.raises(Killed):
        fsl.train_fsl(fsl.build_fsl(spec, 1, seed=1), data, rows, spec, "cpu", 3, tmp_path / "b", flips=True,
                      iterations=12, every=3, progress=advance)
    w, info = fsl.train_fsl(fsl.build_fsl(spec, 1, seed=1), data, rows, spec, "cpu", 3, tmp_path / "b",
                            flips=True, iterations=12, every=3)
    assert info["resumed_from"] == 6
    assert all(torch.equal(ref_w[k], w[k]) for k in ref_w)  # BatchNorm statistics included
    assert info["loss_log"] == ref_info["loss_log"]


def test_only_fsl_reads_training_masks_and_never_test_masks(liver):
    from wsss_bench.cache import ArtifactCache
    from wsss_bench.context import RunContext
    from wsss_bench.errors import PluginError
    from wsss_bench_plugins.fsl import FullySupervised
    from wsss_bench_plugins.threshold import Threshold

    assert FullySupervised.reads_train_masks is True and FullySupervised.needs_cam is False
    ctx = RunContext(liver.task, liver, PROFILE, 0, "cpu", ArtifactCache("/nonexistent", enabled=False))
    train = liver.split("train")[:3]
    with ctx.acting(FullySupervised()):
        assert ctx.data.masks(train).shape == (3, liver.image_size, liver.image_size)
        batch = next(ctx.data.batches(train, 3, with_masks=True))
        assert batch.masks is not None and torch.equal(batch.masks, torch.from_numpy(liver.masks(train)))
        with pytest.raises(PluginError, match="test"):
            ctx.data.masks(liver.split("test")[:2])
    with ctx.acting(Threshold()), pytest.raises(PluginError, match="reads_train_masks"):
        ctx.data.masks(train)


def test_end_to_end_smoke_and_a_rerun_reuses_the_model(tmp_path, monkeypatch):
    import pandas as pd
    from typer.testing import CliRunner

    from wsss_bench import cli

    monkeypatch.setitem(cli._STATE, "host", None)
    # a private cache: other tests may already have trained this smoke model in the shared one
    args = ["run", "--profile", "smoke", "--method", "fsl", "--task", "flare21-liver", "--device", "cpu",
            "--cache-dir", str(tmp_path / "cache"), "--out"]
    first = CliRunner().invoke(cli.app, args + [str(tmp_path / "a")])
    assert first.exit_code == 0, first.output
    assert "stage train/fsl" in first.output
    frame = pd.read_parquet(tmp_path / "a" / "results.parquet")
    assert set(frame["method"]) == {"fsl"} and frame["dice"].between(0, 1).all()
    again = CliRunner().invoke(cli.app, args + [str(tmp_path / "b")])
    assert again.exit_code == 0, again.output
    assert "reused cached fsl (" in again.output and "stage train/fsl" not in again.output
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "b" / "results.parquet"), frame)
