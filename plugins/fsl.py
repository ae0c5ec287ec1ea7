"""FSL: the fully supervised upper bound (docs/methods/fsl.md).

The row every WSSS table is read against: a MONAI ``UNet`` trained on the ground-truth masks
of the non-ambiguous training slices [paper: "a UNet trained on ground truth"; every detail
inferred], ``DiceCELoss(to_onehot_y=True, softmax=True)``, Adam lr 1e-3, wd 1e-5, batch and
iterations from the profile's ``fsl`` section; prediction = argmax.  It needs no CAM.

It is the only plugin that declares ``reads_train_masks = True``: the data view hands it
training (and validation) masks and refuses every other plugin (the mask-isolation spy
test).  Test masks stay with the runner.  Network and training loop:
:mod:`wsss_bench.nn.fsl`; trained as a shared model, resumable.
"""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Sequence

from wsss_bench.hookspecs import hookimpl
from wsss_bench.interfaces import CamSource, Refiner, SliceBatch

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from wsss_bench.context import RunContext


class FullySupervised(Refiner):
    name = "fsl"
    version = "1"
    params: dict = {}
    needs_cam = False
    reads_train_masks = True
    description = "fully supervised upper bound: MONAI UNet + DiceCE on ground-truth training masks"

    def prepare(self, ctx: "RunContext", sources: Sequence[CamSource] = ()) -> None:
        from wsss_bench.nn import fsl

        self.ctx = ctx
        spec, c = dict(ctx.profile.fsl), int(ctx.task.channels)
        try:
            kwargs = fsl.unet_kwargs(spec, c)
        except ValueError as err:
            raise self.bad_param("channels", f"(profile fsl section) is unusable: {err}") from None
        idx = ctx.data.split("train")

        def build():
            return fsl.build_fsl(spec, c, seed=ctx.seed("init/fsl"))

        def train(model, run):
            from wsss_bench.nn.training import rule_from_profile

            rule = rule_from_profile(ctx.profile, spec, "score", default_every=max(1, int(spec["iterations"]) // 10))
            return fsl.train_fsl(model, ctx.data, idx, spec, run.device, run.seed, run.work,
                                 flips=bool(ctx.task.flips), bf16=ctx.bf16, progress=run.advance, rule=rule)

        params = {"unet": {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()},
                  "train": spec, "lr": fsl.LR, "weight_decay": fsl.WEIGHT_DECAY, "flips": bool(ctx.task.flips),
                  "image_size": int(ctx.data.image_size), "convergence": dict(ctx.profile.get("convergence") or {})}
        self.model = ctx.shared_model("fsl", build, train, params=params, source=[fsl, sys.modules[__name__]],
                                      total=int(spec["iterations"]))
        ctx.record("fsl", {"n_train": int(len(idx)), "iterations": int(spec["iterations"]),
                           "batch": int(spec["batch"]), "channels": list(kwargs["channels"])})

    def refine(self, batch: SliceBatch, maps: "Sequence[torch.Tensor]" = (),
               sources: Sequence[CamSource] = ()) -> "torch.Tensor":
        from wsss_bench.nn.fsl import predict

        images = batch.images.to(self.ctx.device).float()
        with self.ctx.autocast():
            return predict(self.model, images)  # (B, S, S) bool; maps and sources are not used


@hookimpl
def register_refiners(register):
    register(FullySupervised)
