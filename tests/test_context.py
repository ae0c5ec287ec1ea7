"""wsss_bench.context: the run context a plugin sees: memoised maps and plugin instances,
the data view that keeps masks from plugins, artifact keys, shared models, removed methods."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from wsss_bench.errors import PluginError
from wsss_bench.interfaces import Refiner
from wsss_bench.plugins import load_plugins
from wsss_bench.running.runner import RunConfig, Session


def test_maps_on_the_training_split_cover_every_training_slice(tmp_path):
    host = load_plugins()
    session = Session(RunConfig(profile="smoke", device="cpu", cache_dir=tmp_path), host=host)
    ctx = session.context("brats", 0)
    train = ctx.maps("gradcam", "train")
    assert train.shape == (len(ctx.data.split("train")), 32, 32)
    assert not train.flags.writeable
    assert float(train.max()) <= 1.0 and float(train.min()) >= 0.0 and np.ptp(train) > 0
    again = ctx.maps("gradcam", "train")  # memoised: the same array
    assert again is train
    source = ctx.plugin("cams", "gradcam")
    assert ctx.plugin("cams", "gradcam") is source  # one prepared instance per canonical spec
    batch = next(iter(ctx.data.batches(ctx.data.split("train")[:4], 4)))
    with torch.no_grad():
        direct = source.maps(batch)
    assert np.allclose(train[:4], direct.numpy(), atol=1e-6)


def test_data_view_refuses_masks_unless_declared(tmp_path):
    host = load_plugins()
    session = Session(RunConfig(profile="smoke", device="cpu", cache_dir=tmp_path), host=host)
    ctx = session.context("brats", 0)
    train = ctx.data.split("train")[:3]
    gradcam = host.get("cams", "gradcam")()
    with ctx.acting(gradcam), pytest.raises(PluginError, match="gradcam.*reads_train_masks"):
        ctx.data.masks(train)
    with ctx.acting(gradcam), pytest.raises(PluginError):
        next(iter(ctx.data.batches(train, 2, with_masks=True)))
    with pytest.raises(PluginError):
        ctx.data.store  # noqa: B018 - the raw store holds the labels
    with pytest.raises(PluginError):
        ctx.data.fg_fraction  # noqa: B018 - foreground areas are mask information

    class Supervised(Refiner):
        name, needs_cam, reads_train_masks = "sup", False, True

        def refine(self, batch, maps, sources):  # pragma: no cover
            raise NotImplementedError

    sup = Supervised()
    with ctx.acting(sup):
        assert ctx.data.masks(train).shape == (3, 32, 32)
        with pytest.raises(PluginError, match="test slices"):
            ctx.data.masks(ctx.data.split("test")[:2])


def test_bf16_and_source_hash_enter_artifact_keys(tmp_path):
    host = load_plugins()
    session = Session(RunConfig(profile="smoke", device="cpu", cache_dir=tmp_path), host=host)
    ctx = session.context("brats", 0)
    gradcam = host.get("cams", "gradcam")()
    plain, _ = ctx.artifact_key("maps", gradcam)
    ctx.bf16 = True
    assert ctx.artifact_key("maps", gradcam)[0] != plain
    ctx.bf16 = False
    assert ctx.artifact_key("maps", gradcam)[0] == plain


def test_shared_model_is_built_once_and_memoised_with_its_records(tmp_path):
    host = load_plugins()
    session = Session(RunConfig(profile="smoke", device="cpu", cache_dir=tmp_path), host=host)
    ctx = session.context("brats", 0)
    builds = []

    def build():
        builds.append("build")
        return torch.nn.Linear(3, 2)

    def train(model, run):
        ctx.record("toy/trained", True)
        assert run.work.is_dir() and run.seed == ctx.seed("train/toy")
        return {k: v + 1 for k, v in model.state_dict().items()}, {"ok": True}

    ctx.begin_cell()
    a = ctx.shared_model("toy", build, train, params={"x": 1})
    assert not a.training and not any(p.requires_grad for p in a.parameters())
    log = ctx.begin_cell()
    b = ctx.shared_model("toy", build, train, params={"x": 1})
    assert b is a and builds == ["build"]
    # the model's stop record replays too (a train info without a convergence record: fixed steps)
    assert log.records == {"toy/trained": True, "model/toy": {"stop_reason": "fixed steps", "steps": None}}
    assert log.used == [ctx.shared_model_key("toy")]
    assert list((tmp_path / "artifacts" / "toy").glob("*/toy.safetensors"))
    fresh = Session(RunConfig(profile="smoke", device="cpu", cache_dir=tmp_path), host=host).context("brats", 0)
    c = fresh.shared_model("toy", build, lambda m, r: pytest.fail("retrained"), params={"x": 1})
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))


def test_ctx_classifier_names_the_change_and_the_fix():
    from wsss_bench.context import RunContext

    ctx = RunContext.__new__(RunContext)
    with pytest.raises(PluginError, match=r"removed in plugin API 3.*get_classifier\(ctx\)"):
        ctx.classifier()
    with pytest.raises(AttributeError):
        ctx.no_such_thing
